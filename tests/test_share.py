"""Sharing: the model card, verify, pack/unpack, convert from pickles, hub push/pull offline."""

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch
import yaml
from conftest import make_llama, recipe, trained_adapter
from safetensors.torch import load_file, save_file

from adapters.adapter import Manifest, load_adapter
from adapters.adapter.archive import pack, resolve_adapter
from adapters.adapter.card import DEFAULT_HUB_ID, front_matter
from adapters.cli import main
from adapters.config import ModelConfig
from adapters.errors import AdapterFileError
from adapters.model import load_base
from adapters.share.hub import HubError, accept_pulled, pull, push
from adapters.share.verify import convert, verify
from adapters.training import train


@pytest.fixture
def adapter(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a")
    return tmp_path / "a"


def _card(folder):
    text = (folder / "README.md").read_text()
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


def _logits(model, tok):
    ids = tok("import os\nprint(os.getcwd())", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(ids.to(model.device)).logits.cpu()


def _failed(checks):
    return {c.name for c in checks if not c.ok}


def test_card_of_a_trained_adapter_and_eval_results(tiny_llama, tmp_path, capsys):
    out = train(recipe(tiny_llama, tmp_path, "train.steps=2", "output.license=mit",
                       "output.datasets=[me/arith-qa]"))
    fm, body = _card(out)
    assert fm["library_name"] == "peft" and fm["pipeline_tag"] == "text-generation"
    assert fm["license"] == "mit" and fm["datasets"] == ["me/arith-qa"]
    assert "lora" in fm["tags"] and "llama" in fm["tags"]
    assert "base_model" not in fm  # a local folder is no hub id; the body names it
    assert f"spec: `{tiny_llama}`" in body
    data_sha = hashlib.sha256((tmp_path / "qa.csv").read_bytes()).hexdigest()
    assert data_sha in body and "prompt_completion" in body and "| train | 24 |" in body
    assert "max_seq_len: 64" in body and "| steps | 2 |" in body  # recipe and summary
    assert f'PeftModel.from_pretrained(base, "{out.name}")' in body
    assert "## Evaluation" not in body
    assert main(["eval", "--adapter", f"qa={out}", "--data", str(tmp_path / "qa.csv")]) == 0
    _, body = _card(out)
    manifest = json.loads((out / "manifest.json").read_text())
    row = manifest["eval"][0]
    assert row["dataset"] == "qa" and row["adapter"]["loss"] != row["base"]["loss"]
    assert "## Evaluation" in body and f"{row['adapter']['loss']:.4g}" in body
    assert not _failed(verify(out))  # results added, weights and their hash untouched


@pytest.mark.parametrize("spec,hub", [("default", DEFAULT_HUB_ID),
                                      ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")])
def test_card_names_hub_bases(spec, hub):
    fm = front_matter(Manifest.from_dict({"base": {"name": spec},
                                          "quantization": {"quantization": "4bit"}}))
    assert fm["base_model"] == hub and "qlora" in fm["tags"]
    assert (fm.get("license") == "apache-2.0") == (spec == "default")  # SmolLM2's license


def _rewrite(folder, change):
    """Change the tensors and re-hash, so only the check under test can catch it."""
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    change(state)
    save_file(state, weights)
    man = json.loads((folder / "manifest.json").read_text())
    man["weights"].update(sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                          bytes=weights.stat().st_size)
    (folder / "manifest.json").write_text(json.dumps(man))


def _lora_a(state):
    return next(k for k in state if "lora_A" in k)


def test_verify_passes_then_names_each_defect(adapter, tiny_llama, tiny_tok, tmp_path):
    assert not _failed(verify(adapter, base=str(tiny_llama)))
    assert {c.name for c in verify(adapter, base=str(tiny_llama))} >= {
        "sha256", "finite", "shapes", "safetensors only", "base fingerprint", "load + forward"}
    assert main(["verify", str(adapter)]) == 0

    def broken(name, change=None):
        shutil.copytree(adapter, tmp_path / name)
        if change:
            _rewrite(tmp_path / name, change)
        return tmp_path / name

    flipped = broken("flipped")
    data = bytearray((flipped / "adapter_model.safetensors").read_bytes())
    data[-7] ^= 0x01
    (flipped / "adapter_model.safetensors").write_bytes(bytes(data))
    assert _failed(verify(flipped)) == {"sha256"}
    assert main(["verify", str(flipped)]) == 1

    nan = broken("nan", lambda s: s[_lora_a(s)].view(-1).__setitem__(0, float("nan")))
    checks = verify(nan)
    assert _failed(checks) == {"finite"}
    assert _lora_a(load_file(nan / "adapter_model.safetensors")) in str(checks)

    def wider(s):
        k = _lora_a(s)
        s[k] = torch.zeros(s[k].shape[0] + 1, s[k].shape[1])
    assert _failed(verify(broken("shape", wider))) == {"shapes"}

    pickled = broken("pickle")
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    assert _failed(verify(pickled)) == {"safetensors only"}

    other = make_llama(tmp_path / "other", tiny_tok, seed=9)
    assert _failed(verify(adapter, base=str(other))) == {"base fingerprint"}
    assert main(["verify", str(adapter), "--base", str(other)]) == 1


@pytest.mark.parametrize("change,field", [
    (lambda m: {**m, "base": "x"}, "field 'base'"),
    (lambda m: {**m, "weights": "x"}, "field 'weights'"),
    (lambda m: [m], "must be a JSON object"),
])
def test_verify_refuses_a_manifest_of_the_wrong_shape(adapter, tmp_path, capsys, change, field):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    man = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(change(man)))
    checks = verify(bad)
    assert _failed(checks) == {"manifest"}
    detail = next(c.detail for c in checks if c.name == "manifest")
    assert f"{bad / 'manifest.json'}: " in detail and field in detail
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr()
    assert "NOT verified" in out.err and field in out.out
    with pytest.raises(AdapterFileError, match=f"manifest.json.*{field}"):
        pack(bad, tmp_path / "bad.zip")
    # An archive carrying such a manifest is refused when it is unpacked, too.
    with zipfile.ZipFile(tmp_path / "bad-manifest.zip", "w") as z:
        z.writestr("manifest.json", json.dumps(change(man)))
    with pytest.raises(AdapterFileError, match=f"bad-manifest.zip: manifest.json.*{field}"):
        resolve_adapter(tmp_path / "bad-manifest.zip")


def test_pack_round_trip_loads_in_plain_peft(adapter, tiny_llama, tmp_path):
    from peft import PeftModel

    archive = pack(adapter, tmp_path / "shared" / "a.zip")
    assert set(zipfile.ZipFile(archive).namelist()) == {
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "README.md"}
    unpacked = resolve_adapter(archive)
    assert unpacked != adapter and (unpacked / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors").read_bytes()
    base, tok = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    plain = _logits(PeftModel.from_pretrained(base, unpacked), tok)
    base2, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    ours = _logits(load_adapter(base2, archive, tokenizer=tok), tok)  # a zip where a folder goes
    base3, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    direct = _logits(load_adapter(base3, adapter, tokenizer=tok), tok)
    torch.testing.assert_close(plain, direct, atol=0, rtol=0)
    torch.testing.assert_close(ours, direct, atol=0, rtol=0)
    assert main(["verify", str(archive), "--base", str(tiny_llama)]) == 0
    assert main(["inspect", str(archive)]) == 0


def _zip(path, entries, manifest_bytes=1000):
    """A hand-made archive: `entries` maps ZipInfo-or-name -> bytes, plus a manifest."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps({"base": {"name": "x"}, "weights": {
            "file": "adapter_model.safetensors", "sha256": "0" * 64, "bytes": manifest_bytes}}))
        for info, data in entries.items():
            z.writestr(info, data)
    return path


def test_hostile_archives_are_refused(tmp_path):
    cases = {"escape": ({"../evil.json": b"{}"}, "outside"),
             "absolute": ({"/tmp/evil.json": b"{}"}, "outside")}
    link = zipfile.ZipInfo("adapter_config.json")
    link.external_attr = 0o120777 << 16  # a symbolic link entry pointing at /etc/passwd
    cases["link"] = ({link: b"/etc/passwd"}, "symbolic link")
    # 64 MiB of zeros deflate to ~64 KiB: far beyond the 1000 bytes the manifest states
    cases["bomb"] = ({"adapter_model.safetensors": bytes(64 << 20)}, "manifest says")
    for name, (entries, message) in cases.items():
        archive = _zip(tmp_path / f"{name}.zip", entries)
        with pytest.raises(AdapterFileError, match=message):
            resolve_adapter(archive)
        assert {c.name for c in verify(archive)} == {"archive"}
    assert not (tmp_path / "evil.json").exists()
    assert not list((tmp_path / "home").rglob("*.safetensors"))  # nothing was left unpacked


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_bin_gives_identical_logits_and_runs_no_code(adapter, tiny_llama, tmp_path):
    from peft import PeftModel

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(adapter / "adapter_config.json", old)
    torch.save(load_file(adapter / "adapter_model.safetensors"), old / "adapter_model.bin")
    base, tok = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    before = _logits(PeftModel.from_pretrained(base, old), tok)
    assert main(["convert", str(old), "--base", str(tiny_llama)]) == 0
    new = tmp_path / "old-safetensors"
    assert not (new / "adapter_model.bin").exists() and (old / "adapter_model.bin").exists()
    assert not _failed(verify(new, base=str(tiny_llama)))
    base2, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    torch.testing.assert_close(_logits(load_adapter(base2, new, tokenizer=tok), tok), before,
                               atol=0, rtol=0)
    assert json.loads((new / "manifest.json").read_text())["converted_from"]["file"] == (
        "adapter_model.bin")

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(adapter / "adapter_config.json", evil)
    payload = _Evil()
    payload.marker = tmp_path / "pwned"
    torch.save({"x": torch.zeros(2), "y": payload}, evil / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="refused"):
        convert(evil)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "evil-safetensors").exists()


class _Unauthorised(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = _deny

    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _push_and_pull_fail(adapter, dest, message: str, within_s: float) -> None:
    t0 = time.monotonic()
    with pytest.raises(HubError, match=message):
        push(adapter, "someone/adapter")
    with pytest.raises(HubError, match=message):
        pull("someone/adapter", dest)
    assert time.monotonic() - t0 < within_s


def test_push_and_pull_fail_fast_without_network(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        pull("someone/adapter", tmp_path / "p")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    _push_and_pull_fail(adapter, tmp_path / "p", "cannot reach", within_s=10)
    # A hub that answers every request with 401: what a bad or missing token gets.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest's, read
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorised)  # at import
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        _push_and_pull_fail(adapter, tmp_path / "p", "not authorised", within_s=30)
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        cli = subprocess.run([sys.executable, "-m", "adapters", "pull", "someone/adapter",
                              "--out", str(tmp_path / "p")], env=env, capture_output=True,
                             text=True, timeout=120)
        assert cli.returncode == 1 and "not authorised" in cli.stderr, cli.stderr
    finally:
        server.shutdown()
    assert not (tmp_path / "p").exists()


def test_a_pulled_adapter_is_verified_before_use(adapter, tmp_path):
    shutil.copytree(adapter, tmp_path / "download")
    accept_pulled(tmp_path / "download", "someone/adapter")  # intact: accepted
    data = bytearray((tmp_path / "download" / "adapter_model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "download" / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(HubError, match="fails verification.*sha256"):
        accept_pulled(tmp_path / "download", "someone/adapter")
