"""Many adapters on one base in one pass (`jobs:`, `adapters sweep`): each job's adapter equals
the one a run of its own trains, with different ranks, data, objectives and learning rates in
the same stacked step; resume after kill -9; a failing job drops out; the pass's report."""

import csv
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import qa_csv, run_cli, write_jsonl
from parked import start_parked
from safetensors.torch import load_file
from test_dpo import pairs

from adapters.errors import ConfigError
from adapters.kernels.lora_rows import RowLoraFn
from adapters.recipe_jobs import load_jobs, sweep_jobs
from adapters.training import jobs as jobs_mod
from adapters.training import train
from adapters.training.jobs import train_jobs
from adapters.training.stack import stack_batches


def _data(tmp_path):
    a = qa_csv(tmp_path / "a.csv", 24)
    rows = list(csv.DictReader(open(a)))
    b = tmp_path / "b.csv"
    with open(b, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["input", "output"])
        w.writeheader()
        for r in rows[::-1]:
            w.writerow({"input": "Say: " + r["input"], "output": r["output"] + " Done."})
    return a, b


def _recipe(base, tmp_path, jobs, **top):
    a, b = _data(tmp_path)
    raw = {"model": {"name": str(base), "dtype": "fp32"},
           "data": {"train": str(a), "max_seq_len": 64},
           # every job in one forward (on CPU auto is one at a time): the stacked path
           "train": {"batch_size": 2, "lr": 5e-3, "steps": 4, "jobs_per_forward": 8},
           "lora": {"r": 4}, "output": {"dir": str(tmp_path / "pass")}}
    for section, body in top.items():
        raw.setdefault(section, {}).update(body)
    raw["jobs"] = [{k: (str(b) if v == "B" else v) for k, v in j.items()} for j in jobs]
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _alone(job, tmp_path):
    """The job trained by a run of its own, in a folder of its own."""
    cfg = dataclasses.replace(job.cfg, output=dataclasses.replace(
        job.cfg.output, dir=str(tmp_path / f"alone-{job.name}")))
    return train(cfg)


def _max_diff(a, b):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


MIXED = [{"name": "a"},
         {"name": "b", "lora": {"r": 8, "alpha": 8}, "data.train": "B", "train.lr": 1e-3,
          "train.grad_accum": 2},
         {"name": "c", "data": {"packing": False}, "train": {"seed": 3, "steps": 3,
                                                             "schedule": "constant"}}]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "peft-path"])
def test_each_job_equals_its_run_alone(tiny_model, tmp_path, fused):
    # the fused op stacks all three jobs in one forward; peft's path two, then one
    per = 3 if fused else 2
    js = load_jobs(_recipe(tiny_model, tmp_path, MIXED, train={
        "fused_lora": fused, "jobs_per_forward": per}))
    outs = train_jobs(js.jobs)
    assert outs == [tmp_path / "pass" / n for n in "abc"]
    for job, out in zip(js.jobs, outs):
        alone = _alone(job, tmp_path)
        assert _max_diff(out, alone) <= 1e-5, job.name
        assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
            (alone / "adapter_config.json").read_text())
        lora_b = load_file(out / "adapter_model.safetensors")
        assert any(float(v.abs().max()) > 0 for k, v in lora_b.items() if "lora_B" in k)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        # every step of a ran stacked with the others (c, 3 steps, sits out the 4th)
        steps = [r for r in rows if "loss" in r]
        assert [r["jobs_in_step"] for r in steps][:3] == [3, 3, 3]
        # step 1: micro-batch 0 of all three (1 or 2 forwards), then b's second one
        assert steps[0]["forwards_in_step"] == (2 if fused else 3)
        man = json.loads((out / "manifest.json").read_text())
        assert man["training"]["steps"] == job.cfg.train.steps
    # the three adapters differ: each kept its own rows
    assert _max_diff(outs[0], outs[2]) > 1e-4


def test_dpo_and_sft_jobs_in_one_pass_equal_their_runs_alone(tiny_gpt2, tmp_path):
    pref = write_jsonl(tmp_path / "pref.jsonl", pairs(8))
    js = load_jobs(_recipe(tiny_gpt2, tmp_path, [
        {"name": "sft"},
        {"name": "dpo", "data": {"train": str(pref), "format": "preference"},
         "train": {"objective": "dpo"}},
        {"name": "orpo", "data": {"train": str(pref), "format": "preference"},
         "train": {"objective": "orpo"}, "lora": {"r": 2}}]))
    outs = train_jobs(js.jobs)
    for job, out in zip(js.jobs, outs):
        assert _max_diff(out, _alone(job, tmp_path)) <= 1e-5, job.name
    rows = [json.loads(x) for x in (outs[1] / "metrics.jsonl").read_text().splitlines()]
    assert "reward_accuracy" in rows[0]  # the DPO job's own metrics


