"""The `adapters` command line: its command table, every --help, and checks before loading.

Run in-process through `run_cli` (conftest). Bad values must be a one-line `error:` naming
the flag, exit code 1, and no model or tokenizer may load first: `_no_loading` makes any load
fail the test.
"""

import re
import subprocess
import sys

import pytest
import transformers
from conftest import qa_csv, run_cli, trained_adapter

from adapters.cli import COMMANDS
from adapters.config import QUANTIZATIONS, DataConfig, field_choices

NESTED = {"data": ["preview", "build"], "models": ["default"]}


@pytest.fixture
def _no_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the flags were checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)


def test_help_lists_exactly_the_command_table(capsys):
    code, out, _ = run_cli("--help", capsys=capsys)
    assert code == 0
    listed = re.findall(r"^    ([a-z]+)\s", out, re.M)  # argparse: 4 spaces, name, help
    assert sorted(listed) == sorted(COMMANDS)


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS]
                         + [[c, s] for c, subs in NESTED.items() for s in subs],
                         ids=" ".join)
def test_every_subcommand_help_exits_0(argv, capsys):
    code, out, _ = run_cli(*argv, "--help", capsys=capsys)
    assert code == 0
    assert out.startswith(f"usage: adapters {' '.join(argv)}")


def test_inspect_a_saved_adapter(tiny_gpt2, tmp_path, capsys):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    code, out, _ = run_cli("inspect", tmp_path / "a", capsys=capsys)
    assert code == 0
    assert re.search(r"^\s*integrity: ok$", out, re.M)
    assert "c_attn" in out and str(tiny_gpt2) in out
    w = tmp_path / "a" / "adapter_model.safetensors"
    w.write_bytes(b"garbage" + w.read_bytes()[7:])
    code, out, _ = run_cli("inspect", tmp_path / "a", capsys=capsys)
    assert code == 1 and "integrity: FAILED" in out


def test_bad_recipe_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("train:\n  stpes: 3\n")
    code, _, err = run_cli("train", r, capsys=capsys)
    assert code == 1
    assert err.startswith("error: ") and "train.stpes" in err and "did you mean 'steps'" in err


def _cases(tmp_path):
    """(argv, words the error must contain); every argv is wrong in exactly one value."""
    qa = str(qa_csv(tmp_path / "qa.csv", 4))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train: {qa}\n")
    no_eval = tmp_path / "no-eval.yaml"
    no_eval.write_text(f"data:\n  train: {qa}\n  eval: {tmp_path / 'held-out.csv'}\n")
    nobase = str(tmp_path / "no-such-model")  # were it loaded, the error would name it
    missing = str(tmp_path / "missing")
    return [
        (["eval", "--base", nobase, "--data", qa, "--metrics", "loss", "bogus"],
         ["--metrics", "'bogus'", "token_accuracy"]),
        (["eval", "--base", nobase, "--data", qa, "--adapter", "noequals"],
         ["--adapter", "NAME=PATH", "'noequals'"]),
        (["eval", "--base", nobase, "--data", qa, "--adapter", f"x={missing}"],
         ["--adapter", "no adapter folder", missing]),
        (["eval", "--base", nobase, "--data", f"{missing}.csv"],
         ["--data", "data file not found"]),
        (["eval", "--base", nobase, "--data", qa, "--max-seq-len", "0"],
         ["--max-seq-len", "an integer > 0", "'0'"]),
        (["eval", "--base", nobase, "--data", qa, "--format", "csv"],
         ["--format", *field_choices(DataConfig, "format")]),
        (["eval", "--base", nobase, "--data", qa, "--quantization", "3bit"],
         ["--quantization", *QUANTIZATIONS]),
        (["eval", "--base", nobase, "--data", qa, "--columns", "question=q"],
         ["--columns", "['question']", "prompt, completion"]),
        (["eval", "--base", nobase, "--data", qa, "--adapter", f"x={a}", "--adapter",
          f"x={b}"], ["--adapter", "'x' is given twice"]),
        (["eval", "--base", nobase, "--data", qa, "--compare", missing],
         ["--compare", "no such file"]),
        (["eval", "--recipe", str(no_eval), "--base", nobase],
         ["data.eval", "held-out.csv: data file not found"]),
        (["merge", str(a), "--out", missing, "--max-kl", "0"], ["--max-kl", "a number > 0"]),
        (["merge", missing, "--out", str(b)], ["adapter", "no adapter folder"]),
        (["combine", str(a), str(b), "--weights", "1", "--out", missing],
         ["--weights", "1 weights for 2 adapters"]),
        (["combine", str(a), "--weights", "1", "--out", missing], ["at least two adapters"]),
        (["combine", str(a), str(b), "--weights", "1", "1", "--density", "0", "--out", missing],
         ["--density", "(0, 1]"]),
        (["generate", "--base", nobase, "--prompt", "hi", "--top-p", "2"],
         ["--top-p", "(0, 1]"]),
        (["generate", "--base", nobase, "--prompt", "hi", "--temperature", "-1"],
         ["--temperature", ">= 0"]),
        (["generate", "--base", nobase], ["--prompt", "required"]),
        (["serve", "--base", nobase, "--port", "70000"], ["--port", "0-65535"]),
        (["serve", "--base", nobase, "--device", "gpu"], ["--device", "a torch device"]),
        (["verify", missing], ["path", "no adapter folder"]),
        (["pull", "not-a-repo-id"], ["repo_id", "owner/name"]),
        (["train", str(recipe), "--nproc", "0"], ["--nproc", "an integer > 0"]),
        (["data", "preview", str(recipe), "--n", "0"], ["--n", "an integer > 0"]),
    ]


