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


# ------------------------------------------------------------------ shared experts (``shared_density``)
# qwen2_moe's shared expert: mlp.shared_expert.{gate,up,down}_proj (nn.Linear), gated by mlp.shared_expert_gate.
SHARED = ("gate_proj", "up_proj", "down_proj")


def _qwen2(shared=0.1, attention=0.0, layers="top:1"):
    model = make_tiny_model("qwen2_moe")
    return model, usaf.prepare(model, usaf.UsafConfig(density=0.02, quant="none", train_layers=layers,
                                                      shared_density=shared, attention_density=attention,
                                                      score_dtype="fp32"))


def test_shared_expert_linears_budget_in_whole_columns():
    model, h = _qwen2(0.1)
    top = h.trainable_layers[0].index
    assert set(h.shared) == {f"model.layers.{top}.mlp.shared_expert.{p}.weight" for p in SHARED}  # not the gate
    assert not h.attention and h.shared_elements() == sum(lin.weight.numel() for lin in h.shared.values())
    batches = [_batch(model, 0), _batch(model, 1)]
    rep = usaf.select(h, batches)
    assert rep["shared_active"] == h.shared_budget() == round(0.1 * h.shared_elements()) > 0
    assert rep["active"] == h.active() == h.expert_active() + h.shared_budget()
    scores = attention_scores(h, batches, token_mean_loss, h.shared)  # the same passes' scores, recomputed
    partial, chosen, left = 0, [], []
    for k, lin in h.shared.items():
        mask = torch.zeros(lin.weight.numel(), dtype=torch.bool)
        mask[lin.usaf_delta.indices.long()] = True
        per = mask.view(lin.weight.shape).sum(0)  # per input column
        rows = lin.weight.shape[0]
        partial += int(((per > 0) & (per < rows)).sum())
        mean = scores[k].float().mean(0)
        chosen += mean[per == rows].tolist()
        left += mean[per == 0].tolist()
    assert partial <= 1 and chosen and left  # whole input columns, at most one in part
    assert min(chosen) >= max(left) * (1 - 1e-5)  # the best columns by mean score


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_shared_units_channel_picks_whole_intermediate_channels(family):
    """--shared-units channel: each chosen unit is one intermediate channel of a shared expert with all its
    weights (gate row j, up row j, down column j), the best by mean score, at most one in part; the budget is
    exact."""
    model = make_tiny_model(family)
    h = usaf.prepare(model, usaf.UsafConfig(density=0.05, quant="none", train_layers="top:2", shared_density=0.2,
                                            shared_units="channel"))
    batches = [_batch(model, 0), _batch(model, 1)]
    rep = usaf.select(h, batches)
    assert rep["shared_active"] == h.shared_budget() == round(0.2 * h.shared_elements()) > 0
    scores = attention_scores(h, batches, token_mean_loss, h.shared)
    hidden = model.config.hidden_size
    experts = {}
    for k in h.shared:
        experts.setdefault(k.rsplit(".", 2)[0], []).append(k)
    partial, chosen, left = 0, [], []
    for keys in experts.values():
        assert len(keys) == 3
        count, total, size = 0, 0, 0
        for k in keys:
            lin = h.shared[k]
            mask = torch.zeros(lin.weight.numel(), dtype=torch.bool)
            mask[lin.usaf_delta.indices.long()] = True
            by_row = lin.weight.shape[1] == hidden  # gate, up: [I, hidden]; down: [hidden, I]
            mask = mask.view(lin.weight.shape)
            count = count + (mask.sum(1) if by_row else mask.sum(0))
            s = scores[k].float()
            total = total + (s.sum(1) if by_row else s.sum(0))
            size += lin.weight.shape[1] if by_row else lin.weight.shape[0]
        partial += int(((count > 0) & (count < size)).sum())
        mean = total / size
        chosen += mean[count == size].tolist()
        left += mean[count == 0].tolist()
    assert partial <= 1 and chosen and left  # whole channels, at most one in part
    assert min(chosen) >= max(left) * (1 - 1e-5)  # the best channels by mean score


def test_shared_units_channel_refuses_linears_without_a_common_width():
    from usaf.engine.attention import _channel_groups

    lins = {"m.shared_expert.a_proj.weight": torch.nn.Linear(8, 5), "m.shared_expert.b_proj.weight": torch.nn.Linear(6, 8)}
    with pytest.raises(ValueError, match="--shared-units channel"):
        _channel_groups(lins, hidden=8)


