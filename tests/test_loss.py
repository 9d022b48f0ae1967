"""The chunked LM-head loss equals transformers' loss on full logits: value and gradients, every family."""

from __future__ import annotations

import pytest
import torch

import usaf
from usaf.engine import loss as L
from usaf.engine.loss import token_weighted_loss
from usaf.testing import FAMILIES, make_tiny_model

IDS = torch.randint(6, 300, (2, 12), generator=torch.Generator().manual_seed(3))


def _batch(mask_some: bool) -> dict:
    labels = IDS.clone()
    if mask_some:
        labels[0, :5] = -100  # a prompt: no loss there
    return {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [256, 5])  # one chunk; many chunks (MIN_ROWS lowered)
def test_chunked_loss_equals_full_logits_loss(family, rows, monkeypatch):
    monkeypatch.setattr(L, "MIN_ROWS", rows)
    monkeypatch.setattr(L, "CHUNK_BYTES", 1)
    model = make_tiny_model(family, seed=1)
    if family == "granitemoe":
        model.config.logits_scaling = 4.0  # the scaling path is exercised
    if family == "gemma4":
        model.config.get_text_config().final_logit_softcapping = 3.0  # the soft-cap path is exercised
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.01))
    usaf.select(handle, [_batch(False)])
    with torch.no_grad():
        for d in handle.deltas().values():
            d.values.normal_(0, 0.01)
    b = _batch(True)
    s_ref, n_ref = token_weighted_loss(model(input_ids=IDS, attention_mask=b["attention_mask"]).logits, b["labels"])
    s_ref.backward()
    # a linear whose share of the global shared-expert budget is 0 elements has no gradient either way
    ref = [None if p.grad is None else p.grad.clone() for p in handle.trainable_parameters()]
    for p in handle.trainable_parameters():
        p.grad = None
    s, n = L.lm_loss(model, b, "cpu")
    s.backward()
    assert int(n) == int(n_ref)
    assert abs(s.item() - s_ref.item()) <= 1e-5 * abs(s_ref.item())
    assert sum(g is not None for g in ref) > len(handle.deltas())
    for p, g in zip(handle.trainable_parameters(), ref):
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)  # fp32, summation order differs
    assert type(model.get_output_embeddings()).forward is not None and "forward" not in vars(model.get_output_embeddings())


def test_trainable_head_falls_back_to_full_logits():
    model = make_tiny_model("qwen3_moe")
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen output head"):
        L.chunked_loss(torch.zeros(2, 12, head.weight.shape[1]), head, IDS, model.config)
    b = _batch(False)
    s, n = L.lm_loss(model, b, "cpu")
    s.backward()
    assert head.weight.grad is not None
    s_ref, _ = token_weighted_loss(model(input_ids=IDS).logits, b["labels"])
    assert torch.allclose(s, s_ref)


def test_chunked_loss_gradient_follows_the_upstream_gradient(monkeypatch):
    """The head's gradient is computed in the loss's forward (for an upstream gradient of 1) and scaled in the
    backward: a scaled loss gives scaled gradients, and no gradient is computed without grad mode."""
    monkeypatch.setattr(L, "MIN_ROWS", 5)
    monkeypatch.setattr(L, "CHUNK_BYTES", 1)
    model = make_tiny_model("qwen3_moe", seed=1)
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.01))
    usaf.select(handle, [_batch(False)])
    b = _batch(True)
    s, n = L.lm_loss(model, b, "cpu")
    s.backward()
    ref = [p.grad.clone() for p in handle.trainable_parameters() if p.grad is not None]
    for p in handle.trainable_parameters():
        p.grad = None
    s2, _ = L.lm_loss(model, b, "cpu")
    (s2 * 2.5 / n).backward()
    got = [p.grad for p in handle.trainable_parameters() if p.grad is not None]
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r * 2.5 / n, rtol=1e-2, atol=1e-7)  # bf16 head gradient, scaled after
    with torch.no_grad():
        s3, _ = L.lm_loss(model, b, "cpu")
    assert torch.equal(s3, s2.detach()) and not s3.requires_grad
