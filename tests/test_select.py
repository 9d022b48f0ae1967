"""Selection: every score is what its definition computes from dense autograd gradients, every allocation
spends exactly the budget in its units, and training after any selection has exact sparse gradients."""

import copy

import pytest
import torch

import usaf
from usaf.engine.allocate import channel_elements, quotas
from usaf.engine.experts import NAMES
from usaf.testing import make_tiny_model

IDS = [torch.randint(6, 320, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
BATCHES = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in IDS]


def _prepared(**kw):
    stock = make_tiny_model("qwen3_moe", seed=0)
    model = copy.deepcopy(stock)
    return stock, usaf.prepare(model, usaf.UsafConfig(quant="none", score_dtype="fp32", **kw))


def _dense_grads(stock, names):
    """Per calibration batch, the dense gradient of each expert stack (stock transformers autograd)."""
    params = dict(stock.named_parameters())
    out = []
    for b in BATCHES:
        for p in stock.parameters():
            p.requires_grad_(False)
            p.grad = None
        for n in names:
            params[n].requires_grad_(True)
        stock(**b).loss.backward()
        out.append({n: params[n].grad.detach().clone() for n in names})
    return out


def test_quotas_are_exact_and_proportional():
    assert quotas([10, 10, 20], 8) == [2, 2, 4]
    q = quotas([7, 13, 1, 29], 11)
    assert sum(q) == 11 and all(0 <= a <= s for a, s in zip(q, [7, 13, 1, 29]))
    assert quotas([3, 3], 10) == [3, 3]  # never more than a unit holds


@pytest.mark.parametrize("score", ["abs", "sq", "signed", "adam", "gw"])
def test_scores_match_their_definition_on_dense_gradients(score):
    stock, handle = _prepared(score=score, density=0.02, allocation="layer")
    usaf.select(handle, BATCHES)
    names = list(handle.deltas())
    grads = _dense_grads(stock, names)
    params = dict(stock.named_parameters())
    for m in handle.trainable_layers:
        keys = [f"{m.prefix}.{n}" for n in NAMES]
        if score == "abs":
            s = [sum(g[k].abs() for g in grads) for k in keys]
        elif score == "sq":
            s = [sum(g[k].square() for g in grads) for k in keys]
        elif score == "signed":
            s = [sum(g[k] for g in grads).abs() for k in keys]
        elif score == "adam":
            s = [sum(g[k] for g in grads).square() / sum(g[k].square() for g in grads).sqrt().clamp_min(1e-38)
                 for k in keys]
        else:
            s = [sum(g[k].abs() for g in grads) * params[k].detach().abs() for k in keys]
        flat = torch.cat([x.reshape(-1) for x in s])
        k = sum(len(m.experts.deltas[n]) for n in NAMES)
        want = set(torch.topk(flat, k).indices.tolist())
        split = s[0].numel()
        got = set(m.experts.deltas[NAMES[0]].indices.tolist()) | {i + split for i in m.experts.deltas[NAMES[1]].indices.tolist()}
        assert len(got & want) >= 0.98 * k, (score, m.index, len(got & want), k)


@pytest.mark.parametrize("allocation", ["global", "layer", "expert", "stack", "channel"])
def test_allocations_spend_the_budget_in_their_units(allocation):
    stock, handle = _prepared(allocation=allocation, density=0.05)
    rep = usaf.select(handle, BATCHES)
    assert rep["active"] == handle.budget() == rep["budget"]
    layers = handle.trainable_layers
    if allocation == "layer":
        want = quotas([sum(m.experts.deltas[n].numel for n in NAMES) for m in layers], handle.budget())
        assert [rep["per_layer"][m.index] for m in layers] == want
    if allocation == "expert":
        units = [(m, e) for m in layers for e in range(m.experts.num_experts)]
        want = quotas([sum(m.experts.deltas[n].per_expert for n in NAMES) for m, _ in units], handle.budget())
        got = [sum(int(((d.indices >= e * d.per_expert) & (d.indices < (e + 1) * d.per_expert)).sum())
                   for d in (m.experts.deltas[n] for n in NAMES)) for m, e in units]
        assert got == want
    if allocation == "stack":  # each stack of each layer its own density, its best elements by score
        units = [(m, n) for m in layers for n in NAMES]
        want = quotas([m.experts.deltas[n].numel for m, n in units], handle.budget())
        assert [len(m.experts.deltas[n]) for m, n in units] == want
        grads = _dense_grads(stock, list(handle.deltas()))
        for m, n in units:  # the default score, |sum dL/dW|, ranked within the stack
            s = sum(g[f"{m.prefix}.{n}"] for g in grads).abs().reshape(-1)
            d = m.experts.deltas[n]
            top = set(torch.topk(s, len(d)).indices.tolist())
            assert len(top & set(d.indices.tolist())) >= 0.98 * len(d), (m.index, n)
    if allocation == "channel":  # whole channels (gate row, up row, down column), at most one partial
        partial = 0
        for m in layers:
            ex = m.experts
            active = {n: set(ex.deltas[n].indices.tolist()) for n in NAMES}
            i = ex.shape("down_proj")[2]
            for e in range(ex.num_experts):
                for j in range(i):
                    ch = channel_elements(m, e, j)
                    hit = sum(len(active[n] & set(ch[n].tolist())) for n in NAMES)
                    full = sum(ch[n].numel() for n in NAMES)
                    assert hit in (0, full) or partial == 0, (m.index, e, j, hit)
                    partial += 0 < hit < full


@pytest.mark.parametrize("allocation", ["channel", "expert", "stack"])
def test_sparse_gradients_stay_exact_after_any_selection(allocation):
    stock, handle = _prepared(allocation=allocation, density=0.05)
    usaf.select(handle, BATCHES)
    b = BATCHES[0]
    handle.model(**b).loss.backward()
    names = list(handle.deltas())
    g = _dense_grads(stock, names)[0]
    for key, d in handle.deltas().items():
        torch.testing.assert_close(d.values.grad, g[key].reshape(-1)[d.indices.long()], rtol=1e-4, atol=1e-7)


def test_random_score_is_seeded_and_allocation_refuses_rigl():
    _, a = _prepared(score="random", density=0.05)
    _, b = _prepared(score="random", density=0.05)
    usaf.select(a, BATCHES)
    usaf.select(b, BATCHES)
    assert all(torch.equal(x.indices, y.indices) for x, y in zip(a.deltas().values(), b.deltas().values()))
    _, h = _prepared(allocation="expert", density=0.05)
    usaf.select(h, BATCHES)
    with pytest.raises(ValueError, match="RigL"):
        usaf.reselect(h, None, BATCHES, 0.3)


@pytest.mark.parametrize("allocation,score", [("global", "abs"), ("global", "random"), ("layer", "gw"),
                                              ("expert", "abs"), ("channel", "sq")])
def test_selection_and_reselection_with_null_experts(allocation, score):
    """longcat_flash routes to identity zero experts (indices >= E) and its gate_up_proj holds rows for them,
    which no expert reads: selection and RigL reselection spend the budget on the experts that compute only,
    and the sparse gradients stay exact."""
    stock = make_tiny_model("longcat_flash", seed=0)
    handle = usaf.prepare(copy.deepcopy(stock), usaf.UsafConfig(quant="none", score_dtype="fp32", density=0.05,
                                                                allocation=allocation, score=score))
    layers = handle.trainable_layers

    def live():  # every active index in the rows of the experts that compute
        return all(int(m.experts.deltas[n].indices.max()) < m.experts.live_numel(n)
                   for m in layers for n in m.experts.names)

    assert handle.expert_elements() == sum(m.experts.live_numel(n) for m in layers for n in m.experts.names) < \
        sum(d.numel for d in handle.deltas().values())
    rep = usaf.select(handle, BATCHES)
    assert rep["active"] == handle.budget() == rep["budget"] and live()
    if allocation in ("global", "layer"):
        opt = usaf.UsafOptimizer(handle, lr=0.02)
        handle.model(**BATCHES[0]).loss.backward()
        opt.step()
        opt.zero_grad()
        rep = usaf.reselect(handle, opt, BATCHES, 0.3)
        assert rep["grown"] > 0 and handle.active() == handle.budget() and live()
    handle.model(**BATCHES[0]).loss.backward()
    with torch.no_grad():  # the dense reference: base + the trained deltas, the trained routers
        params = dict(stock.named_parameters())
        for key, d in handle.deltas().items():
            params[key].add_(d.to_dense())
        for key, p in handle.router_parameters().items():
            params[key].copy_(p)
    g = _dense_grads(stock, list(handle.deltas()))[0]
    for key, d in handle.deltas().items():
        torch.testing.assert_close(d.values.grad, g[key].reshape(-1)[d.indices.long()], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h", "dbrx"])
def test_a_channel_is_the_weights_of_one_intermediate_neuron(family):
    """``channel_elements`` of every layout (gate_up + down; up_proj without a gate + down; dbrx's gate w1, up v1
    and down w2 stored [E, I, H]): zeroing a channel's input rows, its down weights or both removes the same
    neuron from the expert's output, and the channels of an expert tile all its weights once."""
    handle = usaf.prepare(make_tiny_model(family, seed=0), usaf.UsafConfig(quant="none"))
    m = handle.trainable_layers[-1]
    ex = m.experts
    e, j = 3, 5
    x = torch.randn(6, ex.shape(ex.names[0])[2], generator=torch.Generator().manual_seed(0))
    idx, w = torch.full((6, 1), e), torch.ones(6, 1)

    def out(zero: dict) -> torch.Tensor:  # the expert's output with the weights at ``zero`` set to 0
        for n in ex.names:
            at = zero.get(n, torch.empty(0, dtype=torch.int64))
            ex.deltas[n].set(at, -ex.frozen[n].tensor.reshape(-1)[at].float())
        with torch.no_grad():
            return ex(x, idx, w)

    ch = channel_elements(m, e, j)
    down = ex.names[-1]
    whole = out(ch)
    assert (whole - out({})).abs().max() > 1e-4  # the neuron contributes
    torch.testing.assert_close(out({down: ch[down]}), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(out({n: v for n, v in ch.items() if n != down}), whole, rtol=0, atol=1e-6)
    inter = ex.shape(down)[1 if ex.down_transposed else 2]
    for n in ex.names:  # every weight of expert e in exactly one channel
        got = torch.cat([channel_elements(m, e, c)[n] for c in range(inter)])
        per = ex.deltas[n].per_expert
        assert torch.equal(got.sort().values, torch.arange(e * per, (e + 1) * per))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "llama4", "longcat_flash"])
def test_one_calibration_pass_scores_every_layer_exactly(family):
    """Selection runs one forward and one backward per calibration batch (the shared-expert linears scored in
    the same pass), and the replayed backward of each group of experts sums exactly the dense gradients that
    stock autograd gives for every trainable layer: one expert per group gives the same buffers as the whole
    layer at once."""
    from usaf.engine.loss import token_mean_loss
    from usaf.engine.select import DenseScores, _replay, calibrate

    stock = make_tiny_model(family, seed=0)
    handle = usaf.prepare(copy.deepcopy(stock), usaf.UsafConfig(quant="none", score_dtype="fp32", density=0.05))
    forwards = []
    hook = handle.model.get_input_embeddings().register_forward_hook(lambda *a: forwards.append(1))
    cal = calibrate(handle, BATCHES, token_mean_loss)
    hook.remove()
    assert len(forwards) == len(BATCHES)
    assert (cal.linears is not None) == bool(handle.shared)
    layers = handle.trainable_layers
    assert len(layers) > 1 and all(len(cal.calls[m.index]) == len(BATCHES) for m in layers)
    names = [f"{m.prefix}.{n}" for m in layers for n in m.experts.names]
    grads = _dense_grads(stock, names)
    for m in layers:
        ex = m.experts
        whole = DenseScores(ex, torch.float32, 1)
        _replay(m, cal.calls[m.index], whole)
        for e in range(ex.num_experts):
            one = DenseScores(ex, torch.float32, 1, e, e + 1)
            _replay(m, cal.calls[m.index], one)
            for n in ex.names:
                assert torch.equal(one.buffers[n][0], whole.buffers[n][e]), (m.index, e, n)
        for n in ex.names:
            key = f"{m.prefix}.{ex.param_name(n)}"
            want = sum(g[key].abs() for g in grads).view(ex.shape(n))[: ex.num_experts]
            torch.testing.assert_close(whole.buffers[n][: ex.num_experts], want, rtol=1e-4, atol=1e-6)


def test_calibration_records_on_disk_are_the_records_in_memory(tmp_path, monkeypatch, caplog):
    """The calibration pass writes each batch's recorded inputs and output gradients to a temporary file
    (no layer's records stay in memory) and reads back the same bits; where no file can be made, the records
    stay in memory with a warning, and selection picks the same elements either way."""
    from usaf.engine.experts import Captured
    from usaf.engine.loss import token_mean_loss
    from usaf.engine.select import calibrate

    monkeypatch.setenv("USAF_SPILL_DIR", str(tmp_path / "spill"))
    _, handle = _prepared(density=0.05)
    disk = calibrate(handle, BATCHES, token_mean_loss)
    mem = calibrate(handle, BATCHES, token_mean_loss, spill=False)
    assert disk.calls.spilling and not mem.calls.spilling
    for m in handle.trainable_layers:
        assert not any(isinstance(r, Captured) for b in disk.calls._batches[m.index] for r in b)
        pairs = list(zip(disk.calls[m.index], mem.calls[m.index]))
        assert len(pairs) == len(BATCHES)
        for got, want in pairs:
            assert len(got) == len(want) > 0
            for a, b in zip(got, want):
                for f in ("x", "index", "weights", "dout"):
                    assert getattr(a, f).dtype == getattr(b, f).dtype
                    assert torch.equal(getattr(a, f), getattr(b, f)), f
    disk.close()
    assert disk.calls._fd is None

    picked = []
    for where in ("spill", "blocked"):
        if where == "blocked":
            (tmp_path / "blocked").write_text("a file where the directory should be")
            monkeypatch.setenv("USAF_SPILL_DIR", str(tmp_path / "blocked"))
        _, h = _prepared(density=0.05)
        caplog.clear()
        usaf.select(h, BATCHES)
        assert ("stay in memory" in caplog.text) == (where == "blocked")
        picked.append({k: d.indices.clone() for k, d in h.deltas().items()})
    assert picked[0].keys() == picked[1].keys()
    assert all(torch.equal(picked[0][k], picked[1][k]) for k in picked[0])


@pytest.mark.parametrize("score", ["signed", "adam", "abs"])
def test_expert_groups_pick_what_whole_layers_pick(score):
    """The group size (``score_budget_mb``) changes the memory, not the choice."""
    sets = []
    for mb in (0, 64):
        _, handle = _prepared(density=0.05, score_budget_mb=mb, score=score)
        usaf.select(handle, BATCHES)
        sets.append({k: d.indices.clone() for k, d in handle.deltas().items()})
    assert sets[0].keys() == sets[1].keys()
    assert all(torch.equal(sets[0][k], sets[1][k]) for k in sets[0])


def test_top_k_without_a_sort_is_exact_with_ties():
    """``kth_largest`` / ``top_k_masks`` (two histograms of the float bits, no sort-sized temporaries) pick what
    ``torch.topk`` picks, exactly ``k`` also when many scores tie at the threshold (bf16 scores do)."""
    from usaf.engine.allocate import kth_largest, top_k_masks

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        n = int(torch.randint(1, 300, (1,), generator=g))
        x = torch.randint(0, 20, (n,), generator=g).float() / 4
        if trial % 3 == 0:
            x = torch.rand(n, generator=g).bfloat16()
        parts = list(x.split(max(1, n // 3)))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        want = torch.topk(x.float(), k).values
        value, ties = kth_largest(parts, k)
        assert value == float(want.min()) and ties == int((want == want.min()).sum())
        mask = torch.cat(top_k_masks(parts, k))
        assert int(mask.sum()) == k
        assert torch.equal(torch.sort(x.float()[mask]).values, torch.sort(want).values)


def test_a_full_disk_keeps_the_later_calibration_records_in_memory(tmp_path, monkeypatch, caplog):
    """Once a write to the spill file fails (a full disk), the later records stay in memory and the ones
    already written stay readable: every record reads back as it was."""
    import errno
    import os

    from usaf.engine import records
    from usaf.engine.experts import Captured

    def call(seed):
        g = torch.Generator().manual_seed(seed)
        return Captured(torch.randn(5, 8, generator=g).bfloat16(), torch.randint(0, 4, (5, 2), generator=g),
                        torch.rand(5, 2, generator=g), False, torch.randn(5, 8, generator=g).bfloat16())

    store = records.CallRecords([0], directory=tmp_path)
    calls = [call(s) for s in range(3)]
    store.add(0, [calls[0]])
    real = os.pwrite

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "pwrite", full)
    store.add(0, [calls[1], calls[2]])
    monkeypatch.setattr(records.os, "pwrite", real)
    assert not store.spilling and "stay in memory" in caplog.text
    got = [c for batch in store[0] for c in batch]
    assert len(got) == 3
    for a, b in zip(got, calls):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x", "index", "weights", "dout"))
    store.close()


def test_exact_reselection_grows_by_the_selection_score_of_the_trained_model():
    """RigL with ``exact``: the grown elements are the inactive ones with the largest ``|Σg|`` (the selection's
    score) over the batches, of the model as trained so far (base + deltas), by dense autograd."""
    stock, handle = _prepared(score="signed", density=0.02)
    usaf.select(handle, BATCHES)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for d in handle.deltas().values():
            d.values.copy_(torch.randn(len(d), generator=gen) * 0.02)
    trained = copy.deepcopy(stock)  # the effective model: base + the current deltas
    params = dict(trained.named_parameters())
    keys = list(handle.deltas())
    with torch.no_grad():
        for k in keys:
            params[k] += handle.deltas()[k].to_dense().to(params[k].dtype)
    before = {k: set(d.indices.tolist()) for k, d in handle.deltas().items()}
    grads = _dense_grads(trained, keys)
    r = usaf.reselect(handle, None, BATCHES, fraction=0.3, exact=True)
    assert r["grown"] > 0 and handle.active() == handle.budget()
    scores, offsets, off = [], {}, 0
    for k in keys:
        sc = sum(g[k] for g in grads).abs().reshape(-1).clone()
        sc[sorted(before[k])] = -1.0  # active before: never grown
        scores.append(sc)
        offsets[k], off = off, off + sc.numel()
    want = set(torch.topk(torch.cat(scores), r["grown"]).indices.tolist())
    got = {i + offsets[k] for k, d in handle.deltas().items() for i in set(d.indices.tolist()) - before[k]}
    assert len(got) == r["grown"]
    assert len(got & want) >= 0.98 * r["grown"], (len(got & want), r["grown"])


def test_candidate_pool_stays_bounded_when_most_scores_are_zero():
    """A stack whose experts are mostly unvisited scores 0 almost everywhere: the pool keeps its k best (of the
    tied ones, the first in its order) instead of every tie, so it never holds more than 2k entries; it holds
    every positive score, and with distinct scores exactly the top k."""
    from usaf.engine.select import _Pool

    k, group = 50, 1000
    g = torch.Generator().manual_seed(0)
    scores = torch.zeros(20 * group)
    hot = torch.randperm(scores.numel(), generator=g)[:30]
    scores[hot] = torch.rand(30, generator=g) + 0.1  # fewer positive scores than k: zeros fill the pick
    pool = _Pool(k, index=torch.int64)
    most = 0
    for first in range(0, scores.numel(), group):
        pool.add(scores[first : first + group].to(torch.bfloat16), first)
        most = max(most, pool.n)
    assert most <= 2 * k
    vals, idx = pool.result()
    assert idx.numel() == k and set(hot.tolist()) <= set(idx.tolist())
    distinct = torch.randperm(scores.numel(), generator=g).float() + 1  # no ties: the exact top k
    pool = _Pool(k, index=torch.int64)
    for first in range(0, scores.numel(), group):
        pool.add(distinct[first : first + group], first)
    assert sorted(pool.result()[1].tolist()) == sorted(torch.topk(distinct, k).indices.tolist())
