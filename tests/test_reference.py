"""Our training loss and LoRA gradients against transformers' own `model(ids, labels=labels)`.

fp32, prompt masking on (labels -100 on the prompt), tiny GPT-2 and Llama. One real step of
ours (`setup` + `step` on a batch of our Batcher, fused chunked loss at label positions only)
is compared with transformers' loss from full logits and its backward. Padded batches go
through transformers as they are; packed rows document by document, each document alone,
the losses weighted by each document's count of trainable tokens: our loss is the mean over
every trainable token of the step.
"""

import pytest
import torch
from conftest import recipe

from adapters.config import IGNORE_INDEX
from adapters.training.trainer import micro_batches, setup, step


def _documents(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of each document of a packed batch: position ids restart at 0."""
    docs = []
    for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = [*torch.nonzero(pos == 0).flatten().tolist(), len(pos)]
        docs += [(ids[s:e], labels[s:e]) for s, e in zip(starts, starts[1:])]
    return docs


def _counted(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _transformers_loss(model, batch: dict, packed: bool) -> torch.Tensor:
    if not packed:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    docs = [(ids, lab) for ids, lab in _documents(batch) if _counted(lab)]  # not the padding
    weights = torch.tensor([_counted(lab) for _, lab in docs], dtype=torch.float32)
    losses = torch.stack([model(input_ids=ids[None], labels=lab[None]).loss for ids, lab in docs])
    return (losses * weights).sum() / weights.sum()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_loss_and_lora_gradients_equal_transformers(tiny_model, tmp_path, packed):
    run = setup(recipe(tiny_model, tmp_path, "train.steps=1", f"data.packing={packed}",
                       "train.max_grad_norm=0"))  # no clipping: the raw gradients
    assert run.dtype == torch.float32
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init would leave every lora_A gradient zero
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lora = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)

    batch = micro_batches(run, 0)[0]
    assert (batch["attention_mask"].ndim == 4) == packed  # several documents per row
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all() and _counted(batch["labels"]) > 0
    if packed:
        assert len(_documents(batch)) > len(batch["input_ids"])
    # transformers' reference through its own SDPA attention; our step through ours (on CPU
    # `train.attention: auto` takes the matmul path of kernels/attention.py).
    base = run.model.get_base_model()
    ours = base.config._attn_implementation
    assert ours == "adapters_auto"
    base.set_attn_implementation("sdpa")
    want_loss = _transformers_loss(run.model, batch, packed)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in lora.items()}
    run.model.zero_grad(set_to_none=True)
    base.set_attn_implementation(ours)

    got = {}

    def capture(optimizer, args, kwargs):  # the gradients our step is about to apply
        got.update({n: p.grad.clone() for n, p in lora.items()})

    run.optimizer.register_step_pre_hook(capture)
    m = step(run)
    assert m["trainable_tokens"] == _counted(batch["labels"])
    assert m["loss"] == pytest.approx(want_loss.item(), abs=1e-5, rel=0)
    assert got.keys() == want.keys()
    for n in lora:
        assert want[n].abs().sum() > 0, f"{n}: no gradient to compare"
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5, msg=n)
