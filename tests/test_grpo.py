"""GRPO: the loss against TRL's GRPOTrainer, the rewards, and real runs on a tiny model."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import qa_csv, recipe, write_jsonl
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from adapters.config import GrpoConfig, dump_recipe
from adapters.errors import ConfigError, DataError, TrainingError
from adapters.training import grpo_loss, rewards, train
from adapters.training.trainer import setup

# ---- the loss: identical tensors into TRL's _compute_loss and ours ------------------------


def _trl_loss(g: GrpoConfig, lp, old, ref, adv, mask):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs (its model call replaced)."""
    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, sync_gradients=True,
                          reduce=lambda x, reduction="sum": x)
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=g.beta, args=args, loss_type=g.loss_type, epsilon_low=g.epsilon,
        epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=g.max_completion_length,
        accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": __import__("collections").defaultdict(list)})
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long),
              "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta,iterations", [(0.0, 1), (0.04, 1), (0.1, 2)])
def test_loss_and_gradient_equal_trl(loss_type, beta, iterations):
    torch.manual_seed(0)
    B, T = 6, 9
    g = GrpoConfig(loss_type=loss_type, beta=beta, num_iterations=iterations,
                   max_completion_length=T, epsilon=0.2, epsilon_high=0.28)
    lengths = torch.tensor([9, 3, 7, 1, 5, 9])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    base = (torch.randn(B, T) - 2.0).double().float()
    old = base + 0.3 * torch.randn(B, T) if iterations > 1 else None  # ratios beyond the clip
    ref = base + 0.5 * torch.randn(B, T) if beta else None
    adv = torch.randn(B)
    lp_trl = base.clone().requires_grad_(True)
    want = _trl_loss(g, lp_trl, old, ref, adv, mask)
    want.backward()
    # ours: the same tokens, flat (N,), with the completion each belongs to
    keep = mask.bool()
    lp = base.clone().requires_grad_(True)
    seq = torch.arange(B)[:, None].expand(B, T)[keep]
    flat = lp[keep]
    terms = grpo_loss.token_terms(g, flat, old[keep] if old is not None else flat.detach(),
                                  ref[keep] if ref is not None else None, adv[seq])
    got = grpo_loss.reduce(g, terms["loss"], seq, B, B, int(keep.sum()))
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    torch.testing.assert_close(lp.grad, lp_trl.grad, atol=1e-6, rtol=0)
    if iterations > 1:  # the clip is exercised, not only the ratio-1 case
        assert 0 < int(terms["clipped"].sum()) < len(flat)


