"""Label (task-head) data end to end: `adapters data preview` shows class names, ids and
values; the stdlib module-classification data (scripts/stdlib_labels.py) and its recipe."""

import csv
import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl

from adapters.config import load_recipe
from adapters.data.labels import Targets
from adapters.data.preview import preview
from adapters.training.trainer import setup

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-pydoc-module.yaml"
ROWS = [{"text": "import x", "label": "yes"}, {"text": "while y", "label": "no"},
        {"text": "return z", "label": "yes"}]


def _script():
    spec = importlib.util.spec_from_file_location("stdlib_labels",
                                                  ROOT / "scripts" / "stdlib_labels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def module_data(tmp_path_factory):
    """The stdlib classification CSVs, built once."""
    out = tmp_path_factory.mktemp("pydoc-module")
    return _script().build(out), out


def _label_args(model, data, *extra):
    return ["data", "preview", RECIPE, f"model.name={model}", f"data.train={data}",
            "data.eval=null", *extra]


# ---- preview --------------------------------------------------------------------------------


def test_preview_shows_class_names_ids_and_counts(tiny_gpt2, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code, out, _ = run_cli(*_label_args(tiny_gpt2, data), "--n", "2", "--color", "never",
                           capsys=capsys)
    assert code == 0
    assert re.search(r"--- example 1 \(\d+ tokens, label 'yes' = id 1\) ---\nimport \[\[x\]\]\n",
                     out)  # the one token the head reads is marked
    assert re.search(r"--- example 2 \(\d+ tokens, label 'no' = id 0\) ---", out)
    assert "labels: no=1 (id 0), yes=2 (id 1)" in out
    assert "example 3" not in out


def test_preview_shows_regression_values(tiny_gpt2, tmp_path, capsys):
    rows = [{"text": r["text"], "label": v} for r, v in zip(ROWS, [3.0, -1.5, 2])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, _ = run_cli(*_label_args(tiny_gpt2, data, "model.task=regression"),
                           "--color", "never", capsys=capsys)
    assert code == 0
    assert re.search(r"--- example 1 \(\d+ tokens, value 3\) ---", out)
    assert re.search(r"--- example 2 \(\d+ tokens, value -1.5\) ---", out)
    assert "values: min -1.5, mean 1.16667, max 3" in out


def test_preview_library_call_reads_the_class_names(tiny_gpt2, tmp_path):
    """Without targets, preview reads the names from data.train as training does."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = load_recipe(RECIPE, [f"model.name={tiny_gpt2}", f"data.train={data}", "data.eval=null"])
    text = preview(cfg, n=1)
    assert "label 'yes' = id 1" in text and "labels: no=1 (id 0), yes=2 (id 1)" in text
    given = preview(cfg, n=1, targets=Targets("classification", ["yes", "no"]))
    assert "label 'yes' = id 0" in given


def test_preview_refuses_label_data_without_a_task_head(tiny_gpt2, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code, _, err = run_cli(*_label_args(tiny_gpt2, data, "model.task=causal_lm"),
                           capsys=capsys)
    assert code != 0 and "model.task: classification or regression" in err


def test_preview_of_lm_data_is_unchanged(tiny_gpt2, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"input": "a", "output": "b"}])
    code, out, err = run_cli("data", "preview", ROOT / "recipes" / "smollm2-pydoc-qa.yaml",
                           f"model.name={tiny_gpt2}", "model.quantization=none",
                           f"data.train={data}", "data.eval=null", "--color", "never",
                           capsys=capsys)
    assert code == 0, err
    assert " trained) ---" in out and "labels:" not in out
    assert "loss is counted on the [[...]] tokens" in out


# ---- the stdlib module-classification data and recipe ---------------------------------------


def test_stdlib_labels_are_balanced_disjoint_masked_and_deterministic(module_data, tmp_path):
    paths, _ = module_data
    split = {name: list(csv.DictReader(open(p, encoding="utf-8"))) for name, p in paths.items()}
    train, ev = split["train"], split["eval"]
    modules = _script().MODULES
    assert 4 <= len(modules) <= 6
    for rows in (train, ev):
        assert set(rows[0]) == {"text", "label", "name"}
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == set(modules) and len(set(counts.values())) == 1  # balanced
    assert len(train) >= 40 * len(modules) and len(ev) >= 10 * len(modules)
    assert not {r["text"] for r in train} & {r["text"] for r in ev}
    assert not {r["name"] for r in train} & {r["name"] for r in ev}
    for r in train + ev:
        assert r["name"].split(".")[0] == r["label"] and r["text"].strip()
        low = r["text"].lower()
        assert not any(m in low for m in modules if len(m) >= 5), r
        assert not any(f"{m}." in low.split() or f" {m} " in f" {low} " for m in modules), r
    again = _script().build(tmp_path / "again")
    assert all(again[n].read_bytes() == paths[n].read_bytes() for n in paths)


def test_module_recipe_sets_up_a_classification_run(module_data, tiny_gpt2, tmp_path):
    """The recipe as shipped, on the script's data, with a tiny base instead of the default."""
    paths, _ = module_data
    cfg = load_recipe(RECIPE, [f"model.name={tiny_gpt2}", f"data.train={paths['train']}",
                               f"data.eval={paths['eval']}", f"output.dir={tmp_path / 'out'}",
                               "model.dtype=fp32"])
    assert cfg.model.task == "classification" and cfg.data.format == "label"
    shipped = load_recipe(RECIPE)
    assert shipped.model.name == "default"
    assert shipped.data.train == "runs/demo/data/pydoc-module/train.csv"
    run = setup(cfg)
    modules = sorted(_script().MODULES)
    assert run.model.base_model.model.config.num_labels == len(modules)
    assert run.data_stats["eval"]["examples"] == len(list(csv.DictReader(open(paths["eval"]))))
    assert run.total_steps == shipped.train.steps
