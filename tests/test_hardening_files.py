"""Hostile adapter files (issue 22, items 7-10): every command that reads a folder or a zip
answers a malformed config or manifest, a pattern that would hang `re`, integer tensors, or a
lying archive with one line naming the file and the field, fast, and leaves nothing behind."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.adapter import inspect_adapter, load_adapter
from adapters.adapter.archive import cache_root, resolve_adapter
from adapters.config import ModelConfig
from adapters.errors import AdapterFileError
from adapters.io import sha256_file
from adapters.model import load_base
from adapters.share.verify import convert, verify

HANG = "(.*.*)*z"  # catastrophic backtracking in `re` on any name without a z


def _copy(src: Path, dst: Path, config=None, manifest=None) -> Path:
    shutil.copytree(src, dst)
    for name, change in (("adapter_config.json", config), ("manifest.json", manifest)):
        if change is None:
            continue
        text = change(json.loads((dst / name).read_text()))
        (dst / name).write_text(text if isinstance(text, str) else json.dumps(text))
    return dst


def _set(key, value):
    return lambda d: {**d, key: value}


BAD_CONFIGS = {  # name: (change, what the one-line error must name)
    "a list": (lambda d: [d], "must be a JSON object"),
    "not JSON": (lambda d: "{'r': 4,", "not valid JSON"),
    "r float": (_set("r", 4.0), "field 'r' must be an integer"),
    "r negative": (_set("r", -4), "field 'r' is -4"),
    "r absurd": (_set("r", 10**9), "field 'r' is 1000000000"),
    "r huge int": (lambda d: re.sub(r'"r": 4\b', '"r": ' + "9" * 5000, json.dumps(d)),
                   "not valid JSON"),
    "alpha NaN": (lambda d: re.sub(r'"lora_alpha": [\d.]+', '"lora_alpha": NaN',
                                   json.dumps(d)), "NaN is not a JSON number"),
    "targets int": (_set("target_modules", 7), "field 'target_modules'"),
    "deep": (lambda d: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "rank_pattern regex": (_set("rank_pattern", {"(a+)+b": 2}), "rank_pattern key"),
}


def _one_line(text: str, *must: str) -> None:
    lines = [x for x in text.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-2000:]
    for m in must:
        assert m in lines[0], (m, lines[0])


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_malformed_config_is_one_line_in_every_command(good, base, tiny_gpt2, tmp_path,
                                                         capsys, case):
    change, field = BAD_CONFIGS[case]
    bad = _copy(good, tmp_path / "bad", config=change)
    where = str(bad / "adapter_config.json")
    checks = verify(bad)
    failed = [c for c in checks if not c.ok]
    assert [c.name for c in failed] == ["config"], checks
    assert where in failed[0].detail and field in failed[0].detail
    code, out, err = run_cli("verify", bad, capsys=capsys)
    assert code == 1 and "NOT verified" in err and field in out
    assert "FAILED" in inspect_adapter(bad)["integrity"]
    assert run_cli("inspect", bad, capsys=capsys)[0] == 1
    model, tok = base
    def peft_load(*a, **k):  # refused before peft builds or allocates anything
        raise AssertionError("peft was asked to load a malformed adapter")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeftModel, "from_pretrained", peft_load)
        mp.setattr(PeftModel, "load_adapter", peft_load)
        with pytest.raises(AdapterFileError, match=re.escape(where) + ".*" + re.escape(field)):
            load_adapter(model, bad, tok)  # what `generate` and the server's registry call
    with pytest.raises(AdapterFileError, match=re.escape(field)):
        convert(bad, tmp_path / "converted")
    for argv in (("convert", bad, "--out", tmp_path / "c2"),
                 ("merge", bad, "--out", tmp_path / "m", "--no-verify"),
                 ("generate", "--base", tiny_gpt2, "--adapter", f"x={bad}", "--prompt", "hi",
                  "--max-new-tokens", "1")):
        code, out, err = run_cli(*argv, capsys=capsys)
        assert code == 1
        _one_line(err, str(bad), field)
    assert not (tmp_path / "m").exists() and not (tmp_path / "converted").exists()


BAD_MANIFESTS = {
    "a list": (lambda d: [d], "must be a JSON object"),
    "not JSON": (lambda d: "{", "not valid JSON"),
    "base a string": (_set("base", "x"), "field 'base'"),
    "weights a string": (_set("weights", "x"), "field 'weights'"),
    "bytes negative": (lambda d: {**d, "weights": {**d["weights"], "bytes": -1}},
                       "field 'weights'"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_malformed_manifest_is_never_verified(good, base, tiny_gpt2, tmp_path, capsys, case):
    change, field = BAD_MANIFESTS[case]
    bad = _copy(good, tmp_path / "bad", manifest=change)
    code, out, err = run_cli("verify", bad, capsys=capsys)
    assert code == 1 and "NOT verified" in err and field in out
    assert "FAILED" in inspect_adapter(bad)["integrity"]
    with pytest.raises(AdapterFileError, match=re.escape(str(bad / "manifest.json"))):
        load_adapter(base[0], bad, base[1])
    code, _, err = run_cli("merge", bad, "--out", tmp_path / "m", "--base", tiny_gpt2,
                           "--no-verify", capsys=capsys)
    assert code == 1
    _one_line(err, "manifest.json", field)


# ---- 8. patterns: matched in bounded time, or refused with the reason ----

def test_the_bounded_matcher_agrees_with_re():
    from adapters.adapter.patterns import Pattern, PatternError  # noqa: PLC0415 - new module

    names = ["transformer.h.0.attn.c_attn", "model.layers.11.self_attn.q_proj", "lm_head",
             "", "aaaaaaaaaaaaaaaaaaaa!", "x\n", "h.0.mlp"]
    patterns = [r".*\.(q_proj|v_proj)", r"(.*\.)?(c_attn|c_fc)", r"model\.layers\.\d+\..*",
                r"(a|aa)*", r"(a*)*!", r"[^.]+", r"\w+\.h\.[0-3]\..*", r"^lm_head$", r"x$",
                r"x\Z", r"a{2,5}.*", r"(?:a|b)??", r"\bh\b.*", r".*\Bh.*", r"[a-c\d_]+", "",
                r"[^\W\d]+", r"\S+\s?"]
    for p in patterns:
        compiled = Pattern(p)
        for n in names:
            assert compiled.fullmatch(n) == (re.fullmatch(p, n) is not None), (p, n)
    t0 = time.perf_counter()
    assert not Pattern(HANG).fullmatch("a" * 2000)
    assert time.perf_counter() - t0 < 60  # a hang guard: Python's re runs for hours on this
    for bad, why in ((r"(a)\1", "back-reference"), (r"(?=a)a", "look-ahead"),
                     (r"(?i)a", "flags"), (r"a++", "possessive"), ("(", "not a valid"),
                     (r"((a{100}){100}){100}", "expands to more than")):
        with pytest.raises(PatternError, match=why):
            Pattern(bad)


_CHILD = textwrap.dedent("""
    import sys, time
    from adapters.adapter import load_adapter
    from adapters.config import ModelConfig
    from adapters.errors import AdaptersError
    from adapters.merge import merge_adapter
    from adapters.model import load_base
    from adapters.share.verify import verify
    folder, base, out = sys.argv[1:]
    model, tok = load_base(ModelConfig(name=base, dtype="fp32"))
    for name, run in (("verify", lambda: verify(folder)),
                      ("load", lambda: load_adapter(model, folder, tok)),
                      ("merge", lambda: merge_adapter(folder, out, base=base))):
        t0 = time.perf_counter()
        try:
            result = run()
            detail = "ok" if name != "verify" else str([c.detail for c in result if not c.ok])
        except AdaptersError as e:
            detail = str(e)
        print(name, round(time.perf_counter() - t0, 2), detail, flush=True)