def test_accumulation_equals_one_micro_batch():
    """Two micro-batches normalised by the step's totals give the one-batch loss."""
    torch.manual_seed(1)
    g = GrpoConfig(loss_type="grpo", beta=0.05)
    lp, ref, adv = torch.randn(12) - 2, torch.randn(12) - 2, torch.randn(4)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    whole = grpo_loss.reduce(g, grpo_loss.token_terms(g, lp, lp, ref, adv[seq])["loss"], seq, 4,
                             4, 12)
    parts = 0.0
    for rows, toks in ((slice(0, 2), slice(0, 5)), (slice(2, 4), slice(5, 12))):
        s = seq[toks] - seq[toks].min()
        t = grpo_loss.token_terms(g, lp[toks], lp[toks], ref[toks], adv[rows][s])
        parts = parts + grpo_loss.reduce(g, t["loss"], s, 2, 4, 12)
    assert float(parts) == pytest.approx(float(whole), abs=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_as_trl_computes_them(scale):
    torch.manual_seed(2)
    values, w, G = torch.rand(12, 2), torch.tensor([1.0, 0.5]), 4
    adv, total = grpo_loss.advantages(values, w, G, scale)
    rewards_ = (values * w).nansum(1)  # TRL: sum_then_normalize
    mean = torch.nanmean(rewards_.view(-1, G), 1).repeat_interleave(G)
    std = nanstd(rewards_.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch" \
        else nanstd(rewards_).expand_as(rewards_)
    want = rewards_ - mean if scale == "none" else (rewards_ - mean) / (std + 1e-4)
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(total, rewards_)


# ---- rewards ------------------------------------------------------------------------------


def _score(names, completions, columns=None, **g):
    cfg = GrpoConfig(rewards=names, **g)
    ids = [[1] * (i + 1) for i in range(len(completions))]
    cols = columns or {"completion": ["the answer is 7"] * len(completions)}
    return rewards.score(rewards.resolve(cfg), ["p"] * len(completions), completions, ids, cols,
                         [f"d.csv:{i + 2}" for i in range(len(completions))])


def test_builtin_rewards(tmp_path):
    marker = tmp_path / "ran"
    got = _score(["exact_match", "token_f1", "python_parses", "json_schema", "length_penalty"],
                 ["The answer is 7.", "answer: 7", f"```python\nopen({str(marker)!r}, 'w')\n```",
                  '```json\n{"n": 3}\n```', "def f(:"],
                 json_schema={"type": "object", "required": ["n"],
                              "properties": {"n": {"type": "integer"}}},
                 max_completion_length=10)
    assert [round(r[0], 3) for r in got] == [1.0, 0.0, 0.0, 0.0, 0.0]  # exact_match
    assert got[1][1] == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))  # token F1
    assert [r[2] for r in got] == [0.0, 1.0, 1.0, 1.0, 0.0]  # "answer: 7" is an annotation
    assert not marker.exists()  # parsed, never run
    assert [r[3] for r in got] == [0.0, 0.0, 0.0, 1.0, 0.0]  # json_schema
    assert [r[4] for r in got] == [-0.1, -0.2, -0.3, -0.4, -0.5]  # length_penalty
    bad_type = _score(["json_schema"], ['{"n": "x"}'],
                      json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    assert bad_type == [[0.0]]


def test_user_reward_trl_signature_and_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def has_seven(prompts, completions, completion_ids, **columns):\n"
        "    assert columns['topic'] == ['a', 'b']\n"
        "    return [float('7' in c) for c in completions]\n"
        "def boom(prompts, completions, **kw):\n    raise ValueError('no luck')\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cols = {"completion": ["7", "7"], "topic": ["a", "b"]}
    g = GrpoConfig(rewards=["my_rewards:has_seven", "exact_match"], reward_weights=[2.0, 1.0])
    resolved = rewards.resolve(g)
    assert [r.weight for r in resolved] == [2.0, 1.0]
    got = rewards.score(resolved, ["p", "p"], ["7", "8"], [[1], [2]], cols, ["d:2", "d:3"])
    assert got == [[1.0, 1.0], [0.0, 0.0]]
    adv, total = grpo_loss.advantages(torch.tensor(got), torch.tensor([2.0, 1.0]), 2, "none")
    assert total.tolist() == [3.0, 0.0]
    with pytest.raises(TrainingError, match=r"reward 'my_rewards:boom' failed on the "
                                            r"completion of d.csv:2: ValueError: no luck"):
        _score(["my_rewards:boom"], ["x", "y"])
    with pytest.raises(TrainingError, match=r"'my_rewards:nan' returned nan .* d.csv:2"):
        _score(["my_rewards:nan"], ["x", "y"])
    with pytest.raises(TrainingError, match="returned 1 values for 2 completions"):
        _score(["my_rewards:short"], ["x", "y"])


@pytest.mark.parametrize("g,match", [
    ({}, "grpo.rewards: name at least one"),
    ({"rewards": ["toekn_f1"]}, "neither a built-in"),
    ({"rewards": ["no_such_module_x:f"]}, "cannot load 'no_such_module_x:f'"),
    ({"rewards": ["token_f1"], "reward_weights": [1.0, 2.0]}, "2 weight"),
    ({"rewards": ["json_schema"], "json_schema": {"type": "nonsense"}}, "grpo.json_schema"),
])
def test_bad_reward_settings_fail_before_a_model_loads(g, match):
    with pytest.raises(ConfigError, match=match):
        rewards.resolve(GrpoConfig(**g))


# ---- real runs on a tiny model -------------------------------------------------------------

SEVENS = "def sevens(prompts, completions, **kw):\n" \
         "    return [c.count('7') / max(len(c), 1) for c in completions]\n" \
         "def digits(prompts, completions, **kw):\n" \
         "    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]\n"


@pytest.fixture
def sevens(tmp_path, monkeypatch):
    (tmp_path / "seven_reward.py").write_text(SEVENS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "seven_reward:sevens"  # and seven_reward:digits


def _grpo(model, tmp_path, reward, *extra, rows=24):
    return recipe(model, tmp_path, "train.objective=grpo", f"grpo.rewards=[{reward}]",
                  "grpo.max_completion_length=12", "grpo.num_generations=8",
                  "grpo.temperature=2.0", "train.lr=5e-2", *extra, rows=rows)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_on_a_learnable_reward(tiny_gpt2, tmp_path, sevens):
    """'Answer with the digit 7': the share of 7s in the completions grows from ~0."""
    out = train(_grpo(tiny_gpt2, tmp_path, sevens, "train.steps=30"))
    rows = [m for m in _metrics(out) if "reward" in m]
    first = sum(m["reward"] for m in rows[:5]) / 5
    last = sum(m["reward"] for m in rows[-5:]) / 5
    assert len(rows) == 30 and last > first + 0.05, (first, last)
    m = rows[0]
    for key in ("reward_std", "reward_sevens", "reward_sevens_std", "completion_length",
                "clip_ratio", "rollout_seconds", "truncated_ratio"):
        assert key in m
    assert 0 < m["rollout_seconds"] < m["seconds"]
    assert (out / "adapter_model.safetensors").is_file()


def test_kl_iterations_and_exact_resume(tiny_gpt2, tmp_path, sevens):
    """beta > 0 and two steps per rollout: a run paused between the two steps of a generation
    and resumed ends with the adapter of a straight run (fp32)."""
    extra = ["train.steps=4", "grpo.beta=0.1", "grpo.num_iterations=2", "train.save_every=1"]
    digits = sevens.replace("sevens", "digits")  # a denser reward: some learning at once
    straight = train(_grpo(tiny_gpt2, tmp_path / "a", digits, *extra))
    cfg = _grpo(tiny_gpt2, tmp_path / "b", digits, *extra)
    train(cfg, stop_after=1)  # mid-generation: its rollouts are in the checkpoint
    state = json.loads((tmp_path / "b/out/checkpoints/step-000001/state.json").read_text())
    assert state["objective"]["generation"] == 0
    resumed = train(cfg, resume="latest")
    wa = load_file(straight / "adapter_model.safetensors")
    wb = load_file(resumed / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    rows = [m for m in _metrics(straight) if "reward" in m]
    assert rows[0]["rollout_seconds"] > 0 and rows[1]["rollout_seconds"] == 0  # reused
    assert rows[0]["reward"] == rows[1]["reward"]  # the same completions twice
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0  # off the base once it learned
    assert [m["loss"] for m in _metrics(resumed) if "reward" in m] == pytest.approx(
        [m["loss"] for m in rows], abs=1e-6)


def test_4bit_base_with_eval_and_init_from_sft(tiny_llama, tmp_path):
    """A real 4-bit base, starting from an SFT adapter, evaluated on held-out prompts."""
    sft = train(recipe(tiny_llama, tmp_path / "sft", "train.steps=2"))
    data = qa_csv(tmp_path / "eval.csv", 6)
    cfg = recipe(tiny_llama, tmp_path, "train.objective=grpo", "grpo.rewards=[token_f1]",
                 "grpo.max_completion_length=8", "grpo.num_generations=2", "train.steps=2",
                 "model.quantization=4bit", f"data.eval={data}", "train.eval_every=1",
                 f"lora.init_from={sft}")
    out = train(cfg)
    evals = [m for m in _metrics(out) if "eval_reward" in m]
    assert evals and all(0 <= m["eval_reward_token_f1"] <= 1 for m in evals)
    man = json.loads((out / "manifest.json").read_text())
    assert man["quantization"]["quantization"] == "4bit"
    assert man["lora"]["init_from"] == str(sft)
    run = setup(cfg)  # the LoRA starts as the SFT adapter's
    start = get_peft_model_state_dict(run.model)
    want = load_file(sft / "adapter_model.safetensors")
    assert start.keys() == want.keys()
    for k in want:
        assert torch.equal(start[k].float(), want[k].float()), k
    with pytest.raises(Exception, match=r"lora.init_from: .*r is 4 there, 8 in the recipe"):
        train(recipe(tiny_llama, tmp_path / "bad", "train.objective=grpo", "lora.r=8",
                     "grpo.rewards=[token_f1]", f"lora.init_from={sft}", "train.steps=1"))


def test_prompts_from_chat_and_prompt_only_rows(tiny_gpt2, tmp_path, sevens):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(8)])
    out = train(_grpo(tiny_gpt2, tmp_path / "c", sevens, f"data.train={chat}",
                      "data.format=chat", "train.steps=1"))
    assert [m for m in _metrics(out) if "reward" in m]
    plain = tmp_path / "p.csv"
    plain.write_text("question\n" + "".join(f"q{i}\n" for i in range(8)))
    out = train(_grpo(tiny_gpt2, tmp_path / "p", sevens, f"data.train={plain}",
                      "data.columns={prompt: question}", "train.steps=1"))
    assert [m for m in _metrics(out) if "reward" in m]
    with pytest.raises(DataError, match=r"rows have no prompt"):
        train(_grpo(tiny_gpt2, tmp_path / "t", sevens, f"data.train={plain}",
                    "data.format=text", "data.columns={text: question}", "train.steps=1"))
    with pytest.raises(DataError, match=r"takes its prompt from column 'input'.*question"):
        train(_grpo(tiny_gpt2, tmp_path / "q", sevens, f"data.train={plain}", "train.steps=1"))


def test_a_failing_reward_names_itself_and_the_row(tiny_gpt2, tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text(
        "def r(prompts, completions, **kw):\n    return ['high'] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TrainingError, match=r"reward 'bad_reward:r' returned 'high' for the "
                                            r"completion of .*qa.csv:\d+"):
        train(_grpo(tiny_gpt2, tmp_path, "bad_reward:r", "train.steps=1"))


def test_two_ranks_equal_one_rank_with_twice_the_batch(tiny_gpt2, tmp_path, sevens):
    """Under torchrun each rank samples its share of the prompts (seeded by their place in the
    global batch) and the step divides by the global counts: one rank with twice the batch
    takes the same steps, also when the two ranks are paused between the two steps of a
    generation and resumed (each rank's rollouts are in the checkpoint)."""
    extra = ["train.steps=3", "grpo.beta=0.05", "grpo.num_generations=4",
             "grpo.num_iterations=2", "train.save_every=1"]
    digits = sevens.replace("sevens", "digits")
    one = train(_grpo(tiny_gpt2, tmp_path / "one", digits, *extra, "train.batch_size=2"))
    cfg = _grpo(tiny_gpt2, tmp_path / "two", digits, *extra, "train.batch_size=1")
    path = tmp_path / "two" / "recipe.yaml"
    path.write_text(dump_recipe(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for resume in ([], ["--resume"]):  # paused mid-generation: each rank's rollouts kept
        r = subprocess.run([sys.executable, "-m", "adapters", "train", str(path), "--nproc", "2",
                            *(resume or ["--stop-after", "1"])], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two" / "out"
    ones, twos = ([m for m in _metrics(x) if "reward" in m] for x in (one, two))
    assert [m["reward"] for m in ones] == pytest.approx([m["reward"] for m in twos], abs=1e-6)
    assert [m["loss"] for m in ones] == pytest.approx([m["loss"] for m in twos], abs=1e-5)
    wa, wb = load_file(one / "adapter_model.safetensors"), load_file(
        two / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)


def test_grpo_refuses_fsdp_and_a_task_head(tiny_gpt2, tmp_path, sevens):
    with pytest.raises(ConfigError, match="grpo runs with train.parallel: ddp, not fsdp"):
        setup(_grpo(tiny_gpt2, tmp_path / "f", sevens, "train.parallel=fsdp"))
    with pytest.raises(ConfigError, match="grpo trains a causal LM"):
        setup(_grpo(tiny_gpt2, tmp_path / "h", sevens, "model.task=classification"))


def test_4bit_base_reference_pass_keeps_the_policy_exact(tiny_llama, tmp_path, sevens):
    """On CPU bitsandbytes repacks 4-bit weights on the first no-grad forward (the adapter-off
    reference pass); the fused LoRA op reads the packed weights, so a run must keep them
    unpacked: at step 1 (B = 0) the policy is the base, KL 0."""
    out = train(_grpo(tiny_llama, tmp_path, sevens, "train.steps=2", "grpo.beta=0.1",
                      "model.quantization=4bit"))
    first = [m for m in _metrics(out) if "kl" in m][0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6), first
