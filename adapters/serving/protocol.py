"""OpenAI's wire format and the door every request passes: bodies, limits, errors, events.

Everything a request can ask for is checked here before it reaches the model's thread
(server.py): sampling fields finite and in range, seeds that fit 64 bits, bounded stop
strings, the body's size (read without blocking the event loop) and the API key, which
covers every route, the docs included. Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field
from starlette.responses import JSONResponse

from ..generation.decode import Output

SEEDS = (-(2**63), 2**64 - 1)  # what a 64-bit generator seed can hold
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


MAX_MESSAGE_CHARS = 500


class ApiError(Exception):
    """An error reply: one line (a multi-line torch error is folded), at most 500 characters."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        message = " ".join(message.split())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def short(value: Any, n: int = 80) -> str:
    """repr(value), cut to n characters: error messages never echo a whole request."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


class Limits:
    """What one request may ask for: tokens, prompt, stop strings, body size."""

    def __init__(self, max_new_tokens: int = 512, max_prompt_tokens: int | None = None,
                 context: int | None = None, max_stop: int = 16, max_stop_chars: int = 256,
                 max_body_bytes: int = 2 << 20, read_timeout_s: float = 5.0):
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.context, self.max_body_bytes = context, max_body_bytes
        self.read_timeout_s = read_timeout_s  # per read of the body: a stalled one gets 408
        self.max_stop, self.max_stop_chars = max_stop, max_stop_chars

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        if max_tokens < 1 or max_tokens > self.max_new_tokens:
            raise ApiError(400, f"max_tokens is {short(max_tokens)}; this server allows 1 to "
                                f"{self.max_new_tokens}", param="max_tokens")
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this server's limit is "
                                f"{self.max_prompt_tokens}", param="prompt")
        if self.context and prompt_tokens + max_tokens > self.context:
            raise ApiError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                                f"exceeds the model's context of {self.context} tokens",
                           param="max_tokens")

    def stops(self, stop: str | list[str] | None) -> tuple[str, ...]:
        """The stop strings as a tuple, after the count and length checks."""
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > self.max_stop:
            raise ApiError(400, f"stop has {len(stops)} strings; this server allows at most "
                                f"{self.max_stop}", param="stop")
        longest = max((len(x) for x in stops), default=0)
        if longest > self.max_stop_chars:
            raise ApiError(400, f"a stop string is {longest} characters; this server allows at "
                                f"most {self.max_stop_chars}", param="stop")
        return stops


def context_len(model) -> int | None:
    """The model's context length from its config, or None when it does not say."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value: Any = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def _valid_text(value: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"): not text any tokenizer reads."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(value[e.start]):04X} at character "
                         f"{e.start}): not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]


def _unsupported(*accepted: Any, what: str):
    """A field of OpenAI's API this server does not implement: refused (400) unless it has a
    value that asks for nothing (`accepted`, compared by identity and type), never ignored."""
    def check(value: Any) -> Any:
        if value is None or any(value is a or (type(value) is type(a) and value == a)
                                for a in accepted):
            return value
        raise ValueError(f"{short(value)}: {what} is not supported by this server")
    return Annotated[Any, AfterValidator(check)]


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)  # OpenAI's: a last chunk with the usage


class _Common(BaseModel):
    # Unknown fields are accepted and ignored (clients send vendor extras); the numbers are
    # strict: JSON's own types only, so "5" is not a number and "true" not a bool.
    model_config = {"extra": "allow"}
    model: Text
    max_tokens: int | None = Field(None, strict=True)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    n: int = Field(1, ge=1, strict=True)  # n x prompts: at most the server's --max-batch
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1], strict=True)
    ignore_eos: bool = Field(False, strict=True)  # as in vLLM: always max_tokens (benchmarks)
    # Known fields of OpenAI's API that change what a reply holds: each refused when set.
    best_of: _unsupported(1, what="best_of (several candidates, the best returned)") = None
    logprobs: _unsupported(False, what="logprobs") = None
    top_logprobs: _unsupported(0, what="top_logprobs") = None
    echo: _unsupported(False, what="echo (the prompt repeated in the reply)") = None
    logit_bias: _unsupported({}, what="logit_bias") = None
    presence_penalty: _unsupported(0, 0.0, what="presence_penalty") = None
    frequency_penalty: _unsupported(0, 0.0, what="frequency_penalty") = None
    suffix: _unsupported("", what="suffix (insertion)") = None


