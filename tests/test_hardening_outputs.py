"""Issue 29, files: what a command writes never replaces what it did not write (item 2);
weights that would fail every request are refused at load, in verify and on pull (item 4);
recipe values out of range are refused at once, before a model loads (item 6); adapter files
that are wrong in new ways are refused at load and in verify (item 7). Real files, real
devices and FIFOs, the real CLI."""

import json
import os
import shutil
import socket
import stat
import zipfile
from pathlib import Path

import pytest
from conftest import recipe, run_cli, trained_adapter
from safetensors.torch import load_file, save_file

from adapters.adapter import Manifest, check_files, load_adapter
from adapters.adapter.archive import pack, resolve_adapter
from adapters.config import ModelConfig, load_recipe
from adapters.data import build as build_data
from adapters.errors import AdapterFileError, ConfigError, DataError, ModelError, TrainingError
from adapters.model import load_base
from adapters.serving.registry import Registry
from adapters.share.hub import HubError, accept_pulled
from adapters.share.verify import verify
from adapters.training.trainer import train

WEIGHTS = "adapter_model.safetensors"


def restamp(folder: Path) -> Path:
    """The manifest's sha256 made to match the (changed) weights: only the new checks can
    catch what was changed."""
    Manifest.read(folder).with_weights(folder / WEIGHTS).write(folder)
    return folder


def with_weights(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS)
    change(tensors)
    save_file(tensors, dst / WEIGHTS)
    return restamp(dst)


def with_config(src: Path, dst: Path, **fields) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return dst


def _b(tensors):
    return next(k for k in tensors if "lora_B" in k)


def _a(tensors):
    return next(k for k in tensors if "lora_A" in k)


# -- 2. an output path that is not ours is refused and left as it was --------------------------

