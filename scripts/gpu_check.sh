#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (its results: README "Training").
# Expects wheels in .whl/ (bitsandbytes, peft, datasets, dill, multiprocess, transformers,
# liger-kernel: Triton comes with CUDA builds of torch)
# and .gpu/smollm2/ holding SmolLM2-135M's config and tokenizer (no weights: the machine
# has no hub access, so the benchmarks run a random model of that exact shape).
# Writes logs and benchmark tables to $OUT (default runs/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ADAPTERS_HOME=/tmp/adapters-home
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes, datasets; print('torch', \
torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, \
'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" || exit 1
python3 - <<'EOF'
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(".gpu/smollm2")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained("/tmp/smol")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f".gpu/smollm2/{f}", "/tmp/smol/")
print("random SmolLM2-135M-shaped model in /tmp/smol")
EOF
# 1. The test files whose code paths differ on CUDA (fused CE, autocast, 4-bit, decoding,
#    Liger's kernels against the plain step, one-rank FSDP against plain training on CUDA).
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  tests/test_liger.py tests/test_train.py tests/test_infer.py tests/test_merge.py \
  "tests/test_fsdp.py::test_fsdp_on_one_process_equals_plain_training" \
  2>&1 | tee "$OUT/pytest.log" | tail -25
# 2. Training speed and memory against HF Trainer + peft, same tokens (CUDA memory).
timeout "${BENCH_TIMEOUT:-240}" python3 scripts/bench_train.py --models smollm2 \
  --model-path /tmp/smol --no-heldout --cases a-256 a-1024 b-padded b-flat c-qlora --steps 30 \
  --out "$OUT/bench" 2>&1 | tail -12
# 3. Mixed-adapter generation on CUDA.
timeout "${SWAP_TIMEOUT:-90}" python3 scripts/bench_swap.py --base /tmp/smol --device cuda \
  --work /tmp/swap --out "$OUT" --repeat 3 2>&1 | tail -10
# 4. Four adapters in one pass vs one after another (issue #31's GPU target: total tokens/s
#    >= 1.3x sequential), QLoRA on a random model of Llama-3.2-1B's shape, small micro-batches.
python3 - <<'EOF'
import shutil, torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
small = AutoConfig.from_pretrained(".gpu/smollm2")
cfg = LlamaConfig(vocab_size=small.vocab_size, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  tie_word_embeddings=True, bos_token_id=small.bos_token_id,
                  eos_token_id=small.eos_token_id)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained("/tmp/llama1b")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f".gpu/smollm2/{f}", "/tmp/llama1b/")
print("random Llama-3.2-1B-shaped model in /tmp/llama1b")
EOF
timeout "${JOBS_TIMEOUT:-240}" python3 scripts/bench_jobs.py --gpu --model-path /tmp/llama1b \
  --quantization 4bit --steps 8 --batch 2 --repeats 3 --out "$OUT/jobs" 2>&1 | tail -10
