"""The forward from a given decoder layer on: for a frozen prefix whose output is cached.

Layers below the first trainable one never change, so their output for a sequence is a constant that
``usaf.memory.prefix`` computes once and stores. The training forward then starts at the first trainable
layer: the layers below are turned into the identity for the call (:func:`skip_prefix`; layer indices stay
intact, so per-layer attention types, masks and caches behave as in the full model) and the cached hidden
states enter as ``inputs_embeds``. :func:`logits_of` is the one entry point: a full forward, or the forward
from the cache attached to the model (``model.usaf_prefix``: any object with ``start`` and
``batch(index, width) -> (B, width, H)``).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .model import decoder_layers

log = logging.getLogger("usaf")


class _Stop(Exception):
    pass


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def skip_prefix(model: nn.Module, start: int):
    """Temporarily turn decoder layers ``[0, start)`` into the identity."""
    layers = list(decoder_layers(model))[:start]
    for layer in layers:
        layer.forward = _passthrough
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _forget_rope_deltas(model: nn.Module) -> None:
    """Vision-language models with multi-axis RoPE (qwen3_vl_moe, glm4v_moe, ernie4_5_vl_moe, ...) keep the
    ``rope_deltas`` of their last forward for generation and add them when given ``inputs_embeds`` alone: on
    the suffix forward those would be another batch's. Forgotten, the positions follow the mask, as the full
    forward's do on text (``suffix_matches`` checks it)."""
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


def suffix_logits(model: nn.Module, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Logits of the model run from layer ``start`` on, given the hidden states entering it (B, T, H)."""
    _forget_rope_deltas(model)
    with skip_prefix(model, start):
        return model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits


@torch.no_grad()
def prefix_hidden(model: nn.Module, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Hidden states entering layer ``start`` (B, T, H): the model runs only up to that layer."""
    layers = decoder_layers(model)
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    hook = layers[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return captured["h"]


@torch.no_grad()
def suffix_matches(model: nn.Module, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   progress=None) -> bool:
    """Whether starting at layer ``start`` from cached hidden states reproduces the full forward exactly
    (families that transform ``inputs_embeds`` or need the token ids deeper in the stack do not), also when
    other forwards ran between the prefix and the suffix, as in training (a forward that keeps state from its
    last call and reads it when given ``inputs_embeds`` does not). ``progress``: told ``update(1)`` after each
    of the 7 (partial) forwards (a tqdm bar)."""
    one, one_mask = input_ids[:1], attention_mask[:1]
    tick = progress.update if progress is not None else (lambda n: None)
    try:
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        tick(1)
        hidden = prefix_hidden(model, start, input_ids, attention_mask)
        tick(1)
        part = suffix_logits(model, start, hidden, attention_mask)
        tick(1)
        full_one = model(input_ids=one, attention_mask=one_mask, use_cache=False).logits
        tick(1)
        hidden_one = prefix_hidden(model, start, one, one_mask)
        tick(1)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # another batch in between
        tick(1)
        part_one = suffix_logits(model, start, hidden_one, one_mask)
        tick(1)
    except Exception as e:  # noqa: BLE001 - any failure means "not supported for this family"
        log.info("frozen-prefix cache unavailable for this model (%s)", str(e).splitlines()[0][:100])
        return False
    mask, mask_one = attention_mask.bool(), one_mask.bool()
    return bool(torch.equal(full[mask], part[mask]) and torch.equal(full_one[mask_one], part_one[mask_one]))


def logits_of(model: nn.Module, batch: dict, device) -> torch.Tensor:
    """Logits for a collated batch: from the frozen-prefix cache when one is attached, else a full forward.

    No forward here keeps a generation cache (``use_cache=False``): hybrid families (jamba, qwen3_next, ...)
    would otherwise allocate their linear-attention / state-space caches on every training step.
    """
    mask = batch["attention_mask"].to(device)
    cache = getattr(model, "usaf_prefix", None)
    if cache is None:
        return model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False).logits
    hidden = cache.batch(batch["index"], batch["input_ids"].shape[1]).to(device)
    return suffix_logits(model, cache.start, hidden, mask)
