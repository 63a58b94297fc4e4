"""Many adapters on one base in memory: load, evict, and generate with a mixed batch.

    reg = Registry.from_spec("default", quantization="4bit")
    reg.load("pydoc", "runs/demo/pydoc-qa")
    reg.generate(["What does os.path.join do?"] * 2, adapters=["pydoc", None], chat=True)

One thread at a time may use a Registry (the server gives it one worker thread).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..adapter import load_adapter
from ..config import BASE_NAME, ModelConfig
from ..data.template import render_chat
from ..errors import AdaptersError
from ..model import load_base
from . import lora_batch
from .decode import PEFT_NO_ADAPTER, Output, Request, Sampling, decode

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RegistryError(AdaptersError):
    """An adapter name that is unknown, invalid, taken, or cannot be made room for."""


class Registry:
    def __init__(self, model, tokenizer, base_name: str = BASE_NAME, capacity: int = 8,
                 allow_base_mismatch: bool = False):
        if capacity < 1:
            raise RegistryError(f"capacity must be at least 1 (got {capacity})")
        self.model, self.tok = model, tokenizer
        self.base_name, self.capacity = base_name, capacity
        self.allow_base_mismatch = allow_base_mismatch
        self._lru: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self._busy: dict[str, int] = {}  # name -> requests using it right now
        self._lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}
        self.fast = True  # batched LoRA (lora_batch.py); False = peft's own mixed batch
        self._stacks = None  # rebuilt after every load/unload

    @classmethod
    def from_spec(cls, base: str, quantization: str = "none", device: str | None = None,
                  **kw) -> Registry:
        model, tok = load_base(ModelConfig(name=base, quantization=quantization), device)
        return cls(model, tok, base_name=kw.pop("base_name", BASE_NAME), **kw)

    # -- the set of adapters ------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._lru)

    def folder(self, name: str) -> Path:
        return self._lru[name]

    def load(self, name: str, folder: str | Path) -> list[str]:
        """Load (or replace) adapter `name` from `folder`; return names evicted to make room."""
        if not NAME_RE.fullmatch(name or "") or name in (self.base_name, PEFT_NO_ADAPTER):
            raise RegistryError(f"adapter name {name!r}: expected 1-64 characters of "
                                f"A-Z a-z 0-9 . _ - and not {self.base_name!r}")
        evicted = []
        with self._lock:
            if name in self._lru:
                self._drop(name)
            while len(self._lru) >= self.capacity:
                evicted.append(self._evict_one())
        start = time.perf_counter()
        self.model = load_adapter(self.model, folder, self.tok, adapter_name=name,
                                  allow_base_mismatch=self.allow_base_mismatch)
        self.model.eval()
        self.load_seconds[name] = time.perf_counter() - start
        with self._lock:
            self._lru[name] = Path(folder)
            self._stacks = None
        return evicted

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._lru:
                raise RegistryError(f"no adapter named {name!r} (loaded: {self.names()})")
            if self._busy.get(name):
                raise RegistryError(f"adapter {name!r} is in use by {self._busy[name]} request(s)")
            self._drop(name)

    def _evict_one(self) -> str:
        for name in self._lru:  # oldest first
            if not self._busy.get(name):
                self._drop(name)
                return name
        raise RegistryError(f"all {self.capacity} adapter slots are in use; "
                            "raise the capacity or retry later")

    def _drop(self, name: str) -> None:
        del self._lru[name]
        self._stacks = None
        self.load_seconds.pop(name, None)
        self.model.delete_adapter(name)

    def _touch(self, names: list[str | None]) -> None:
        with self._lock:
            for n in names:
                if n is None:
                    continue
                if n not in self._lru:
                    raise RegistryError(f"no adapter named {n!r} (loaded: {self.names()})")
                self._lru.move_to_end(n)
                self._busy[n] = self._busy.get(n, 0) + 1

    def _release(self, names: list[str | None]) -> None:
        with self._lock:
            for n in names:
                if n is not None:
                    self._busy[n] -= 1

    # -- generation -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a plain prompt, or of chat messages rendered with the chat template."""
        if chat or not isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            prompt = render_chat(self.tok, messages, add_generation_prompt=True)
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not ids:  # an empty prompt: start from BOS (or EOS, as GPT-2 does)
            start = self.tok.bos_token_id if self.tok.bos_token_id is not None \
                else self.tok.eos_token_id
            ids = [start]
        return ids

    def run(self, requests: list[Request]) -> list[Output]:
        """Decode prepared requests (adapter None = base) in one mixed batch."""
        names = [r.adapter if r.adapter != self.base_name else None for r in requests]
        for r, n in zip(requests, names):
            r.adapter = n
        self._touch(names)
        try:
            if not self._lru:  # no adapters (yet, or any more): the plain base
                model = self.model.get_base_model() if hasattr(self.model, "peft_config") \
                    else self.model
                return decode(model, self.tok, requests, peft=False)
            if self.fast and lora_batch.supported(self.model, self.names()):
                if self._stacks is None:
                    self._stacks = lora_batch.Stacks(self.model, self.names())
                with lora_batch.batched(self.model, self._stacks, names):
                    return decode(self.model, self.tok, requests, peft=False)
            return decode(self.model, self.tok, requests, peft=True)
        finally:
            self._release(names)

    def generate(self, prompts: list[str | list[dict]], adapters: str | None | list = None,
                 chat: bool = False, **sampling) -> list[str]:
        """Answer each prompt; `adapters` is one name, None (the base), or one per prompt."""
        if not isinstance(adapters, list):
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise RegistryError(f"{len(prompts)} prompts but {len(adapters)} adapter names")
        stop = tuple(sampling.pop("stop", ()) or ())
        reqs = [Request(self.encode(p, chat), a, Sampling(stop=stop, **sampling))
                for p, a in zip(prompts, adapters)]
        return [o.text for o in self.run(reqs)]

