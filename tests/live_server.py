"""Helpers for tests that run the server for real: uvicorn on a free loopback port, plain
HTTP with the standard library, bounded waits, and holding the engine's worker on an event."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import uvicorn
from conftest import trained_adapter

from adapters.config import ModelConfig
from adapters.model import load_base
from adapters.serving.registry import Registry
from adapters.serving.server import create_app


def http(method: str, url: str, body: dict | None = None) -> tuple[int, str]:
    """A plain HTTP request with the standard library (for routes the openai client lacks)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body: str | bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST a raw body (not necessarily JSON) with the standard library; (status, JSON reply)."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sse(url: str, body: dict) -> list[str]:
    """The `data:` fields of a server-sent event stream, in order."""
    code, text = http("POST", url, body)
    assert code == 200, text
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """Poll `condition` until it is truthy (and return it); fail after a generous `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: still not true after {timeout} s"
        time.sleep(0.05)


def block(engine) -> tuple[threading.Event, threading.Event]:
    """Queue a call that keeps the engine's worker busy from when `started` is set until
    `release` is; returns (started, release) at once. Requests queued before it join the batch
    (and make their first token) before it runs."""
    started, release = threading.Event(), threading.Event()

    def wait():
        started.set()
        release.wait(120)

    engine.call(wait)
    return started, release


def hold(engine) -> threading.Event:
    """Keep the engine's worker busy until the returned event is set: requests sent meanwhile
    queue up (deterministically, whatever the machine's speed)."""
    started, release = block(engine)
    assert started.wait(60), "the engine's worker never picked up the blocking call"
    return release


class Running:
    """A real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="server start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def adapter_root(tmp_path_factory, model_path, n: int = 4):
    """A folder of `n` adapters a0..a{n-1} (different seeds) on the model at `model_path`."""
    root = tmp_path_factory.mktemp("adapter-root")
    for i in range(n):
        trained_adapter(model_path, root / f"a{i}", seed=i + 1)
    return root


def start(model_path, root, names=("a0", "a1", "a2", "a3"), capacity=8, **kw) -> Running:
    """A server over a fresh base with `names` loaded from `root` (its --adapter-root)."""
    model, tok = load_base(ModelConfig(name=str(model_path), dtype="fp32"))
    reg = Registry(model, tok, capacity=capacity)
    for n in names:
        reg.load(n, root / n)
    return Running(create_app(reg, adapter_root=root, **kw))
