"""What a run decides from the memory plan, once, at setup: activation checkpointing on or off.

The engine never consults the planner: ``usaf.train`` calls :func:`use_checkpointing` after loading and
passes the answer down (``usaf.engine.checkpointing.enable_checkpointing``).
"""

from __future__ import annotations

import logging

import torch

from ..engine.checkpointing import can_checkpoint
from ..engine.model import UsafModel, compute_device
from ..load.gguf.model import is_gguf
from ..units import dtype_name
from . import plan
from .prefix import first_trainable_layer

log = logging.getLogger("usaf")


def use_checkpointing(handle: UsafModel, mode: str, batch_size: int, seq_len: int) -> bool:
    """``on`` / ``off`` as given; ``auto``: ask the memory plan (``usaf plan``, from the config and this run's
    settings) whether checkpointing lowers the predicted training peak on the compute device (by more than
    ``usaf.memory.phase.AUTO_CHECKPOINT_GAIN``); on if so. (If the plan cannot describe the model: on when the trainable
    layers' saved activations, ~24 values of size H per token and layer, exceed 512 MB.) ``auto`` is off for a
    model whose layers transformers cannot checkpoint."""
    if mode in ("on", "off"):
        return mode == "on"
    if not can_checkpoint(handle):  # auto: transformers cannot checkpoint this model's layers (jetmoe)
        return False
    model = handle.model
    cfg = handle.config
    device = compute_device(model)
    dtype = dtype_name(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
    dtype = dtype if dtype in ("bf16", "fp16", "fp32") else "fp32"
    first = first_trainable_layer(handle)
    attn = getattr(model.config, "_attn_implementation", None)
    try:
        mem = {}
        if device.type == "cuda":
            mem["device_memory"] = torch.cuda.get_device_properties(device).total_memory
        src = getattr(model.config, "_name_or_path", "")
        r = plan.predict(src if is_gguf(src) else model.config, seq_len=seq_len, batch_size=batch_size, density=cfg.density,
                         attention_density=cfg.attention_density, shared_density=cfg.shared_density,
                         train_layers=cfg.train_layers,
                         quant=cfg.quant, dtype=dtype, device="cuda" if device.type == "cuda" else "cpu",
                         chunk_mb=cfg.chunk_mb, group_size=cfg.group_size,
                         prefix_cache=getattr(model, "usaf_prefix", None) is not None,
                         attn=attn if attn in ("eager", "sdpa") else None,
                         checkpointing="auto", suggest=False, **mem)
        return r["train"]["checkpointing"] == "on"
    except Exception as e:  # noqa: BLE001 - a layout the planner cannot count: the rough rule
        log.debug("checkpointing auto: no plan (%s); rough rule", e)
    text = model.config.get_text_config()
    estimate = batch_size * seq_len * (text.num_hidden_layers - first) * text.hidden_size * 2 * 24
    return estimate > 512 << 20