""")


def test_a_pattern_that_hangs_re_returns_fast(good, tiny_gpt2, tmp_path):
    """In a child process, so today's hang ends as a timeout instead of a stuck test run."""
    bad = _copy(good, tmp_path / "bad", config=_set("target_modules", HANG))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(bad), str(tiny_gpt2),
                           str(tmp_path / "m")], capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.split(" ")[0] in ("verify", "load",
                                                                           "merge")]
    assert [x.split(" ")[0] for x in lines] == ["verify", "load", "merge"], proc.stderr[-2000:]
    for line in lines:
        name, seconds, detail = line.split(" ", 2)
        assert float(seconds) < 20, line
        assert "target_modules" in detail, line  # nothing matched: named, not a hang
    assert not (tmp_path / "m").exists()


def test_a_regex_target_loads_like_the_list_it_matches(good, base, tiny_gpt2, tmp_path):
    targets = json.loads((good / "adapter_config.json").read_text())["target_modules"]
    pattern = r"transformer\.h\.\d+\.\w+\.(" + "|".join(sorted(targets)) + ")"
    rx = _copy(good, tmp_path / "rx", config=_set("target_modules", pattern))
    assert all(c.ok for c in verify(rx)), verify(rx)
    ids = torch.tensor([[1, 2, 3, 4]])
    m1, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    m2, _ = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    with torch.no_grad():
        want = load_adapter(m1, good, tok).eval()(ids).logits
        pm = load_adapter(m2, rx, tok).eval()
        got = pm(ids).logits
        load_adapter(pm, rx, tok, adapter_name="second")  # onto a PeftModel too
        pm.set_adapter("second")
        again = pm(ids).logits
    assert torch.equal(want, got) and torch.equal(want, again)


