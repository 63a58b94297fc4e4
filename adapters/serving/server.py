"""OpenAI-compatible HTTP server over one base and its adapters (`pip install adapterkit[serve]`).

`model` in a request is the base's name or an adapter's; requests for different adapters
run together in one batch (engine.py). Errors use OpenAI's shape: {"error": {"message", ...}}.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# fastapi and uvicorn are the `serve` extra: only this module needs them, and the CLI imports
# it on `adapters serve` alone (with an install hint when they are missing).
import uvicorn
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..errors import AdaptersError
from .decode import Output, Request, Sampling
from .engine import Engine, QueueFull
from .registry import Registry


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def inside_root(root: Path, path: str) -> Path:
    """The real path of `path` (relative to root, or absolute) if it lies inside root."""
    real_root = root.resolve()
    target = (real_root / path).resolve()  # follows every link, collapses ".."
    if not target.is_relative_to(real_root):
        raise ApiError(403, f"path {path!r} is outside the adapter root", param="path")
    return target


class Limits:
    def __init__(self, max_new_tokens: int = 512, max_prompt_tokens: int | None = None,
                 context: int | None = None):
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.context = context

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        if max_tokens < 1 or max_tokens > self.max_new_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows 1 to "
                                f"{self.max_new_tokens}", param="max_tokens")
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this server's limit is "
                                f"{self.max_prompt_tokens}", param="prompt")
        if self.context and prompt_tokens + max_tokens > self.context:
            raise ApiError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                                f"exceeds the model's context of {self.context} tokens",
                           param="max_tokens")


class _Common(BaseModel):
    model_config = {"extra": "allow"}  # unknown OpenAI fields are accepted and ignored
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # as in vLLM: always generate max_tokens (benchmarks)


class CompletionBody(_Common):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = {"extra": "allow"}
    role: str
    content: str


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class LoadAdapterBody(BaseModel):
    name: str
    path: str


class Service:
    """What the routes share: the registry, the batching engine, the limits, the root."""

    def __init__(self, registry: Registry, engine: Engine, limits: Limits, root: Path | None):
        self.registry, self.engine, self.limits, self.root = registry, engine, limits, root
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return [self.registry.base_name, *self.registry.names()]

    def prepare(self, body, prompts: list, chat: bool) -> list[Request]:
        """One decode request per prompt and per `n`, after the model and limit checks."""
        if body.model not in self.model_ids():
            raise ApiError(404, f"model {body.model!r} does not exist; available: "
                                f"{self.model_ids()}", kind="not_found_error", param="model")
        max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                      or (self.limits.max_new_tokens if chat else 16))
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        reqs = []
        for p in prompts:
            ids = self.registry.encode(p, chat=chat)
            self.limits.check(len(ids), max_tokens)
            for k in range(body.n):
                seed = None if body.seed is None else body.seed + k
                reqs.append(Request(ids, body.model, Sampling(
                    max_tokens, body.temperature, body.top_p, seed, stop, body.ignore_eos)))
        return reqs

    def submit(self, reqs: list[Request]):
        try:
            return self.engine.submit(reqs)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None

    async def run(self, reqs: list[Request]) -> list[Output]:
        return await self.wait(self.submit(reqs))

    @staticmethod
    async def wait(fut) -> list[Output]:
        try:
            return await asyncio.wrap_future(fut)
        except KeyError as e:  # the adapter was unloaded while the request waited
            raise ApiError(404, str(e.args[0]), kind="not_found_error") from None

    def stream(self, reqs: list[Request], head: dict, chat: bool) -> StreamingResponse:
        """Server-sent events: a chunk per piece of text, then finish reasons, then [DONE]."""
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        for i, r in enumerate(reqs):
            r.on_text = lambda text, i=i: loop.call_soon_threadsafe(pieces.put_nowait, (i, text))
        fut = self.submit(reqs)  # a full queue is a 429 before any event is sent
        return StreamingResponse(_events(self.wait(fut), pieces, len(reqs), head, chat),
                                 media_type="text/event-stream")


def _usage(outs: list[Output]) -> dict[str, int]:
    p = sum(o.prompt_tokens for o in outs)
    c = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(head: dict, chat: bool, i: int, text: str | None, finish: str | None) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if text is None else {}
        choice = {"index": i, "delta": {**delta, **({"content": text} if text else {})},
                  "finish_reason": finish}
    else:
        choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
    return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


async def _events(outcome, pieces: asyncio.Queue, n: int, head: dict, chat: bool):
    task = asyncio.ensure_future(outcome)
    if chat:  # the role first, as OpenAI's stream does
        for i in range(n):
            yield _chunk(head, chat, i, None, None)
    while not (task.done() and pieces.empty()):
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield _chunk(head, chat, *getter.result(), None)
        else:
            getter.cancel()
    try:
        outs = task.result()
    except ApiError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.status}})}\n\n"
        return
    for i, o in enumerate(outs):
        yield _chunk(head, chat, i, "", o.finish_reason)
    yield "data: [DONE]\n\n"


def create_app(registry: Registry, adapter_root: str | Path | None = None,
               api_key: str | None = None, limits: Limits | None = None,
               max_batch: int = 16, max_queue: int = 64):
    """The FastAPI app; its engine starts now and stops with the app."""
    engine = Engine(registry, max_batch=max_batch, max_queue=max_queue)
    svc = Service(registry, engine, limits or Limits(context=context_len(registry.model)),
                  Path(adapter_root) if adapter_root else None)

    def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           kind="authentication_error")

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="adapters", lifespan=lifespan, dependencies=[Depends(check_key)])
    app.state.engine = engine
    _error_handlers(app)
    _inference_routes(app, svc)
    _adapter_routes(app, svc)
    return app


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                   "code": e.status}}, status_code=e.status)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        if not where:  # the body itself: not JSON, or curl -d without a JSON content type
            return _error_response(ApiError(
                400, "the request body must be a JSON object sent with "
                     "'Content-Type: application/json'", param="body"))
        return _error_response(ApiError(400, f"{where}: {first['msg']}", param=where))


def _inference_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/v1/models")
    async def list_models():
        base = svc.registry.base_name
        data = [{"id": m, "object": "model", "created": svc.created, "owned_by": "adapters",
                 "root": base if m == base else str(svc.registry.folder(m))}
                for m in svc.model_ids()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        reqs = svc.prepare(body, prompts, chat=False)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": body.model}
        if body.stream:
            return svc.stream(reqs, head, chat=False)
        outs = await svc.run(reqs)
        return {**head, "choices": [{"index": i, "text": o.text, "logprobs": None,
                                     "finish_reason": o.finish_reason}
                                    for i, o in enumerate(outs)], "usage": _usage(outs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        reqs = svc.prepare(body, [[m.model_dump() for m in body.messages]], chat=True)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.model}
        if body.stream:
            return svc.stream(reqs, {**head, "object": "chat.completion.chunk"}, chat=True)
        outs = await svc.run(reqs)
        return {**head, "choices": [{"index": i, "finish_reason": o.finish_reason,
                                     "message": {"role": "assistant", "content": o.text}}
                                    for i, o in enumerate(outs)], "usage": _usage(outs)}


def _adapter_routes(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapterBody):
        if svc.root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with "
                                "--adapter-root DIR", kind="permission_error")
        folder = inside_root(svc.root, body.path)
        try:
            evicted = await asyncio.wrap_future(svc.engine.call(
                lambda: svc.registry.load(body.name, folder)))
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None
        except AdaptersError as e:
            raise ApiError(400, str(e), param="path") from None
        return {"id": body.name, "object": "model", "root": str(folder), "evicted": evicted}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        if name not in svc.registry.names():
            raise ApiError(404, f"no adapter named {name!r}", kind="not_found_error")
        try:
            await asyncio.wrap_future(svc.engine.call(lambda: svc.registry.unload(name)))
        except AdaptersError as e:
            raise ApiError(409, str(e)) from None
        return {"id": name, "object": "model", "deleted": True}


def context_len(model) -> int | None:
    """The model's context length from its config, or None when it does not say."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value: Any = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level)
