"""Interop: lm-evaluation-harness scores our adapter folders, and agrees with our numbers."""

import json
import os

import pytest
from conftest import trained_adapter

from adapters.adapter import load_adapter
from adapters.config import ModelConfig
from adapters.eval import choice_logprob
from adapters.model import load_base

INSTALL_HINT = "lm-eval is not installed: pip install '.[eval]'"
try:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError:
    simple_evaluate = None


def _require_lm_eval() -> None:
    """In CI (CI set) a missing lm-eval is this test's failure, never a quiet skip."""
    if simple_evaluate is None:
        if os.environ.get("CI"):
            pytest.fail(f"{INSTALL_HINT} (CI is set: this test may not be skipped)")
        pytest.skip(INSTALL_HINT)


ROWS = [{"input": "Pick a number", "choices": ["one", "two", "three"], "answer": 0},
        {"input": "Pick a word", "choices": ["dog", "cat"], "answer": 1}]


def test_lm_eval_loads_the_adapter_folder_and_agrees(tiny_gpt2, tmp_path, monkeypatch):
    _require_lm_eval()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    trained_adapter(tiny_gpt2, tmp_path / "a")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "local.yaml").write_text(
        "task: adapters_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{input}}\\n"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    lm = HFLM(pretrained=str(tiny_gpt2), peft=str(tmp_path / "a"), batch_size=1, device="cpu",
              dtype="float32")
    res = simple_evaluate(model=lm, tasks=["adapters_local_mc"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path / "task")))
    theirs = {s["doc"]["input"]: [r[0][0] for r in s["resps"]]
              for s in res["samples"]["adapters_local_mc"]}
    base, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    # lm-eval moves the context's trailing "\n" into the continuation.
    plain = {r["input"]: [choice_logprob(base, tok, r["input"], "\n" + c) for c in r["choices"]]
             for r in ROWS}
    model = load_adapter(base, tmp_path / "a", tokenizer=tok).eval()
    right = 0
    for row in ROWS:
        ours = [choice_logprob(model, tok, row["input"], "\n" + c) for c in row["choices"]]
        assert ours == pytest.approx(theirs[row["input"]], abs=1e-4)
        assert ours != pytest.approx(plain[row["input"]], abs=1e-4)  # the adapter was applied
        right += max(range(len(ours)), key=ours.__getitem__) == row["answer"]
    assert res["results"]["adapters_local_mc"]["acc,none"] == pytest.approx(right / len(ROWS))
