"""Issue 22, the server: no bad input breaks it, fails someone else's request, escapes the
adapter root, hangs, or ends in a traceback. A real uvicorn on loopback, the official client
where it is the server, real adapter files (links, NaN weights, a base of another shape)."""

import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
from conftest import make_gpt2, trained_adapter
from live_server import hold, http, post, sse, start, wait_until

from adapters.config import BASE_NAME
from adapters.serving.server import Limits

PROMPTS = ["import os\n", "def f(x):", "class A:", "# comment"]


def poison(server, name: str) -> None:
    """NaN in the in-memory stacks of loaded adapter `name`: NaN files are refused at load
    (tests/test_hardening_outputs.py), so a row that fails while decoding is made here."""
    reg = server.server.config.app.state.service.registry
    slot = reg._slot[name]
    for layer in reg._slots.layers.values():
        layer.b[slot].fill_(float("nan"))
        layer.version = -1  # re-gathered on the next forward


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_gpt2, tiny_tok):
    root = tmp_path_factory.mktemp("adapter-root")
    for i in range(4):
        trained_adapter(tiny_gpt2, root / f"a{i}", seed=i + 1)
    shutil.copytree(root / "a3", root / "nan")  # made NaN once loaded (poison)
    # An adapter for a base of another width, without the manifest that would refuse it
    # early: peft wraps the layers, then fails on the first tensor of the wrong shape.
    other = make_gpt2(tmp_path_factory.mktemp("other-base"), tiny_tok, n_embd=32)
    trained_adapter(other, root / "wrong-shape", seed=3)
    (root / "wrong-shape" / "manifest.json").unlink()
    return root


@pytest.fixture(scope="module")
def server(tiny_gpt2, root):
    s = start(tiny_gpt2, root)
    yield s
    s.close()


def openai_error(reply: dict) -> dict:
    """The `error` of an OpenAI-shaped error reply, after checking the shape."""
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}, reply
    assert isinstance(err["message"], str) and "\n" not in err["message"]
    return err


def greedy(c, model, prompt, **kw) -> str:
    r = c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, **kw)
    return r.choices[0].text


# -- 1. one request never fails another ---------------------------------------------------------

@pytest.mark.parametrize("field", [
    '"temperature": NaN', '"temperature": Infinity', '"temperature": 1e400',
    '"top_p": NaN', '"top_p": 0', '"top_p": -1e-300', f'"seed": {2**64}', f'"seed": {-2**63 - 1}',
    '"max_tokens": 0', '"max_tokens": 1e300', f'"max_tokens": {10**40}', '"n": 0',
])
def test_bad_sampling_fields_are_400s_at_the_door(server, field):
    code, reply = post(server.url + "/v1/completions",
                       '{"model": "a0", "prompt": "x", ' + field + "}")
    assert code == 400, (field, reply)
    assert openai_error(reply)["param"] in field


