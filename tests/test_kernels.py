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


def test_no_more_than_a_bounded_number_of_vocabulary_rows_exist():
    # Watch every tensor the fused loss creates: none has more than rows_per_chunk(V) rows of
    # vocabulary width, whatever the number of rows in the batch.
    from torch.utils._python_dispatch import TorchDispatchMode

    from adapters.kernels.ce import MAX_CHUNK_BYTES, rows_per_chunk

    vocab = MAX_CHUNK_BYTES // (4 * 48) + 1  # a vocabulary for which 47 rows fit the budget
    bound = rows_per_chunk(vocab)
    assert bound == 47
    widest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[1] == vocab:
                    widest.append(t.shape[0])
            return out

    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 8, generator=g, requires_grad=True)
    w = torch.randn(vocab, 8, generator=g) * 0.1
    t = torch.randint(0, vocab, (300,), generator=g)
    with Watch():
        loss = linear_cross_entropy_sum(h, w, t, use_torch=False)
        loss.backward()
    assert widest and max(widest) == bound
    ref = reference_sum(h[:60], w, t[:60])  # the values are still right
    torch.testing.assert_close(linear_cross_entropy_sum(h[:60], w, t[:60]), ref, atol=1e-4,
                               rtol=1e-5)
