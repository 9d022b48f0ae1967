"""usaf's own merged model: what every export must reproduce, and the checks that compare against it.

- :func:`reference_model`: the base loaded at its on-disk dtype (fingerprint checked), prepared, the delta
  loaded and folded into the frozen stacks (``UsafExperts.fold``): the effective weights training used.
- :func:`check_base`: the base a delta was made for: the checkpoint's fingerprint on disk
  (``usaf.integrity.checkpoint_fingerprint``, nothing loaded), or, for a delta of a model built in memory
  (or of an older usaf), the in-memory fingerprint at any load dtype.
- :func:`compare_logits`: the reload checks (hf, delta, gguf) compare a written file's logits with it.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from ..config import UsafConfig
from ..engine import model as usaf_model
from ..engine.discover import moe_site
from ..engine.families import auto_model_class, family_for, get_path
from ..engine.model import decoder_layers, prepare
from ..integrity import checkpoint_fingerprint
from ..load.hf import load_config, load_model
from .layout import BaseMismatchError, ExportCheckError

BASE_WEIGHTS = ("full", "dequantized")
DEFAULT_BASE_WEIGHTS = "full"
# Relative logit tolerance of the reload check (fp32 forward of identical weights on both sides).
HF_TOLERANCE = 1e-4



def merged_values(orig: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``round_to_dtype(orig + delta)``: the formula training uses (``SparseDelta.add_to``)."""
    return (orig.float() + values).to(orig.dtype)


def _fingerprint_as(model, family, dtype) -> str:
    """``usaf.engine.model.fingerprint`` of ``model`` as if it had been loaded at ``dtype``."""
    idx = usaf_model.sample_index
    samples = {n: p.detach().reshape(-1)[idx(p.numel())].to(dtype) for n, p in model.named_parameters()}
    return usaf_model.fingerprint(model, family, samples)


def _check_memory_fingerprint(model, meta: dict, where: str) -> None:
    """A delta with an in-memory fingerprint: ``base`` loaded, its fingerprint tried at every load dtype."""
    want = meta.get("base_fingerprint")
    family = family_for(model.config)
    got = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        got.append(_fingerprint_as(model, family, dtype))
        if got[-1] == want:
            return
    raise BaseMismatchError(f"the delta was made for another base model than {where} "
                            f"(fingerprint {want}, {where} is {got[0]}, as loaded in memory)")


def check_base(base: str, meta: dict, dtype=torch.float32, model=None) -> None:
    """Refuse a base checkpoint other than the one the delta was made for (``BaseMismatchError``).

    Deltas of a checkpoint (``fingerprint_of: checkpoint``) compare the checkpoint's fingerprint on disk: no
    weights are loaded. Others (a model built in memory, an older usaf) compare the in-memory fingerprint
    of ``model`` (``base`` loaded at ``dtype`` when not given) at bf16, fp32 and fp16."""
    family = family_for(model.config if model is not None else load_config(base))
    if family.model_type != meta.get("model_type", family.model_type):
        raise BaseMismatchError(f"the delta was made for a {meta.get('model_type')} model, {base} is "
                                f"{family.model_type}")
    if meta.get("fingerprint_of") == "checkpoint":
        got = checkpoint_fingerprint(base)
        if got != meta.get("base_fingerprint"):
            raise BaseMismatchError(f"the delta was made for another base model than {base} "
                                    f"(fingerprint {meta.get('base_fingerprint')}, {base} is {got})")
        return
    loaded = model if model is not None else load_model(base, dtype=dtype, device="cpu")
    _check_memory_fingerprint(loaded, meta, base)
    if model is None:
        del loaded
        gc.collect()


def reference_model(base: str, tensors: dict, meta: dict, dtype, quant: str = "none", compute_dtype=None):
    """usaf's model of ``base`` with the delta folded in: what an export must reproduce.

    The model is loaded at ``dtype`` (the on-disk dtype) and its fingerprint checked. With ``quant`` set
    (``dequantized`` base weights), the expert stacks are first cast to ``compute_dtype`` (training's dtype)
    and quantized exactly as training did. Every stack is then replaced by its effective dense weights
    (base + delta, rounded to ``compute_dtype`` as in training, then to ``dtype``), so
    ``handle.layers[i].experts.frozen[name].tensor`` holds what an export writes.
    """

    compute_dtype = compute_dtype or dtype
    if meta.get("fingerprint_of") == "checkpoint":
        check_base(base, meta)  # before loading anything
    model = load_model(base, dtype=dtype, device="cpu")
    if meta.get("fingerprint_of") != "checkpoint":
        check_base(base, meta, model=model)
    if quant != "none":  # training loaded (and so quantized) the experts at its compute dtype
        family = family_for(model.config)
        for layer in decoder_layers(model):
            site = moe_site(layer, family)
            for st in site.layout.stacks if site is not None else ():
                p = get_path(site.experts, st.path)
                p.data = p.data.to(compute_dtype)
    cfg = replace(UsafConfig.from_delta_meta(meta), quant=quant)
    handle = prepare(model, cfg)
    handle.load_delta_state({k: v for k, v in tensors.items()
                             if k.startswith("router::") or k.endswith((".indices", ".values"))})
    for m in handle.layers:
        m.experts.fold(compute_dtype, dtype)  # the forward adds no delta any more
    handle.merge()  # the attention deltas (the expert stacks are folded already)
    return handle


def probe_ids(vocab_size: int, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, n), generator=g)


@torch.no_grad()
def fp32_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.float().eval()
    return model(input_ids=ids, use_cache=False).logits.float()  # no generation cache (hybrid layers)


def compare_logits(ref: torch.Tensor, got: torch.Tensor, tol: float, what: str) -> float:
    """Max |difference| relative to the largest reference logit; raises ExportCheckError above ``tol``."""
    if got.shape != ref.shape:
        raise ExportCheckError(f"check failed: {what} logits have shape {tuple(got.shape)}, expected "
                               f"{tuple(ref.shape)}; output removed")
    err = float((ref - got).abs().max() / ref.abs().max().clamp_min(1.0))
    if not err <= tol:
        raise ExportCheckError(f"check failed: {what} logits differ from usaf's merged model (max relative "
                               f"error {err:.2e} > {tol:.0e}); output removed")
    return err


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a written checkpoint loaded by transformers with the class of its config (a
    vision-language model: its image-text-to-text class, run on text)."""
    try:
        cls = auto_model_class(AutoConfig.from_pretrained(str(path)))
        model = cls.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any load failure is a failed check
        raise ExportCheckError(f"check failed: transformers cannot load the export ({str(e).splitlines()[0]}); "
                               f"output removed") from None
    return fp32_logits(model, ids)




def reference_logits(ref, check: bool):
    """Probe token ids and usaf's fp32 logits for them (computed before the export is written)."""
    if not check:
        return None, None
    ids = probe_ids(ref.model.config.get_text_config().vocab_size)
    return ids, fp32_logits(ref.model, ids)