def _targets(tmp_path: Path) -> dict[str, Path]:
    out = {}
    out["fifo"] = tmp_path / "fifo"
    os.mkfifo(out["fifo"])
    out["file"] = tmp_path / "notes.txt"
    out["file"].write_text("keep me")
    out["socket"] = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(out["socket"]))
    s.close()
    out["foreign folder"] = tmp_path / "mine"
    out["foreign folder"].mkdir()
    (out["foreign folder"] / "thesis.tex").write_text("years of work")
    out["model folder"] = tmp_path / "their-model"  # a user's own base: config.json is not ours
    out["model folder"].mkdir()
    (out["model folder"] / "config.json").write_text("{}")
    (out["model folder"] / "model.safetensors").write_bytes(b"weights")
    out["link"] = tmp_path / "link"
    out["link"].symlink_to(tmp_path / "mine")
    if os.geteuid() == 0:  # a /dev/null of our own: the case the issue found
        out["device"] = tmp_path / "null"
        os.mknod(out["device"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return out


def _state(p: Path):
    st = p.lstat()
    inside = sorted(x.name for x in p.iterdir()) if stat.S_ISDIR(st.st_mode) else None
    return st.st_mode, st.st_ino, st.st_rdev, inside, \
        p.read_text() if stat.S_ISREG(st.st_mode) else None


def test_writers_refuse_outputs_they_did_not_create(good, tmp_path, capsys):
    targets = _targets(tmp_path)
    before = {k: _state(p) for k, p in targets.items()}
    for kind, target in targets.items():
        for argv in (["merge", good, "--out", target, "--no-verify"],
                     ["export", good, "--to", "ollama", "--out", target, "--no-verify"],
                     ["combine", good, good, "--weights", "0.5", "0.5", "--out", target]):
            if argv[0] == "combine" and kind in ("foreign folder", "model folder", "link"):
                continue  # combine writes its files into a folder: any real one will do
            code, _, err = run_cli(*argv, capsys=capsys)
            assert code != 0 and "refused" in err, (kind, argv[0], err)
            assert str(target) in err, err
        for argv in (["export", good, "--to", "gguf-lora", "--out", target, "--no-verify"],
                     ["pack", good, "--out", target]):
            if kind == "file":
                continue  # a file is what these write: replacing an old one is their job
            code, _, err = run_cli(*argv, capsys=capsys)
            assert code != 0 and "refused" in err, (kind, argv[0], err)
    assert {k: _state(p) for k, p in targets.items()} == before  # nothing touched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_an_earlier_output_is_still_replaced(good, tmp_path, capsys):
    out = tmp_path / "merged"
    for _ in range(2):  # the second merge replaces the first one's folder (config.json)
        code, _, err = run_cli("merge", good, "--out", out, "--no-verify", capsys=capsys)
        assert code == 0, err
    assert (out / "config.json").is_file() and (out / ".adapters-output").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("merge", good, "--out", empty, "--no-verify")[0] == 0


# -- 4. weights that fail every request: refused with the tensor's name -------------------------

NONFINITE = {
    "all NaN": lambda t: t[_b(t)].fill_(float("nan")),
    "all inf": lambda t: t[_b(t)].fill_(float("inf")),
    "one NaN": lambda t: t[_a(t)].view(-1).__setitem__(3, float("nan")),
    "3e38": lambda t: t[_b(t)].fill_(3e38),
}


@pytest.mark.parametrize("case", [*NONFINITE, "lora_alpha 1e308"])
def test_non_finite_or_huge_weights_are_refused_everywhere(good, base, tmp_path, case):
    if case in NONFINITE:
        bad = with_weights(good, tmp_path / "bad", NONFINITE[case])
        tensors = load_file(good / WEIGHTS)
        expect = _a(tensors) if case == "one NaN" else _b(tensors)
    else:
        bad = with_config(good, tmp_path / "bad", lora_alpha=1e308)
        expect = "lora_alpha"
    with pytest.raises(AdapterFileError, match=expect.replace(".", r"\.")):
        check_files(bad)
    model, tok = base
    with pytest.raises(AdapterFileError, match=expect.replace(".", r"\.")):
        load_adapter(model, bad, tok)
    failed = [c for c in verify(bad) if not c.ok]
    assert failed and expect in failed[0].detail, failed
    with pytest.raises(HubError, match="fails verification"):
        accept_pulled(bad, "someone/adapter")


# -- 6. recipe values: bounded, every problem at once, before a model loads ---------------------

def test_recipe_bounds_are_checked_at_once_before_any_model_loads(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: /no/such/model\n"  # never reached: the checks come first
                    "lora:\n  r: 1000000000\n"
                    "data:\n  train: x.csv\n  max_seq_len: 1000000000000\n"
                    "train:\n  lr: .nan\n  batch_size: 10000000000\n"
                    f"  steps: {10**100}\n  dpo_beta: .inf\n")
    code, _, err = run_cli("train", path, capsys=capsys)
    assert code != 0 and "6 problem(s)" in err, err
    for field in ("lora.r", "data.max_seq_len", "train.lr", "train.batch_size", "train.steps",
                  "train.dpo_beta"):
        assert field in err, (field, err)
    assert "/no/such/model" not in err
    with pytest.raises(ConfigError, match=r"train\.lr: must be a number > 0"):
        load_recipe(None, ["train.lr=.inf"])


def test_a_five_thousand_digit_integer_names_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora:\n  alpha: " + "7" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"line 2 column 10: an integer of 5000 digits"):
        load_recipe(path)


def test_an_empty_eval_file_is_an_error(tiny_gpt2, tmp_path):
    empty = tmp_path / "eval.csv"
    empty.write_text("input,output\n")
    cfg = recipe(tiny_gpt2, tmp_path, f"data.eval={empty}")
    _, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    with pytest.raises(DataError, match="data.eval: the dataset is empty"):
        build_data(cfg.data, tok)


def test_a_rank_past_the_width_and_a_run_past_memory_are_refused(tiny_gpt2, tmp_path):
    with pytest.raises(ModelError, match=r"lora.r is 16384, above the model's width"):
        train(recipe(tiny_gpt2, tmp_path / "r", "lora.r=16384", "train.steps=1"))
    big = recipe(tiny_gpt2, tmp_path / "m", "train.batch_size=65536", "data.max_seq_len=1048576",
                 "train.steps=1")
    with pytest.raises(TrainingError, match=r"estimated peak memory [0-9.]+ GB is more than "
                                            r"this machine's [0-9.]+ GB"):
        train(big)
    assert not (tmp_path / "m" / "out" / WEIGHTS).exists()


# -- 7. adapter files wrong in new ways ---------------------------------------------------------

def _duplicate_key(folder: Path) -> None:
    """The first tensor's header entry written twice (same offsets): safetensors keeps one."""
    raw = (folder / WEIGHTS).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    text = json.dumps(header, separators=(",", ":"))
    text = "{" + json.dumps(first) + ":" + json.dumps(header[first]) + "," + text[1:]
    text += " " * (-len(text) % 8)
    (folder / WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text.encode() + raw[8 + n:])
    restamp(folder)


def _config(**fields):
    def change(folder: Path) -> None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return change


def _manifest_bytes(folder: Path) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["weights"]["bytes"] = 10**30
    (folder / "manifest.json").write_text(json.dumps(m))


FILE_CASES = {  # name: (change a good adapter folder in place, what the error names)
    "duplicate tensor key": (_duplicate_key, "twice"),
    "target_modules []": (_config(target_modules=[]), "target_modules"),
    "layers_to_transform past the tensors": (_config(layers_to_transform=[100]),
                                             "layers_to_transform"),
    "layers_to_transform past the base": (_config(layers_to_transform=[0, 1, 7]),
                                          "the base has 2 layers"),
    "manifest bytes 10**30": (_manifest_bytes, "weights"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_wrong_adapter_files_are_refused_at_load_and_in_verify(good, base, tiny_gpt2,
                                                               tmp_path, case):
    change, names = FILE_CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    change(bad)
    model, tok = base
    with pytest.raises(AdapterFileError, match=names):
        load_adapter(model, bad, tok)
    with pytest.raises(AdapterFileError, match=names):  # the server's path: no peft involved
        Registry(*load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))).load("x", bad)
    failed = [c for c in verify(bad, base=str(tiny_gpt2)) if not c.ok]
    assert failed and names in " ".join(c.detail for c in failed), failed
    if "base" not in case:  # found from the files alone, before any base is loaded
        failed = [c for c in verify(bad) if not c.ok]
        assert failed and names in " ".join(c.detail for c in failed), failed


def test_fan_in_fan_out_on_linear_layers_is_refused(tiny_llama, tmp_path):
    """GPT-2's Conv1D stores W^T, so its adapters say fan_in_fan_out; on Llama's nn.Linear
    the merged update would be transposed (or, square, silently wrong)."""
    good = tmp_path / "good"
    trained_adapter(tiny_llama, good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _config(fan_in_fan_out=True)(bad)
    model, tok = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    with pytest.raises(AdapterFileError, match="fan_in_fan_out.*not a Conv1D"):
        load_adapter(model, bad, tok)
    failed = [c for c in verify(bad, base=str(tiny_llama)) if not c.ok]
    assert failed and "fan_in_fan_out" in failed[0].detail
    load_adapter(model, good, tok)  # the same adapter as trained loads


def _zip(good: Path, out: Path, rename=None, encrypt=False) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for name in ("adapter_config.json", WEIGHTS, "manifest.json"):
            z.write(good / name, rename(name) if rename else name)
    if encrypt:  # set the "encrypted" bit in the local and the central headers
        raw = bytearray(out.read_bytes())
        raw[6] |= 1
        raw[raw.find(b"PK\x01\x02") + 8] |= 1
        out.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize("case", ["backslash", "encrypted"])
def test_zip_entries_with_backslashes_or_encryption_are_refused(good, tmp_path, case):
    archive = _zip(good, tmp_path / "a.zip", encrypt=case == "encrypted",
                   rename=(lambda n: "adapter\\" + n) if case == "backslash" else None)
    assert _zip(good, tmp_path / "ok.zip") and resolve_adapter(tmp_path / "ok.zip").is_dir()
    with pytest.raises(AdapterFileError, match=case[:6]):
        resolve_adapter(archive)
    (check,) = verify(archive)
    assert not check.ok and case[:6] in check.detail
    assert pack(good, tmp_path / "packed.zip")  # what pack writes passes
