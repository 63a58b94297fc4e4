"""llama.cpp itself, to run the GGUFs `adapters export` writes (share step: the export check).

The runtime is llama.cpp's prebuilt CPU build as npm ships it in `node-llama-cpp` (installed by
`scripts/setup` in seconds, no compiler): `llama_logits.mjs`, beside this file, loads a GGUF
(and a LoRA GGUF) there and returns the raw logits of every position of every prompt in one
pass per prompt. The Python binding (llama-cpp-python) has no prebuilt wheel and builds
llama.cpp from source for over half an hour on two cores, which is why it is not used here.

Where it lives: `$ADAPTERS_LLAMA_RUNTIME` (a folder holding `node_modules/node-llama-cpp`),
else `<venv>/llama-runtime`, where `scripts/setup` puts it; Node.js >= 20 on the PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .gguf_io import ExportError

PACKAGE = "node-llama-cpp"
VERSION = "3.22.1"  # the version scripts/llama-runtime/package-lock.json pins
SCRIPT = Path(__file__).with_name("llama_logits.mjs")
INSTALL_HINT = ("install llama.cpp's runtime: `scripts/setup` does (Node.js >= 20 and "
                f"`npm install {PACKAGE}@{VERSION}` into <venv>/llama-runtime, or a folder "
                "named by $ADAPTERS_LLAMA_RUNTIME), or pass --no-verify")


def runtime_dir() -> Path:
    """The folder whose node_modules holds node-llama-cpp (it may not exist)."""
    env = os.environ.get("ADAPTERS_LLAMA_RUNTIME")
    return Path(env) if env else Path(sys.prefix) / "llama-runtime"


def _package_json() -> Path:
    return runtime_dir() / "node_modules" / PACKAGE / "package.json"


def have_llama_cpp() -> bool:
    """True when Node.js and node-llama-cpp are both here (nothing is started)."""
    return shutil.which("node") is not None and _package_json().is_file()


def runtime_name() -> str:
    """What ran, for reports: the npm package and its version as installed."""
    pkg = _package_json()
    try:
        version = json.loads(pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        version = "?"
    return f"llama.cpp ({PACKAGE} {version})"


def _run(model: Path, prompts: list[list[int]], lora: Path | None, threads: int,
         timeout_s: float, greedy: int = 0) -> tuple[dict, Path, tempfile.TemporaryDirectory]:
    """Run llama_logits.mjs on a request; (its JSON line, the output file, its folder)."""
    if not have_llama_cpp():
        raise ExportError(f"llama.cpp is not installed: {INSTALL_HINT}")
    tmp = tempfile.TemporaryDirectory(prefix="adapters-llama-")
    out, request = Path(tmp.name) / "out", Path(tmp.name) / "request.json"
    request.write_text(json.dumps({
        "modules": str(runtime_dir() / "node_modules"), "model": str(model),
        "lora": None if lora is None else str(lora), "prompts": prompts,
        "threads": threads, "out": str(out), "greedy": greedy}))
    try:
        done = subprocess.run([shutil.which("node"), str(SCRIPT), str(request)],
                              capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        tmp.cleanup()
        raise ExportError(f"{lora or model}: llama.cpp did not answer within "
                          f"{timeout_s:.0f} s") from e
    if done.returncode != 0:
        tmp.cleanup()
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise ExportError(f"{lora or model}: llama.cpp refused to run it: " + " / ".join(tail))
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), out, tmp
    except (IndexError, ValueError):
        tmp.cleanup()
        raise ExportError(f"{lora or model}: llama.cpp's runtime answered nothing readable: "
                          f"{done.stdout.strip()[-200:]!r}") from None


def llama_cpp_logits(model: Path, prompts: list[list[int]], lora: Path | None = None,
                     threads: int = 2, timeout_s: float = 600) -> list[np.ndarray]:
    """Logits (T, V) for every position of each prompt, computed by llama.cpp.

    Each prompt is evaluated alone from an empty cache; `lora` is applied at scale 1 as
    llama.cpp's `--lora` does. Raises ExportError when the runtime is missing or refuses
    the files (its own message is kept).
    """
    info, out, tmp = _run(model, prompts, lora, threads, timeout_s)
    with tmp:
        flat = np.fromfile(out, dtype=np.float32).reshape(info["positions"], info["n_vocab"])
    split = np.cumsum([len(p) for p in prompts])[:-1]
    return np.split(flat, split)


def llama_cpp_greedy(model: Path, prompts: list[list[int]], new: int, lora: Path | None = None,
                     threads: int = 2, timeout_s: float = 900) -> list[list[int]]:
    """Each prompt's greedy continuation in llama.cpp (up to `new` tokens, EOS not included)."""
    _, out, tmp = _run(model, prompts, lora, threads, timeout_s, greedy=new)
    with tmp:
        return json.loads(out.read_text())
