"""Tiny random GPT-2 and Llama models with a real (tiny, trained here) BPE tokenizer, offline."""

from __future__ import annotations

import collections
import csv
import inspect
import json
import os
import random
import textwrap
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from adapters.adapter import build_manifest, save_adapter
from adapters.cli import main as cli_main
from adapters.config import LoraConfig, ModelConfig, load_recipe
from adapters.lora import attach_lora
from adapters.model import default_model_dir, load_base
from adapters.training import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
        os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def _corpus() -> list[str]:
    mods = [collections, json, textwrap, inspect, os.path]
    return [inspect.getsource(m) for m in mods]


def build_tokenizer(folder: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return folder


def make_gpt2(folder: Path, tok, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02): with a frozen random lm_head, small weights cap the
    # logits near zero and no adapter could lower the loss far below log(vocab).
    kw = dict(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
              bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
              initializer_range=0.2)
    kw.update(overrides)
    cfg = GPT2Config(**kw)
    return _save(GPT2LMHeadModel(cfg), tok, folder)


def make_llama(folder: Path, tok, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=False, initializer_range=0.2)
    kw.update(overrides)
    return _save(LlamaForCausalLM(LlamaConfig(**kw)), tok, folder)


@pytest.fixture(scope="session")
def tiny_tok(tiny_tok_dir):
    return AutoTokenizer.from_pretrained(tiny_tok_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tok) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2"), tiny_tok)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tok) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"), tiny_tok)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tiny_gpt2, tiny_llama) -> Path:
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]


@pytest.fixture
def fused_op_calls(monkeypatch) -> dict[str, int]:
    """How often the fused LoRA op's forward and backward ran; both still run (wrapped).

    A fused layer silently takes peft's forward in any state the op does not cover, and then
    a "fused" pass and its peft reference are one computation: equal results prove nothing
    unless the op is seen to run.
    """
    from adapters.kernels.lora import FusedLoraFn

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        def counted(*args, _orig=getattr(FusedLoraFn, name), _name=name):
            calls[_name] += 1
            return _orig(*args)

        monkeypatch.setattr(FusedLoraFn, name, staticmethod(counted))
    return calls


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def _default_models(tmp_path_factory) -> Path:
    """The embedded default model converted from its GGUF once per run (~15-20 s), in a home
    of its own: the `models` folder default_model tests share. Under pytest -n the workers
    share it too: the first converts (under a lock), the others wait and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    home = root / "default-home"
    with FileLock(str(root / "default-home.lock")), pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_HOME", str(home))
        default_model_dir(progress=False)  # converts once, then finds the cache
    return home / "models"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch, request):
    """Every test gets its own ADAPTERS_HOME: caches and unpacked archives never leak. Tests
    marked default_model find the default model already converted there (a link)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTERS_HOME", str(home))
    if request.node.get_closest_marker("default_model"):
        models = request.getfixturevalue("_default_models")
        home.mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(models, target_is_directory=True)


def trained_adapter(path, out, seed=1, **model_kw):
    """A LoRA r=4 adapter on the model at `path` with random non-zero B, saved to `out`.

    A stand-in for training (non-zero B, so the adapter changes the logits); returns (pm, tok).
    """
    cfg = ModelConfig(name=str(path), **{"dtype": "fp32", **model_kw})
    model, tok = load_base(cfg)
    pm = attach_lora(model, LoraConfig(r=4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    manifest = build_manifest(pm.get_base_model(), tok, str(path), cfg, LoraConfig(r=4))
    save_adapter(pm, out, manifest)
    return pm, tok


def qa_csv(path, n=24):
    """A question/answer CSV (input, output) of `n` rows of simple arithmetic."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["input", "output"])
        for i in range(n):
            w.writerow([f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}."])
    return path


def recipe(model, tmp_path, *extra, rows=24):
    """A small fp32 recipe on `model` with a QA CSV in `tmp_path`; `extra` are overrides."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = qa_csv(tmp_path / "qa.csv", rows)
    return load_recipe(None, [f"model.name={model}", "model.dtype=fp32", f"data.train={data}",
                              "data.max_seq_len=64", "train.batch_size=2", "train.lr=5e-3",
                              f"output.dir={tmp_path / 'out'}", "lora.r=4", *extra])


def run_cli(*argv, capsys=None) -> tuple[int, str, str]:
    """The real `adapters` CLI in this process: (exit code, stdout, stderr) when capsys given."""
    code = cli_main([str(a) for a in argv])
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- task heads (model.task classification / regression) ----------------------------------

WORDS = {"yes": ["import", "class", "return"], "no": ["while", "lambda", "yield"]}
FILLER = ["x", "self", "name", "value", "data", "line", "path", "item"]


def toy_rows(n, seed=0, regression=False):
    """Separable: the label says which word group the text's words come from."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["no", "yes"][i % 2]
        words = [rng.choice(WORDS[label]) if j % 2 == 0 else rng.choice(FILLER)
                 for j in range(rng.randint(3, 7))]
        rows.append({"text": " ".join(words),
                     "label": (3.0 if label == "yes" else -1.0) if regression else label})
    return rows


def head_recipe(model, tmp_path, *extra, task="classification", n=48):
    """An fp32 task-head recipe on `model` with toy train/eval files in `tmp_path`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    reg = task == "regression"
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(n, 0, reg))
    ev = write_jsonl(tmp_path / "eval.jsonl", toy_rows(16, 1, reg))
    return load_recipe(None, [f"model.name={model}", "model.dtype=fp32", f"model.task={task}",
                              f"data.train={data}", f"data.eval={ev}", "data.format=label",
                              "data.max_seq_len=32", "train.batch_size=8", "train.lr=1e-2",
                              "train.steps=30", "train.schedule=constant",
                              f"output.dir={tmp_path / 'out'}", "lora.r=4", *extra])


@pytest.fixture(scope="session")
def classifier(tiny_gpt2, tmp_path_factory):
    """A classification adapter trained on the toy task, and its recipe."""
    tmp = tmp_path_factory.mktemp("cls")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_HOME", str(tmp / "home"))
        # lr 3e-3: at the recipe's 1e-2 the toy task is learnt by heart but generalises to
        # only 14 of 16 eval rows with transformers 5.25 (loss spikes); 3e-3 learns it cleanly.
        cfg = head_recipe(tiny_gpt2, tmp, "train.lr=3e-3")
        return train(cfg), cfg


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_gpt2):
    """A trained-like adapter folder on tiny GPT-2 (trained_adapter), one per test module."""
    out = tmp_path_factory.mktemp("good") / "a"
    trained_adapter(tiny_gpt2, out)
    return out


@pytest.fixture(scope="module")
def base(tiny_gpt2):
    """(model, tokenizer): tiny GPT-2 in fp32, one per test module."""
    return load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
