"""The real `adapters` CLI in a child process, parked at a chosen point (tests of kill -9,
SIGINT and resume)."""

import queue
import subprocess
import sys
import threading
import time

# The real CLI in a child process, with one hook: at a chosen point the child prints "parked"
# and blocks reading stdin, so the test acts (kill -9, SIGINT) at exactly that point, with no
# timing window. `after-step N`: after optimiser step N; `checkpoint-write N`: inside the N-th
# checkpoint's temporary folder, adapter and optimiser written, state.json not yet.
PARKED = """
import sys
import adapters.training.checkpoint as ckpt
import adapters.training.trainer as trainer
from adapters.cli import main

where, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def park():
    print("parked", flush=True)
    sys.stdin.readline()

def rng_state(real=ckpt.rng_state):
    calls[0] += 1
    if calls[0] == n:
        park()
    return real()

def step(run, real=trainer.step):
    m = real(run)
    if run.step == n:
        park()
    return m

if where == "checkpoint-write":
    ckpt.rng_state = rng_state
else:
    trainer.step = step
sys.exit(main(sys.argv[3:]))
"""


def start_parked(where, n, recipe_path, log):
    """The CLI training `recipe_path`, parked at (where, n); returns once it is parked."""
    with open(log, "w") as err:  # the child keeps its own copy of the file
        proc = subprocess.Popen([sys.executable, "-c", PARKED, where, str(n), "train",
                                 str(recipe_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put("")],
                     daemon=True).start()  # drains stdout to the end
    deadline = time.monotonic() + 240
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"not parked after 240 s: {log.read_text()[-2000:]}") from None
        if line.strip() == "parked":
            return proc
        if line == "":
            proc.wait(timeout=60)
            raise AssertionError(f"exit {proc.returncode} before parking: "
                                 f"{log.read_text()[-2000:]}")
