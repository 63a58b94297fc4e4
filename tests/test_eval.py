"""Evaluation: metric functions by hand, perplexity by direct computation, adapters help."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import qa_csv, recipe

from adapters.config import BASE_NAME, DataConfig, ModelConfig
from adapters.eval import evaluate, exact_match, rouge_l, table, token_f1, write_results
from adapters.model import load_base


def test_text_metrics_by_hand():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # pred: [paris, is, capital] vs ref: [capital, is, paris, france]: 3 common
    assert token_f1("Paris is the capital", "capital is Paris, France") == pytest.approx(
        2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))
    # LCS of [a1 b c d] and [a1 c d e] (articles dropped, a1 kept) = [a1 c d] = 3
    assert rouge_l("a1 b c d", "a1 c d e") == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    assert token_f1("", "") == 1.0 and rouge_l("x", "") == 0.0
    from adapters.eval import bleu

    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert 0 < bleu("the cat sat on a mat", "the cat sat on the mat") < 100


def test_perplexity_matches_direct_computation(tiny_llama, tmp_path):
    f = qa_csv(tmp_path / "qa.csv", 6)
    rows = evaluate(str(tiny_llama), {}, {"qa": DataConfig(train=str(f), packing=False)})
    model, tok = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    import csv

    total, count = 0.0, 0
    with torch.no_grad():
        for r in csv.DictReader(open(f)):
            p = tok(r["input"] + "\n", add_special_tokens=False)["input_ids"]
            c = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + c])
            logits = model(ids.to(model.device)).logits[0, len(p) - 1:-1].float().cpu()
            total += float(F.cross_entropy(logits, torch.tensor(c), reduction="sum"))
            count += len(c)
    # bf16 autocast on this CPU (dtype auto) vs fp32 direct: close, not bitwise.
    assert rows[0]["loss"] == pytest.approx(total / count, rel=2e-2)
    assert rows[0]["perplexity"] == pytest.approx(math.exp(rows[0]["loss"]), rel=1e-6)
    assert rows[0]["tokens"] == count


def test_trained_adapter_scores_better_on_its_data(tiny_llama, tmp_path):
    from adapters.train import train

    out = train(recipe(tiny_llama, tmp_path, "train.steps=25", "train.lr=2e-2", rows=4))
    data = {"qa": DataConfig(train=str(tmp_path / "qa.csv"))}
    rows = evaluate(str(tiny_llama), {"qa-adapter": out}, data, generate=4, max_new_tokens=12)
    loss = {r["model"]: r["loss"] for r in rows}
    f1 = {r["model"]: r["token_f1"] for r in rows}
    assert f1["qa-adapter"] > f1[BASE_NAME]
    assert rows[1]["samples"][0]["reference"].startswith("0 plus")
    acc = {r["model"]: r["token_accuracy"] for r in rows}
    assert loss["qa-adapter"] < 0.7 * loss[BASE_NAME] and acc["qa-adapter"] > acc[BASE_NAME]
    write_results(rows, tmp_path / "eval")
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 0
    assert "qa-adapter" in table(rows) and "%" in table(rows)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "token_f1 (higher is better)" in report and "reference" in report


def test_cli_eval_writes_results(tiny_gpt2, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import trained_adapter

    trained_adapter(tiny_gpt2, tmp_path / "a")
    f = qa_csv(tmp_path / "qa.csv", 5)
    res = subprocess.run([sys.executable, "-m", "adapters", "eval", "--adapter",
                          f"mine={tmp_path / 'a'}", "--data", f"qa={f}", "--out",
                          str(tmp_path / "ev")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ADAPTERS_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stderr
    assert "| qa |" in res.stdout and "mine" in res.stdout
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {r["model"] for r in rows} == {"base", "mine"}
    assert (tmp_path / "ev" / "results.csv").exists()
    res = subprocess.run([sys.executable, "-m", "adapters", "eval", "--adapter",
                          f"mine={tmp_path / 'a'}", "--data", f"qa={f}", "--generate", "2",
                          "--max-new-tokens", "4", "--compare", str(tmp_path / "ev" /
                                                                   "results.json")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ADAPTERS_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stderr
    assert "rouge_l (higher is better)" in res.stdout and "bleu" in res.stdout
    assert "| mine | qa | loss |" in res.stdout


def test_split_prompt():
    from adapters.eval import split_prompt

    assert split_prompt([1, 2, 3, 4, 5], [-100, -100, 3, 4, -100]) == ([1, 2], [3, 4])
    assert split_prompt([1, 2], [-100, -100]) == ([1, 2], [])


def test_multiple_choice_ranks_by_log_likelihood(tiny_gpt2, tmp_path):
    from conftest import write_jsonl

    from adapters.eval import choice_logprob

    rows = [{"input": "Pick a number", "output": "one", "choices": ["one", "two", "three"],
             "answer": 0},
            {"input": "Pick a word", "output": "cat", "choices": ["dog", "cat"], "answer": "cat"}]
    f = write_jsonl(tmp_path / "mc.jsonl", rows)
    got = evaluate(str(tiny_gpt2), {}, {"mc": DataConfig(train=str(f))})[0]["choice_accuracy"]
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2)))  # same dtype as evaluate's
    right = 0
    for r in rows:
        scores = [choice_logprob(model, tok, r["input"] + "\n", c) for c in r["choices"]]
        answer = r["answer"] if isinstance(r["answer"], int) else r["choices"].index(r["answer"])
        right += max(range(len(scores)), key=scores.__getitem__) == answer
    assert got == right / 2


def test_cli_eval_from_a_recipe(tiny_gpt2, tmp_path):
    import os
    import subprocess
    import sys

    f = qa_csv(tmp_path / "qa.csv", 4)
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {f}, eval: {f}}}\n")
    res = subprocess.run([sys.executable, "-m", "adapters", "eval", "--recipe", str(r),
                          "--metrics", "loss", "perplexity"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ADAPTERS_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stderr
    assert "| eval |" in res.stdout and "perplexity (lower" in res.stdout
    assert "token_accuracy" not in res.stdout