def test_targets_dora_and_dropout_differ_between_jobs(tiny_llama, tmp_path):
    """A job adapting q/v only (the other layers give its rows the base), a DoRA job (peft's
    own variant code on its rows): each equal to its run alone; a job with LoRA dropout trains
    beside them (its masks come from the pass's shared stream)."""
    js = load_jobs(_recipe(tiny_llama, tmp_path, [
        {"name": "qv", "lora": {"targets": ["q_proj", "v_proj"]}},  # other layers: base only
        {"name": "dora", "lora": {"use_dora": True, "r": 2}},
        {"name": "drop", "lora": {"dropout": 0.1}}], train={"steps": 3}))
    outs = train_jobs(js.jobs)
    for job, out in zip(js.jobs[:2], outs[:2]):
        assert _max_diff(out, _alone(job, tmp_path)) <= 1e-5, job.name
    qv = load_file(outs[0] / "adapter_model.safetensors")
    assert {k.split(".")[-3] for k in qv} == {"q_proj", "v_proj"}
    dora = load_file(outs[1] / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in dora)
    assert json.loads((outs[1] / "adapter_config.json").read_text())["use_dora"] is True
    assert (outs[2] / "adapter_model.safetensors").exists()


def test_a_4bit_base_trains_jobs_as_runs_alone(tiny_llama, tmp_path):
    js = load_jobs(_recipe(tiny_llama, tmp_path, MIXED[:2],
                           model={"quantization": "4bit"}, train={"steps": 3}))
    outs = train_jobs(js.jobs)
    for job, out in zip(js.jobs, outs):
        assert _max_diff(out, _alone(job, tmp_path)) <= 1e-5, job.name


def test_a_failing_job_drops_out_and_the_others_finish(tiny_gpt2, tmp_path, monkeypatch):
    js = load_jobs(_recipe(tiny_gpt2, tmp_path, [
        {"name": "good"}, {"name": "bad", "train": {"max_bad_steps": 1}}]))
    real = jobs_mod.objective_for

    def objective_for(cfg):  # the "bad" job's loss turns NaN from its second step
        o = real(cfg)
        if cfg.train.max_bad_steps == 1:
            calls, loss = [0], o.micro_loss

            def micro_loss(*a, **k):
                calls[0] += 1
                return loss(*a, **k) * (float("nan") if calls[0] > 1 else 1.0)
            o.micro_loss = micro_loss
        return o

    monkeypatch.setattr(jobs_mod, "objective_for", objective_for)
    good, bad = train_jobs(js.jobs)
    assert (good / "adapter_model.safetensors").exists()
    assert not (bad / "adapter_model.safetensors").exists()  # no final adapter: it failed
    assert not list(bad.glob("checkpoints/step-*"))  # save_every 0: no checkpoint to keep
    assert _max_diff(good, _alone(js.jobs[0], tmp_path)) <= 1e-5  # unharmed by the NaNs


def test_resume_after_kill_9_equals_straight(tiny_gpt2, tmp_path):
    path = _recipe(tiny_gpt2, tmp_path, MIXED[:2],
                   train={"steps": 5, "save_every": 1, "keep_checkpoints": 3})
    # parked inside the 4th checkpoint write: job a has written step 2, job b only step 1
    proc = start_parked("checkpoint-write", 4, path, tmp_path / "stderr.txt")
    proc.kill()
    proc.wait(timeout=60)
    newest = {n: sorted((tmp_path / "pass" / n / "checkpoints").glob("step-*"))[-1].name
              for n in "ab"}
    assert newest == {"a": "step-000002", "b": "step-000001"}
    res = subprocess.run([sys.executable, "-m", "adapters", "train", str(path), "--resume"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    js = load_jobs(path)
    for job in js.jobs:
        assert _max_diff(tmp_path / "pass" / job.name, _alone(job, tmp_path)) <= 1e-5
    report = (tmp_path / "pass" / "report.md").read_text()
    assert "| a |" in report and "| b |" in report


def test_sweep_trains_the_grid_and_compares_every_adapter_on_every_set(tiny_gpt2, tmp_path,
                                                                         capsys):
    a, _ = _data(tmp_path)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_gpt2), "dtype": "fp32"},
        "data": {"train": str(a), "max_seq_len": 64, "eval_fraction": 0.25},
        "train": {"batch_size": 2, "steps": 3}, "output": {"dir": str(tmp_path / "sw")}}))
    code, out, err = run_cli("sweep", r, "lora.r=2,4", "train.lr=1e-3,5e-3", capsys=capsys)
    assert code == 0, err
    names = ["r2-lr1e-3", "r2-lr5e-3", "r4-lr1e-3", "r4-lr5e-3"]
    for n in names:
        assert (tmp_path / "sw" / n / "adapter_model.safetensors").exists()
        assert f"{n}: {tmp_path / 'sw' / n}" in out
    got = json.loads((tmp_path / "sw" / names[3] / "adapter_config.json").read_text())
    assert got["r"] == 4
    report = (tmp_path / "sw" / "report.md").read_text()
    assert "| job | lora.r | train.lr |" in report  # the keys that vary, nothing else
    rows = json.loads((tmp_path / "sw" / "eval" / "results.json").read_text())
    assert {(x["model"], x["dataset"]) for x in rows} == {
        (m, d) for m in ["base", *names] for d in names}
    # the best loss of each eval set is marked, and it is the smallest in the row
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| {names[0]} |")
                and "**" in ln)
    vals = [float(c.strip(" *")) for c in line.split("|")[2:-1]]
    assert f"**{min(vals):.4f}**" in line
    assert (tmp_path / "sw" / "losses.png").stat().st_size > 5000
    assert (tmp_path / "sw" / "eval" / "eval.png").exists()


