"""Issue 19: continuous batching and fast adapter swaps. Requests join a running batch between
two decode steps and leave when done; every row still gets its alone-greedy tokens. Real
engine threads, a real uvicorn on loopback and the official client; the engine is held on an
event (never a timing window) wherever an order must be certain."""

import http.client as httpc
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
from conftest import trained_adapter
from live_server import Running, adapter_root, block, hold, http, wait_until

from adapters.adapter import build_manifest, save_adapter
from adapters.config import LoraConfig, ModelConfig
from adapters.generation.decode import Request, Sampling
from adapters.lora import attach_lora
from adapters.model import load_base
from adapters.serving.engine import Engine
from adapters.serving.registry import Registry
from adapters.serving.server import create_app

PROMPTS = ["import os\n", "def f(x):", "class A:", "# comment"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_gpt2):
    return adapter_root(tmp_path_factory, tiny_gpt2)


def registry(path, folders) -> Registry:
    model, tok = load_base(ModelConfig(name=str(path), dtype="fp32"))
    reg = Registry(model, tok, capacity=8)
    for i, f in enumerate(folders):
        reg.load(f"a{i}", f)
    return reg


def start(tiny_gpt2, root, **kw) -> Running:
    reg = registry(tiny_gpt2, [root / f"a{i}" for i in range(4)])
    return Running(create_app(reg, adapter_root=root, **kw))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_joining_mid_decode_get_their_alone_greedy_tokens(arch, tiny_gpt2, tiny_llama,
                                                                tmp_path):
    path = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
    for i in range(3):
        trained_adapter(path, tmp_path / f"a{i}", seed=i + 1)
    reg = registry(path, [tmp_path / f"a{i}" for i in range(3)])
    # prompts of different lengths, so every join pads the batch's cache or the newcomer's
    jobs = [(PROMPTS[0] * 3, "a0", 60), (PROMPTS[1], "a1", 8), (PROMPTS[2] * 5, None, 12),
            (PROMPTS[3], "a2", 5), (PROMPTS[1] * 2, "a0", 9)]
    reqs = [Request(reg.encode(p), a, Sampling(n, ignore_eos=True)) for p, a, n in jobs]
    alone = [reg.run([r])[0].token_ids for r in reqs]
    engine = Engine(reg, max_batch=8)
    try:
        outs = []
        for r in reqs:  # each joins once the one before has made its first token
            first = threading.Event()
            r.on_text = lambda _, first=first: first.set()
            outs.append(engine.submit([r]))
            assert first.wait(60), "no token within 60 s"
        results = [f.result(timeout=120)[0] for f in outs]
    finally:
        engine.close()
    assert [o.token_ids for o in results] == alone
    assert engine.batches == [1] * len(jobs)  # each joined the running batch on its own
    assert outs[0].done() and all(len(o.token_ids) == n for o, (_, _, n) in zip(results, jobs))


def _stream_until_first_chunk(url: str, body: dict) -> httpc.HTTPConnection:
    """Start a streamed completion and return once its first text arrived (mid-decode)."""
    parts = urlsplit(url)
    conn = httpc.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    line = resp.readline()  # the first event: its text, or the role for chat
    assert line.startswith(b"data: {"), line
    conn.resp, conn.first = resp, line.decode()
    return conn


def test_a_short_request_sent_mid_decode_finishes_first(tiny_gpt2, root):
    s = start(tiny_gpt2, root)
    try:
        c, engine = s.client(), s.server.config.app.state.engine
        long = {"model": "a0", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                "ignore_eos": True}
        shorts = [(f"a{i}", PROMPTS[i]) for i in range(1, 4)]

        def ask(m, p):
            return c.completions.create(model=m, prompt=p, max_tokens=6,
                                        temperature=0).choices[0].text

        alone = [ask(m, p) for m, p in shorts]
        alone_long = c.completions.create(**{k: v for k, v in long.items() if k != "ignore_eos"},
                                          extra_body={"ignore_eos": True}).choices[0].text
        conn = _stream_until_first_chunk(s.url, long)  # the long one is decoding now
        before = len(engine.batches)
        with ThreadPoolExecutor(3) as pool:
            release = hold(engine)  # between two of its steps: the shorts queue up meanwhile
            try:
                futures = [pool.submit(ask, m, p) for m, p in shorts]
                wait_until(lambda: engine.waiting() == 3)
                assert len(engine.running()) == 1
            finally:
                release.set()
            texts = [f.result() for f in futures]
            still_running = [r.sampling.max_new_tokens for r in engine.running()]
        events = [conn.first.strip(), *conn.resp.read().decode().splitlines()]
        conn.close()
        assert texts == alone
        assert still_running == [200]  # the shorts ended while the long one decoded
        assert engine.batches[before:] == [3]  # they joined the running batch together
        pieces = [json.loads(e[6:])["choices"][0]["text"] for e in events
                  if e.startswith("data: {")]
        assert "".join(pieces) == alone_long  # and the long one's tokens are its own too
    finally:
        s.close()


