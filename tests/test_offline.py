"""No network at run time: a 4-bit training run with every connection refused tries none.

The run is the real CLI in a fresh interpreter (so bitsandbytes, peft and transformers are
imported there for the first time, as on a user's machine), with an audit hook installed
before anything else that records and refuses every DNS lookup and connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import qa_csv

PROBE = """
import json, sys
attempts = []
NET = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto")

def refuse(event, args):
    if event in NET:
        attempts.append([event, repr(args)[:200]])
        raise OSError(f"network refused by the test: {event}")

sys.addaudithook(refuse)
from adapters.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print("ATTEMPTS " + json.dumps(attempts))
sys.exit(code)
"""


def _run(argv: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, list]:
    # As on a user's machine: none of the offline switches the rest of the suite sets.
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(ADAPTERS_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                          text=True, timeout=600, env=env)
    line = [x for x in done.stdout.splitlines() if x.startswith("ATTEMPTS ")]
    assert line, done.stdout + done.stderr
    return done, json.loads(line[-1].removeprefix("ATTEMPTS "))


def test_the_probe_sees_a_connection_attempt(tmp_path):
    """The hook does catch a real attempt (else the test below could not fail)."""
    probe = PROBE.replace("from adapters.cli import main",
                          "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9))\n"
                          "except OSError:\n    pass\nfrom adapters.cli import main")
    done = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True,
                          text=True, timeout=120)
    attempts = json.loads(done.stdout.splitlines()[-1].removeprefix("ATTEMPTS "))
    assert attempts and attempts[0][0] in ("socket.getaddrinfo", "socket.connect")


def test_a_quantized_cpu_training_run_tries_no_connection(tiny_llama, tmp_path):
    data = qa_csv(tmp_path / "qa.csv", 8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_llama}, quantization: 4bit}}\n"
                      f"data: {{train: {data}, max_seq_len: 64}}\n"
                      "train: {steps: 2, batch_size: 2}\n"
                      f"output: {{dir: {tmp_path / 'out'}}}\n")
    done, attempts = _run(["train", str(recipe)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert attempts == [], attempts
    assert "kernels-community" not in done.stderr  # bitsandbytes' hub kernel was not asked for
