"""OpenAI-compatible HTTP server over one base and its adapters (`pip install adapterkit[serve]`).

`model` in a request is the base's name or an adapter's; requests for different adapters
run together in one batch (engine.py). What a request may ask for, the error shape and the
stream's events are protocol.py; here are the routes, the adapter root and hot loads.
Task-head adapters (classification, regression) are served by /v1/classify (classify.py).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

# fastapi and uvicorn are the `serve` extra: only this module needs them, and the CLI imports
# it on `adapters serve` alone (with an install hint when they are missing).
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from ..errors import AdaptersError
from ..generation.decode import Output, Request, Sampling
from . import classify
from .classify import Heads
from .engine import Engine, QueueFull
from .metrics import install as install_metrics
from .protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    Guard,
    Limits,
    LoadAdapterBody,
    client_gone,
    context_len,
    error_body,
    short,
    sse_events,
    usage,
    wants_usage,
)
from .registry import Registry, RegistryError
from .rootfs import Copies, inside_root
from .ui import install as install_ui


class Service:
    """What the routes share: the registry, the task heads, the batching engine, the limits,
    the root."""

    def __init__(self, registry: Registry, heads: Heads, engine: Engine, limits: Limits,
                 root: Path | None):
        self.registry, self.engine, self.limits, self.root = registry, engine, limits, root
        self.metrics = None  # metrics.py: set when the app installs /metrics
        self.heads = heads
        self.created = int(time.time())
        # Tokenizing (and rendering a chat template) takes time in proportion to the prompt:
        # on the event loop a huge prompt would stall every other request. One thread keeps
        # two encodes from sharing the tokenizer at once.
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="adapters-tokenize")
        # No token decodes to more characters than the longest entry of the vocabulary, so a
        # prompt far longer than that x the token limit is refused before it is tokenized
        # (tokenizing 2 MB takes the tokenizer thread seconds). x4: normalizers may fold text.
        cap = min(x for x in (limits.max_prompt_tokens, limits.context, 2**62) if x)
        vocab = registry.tok.get_vocab() if hasattr(registry.tok, "get_vocab") else {}
        self.max_prompt_chars = 4 * cap * max(map(len, vocab), default=2**62)
        # Loads from the root read a checked copy of the adapter's files (rootfs.py), kept
        # private to this process while the adapter is loaded.
        self.copies = Copies(root) if root is not None else None
        self.copying = 0  # loads being copied, not yet in the engine's queue (event loop only)

    def model_ids(self) -> list[str]:
        return [self.registry.base_name, *self.registry.names(), *self.heads.names()]

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        if self.copies is not None:
            self.copies.close()

    def loaded(self, copy: Path) -> None:
        """The load from `copy` is over (done or failed): copies no loaded adapter uses go.
        On the engine's thread (it reads the registry and the heads)."""
        self.copies.done(copy)
        self.sweep()

    def sweep(self) -> None:
        if self.copies is not None:
            self.copies.sweep([*map(self.registry.folder, self.registry.names()),
                               *map(self.heads.folder, self.heads.names())])

    def public(self, message: str) -> str:
        """`message` with the adapter root's location on this machine taken out: replies name
        folders relative to --adapter-root, never where the root lies."""
        if self.root is not None:
            # the longer first: one may be the other's suffix (a root reached through a link)
            for where in sorted({str(self.root.resolve()), str(self.root.absolute())},
                                key=len, reverse=True):
                message = message.replace(where + os.sep, "").replace(where, ".")
        return message

    def unload(self, name: str) -> None:
        try:
            (self.heads if name in self.heads.names() else self.registry).unload(name)
        finally:
            self.sweep()

    async def prepare(self, body, prompts: list, chat: bool) -> list[Request]:
        """One decode request per prompt and per `n`, after every check (nothing runs yet).
        The prompts are tokenized off the event loop."""
        head = classify.wrong_endpoint(self.heads, body.model,
                                       "/v1/chat/completions" if chat else "/v1/completions")
        if head is not None:
            raise head
        if body.model not in self.model_ids():
            raise ApiError(404, f"model {short(body.model)} does not exist; available: "
                                f"{self.model_ids()}", kind="not_found_error", param="model")
        if len(prompts) * body.n > self.engine.max_batch:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={body.n} is more than this "
                                f"server's batch of {self.engine.max_batch}", param="n")
        sampling = self.sampling(body, chat)
        for p in prompts:  # before any tokenizing: the cheap check first
            chars = len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p)
            if chars > self.max_prompt_chars:
                raise ApiError(400, f"the prompt is {chars} characters, more than the token "
                                    "limit allows whatever the text", param="prompt")
        encoded = await asyncio.get_running_loop().run_in_executor(
            self.tokenizer_thread, lambda: [self.registry.encode(p, chat=chat) for p in prompts])
        reqs = []
        for ids in encoded:
            self.limits.check(len(ids), sampling.max_new_tokens)
            for k in range(body.n):
                seed = None if body.seed is None else (body.seed + k) % 2**64
                reqs.append(Request(ids, body.model, replace(sampling, seed=seed)))
        if not self.engine.fits_alone(reqs):
            raise ApiError(400, f"{len(reqs)} x (prompt + max_tokens) is more KV cache than this "
                                f"server's budget of {self.engine.max_kv_tokens} tokens "
                                "(--max-kv-tokens)", param="max_tokens")
        return reqs

    def sampling(self, body, chat: bool) -> Sampling:
        """The body's sampling settings with this server's defaults (seed: set per row)."""
        max_tokens = next((x for x in (getattr(body, "max_completion_tokens", None),
                                       body.max_tokens) if x is not None),
                          self.limits.max_new_tokens if chat else 16)
        return Sampling(max_tokens, 1.0 if body.temperature is None else body.temperature,
                        1.0 if body.top_p is None else body.top_p, None,
                        self.limits.stops(body.stop), body.ignore_eos)

    def submit(self, reqs: list[Request]):
        if self.metrics is not None:
            self.metrics.track(reqs, self.registry.base_name)
        try:
            return self.engine.submit(reqs)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None

    async def run(self, reqs: list[Request], http: HttpRequest) -> list[Output]:
        """The outputs of a request that is not streamed. A client that goes away meanwhile
        cancels its rows: they leave the batch at the next step, freeing their places."""
        outcome = asyncio.ensure_future(self.wait(self.submit(reqs)))
        gone = asyncio.ensure_future(client_gone(http))
        try:
            await asyncio.wait({outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (the server stopping)
            gone.cancel()
            abandoned = not outcome.done()
            if abandoned:
                for r in reqs:
                    r.cancelled = True
                outcome.cancel()
        if abandoned:  # nobody reads this reply; 499 as nginx logs it
            raise ApiError(499, "the client closed the connection", kind="client_closed")
        outs = outcome.result()
        for i, o in enumerate(outs):
            if o.error:
                raise ApiError(500, f"choice {i}: {o.error}", kind="server_error")
        return outs

    @staticmethod
    async def wait(fut) -> list[Output]:
        try:
            return await asyncio.wrap_future(fut)
        except KeyError as e:  # the adapter was unloaded while the request waited
            raise ApiError(404, str(e.args[0]), kind="not_found_error") from None
        except Exception as e:  # the batch failed as a whole (logged by the engine)
            raise ApiError(500, f"generation failed: {type(e).__name__}: {str(e)[:200]}",
                           kind="server_error") from None

    def stream(self, reqs: list[Request], head: dict, chat: bool,
               include_usage: bool = False) -> StreamingResponse:
        """Server-sent events: a chunk per piece of text, each row's finish (or error) as soon
        as it ends, then [DONE]."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        for i, r in enumerate(reqs):
            r.on_text = lambda text, i=i: put((i, text, None))
            r.on_done = lambda out, i=i: put((i, None, out))
        fut = self.submit(reqs)  # a full queue is a 429 before any event is sent

        async def send():
            try:
                async for event in sse_events(self.wait(fut), events, len(reqs), head, chat,
                                              include_usage):
                    yield event
            finally:  # done, or the client went away: its rows leave the batch (and free it)
                for r in reqs:
                    r.cancelled = True

        return StreamingResponse(send(), media_type="text/event-stream")


def create_app(registry: Registry, adapter_root: str | Path | None = None,
               api_key: str | None = None, limits: Limits | None = None,
               max_batch: int = 16, max_queue: int = 64, max_kv_tokens: int | None = None,
               continuous: bool = True, heads: Heads | None = None):
    """The FastAPI app; its engine starts now and stops with the app. `heads`: task-head
    adapters for /v1/classify (default: none yet, on the registry's base)."""
    engine = Engine(registry, max_batch=max_batch, max_queue=max_queue,
                    max_kv_tokens=max_kv_tokens, continuous=continuous)
    limits = limits or Limits(context=context_len(registry.model))
    heads = Heads.like(registry) if heads is None else heads
    svc = Service(registry, heads, engine, limits, Path(adapter_root) if adapter_root else None)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()
        svc.close()
        if getattr(app.state, "studio", None):  # a run started from the page checkpoints
            app.state.studio.close()

    app = FastAPI(title="adapters", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes,
                       read_timeout=limits.read_timeout_s)
    app.state.engine = engine
    app.state.service = svc
    _error_handlers(app)
    _inference_routes(app, svc)
    classify.install(app, svc)
    _adapter_routes(app, svc)
    install_ui(app, svc.root, registry, limits)  # the web page at /, runs from --adapter-root
    install_metrics(app, svc)  # GET /metrics
    return app


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        # A union (str | list[str]) fails once per branch: the most specific error says most
        # (our own checks first, then the deepest field)
        first = max(e.errors(), key=lambda x: (x.get("type") == "value_error", len(x["loc"])))
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error", "")
            return _error_response(ApiError(400, f"the request body is not valid JSON ({why} "
                                                 f"at character {first['loc'][-1]})",
                                            param="body"))
        # pydantic names a union's branch in `loc` ("function-after[...]", "list[...]")
        where = ".".join(str(x) for x in first["loc"] if x != "body" and "[" not in str(x))
        if not where:  # the body itself: not JSON, or curl -d without a JSON content type
            return _error_response(ApiError(
                400, "the request body must be a JSON object sent with "
                     "'Content-Type: application/json'", param="body"))
        why = first["msg"].removeprefix("Value error, ")
        return _error_response(ApiError(400, f"{where}: {why}", param=where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):  # 404 route, 405, unparsable body
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(e.status_code, str(e.detail), kind=kind))

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):  # a bug: logged with its traceback by Starlette
        return _error_response(ApiError(500, f"internal error ({type(e).__name__})",
                                        kind="server_error"))


def _inference_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/v1/models")
    async def list_models():
        # Names only: where an adapter's folder lies on this machine is no client's business.
        base = svc.registry.base_name
        data = [{"id": m, "object": "model", "created": svc.created, "owned_by": "adapters",
                 "root": m, "parent": None if m == base else base}
                for m in svc.model_ids()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        http.state.adapter = body.model  # the label of this request in /metrics
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        reqs = await svc.prepare(body, prompts, chat=False)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": body.model}
        if body.stream:
            return svc.stream(reqs, head, chat=False, include_usage=wants_usage(body))
        outs = await svc.run(reqs, http)
        return {**head, "choices": [{"index": i, "text": o.text, "logprobs": None,
                                     "finish_reason": o.finish_reason}
                                    for i, o in enumerate(outs)], "usage": usage(outs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        http.state.adapter = body.model
        reqs = await svc.prepare(body, [[m.model_dump() for m in body.messages]], chat=True)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.model}
        if body.stream:
            return svc.stream(reqs, {**head, "object": "chat.completion.chunk"}, chat=True,
                              include_usage=wants_usage(body))
        outs = await svc.run(reqs, http)
        return {**head, "choices": [{"index": i, "finish_reason": o.finish_reason,
                                     "message": {"role": "assistant", "content": o.text}}
                                    for i, o in enumerate(outs)], "usage": usage(outs)}


def _queue_load(svc: Service, name: str, copy: Path):
    """Queue loading adapter `name` from its copy on the engine's thread (a future); a full
    queue is a 429 and the copy goes at once."""
    def load():
        try:
            return classify.load_into(svc.registry, svc.heads, name, copy)
        finally:
            svc.loaded(copy)

    try:
        return svc.engine.call(svc.metrics.timed(load) if svc.metrics else load)
    except QueueFull as e:
        svc.copies.discard(copy)
        raise ApiError(429, str(e), kind="rate_limit_error") from None


def _adapter_routes(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapterBody):
        if svc.root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with "
                                "--adapter-root DIR", kind="permission_error")
        try:
            svc.registry.check_name(body.name)
        except RegistryError as e:
            raise ApiError(400, str(e), param="name") from None
        folder = inside_root(svc.root, body.path)
        if svc.engine.waiting() + svc.copying >= svc.engine.max_queue:
            # refused before any file is copied: a flood of loads costs no disk
            raise ApiError(429, f"the server is busy: {svc.engine.max_queue} requests are "
                                "already waiting; retry later", kind="rate_limit_error")
        svc.copying += 1  # counted before the await: loads arriving together see each other
        try:
            copy = await asyncio.to_thread(svc.copies.copy_of, folder, body.path)
            queued = _queue_load(svc, body.name, copy)
        finally:
            svc.copying -= 1

        def public(e: Exception) -> str:  # messages name the copy: the client's path instead
            return svc.public(str(e).replace(str(copy), short(body.path)))

        try:
            evicted = await asyncio.wrap_future(queued)
        except RegistryError as e:  # every slot busy: nothing was loaded or evicted
            raise ApiError(409, public(e), param="name") from None
        except AdaptersError as e:  # its messages name the folder: relative to the root here
            raise ApiError(400, public(e), param="path") from None
        except OSError as e:
            raise ApiError(400, f"path {short(body.path)} cannot be read: {e.strerror}",
                           param="path") from None
        return {"id": body.name, "object": "model", "evicted": evicted,
                "root": folder.relative_to(svc.root.resolve()).as_posix()}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        if name not in (*svc.registry.names(), *svc.heads.names()):
            raise ApiError(404, f"no adapter named {short(name)}", kind="not_found_error")
        try:
            await asyncio.wrap_future(svc.engine.call(lambda: svc.unload(name)))
        except AdaptersError as e:
            raise ApiError(409, svc.public(str(e))) from None
        return {"id": name, "object": "model", "deleted": True}


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level)