def test_what_jobs_must_share_is_checked_at_once(tiny_gpt2, tmp_path):
    path = _recipe(tiny_gpt2, tmp_path, [
        {"name": "ok"}, {"name": "x", "model": {"dtype": "bf16"}},
        {"name": "y", "data.max_seq_len": 32, "train": {"objective": "grpo"}},
        {"name": "ok"}, {"name": "bad name!"}, {"name": "eval"},
        {"name": "inner", "output": {"dir": str(tmp_path / "pass" / "ok" / "sub")}}])
    with pytest.raises(ConfigError) as e:
        load_jobs(path)
    msg = str(e.value)
    assert "jobs[1] (x): model: every job trains on the same base" in msg
    assert "jobs[2] (y): data.max_seq_len is 32 here but 64 for the recipe" in msg
    assert "jobs[2] (y): train.objective 'grpo'" in msg
    assert "jobs[3] (ok): the name 'ok' is taken" in msg
    assert "jobs[4] (bad name!): name must be letters" in msg
    assert "jobs[5] (eval): the name 'eval' is the pass's own" in msg
    assert "jobs[6] (inner): output.dir" in msg and "lies in jobs[0] (ok)'s folder" in msg
    with pytest.raises(ConfigError, match="no axis to sweep"):
        sweep_jobs(_plain(tmp_path), ["lora.r=4"])


def _plain(tmp_path):
    p = tmp_path / "plain.yaml"
    p.write_text("lora: {r: 4}\n")
    return p


def test_row_lora_gradients_equal_finite_differences():
    """RowLoraFn's hand-written backward against autograd's numerical check (float64): two
    groups of different ranks, a base-only group between them, a bias."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    ab = [torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
          torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
          torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(5, 3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda x, *ab: RowLoraFn.apply(x, base, ((0, 3), (5, 7)), (0.5, 2.0), *ab), (x, *ab))


def test_stacked_rows_keep_each_batch_as_it_was():
    """Packed and padded batches of different lengths stacked: ids, positions, masks."""
    packed = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "position_ids": torch.tensor(
        [[0, 1, 0, 1]]), "attention_mask": torch.tensor(
        [[[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]]], dtype=torch.bool)}
    padded = {"input_ids": torch.tensor([[9, 10], [11, 0]]),
              "attention_mask": torch.tensor([[1, 1], [1, 0]])}
    inputs, spans = stack_batches([packed, padded], pad_id=0)
    assert spans == [(0, 1), (1, 3)]
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0]]
    only_padded, _ = stack_batches([padded, padded], pad_id=0)
    assert "position_ids" not in only_padded  # as alone: the decoder counts them itself
    m = inputs["attention_mask"]
    assert m.shape == (3, 1, 4, 4)
    assert torch.equal(m[0], packed["attention_mask"][0])
    # row 2: token 0 real, token 1 its own padding (sees token 0), 2 and 3 added (alone)
    assert m[2, 0].int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_early_stop_finishes_a_run_and_drops_a_job_while_the_others_go_on(tiny_gpt2, tmp_path):
    """train.early_stop_patience: at a learning rate too small to move the eval loss by
    early_stop_min_delta, the run finishes after that many evaluations without improvement."""
    slow = {"lr": 1e-9, "eval_every": 1, "early_stop_patience": 2, "early_stop_min_delta": 1e-3}
    js = load_jobs(_recipe(tiny_gpt2, tmp_path, [
        {"name": "stuck", "train": slow}, {"name": "learns"}],
        data={"eval_fraction": 0.25}, train={"steps": 6}))
    stuck, learns = train_jobs(js.jobs)
    summary = json.loads((stuck / "manifest.json").read_text())["training"]
    # eval 1 sets the best; evals 2 and 3 do not beat it by 1e-3: finished at step 3
    assert summary["steps"] == 3 and summary["stopped_early_at"] == 3
    assert (stuck / "adapter_model.safetensors").exists()
    assert json.loads((learns / "manifest.json").read_text())["training"]["steps"] == 6
    assert _max_diff(learns, _alone(js.jobs[1], tmp_path)) <= 1e-5
    # a single run stops the same way
    alone = _alone(js.jobs[0], tmp_path)
    assert json.loads((alone / "manifest.json").read_text())["training"]["steps"] == 3
