"""The fused linear + CE against the plain lm_head + cross_entropy reference."""

import pytest
import torch

from adapters.kernels.ce import _HAS_TORCH_LCE, linear_cross_entropy_sum, reference_sum

PATHS = [False] + ([True] if _HAS_TORCH_LCE else [])


def _inputs(weight_grad: bool, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(101, 16, generator=g).mul_(0.3).requires_grad_(weight_grad)
    b = torch.randn(101, generator=g).requires_grad_(weight_grad) if bias else None
    t = torch.randint(0, 101, (37,), generator=g)
    return h, w, b, t


def _grads(fn, h, w, b, t, **kw):
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    loss = fn(h, w, t, b, **kw)
    loss.backward()
    return loss.detach(), h.grad.clone(), None if w.grad is None else w.grad.clone()


@pytest.mark.parametrize("use_torch", PATHS)
@pytest.mark.parametrize("weight_grad", [False, True])  # frozen lm_head, trainable lm_head
def test_fused_matches_reference(use_torch, weight_grad):
    h, w, b, t = _inputs(weight_grad)
    ref = _grads(reference_sum, h, w, b, t)
    got = _grads(linear_cross_entropy_sum, h, w, b, t, chunk=8, use_torch=use_torch)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    if weight_grad:
        torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-5)
    else:
        assert got[2] is None


def test_custom_kernel_with_bias():
    h, w, b, t = _inputs(True, bias=True)
    ref_loss = reference_sum(h, w, t, b)
    ref_loss.backward()
    ref_b = b.grad.clone()
    b.grad = None
    linear_cross_entropy_sum(h, w, t, b, chunk=5, use_torch=False).backward()
    torch.testing.assert_close(b.grad, ref_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_torch", PATHS)
def test_tied_lm_head_gradient_flows_into_embedding(use_torch):
    # A tied head is the input embedding: the gradient of both uses must add up.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (12,))
    target = torch.randint(0, 50, (12,))

    def run(fn, **kw):
        emb.weight.grad = None
        h = emb(ids) * 2.0
        fn(h, emb.weight, target, None, **kw).backward()
        return emb.weight.grad.clone()

    torch.testing.assert_close(run(linear_cross_entropy_sum, chunk=4, use_torch=use_torch),
                               run(reference_sum), atol=1e-5, rtol=1e-5)


def test_empty_selection_keeps_graph():
    h = torch.randn(0, 4, requires_grad=True)
    loss = linear_cross_entropy_sum(h, torch.randn(10, 4), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
