"""Evaluation: metric functions by hand, the loss equal to transformers' own, adapters help."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import qa_csv, recipe, trained_adapter, write_jsonl

from adapters.config import BASE_NAME, IGNORE_INDEX, DataConfig, ModelConfig
from adapters.eval import (
    bleu,
    choice_logprob,
    evaluate,
    exact_match,
    rouge_l,
    split_prompt,
    table,
    token_f1,
    write_results,
)
from adapters.model import load_base
from adapters.training import train


def test_text_metrics_by_hand():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # pred: [paris, is, capital] vs ref: [capital, is, paris, france]: 3 common
    assert token_f1("Paris is the capital", "capital is Paris, France") == pytest.approx(
        2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))
    # LCS of [a1 b c d] and [a1 c d e] (articles dropped, a1 kept) = [a1 c d] = 3
    assert rouge_l("a1 b c d", "a1 c d e") == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    assert token_f1("", "") == 1.0 and rouge_l("x", "") == 0.0
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert 0 < bleu("the cat sat on a mat", "the cat sat on the mat") < 100


@pytest.mark.parametrize("packing", [False, True])
def test_eval_loss_equals_transformers_loss_in_fp32(tiny_model, tmp_path, packing):
    f = qa_csv(tmp_path / "qa.csv", 6)
    rows = evaluate(str(tiny_model), {}, {"qa": DataConfig(train=str(f), packing=packing)},
                    accuracy=False, dtype="fp32")
    model, tok = load_base(ModelConfig(name=str(tiny_model), dtype="fp32"))
    total, count = 0.0, 0
    with torch.no_grad():
        for r in csv.DictReader(open(f)):
            p = tok(r["input"] + "\n", add_special_tokens=False)["input_ids"]
            c = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            labels = [IGNORE_INDEX] * len(p) + c  # the prompt is masked: no loss on it
            loss = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([labels])).loss
            total += float(loss) * len(c)  # HF's loss is this example's mean over len(c)
            count += len(c)
    assert rows[0]["tokens"] == count
    assert rows[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert rows[0]["perplexity"] == pytest.approx(math.exp(rows[0]["loss"]), rel=1e-6)


def test_trained_adapter_scores_better_on_its_data(tiny_llama, tmp_path):
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
    trained_adapter(tiny_gpt2, tmp_path / "a")
    f = qa_csv(tmp_path / "qa.csv", 5)
    res = subprocess.run([sys.executable, "-m", "adapters", "eval", "--adapter",
                          f"mine={tmp_path / 'a'}", "--data", f"qa={f}", "--out",
                          str(tmp_path / "ev")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ADAPTERS_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stderr
    assert "| qa |" in res.stdout and "mine" in res.stdout
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {r["model"] for r in rows} == {BASE_NAME, "mine"}
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
    assert split_prompt([1, 2, 3, 4, 5], [-100, -100, 3, 4, -100]) == ([1, 2], [3, 4])
    assert split_prompt([1, 2], [-100, -100]) == ([1, 2], [])


def test_multiple_choice_ranks_by_log_likelihood(tiny_gpt2, tmp_path):
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
