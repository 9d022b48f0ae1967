"""Sparse deltas on the attention projections (``attention_density``): exact gradients, budgets, merge, files."""

import pytest
import torch

import usaf
import usaf.engine.linear as linear
from usaf.engine.attention import attention_scores
from usaf.engine.linear import attach
from usaf.engine.loss import token_mean_loss
from usaf.testing import make_tiny_model


def _dense_reference(lin, delta, x, dy):
    """The same layer in plain autograd: W_eff = round(W + scatter(values)) (rounding as in the forward)."""
    idx = delta.indices.long()
    vals = delta.values.detach().clone().requires_grad_(True)
    w = lin.weight.detach().reshape(-1)
    w_eff = w.index_put((idx,), (w[idx].float() + vals).to(w.dtype)).view(lin.weight.shape)
    x2 = x.detach().clone().requires_grad_(True)
    y = torch.nn.functional.linear(x2, w_eff, lin.bias)
    (y.float() * dy).sum().backward()
    return y, x2.grad, vals.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_bytes,columns", [(16 << 20, False), (4 * 40 * 3, False), (16 << 20, True)])
def test_sparse_linear_gradients_equal_dense_autograd(dtype, block_bytes, columns, monkeypatch):
    monkeypatch.setattr(linear, "_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 30, bias=True).to(dtype).requires_grad_(False)
    d = attach(lin)
    if columns:  # whole input columns: the dY^T X[:, cols] path
        cols = torch.tensor([3, 17, 29])
        d.set((torch.arange(30).view(-1, 1) * 40 + cols.view(1, -1)).reshape(-1), torch.randn(90) * 0.1)
    else:
        d.set(torch.randperm(1200)[:150], torch.randn(150) * 0.1)
    d.values.requires_grad_(True)
    x = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 7, 30)
    y = lin(x)
    (y.float() * dy).sum().backward()
    y_ref, dx_ref, dv_ref = _dense_reference(lin, d, x, dy)
    assert torch.equal(y, y_ref)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad, dx_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(d.values.grad, dv_ref, atol=1e-5 if dtype == torch.float32 else 1e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)


def _batch(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("score,units", [("abs", "element"), ("sq", "element"), ("signed", "element"),
                                         ("gw", "element"), ("random", "element"), ("abs", "row"),
                                         ("abs", "column")])
def test_attention_budget_and_scores(score, units):
    model = make_tiny_model("qwen3_moe")
    h = usaf.prepare(model, usaf.UsafConfig(density=0.02, quant="none", train_layers="top:1",
                                            attention_density=0.03, score=score, attention_units=units,
                                            score_dtype="fp32"))
    top = h.trainable_layers[0].index
    assert h.attention and all(k.startswith(f"model.layers.{top}.self_attn.") for k in h.attention)
    batches = [_batch(model, 0), _batch(model, 1)]
    rep = usaf.select(h, batches)
    assert rep["attention_active"] == h.attention_budget() == round(0.03 * h.attention_elements())
    assert rep["active"] == h.expert_active() + h.attention_budget()
    if units != "element":  # whole rows / columns, at most one in part
        partial = 0
        for lin in h.attention.values():
            mask = torch.zeros(lin.weight.shape, dtype=torch.bool).view(-1)
            mask[lin.usaf_delta.indices.long()] = True
            per = mask.view(lin.weight.shape).sum(1 if units == "row" else 0)
            full = lin.weight.shape[1 if units == "row" else 0]
            partial += int(((per > 0) & (per < full)).sum())
        assert partial <= 1
    elif score == "abs":  # the chosen elements are the top of sum |dL/dW| computed by plain autograd
        lins = list(h.attention.values())
        for p in h.trainable_parameters():
            p.requires_grad_(False)  # the plain nn.Linear forward (the deltas are zero)
        for lin in lins:
            lin.weight.requires_grad_(True)
        ref = [torch.zeros(lin.weight.shape) for lin in lins]
        for b in batches:
            model.zero_grad()
            token_mean_loss(model, b).backward()
            for r, lin in zip(ref, lins):
                r += lin.weight.grad.abs()
        flat = torch.cat([r.reshape(-1) for r in ref])
        kth = torch.topk(flat, h.attention_budget()).values[-1]
        chosen = torch.cat([flat[sum(r.numel() for r in ref[:i]):][lin.usaf_delta.indices.long()]
                            for i, lin in enumerate(lins)])
        assert bool((chosen >= kth * (1 - 1e-5)).all())
        for lin in lins:
            lin.weight.requires_grad_(False)
            lin.weight.grad = None
        for p in h.trainable_parameters():
            p.requires_grad_(True)
        got = attention_scores(h, batches, token_mean_loss)
        for r, k in zip(ref, h.attention):
            torch.testing.assert_close(got[k], r, rtol=1e-5, atol=1e-7)


def test_attention_deltas_train_merge_and_reload(tmp_path):
    model = make_tiny_model("mixtral")
    h = usaf.prepare(model, usaf.UsafConfig(density=0.05, quant="none", attention_density=0.05))
    b = _batch(model)
    usaf.select(h, [b])
    opt = usaf.UsafOptimizer(h, lr=1e-2, attention_lr=3e-3)
    assert opt.group_names == ["deltas", "routers", "attention"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-4, 3e-3]
    losses = []
    for _ in range(4):
        loss = token_mean_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(bool(d.values.abs().sum() > 0) for d in h.attention_deltas().values() if len(d))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=b["input_ids"]).logits
        before = {k: lin.weight.detach().clone() for k, lin in h.attention.items()}
        h.merge()
        torch.testing.assert_close(model(input_ids=b["input_ids"]).logits, want, rtol=1e-5, atol=1e-5)
        h.unmerge()
        assert all(torch.equal(lin.weight, before[k]) for k, lin in h.attention.items())
    h.save_delta(tmp_path / "d.safetensors")
    other = make_tiny_model("mixtral")
    h2 = usaf.prepare(other, usaf.UsafConfig(density=0.05, quant="none", attention_density=0.05),
                      base_fingerprint=h.fingerprint)
    h2.load_delta(tmp_path / "d.safetensors")
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(input_ids=b["input_ids"]).logits, want)
