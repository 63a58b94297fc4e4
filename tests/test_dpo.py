"""Preference training (DPO sigmoid/IPO, ORPO): losses against TRL's (DPO's equal; ORPO's odds
ratio equal, its NLL over the chosen completion where TRL's also counts the prompt), training,
resume, eval."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import recipe, run_cli, write_jsonl
from datasets import Dataset
from safetensors.torch import load_file

import adapters.eval.preference as preference
import adapters.training.objectives as objectives
from adapters.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    dump_recipe,
    load_recipe,
)
from adapters.data import build
from adapters.data.packing import Batcher
from adapters.data.preview import preview
from adapters.errors import TrainingError
from adapters.kernels.logprobs import reference_token_logprobs, token_logprobs
from adapters.lora import attach_lora
from adapters.model import load_base
from adapters.training import reference, train
from adapters.training.trainer import setup, step

PROMPT = "What is {i} plus {i}?"


def pairs(n=8):
    return [{"prompt": PROMPT.format(i=i), "chosen": f"{2 * i}.",
             "rejected": f"{2 * i + 1}, surely not {i}."} for i in range(n)]


def pref_recipe(model, tmp_path, *extra, n=8):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pref.jsonl", pairs(n))
    return load_recipe(None, [f"model.name={model}", "model.dtype=fp32", f"data.train={data}",
                              "data.format=preference", "data.max_seq_len=64",
                              "train.batch_size=2", "train.lr=5e-3", "train.objective=dpo",
                              f"output.dir={tmp_path / 'out'}", "lora.r=4", *extra])


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


# ---- the kernel ------------------------------------------------------------------------------


def test_chunked_token_logprobs_equal_full_logits_with_gradients():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    g = torch.randn(37, dtype=torch.float64)  # an arbitrary incoming gradient per row
    ours = token_logprobs(h, w, y, b, chunk=8)  # 5 chunks, the last one short
    ref = reference_token_logprobs(h, w, y, b)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad((ours * g).sum(), (h, w, b))
    want = torch.autograd.grad((ref * g).sum(), (h, w, b))
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


# ---- against TRL -----------------------------------------------------------------------------


def _policy(model):
    """The tiny model with a random non-zero LoRA (so policy and reference differ)."""
    base, tok = load_base(ModelConfig(name=str(model), dtype="fp32"))
    pm = attach_lora(base, LoraConfig(r=4))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm, tok


def _trl_rows(n=4):
    # TRL's prompt is used as given; ours goes through the default "{prompt}\n" template.
    return [{"prompt": r["prompt"] + "\n", "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in pairs(n)]


def _from_trl(batch):
    """TRL's [chosen..., rejected...] padded batch in our form (labels, seq: 2k / 2k + 1)."""
    p = batch["input_ids"].shape[0] // 2
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    seq = torch.cat([torch.arange(p) * 2, torch.arange(p) * 2 + 1])[:, None].repeat(
        1, labels.shape[1])
    seq[batch["attention_mask"] == 0] = -1
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": labels, "seq": seq}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trl_dpo_trainer(tiny_gpt2, tmp_path, loss_type):
    trl = pytest.importorskip("trl")
    pm, tok = _policy(tiny_gpt2)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[loss_type],
                         per_device_train_batch_size=4, report_to=[], use_cpu=True,
                         max_length=64)
    trainer = trl.DPOTrainer(model=pm, args=args, train_dataset=Dataset.from_list(_trl_rows()),
                             processing_class=tok)
    if "ref" in pm.peft_config:  # TRL copies a given adapter as its reference: ours is the base
        pm.delete_adapter("ref")
    batch = next(iter(trainer.get_train_dataloader()))
    want = trainer.compute_loss(pm, batch)  # TRL's DPOTrainer._compute_loss, adapter off = ref
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    t = TrainConfig(objective="dpo", dpo_beta=0.2, dpo_loss=loss_type)

    mine = _from_trl(batch)
    sums = {}
    counts = objectives.step_counts(t, [mine])
    got = objectives.preference_loss(pm, mine, t, counts, sums)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    ours = objectives.step_metrics(sums, counts)
    for k_trl, k_ours in [("rewards/chosen", "rewards_chosen"),
                          ("rewards/rejected", "rewards_rejected"),
                          ("rewards/margins", "reward_margin"), ("logps/chosen", "logps_chosen"),
                          ("logps/rejected", "logps_rejected")]:
        # Summed log-probs reach ~80 in size: fp32 rounding alone moves them by ~1e-5.
        assert ours[k_ours] == pytest.approx(trl_metrics[k_trl], rel=1e-6, abs=1e-5), k_ours

    # Our own pipeline on the same rows builds the same token ids, and packed or padded
    # batches give the same loss.
    data = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    ds = build(DataConfig(train=str(data), format="preference", max_seq_len=64), tok).train
    trl_ids = [batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
               for i in range(8)]  # TRL's sampler shuffles: compare as sets
    assert sorted(trl_ids) == sorted(ds.dataset["input_ids"])
    for packing in (True, False):
        b = next(Batcher(ds.dataset, 4, 64, packing, tok.pad_token_id).iter_all())
        got = objectives.preference_loss(pm, b, t, objectives.step_counts(t, [b]), {})
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


