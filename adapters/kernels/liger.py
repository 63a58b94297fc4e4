"""Liger kernels on CUDA: RMSNorm and SwiGLU from the kept `liger-kernel` library.

Liger (LinkedIn; Triton) fuses the elementwise work around the matmuls of a Llama-family block.
`train.liger: auto` (the default) applies its RMSNorm and SwiGLU to the loaded model when
the run is on CUDA, `liger-kernel` is installed (`pip install 'adapterkit[gpu]'`) and Liger
knows the architecture; everywhere else transformers' own PyTorch modules run, so CPU runs
and runs without the extra are exactly as before. Liger patches the modules' forwards only:
the q/k/v and gate/up/down projections stay peft's LoRA layers (and our fused LoRA op), the
parameter names and so the adapter folder do not change.

The loss stays ours (kernels/ce.py): chunked, full-vocabulary logits never exist, the same on
CPU and CUDA, so Liger's fused linear cross-entropy is not used. Liger also replaces names in
the architecture's modeling module (its norm and MLP classes, its rotary function), which would
reach every later model of that architecture in the process, CPU ones included (a merge check
loads the base on CPU): those names are put back at once, so only this model's modules are
Liger's. Its RoPE exists only as such a module-level function, so RoPE stays transformers'.
"""

from __future__ import annotations

import importlib.util
import sys

from ..errors import ConfigError

CHOICES = ("auto", "true", "false")
KERNELS = {"rms_norm": True, "swiglu": True, "rope": False,  # see the module docstring
           "cross_entropy": False, "fused_linear_cross_entropy": False}  # the loss is ours


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def supported(model_type: str) -> bool:
    """Whether Liger has kernels for this architecture (its own table)."""
    # liger-kernel is the optional `gpu` extra: imported only where it is about to be used.
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def choose(setting: bool | str, device: str, model_type: str) -> tuple[bool, str]:
    """(apply Liger?, why) for `train.liger` on this device and architecture.

    `true` where Liger cannot run is a ConfigError naming the reason, not a silent no-op."""
    setting = {True: "true", False: "false"}.get(setting, setting)
    if setting not in CHOICES:
        raise ConfigError(f"train.liger: {setting!r} is not one of {', '.join(CHOICES)}")
    if setting == "false":
        return False, "train.liger=false"
    why_not = None
    if not device.startswith("cuda"):
        why_not = "Liger's kernels are Triton, CUDA only"
    elif not installed():
        why_not = "liger-kernel is not installed (pip install 'adapterkit[gpu]')"
    elif not supported(model_type):
        why_not = f"Liger has no kernels for model type {model_type!r}"
    if why_not is None:
        return True, f"{setting}: RMSNorm, SwiGLU on {device}"
    if setting == "true":
        raise ConfigError(f"train.liger=true: {why_not}; set train.liger=auto or false")
    return False, f"auto: off ({why_not})"


def apply_liger(model) -> None:
    """Patch `model` (a peft model or a plain one) with Liger's RMSNorm and SwiGLU; the
    architecture's modeling module is left as it was."""
    # the optional `gpu` extra, as in `supported`
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modeling = sys.modules[type(base).__module__]
    before = dict(vars(modeling))
    try:
        _apply_liger_kernel_to_instance(model=base, **KERNELS)
    finally:
        for name, value in before.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
