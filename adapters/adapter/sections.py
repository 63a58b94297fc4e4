"""The manifest's sections (files.py's `Manifest` is made of them): typed parts of
manifest.json, each keeping the keys this version does not know in `extra`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schema import to_json


class Section:
    """A part of the manifest: a dataclass whose unknown JSON keys are kept in `extra`."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, unknown keys folded back in."""
        return to_json(self)


@dataclass
class TokenizerInfo(Section):
    vocab_size: int | None = None
    sha256_16: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fingerprint(Section):
    """model.base_fingerprint(): architecture, shape settings, tokenizer, sampled weights."""
    model_type: str | None = None
    architectures: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerInfo | None = None
    probe: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BaseInfo(Section):
    name: str | None  # the base spec: hub id, local folder or "default"
    fingerprint: Fingerprint | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantInfo(Section):
    """The base as loaded for training: the recipe's model section (config.ModelConfig)."""
    name: str | None = None
    quantization: str = "none"
    quant_type: str = "nf4"
    double_quant: bool = True
    dtype: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraInfo(Section):
    """The recipe's lora section (config.LoraConfig); peft's own settings are in the config."""
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: str | list[str] | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WeightsInfo(Section):
    file: str
    sha256: str
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataFile(Section):
    split: str
    path: str
    bytes: int | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitStats(Section):
    rows: int | None = None
    examples: int | None = None
    tokens: int | None = None
    trainable_tokens: int | None = None
    truncated: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataInfo(Section):
    format: str | None = None
    files: list[DataFile] = field(default_factory=list)
    train: SplitStats | None = None
    eval: SplitStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult(Section):
    """One dataset's `adapters eval` numbers for this adapter and for the base beside it."""
    dataset: str
    adapter: dict[str, float]
    base: dict[str, float] | None = None
    date: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskInfo(Section):
    """A task head's section (heads.py): classification (its labels in id order) or
    regression, the head's module name and its outputs."""
    type: str
    num_labels: int
    head: str | None = None
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParityRow(Section):
    """One runtime's agreement with the reference (share/parity.py)."""
    runtime: str
    version: str
    precision: str
    top1: float  # teacher-forced next-token agreement with the reference
    kl: float  # mean KL(reference || runtime) over the same positions
    greedy: float  # share of prompts whose greedy continuation equals the reference's
    passed: bool
    threshold: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParityInfo(Section):
    """The parity certificate: the same prompts in every runtime that was here."""
    date: str
    prompts: int
    new_tokens: int
    rows: list[ParityRow]
    skipped: dict[str, str] = field(default_factory=dict)  # runtime -> why
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every runtime passed, and at least one besides the reference was compared."""
        return len(self.rows) > 1 and all(r.passed for r in self.rows)


@dataclass
class CombinedFrom(Section):
    sources: list[str]
    weights: list[float]
    method: str
    density: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConvertedFrom(Section):
    file: str
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)
