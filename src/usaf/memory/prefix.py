"""The frozen-prefix cache: hidden states entering the first trainable layer, computed once.

Layers below the first trainable layer never change, so their output for a given sequence is a constant.
``PrefixCache.build`` runs them once under no_grad for every training and eval sequence and stores the
hidden states on disk (a flat memmap, compute dtype, one row per real token), keyed by the base model's
fingerprint, the token ids of the data, the layer and the dtype, so epochs and later runs reuse it. After
that the training forward starts at the first trainable layer (``suffix_forward``) and the frozen layers
below need no residency at all (``release_prefix``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.model import UsafModel, compute_device, decoder_layers

log = logging.getLogger("usaf")


class _Stop(Exception):
    pass


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def skip_prefix(model: nn.Module, start: int):
    """Temporarily turn decoder layers ``[0, start)`` into the identity (layer indices stay intact, so
    per-layer attention types, masks and caches behave as in the full model)."""
    layers = list(decoder_layers(model))[:start]
    for layer in layers:
        layer.forward = _passthrough
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def suffix_logits(model: nn.Module, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Logits of the model run from layer ``start`` on, given the hidden states entering it (B, T, H)."""
    with skip_prefix(model, start):
        return model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits


@torch.no_grad()
def suffix_matches(model: nn.Module, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether starting at layer ``start`` from cached hidden states reproduces the full forward exactly
    (families that transform ``inputs_embeds`` or need the token ids deeper in the stack do not)."""
    try:
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        part = suffix_logits(model, start, prefix_hidden(model, start, input_ids, attention_mask), attention_mask)
    except Exception as e:  # noqa: BLE001 - any failure means "not supported for this family"
        log.info("frozen-prefix cache unavailable for this model (%s)", str(e).splitlines()[0][:100])
        return False
    mask = attention_mask.bool()
    return bool(torch.equal(full[mask], part[mask]))


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


class PrefixCache:
    """Per-example hidden states at the input of layer ``start``: a flat (tokens, H) memmap + offsets."""

    def __init__(self, path: Path, start: int, offsets: np.ndarray, hidden: int, dtype: torch.dtype):
        self.path, self.start, self.offsets, self.hidden, self.dtype = path, start, offsets, hidden, dtype
        self.data = np.memmap(path, dtype=np.uint16 if dtype in (torch.bfloat16, torch.float16) else np.float32,
                              mode="r", shape=(int(offsets[-1]), hidden))

    def batch(self, index: torch.Tensor, width: int) -> torch.Tensor:
        """Right-padded (B, width, H) hidden states of examples ``index``."""
        out = torch.zeros(len(index), width, self.hidden, dtype=self.dtype)
        for row, i in enumerate(index.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            t = torch.from_numpy(np.array(self.data[a:b]))  # a private copy of the rows
            out[row, : b - a] = t.view(self.dtype) if self.dtype != torch.float32 else t
        return out

    @staticmethod
    def key(handle: UsafModel, examples, start: int, dtype) -> str:
        h = hashlib.sha256(f"{handle.fingerprint}|{start}|{dtype}".encode())
        for ex in examples:
            h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:24]

    @classmethod
    def build(cls, handle: UsafModel, examples, start: int, batch_size: int, pad_id: int,
              cache_root: Path | None = None) -> PrefixCache:
        """Compute (or reuse) the cache for ``examples`` in order."""
        from ..data.load import collate

        model = handle.model
        device = compute_device(model)
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        hidden = model.config.get_text_config().hidden_size
        root = cache_root or Path(os.environ.get("USAF_PREFIX_CACHE") or
                                  Path(os.environ.get("USAF_CACHE", Path.home() / ".cache" / "usaf")) / "prefix")
        root.mkdir(parents=True, exist_ok=True)
        key = cls.key(handle, examples, start, dtype)
        path, meta = root / f"{key}.bin", root / f"{key}.json"
        lengths = np.array([len(ex.input_ids) for ex in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if path.exists() and meta.exists():
            return cls(path, start, offsets, hidden, dtype)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        np_dtype = np.uint16 if dtype in (torch.bfloat16, torch.float16) else np.float32
        data = np.memmap(tmp, dtype=np_dtype, mode="w+", shape=(int(offsets[-1]), hidden))
        for a in range(0, len(examples), batch_size):
            chunk = examples[a : a + batch_size]
            batch = collate(chunk, pad_id)
            h = prefix_hidden(model, start, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for row, ex in enumerate(chunk):
                i = a + row
                v = h[row, : len(ex.input_ids)].detach().to("cpu")
                data[offsets[i] : offsets[i + 1]] = (v.view(torch.int16) if np_dtype == np.uint16 else v).numpy()
        data.flush()
        del data
        os.replace(tmp, path)
        meta.write_text(json.dumps({"start": start, "examples": len(examples), "dtype": str(dtype)}))
        log.info("frozen-prefix cache: %d sequences at layer %d -> %s", len(examples), start, path)
        return cls(path, start, offsets, hidden, dtype)


def first_trainable_layer(handle: UsafModel) -> int:
    return min(m.index for m in handle.trainable_layers)


@torch.no_grad()
def release_prefix(handle: UsafModel, start: int) -> int:
    """Drop the weights of the frozen layers below ``start`` (they are not run any more). Returns bytes freed."""
    freed = 0
    layers = decoder_layers(handle.model)
    from ..load.stream import evict

    for m in handle.layers:
        if m.index < start:
            freed += sum(s.nbytes() for s in m.experts.frozen.values())
            for s in m.experts.frozen.values():
                evict(s)
            m.experts.frozen = {}
    for layer in list(layers)[:start]:
        freed += sum(p.numel() * p.element_size() for p in layer.parameters())
        layer.to("meta")
    return freed




def offset_index(batches, k: int):
    """Shift the ``index`` of each batch by ``k`` (eval rows follow the train rows in the cache)."""
    for b in batches:
        b["index"] = b["index"] + k
        yield b


def enable_prefix_cache(handle: UsafModel, train_ex, eval_ex, batch_size: int, pad_id: int) -> bool:
    """Build the cache for ``train_ex + eval_ex`` when the first trainable layer is above 0 and the family
    reproduces the full forward from cached states; then release the frozen prefix. Returns whether on."""
    from ..data.load import collate

    start = first_trainable_layer(handle)
    if start == 0:
        return False
    model = handle.model
    device = compute_device(model)
    probe = collate(list(train_ex[:2]), pad_id)
    if not suffix_matches(model, start, probe["input_ids"].to(device), probe["attention_mask"].to(device)):
        return False
    cache = PrefixCache.build(handle, list(train_ex) + list(eval_ex), start, batch_size, pad_id)
    freed = release_prefix(handle, start)
    model.usaf_prefix = cache
    log.info("frozen-prefix cache on: layers 0-%d run once; %.1f MB of their weights released", start - 1,
             freed / 2**20)
    return True


def logits_of(model: nn.Module, batch: dict, device) -> torch.Tensor:
    """Logits for a collated batch: from the frozen-prefix cache when one is attached, else a full forward."""
    mask = batch["attention_mask"].to(device)
    cache = getattr(model, "usaf_prefix", None)
    if cache is None:
        return model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits
    hidden = cache.batch(batch["index"], batch["input_ids"].shape[1]).to(device)
    return suffix_logits(model, cache.start, hidden, mask)


def use_checkpointing(handle: UsafModel, mode: str, batch_size: int, seq_len: int) -> bool:
    """``auto``: ask the memory plan (``usaf plan``, from the config and this run's settings) whether
    checkpointing lowers the predicted training peak on the compute device (by more than
    ``plan.AUTO_CHECKPOINT_GAIN``); on if so. (If the plan cannot describe the model: on when the trainable
    layers' saved activations, ~24 values of size H per token and layer, exceed 512 MB.)"""
    if mode in ("on", "off"):
        return mode == "on"
    from . import plan

    model = handle.model
    cfg = handle.config
    device = compute_device(model)
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32), "fp32")
    first = first_trainable_layer(handle)
    attn = getattr(model.config, "_attn_implementation", None)
    try:
        mem = {}
        if device.type == "cuda":
            mem["device_memory"] = torch.cuda.get_device_properties(device).total_memory
        r = plan.predict(model.config, seq_len=seq_len, batch_size=batch_size, density=cfg.density,
                         train_layers=cfg.train_layers,
                         quant=cfg.quant, dtype=dtype, device="cuda" if device.type == "cuda" else "cpu",
                         chunk_mb=cfg.chunk_mb, group_size=cfg.group_size,
                         prefix_cache=getattr(model, "usaf_prefix", None) is not None,
                         attn=attn if attn in ("eager", "sdpa") else None,
                         checkpointing="auto", suggest=False, **mem)
        return r["train"]["checkpointing"] == "on"
    except Exception as e:  # a layout the planner cannot count: the rough rule
        log.debug("checkpointing auto: no plan (%s); rough rule", e)
    text = model.config.get_text_config()
    estimate = batch_size * seq_len * (text.num_hidden_layers - first) * text.hidden_size * 2 * 24
    return estimate > 512 << 20


def enable_checkpointing(handle: UsafModel) -> None:
    """Activation checkpointing at decoder-layer boundaries (transformers' own, non-reentrant), with the
    experts in their lean mode: they keep only the layer input and the routing, recompute the gate/up
    pre-activations in their backward, and are not re-run by the layer's recomputation (which stops
    after the router, the last op that saved a tensor, where nothing after the experts saves one)."""
    model = handle.model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the input embeddings' output require grad (for reentrant checkpointing and
    # PEFT); with non-reentrant checkpointing that only makes autograd run the backward of every frozen layer
    # below the trainable range (measured: 3.1 s instead of 1.9 s per step on the quality bench model).
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    for m in handle.layers:
        m.experts.save_preact = False


def disable_checkpointing(handle: UsafModel) -> None:
    """Undo :func:`enable_checkpointing`."""
    model = handle.model
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    for m in handle.layers:
        m.experts.save_preact = True


def is_checkpointing(handle: UsafModel) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in handle.model.modules())


@contextlib.contextmanager
def lean_passes(handle: UsafModel):
    """Checkpointing (lean experts) for the duration of the block, restored after: selection and
    reselection passes use it whatever the training steps do, so that scoring stays within the memory of a
    training step (their dense score buffers come on top of the activations). It costs them some time."""
    was = is_checkpointing(handle)
    if not was:
        enable_checkpointing(handle)
    try:
        yield
    finally:
        if not was:
            disable_checkpointing(handle)