class CompletionBody(_Common):
    prompt: Text | list[Text] = Field(min_length=1)


class Message(BaseModel):
    model_config = {"extra": "allow"}
    role: Text
    content: Text


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, strict=True)


class LoadAdapterBody(BaseModel):
    name: Text = Field(max_length=64)
    path: Text = Field(min_length=1, max_length=MAX_PATH_CHARS)


async def client_gone(http) -> None:
    """Return once the client has gone away. The body is read by now, so the server's next
    message is the disconnect (uvicorn sends it when the connection closes or the reply is
    complete): awaited, not polled."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def wants_usage(body: _Common) -> bool:
    """stream_options.include_usage: the stream ends with a chunk of token counts."""
    return bool(body.stream_options and body.stream_options.include_usage)


def usage(outs: list[Output]) -> dict[str, int]:
    p = sum(o.prompt_tokens for o in outs)
    c = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chunk(head: dict, chat: bool, i: int, text: str | None, finish: str | None) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if text is None else {}
        choice = {"index": i, "delta": {**delta, **({"content": text} if text else {})},
                  "finish_reason": finish}
    else:
        choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
    return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}


async def sse_events(outcome, events: asyncio.Queue, n: int, head: dict, chat: bool,
                     include_usage: bool = False):
    """The events of a streamed reply; with include_usage, a last chunk (no choices) carries
    the token counts, as OpenAI's `stream_options.include_usage`."""
    task = asyncio.ensure_future(outcome)
    outs, getter = [], None
    try:
        if chat:  # the role first, as OpenAI's stream does
            for i in range(n):
                yield chunk(head, chat, i, None, None)
        ended = 0
        while ended < n:
            if task.done():  # every event of the batch is queued before its future completes
                if events.empty():
                    break
                item = events.get_nowait()
            else:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                item = getter.result()
            i, text, out = item
            if out is None:
                yield chunk(head, chat, i, text, None)
                continue
            ended += 1
            outs.append(out)
            if out.error:  # only this row failed: say so, OpenAI-style; the stream ends cleanly
                err = ApiError(500, f"choice {i}: {out.error}", kind="server_error")
                yield f"data: {json.dumps(error_body(err))}\n\n"
            else:
                yield chunk(head, chat, i, "", out.finish_reason)
        if ended < n:  # the job failed before its rows ran (adapter unloaded, batch failed)
            try:
                await task
            except ApiError as e:
                yield f"data: {json.dumps(error_body(e))}\n\n"
    finally:  # also when the client went away mid-stream: no task is left pending
        for t in (getter, task):
            if t is not None and not t.done():
                t.cancel()
    if include_usage and outs:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(outs)})}\n\n"
    yield "data: [DONE]\n\n"


class Guard:
    """ASGI middleware in front of every route (docs included): the API key, checked before
    anything is read, then the body, read without blocking the event loop and refused (413)
    once it passes the limit, by its Content-Length or while it arrives, or (408) when no
    part of it arrives within `read_timeout` seconds (a client that declares more than it
    sends would hold its connection forever)."""

    def __init__(self, app, api_key: str | None, max_body: int, read_timeout: float = 5.0):
        self.app, self.max_body, self.read_timeout = app, max_body, read_timeout
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = None
        if self.key is not None and not secrets.compare_digest(
                headers.get(b"authorization", b""), self.key):
            error = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                             kind="authentication_error")
        else:
            body, error = await self._body(headers, receive)
        if error is not None:
            # Connection: close: after a refused or stalled body the stream holds unread bytes
            headers = {"connection": "close"} if error.status in (408, 413) else None
            return await JSONResponse(error_body(error), error.status, headers)(
                scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # then the client's disconnect, as usual
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _body(self, headers: dict, receive) -> tuple[bytes, ApiError | None]:
        too_big = ApiError(413, f"the request body is over this server's limit of "
                                f"{self.max_body} bytes", param="body")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return b"", ApiError(400, "Content-Length is not a number", param="body")
            if int(declared) > self.max_body:
                return b"", too_big
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                return b"", ApiError(408, f"the request body stopped arriving: nothing for "
                                          f"{self.read_timeout:g} s (--read-timeout)",
                                     kind="timeout", param="body")
            if message["type"] != "http.request":
                break  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return b"", too_big
            more = message.get("more_body", False)
        return b"".join(chunks), None