def test_a_client_that_goes_away_mid_stream_frees_its_row(tiny_gpt2, root):
    s = start(tiny_gpt2, root)
    try:
        engine = s.server.config.app.state.engine
        conn = _stream_until_first_chunk(s.url, {"model": "a1", "prompt": PROMPTS[0],
                                                 "max_tokens": 240, "ignore_eos": True})
        release = hold(engine)  # the row stays mid-decode while the client leaves
        try:
            assert [r.adapter for r in engine.running()] == ["a1"]
            conn.sock.close()
            conn.close()
            wait_until(lambda: all(r.cancelled for r in engine.running()))
        finally:
            release.set()
        wait_until(lambda: not engine.running())
        assert engine.cancelled == 1
        # the adapter is no longer in use: it unloads (a row still running would make it 409)
        assert http("DELETE", s.url + "/v1/adapters/a1")[0] == 200
        r = s.client().completions.create(model="a0", prompt="x", max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        s.close()


def test_a_client_that_goes_away_before_a_plain_reply_frees_its_row(tiny_gpt2, root):
    """Not streamed: nothing is written to the client until the end, so the server watches for
    the disconnect itself; the row leaves long before its max_tokens."""
    s = start(tiny_gpt2, root)
    try:
        engine = s.server.config.app.state.engine
        before = engine.generated
        parts = urlsplit(s.url)
        conn = httpc.HTTPConnection(parts.hostname, parts.port, timeout=60)
        release = hold(engine)
        try:
            conn.request("POST", "/v1/completions", json.dumps({
                "model": "a1", "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True}),
                {"Content-Type": "application/json"})
            wait_until(lambda: engine.waiting() == 1)
            joined, frozen = block(engine)  # runs once the request joined: its first token
        finally:
            release.set()
        try:
            assert joined.wait(60), "the engine never reached the second hold"
            assert [r.adapter for r in engine.running()] == ["a1"]  # mid-decode
            conn.sock.close()
            conn.close()
            wait_until(lambda: all(r.cancelled for r in engine.running()), what="cancelled")
        finally:
            frozen.set()
        wait_until(lambda: not engine.running(), what="the row left")
        assert engine.cancelled == 1
        assert engine.generated - before < 10  # of the 240 it would have made
        assert http("DELETE", s.url + "/v1/adapters/a1")[0] == 200  # no longer in use
        r = s.client().completions.create(model="a0", prompt="x", max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        s.close()


def test_requests_for_an_adapter_being_unloaded(tiny_gpt2, root):
    s = start(tiny_gpt2, root, max_batch=1)
    try:
        c, engine = s.client(), s.server.config.app.state.engine
        conn = _stream_until_first_chunk(s.url, {"model": "a0", "prompt": PROMPTS[0],
                                                 "max_tokens": 200, "ignore_eos": True})
        with ThreadPoolExecutor(1) as pool:
            release = hold(engine)
            try:  # the one row is taken: this request waits for room ...
                waiting = pool.submit(c.completions.create, model="a2", prompt="x", max_tokens=3)
                wait_until(lambda: engine.waiting() == 1)
            finally:
                release.set()
            # ... while a2 is unloaded (loads and unloads never wait for room), and the
            # adapter the running row uses cannot be: it is in use
            assert http("DELETE", s.url + "/v1/adapters/a2")[0] == 200
            code, text = http("DELETE", s.url + "/v1/adapters/a0")
            assert code == 409 and "in use" in text
            conn.resp.read()
            conn.close()
            with pytest.raises(openai.NotFoundError, match="a2.*unloaded"):
                waiting.result()
    finally:
        s.close()


def test_a_full_kv_budget_queues_then_refuses(tiny_gpt2, root):
    s = start(tiny_gpt2, root, max_kv_tokens=64, max_queue=2)
    try:
        c, engine = s.client(), s.server.config.app.state.engine

        def ask(n):
            r = c.completions.create(model="a0", prompt="x", max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True})
            return r.choices[0].text

        alone = [ask(40), ask(30)]
        with pytest.raises(openai.BadRequestError, match="--max-kv-tokens"):
            ask(70)  # could never fit: refused at the door
        before = len(engine.batches)
        with ThreadPoolExecutor(2) as pool:
            release = hold(engine)
            try:
                futures = [pool.submit(ask, 40), pool.submit(ask, 30)]
                wait_until(lambda: engine.waiting() == 2)
                with pytest.raises(openai.RateLimitError):
                    ask(5)  # the wait list is full
            finally:
                release.set()
            assert [f.result() for f in futures] == alone
        # 2 rows x 41 tokens would pass the budget of 64: the second waited for the first
        assert engine.batches[before:] == [1, 1]
    finally:
        s.close()


def test_loads_and_unloads_are_fast_after_the_first(tiny_gpt2, root):
    reg = registry(tiny_gpt2, [])
    reg.load("first", root / "a0")  # computes the base's fingerprint once
    for i in range(4):
        reg.load(f"x{i}", root / f"a{i}")
    assert reg.peft_name("x0") is None  # batched stacks, no peft layers built
    ours = reg.generate(PROMPTS, ["x1", "x2", None, "x3"], max_new_tokens=6)
    reg.unload("x2")
    reg.load("x2", root / "a2")  # into the freed slot: the same answers
    assert reg.generate(PROMPTS, ["x1", "x2", None, "x3"], max_new_tokens=6) == ours


def test_a_fault_outside_one_row_fails_the_running_jobs_never_the_worker(tiny_gpt2, root):
    """An exception outside a row's own decode (as an out-of-memory while merging caches would
    raise) ends the jobs running then with an error; the worker goes on serving."""
    reg = registry(tiny_gpt2, [root / "a0"])
    alone = reg.run([Request(reg.encode(PROMPTS[0]), "a0", Sampling(4))])[0].token_ids
    engine = Engine(reg, max_batch=4)  # from here on only the engine's thread uses the model
    try:
        broken = reg.batch()

        def fail_once():
            raise RuntimeError("out of memory (injected)")

        broken.step = fail_once
        engine._batch = broken  # the next step raises
        first = engine.submit([Request(reg.encode(PROMPTS[0]), "a0", Sampling(4))])
        with pytest.raises(RuntimeError, match="generation failed: out of memory"):
            first.result(timeout=120)
        again = engine.submit([Request(reg.encode(PROMPTS[0]), "a0", Sampling(4))])
        assert again.result(timeout=120)[0].token_ids == alone
        # nothing is left marked in use by the failed job: the adapter unloads
        engine.call(lambda: reg.unload("a0")).result(timeout=120)
        assert reg.names() == []
    finally:
        engine.close()


def test_a_high_rank_adapter_leaves_no_lasting_width_once_unloaded(tiny_gpt2, root, tmp_path):
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    pm = attach_lora(model, LoraConfig(r=32))
    save_adapter(pm, tmp_path / "wide", build_manifest(pm.get_base_model(), tok, str(tiny_gpt2),
                                                       ModelConfig(name=str(tiny_gpt2)),
                                                       LoraConfig(r=32)))
    reg = registry(tiny_gpt2, [root / "a0"])
    ours = reg.generate(PROMPTS, ["a0", None, "a0", None], max_new_tokens=6)
    widths = lambda: {layer.a.shape[1] for layer in reg._slots.layers.values()}  # noqa: E731
    assert widths() == {4}
    reg.load("wide", tmp_path / "wide")
    assert widths() == {32}
    reg.unload("wide")
    assert widths() == {4}  # back to the largest rank still loaded
    assert reg.generate(PROMPTS, ["a0", None, "a0", None], max_new_tokens=6) == ours