def test_a_bad_request_never_fails_the_batch_it_shares(server):
    c = server.client()
    jobs = [(f"a{i % 4}", PROMPTS[i // 2 % 4]) for i in range(8)]
    alone = [greedy(c, m, p) for m, p in jobs]
    engine = server.server.config.app.state.engine
    before = len(engine.batches)
    release = hold(engine)
    with ThreadPoolExecutor(12) as pool:
        try:
            plain = [pool.submit(greedy, c, m, p) for m, p in jobs]
            # A temperature too small to divide by is greedy; a top_p that is 0 in fp32 keeps
            # the likeliest token; the largest seed and its n=2 successor (2**64 wraps to 0).
            tiny_t = pool.submit(c.completions.create, model="a0", prompt=PROMPTS[0],
                                 max_tokens=8, temperature=1e-40)
            tiny_p = pool.submit(c.completions.create, model="a1", prompt=PROMPTS[0],
                                 max_tokens=8, temperature=1.0, top_p=1e-300)
            seeds = pool.submit(c.completions.create, model="a2", prompt=PROMPTS[1],
                                max_tokens=8, temperature=0.8, seed=2**64 - 1, n=2)
            stream = pool.submit(sse, server.url + "/v1/completions", {
                "model": "a0", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1e-40,
                "stream": True})
            wait_until(lambda: engine.waiting() == len(jobs) + 4)
            # Refused at the door while the worker is held: they never reach the batch.
            with pytest.raises(openai.BadRequestError, match="seed"):
                c.completions.create(model="a0", prompt="x", max_tokens=2, seed=2**64)
        finally:
            release.set()
        assert [f.result() for f in plain] == alone
        events = stream.result()
    assert engine.batches[before:] == [len(jobs) + 5]  # all of them in one batch
    assert tiny_t.result().choices[0].text == greedy(c, "a0", PROMPTS[0])
    assert tiny_p.result().choices[0].text == greedy(c, "a1", PROMPTS[0])
    assert len(seeds.result().choices) == 2
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == \
        greedy(c, "a0", PROMPTS[0])


def test_a_row_that_fails_while_decoding_ends_alone(server):
    """An adapter whose weights go NaN in memory: the row fails inside the shared batch."""
    c = server.client()
    assert http("POST", server.url + "/v1/adapters", {"name": "nan", "path": "nan"})[0] == 200
    poison(server, "nan")
    try:
        alone = [greedy(c, f"a{i}", PROMPTS[i]) for i in range(4)]
        engine = server.server.config.app.state.engine
        before = len(engine.batches)
        release = hold(engine)
        with ThreadPoolExecutor(8) as pool:
            try:
                plain = [pool.submit(greedy, c, f"a{i}", PROMPTS[i]) for i in range(4)]
                whole = pool.submit(greedy, c, "nan", PROMPTS[0])
                raw = pool.submit(sse, server.url + "/v1/completions", {
                    "model": "nan", "prompt": PROMPTS[1], "max_tokens": 8, "stream": True})
                streamed = pool.submit(lambda: list(c.chat.completions.create(
                    model="nan", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                    temperature=0.7, stream=True)))
                mixed = pool.submit(lambda: list(c.completions.create(
                    model="a3", prompt=PROMPTS[3], max_tokens=8, temperature=0, stream=True)))
                wait_until(lambda: engine.waiting() == 8)
            finally:
                release.set()
            assert [f.result() for f in plain] == alone
            with pytest.raises(openai.InternalServerError, match="non-finite"):
                whole.result()
            with pytest.raises(openai.APIError, match="non-finite"):
                streamed.result()
            events = raw.result()
            assert "".join(ch.choices[0].text for ch in mixed.result()) == alone[3]
        assert engine.batches[before:] == [8]
        # the failed stream: an OpenAI error event, then [DONE] (a clean end, not a cut)
        assert events[-1] == "[DONE]"
        err = openai_error(json.loads(events[-2]))
        assert err["code"] == 500 and "non-finite" in err["message"]
        assert greedy(c, "a0", PROMPTS[0]) == alone[0]  # the server goes on as before
    finally:
        http("DELETE", server.url + "/v1/adapters/nan")


# -- 2. a failed load changes nothing -----------------------------------------------------------

def test_failed_loads_change_nothing(tiny_gpt2, root, server):
    s = start(tiny_gpt2, root, names=("a0", "a1"), capacity=2)
    try:
        c = s.client()
        before = {m: greedy(c, m, PROMPTS[0]) for m in ("a0", "a1")}

        def load(name, path):
            return http("POST", s.url + "/v1/adapters", {"name": name, "path": path})

        def unchanged():
            assert [m.id for m in c.models.list()] == [BASE_NAME, "a0", "a1"]
            assert {m: greedy(c, m, PROMPTS[0]) for m in ("a0", "a1")} == before

        for name, path in [("x", "missing"), ("a0", "."), ("a1", "missing"),
                           ("x", "wrong-shape"), ("a1", "wrong-shape"), (".", "a2"),
                           ("..", "a2"), ("-x", "a2"), ("a/b", "a2")]:
            code, text = load(name, path)  # full capacity: nothing may be evicted for these
            assert code == 400, (name, path, text)
            openai_error(json.loads(text))
            unchanged()
        # A dotted name works (peft refuses "." in its own names: ours are mapped).
        code, text = load("v1.2", "a2")
        assert code == 200 and json.loads(text)["evicted"] == ["a0"], text
        assert greedy(c, "v1.2", PROMPTS[0]) == greedy(server.client(), "a2", PROMPTS[0])
        assert http("DELETE", s.url + "/v1/adapters/v1.2")[0] == 200
        code, text = load("a0", "a0")  # later loads still work
        assert code == 200 and json.loads(text)["evicted"] == []
        assert greedy(c, "a0", PROMPTS[0]) == before["a0"]
    finally:
        s.close()


# -- 3. the root is a real boundary; 4. paths the OS rejects are 400s --------------------------

def test_every_file_read_must_resolve_inside_the_root(server, root, tmp_path):
    outside = tmp_path / "outside"
    trained_adapter(server.server.config.app.state.engine.reg.base().name_or_path, outside,
                    seed=9)
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
        inner = root / f"link-{name.split('.')[0]}"
        shutil.copytree(outside, inner)
        (inner / name).unlink()
        (inner / name).symlink_to(outside / name)  # otherwise a valid adapter
        code, text = http("POST", server.url + "/v1/adapters",
                          {"name": "evil", "path": inner.name})
        assert code == 403 and "outside the adapter root" in text, (name, text)
        assert openai_error(json.loads(text))["param"] == "path"
    assert "evil" not in [m.id for m in server.client().models.list()]
    # a link that stays inside the root is fine
    inner = root / "link-inside"
    inner.mkdir()
    for f in (root / "a3").iterdir():
        (inner / f.name).symlink_to(f)
    code, text = http("POST", server.url + "/v1/adapters", {"name": "inside", "path": inner.name})
    assert code == 200, text
    assert http("DELETE", server.url + "/v1/adapters/inside")[0] == 200


def test_a_link_swapped_in_after_the_check_is_not_followed(server, root, tmp_path,
                                                           monkeypatch):
    """The race the path check alone leaves open: the folder is checked, then a file of it is
    swapped for a link to outside before peft would open it. What is loaded is a copy made
    from what was opened (rootfs.snapshot): the swap is refused, and once loaded, swapping the
    card for a link to a secret shows the page the loaded card, not the secret."""
    from adapters.serving import server as srv

    outside = tmp_path / "outside"
    trained_adapter(server.server.config.app.state.engine.reg.base().name_or_path, outside,
                    seed=11)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for clients")
    inner = root / "swapped"
    shutil.copytree(root / "a3", inner)
    checked = srv.inside_root

    def check_then_swap(r, path):
        target = checked(r, path)  # the check passes on the honest folder ...
        (inner / "adapter_model.safetensors").unlink()  # ... then the swap
        (inner / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
        return target

    monkeypatch.setattr(srv, "inside_root", check_then_swap)
    code, text = http("POST", server.url + "/v1/adapters", {"name": "swap", "path": "swapped"})
    assert code == 403 and "outside the adapter root" in text, text
    assert "swap" not in [m.id for m in server.client().models.list()]
    monkeypatch.setattr(srv, "inside_root", checked)

    shutil.rmtree(inner)
    shutil.copytree(root / "a3", inner)
    card = (inner / "README.md").read_text()
    code, text = http("POST", server.url + "/v1/adapters", {"name": "swap", "path": "swapped"})
    assert code == 200, text
    (inner / "README.md").unlink()
    (inner / "README.md").symlink_to(secret)
    code, text = http("GET", server.url + "/ui/api/card?model=swap")
    assert code == 200 and json.loads(text)["card"] == card and "not for clients" not in text
    copies = server.server.config.app.state.service.copies.path
    assert len(list(copies.iterdir())) == 1  # the refused load's copy is gone
    assert http("DELETE", server.url + "/v1/adapters/swap")[0] == 200
    assert list(copies.iterdir()) == []  # and an unloaded adapter's copy too


def test_what_was_opened_is_checked_not_the_name(root, tmp_path, monkeypatch):
    """A link that points outside while the file is opened and back inside by the time a name
    could be re-checked: the open descriptor's real path is what counts (rootfs)."""
    from adapters.serving import rootfs

    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    inner = tmp_path / "root" / "ad"
    inner.mkdir(parents=True)
    honest = inner / "honest.json"
    honest.write_text("{}")
    (inner / "adapter_config.json").symlink_to(outside)

    class SwapBackAfterOpen:  # os, with a link swapped back right after each open
        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, *a, **k):
            fd = os.open(path, *a, **k)
            (inner / "adapter_config.json").unlink()
            (inner / "adapter_config.json").symlink_to(honest)
            return fd

    monkeypatch.setattr(rootfs, "os", SwapBackAfterOpen())
    with pytest.raises(rootfs.ApiError) as e:
        rootfs.snapshot(tmp_path / "root", inner, tmp_path / "copy", "ad")
    assert e.value.status == 403 and not (tmp_path / "copy").exists()


def test_a_full_queue_refuses_a_load_before_copying_it(tiny_gpt2, root, monkeypatch):
    """With no room in the queue a load is a 429 at once, and no file of it is copied."""
    from adapters.serving import rootfs

    def no_copy(*a, **k):
        raise AssertionError("copied although the queue is full")

    monkeypatch.setattr(rootfs, "snapshot", no_copy)
    s = start(tiny_gpt2, root, names=(), max_queue=0)
    try:
        code, text = http("POST", s.url + "/v1/adapters", {"name": "x", "path": "a0"})
        assert code == 429 and "busy" in text, text
        assert list(s.server.config.app.state.service.copies.path.iterdir()) == []
    finally:
        s.close()


def test_concurrent_loads_keep_each_others_copies(server):
    """Loads copy on threads of their own while the engine sweeps unused copies: four at once
    all load, and unloading them leaves no copy behind."""
    names = [f"c{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda n: http("POST", server.url + "/v1/adapters",
                                                {"name": n, "path": f"a{n[1]}"}), names))
    assert [code for code, _ in replies] == [200] * 4, replies
    for n in names:
        assert http("DELETE", server.url + f"/v1/adapters/{n}")[0] == 200
    assert list(server.server.config.app.state.service.copies.path.iterdir()) == []


@pytest.mark.parametrize("body", [
    {"name": "x", "path": "a\x00b"}, {"name": "x", "path": "x" * 5000},
    {"name": "x", "path": "y" * 300}, {"name": "x", "path": "a0/" + "z" * 300 + "/w"},
    {"name": "n" * 300, "path": "a0"}, {"name": "x\x00", "path": "a0"}, {"name": "x", "path": ""},
])
def test_paths_and_names_the_os_rejects_are_400s(server, body):
    code, text = http("POST", server.url + "/v1/adapters", body)
    assert code == 400, text
    err = openai_error(json.loads(text))
    assert err["param"] in ("path", "name") and len(err["message"]) < 400


# -- 5. everything behind --api-key ------------------------------------------------------------

def test_api_key_covers_the_docs_and_comes_before_the_body(tiny_gpt2, root):
    s = start(tiny_gpt2, root, names=("a0",), api_key="sekret")
    try:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/nowhere"):
            code, text = http("GET", s.url + path)
            assert code == 401 and openai_error(json.loads(text))["type"] == \
                "authentication_error", path
        code, reply = post(s.url + "/v1/completions", "{not json", {})
        assert code == 401, reply  # the key first: the body is never parsed
        with socket.create_connection(_addr(s.url), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1073741824\r\n\r\n")  # and no body at all
            assert _response(sock)[0] == 401
        req = urllib_get(s.url + "/openapi.json", "sekret")
        assert "/v1/completions" in json.loads(req)["paths"]
        assert [m.id for m in s.client("sekret").models.list()] == [BASE_NAME, "a0"]
    finally:
        s.close()


def urllib_get(url: str, key: str) -> str:
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


# -- 6. bounded work per request ---------------------------------------------------------------

def test_stop_strings_n_and_prompts_are_bounded(server):
    c = server.client()
    engine = server.server.config.app.state.engine
    release = hold(engine)  # refused at the door: none of these may need the model's thread
    try:
        for stop, match in [(["ab"] * 10_000, "at most 16"), (["x" * 257], "at most 256")]:
            with pytest.raises(openai.BadRequestError, match=match):
                c.completions.create(model="a0", prompt="x", max_tokens=4, stop=stop)
        assert engine.waiting() == 0  # nothing was queued for it
    finally:
        release.set()
    ok = c.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                              stop=[f"{i:03d}" + "q" * 252 for i in range(16)])
    assert ok.choices[0].text == greedy(c, "a0", PROMPTS[0])  # no stop matched: same answer
    with pytest.raises(openai.BadRequestError, match="batch of 16"):
        c.completions.create(model="a0", prompt=["x"] * 9, n=2, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="batch of 16"):
        c.completions.create(model="a0", prompt="x", n=17, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="a0", prompt="x", max_tokens=0)
    # a 1 MB prompt for a 256-token context is refused before it is tokenized
    reg, encoded = engine.reg, []
    reg.encode = lambda prompt, chat=False, encode=reg.encode: encoded.append(prompt) or \
        encode(prompt, chat=chat)
    try:
        with pytest.raises(openai.BadRequestError, match="1000000 characters"):
            c.completions.create(model="a0", prompt="y" * 1_000_000, max_tokens=2)
    finally:
        del reg.encode  # the registry's own method again
    assert encoded == []
    with pytest.raises(openai.BadRequestError, match="context of 256 tokens"):
        c.completions.create(model="a0", prompt="y " * 300, max_tokens=2)  # near: tokenized


def test_batches_never_pass_max_batch(server):
    c = server.client()
    engine = server.server.config.app.state.engine
    before = len(engine.batches)
    release = hold(engine)
    with ThreadPoolExecutor(2) as pool:
        try:
            futures = [pool.submit(c.completions.create, model="a0", prompt=["x"] * 10,
                                   max_tokens=2) for _ in range(2)]
            wait_until(lambda: engine.waiting() == 2)
        finally:
            release.set()
        assert all(len(f.result().choices) == 10 for f in futures)
    assert engine.batches[before:] == [10, 10]  # not one batch of 20 past --max-batch 16


def _addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _response(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP/1.1 response (with a Content-Length) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without answering"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def test_large_bodies_are_refused_without_blocking_the_server(tiny_gpt2, root):
    s = start(tiny_gpt2, root, names=("a0",), limits=Limits(64, context=256,
                                                             max_body_bytes=64 << 10))
    try:
        addr = _addr(s.url)
        with socket.create_connection(addr, timeout=60) as sock:  # says 1 GiB, sends nothing
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n")
            code, reply = _response(sock)
        assert code == 413 and "65536 bytes" in openai_error(reply)["message"]
        with socket.create_connection(addr, timeout=60) as sock:  # chunked: no length given
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"x" * 16384
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            # half-way through an upload, the event loop still serves everyone else
            assert [m.id for m in s.client().models.list()] == [BASE_NAME, "a0"]
            for _ in range(4):  # now past 64 KiB: refused while the client is still sending
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            code, reply = _response(sock)
        assert code == 413 and openai_error(reply)["param"] == "body"
        big = s.client().completions.create  # the official client gets a clear status error
        with pytest.raises(openai.APIStatusError) as e:
            big(model="a0", prompt="y" * (100 << 10), max_tokens=2)
        assert e.value.status_code == 413
    finally:
        s.close()


@pytest.mark.parametrize("body", [
    "{not json", "[" * 100_000 + "]" * 100_000, '["a list"]', b"\xff\xfe{}", "",
    '{"model": "a0", "prompt": {"nested": 1}}', '{"model": "a0", "prompt": []}',
    '{"model": "a0", "prompt": "x", "stop": [1, 2]}', '{"model": "' + "m" * 100_000 + '", '
    '"prompt": "x"}',
])
def test_unparsable_bodies_get_the_openai_error_shape(server, body):
    code, reply = post(server.url + "/v1/completions", body)
    assert code in (400, 404), reply
    assert len(openai_error(reply)["message"]) < 400  # never the whole body echoed back


def test_unknown_routes_and_methods_use_the_same_shape(server):
    code, text = http("GET", server.url + "/v1/nowhere")
    assert code == 404 and openai_error(json.loads(text))["type"] == "not_found_error"
    code, text = http("GET", server.url + "/v1/completions")
    assert code == 405 and openai_error(json.loads(text))