def test_attention_and_shared_scored_in_the_same_passes():
    """One backward per calibration batch over every linear: adding the shared experts costs no pass and
    leaves the attention set as it was."""
    calls, sets = {}, {}
    for name, shared in (("attention", 0.0), ("both", 0.1)):
        model, h = _qwen2(shared, attention=0.05)
        n = [0]

        def loss(m, b, n=n):
            n[0] += 1
            return token_mean_loss(m, b)

        rep = usaf.select(h, [_batch(model, 0), _batch(model, 1)], loss_fn=loss)
        assert rep["attention_active"] == h.attention_budget() > 0
        assert rep["shared_active"] == h.shared_budget()
        calls[name] = n[0]
        sets[name] = {k: d.indices.clone() for k, d in h.attention_deltas().items()}
    assert calls["both"] == calls["attention"]
    assert sets["both"].keys() == sets["attention"].keys()
    assert all(torch.equal(sets["both"][k], sets["attention"][k]) for k in sets["both"])


def test_shared_sparse_gradients_equal_dense_autograd():
    """The shared linears' exact sparse backward inside the model equals dense autograd through the same
    model with the deltas merged into plain weights (the gradient of W_eff at the active positions)."""
    model, h = _qwen2(0.1)
    b = _batch(model)
    usaf.select(h, [b])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in h.shared_deltas().values():
            d.values.copy_(torch.randn(len(d), generator=gen) * 0.05)
    loss = token_mean_loss(model, b)
    loss.backward()
    got = {k: d.values.grad.clone() for k, d in h.shared_deltas().items()}
    assert all(bool(g.abs().sum() > 0) for g in got.values())
    for lin in h.shared.values():  # plain nn.Linear over W_eff = round(W + delta), a dense leaf
        linear.merge(lin)
        lin.weight.requires_grad_(True)
    ref = token_mean_loss(model, b)
    ref.backward()
    torch.testing.assert_close(ref, loss, rtol=0, atol=0)
    for k, lin in h.shared.items():
        want = lin.weight.grad.reshape(-1)[lin.usaf_delta.indices.long()]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-8)


def test_shared_deltas_train_merge_and_reload(tmp_path):
    from usaf.train.report import delta_budget
    from usaf.train.trained import delta_config

    model = make_tiny_model("qwen2_moe")
    cfg = usaf.UsafConfig(density=0.05, quant="none", attention_density=0.05, shared_density=0.1)
    h = usaf.prepare(model, cfg)
    b = _batch(model)
    usaf.select(h, [b])
    opt = usaf.UsafOptimizer(h, lr=1e-2, attention_lr=3e-3, shared_lr=None, weight_decay=0.01)
    assert opt.group_names == ["deltas", "routers", "attention", "shared"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-4, 3e-3, 1e-2]
    assert opt.param_groups[3]["weight_decay"] == 0.01
    assert usaf.UsafOptimizer(h, lr=1e-2, shared_lr=1e-3).param_groups[3]["lr"] == 1e-3  # --shared-lr
    group0 = opt.param_groups[0]["params"]  # RigL's positions: the expert deltas only, in order
    assert len(group0) == len(h.deltas()) and all(p is d.values for p, d in zip(group0, h.deltas().values()))
    losses = []
    for _ in range(4):
        loss = token_mean_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(bool(d.values.abs().sum() > 0) for d in h.shared_deltas().values() if len(d))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=b["input_ids"]).logits
        before = {k: lin.weight.detach().clone() for k, lin in h.linears().items()}
        h.merge()
        torch.testing.assert_close(model(input_ids=b["input_ids"]).logits, want, rtol=1e-5, atol=1e-5)
        h.unmerge()
        assert all(torch.equal(lin.weight, before[k]) for k, lin in h.linears().items())
    path = tmp_path / "d.safetensors"
    h.save_delta(path)
    assert delta_config(str(path)).shared_density == 0.1
    budget = delta_budget(path)  # the shared experts' elements are counted apart from the routed experts'
    assert budget["shared"] == sum(len(d) for d in h.shared_deltas().values()) == h.shared_budget()
    assert sum(map(sum, budget["active"])) == h.expert_active()
    other = make_tiny_model("qwen2_moe")
    h2 = usaf.prepare(other, cfg, base_fingerprint=h.fingerprint)
    h2.load_delta(path)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(input_ids=b["input_ids"]).logits, want)


def test_shared_density_without_linear_shared_experts(caplog):
    """A family without nn.Linear shared experts (mixtral has none): a one-line note (info) naming the flag, no
    shared deltas, the routed experts' budget unchanged (the default applies to every family)."""
    with caplog.at_level("INFO", logger="usaf"):
        h = usaf.prepare(make_tiny_model("mixtral"), usaf.UsafConfig(quant="none", shared_density=0.1))
    assert not h.shared and h.shared_budget() == 0
    warned = [r.getMessage() for r in caplog.records if "--shared-density" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "trains nothing" in warned[0]
    with pytest.raises(ValueError, match="shared density"):
        usaf.prepare(make_tiny_model("qwen2_moe"), usaf.UsafConfig(quant="none", shared_density=1.5))
