"""The recipe schema: one dataclass per YAML section, and the only place defaults live.

`load_recipe(path, overrides)` reads YAML, applies `section.key=value` overrides, and
validates everything at once: unknown keys (with the nearest valid key suggested), wrong
types and values outside their choices are collected and raised as one ConfigError.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .recipe_values import REPR, check_type, coerce_float, range_problem, suggest, type_name
from .safe_yaml import load_yaml

# Names that mean one thing everywhere (CLI flags, eval tables, the server's model list).
BASE_NAME = "base"  # the plain base model, next to adapters, in eval rows and in the server
QUANTIZATIONS = ("none", "8bit", "4bit")
TASKS = ("causal_lm", "classification", "regression")  # model.task
IGNORE_INDEX = -100  # label of a position that no loss is counted on (PyTorch's convention)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name on the hub


# Which way each metric of an eval row is better (eval/, the web page).
HIGHER_IS_BETTER = {"loss": False, "perplexity": False, "token_accuracy": True,
                    "choice_accuracy": True, "preference_accuracy": True, "reward_accuracy": True,
                    "exact_match": True, "token_f1": True, "rouge_l": True, "bleu": True,
                    # task heads (eval/heads.py)
                    "accuracy": True, "macro_f1": True, "mse": False, "mae": False, "r2": True}

def _choice(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float, hi: float, lo_open: bool = False) -> dict:
    """The values a number may take: lo..hi (lo excluded when lo_open), finite."""
    return {"range": (lo, hi, lo_open)}


# Bounds far beyond any real run, so that a typo or a hostile recipe is refused before a model
# loads instead of ending in MemoryError, a traceback or a run that trains to NaN.
MAX_RANK = 1 << 14
MAX_STEPS = 10**9
MAX_TOKENS = 1 << 20  # a sequence of a million tokens
MAX_BATCH = 1 << 16


@dataclass
class ModelConfig:
    name: str = "default"  # hub id, local folder, or "default" (embedded SmolLM2-135M-Instruct)
    quantization: str = field(default="none", metadata=_choice(*QUANTIZATIONS))
    quant_type: str = field(default="nf4", metadata=_choice("nf4", "fp4"))
    double_quant: bool = True
    dtype: str = field(default="auto", metadata=_choice("auto", "bf16", "fp16", "fp32"))
    # causal_lm: next-token LM; classification / regression: a sequence-classification head
    # on the last real token, trained in full beside the LoRA (data.format: label)
    task: str = field(default="causal_lm", metadata=_choice(*TASKS))
    # classification: default, the labels found in data.train
    num_labels: int | None = field(default=None, metadata=_range(1, 1 << 20))


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata=_range(1, MAX_RANK))
    alpha: float = field(default=32.0, metadata=_range(-1e6, 1e6))
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.99))
    targets: str | list[str] = "auto"  # auto | all-linear | [module names]
    use_rslora: bool = False
    use_dora: bool = False
    # an adapter folder whose weights the run starts from (e.g. GRPO after SFT); its rank,
    # alpha and targets must be the recipe's
    init_from: str | None = None


@dataclass
class DataConfig:
    train: str | list[str] | None = None  # file, folder, glob, or a list of them
    eval: str | list[str] | None = None
    eval_fraction: float = field(default=0.0, metadata=_range(0.0, 0.99))
    format: str = field(
        default="prompt_completion",
        metadata=_choice("text", "prompt_completion", "chat", "alpaca", "sharegpt",
                         "preference", "label"),  # preference: prompt, chosen, rejected
    )
    columns: dict[str, str] | None = None  # role -> column name, e.g. {prompt: input}
    prompt_template: str | None = None  # e.g. "Question: {prompt}\nAnswer: "
    text_unit: str = field(default="line", metadata=_choice("line", "file"))  # for .txt
    max_seq_len: int = field(default=512, metadata=_range(1, MAX_TOKENS))
    packing: bool = True
    train_on_prompt: bool = False
    overlong: str = field(default="truncate", metadata=_choice("truncate", "drop"))


@dataclass
class TrainConfig:
    # optimizer steps; wins over epochs when both are set
    steps: int | None = field(default=None, metadata=_range(1, MAX_STEPS))
    epochs: float | None = field(default=None, metadata=_range(0.0, 1e6, lo_open=True))
    batch_size: int = field(default=4, metadata=_range(1, MAX_BATCH))
    grad_accum: int = field(default=1, metadata=_range(1, MAX_BATCH))
    lr: float = field(default=2e-4, metadata=_range(0.0, 10.0, lo_open=True))
    schedule: str = field(default="cosine", metadata=_choice("cosine", "linear", "constant"))
    warmup_steps: int = field(default=0, metadata=_range(0, MAX_STEPS))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1e3))
    max_grad_norm: float = field(default=1.0, metadata=_range(0.0, 1e9))
    optimizer: str = field(default="adamw", metadata=_choice("adamw", "adamw_8bit"))
    seed: int = field(default=0, metadata=_range(0, 2**63 - 1))
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False  # with gradient_checkpointing: block inputs kept on CPU
    compile: bool | str = "auto"  # auto | true | false: compiled decoder blocks (regional)
    fused_lora: bool = True  # one autograd op per LoRA projection group (peft's path if false)
    # auto: on CPU, short rows (<= kernels/attention.py MAX_LEN tokens) attend through plain
    # matmuls (faster there than SDPA's flash kernel), SDPA elsewhere; sdpa / matmul: always.
    attention: str = field(default="auto", metadata=_choice("auto", "sdpa", "matmul"))
    # auto: Liger's RMSNorm and SwiGLU kernels on CUDA when liger-kernel is installed
    # (the `gpu` extra; kernels/liger.py); true: required (an error where they cannot run).
    liger: bool | str = "auto"
    # 0: only at the end (when there is eval data)
    eval_every: int = field(default=0, metadata=_range(0, MAX_STEPS))
    # stop (and finish: final adapter, summary) once this many evaluations in a row did not
    # lower the best eval loss by more than early_stop_min_delta; 0: never
    early_stop_patience: int = field(default=0, metadata=_range(0, MAX_STEPS))
    early_stop_min_delta: float = field(default=0.0, metadata=_range(0.0, 1e6))
    save_every: int = field(default=0, metadata=_range(0, MAX_STEPS))  # 0: only at the end
    keep_checkpoints: int = field(default=2, metadata=_range(0, 1 << 20))
    log_every: int = field(default=1, metadata=_range(1, MAX_STEPS))
    # consecutive non-finite steps before training stops
    max_bad_steps: int = field(default=5, metadata=_range(1, MAX_STEPS))
    # Under torchrun: how long a rank waits for the others in a collective before the job
    # ends (a rank that dies ends it at once; this bounds one that hangs).
    dist_timeout_s: int = field(default=1800, metadata=_range(1, 10**7))
    # ddp: every rank holds the whole base; fsdp: the frozen base is sharded across ranks
    # (FSDP2), for bases that do not fit one device. The LoRA tensors are replicated either way.
    parallel: str = field(default="ddp", metadata=_choice("ddp", "fsdp"))
    # a recipe with jobs: how many jobs' micro-batches share one forward; 0: auto (1 on CPU,
    # all on CUDA). More stacks bigger matmuls, and holds more activations at once
    jobs_per_forward: int = field(default=0, metadata=_range(0, 1 << 16))
    report_to: list[str] = field(default_factory=list)  # tensorboard, mlflow, wandb (extras)
    # sft: next-token loss; dpo / orpo: preference pairs (data.format: preference). DPO's
    # reference is the same base with the adapter switched off (no second model).
    # grpo: online RL on prompts with rewards (data: any format with a prompt; section grpo)
    objective: str = field(default="sft", metadata=_choice("sft", "dpo", "orpo", "grpo"))
    # DPO's KL strength (IPO's tau)
    dpo_beta: float = field(default=0.1, metadata=_range(0.0, 1e3, lo_open=True))
    dpo_loss: str = field(default="sigmoid", metadata=_choice("sigmoid", "ipo"))
    # DPO's reference log-probs. cached: every pair's, computed once before the first step (a
    # forward per pair, no graph) and kept next to the run (reference_logps.safetensors,
    # reused on resume), so a step runs one forward instead of two; in_step: in every step.
    # The same losses either way; the eval split's are always computed once per run.
    dpo_reference: str = field(default="cached", metadata=_choice("cached", "in_step"))
    # weight of ORPO's odds-ratio term next to the NLL of chosen
    orpo_lambda: float = field(default=0.1, metadata=_range(0.0, 1e3))


@dataclass
class GrpoConfig:
    """train.objective: grpo. The names and defaults are TRL's GRPOConfig's where it has them;
    train.batch_size counts prompts, each sampled num_generations times."""

    num_generations: int = field(default=4, metadata=_range(2, 1 << 12))
    max_completion_length: int = field(default=64, metadata=_range(1, MAX_TOKENS))
    temperature: float = field(default=1.0, metadata=_range(0.0, 100.0, lo_open=True))
    top_p: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    # KL to the adapter-off model; 0: no reference forward at all
    beta: float = field(default=0.0, metadata=_range(0.0, 1e3))
    loss_type: str = field(default="dapo", metadata=_choice("grpo", "dr_grpo", "dapo", "bnpo"))
    epsilon: float = field(default=0.2, metadata=_range(0.0, 10.0))
    epsilon_high: float | None = field(default=None, metadata=_range(0.0, 10.0))  # None: epsilon
    # optimizer steps on each batch of rollouts (> 1: importance ratios to the sampling policy)
    num_iterations: int = field(default=1, metadata=_range(1, 1 << 10))
    scale_rewards: str = field(default="group", metadata=_choice("group", "batch", "none"))
    mask_truncated_completions: bool = False  # completions cut at the length count no loss
    # built-in names (training/rewards.py) or module:function, TRL's signature
    rewards: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None  # default: 1 each
    reference: str = "completion"  # the data role exact_match / token_f1 compare with
    json_schema: dict | None = None  # for the json_schema reward


@dataclass
class OutputConfig:
    dir: str = "runs/adapter"
    # For the model card (README.md) in the adapter folder, in the hub's terms:
    license: str | None = None  # e.g. apache-2.0 (default: the embedded base's, if it is one)
    datasets: list[str] | None = None  # hub dataset ids the data came from


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _field(section: type, key: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise KeyError(f"{section.__name__} has no field {key!r}")
    return fields[key]


def field_choices(section: type, key: str) -> tuple[str, ...]:
    """The values a schema field allows, e.g. `field_choices(DataConfig, "format")`.

    The CLI reads its flag choices here, so a flag and its recipe key never disagree.
    """
    return tuple(_field(section, key).metadata.get("choices", ()))


def field_default(section: type, key: str) -> Any:
    """A schema field's default, e.g. `field_default(DataConfig, "max_seq_len")`."""
    f = _field(section, key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


_SECTION_TYPES = typing.get_type_hints(RunConfig)


def _build_section(name: str, raw: Any, errors: list[str]) -> Any:
    cls = _SECTION_TYPES[name]
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        errors.append(f"{name}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{name}.{key}"
        if key not in fields:
            errors.append(f"{REPR.repr(where)}: unknown key"
                          f"{suggest(str(key)[:100], list(fields))}")
            continue
        value = coerce_float(value, hints[key])
        if not check_type(value, hints[key]):
            errors.append(f"{where}: expected {type_name(hints[key])}, got "
                          f"{REPR.repr(value)}")
            continue
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            errors.append(f"{where}: {REPR.repr(value)} is not one of {', '.join(choices)}"
                          f"{suggest(str(value)[:100], list(choices)) if choices else ''}")
            continue
        problem = range_problem(value, fields[key].metadata.get("range"))
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines of YAML


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text[:200]!r}: expected section.key=value, e.g. "
                          "train.steps=10")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    # "10" -> 10, "[a, b]" -> list
    value = load_yaml(raw, f"override {dotted[:100]}") if raw.strip() else None
    return section, key, value


