"""Core engine numerics against stock transformers and torch, for every supported family."""

import copy

import pytest
import torch

import usaf
from usaf.engine.experts import NAMES
from usaf.engine.families import UnsupportedModelError
from usaf.engine.model import effective_weight
from usaf.testing import FAMILIES, make_tiny_model

torch.manual_seed(0)
IDS = torch.randint(6, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def _prepared(family, quant="none", density=0.05, **kw):
    stock = make_tiny_model(family, seed=0)
    model = copy.deepcopy(stock)
    handle = usaf.prepare(model, usaf.UsafConfig(quant=quant, density=density, **kw))
    return stock, model, handle


def _random_deltas(handle, frac=0.05, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    for d in handle.deltas().values():
        k = max(1, int(frac * d.numel))
        d.set(torch.randperm(d.numel, generator=g)[:k], torch.randn(k, generator=g) * scale)


def _stock_param(model, name):
    return dict(model.named_parameters())[name]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_delta_logits_equal_stock(family):
    stock, model, handle = _prepared(family)
    with torch.no_grad():
        ref = stock(IDS).logits
        out = model(IDS).logits
    assert _rel(out, ref) <= 1e-5
    assert all(len(d) == 0 for d in handle.deltas().values())


def test_sparse_grad_gather_and_gemm_paths_agree():
    from usaf.engine import experts

    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(7, 30, generator=g), torch.randn(7, 20, generator=g)
    idx = torch.randperm(600, generator=g)[:9]
    dense = (left.t() @ right).reshape(-1)[idx]
    torch.testing.assert_close(experts._sparse_grad(left, right, idx, gather_cost=0.0), dense, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(experts._sparse_grad(left, right, idx, gather_cost=1e9), dense, rtol=1e-5,
                               atol=1e-6)
    # through a workspace reused across calls of other sizes, and with gathers in several chunks
    from usaf.engine.store import Workspace

    ws = Workspace()
    for cost in (0.0, 1e9, 0.0):
        other = experts._sparse_grad(right, left, idx[:4] % 140, gather_cost=cost, workspace=ws)
        torch.testing.assert_close(other, (right.t() @ left).reshape(-1)[idx[:4] % 140], rtol=1e-5, atol=1e-6)
        got = experts._sparse_grad(left, right, idx, gather_cost=cost, workspace=ws)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)
    monkey = experts.GATHER_CHUNK
    try:
        experts.GATHER_CHUNK = 14  # two indices per chunk at 7 rows
        torch.testing.assert_close(experts._sparse_grad(left, right, idx, gather_cost=0.0, workspace=ws), dense,
                                   rtol=1e-5, atol=1e-6)
    finally:
        experts.GATHER_CHUNK = monkey


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gather_cost", [0.0, 1e9])  # gather-dot path, GEMM-then-gather path
def test_values_and_router_gradients_equal_dense_autograd(family, gather_cost, monkeypatch):
    from usaf.engine import experts

    monkeypatch.setattr(experts, "GATHER_COST", gather_cost)
    stock, model, handle = _prepared(family)
    _random_deltas(handle)
    # Dense reference: the stock model with base + delta, expert stacks and routers trainable.
    ref = copy.deepcopy(stock)
    for p in ref.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for key, d in handle.deltas().items():
            _stock_param(ref, key).add_(d.to_dense())
    for key in handle.deltas():
        _stock_param(ref, key).requires_grad_(True)
    for key in handle.router_parameters():
        _stock_param(ref, key).requires_grad_(True)
    loss_ref = ref(IDS, labels=IDS).loss
    loss_ref.backward()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for key, d in handle.deltas().items():
        dense = _stock_param(ref, key).grad.reshape(-1)[d.indices.long()]
        torch.testing.assert_close(d.values.grad, dense, rtol=1e-4, atol=1e-7)
    for key, p in handle.router_parameters().items():
        torch.testing.assert_close(p.grad, _stock_param(ref, key).grad, rtol=1e-4, atol=1e-7)


def _backward_agrees(out, ref, inputs, ref_inputs, g):
    """Backpropagate one random dY through ``out`` and ``ref``; the inputs' gradients agree."""
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    ref.backward(dy)
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_fused_experts_equal_the_dense_reference(family):
    """ExpertsFunction (blocks, padding, fused gather/scatter) against engine/reference.py: outputs, input and
    routing-weight gradients, and the delta values' gradients read from the dense weight gradients."""
    from usaf.engine.reference import reference_experts

    _, _, handle = _prepared(family)
    _random_deltas(handle)
    ex = handle.layers[-1].experts
    g = torch.Generator().manual_seed(3)
    T, K, E = 40, 2, ex.num_experts
    x = torch.randn(T, ex.shape("down_proj")[2 if ex.transposed else 1], generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, requires_grad=True)
    on_input = family == "llama4_text"
    out = ex(x, idx, w, score_on_input=on_input) if on_input else ex(x, idx, w)
    gu = effective_weight(handle.layers[-1], "gate_up_proj", torch.float32).requires_grad_(True)
    dn = effective_weight(handle.layers[-1], "down_proj", torch.float32).requires_grad_(True)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = reference_experts(x2, idx, w2, gu, dn, ex._gate, ex.transposed, ex.gate_up_bias, ex.down_bias,
                            score_on_input=on_input)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    _backward_agrees(out, ref, (x, w), (x2, w2), g)
    for name, dense in (("gate_up_proj", gu.grad), ("down_proj", dn.grad)):
        d = ex.deltas[name]
        torch.testing.assert_close(d.values.grad, dense.reshape(-1)[d.indices.long()], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("family", ["longcat_flash", "zaya"])
def test_null_expert_routes_equal_the_stock_experts(family, lean):
    """Routes to indices >= E (null experts the router also scores): longcat_flash's zero experts add ``w * x``
    (identity), zaya's skip expert (index E) adds nothing. The fused function against the family's stock
    experts module with base + delta weights, and engine/reference.py: outputs, input and routing-weight
    gradients, and the delta values' gradients."""
    from usaf.engine.reference import reference_experts

    stock, _, handle = _prepared(family)
    _random_deltas(handle)
    m = handle.layers[-1]
    ex = m.experts
    ex.set_mode(lean=lean)
    g = torch.Generator().manual_seed(3)
    n_null = ex.shape("gate_up_proj")[0] - ex.num_experts if family == "longcat_flash" else 1
    T, K, E = 40, 2, ex.num_experts
    x = torch.randn(T, ex.shape("down_proj")[1], generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E + n_null, generator=g)[:K] for _ in range(T)])
    assert (idx >= E).any() and (idx < E).any()
    w = torch.rand(T, K, generator=g, requires_grad=True)
    out = ex(x, idx, w)
    stock_ex = dict(stock.named_modules())[m.prefix]
    gu = torch.nn.Parameter(effective_weight(m, "gate_up_proj", torch.float32))
    dn = torch.nn.Parameter(effective_weight(m, "down_proj", torch.float32))
    stock_ex.gate_up_proj, stock_ex.down_proj = gu, dn
    if hasattr(stock_ex, "config"):  # the module's own loop: transformers' grouped_mm leaves index E undefined
        stock_ex.config._experts_implementation = "eager"
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = stock_ex(x2, idx, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        dense = reference_experts(x, idx, w, gu, dn, ex._gate, null_identity=family == "longcat_flash")
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    _backward_agrees(out, ref, (x, w), (x2, w2), g)
    if family == "longcat_flash":  # the identity routes' weights have a gradient (dY . x)
        assert bool((w.grad[idx >= E] != 0).all())
    for name, p in (("gate_up_proj", gu), ("down_proj", dn)):
        d = ex.deltas[name]
        torch.testing.assert_close(d.values.grad, p.grad.reshape(-1)[d.indices.long()], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_base_error_bound(family):
    stock, model, handle = _prepared(family, quant="4bit")
    with torch.no_grad():
        ref = stock(IDS).logits
        out = model(IDS).logits
    # Stated bounds (docs/quantization.md), relative logits error of the tiny random models, every expert
    # quantized, routing flips included: 4-bit g64 <= 0.25 (measured 0.009-0.23), 8-bit <= 0.02 (<= 0.011).
    assert 0 < _rel(out, ref) <= 0.25
    _, model8, _ = _prepared(family, quant="8bit")
    with torch.no_grad():
        out8 = model8(IDS).logits
    assert _rel(out8, ref) <= 0.02


def test_no_expert_sized_tensor_requires_grad_and_only_active_positions_change():
    stock, model, handle = _prepared("qwen3_moe", quant="none", density=0.02)
    seq = torch.arange(24) % 5 + 10
    batches = [{"input_ids": seq.repeat(2, 1), "labels": seq.repeat(2, 1)}]
    usaf.select(handle, batches)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dim() <= 2 and ("values" in name or "gate" in name or "router" in name), name
    base = {(m.index, n): effective_weight(m, n).clone() for m in handle.trainable_layers for n in NAMES}
    opt = usaf.UsafOptimizer(handle, lr=1e-2)
    for _ in range(3):
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    for m in handle.trainable_layers:
        for n in NAMES:
            changed = (effective_weight(m, n) != base[(m.index, n)]).reshape(-1).nonzero().squeeze(1)
            active = set(m.experts.deltas[n].indices.tolist())
            assert changed.numel() > 0 and set(changed.tolist()) <= active


def test_compact_adamw_equals_torch_adamw_on_dense_restricted():
    torch.manual_seed(0)
    from usaf.engine.delta import SparseDelta

    shape = (4, 6, 5)
    d = SparseDelta(shape)
    idx = torch.randperm(120)[:17]
    d.set(idx)
    dense = torch.zeros(shape, requires_grad=True)
    opt_d = torch.optim.AdamW([dense], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    opt_c = torch.optim.AdamW([d.values], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    mask = torch.zeros(120, dtype=torch.bool)
    mask[d.indices.long()] = True
    for _ in range(5):
        g = torch.randn(shape)
        dense.grad = (g.reshape(-1) * mask).reshape(shape)
        d.values.grad = g.reshape(-1)[d.indices.long()].clone()
        opt_d.step()
        opt_c.step()
    torch.testing.assert_close(d.values.detach(), dense.detach().reshape(-1)[d.indices.long()], rtol=1e-6,
                               atol=1e-9)
    assert bool((dense.detach().reshape(-1)[~mask] == 0).all())


def test_router_master_weights_follow_adamw():
    _, model, handle = _prepared("qwen3_moe")
    model.to(torch.bfloat16)
    handle2 = handle
    opt = usaf.UsafOptimizer(handle2, lr=0.0, router_lr=1e-2)
    p = next(iter(handle2.router_parameters().values()))
    master = opt.masters[0]
    assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
    ref = master.detach().clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn_like(ref)
        for q in handle2.router_parameters().values():
            q.grad = torch.zeros_like(q)
        p.grad = g.to(torch.bfloat16)
        ref.grad = g.to(torch.bfloat16).float()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(master.detach(), ref.detach())
    assert torch.equal(p.detach(), master.detach().to(torch.bfloat16))


@pytest.mark.parametrize("allocation", ["global", "layer", "stack"])
def test_reselection_keeps_budget_values_and_moments(allocation):
    """RigL keeps the budget (with ``layer`` / ``stack`` allocations: each unit's own count, the fraction
    replaced within each unit), the kept elements' values and moments, and grows with zeros."""
    _, model, handle = _prepared("qwen3_moe", density=0.05, allocation=allocation)
    seq = torch.arange(24) % 7 + 10
    batches = [{"input_ids": seq.repeat(2, 1), "labels": seq.repeat(2, 1)}]
    rep = usaf.select(handle, batches)
    assert rep["active"] == handle.budget()
    opt = usaf.UsafOptimizer(handle, lr=1e-2)
    for _ in range(3):
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    before = {}
    for key, d in handle.deltas().items():
        st = opt.state_of(d.values)
        for i, v, m1, m2 in zip(d.indices.tolist(), d.values.tolist(), st["exp_avg"].tolist(),
                                st["exp_avg_sq"].tolist()):
            before[(key, i)] = (v, m1, m2)
    units = {}  # budget unit -> its active count
    for m in handle.trainable_layers:
        for n in m.experts.names:
            u = "all" if allocation == "global" else m.index if allocation == "layer" else (m.index, n)
            units[u] = units.get(u, 0) + len(m.experts.deltas[n])
    r = usaf.reselect(handle, opt, batches, fraction=0.3)
    assert r["grown"] > 0 and handle.active() == rep["active"]
    after = {}
    for m in handle.trainable_layers:
        for n in m.experts.names:
            u = "all" if allocation == "global" else m.index if allocation == "layer" else (m.index, n)
            had = {j for (k, j) in before if k == m.key(n)}
            new = sum(i not in had for i in m.experts.deltas[n].indices.tolist())
            c, g = after.get(u, (0, 0))
            after[u] = (c + len(m.experts.deltas[n]), g + new)
    assert {u: c for u, (c, _) in after.items()} == units  # every unit keeps its count
    if allocation != "global":  # each unit replaced the fraction of its own elements
        assert {u: g for u, (_, g) in after.items()} == {u: round(0.3 * c) for u, c in units.items()}
    kept = grown = 0
    for key, d in handle.deltas().items():
        st = opt.state_of(d.values)
        for j, i in enumerate(d.indices.tolist()):
            now = (d.values[j].item(), st["exp_avg"][j].item(), st["exp_avg_sq"][j].item())
            if (key, i) in before:
                kept += 1
                assert now == pytest.approx(before[(key, i)], rel=0, abs=0)
            else:
                grown += 1
                assert now == (0.0, 0.0, 0.0)
    assert grown == r["grown"] and kept == rep["active"] - r["dropped"]
    model(**batches[0]).loss.backward()  # the new parameters train
    opt.step()


def test_loss_falls_on_learnable_toy_task():
    _, model, handle = _prepared("mixtral", quant="4bit", density=0.05)
    seq = torch.arange(32) % 7 + 10
    batch = {"input_ids": seq.repeat(4, 1), "labels": seq.repeat(4, 1)}
    usaf.select(handle, [batch])
    opt = usaf.UsafOptimizer(handle, lr=1e-2, router_lr=1e-3)
    losses = []
    for step in range(30):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 15:
            usaf.reselect(handle, opt, [batch], fraction=0.2)
    assert losses[-1] < 0.7 * losses[0]


def test_selection_allocates_by_score_not_fixed_share():
    _, model, handle = _prepared("qwen3_moe", density=0.02)
    seq = torch.arange(24) % 5 + 10
    usaf.select(handle, [{"input_ids": seq.repeat(2, 1), "labels": seq.repeat(2, 1)}])
    shares = [len(d) / d.numel for d in handle.deltas().values()]
    assert handle.active() == handle.budget()
    assert max(shares) > 1.2 * min(shares)  # not 2% of every tensor


def test_delta_file_roundtrip_and_wrong_base_refused(tmp_path):
    _, model, handle = _prepared("olmoe")
    _random_deltas(handle)
    for p in handle.router_parameters().values():
        torch.nn.init.normal_(p.data, std=0.1)
    with torch.no_grad():
        out = model(IDS).logits
    path = tmp_path / "delta.safetensors"
    handle.save_delta(path)
    _, model2, handle2 = _prepared("olmoe")
    meta = handle2.load_delta(path)
    assert meta["base_fingerprint"] == handle.fingerprint and meta["version"] == "1"
    with torch.no_grad():
        assert torch.equal(model2(IDS).logits, out)
    other = copy.deepcopy(make_tiny_model("olmoe", seed=1))
    h3 = usaf.prepare(other, usaf.UsafConfig(quant="none"))
    with pytest.raises(ValueError, match="another base model"):
        h3.load_delta(path)


def test_merge_unmerge_exact():
    _, model, handle = _prepared("qwen2_moe")
    _random_deltas(handle)
    orig = {k: m.experts.frozen[n].tensor.clone() for m in handle.trainable_layers for n in NAMES
            for k in [(m.index, n)]}
    with torch.no_grad():
        out = model(IDS).logits
        handle.merge()
        merged = model(IDS).logits
        handle.unmerge()
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-6)
    for m in handle.trainable_layers:
        for n in NAMES:
            assert torch.equal(m.experts.frozen[n].tensor, orig[(m.index, n)])


def test_dense_model_and_bad_layers_are_clear_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="supported"):
        usaf.prepare(dense)
    with pytest.raises(ValueError, match="train-layers"):
        _prepared("qwen3_moe", train_layers="top:9")
    with pytest.raises(ValueError, match="density"):
        _prepared("qwen3_moe", density=1.5)


def test_train_layers_range_freezes_the_rest():
    _, model, handle = _prepared("deepseek_v3", train_layers="top:1")
    assert [m.index for m in handle.trainable_layers] == [2]
    assert all(not m.trainable for m in handle.layers if m.index != 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients(family, monkeypatch):
    """Lean checkpointing (usaf.engine.checkpointing.enable_checkpointing) gives the gradients of a plain backward,
    router included; where nothing after the experts saves a tensor, the layer recomputation stops
    at the router, so the experts' forward runs once per layer."""
    from usaf.engine import experts as ex
    from usaf.engine.checkpointing import enable_checkpointing

    _, model, handle = _prepared(family)
    _random_deltas(handle, frac=0.01)
    g = torch.Generator().manual_seed(1)
    for d in handle.shared_deltas().values():  # the shared experts' linears (the default --shared-density)
        k = max(1, int(0.01 * d.numel))
        d.set(torch.randperm(d.numel, generator=g)[:k], torch.randn(k, generator=g) * 0.02)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    params = handle.trainable_parameters()
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    enable_checkpointing(handle)
    assert all(m.experts.mode.lean for m in handle.layers)
    calls = []
    fwd = ex.ExpertsFunction.forward
    monkeypatch.setattr(ex.ExpertsFunction, "forward", staticmethod(lambda *a: calls.append(1) or fwd(*a)))
    model(IDS, labels=IDS).loss.backward()
    for a, p in zip(ref, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)
    if family in ("qwen3_moe", "mixtral", "olmoe", "granitemoe"):
        assert len(calls) == len(handle.layers)


@pytest.mark.parametrize("n,k", [(5_000_000, 20_000), ((1 << 18) + 1, 3), (2_000_000, 40_000), (600_000, 1)])
def test_top_candidates_threshold_path_equals_topk(n, k):
    from usaf.engine.select import top_candidates

    g = torch.Generator().manual_seed(n)
    scores = torch.rand(n, generator=g)
    vals, idx = top_candidates(scores, k)
    ref = torch.topk(scores, k)
    # the same values (rand's 24-bit floats repeat, so equal scores at the boundary may be other positions)
    assert idx.numel() == k and idx.unique().numel() == k and torch.equal(scores[idx], vals)
    assert torch.equal(vals.sort().values, ref.values.sort().values)


def test_top_candidates_with_ties_takes_k_of_the_best_values():
    from usaf.engine.select import top_candidates

    scores = torch.rand(1_000_000, generator=torch.Generator().manual_seed(1)).bfloat16()  # many equal values
    vals, idx = top_candidates(scores, 30_000)
    ref = torch.topk(scores, 30_000).values
    assert idx.numel() == 30_000 and idx.unique().numel() == 30_000
    assert torch.equal(scores[idx], vals)
    assert torch.equal(vals.float().sort().values, ref.float().sort().values)


def test_routing_pads_each_expert_to_its_granule_in_pieces():
    from usaf.engine.routing import Routing, block_rows, granule, piece_rows

    assert block_rows(2048, 16) == 128 and block_rows(8192, 64) == 128 and block_rows(4096, 128) == 32
    assert block_rows(10, 64) == 16 and block_rows(1 << 20, 8) == 256
    assert granule(32) == 8 and granule(16) == 4 and piece_rows(32) == 64
    idx = torch.randint(0, 8, (300, 2), generator=torch.Generator().manual_seed(0))
    r = Routing.build(idx, 8)
    g, step = granule(r.block), piece_rows(r.block)
    counts = torch.bincount(idx.reshape(-1), minlength=8).tolist()
    assert r.counts == counts
    shapes = set()
    for e, a, b, c in r.segments(0, 8):
        assert (b - a) % g == 0 and c <= b - a < c + g
        assert (idx.reshape(-1)[r.slot[a : a + c]] == e).all()
        assert r.tok[a : a + c].tolist() == (r.slot[a : a + c] // 2).tolist()
        pieces = list(r.blocks(a, b, c))
        assert [r0 for r0, _, _ in pieces] == list(range(a, b, step))
        assert sum(n for _, n, _ in pieces) == b - a and sum(real for _, _, real in pieces) == c
        assert all(0 < real <= n <= step for _, n, real in pieces)
        shapes |= {n for _, n, _ in pieces}
    assert len(shapes) <= step // g  # few matmul shapes per op


def test_no_backward_below_the_trainable_range_after_checkpointed_selection(monkeypatch):
    """Selection runs checkpointed (lean passes); afterwards, and with checkpointing on, autograd still
    stops at the lowest trainable layer (transformers' checkpointing would make the embeddings require
    grad, running the backward of every frozen layer)."""
    from usaf.engine import experts as ex
    from usaf.engine.checkpointing import enable_checkpointing

    _, model, handle = _prepared("qwen3_moe", train_layers="top:1")
    usaf.select(handle, [{"input_ids": IDS, "labels": IDS}])
    calls = []
    bwd = ex.ExpertsFunction.backward
    monkeypatch.setattr(ex.ExpertsFunction, "backward", staticmethod(lambda *a: calls.append(1) or bwd(*a)))
    model.train()
    for ckpt in (False, True):
        if ckpt:
            enable_checkpointing(handle)
        calls.clear()
        model(IDS, labels=IDS).loss.backward()
        assert len(calls) == 1, ckpt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_equals_autograd_of_the_gate_bit_for_bit(dtype):
    """The backward's own derivative of silu(gate) * up (no autograd call per block) gives exactly the gradients
    of the autograd path it replaces, router and delta values included."""
    stock = make_tiny_model("qwen3_moe", seed=0, dtype=dtype)
    model = copy.deepcopy(stock)
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05))
    _random_deltas(handle)
    assert all(m.experts.swiglu for m in handle.layers)
    grads = []
    for fast in (True, False):
        for m in handle.layers:
            m.experts.swiglu = fast
        params = handle.trainable_parameters()
        for p in params:
            p.grad = None
        model(IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert not _prepared("gpt_oss")[2].layers[0].experts.swiglu  # its own clamped gate: the autograd path
