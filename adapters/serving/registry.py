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

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from ..adapter import WEIGHTS_FILE, check_files, check_fits_base, load_adapter
from ..adapter.archive import resolve_adapter
from ..adapter.peftconfig import read_config
from ..config import BASE_NAME, ModelConfig
from ..data.template import render_chat
from ..errors import AdapterFileError, AdaptersError
from ..generation.decode import PEFT_NO_ADAPTER, Batch, Output, Request, Sampling, decode
from ..heads import refuse_task_head
from ..model import base_fingerprint, compare_fingerprints, load_base
from . import lora_batch

# A name starts with a letter or digit: ".", ".." and "-x" are refused (URLs, flags).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RegistryError(AdaptersError):
    """An adapter name that is unknown, invalid, taken, or cannot be made room for."""


class Registry:
    """Adapters by name on one base. A plain LoRA adapter is read straight from its file into
    the batched stacks (lora_batch.Slots: no peft layers built, ~ms to load); one the batched
    path does not compute (DoRA, saved modules, ...) is loaded into peft under an internal name
    of its own (peft refuses "." in names, and a reload must not touch the one it replaces)."""

    def __init__(self, model, tokenizer, base_name: str = BASE_NAME, capacity: int = 8,
                 allow_base_mismatch: bool = False, fast: bool = True):
        if capacity < 1:
            raise RegistryError(f"capacity must be at least 1 (got {capacity})")
        self.model, self.tok = model, tokenizer
        self.base_name, self.capacity = base_name, capacity
        self.allow_base_mismatch = allow_base_mismatch
        self._lru: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self._peft: dict[str, str] = {}  # our name -> peft's adapter name (peft-served ones)
        self._slot: dict[str, int] = {}  # our name -> its slot in the batched stacks
        self._loads = 0  # internal names are never reused
        self._busy: dict[str, int] = {}  # name -> requests using it right now
        self._lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}
        self.fast = fast  # False: every adapter through peft (its own mixed batch)
        self._slots = lora_batch.Slots(model, capacity + 1)  # + 1: a reload loads beside
        self._fingerprint: dict | None = None  # the base's, computed on the first check
        self._matched: list[dict] = []  # saved fingerprints found to match it

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

    def peft_name(self, name: str | None) -> str | None:
        """peft's adapter name for `name` (None for the base and batched-path adapters)."""
        return None if name is None else self._peft.get(name)

    def base(self):
        """The base model, without peft's wrapper."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def check_name(self, name: str) -> None:
        """RegistryError unless `name` may name an adapter."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (
                self.base_name, PEFT_NO_ADAPTER):
            shown = repr(name)[:80]
            raise RegistryError(f"adapter name {shown}: expected 1-64 characters of A-Z a-z "
                                f"0-9 . _ - starting with a letter or digit, and not "
                                f"{self.base_name!r}")

    def load(self, name: str, folder: str | Path) -> list[str]:
        """Load (or replace) adapter `name` from `folder`; return names evicted to make room.

        Nothing changes unless the load succeeds: the new adapter is loaded beside the others,
        then swapped in; the adapter it replaces, or the least recently used one when the
        registry is full, is dropped only after that.
        """
        self.check_name(name)
        with self._lock:
            if name not in self._lru and len(self._lru) >= self.capacity:
                self._victim()  # refuse now when every slot is busy
        start = time.perf_counter()
        slot, internal = self._read(folder)
        evicted = []
        with self._lock:
            if name in self._lru:
                self._drop(name)
            elif len(self._lru) >= self.capacity:
                evicted.append(self._victim())
                self._drop(evicted[-1])
            self._lru[name] = Path(folder)
            if slot is None:
                self._peft[name] = internal
            else:
                self._slot[name] = slot
            self.load_seconds[name] = time.perf_counter() - start
        return evicted

    def _read(self, folder: str | Path) -> tuple[int | None, str | None]:
        """Check the adapter and put it beside the others: (its slot, or its peft name)."""
        path = resolve_adapter(folder)
        manifest = check_files(path)
        # The server routes task heads to serving/classify.py before they reach here.
        refuse_task_head(manifest, path, "generation",
                         "classify with `adapters serve` (POST /v1/classify) or `adapters "
                         "predict`")
        config = read_config(path)
        refused = [k for k in lora_batch.REFUSED if config.get(k)]
        if refused:  # peft's mixed batches cannot compute these
            raise AdapterFileError(f"{path}: {refused[0]} adapters cannot be served beside "
                                   "others (peft computes them one adapter per batch); merge "
                                   "it into its base with `adapters merge` and serve that")
        if not self.fast or not lora_batch.batchable(config):
            return None, self._attach(path)
        self._check_base(manifest, path)
        check_fits_base(path, self.model)
        device = next(self.model.parameters()).device
        tensors = load_file(path / WEIGHTS_FILE, device=str(device))  # read once
        try:
            pairs = lora_batch.pairs(tensors, self.model)
        except ValueError as e:
            raise AdapterFileError(f"{path}: does not fit this base model: {e}") from None
        return self._slots.add(pairs, config), None

    def _check_base(self, manifest, folder: Path) -> None:
        """check_base with the base's fingerprint computed once, not once per load."""
        saved = manifest.base.fingerprint if manifest else None
        if saved is None:
            return
        if self._fingerprint is None:
            self._fingerprint = base_fingerprint(self.base(), self.tok)
        saved = saved.to_dict()
        if saved in self._matched:  # adapters trained on this base carry the same one
            return
        structural, weights = compare_fingerprints(saved, self._fingerprint)
        if structural:
            raise AdapterFileError(f"{folder}: trained for another base model: "
                                   + "; ".join(structural))
        if weights and not self.allow_base_mismatch:
            raise AdapterFileError(
                f"{folder}: the base's weights differ from those the adapter was trained on "
                f"({len(weights)} tensors, e.g. {weights[0]}; trained on {manifest.base.name})"
                "; pass allow_base_mismatch to load anyway")
        if not weights:
            self._matched.append(saved)

    def _attach(self, folder: str | Path) -> str:
        """Load the adapter into peft under a new internal name; on failure leave the model
        as it was."""
        self._loads += 1
        internal = f"adapter_{self._loads}"
        try:
            self.model = load_adapter(self.model, folder, self.tok, adapter_name=internal,
                                      allow_base_mismatch=self.allow_base_mismatch)
        except BaseException:
            self.model = without_adapter(self.model, internal)
            raise
        self.model.eval()
        return internal

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._lru:
                raise RegistryError(f"no adapter named {name!r} (loaded: {self.names()})")
            if self._busy.get(name):
                raise RegistryError(f"adapter {name!r} is in use by {self._busy[name]} request(s)")
            self._drop(name)

    def _victim(self) -> str:
        """The least recently used adapter not in use."""
        for name in self._lru:  # oldest first
            if not self._busy.get(name):
                return name
        raise RegistryError(f"all {self.capacity} adapter slots are in use; "
                            "raise the capacity or retry later")

    def _drop(self, name: str) -> None:
        del self._lru[name]
        self.load_seconds.pop(name, None)
        if name in self._slot:
            self._slots.remove(self._slot.pop(name))
        elif len(self._peft) > 1:
            self.model.delete_adapter(self._peft.pop(name))
        else:  # the last one peft serves: its layers go too, the plain base is back
            del self._peft[name]
            self.model = without_adapter(self.model.unload(), "")

    def acquire(self, names: list[str | None]) -> None:
        """Mark adapters in use (no unload or eviction) until `release`; the base is None."""
        with self._lock:
            missing = [n for n in names if n is not None and n not in self._lru]
            if missing:
                raise RegistryError(f"no adapter named {missing[0]!r} (loaded: {self.names()})")
            for n in names:
                if n is not None:
                    self._lru.move_to_end(n)
                    self._busy[n] = self._busy.get(n, 0) + 1

    def release(self, names: list[str | None]) -> None:
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

    def adapter_of(self, request: Request) -> str | None:
        """The adapter name a request asks for (None for the base)."""
        return None if request.adapter in (None, self.base_name) else request.adapter

    def forward(self, requests: list[Request], **inputs):
        """One forward of the model with requests[i]'s adapter on batch row i."""
        names = [self.adapter_of(r) for r in requests]
        extra = {}
        if isinstance(self.model, PeftModel):  # peft-served adapters ride along in the batch
            extra["adapter_names"] = [self._peft.get(n, PEFT_NO_ADAPTER) if n else
                                      PEFT_NO_ADAPTER for n in names]
        with self._slots.rows([self._slot.get(n, 0) if n else 0 for n in names]):
            return self.model(**inputs, **extra)

    def batch(self) -> Batch:
        """An empty batch that requests may join and leave while it decodes (engine.py)."""
        return Batch(self.model, self.tok, self.forward)

    def run(self, requests: list[Request]) -> list[Output]:
        """Decode prepared requests (adapter None = base) in one mixed batch."""
        names = [self.adapter_of(r) for r in requests]
        self.acquire(names)
        try:
            return decode(self.model, self.tok, requests, forward=self.forward)
        finally:
            self.release(names)

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


def without_adapter(model, internal: str):
    """`model` with no trace of a failed load under peft's adapter name `internal`.

    peft wraps layers in place before it reads the weights, so a load that fails on a bad
    tensor leaves LoRA layers behind (on the plain base when it was the first load).
    """
    if isinstance(model, PeftModel):
        if internal in model.peft_config:
            model.delete_adapter(internal)
        for m in model.modules():  # layers injected before peft recorded the config
            if isinstance(m, LoraLayer) and internal in m.lora_A:
                m.delete_adapter(internal)
        return model
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.get_base_layer())
    if "peft_config" in vars(model):  # set on the base by peft's tuner
        del model.peft_config
    return model
