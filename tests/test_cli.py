"""The real `adapters` command line, run as a subprocess."""

import subprocess
import sys

from conftest import trained_adapter

COMMANDS = ["train", "eval", "merge", "generate", "serve", "inspect", "data", "demo", "models"]


def adapters(*args, check=True):
    return subprocess.run([sys.executable, "-m", "adapters", *map(str, args)],
                          capture_output=True, text=True, check=check, timeout=300)


def test_help_lists_every_command():
    out = adapters("--help").stdout
    for name in COMMANDS:
        assert name in out


def test_inspect_a_saved_adapter(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    res = adapters("inspect", tmp_path / "a")
    assert "integrity: ok" in res.stdout
    assert "c_attn" in res.stdout and str(tiny_gpt2) in res.stdout
    w = tmp_path / "a" / "adapter_model.safetensors"
    w.write_bytes(b"garbage" + w.read_bytes()[7:])
    res = adapters("inspect", tmp_path / "a", check=False)
    assert res.returncode == 1 and "FAILED" in res.stdout


def test_bad_recipe_is_a_clear_error_not_a_traceback(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("train:\n  stpes: 3\n")
    res = adapters("train", r, check=False)
    assert res.returncode == 1
    assert "train.stpes" in res.stderr and "Traceback" not in res.stderr
