"""The main job, shortened: tiny model, a few steps, the whole report."""

import csv
import json
import os
import subprocess
import sys

from adapters.demo.datasets import build_pydoc_qa, build_stdlib_code
from adapters.share.llama_runtime import have_llama_cpp


def test_dataset_builders_are_deterministic_and_split_by_module(tmp_path):
    a = build_pydoc_qa(tmp_path / "a")
    b = build_pydoc_qa(tmp_path / "b")
    assert a["train"].read_text() == b["train"].read_text()
    # ...and in another process (a default's repr may carry a per-process memory address).
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from "
                    "adapters.demo.datasets import build_pydoc_qa; "
                    "build_pydoc_qa(Path(sys.argv[1]))", str(tmp_path / "p")],
                   check=True, timeout=300)
    assert (tmp_path / "p" / "train.csv").read_text() == a["train"].read_text()
    assert " at 0x" not in a["train"].read_text()
    train = list(csv.DictReader(open(a["train"])))
    ev = list(csv.DictReader(open(a["eval"])))
    assert len(train) > 300 and len(ev) > 50
    assert not {r["module"] for r in train} & {r["module"] for r in ev}
    assert all(r["input"].startswith("What does the ") and r["output"] for r in train)
    c = build_stdlib_code(tmp_path / "c")
    mods = [{json.loads(x)["module"] for x in open(c[k])} for k in ("train", "eval")]
    assert mods[0] and mods[1] and not mods[0] & mods[1]


def test_tiny_demo_end_to_end(tmp_path):
    env_home = {"ADAPTERS_HOME": str(tmp_path / "home")}

    res = subprocess.run([sys.executable, "-m", "adapters", "demo", "--tiny", "--out",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env_home})
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for piece in ("Held-out loss", "pydoc-qa", "stdlib-code", "mixed batch", "max_logit_diff",
                  "eval/eval.png", "pydoc-qa/loss.png"):
        assert piece in report
    assert (out / "merged-pydoc-qa" / "config.json").exists()
    assert report.count("verified (sha256, finite, shapes, no pickles)") == 3  # + pydoc-grpo
    assert "## Evaluation" in (out / "pydoc-qa" / "README.md").read_text()  # eval in the card
    assert (out / "shared" / "stdlib-code.zip").is_file()
    # Both GGUFs are always written; checked in llama.cpp where its runtime is (CI has it).
    assert all((out / "gguf" / f"{n}.gguf").is_file() for n in ("pydoc-qa", "stdlib-code"))
    checked = "verified in llama.cpp" if have_llama_cpp() or os.environ.get("CI") else \
        "not verified in llama.cpp"
    assert report.count(checked) == 2, report[report.find("## Run it elsewhere"):]
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert len(rows) == 8  # base + 3 adapters, on 2 held-out sets
    # GRPO from the pydoc-qa adapter: its rewards per step, its F1 in the eval table
    grpo = [json.loads(x) for x in (out / "pydoc-grpo" / "metrics.jsonl").read_text(
        ).splitlines()]
    assert [m["step"] for m in grpo if "reward_token_f1" in m] == [1, 2]
    man = json.loads((out / "pydoc-grpo" / "manifest.json").read_text())
    assert man["lora"]["init_from"] == str(out / "pydoc-qa")
    assert "Held-out token F1" in report and "pydoc-grpo/loss.png" in report
    # a parity certificate for each domain adapter, in its card and in the report
    for name in ("pydoc-qa", "stdlib-code"):
        cert = json.loads((out / name / "manifest.json").read_text())["parity"]
        assert cert["prompts"] == 4 and all(r["passed"] for r in cert["rows"]), cert
        assert {"adapters", "adapters-mixed", "merged"} <= {r["runtime"] for r in cert["rows"]}
        assert "## Parity certificate" in (out / name / "README.md").read_text()
    assert report.count("every runtime passed") == 2
    # A second run reuses the trained adapters.
    res = subprocess.run([sys.executable, "-m", "adapters", "demo", "--tiny", "--out",
                          str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env_home})
    assert res.returncode == 0 and "already trained" in res.stderr
