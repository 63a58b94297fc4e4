"""`train.liger`: Liger's kernels on CUDA when installed, transformers' modules everywhere else.

The choice rules run on any machine; the equality of a Liger-patched step with the plain one
needs CUDA and liger-kernel (scripts/gpu_check.sh runs this file on a lent GPU)."""

import logging
import sys
import types

import pytest
import torch
from conftest import recipe
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from adapters.errors import ConfigError
from adapters.kernels import liger
from adapters.kernels.liger import choose
from adapters.training.trainer import micro_batches, setup

CUDA_AND_LIGER = torch.cuda.is_available() and liger.installed()


def test_auto_is_off_on_cpu_and_true_there_is_an_error():
    assert choose("auto", "cpu", "llama") == (False, "auto: off (Liger's kernels are Triton, "
                                                     "CUDA only)")
    assert choose(False, "cuda:0", "llama") == (False, "train.liger=false")
    with pytest.raises(ConfigError, match="train.liger=true: Liger's kernels are Triton, CUDA"):
        choose("true", "cpu", "llama")
    with pytest.raises(ConfigError, match="train.liger: 'yes' is not one of auto, true, false"):
        choose("yes", "cpu", "llama")


def test_without_the_extra_auto_stays_off_and_true_names_the_install(monkeypatch):
    monkeypatch.setattr(liger, "installed", lambda: False)
    on, why = choose("auto", "cuda:0", "llama")
    assert not on and "pip install 'adapterkit[gpu]'" in why
    with pytest.raises(ConfigError, match=r"adapterkit\[gpu\]"):
        choose(True, "cuda:0", "llama")


def test_an_architecture_liger_does_not_know_stays_plain(monkeypatch):
    monkeypatch.setattr(liger, "installed", lambda: True)
    monkeypatch.setattr(liger, "supported", lambda model_type: model_type == "llama")
    assert choose("auto", "cuda:0", "llama")[0]
    on, why = choose("auto", "cuda:0", "gpt2")
    assert not on and "no kernels for model type 'gpt2'" in why


def test_preflight_line_names_the_liger_choice(tiny_llama, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="adapters"):
        run = setup(recipe(tiny_llama, tmp_path, "train.steps=1"))
    line = next(r.getMessage() for r in caplog.records if "pre-flight" in r.getMessage())
    assert "liger auto: off (Liger's kernels are Triton, CUDA only)" in line
    assert run.speed["liger"] is False


def _loss_and_grads(run, batch):
    run.model.zero_grad(set_to_none=True)
    loss = run.model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in run.model.named_parameters()
                         if p.requires_grad}


@pytest.mark.skipif(not CUDA_AND_LIGER, reason="needs CUDA and liger-kernel (gpu_check.sh)")
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_liger_step_equals_the_plain_step_on_cuda(tiny_llama, tmp_path, dtype, tol):
    runs = {}
    for name, setting in (("plain", "false"), ("liger", "true")):
        runs[name] = setup(recipe(tiny_llama, tmp_path / name, "train.steps=1",
                                  f"model.dtype={dtype}", f"train.liger={setting}"),
                           device="cuda")
    assert runs["liger"].speed["liger"] is True
    batch = {k: v for k, v in micro_batches(runs["plain"], 0)[0].items()
             if k in ("input_ids", "attention_mask", "position_ids", "labels")}
    batch = {k: v.to("cuda") for k, v in batch.items()}
    (lp, gp), (ll, gl) = (_loss_and_grads(runs[n], batch) for n in ("plain", "liger"))
    assert ll == pytest.approx(lp, rel=tol)
    for n in gp:
        torch.testing.assert_close(gl[n], gp[n], atol=tol, rtol=tol, msg=n)


def test_apply_patches_this_model_only(tiny_llama, monkeypatch):
    """Liger's apply functions also rebind names in the architecture's modeling module (its
    RMSNorm class, its rotary function): apply_liger puts them back, so a model built later in
    the process (a merge check on CPU) is transformers' own. Stood in for by a function that
    does what Liger's does to the module and to the instance."""
    seen = {}

    def fake_apply(model, **kwargs):
        seen.update(kwargs)
        modeling_llama.LlamaRMSNorm = object  # what Liger does at module level
        modeling_llama.apply_rotary_pos_emb = None
        model.model.norm.forward = lambda x: x  # and on the instance

    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    norm_cls, rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    liger.apply_liger(model)
    assert modeling_llama.LlamaRMSNorm is norm_cls
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert model.model.norm.forward(3) == 3  # the instance keeps its patch
    assert seen["rope"] is False and seen["fused_linear_cross_entropy"] is False
