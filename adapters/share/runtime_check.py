"""Run an exported GGUF in llama.cpp itself and compare its next-token distributions with ours.

The same token ids (our tokenizer, no special tokens added) go to both sides, so only the
models differ. Figures, per held-out prompt position: top-1 agreement and mean KL(ours ||
llama.cpp), for the plain base (the floor: a quantised base GGUF is not our fp32 copy of
it) and for base + adapter; and each side's KL from its own plain base, the adapter's
effect, which must show in llama.cpp about as strongly as in ours.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .gguf_io import ExportError

log = logging.getLogger(__name__)

@dataclass
class Agreement:
    top1: float     # fraction of positions whose argmax agrees
    mean_kl: float  # mean KL(reference || other) over positions

    def __str__(self) -> str:
        return f"top-1 {self.top1:.1%}, mean KL {self.mean_kl:.4f}"


@dataclass
class RuntimeReport:
    runtime: str
    positions: int
    base: Agreement           # ours (base) vs llama.cpp (base)
    adapted: Agreement        # ours (base + adapter) vs llama.cpp (exported)
    effect_ours: float        # KL(ours adapted || ours base)
    effect_runtime: float     # KL(llama.cpp adapted || llama.cpp base)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [f"{self.runtime}, {self.positions} positions:",
                f"  base alone      : {self.base}",
                f"  base + adapter  : {self.adapted}",
                f"  adapter effect  : KL from the base {self.effect_runtime:.4f} in "
                f"{self.runtime}, {self.effect_ours:.4f} in adapters"]


@torch.no_grad()
def torch_logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(ref: list[np.ndarray], other: list[np.ndarray]) -> Agreement:
    """Top-1 agreement and mean KL(ref || other) over all positions of all prompts."""
    agree, kl, n = 0, 0.0, 0
    for a, b in zip(ref, other, strict=True):
        if a.shape != b.shape:
            raise ExportError(f"logits of shape {a.shape} vs {b.shape}: the runtime's "
                              "vocabulary differs from ours")
        pa, pb = _log_softmax(a), _log_softmax(b)
        kl += float((np.exp(pa) * (pa - pb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return Agreement(agree / max(n, 1), kl / max(n, 1))


def compare(ours_base: list[np.ndarray], ours_adapted: list[np.ndarray],
            rt_base: list[np.ndarray], rt_adapted: list[np.ndarray],
            runtime: str = "llama.cpp") -> RuntimeReport:
    return RuntimeReport(
        runtime=runtime, positions=sum(a.shape[0] for a in ours_base),
        base=agreement(ours_base, rt_base), adapted=agreement(ours_adapted, rt_adapted),
        effect_ours=agreement(ours_adapted, ours_base).mean_kl,
        effect_runtime=agreement(rt_adapted, rt_base).mean_kl)


def gate(report: RuntimeReport, max_kl: float, what: str) -> None:
    """ExportError when llama.cpp departs from ours, or shows too little of the adapter.

    A LoRA that loads but does nothing is the classic failure; the effect check catches it
    whenever the adapter moves our own logits by more than the tolerance.
    """
    if not report.adapted.mean_kl <= max_kl:  # `not <=` also catches NaN
        raise ExportError(f"{what}: llama.cpp's base + adapter departs from ours (mean KL "
                          f"{report.adapted.mean_kl:.4g} > --max-kl {max_kl}; base alone "
                          f"{report.base.mean_kl:.4g}); the file was not kept")
    if report.effect_ours > max_kl and report.effect_runtime < 0.5 * report.effect_ours:
        raise ExportError(f"{what}: llama.cpp shows too little of the adapter (KL from the "
                          f"base {report.effect_runtime:.4g} vs {report.effect_ours:.4g} in "
                          "ours): the LoRA tensors were not applied; the file was not kept")
