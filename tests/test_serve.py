"""The OpenAI-compatible server, for real: uvicorn on a loopback port, the official client."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import trained_adapter
from live_server import adapter_root, hold, http, sse, start, wait_until

from adapters.config import BASE_NAME
from adapters.serving.server import Limits

PROMPTS = ["import os\n", "def f(x):", "class A:", "# comment"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_gpt2):
    return adapter_root(tmp_path_factory, tiny_gpt2)


@pytest.fixture(scope="module")
def server(tiny_gpt2, root):
    s = start(tiny_gpt2, root)
    yield s
    s.close()


def test_models_completion_chat_and_streaming(server):
    c = server.client()
    assert [m.id for m in c.models.list()] == [BASE_NAME, "a0", "a1", "a2", "a3"]
    r = c.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    base = c.completions.create(model=BASE_NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert base.choices[0].text != r.choices[0].text  # the adapter changes the answer
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="a1", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == r.choices[0].text

    msgs = [{"role": "user", "content": "What is os.path?"}]
    chat = c.chat.completions.create(model="a2", messages=msgs, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    chunks = list(c.chat.completions.create(model="a2", messages=msgs, max_tokens=8,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
        chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    # stream_options.include_usage: a last chunk, no choices, with the same counts (openai)
    with_usage = list(c.chat.completions.create(
        model="a2", messages=msgs, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.model_dump() == {
        **chat.usage.model_dump(), "completion_tokens_details": None,
        "prompt_tokens_details": None}
    assert all(ch.usage is None for ch in with_usage[:-1])


def test_concurrent_requests_over_four_adapters_get_their_own_tokens(server):
    c = server.client()
    jobs = [(f"a{i % 4}", PROMPTS[i // 4]) for i in range(16)]

    def ask(job):
        r = c.completions.create(model=job[0], prompt=job[1], max_tokens=10, temperature=0)
        return r.choices[0].text

    alone = [ask(j) for j in jobs]
    assert len(set(alone[:4])) == 4  # the four adapters answer the same prompt differently
    engine = server.server.config.app.state.engine
    before = len(engine.batches)
    release = hold(engine)
    with ThreadPoolExecutor(len(jobs)) as pool:
        try:
            futures = [pool.submit(ask, j) for j in jobs]
            wait_until(lambda: engine.waiting() == len(jobs))  # all queued behind the hold
        finally:
            release.set()
        together = [f.result() for f in futures]
    assert together == alone
    assert engine.batches[before:] == [len(jobs)]  # one mixed batch over the four adapters


def test_unknown_model_and_over_limit_requests(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="512"):
        c.completions.create(model="a0", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="context of 256 tokens"):
        c.completions.create(model="a0", prompt="x " * 300, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="a0", prompt="x", max_tokens=2, temperature=7)
    # curl -d without a JSON content type: say what the body must be
    req = urllib.request.Request(server.url + "/v1/adapters", data=b'{"name": "x", "path": "y"}',
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "Content-Type: application/json" in e.value.read().decode()


def test_hot_load_is_confined_to_the_adapter_root(server, root, tmp_path):
    def post(body):
        return http("POST", server.url + "/v1/adapters", body)

    outside = tmp_path / "outside"
    trained_adapter(server.server.config.app.state.engine.reg.base()
                     .name_or_path, outside, seed=9)
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    for path in ["../outside", str(outside), "link-out", "a0/../../outside"]:
        code, text = post({"name": "evil", "path": path})
        assert code == 403 and "outside the adapter root" in text, path
    code, text = post({"name": "hot", "path": "a3"})
    assert code == 200, text
    c = server.client()
    hot = c.completions.create(model="hot", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    a3 = c.completions.create(model="a3", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert hot.choices[0].text == a3.choices[0].text
    assert http("DELETE", server.url + "/v1/adapters/hot")[0] == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="hot", prompt="x", max_tokens=2)
    assert http("DELETE", server.url + "/v1/adapters/hot")[0] == 404
    code, text = post({"name": "bad", "path": "."})  # no adapter files there
    assert code == 400 and "adapter" in json.loads(text)["error"]["message"]


def test_replies_name_models_never_where_their_files_lie(server, root, tmp_path_factory):
    where = {str(root), str(root.resolve()), str(tmp_path_factory.getbasetemp().resolve())}
    replies = [http("GET", server.url + "/v1/models")[1]]
    loaded = http("POST", server.url + "/v1/adapters", {"name": "where", "path": "a3"})
    replies += [loaded[1], http("GET", server.url + "/v1/models")[1]]
    assert loaded[0] == 200 and json.loads(loaded[1])["root"] == "a3"  # relative to the root
    models = json.loads(replies[-1])["data"]
    assert [m["root"] for m in models] == [m["id"] for m in models]
    assert {m["parent"] for m in models[1:]} == {BASE_NAME}
    # failed loads: the message names the folder as the client did, relative to the root
    (root / "empty").mkdir(exist_ok=True)
    for path in (".", "empty", str(root / "empty"), "a0/adapter_config.json"):
        code, text = http("POST", server.url + "/v1/adapters", {"name": "x", "path": path})
        assert code == 400 and json.loads(text)["error"]["message"], text
        replies.append(text)
    replies += [http("DELETE", server.url + "/v1/adapters/where")[1],
                http("GET", server.url + "/ui/api/info")[1],
                http("GET", server.url + "/ui/api/runs")[1]]
    leaks = [r for r in replies if any(w in r for w in where)]
    assert not leaks, leaks


def test_tokenizing_never_holds_the_event_loop(server):
    """A prompt being tokenized (a huge one, or a slow chat template) is held here on an event:
    meanwhile the server answers other requests."""
    reg = server.server.config.app.state.engine.reg
    entered, release = threading.Event(), threading.Event()
    encode = reg.encode

    def held_encode(prompt, chat=False):
        if "HOLD" in str(prompt):
            entered.set()
            assert release.wait(120), "never released"
        return encode(prompt, chat=chat)

    reg.encode = held_encode
    c = server.client()
    try:
        with ThreadPoolExecutor(2) as pool:
            try:
                plain = pool.submit(c.completions.create, model="a0", prompt="HOLD x",
                                    max_tokens=2)
                chat = pool.submit(c.chat.completions.create, model="a1", max_tokens=2,
                                   messages=[{"role": "user", "content": "HOLD"}])
                assert entered.wait(60), "the prompt never reached the tokenizer"
                # the event loop is free: a listing, and a request the tokenizer never sees
                assert {BASE_NAME, "a0", "a1"} <= {m.id for m in c.models.list()}
                with pytest.raises(openai.NotFoundError):
                    c.completions.create(model="nope", prompt="x", max_tokens=2)
                assert not plain.done() and not chat.done()
            finally:
                release.set()
            assert plain.result().usage.completion_tokens <= 2
            assert chat.result().choices[0].message.role == "assistant"
    finally:
        del reg.encode  # the registry's own method again


def test_full_queue_answers_429_at_once(tiny_gpt2, root):
    s = start(tiny_gpt2, root, names=("a0",), max_batch=1, max_queue=1)
    try:
        c, engine = s.client(), s.server.config.app.state.engine
        body = {"model": "a0", "prompt": "x", "max_tokens": 48, "temperature": 0,
                "ignore_eos": True}

        def ask(_):
            try:
                c.completions.create(model="a0", prompt="y", max_tokens=2)
                return 200
            except openai.RateLimitError:
                return 429

        release = hold(engine)
        with ThreadPoolExecutor(1) as reader:
            try:  # a streamed request takes the one queue slot ...
                stream = reader.submit(sse, s.url + "/v1/completions", {**body, "stream": True})
                wait_until(lambda: engine.waiting() == 1)
                with ThreadPoolExecutor(4) as pool:  # ... so, with the worker still held,
                    codes = list(pool.map(ask, range(4)))  # these are refused, not kept waiting
            finally:
                release.set()
            events = stream.result()
        assert codes == [429] * 4
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        alone = c.completions.create(extra_body={"ignore_eos": True},
                                     **{k: v for k, v in body.items() if k != "ignore_eos"})
        assert "".join(ch["text"] for ch in chunks) == alone.choices[0].text
        assert len(chunks) > 2 and alone.usage.completion_tokens == 48
        assert chunks[-1]["finish_reason"] == alone.choices[0].finish_reason == "length"
        assert ask(0) == 200  # the queue drained: requests are accepted again
    finally:
        s.close()


def test_api_key_is_checked_on_every_route(tiny_gpt2, root):
    s = start(tiny_gpt2, root, names=("a0",), api_key="sekret", limits=Limits(16))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert http("DELETE", s.url + "/v1/adapters/a0")[0] == 401
        assert http("GET", s.url + "/ui/api/train")[0] == 401  # the page's training too
        assert http("POST", s.url + "/ui/api/upload?filename=x.csv")[0] == 401
        assert [m.id for m in s.client("sekret").models.list()] == [BASE_NAME, "a0"]
        with pytest.raises(openai.BadRequestError, match="1 to 16"):
            s.client("sekret").completions.create(model="a0", prompt="x", max_tokens=17)
    finally:
        s.close()


def test_the_serve_and_generate_commands(tiny_gpt2, root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERS_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "adapters", "generate", "--base", tiny_gpt2,
                          "--adapter", f"a0={root / 'a0'}", "--adapter", f"a1={root / 'a1'}",
                          "--prompt", PROMPTS[0], "--with-base", "--max-new-tokens", "6",
                          "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert [a["model"] for a in answers] == [BASE_NAME, "a0", "a1"]
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "serve", "--adapter",
                             f"a0={root / 'a0'}", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, lines = None, []
        for line in proc.stdout:  # uvicorn prints the port it bound
            lines.append(line)
            if "Uvicorn running on" in line:
                url = line.split("running on ")[1].split()[0]
                break
        assert url and url.startswith("http://127.0.0.1:")
        assert any("the web page (playground) at http://127.0.0.1:" in ln for ln in lines), lines
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].text == answers[1]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metrics_in_prometheus_format(tiny_gpt2, root):
    """GET /metrics (behind the key), read back with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    s = start(tiny_gpt2, root, names=("a0", "a1"), api_key="sekret")
    try:
        assert http("GET", s.url + "/metrics")[0] == 401
        c = s.client("sekret")
        r = c.completions.create(model="a0", prompt=PROMPTS[1], max_tokens=6, temperature=0)
        chunks = list(c.chat.completions.create(model="a1", max_tokens=5, temperature=0,
                                                stream=True, messages=[
                                                    {"role": "user", "content": "hi"}]))
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="nope", prompt="x", max_tokens=2)
        req = urllib.request.Request(s.url + "/v1/adapters", method="POST", data=json.dumps(
            {"name": "a2", "path": "a2"}).encode(), headers={
                "Authorization": "Bearer sekret", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        req = urllib.request.Request(s.url + "/metrics",
                                     headers={"Authorization": "Bearer sekret"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    finally:
        s.close()
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(text) for x in fam.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("adapters_requests_total", route="/v1/completions", status="200",
                 adapter="a0") == 1
    assert value("adapters_requests_total", route="/v1/chat/completions", status="200",
                 adapter="a1") == 1
    assert value("adapters_requests_total", route="/v1/completions", status="404",
                 adapter="nope") == 1
    assert value("adapters_generated_tokens_total", adapter="a0") == r.usage.completion_tokens
    streamed = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)
    assert 1 <= value("adapters_generated_tokens_total", adapter="a1") >= streamed - 1
    assert value("adapters_time_to_first_token_seconds_count", adapter="a0") == 1
    assert value("adapters_time_per_output_token_seconds_count", adapter="a0") == 1
    assert value("adapters_adapter_loads_total", tier="disk", outcome="ok") == 1
    assert value("adapters_adapter_load_seconds_count", tier="disk") == 1
    assert value("adapters_resident_adapters", tier="device") == 3
    assert value("adapters_queue_depth") == 0 and value("adapters_running_rows") == 0
    assert value("adapters_tokens_per_second") > 0
