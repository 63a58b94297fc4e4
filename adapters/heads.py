"""Task heads: a base loaded with its sequence-classification head (`model.task`).

`classification` and `regression` load the base through `AutoModelForSequenceClassification`
(4/8-bit too; the head itself always stays in full precision): the decoder as the causal LM
has it, the lm_head dropped and a new `score` (or `classifier`) linear layer of `num_labels`
outputs (1 for regression). peft's SEQ_CLS task wraps the head in `modules_to_save`: it is
trained in full beside the LoRA and saved in the adapter folder, where plain peft finds it.
The pad token is written into the model's config, so transformers' own forward pools the
last real token, the one our loop pools (training/heads.py).

The adapter's manifest records the task in its `task` section: type, num_labels and the class
names in id order (`task_section`); `task_of` reads it back.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from .adapter import read_manifest
from .adapter.archive import resolve_adapter
from .adapter.sections import TaskInfo
from .config import ModelConfig
from .errors import ModelError
from .model import (
    default_device,
    load_tokenizer,
    quantization_config,
    resolve_dtype,
    resolve_model_path,
)

HEAD_MODULES = ("score", "classifier")  # what transformers calls the head, per architecture


def head_module(model) -> tuple[str, torch.nn.Module] | None:
    """(name, module) of the sequence-classification head of `model` (or its peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_MODULES:
        m = getattr(base, name, None)
        if isinstance(m, torch.nn.Module):
            return name, m
    return None


def load_head_model(cfg: ModelConfig, labels: list[str] | None, device: str | None = None,
                    seed: int = 0):
    """(model, tokenizer): the base with a new head, in eval mode.

    labels: the class names in id order (classification) or None (regression, one output).
    The head's initial weights are a function of `seed`: the "untrained head" of a base row.
    """
    if cfg.task == "causal_lm":
        raise ModelError("load_head_model is for model.task classification or regression")
    device = device or default_device()
    path = resolve_model_path(cfg.name)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = load_tokenizer(path)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="sdpa",
                                  trust_remote_code=False, pad_token_id=tok.pad_token_id)
    if labels is None:
        kwargs.update(num_labels=1, problem_type="regression")
    else:
        kwargs.update(num_labels=len(labels), problem_type="single_label_classification",
                      id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)})
    qcfg = quantization_config(cfg, dtype)
    if qcfg is not None:
        qcfg.llm_int8_skip_modules = list(HEAD_MODULES)  # the head trains in full precision
        kwargs.update(quantization_config=qcfg, device_map={"": device})
    torch.manual_seed(seed)  # the new head's initial weights
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg.name}: cannot load the model with a sequence-classification "
                         f"head: {e}") from e
    if qcfg is None:
        model.to(device)
    if head_module(model) is None:
        raise ModelError(f"{cfg.name}: its sequence-classification model has no head named "
                         f"{' or '.join(HEAD_MODULES)}")
    model.eval()
    model.config.use_cache = False
    return model, tok


def task_section(model) -> TaskInfo | None:
    """The manifest's `task` section for a model with a head (None for a causal LM)."""
    found = head_module(model)
    if found is None:
        return None
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    if cfg.problem_type == "regression":
        return TaskInfo("regression", 1, found[0])
    return TaskInfo("classification", cfg.num_labels, found[0],
                    [cfg.id2label[i] for i in range(cfg.num_labels)])


def task_of(manifest) -> TaskInfo | None:
    """The `task` section of an adapter's manifest (a Manifest), None for a causal-LM one."""
    task = manifest.task if manifest is not None else None
    if task is None or task.type not in ("classification", "regression"):
        return None
    if task.type == "classification" and not task.labels:
        raise ModelError("manifest.json: section 'task' of a classification adapter needs "
                         "its 'labels' (the class names in id order)")
    return task


def is_task_head(folder) -> bool:
    """Whether the adapter in `folder` (or a .zip of it) has a classification or regression
    head."""
    return task_of(read_manifest(resolve_adapter(folder))) is not None


def labels_of(task: TaskInfo) -> list[str] | None:
    """The class names in id order of a `task` section (None for regression)."""
    return [str(x) for x in task.labels] if task.type == "classification" else None


def model_config_for(task: TaskInfo, **fields) -> tuple[ModelConfig, list[str] | None]:
    """(ModelConfig, labels) to load the base an adapter with this `task` section needs."""
    return ModelConfig(task=task.type, **fields), labels_of(task)


def refuse_task_head(manifest, folder, command: str,
                     instead: str = "use `adapters predict` or `adapters eval`") -> None:
    """ModelError when the adapter in `folder` has a task head, which `command` cannot use
    (generation and the streamed merge handle causal-LM adapters only); `instead` says what
    does."""
    task = task_of(manifest)
    if task is not None:
        raise ModelError(f"{folder}: a {task.type} adapter (a task head); {command} does "
                         f"not handle task heads: {instead}")