def _lora_grads(pm, loss):
    pm.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


def test_orpo_loss_equals_trl_with_the_nll_over_the_chosen_completion(tiny_gpt2, tmp_path):
    """The full ORPO loss and its gradients against TRL's ORPOTrainer, on TRL's tokens.

    The odds-ratio terms are equal. The NLL terms differ by definition: TRL's averages the
    chosen sequence's prompt and completion tokens (its "nll_loss"), ours (as the ORPO paper's
    L_SFT) the chosen completion tokens only, the tokens the odds ratio scores. So: ours equals
    TRL's own functions with the NLL over the completion, TRL's loss equals ours with the NLL
    over prompt + completion, and the two full losses are not equal.
    """
    orpo = pytest.importorskip("trl.experimental.orpo")
    pm, tok = _policy(tiny_gpt2)
    args = orpo.ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.25,
                           per_device_train_batch_size=4, report_to=[], use_cpu=True,
                           max_length=64)
    trainer = orpo.ORPOTrainer(model=pm, args=args,
                               train_dataset=Dataset.from_list(_trl_rows()),
                               processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    # TRL's prompt handling: BOS + prompt + answer + EOS, labels -100 on BOS and prompt.
    assert batch["chosen_input_ids"][0, 0] == tok.bos_token_id
    want, trl_m = trainer.get_batch_loss_metrics(pm, batch)  # nll - beta * log sigmoid(odds)
    want = want.detach()

    # Ours, the training path (preference_loss: odds-ratio term + NLL), on TRL's tokens:
    # chosen (rows 0..3) and rejected (4..7) in TRL's concatenated, padded form.
    cat = trainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
    ids, att = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    labels = cat["concatenated_labels"]
    seq = torch.cat([torch.arange(4) * 2, torch.arange(4) * 2 + 1])[:, None].repeat(
        1, ids.shape[1])
    seq[att == 0] = -1
    mine = {"input_ids": ids, "attention_mask": att, "labels": labels, "seq": seq}
    t = TrainConfig(objective="orpo", orpo_lambda=0.25)
    sums = {}
    counts = objectives.step_counts(t, [mine])
    got = objectives.preference_loss(pm, mine, t, counts, sums)
    got_grads = _lora_grads(pm, got)
    got = got.detach()

    # TRL's own functions with the NLL over the chosen completion tokens.
    logits = pm(ids, attention_mask=att, use_cache=False).logits  # (8, T, V)
    avg = trainer.get_batch_logps(logits, labels, average_log_prob=True)  # (8,)
    odds, *_ = trainer.odds_ratio_loss(avg[:4], avg[4:])  # beta * log sigmoid(log odds)
    completion_tokens = int((labels[:4, 1:] != -100).sum())
    completion_nll = -trainer.get_batch_logps(logits[:4], labels[:4]).sum() / completion_tokens
    trl_completion = completion_nll - odds.mean()
    torch.testing.assert_close(got, trl_completion.detach(), rtol=0, atol=1e-5)
    for n, g in _lora_grads(pm, trl_completion).items():
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(got_grads[n], g, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
    assert len(got_grads) == 2 * 4 * 2  # A and B of 4 projections in 2 layers, all reached

    # TRL's loss is ours with its NLL definition: prompt and completion tokens as labels.
    full = {**mine, "labels": ids.masked_fill(att == 0, -100)}  # as TRL's NLL labels them
    with torch.no_grad():
        lp, n = objectives.sequence_logprobs(pm, full)
        odds_ours, m = objectives.pair_losses(t, *objectives.sequence_logprobs(pm, mine), None)
    trl_nll = -lp[0::2].sum() / n[0::2].sum()
    assert float(trl_nll) == pytest.approx(trl_m["nll_loss"], abs=1e-5)
    torch.testing.assert_close(want, trl_nll + odds_ours.mean(), rtol=0, atol=1e-5)
    # The full losses differ by the prompt tokens' share of TRL's NLL, far above rounding.
    assert abs(float(want - got)) > 0.1
    for ours, theirs in (("rewards_chosen", "rewards/chosen"),
                         ("rewards_rejected", "rewards/rejected")):
        assert float(m[ours].mean()) == pytest.approx(trl_m[theirs], abs=1e-5), ours
    assert sums["nll"] == pytest.approx(float(completion_nll), abs=1e-5)


# ---- training --------------------------------------------------------------------------------


def _margin(run, batch):
    with torch.no_grad():
        lp = objectives.sequence_logprobs(run.model, batch)[0]
        ref = objectives.reference_logprobs(run.model, batch)
    gain = lp - ref
    return float((gain[0::2] - gain[1::2]).mean())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_one_dpo_step_raises_the_chosen_minus_rejected_margin(tiny_model, tmp_path, loss):
    run = setup(pref_recipe(tiny_model, tmp_path, "train.steps=1", f"train.dpo_loss={loss}"))
    batch = run.batcher.batch(0, 0)
    assert _margin(run, batch) == 0.0  # a fresh adapter is the reference
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    m = step(run)
    assert _margin(run, batch) > 0
    # B starts at zero, so only B moves in a first step (A's gradient is proportional to B)
    assert all(not torch.equal(p, before[n]) for n, p in run.model.named_parameters()
               if "lora_B" in n)
    assert m["pairs"] == 2 and m["finite"]
    # the reference (adapter switched off, whatever fast LoRA path training uses) is the base
    plain, _ = load_base(ModelConfig(name=str(tiny_model), dtype="fp32"))
    with torch.no_grad():
        torch.testing.assert_close(objectives.reference_logprobs(run.model, batch),
                                   objectives.sequence_logprobs(plain, batch)[0],
                                   rtol=1e-5, atol=1e-5)


def test_dpo_and_orpo_runs_log_rewards_and_learn_the_pairs(tiny_llama, tmp_path):
    for obj in ("dpo", "orpo"):
        out = train(pref_recipe(tiny_llama, tmp_path / obj, "train.steps=12",
                                f"train.objective={obj}", "data.eval_fraction=0.25"))
        rows = metrics(out)
        assert len(rows) == 12
        keys = {"rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
                "logps_chosen", "logps_rejected", "pairs"}
        assert keys <= set(rows[0]), rows[0]
        if obj == "dpo":
            assert {"ref_logps_chosen", "ref_logps_rejected"} <= set(rows[0])
            assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # log 2 at the start
        else:
            assert "nll" in rows[0]
        assert sum(r["reward_margin"] for r in rows[-3:]) > sum(
            r["reward_margin"] for r in rows[:3]), obj
        assert rows[-1]["loss"] < rows[0]["loss"]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["training"]["final_eval_loss"] is not None
        assert (out / "adapter_model.safetensors").is_file()


def _rows_equal(a, b, keys, tol):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            assert (ra.get(k) is None) == (rb.get(k) is None), (ra["step"], k)
            if ra.get(k) is not None:
                assert ra[k] == pytest.approx(rb[k], rel=tol, abs=tol), (ra["step"], k)


def _same_adapter(a, b, tol):
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=tol, msg=k)


PAIR_KEYS = ("loss", "eval_loss", "reward_margin", "reward_accuracy", "logps_chosen",
             "logps_rejected", "ref_logps_chosen", "ref_logps_rejected")


def test_cached_reference_equals_in_step_with_one_forward_per_step(tiny_llama, tmp_path,
                                                                    monkeypatch):
    calls = []  # sequences through the reference forward, per call
    real = objectives.reference_logprobs
    monkeypatch.setattr(objectives, "reference_logprobs",
                        lambda model, batch: calls.append(int(batch["seq"].max()) + 1)
                        or real(model, batch))
    common = ["train.steps=4", "train.grad_accum=2", "data.eval_fraction=0.25",
              "train.eval_every=2"]
    outs, seqs = {}, {}
    for mode in ("in_step", "cached"):
        calls.clear()
        outs[mode] = train(pref_recipe(tiny_llama, tmp_path / mode, *common,
                                       f"train.dpo_reference={mode}", n=12))
        seqs[mode] = sum(calls)
    # 12 pairs: 9 train, 3 eval. Evaluations (step 2, the end) never recompute: the eval
    # split's 6 sequences go through the base once per run in both modes; in_step then runs
    # a reference forward in every micro-batch (4 steps x 2 x 2 pairs x 2 sides), cached
    # computes the train split's 18 sequences once before the first step.
    assert seqs == {"in_step": 6 + 32, "cached": 6 + 18}
    a, b = metrics(outs["in_step"]), metrics(outs["cached"])
    assert len(a) == 4 and a[0]["loss"] != a[-1]["loss"]
    assert [r.get("eval_loss") is not None for r in a] == [False, True, False, False]
    _rows_equal(a, b, PAIR_KEYS, 1e-5)
    _same_adapter(outs["in_step"], outs["cached"], 1e-5)
    ends = [json.loads((outs[m] / "manifest.json").read_text())["training"]["final_eval_loss"]
            for m in ("in_step", "cached")]
    assert ends[0] == pytest.approx(ends[1], abs=1e-5)
    # the log-probs kept next to the run, by example index: train's only when cached
    kept = {m: load_file(outs[m] / reference.FILE) for m in outs}
    assert {k: tuple(v.shape) for k, v in kept["cached"].items()} == {"train": (18,),
                                                                      "eval": (6,)}
    assert set(kept["in_step"]) == {"eval"}
    torch.testing.assert_close(kept["in_step"]["eval"], kept["cached"]["eval"])


@pytest.mark.parametrize("mode", ["cached", "in_step"])
def test_dpo_resume_equals_uninterrupted(tiny_llama, tmp_path, monkeypatch, mode):
    common = ["train.steps=6", "train.save_every=2", "lora.dropout=0.1",
              "data.eval_fraction=0.25", "train.eval_every=3", f"train.dpo_reference={mode}"]
    full = train(pref_recipe(tiny_llama, tmp_path / "a", *common))
    cfg = pref_recipe(tiny_llama, tmp_path / "b", *common)
    train(cfg, stop_after=3)
    kept = (tmp_path / "b" / "out" / reference.FILE).read_bytes()
    computed = []
    real = reference.split_logprobs
    monkeypatch.setattr(reference, "split_logprobs",
                        lambda *a, **k: computed.append(1) or real(*a, **k))
    resumed = train(cfg, resume="latest")
    assert computed == []  # read back from the run's folder, never computed again
    assert (resumed / reference.FILE).read_bytes() == kept
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    _rows_equal(a, b, PAIR_KEYS, 1e-5)
    wa = load_file(full / "adapter_model.safetensors")
    wb = load_file(resumed / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def _train_cli(recipe_file, *args):
    # one thread per rank (two ranks share two cores); CPU and gloo even where a GPU is present
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "adapters", "train", str(recipe_file), *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("mode", ["cached", "in_step"])
def test_dpo_two_ranks_equal_one_rank_with_twice_the_batch(tiny_llama, tmp_path, mode):
    common = ["train.steps=4", "data.eval_fraction=0.25", "train.eval_every=2",
              f"train.dpo_reference={mode}"]
    one = train(pref_recipe(tiny_llama, tmp_path / "one", *common, "train.batch_size=4", n=16))
    rec = tmp_path / "two" / "recipe.yaml"
    rec.parent.mkdir()
    rec.write_text(dump_recipe(pref_recipe(tiny_llama, tmp_path / "two", *common,
                                           "train.batch_size=2", n=16)))
    r = _train_cli(rec, "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two" / "out"
    a, b = metrics(one), metrics(two)
    assert len(b) == 4 and b[0]["pairs"] == a[0]["pairs"] >= 4  # pairs of the global batch
    _rows_equal(a, b, (*PAIR_KEYS, "pairs"), 1e-4)
    _same_adapter(one, two, 1e-4)
    # each rank computed half of the pairs; every rank ends up with all of them
    for k, v in load_file(one / reference.FILE).items():
        torch.testing.assert_close(load_file(two / reference.FILE)[k], v, rtol=0, atol=1e-5)


def test_dpo_nan_guard_skips_a_bad_step(tiny_gpt2, tmp_path, monkeypatch, caplog):
    real = objectives.preference_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        part = real(*a, **k)
        return part * float("nan") if calls["n"] == 3 else part

    monkeypatch.setattr(objectives, "preference_loss", flaky)
    out = train(pref_recipe(tiny_gpt2, tmp_path, "train.steps=5"))
    rows = metrics(out)
    assert [r["finite"] for r in rows] == [True, True, False, True, True]
    assert json.loads((out / "manifest.json").read_text())["training"]["bad_steps"] == 1
    assert all(torch.isfinite(t).all()
               for t in load_file(out / "adapter_model.safetensors").values())


def test_preference_objective_needs_preference_data(tiny_gpt2, tmp_path):
    run = setup(recipe(tiny_gpt2, tmp_path, "train.objective=dpo", "train.steps=1"))
    with pytest.raises(TrainingError, match="data.format: preference"):
        step(run)


# ---- data ------------------------------------------------------------------------------------


def test_preference_format_pairs_chat_prompts_mapping_and_overlong(tiny_tok, tmp_path):
    rows = [{"q": [{"role": "user", "content": "Say hi"}], "good": "hi", "bad": "go away"},
            {"q": "short", "good": "ok", "bad": "x " * 200},  # rejected too long: pair dropped
            {"q": "p", "good": [{"role": "assistant", "content": "fine"}], "bad": "no"},
            {"q": "p", "good": "", "bad": "no"}]  # empty side: skipped
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(train=str(data), format="preference", max_seq_len=64, overlong="drop",
                     columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    ds = build(cfg, tiny_tok).train
    assert ds.dataset["pair"] == [0, 0, 2, 2]
    assert ds.stats["skipped"] == {"empty good": 1}  # the column, as the file names it
    first = tiny_tok.decode(ds.dataset[0]["input_ids"])
    assert "<|im_start|>user\nSay hi" in first and "<|im_start|>assistant\nhi" in first
    # labels on the answer only, identical prompts on both sides
    for i in (0, 2):
        c, r = ds.dataset[i], ds.dataset[i + 1]
        k = next(j for j, x in enumerate(c["labels"]) if x != -100)
        assert c["input_ids"][:k] == r["input_ids"][:k]
        assert all(x == -100 for x in r["labels"][:k])
    # one batch always holds both sides of its pairs, chosen first
    for packing in (True, False):
        b = Batcher(ds.dataset, 1, 64, packing, tiny_tok.eos_token_id).batch(0, 0)
        assert sorted(set(b["seq"].flatten().tolist()) - {-1}) == [0, 1]


def test_data_preview_shows_both_sides(tiny_gpt2, tmp_path):
    cfg = pref_recipe(tiny_gpt2, tmp_path)
    text = preview(cfg, n=2)
    assert text.count("(chosen, ") == 2 and text.count("(rejected, ") == 2
    assert "[[0.<|endoftext|>]]" in text and "[[1, surely not 0.<|endoftext|>]]" in text


def test_eval_reports_preference_accuracy_for_base_and_adapter(tiny_gpt2, tmp_path, capsys,
                                                              monkeypatch):
    out = train(pref_recipe(tiny_gpt2, tmp_path, "train.steps=15"))
    data = tmp_path / "pref.jsonl"
    calls = []
    counted = preference.sequence_logprobs
    monkeypatch.setattr(preference, "sequence_logprobs",
                        lambda *a, **k: calls.append(1) or counted(*a, **k))
    code, text, err = run_cli("eval", "--base", tiny_gpt2, "--adapter", f"dpo={out}",
                              "--adapter", f"again={out}", "--data", data, "--format",
                              "preference", "--out", tmp_path / "ev", capsys=capsys)
    assert code == 0, err
    # 8 pairs = one eval batch; the base's log-probs are computed in its own row and reused by
    # both adapter rows: 3 passes, not 1 + 2 x 2.
    assert len(calls) == 3
    rows = {r["model"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())}
    assert rows["base"]["reward_accuracy"] == 0.5  # the base gains nothing over itself
    assert rows["dpo"]["reward_accuracy"] == 1.0  # learnt all 8 training pairs
    assert {k: v for k, v in rows["again"].items() if k != "model"} == \
        {k: v for k, v in rows["dpo"].items() if k != "model"}
    assert 0 <= rows["base"]["preference_accuracy"] <= 1
    assert rows["dpo"]["preference_accuracy"] >= rows["base"]["preference_accuracy"]
    assert "| preference_accuracy" in text and "| reward_accuracy" in text