def _read_recipe(path: Path) -> dict[str, Any]:
    """The recipe file's YAML mapping: a regular UTF-8 file of at most MAX_RECIPE_BYTES."""
    if not path.exists():
        raise ConfigError(f"{path}: recipe file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file; give the path of a YAML recipe")
    with open(path, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; a recipe is a few "
                          "lines of YAML (put data in data files)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte offset {e.start}); save the recipe "
                          "as UTF-8") from None
    raw = load_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return raw


def from_dict(raw: dict[str, Any], source: str = "recipe") -> RunConfig:
    """Validate a nested dict into a RunConfig, raising one ConfigError listing all problems."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    for section in raw:
        if section not in SECTIONS:
            errors.append(f"{REPR.repr(section)}: unknown section"
                          f"{suggest(str(section)[:100], list(SECTIONS))}")
    built = {name: _build_section(name, raw.get(name), errors) for name in SECTIONS}
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return RunConfig(**built)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML recipe (or start from defaults when path is None) and apply overrides.

    Relative data paths in the recipe are resolved against the recipe's folder.
    """
    raw = read_recipe(path, overrides)
    return finish_recipe(raw, path, str(path) if path is not None else "overrides")


def read_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The recipe's raw mapping (defaults when path is None) with the overrides applied."""
    raw = _read_recipe(Path(path)) if path is not None else {}
    for text in overrides:
        section, key, value = _parse_override(text)
        sect = raw.setdefault(section, {})
        if isinstance(sect, dict):
            sect[key] = value
    return raw


def finish_recipe(raw: dict[str, Any], path: str | Path | None, source: str) -> RunConfig:
    """Validate a raw recipe; relative data paths resolve against the recipe's folder."""
    cfg = from_dict(raw, source)
    if path is not None:
        _resolve_data_paths(cfg, Path(path).parent)
    return cfg


def _resolve_data_paths(cfg: RunConfig, base: Path) -> None:
    def fix(p: str) -> str:
        q = Path(p).expanduser()
        # Relative to the working directory first, then to the recipe's own folder.
        if q.is_absolute() or q.exists() or not (base / q).exists():
            return str(q)
        return str(base / q)

    for attr in ("train", "eval"):
        v = getattr(cfg.data, attr)
        if isinstance(v, str):
            setattr(cfg.data, attr, fix(v))
        elif isinstance(v, list):
            setattr(cfg.data, attr, [fix(x) for x in v])


def dump_recipe(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
