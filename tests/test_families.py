"""Every decoder MoE family the installed transformers ships: supported with the numerics, or refused in one line.

The families are enumerated from transformers' registries (``usaf.tiny_configs.moe_families``). For each:

- supported: a tiny seeded model from the generic tiny config; with zero deltas the logits equal the stock
  module's; with random deltas the gradients of the delta values and routers equal dense autograd on the stock
  module with ``base + delta`` weights; one optimizer step on that batch lowers its loss. The three checks share
  one model build;
- or refused: ``usaf.prepare`` / ``family_for`` raise ``UnsupportedModelError`` with one line.

Vision-language models run text-only with their image-text-to-text class (tiny vision / audio towers): those
whose text decoder transformers registers as no CausalLM are enumerated under their own model type; the
wrappers of a CausalLM decoder (aria, ...) run the same checks in their own test.

The CLI round trip (train, export hf / delta, apply, apply --revert) of a subset of the discovered families is
in tests/test_export.py (``ROUNDTRIP``).
"""

import copy

import pytest
import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import usaf
from usaf.engine.families import UnsupportedModelError, family_for
from usaf.testing import FAMILIES, make_tiny_model, moe_families, tiny_config

IDS = torch.randint(6, 320, (1, 8), generator=torch.Generator().manual_seed(1))
DECODERS = sorted(set(moe_families().values()))
# Vision-language wrappers of a CausalLM text decoder that transformers builds only as image-text-to-text
# (the decoder itself is enumerated and checked on its own).
WRAPPERS = sorted(w for w, t in moe_families().items() if w != t and w not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
# The core suite's families run the same checks, and more, in tests/test_engine.py.
CORE = {"gemma4_text" if f == "gemma4" else "llama4_text" if f == "llama4" else f for f in FAMILIES}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run on one thread: a second one only waits on it (on 2 busy cores, 5x the wall time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _param(model, name):
    return dict(model.named_parameters())[name]


def _status(family):
    """("refused", message) or ("supported", (stock, prepared model, handle))."""
    try:  # the tiny config (a default config may count no experts); vision-language wrappers: their own
        config = tiny_config(family)
    except ValueError:
        config = AutoConfig.for_model(family)
    try:
        family_for(config)
    except UnsupportedModelError as e:
        return "refused", str(e)
    try:
        stock = make_tiny_model(family, seed=0)
    except ModuleNotFoundError as e:  # e.g. inkling_mm_model's vision tower plans its scales with scipy
        pytest.skip(f"{family} needs {e.name} to build")
    model = copy.deepcopy(stock)
    try:
        handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05))
    except UnsupportedModelError as e:
        return "refused", str(e)
    return "supported", (stock, model, handle)


def test_enumeration_finds_the_families():
    fams = moe_families()
    assert {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text"} <= set(fams.values())
    assert fams["gemma4"] == "gemma4_text" and fams["aria"] == "aria_text"  # wrappers -> their CausalLM decoder
    assert "llama" not in fams and "qwen3" not in fams  # dense decoders are not listed
    assert {"jamba", "qwen3_next", "lfm2_moe", "bailing_hybrid"} <= set(DECODERS)  # hybrids are listed


@pytest.mark.parametrize("family,names", [("nemotron_h", ("up_proj", "down_proj")),
                                          ("dbrx", ("mlp.w1", "mlp.v1", "mlp.w2")),
                                          ("jetmoe", ("input_linear.weight", "output_linear.weight"))])
def test_no_gate_flat_and_block_held_experts_train_under_their_own_names(family, names):
    """nemotron_h (``has_gate=False``: up_proj + relu2), dbrx (2-D w1 / v1 / w2) and jetmoe (stacks held by its
    MoE block) are supported (the checks below run on them), and their deltas carry the model's own parameter
    names and sizes."""
    status, info = _status(family)
    assert status == "supported", info
    stock, _, handle = info
    params = dict(stock.named_parameters())
    for key, d in handle.deltas().items():
        assert params[key].numel() == d.numel, key
    assert {m.key(n)[len(m.prefix) + 1:] for m in handle.trainable_layers for n in m.experts.names} == set(names)


def test_latent_experts_find_the_router_on_the_hidden_width():
    """nemotron_h with ``moe_latent_size`` (published in larger Nemotron-H): the experts run on a projected
    width, the router scores the hidden states ([E, hidden], not [E, latent])."""
    stock = make_tiny_model("nemotron_h", seed=0, moe_latent_size=32)
    model = copy.deepcopy(stock)
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05))
    assert list(handle.router_parameters()) == ["model.layers.1.mixer.gate.weight"]
    assert handle.layers[0].experts.shape("up_proj")[2] == 32
    with torch.no_grad():
        assert _rel(model(IDS, use_cache=False).logits, stock(IDS, use_cache=False).logits) <= 1e-5


def test_enumeration_lists_vision_language_models_under_their_own_type():
    fams = moe_families()
    assert fams["qwen3_vl_moe"] == "qwen3_vl_moe" and fams["ernie4_5_vl_moe"] == "ernie4_5_vl_moe"
    assert {"aria", "minimax_m3_vl"} <= set(WRAPPERS)


@pytest.mark.parametrize("family", [f for f in DECODERS if f not in CORE] + WRAPPERS)
def test_family_supported_with_numerics_or_refused_in_one_line(family):
    status, info = _status(family)
    if status == "refused":
        assert info and "\n" not in info
        return
    stock, model, handle = info
    with torch.no_grad():
        ref = stock(IDS, use_cache=False).logits
        out = model(IDS, use_cache=False).logits
    assert _rel(out, ref) <= 1e-5  # zero deltas: the stock model

    g = torch.Generator().manual_seed(0)
    for d in handle.deltas().values():
        k = max(1, d.numel // 20)
        d.set(torch.randperm(d.numel, generator=g)[:k], torch.randn(k, generator=g) * 0.02)
    dense = stock  # the reference logits are taken: the stock model becomes the dense base + delta model
    for p in dense.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for key, d in handle.deltas().items():  # dbrx: 2-D [E*I, H] tensors, the same flat order as [E, I, H]
            p = _param(dense, key)
            p.add_(d.to_dense().view_as(p))
    for key in list(handle.deltas()) + list(handle.router_parameters()):
        _param(dense, key).requires_grad_(True)
    loss_ref = dense(IDS, labels=IDS, use_cache=False).loss
    loss_ref.backward()
    opt = usaf.UsafOptimizer(handle, lr=0.02, router_lr=0.01)
    opt.zero_grad()
    loss = model(IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for key, d in handle.deltas().items():
        want = _param(dense, key).grad.reshape(-1)[d.indices.long()]
        torch.testing.assert_close(d.values.grad, want, rtol=1e-4, atol=1e-7)
    for key, p in handle.router_parameters().items():
        torch.testing.assert_close(p.grad, _param(dense, key).grad, rtol=1e-4, atol=1e-7)

    first = loss.item()  # one optimizer step on this batch lowers its loss
    opt.step()
    with torch.no_grad():
        assert model(IDS, labels=IDS, use_cache=False).loss.item() < first
