"""The phases of a ``usaf train`` run around the training step, planned from the same counts: the load, the
frozen-prefix build, and the export of its delta. Host RAM (the resident set a monitor shows) on the CPU;
on a GPU run, the host side of these phases.

- **load, first run** (a checkpoint directory whose quantized cache does not exist yet,
  ``usaf.load.stream.load_streamed``): every expert is read from the shards and quantized, stack by stack, and
  each stack goes to the cache file as soon as it is built. Kept in RAM: the quantized stacks of the layers
  from the first trainable one up (host tier; the disk tier keeps none); transient: the stack being built (its
  quantized bytes) and one expert at full precision with its fp32 quantization temporaries. The non-expert
  tensors are views of the shards' memory maps: no page is read until a forward touches it.
- **load, cached**: the cache is checked (read once, page by page, nothing kept) and mapped; the span's stacks
  are copied into RAM one at a time (host tier), each mapped stack's pages dropped after its copy.
- **prefix build** (the support probe, then the layers below the span over every training and eval sequence):
  the load's resident stacks, every non-expert weight (the probe runs the whole model, so the shards' pages of
  all of them are touched: file-backed, counted in RSS), the pages of the mapped prefix layer being run and
  of the next (read ahead), one layer's inference working set for a batch, and the dequantized weights.
- **export of the delta** (``usaf export RUN --format delta``): the run's delta read, the checkpoint's values
  at the active positions (the originals, for a byte-exact revert), the output serialized (``safetensors``
  builds the whole file in memory before writing it) and read back for the check.

The runtime constant (Python, torch, transformers) is the same as the steps'. Not planned: the checksum pass
over a cached model (bounded by the page cache, which RSS does not count) and ``--format hf`` / ``gguf`` exports
(they rebuild the merged model: planned like inference).
"""

from __future__ import annotations

from .counts import LayerCounts, ModelCounts
from .sizes import (
    CPU_RUNTIME_HOST,
    DTYPE_BYTES,
    Settings,
    _quant_bytes,
    dequant_bytes,
    layer_expert_bytes,
    layer_infer_working,
    train_range,
)

PROBE_TOKENS = 32  # ``usaf.memory.prefix.PROBE_TOKENS``: the probe's sequences are 32 and 16 tokens