# ---- 9. dtypes: only floating tensors pass ----

def test_integer_tensors_of_the_same_size_are_refused(good, base, tiny_gpt2, tmp_path, capsys):
    bad = _copy(good, tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k).view(torch.int32) for k in f.keys()}  # same bytes
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["weights"].update(sha256=sha256_file(weights), bytes=weights.stat().st_size)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    checks = {c.name: c for c in verify(bad)}
    assert checks["sha256"].ok and not checks["dtypes"].ok and "I32" in checks["dtypes"].detail
    code, _, err = run_cli("verify", bad, capsys=capsys)
    assert code == 1 and "NOT verified" in err
    with pytest.raises(AdapterFileError, match="dtype I32.*floating point"):
        load_adapter(base[0], bad, base[1])
    code, _, err = run_cli("generate", "--base", tiny_gpt2, "--adapter", f"x={bad}",
                           "--prompt", "hi", "--max-new-tokens", "1", capsys=capsys)
    assert code == 1
    _one_line(err, "I32")


# ---- 10. archives: a refused archive leaves nothing in the unpack cache ----

def _leftovers() -> list[str]:
    root = cache_root()
    return sorted(p.name for p in root.rglob("*")) if root.exists() else []


def _archive(path: Path, folder: Path, weights: bytes, manifest: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(folder / "adapter_config.json", "adapter_config.json")
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("adapter_model.safetensors", weights)
    return path


def test_an_archive_whose_manifest_lies_leaves_nothing(good, tmp_path):
    manifest = json.loads((good / "manifest.json").read_text())
    size = 2 << 20  # the manifest claims 2 MB; zeros compress to a few KB
    manifest["weights"].update(bytes=size, sha256="0" * 64)
    archive = _archive(tmp_path / "lie.zip", good, bytes(size), manifest)
    assert archive.stat().st_size < 64 << 10
    for _ in range(2):  # and again: nothing cached from the first try
        with pytest.raises(AdapterFileError, match="lie.zip: refused, nothing unpacked.*sha256"):
            resolve_adapter(archive)
        assert _leftovers() == []
    assert [c.name for c in verify(archive) if not c.ok] == ["archive"]
    assert _leftovers() == []


def test_an_archive_with_more_than_its_manifest_states_is_cut_off(good, tmp_path):
    manifest = json.loads((good / "manifest.json").read_text())
    real = (good / "adapter_model.safetensors").read_bytes()
    # the member is 1 MB longer than the manifest says: refused before anything is written
    archive = _archive(tmp_path / "big.zip", good, real + bytes(1 << 20), manifest)
    with pytest.raises(AdapterFileError, match="big.zip: unpacks to .* bytes"):
        resolve_adapter(archive)
    assert _leftovers() == []
    # a config that fails the checks after unpacking: removed too
    bad = _copy(good, tmp_path / "bad", config=_set("r", 10**9))
    with zipfile.ZipFile(tmp_path / "cfg.zip", "w") as z:
        for name in ("adapter_config.json", "manifest.json", "adapter_model.safetensors"):
            z.write(bad / name, name)
    with pytest.raises(AdapterFileError, match="cfg.zip: refused, nothing unpacked.*field 'r'"):
        resolve_adapter(tmp_path / "cfg.zip")
    assert _leftovers() == []
    # the good archive still unpacks (and is reused)
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as z:
        for name in ("adapter_config.json", "manifest.json", "adapter_model.safetensors"):
            z.write(good / name, name)
    folder = resolve_adapter(tmp_path / "ok.zip")
    assert all(c.ok for c in verify(tmp_path / "ok.zip"))
    assert resolve_adapter(tmp_path / "ok.zip") == folder