def test_bad_values_fail_before_any_model_loads(tmp_path, capsys, _no_loading):
    for argv, words in _cases(tmp_path):
        code, out, err = run_cli(*argv, capsys=capsys)
        assert code == 1, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)  # one line
        for w in words:
            assert w in err, (argv, w, err)


def test_hub_dataset_offline_is_named_by_data_preview(tiny_gpt2, tmp_path, capsys, monkeypatch,
                                                      _no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    data = qa_csv(tmp_path / "q.csv")
    recipe.write_text(f"model:\n  name: {tiny_gpt2}\ndata:\n  train: {data}\n")
    code, _, err = run_cli("data", "preview", recipe, "data.train=someuser/somedataset",
                           capsys=capsys)
    assert code == 1
    assert "someuser/somedataset" in err and "offline" in err and "data.train" in err
    assert "data file not found" not in err


def test_eval_runs_and_keeps_only_the_asked_metrics(tiny_gpt2, tmp_path, capsys):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    code, out, err = run_cli("eval", "--adapter", f"mine={tmp_path / 'a'}", "--data",
                             f"qa={qa_csv(tmp_path / 'qa.csv', 4)}", "--metrics", "loss",
                             "--out", tmp_path / "ev", capsys=capsys)
    assert code == 0, err
    assert "| qa |" in out and "mine" in out and "loss (lower is better)" in out
    assert "perplexity" not in out and "token_accuracy" not in out
    assert (tmp_path / "ev" / "results.json").is_file()


def test_help_and_a_mistyped_command_load_no_ml_library():
    """`adapters --help` and `adapters trian` answer without importing torch, transformers,
    peft or datasets (seconds of imports on a small machine); `adapters train --help` does
    import what train needs, and lists its flags."""
    probe = ("import sys\nfrom adapters.cli import main\ncode = main(sys.argv[1:])\n"
             "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') "
             "if m in sys.modules]\nprint('HEAVY', code, *heavy)\n")

    def run(*argv):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                             text=True, timeout=300)
        return out.stdout.splitlines()[-1].split()[1:], out.stdout + out.stderr

    assert run("--help")[0] == ["0"]
    (code, *heavy), text = run("trian")
    assert code == "1" and heavy == [] and "invalid choice: 'trian'" in text
    (code, *heavy), text = run("train", "--help")
    assert code == "0" and "torch" in heavy and "--resume" in text