def _stack_bytes(lc: LayerCounts, s: Settings, d: int) -> list[int]:
    return [_quant_bytes(n // lc.num_experts, lc.num_experts, s.quant, s.group_size, d, s.expert_bits)
            for n in lc.stack_numels] if lc.moe else []


def _part(parts: list[dict], item: str, nbytes: int) -> None:
    if nbytes > 0:
        parts.append({"item": item, "bytes": int(nbytes)})


def _active(mc: ModelCounts, s: Settings) -> int:
    rng, _ = train_range(s.train_layers, mc.num_layers)
    return sum(int(round(s.density * n)) for i in rng if mc.layers[i].moe for n in mc.layers[i].stack_numels)


def delta_bytes(mc: ModelCounts, s: Settings) -> int:
    """Bytes of the run's delta file: per active element an index (int32, or int64 for stacks of 2^31 elements
    or more) and an fp32 value, the trainable layers' routers in fp32."""
    rng, _ = train_range(s.train_layers, mc.num_layers)
    total = 0
    for lc in (mc.layers[i] for i in rng):
        if not lc.moe:
            continue
        for n in lc.stack_numels:
            total += int(round(s.density * n)) * ((4 if n < 2**31 else 8) + 4)
        total += lc.router_params * 4
        total += int(round(s.attention_density * lc.attn_linear_params)) * 8
        total += int(round(s.shared_density * lc.shared_linear_params)) * 8
    return total


def expert_tier(mc: ModelCounts, s: Settings) -> str:
    """``usaf.load.tiers.choose_tier`` from the counts: the fastest tier that holds every frozen stack with room
    to spare (60% of the budget; the host budget being the RAM ``usaf train`` would find available). A GGUF's
    stacks on the CPU stay mapped from the file (``choose_tier``'s ``in_file``)."""
    if s.quant == "gguf" and s.cpu:
        return "disk"
    d = DTYPE_BYTES[s.dtype]
    total = sum(layer_expert_bytes(lc, s.quant, s.group_size, d, s.expert_bits) for lc in mc.layers)
    if not s.cpu and total < 0.6 * s.device_memory:
        return "device"
    return "host" if total < 0.6 * s.host_memory else "disk"


def stages(mc: ModelCounts, s: Settings, tier: str) -> dict:
    """``{"load_first", "load_cached", "prefix", "export_delta"}``: each ``{"peak_bytes", "breakdown"}``.
    ``tier``: where the frozen stacks live (``usaf.load.tiers.choose_tier``'s answer for this run)."""
    d = DTYPE_BYTES[s.dtype]
    rng, _ = train_range(s.train_layers, mc.num_layers)
    first = rng.start if s.prefix_cache else 0
    keep = tier == "host"
    span_ex = sum(layer_expert_bytes(lc, s.quant, s.group_size, d, s.expert_bits) for lc in mc.layers[first:])
    stacks = [b for lc in mc.layers for b in _stack_bytes(lc, s, d)]
    biggest = max(stacks, default=0)
    moe = [lc for lc in mc.layers if lc.moe]
    expert_numel = max((n // lc.num_experts for lc in moe for n in lc.stack_numels), default=0)
    out = {}

    runtime = ("runtime (Python, torch, transformers, data)", CPU_RUNTIME_HOST)
    resident = (f"frozen experts of layers {first}-{mc.num_layers - 1} ({s.quant}, {tier} tier)", span_ex if keep else 0)

    parts: list[dict] = []
    for item, b in (runtime, resident):
        _part(parts, item, b)
    if s.quant not in ("none", "gguf"):
        _part(parts, "the stack being quantized", biggest)
        _part(parts, "one expert at full precision + fp32 quantization temporaries", expert_numel * (d + 8))
    out["load_first"] = parts

    parts = []
    for item, b in (runtime, resident):
        _part(parts, item, b)
    if keep:
        _part(parts, "one mapped stack's pages while it is copied", biggest)
    out["load_cached"] = parts

    parts = []
    for item, b in (runtime, resident):
        _part(parts, item, b)
    if first > 0:
        head = (mc.lm_head_params or (mc.embed_params if mc.tied else 0)) * d
        ne = sum(lc.non_expert_params for lc in mc.layers) * d + mc.other_params * d + head
        _part(parts, "non-expert weights, all layers (the probe runs the whole model; file pages)", ne)
        pre = [layer_expert_bytes(lc, s.quant, s.group_size, d, s.expert_bits) for lc in mc.layers[:first]]
        _part(parts, "a prefix layer's mapped experts + the next one's (read ahead)", 2 * max(pre, default=0))
        _part(parts, "one layer's inference working set (a batch)",
              max(layer_infer_working(mc, lc, s, d, s.attn or mc.attn) for lc in mc.layers[:first]))
        _part(parts, "dequantized expert weights", max((dequant_bytes(lc, s.chunk_mb, d) for lc in moe), default=0))
        _part(parts, "the probe's logits (fp32)", (PROBE_TOKENS + PROBE_TOKENS // 2) * 2 * mc.vocab * 4)
    out["prefix"] = parts

    delta = delta_bytes(mc, s)
    originals = _active(mc, s) * d
    out["export_delta"] = [{"item": "runtime (Python, torch)", "bytes": CPU_RUNTIME_HOST},
                           {"item": "the run's delta, read", "bytes": delta},
                           {"item": "the checkpoint's values at the active positions (originals)", "bytes": originals},
                           {"item": "the output serialized (delta + originals)", "bytes": delta + originals},
                           {"item": "the output read back for the check", "bytes": delta + originals}]
    return {k: {"peak_bytes": sum(p["bytes"] for p in v), "breakdown": v} for k, v in out.items()}
