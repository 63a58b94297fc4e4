"""`POST /v1/classify`: task-head adapters (classification, regression) in `adapters serve`.

A task-head adapter needs its base loaded with a head (`AutoModelForSequenceClassification`,
heads.load_head_model), which the causal LM the server generates with is not. `Heads` loads
one such model per head shape (the task and its class names) and attaches every adapter of
that shape to it through peft, its LoRA and its trained head (`modules_to_save`), switching
between them per request.

Memory: each head shape costs a second copy of the base's weights beside the causal LM
(in the server's dtype and quantization: about the base's size again), plus each adapter's
LoRA and head. The first adapter of a shape pays for the copy; unloading the last one frees it.

    POST /v1/classify {"model": NAME, "input": "text" | ["text", ...]}
    -> {"object": "list", "model": NAME, "usage": {"prompt_tokens", "total_tokens"},
        "data": [{"index", "label", "probabilities": {label: p}}]}   (classification)
        "data": [{"index", "value"}]                                    (regression)

A request's texts are tokenized and run on the engine's thread, the one that owns the models
(between two decode steps, like adapter loads), in batches of the server's --max-batch: the
event loop never waits on a forward, and the queue's limit (429) covers these requests too.
Texts, pooling and probabilities are `adapters predict`'s: tokenized with the special tokens,
each pooled at its last token (training/heads.py), softmax over the classes.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from ..adapter import check_files, load_adapter
from ..adapter.archive import resolve_adapter
from ..config import IGNORE_INDEX
from ..data.packing import collate_padded
from ..errors import AdaptersError
from ..heads import is_task_head, labels_of, load_head_model, model_config_for, task_of
from ..model import resolve_dtype
from ..training.heads import predictions
from .engine import QueueFull
from .protocol import ApiError, short
from .registry import RegistryError, without_adapter

MAX_INPUTS = 2048  # texts per request, as OpenAI's embeddings endpoint allows
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ClassifyBody(BaseModel):
    model_config = {"extra": "allow"}  # unknown fields are accepted and ignored
    model: str
    input: str | list[str]


@dataclass
class _Group:
    """The base with one head shape, and the adapters attached to it (peft names)."""
    model: Any
    tok: Any
    members: set[str] = field(default_factory=set)


@dataclass
class _Entry:
    folder: Path
    task: dict
    key: str  # its group
    internal: str  # peft's adapter name (peft refuses "." in names; ours may have one)


class Heads:
    """Task-head adapters by name, on bases loaded with their heads; the least recently used
    is evicted beyond `capacity`. Used by one thread at a time (the engine's)."""

    def __init__(self, base: str, quantization: str = "none", dtype: str = "auto",
                 device: str | None = None, capacity: int = 8,
                 allow_base_mismatch: bool = False):
        self.base, self.quantization, self.dtype, self.device = base, quantization, dtype, device
        self.capacity, self.allow_base_mismatch = capacity, allow_base_mismatch
        self._lru: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._groups: dict[str, _Group] = {}
        self._loads = 0  # internal names are never reused

    @classmethod
    def like(cls, registry) -> Heads:
        """Heads on the registry's base, device, dtype and limits (not its quantization:
        pass your own Heads for a quantized head base)."""
        base = registry.base()
        param = next(base.parameters())
        return cls(base.name_or_path, dtype=_DTYPES.get(param.dtype, "auto"),
                   device=str(param.device), capacity=registry.capacity,
                   allow_base_mismatch=registry.allow_base_mismatch)

    def names(self) -> list[str]:
        return list(self._lru)

    def folder(self, name: str) -> Path:
        return self._lru[name].folder

    def task(self, name: str) -> dict | None:
        """The adapter's task section; None when no head of that name is loaded (one read:
        the event loop asks while the engine's thread may be unloading it)."""
        entry = self._lru.get(name)
        return entry.task if entry is not None else None

    def load(self, name: str, folder: str | Path) -> list[str]:
        """Load (or replace) task-head adapter `name`; return the names evicted for room.
        Nothing changes unless the load succeeds."""
        path = resolve_adapter(folder)
        task = task_of(check_files(path))
        if task is None:
            raise AdaptersError(f"{path}: not a task-head adapter (no classification or "
                                "regression task in its manifest)")
        key = f"{task.type}|{labels_of(task)}"
        group = self._groups.get(key)
        if group is None:
            cfg, labels = model_config_for(task, name=self.base, quantization=self.quantization,
                                           dtype=self.dtype)
            group = _Group(*load_head_model(cfg, labels, self.device, seed=0))
        self._loads += 1
        internal = f"head_{self._loads}"
        try:
            group.model = load_adapter(group.model, path, group.tok, adapter_name=internal,
                                       allow_base_mismatch=self.allow_base_mismatch).eval()
        except BaseException:
            group.model = without_adapter(group.model, internal)
            raise
        self._groups[key] = group
        group.members.add(internal)  # first: dropping a namesake must not drop this group
        evicted = []
        if name in self._lru:
            self.unload(name)
        elif len(self._lru) >= self.capacity:
            evicted.append(next(iter(self._lru)))
            self.unload(evicted[-1])
        self._lru[name] = _Entry(path, task, key, internal)
        return evicted

    def unload(self, name: str) -> None:
        if name not in self._lru:
            raise RegistryError(f"no task-head adapter named {name!r} (loaded: {self.names()})")
        entry = self._lru.pop(name)
        group = self._groups[entry.key]
        group.members.discard(entry.internal)
        if group.members:
            group.model.set_adapter(next(iter(group.members)))  # peft warns if the active goes
            group.model.delete_adapter(entry.internal)
        else:  # its last adapter: the base copy goes too
            del self._groups[entry.key]

    def classify(self, name: str, texts: list[str], max_batch: int, max_tokens: int | None
                 ) -> tuple[torch.Tensor, int]:
        """((N, K) fp32 head outputs, prompt tokens) of adapter `name` on `texts`, in batches
        of `max_batch`; ApiError 400 for a text longer than `max_tokens`."""
        if name not in self._lru:
            raise RegistryError(f"adapter {name!r} was unloaded")
        self._lru.move_to_end(name)
        entry = self._lru[name]
        group = self._groups[entry.key]
        ids = group.tok(texts, add_special_tokens=True)["input_ids"]  # as `adapters predict`
        for i, x in enumerate(ids):
            if max_tokens and len(x) > max_tokens:
                raise ApiError(400, f"input[{i}] is {len(x)} tokens; this server's limit is "
                                    f"{max_tokens}", param="input")
        group.model.set_adapter(entry.internal)
        device = str(next(group.model.parameters()).device)
        batches = (_batch(ids[s:s + max_batch], group.tok.pad_token_id)
                   for s in range(0, len(ids), max_batch))
        logits, _ = predictions(group.model, batches, device,
                                resolve_dtype(self.dtype, device))
        return logits, sum(map(len, ids))


def _batch(ids: list[list[int]], pad_id: int) -> dict:
    """A right-padded batch of texts marked at their last token, as label data is."""
    batch = collate_padded([(x, [IGNORE_INDEX] * (len(x) - 1) + [0]) for x in ids], pad_id)
    batch["target"] = torch.zeros(len(ids))  # unused: there is no label to compare with
    return batch


def results(logits: torch.Tensor, task: dict) -> list[dict]:
    """The `data` of a reply: a value per text (regression) or a label and probabilities."""
    labels = labels_of(task)
    if labels is None:
        return [{"index": i, "value": float(row[0])} for i, row in enumerate(logits)]
    probs = torch.softmax(logits, -1)  # (N, K)
    return [{"index": i, "label": labels[int(p.argmax())],
             "probabilities": {n: float(x) for n, x in zip(labels, p)}}
            for i, p in enumerate(probs)]


def wrong_endpoint(heads: Heads, model: str, route: str) -> ApiError | None:
    """The 400 for a task head asked on a generation route (None when `model` is not one)."""
    task = heads.task(model)
    if task is None:
        return None
    return ApiError(400, f"model {short(model)} is a {task.type} adapter (a "
                         f"task head): {route} generates text; use POST /v1/classify",
                    param="model")


def load_into(registry, heads: Heads, name: str, folder: Path) -> list[str]:
    """Load adapter `name` where its kind belongs (a task head in `heads`, else the
    registry), then drop a namesake of the other kind. On the engine's thread."""
    if not is_task_head(folder):
        evicted = registry.load(name, folder)
        if name in heads.names():
            heads.unload(name)
        return evicted
    evicted = heads.load(name, folder)
    if name in registry.names():
        try:
            registry.unload(name)
        except RegistryError:  # a request uses the namesake: 409, and the new one goes again
            heads.unload(name)
            raise
    return evicted


def install(app, svc) -> None:
    """Add POST /v1/classify to `app`; `svc` is the server's Service (heads, engine, limits)."""

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        if body.model not in svc.heads.names():
            if body.model in svc.model_ids():
                raise ApiError(400, f"model {short(body.model)} is a causal LM: /v1/classify "
                                    "serves task-head adapters (classification, regression); "
                                    "use /v1/completions or /v1/chat/completions",
                               param="model")
            raise ApiError(404, f"model {short(body.model)} does not exist; available: "
                                f"{svc.model_ids()}", kind="not_found_error", param="model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        _check(texts, svc.max_prompt_chars)
        cap = min((x for x in (svc.limits.max_prompt_tokens, svc.limits.context) if x),
                  default=None)

        def run():  # on the engine's thread
            logits, n = svc.heads.classify(body.model, texts, svc.engine.max_batch, cap)
            return results(logits, svc.heads.task(body.model)), n

        try:
            data, n = await asyncio.wrap_future(svc.engine.call(run))
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None
        except RegistryError as e:  # unloaded while the request waited
            raise ApiError(404, str(e), kind="not_found_error", param="model") from None
        return {"object": "list", "model": body.model, "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n}}


def _check(texts: list[str], max_chars: int) -> None:
    if not texts:
        raise ApiError(400, "input is an empty list; send a text or a list of texts",
                       param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"input has {len(texts)} texts; this server takes at most "
                            f"{MAX_INPUTS} per request", param="input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ApiError(400, f"input[{i}] is empty", param="input")
        if len(t) > max_chars:
            raise ApiError(400, f"input[{i}] is {len(t)} characters, more than the token "
                                "limit allows whatever the text", param="input")
