"""One phase of the memory plan (inference, or a training step with its selection passes): every part's
bytes, kind (when it is alive) and tier (device, host or disk, placed greedily under the budgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..units import fmt_bytes
from .counts import LayerCounts, ModelCounts
from .sizes import (
    CPU_RUNTIME_HOST,
    CUDA_RUNTIME_DEVICE,
    CUDA_RUNTIME_HOST,
    DEQUANT_SCRATCH_ACCEL,
    DEQUANT_SCRATCH_CPU,
    DTYPE_BYTES,
    Settings,
    dequant_bytes,
    layer_activations,
    layer_expert_bytes,
    layer_infer_working,
    layer_kept_lean,
    logits_bytes,
    padded,
    sparse_grad_bytes,
    train_range,
)

_STEP_MOMENTS = (("loss",), ("layer",), ("save",))
_SELECT_MOMENTS = (("loss", "select", "select-step"), ("layer", "select", "select-step"), ("score",))
WHEN = {
    "step": " (during the step)",
    "train-step": " (during a training step)",
    "select-step": " (during a selection pass)",
    "loss": " (at the loss)",
    "layer": " (inside a layer)",
    "save": " (while saving)",
    "select": " (during the selection pass)",
    "score": " (while scoring, selection)",
    "selection": " (through selection)",
}


@dataclass
class _Plan:
    """Accumulates one phase's parts: (name, bytes, tier, kind)."""

    cpu: bool
    device_budget: int
    host_budget: int
    parts: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, name: str, nbytes: int, tier: str, kind: str = "resident") -> None:
        if nbytes > 0:
            self.parts.append({"item": name, "bytes": int(nbytes), "tier": tier, "kind": kind})

    def used(self, tiers: tuple[str, ...], kinds: tuple[str, ...]) -> int:
        return sum(p["bytes"] for p in self.parts if p["tier"] in tiers and p["kind"] in kinds)

    def _tiers(self, tier: str) -> tuple[str, ...]:
        return ("device", "host") if self.cpu else (tier,)  # on CPU the device tier is host RAM

    def step_peak(self, tier: str) -> int:
        tiers = self._tiers(tier)
        return self.used(tiers, ("resident", "step", "train-step")) + max(
            self.used(tiers, m) for m in _STEP_MOMENTS)

    def select_peak(self, tier: str) -> int:
        tiers = self._tiers(tier)
        return self.used(tiers, ("resident", "step", "selection")) + max(
            self.used(tiers, m) for m in _SELECT_MOMENTS)

    def peak(self, tier: str) -> int:
        """Peak bytes of a tier over every moment (step and selection)."""
        return max(self.step_peak(tier), self.select_peak(tier))

    def device_free(self) -> int:
        return self.device_budget - self.peak("device")

    def host_free(self) -> int:
        return self.host_budget - self.peak("host")


def _place_block(
    p: _Plan, name: str, pieces: list[int], device_staging: int, mapped: int, reserve: int = 0,
    disk: bool = False,
) -> dict:
    """Greedy placement of frozen pieces (layers): device if they all fit, else device/host/disk per piece.

    Pieces not on the device are streamed: ``device_staging`` bytes of device buffers (current + prefetched
    piece) are reserved first; if any piece ends on disk, ``mapped`` bytes of its mmap pages stay resident
    in host RAM (reserved before placing, so the greedy fill leaves room for them). ``reserve``: device
    bytes to leave free for what is placed later (its streaming buffers at least). ``disk``: every piece stays
    mapped whatever the budgets (a GGUF on the CPU: ``usaf.load.tiers.choose_tier``'s ``in_file``).
    """
    total = sum(pieces)
    counts = {"device": 0, "host": 0, "disk": 0}
    if total == 0:
        return counts
    if disk:
        p.add(f"{name} ({len(pieces)} of {len(pieces)})", total, "disk")
        p.add(f"{name}: mmap pages in use", mapped, "device" if p.cpu else "host")
        counts["disk"] = len(pieces)
        return counts
    if total + reserve <= p.device_free():
        p.add(name, total, "device")
        counts["device"] = len(pieces)
        return counts
    if not p.cpu:
        if device_staging > p.device_free() and not p.failed:
            p.failed.append(
                f"{name}: the device has no room for the streaming buffers ({fmt_bytes(device_staging)})"
            )
        p.add(f"{name}: streaming buffers (current + next)", device_staging, "device")
    host_tier = "device" if p.cpu else "host"

    def fill(mapped_reserve: int) -> tuple[dict, dict]:
        on = {"device": 0, "host": 0, "disk": 0}
        n = {"device": 0, "host": 0, "disk": 0}
        dev_free = p.device_free() - reserve - (mapped_reserve if p.cpu else 0)
        host_free = p.host_free() - mapped_reserve
        for size in pieces:
            if size <= dev_free - on["device"]:
                tier = "device"
            elif not p.cpu and size <= host_free - on["host"]:
                tier = "host"
            else:
                tier = "disk"
            on[tier] += size
            n[tier] += 1
        return on, n

    on, counts = fill(0)
    if counts["disk"]:
        on, counts = fill(mapped)
    for tier in ("device", "host", "disk"):
        if on[tier]:
            p.add(f"{name} ({counts[tier]} of {len(pieces)})", on[tier], tier)
    if counts["disk"]:
        p.add(f"{name}: mmap pages in use", mapped, host_tier)
    return counts


def phase(mc: ModelCounts, s: Settings, train: bool) -> dict:
    """Place and sum one phase (train or infer). Returns the phase dict of :func:`predict`.

    The parts are added hottest first (what must be on the compute device), then the weights are placed
    greedily in what is left: runtime, trainable state, activations and logits, transients, then the
    non-expert weights and the frozen experts of the resident layers.
    """
    ph = _Phase(mc, s, train)
    ph.runtime()
    ph.trainable_state()
    ph.activations()
    ph.transients()
    ph.weights()
    return ph.result()


class _Phase:
    """One phase being planned: the settings, the layers it keeps resident, and the parts placed so far."""

    def __init__(self, mc: ModelCounts, s: Settings, train: bool):
        self.mc, self.s, self.train = mc, s, train
        self.d = DTYPE_BYTES[s.dtype]
        self.attn = s.attn or mc.attn
        L = mc.num_layers
        self.rng, note = train_range(s.train_layers, L)
        self.dev_budget = s.host_memory if s.cpu else s.device_memory
        self.p = _Plan(cpu=s.cpu, device_budget=self.dev_budget, host_budget=s.host_memory)
        if note:
            self.p.notes.append(note)
        self.host_tier = "device" if s.cpu else "host"
        self.n_tok = s.batch_size * s.seq_len
        # which layers are resident: training keeps the span from the first trainable layer (the prefix is a
        # cache of hidden states, unless --no-prefix-cache)
        self.first = self.rng.start
        self.span = list(range(self.first, L)) if train else list(range(L))
        self.resident = list(range(L)) if train and not s.prefix_cache else self.span
        self.layers = [mc.layers[i] for i in self.resident]
        self.moe_train = [mc.layers[i] for i in self.rng if mc.layers[i].moe]
        if not self.moe_train:
            raise ValueError(f"--train-layers {s.train_layers!r} contains no MoE layer (MoE layers: "
                             f"{_ranges(mc.moe_layers)})")
        self.moe_res = [lc for lc in self.layers if lc.moe]
        self.scores = 0

    def runtime(self) -> None:
        p = self.p
        if self.s.cpu:
            p.add("runtime (Python, torch, transformers, data)", CPU_RUNTIME_HOST, "device")
        else:
            p.add("runtime (CUDA context, workspaces, allocator slack)", CUDA_RUNTIME_DEVICE, "device")
            p.add("runtime (Python, torch, transformers, CUDA libraries)", CUDA_RUNTIME_HOST, "host")

    def trainable_state(self) -> None:
        """Deltas (indices, values, moments), routers (fp32 masters, moments) and their gradients."""
        p, d, moe_train = self.p, self.d, self.moe_train
        self.active = sum(int(round(self.s.density * numel)) for lc in moe_train for numel in lc.stack_numels)
        idx_bytes = sum(4 if numel < 2**31 else 8 for lc in moe_train for numel in lc.stack_numels)
        self.per_el = idx_bytes / (2 * len(moe_train))  # mean index size over the stacks
        offsets = sum((lc.num_experts + 1) * 8 * len(lc.stack_numels) for lc in moe_train)
        self.router = sum(lc.router_params for lc in moe_train)
        self.attention = sum(int(round(self.s.attention_density * lc.attn_linear_params)) for lc in moe_train)
        self.shared = sum(int(round(self.s.shared_density * lc.shared_linear_params)) for lc in moe_train)
        self.active += self.attention + self.shared  # 4-byte indices (a linear has < 2**31 weights)
        if self.train:
            # the active set exists from the end of selection, its moments from the first step: not during selection
            p.add("deltas: indices + fp32 values + AdamW moments (16 B/elt)",
                  int(self.active * (self.per_el + 12)) + offsets, "device", "train-step")
            p.add("deltas: fp32 gradients (4 B/elt)", self.active * 4, "device", "layer")
            master = 0 if d == 4 else 4  # fp32 models: the router parameter is its own master
            p.add("routers: fp32 masters + AdamW moments", self.router * (master + 8), "device", "train-step")
            p.add("routers: gradients", self.router * (d + (4 if master else 0)), "device", "layer")
        else:
            p.add("deltas: indices + fp32 values (applied)", int(self.active * (self.per_el + 4)) + offsets,
                  "device")

    def activations(self) -> None:
        """What autograd keeps (training) or one layer's working set (inference), and the logits."""
        p, mc, s, d, attn, n_tok = self.p, self.mc, self.s, self.d, self.attn, self.n_tok
        span_layers = [mc.layers[i] for i in self.span]
        if self.train:
            # Selection passes always run checkpointed (usaf.engine.checkpointing.lean_passes); the steps
            # when it is on.
            kept = sum(layer_kept_lean(mc, lc, s, d) for lc in span_layers)
            lean = max(layer_activations(mc, lc, s, d, attn, first=k == 0, preact=False)
                       for k, lc in enumerate(span_layers))
            self.act_ckpt = checkpointing_on(mc, s)
            p.add(f"activations: layer inputs, MoE inputs + routing ({len(self.span)} layers)", kept, "device",
                  "step" if self.act_ckpt else "select-step")
            p.add("activations: one layer recomputed (experts not re-run)", lean, "device",
                  "layer" if self.act_ckpt else "select")
            if s.cpu:  # the lean experts' gate/up pre-activations, written by the forward (usaf.engine.spill)
                spilled = sum(padded(lc, n_tok * mc.top_k) * d * 2 * lc.expert_inter for lc in self.moe_train)
                p.add("lean experts' gate/up pre-activations (spill file)", spilled, "disk")
            if not self.act_ckpt:
                full = [layer_activations(mc, lc, s, d, attn, first=k == 0) for k, lc in enumerate(span_layers)]
                p.add(f"activations: {len(self.span)} layers in full", sum(full), "device", "train-step")
            sp = max(padded(lc, n_tok * mc.top_k) for lc in self.moe_train)
            p.add("backward working set (input grads, residual grads, routing-weight grads)",
                  n_tok * mc.hidden * d + sp * 4 + 4 * n_tok * mc.hidden * 4, "device", "layer")
            p.add("final norm input (fp32)", n_tok * mc.hidden * 4, "device", "step")
        else:
            p.add("activations: one layer's working set + residual",
                  max(layer_infer_working(mc, lc, s, d, attn) for lc in self.layers), "device", "layer")
            if mc.use_cache:
                kv = sum(n_tok * lc.kv_heads * (lc.qk_head_dim + lc.v_head_dim) * d for lc in mc.layers)
                p.add("KV cache (use_cache)", kv, "device", "step")
        p.add("logits: one chunk of rows x V (compute dtype + fp32) + gradient" if self.train else
              "logits (B x T x V)", logits_bytes(mc, s, d, self.train), "device", "loss")

    def transients(self) -> None:
        """Dequantized expert weights of the current layer; training: checkpoint staging, selection scores."""
        p, s, d = self.p, self.s, self.d
        dq = max(dequant_bytes(lc, s.chunk_mb, d) for lc in self.moe_res)
        scratch_el = DEQUANT_SCRATCH_CPU if s.cpu else DEQUANT_SCRATCH_ACCEL
        scratch = 0 if s.quant == "none" else min(scratch_el, max(sum(lc.stack_numels) for lc in self.moe_res)) * 4
        # the workspace of the hot path: kept from the first forward on (usaf.engine.store.Workspace)
        p.add(f"dequantized expert weights (workspace: a run of <= {s.chunk_mb} MB)", dq, "device", "step")
        # a chunk's fp32 values and codes, and the run's scales and zeros in fp32 (CPU), in the same workspace
        scales = 0 if s.quant == "none" or not s.cpu else dq // d // s.group_size * 8
        p.add("dequantization scratch (workspace)", scratch + scales, "device", "step")
        if self.train:
            rows = 2 * max(padded(lc, self.n_tok * self.mc.top_k) // max(1, lc.num_experts) for lc in self.moe_train)
            p.add("delta gradients' workspace (one expert)",
                  max(sparse_grad_bytes(lc, self.mc.hidden, rows, d) for lc in self.moe_train), "device", "step")
            ckpt = int(self.active * (self.per_el + 12)) + self.router * 12
            p.add("checkpoint staging (host copy of deltas, moments, routers)", ckpt, self.host_tier, "save")
            self.scores, score_dtype = score_bytes(s, self.moe_train)
            dw = max(sum(lc.stack_numels) // lc.num_experts for lc in self.moe_train) * (d + 4)
            p.add("selection: dense |dW| of one expert", dw, "device", "score")
            # the calibration pass records every trainable layer's experts calls: the routing of every batch stays
            # in memory; the input and output gradient go to a file as each batch's backward ends
            # (usaf.engine.records) and come back one layer's batch at a time while it is scored
            pair = self.n_tok * 2 * self.mc.hidden * d
            routing = s.calib_batches * len(self.moe_train) * self.n_tok * self.mc.top_k * (8 + d)
            p.add(f"selection: recorded routing ({s.calib_batches} batches x {len(self.moe_train)} layers)",
                  routing, "device", "selection")
            p.add(f"selection: recorded inputs and output gradients of one batch ({len(self.moe_train)} layers, "
                  "until written to disk)", len(self.moe_train) * pair, "device", "select")
            p.add("selection: one layer's recorded batch, read back", pair, "device", "score")
            # scores are less hot than the frozen weights: planned on the host (RAM on CPU), moved below if room
            p.add(f"selection: importance scores ({score_dtype}, one group of experts) + candidates", self.scores,
                  self.host_tier, "score")
            if self.attention:  # every trainable layer's attention projections, scored at once
                attn_scores = sum(lc.attn_linear_params for lc in self.moe_train) * (4 if s.score_dtype == "fp32" else 2)
                p.add(f"selection: attention importance scores ({score_dtype})", attn_scores, self.host_tier,
                      "selection")
                self.scores += attn_scores
            if self.shared:  # every trainable layer's shared-expert linears, scored in the same passes
                sh_scores = sum(lc.shared_linear_params for lc in self.moe_train) * (4 if s.score_dtype == "fp32" else 2)
                p.add(f"selection: shared-expert importance scores ({score_dtype})", sh_scores, self.host_tier,
                      "selection")
                self.scores += sh_scores
            scored = sum((lc.attn_linear_params if self.attention else 0)
                         + (lc.shared_linear_params if self.shared else 0) for lc in self.moe_train)
            if scored:  # one backward fills every scored linear's dense weight gradient before they are read
                p.add("selection: dense gradients of the scored linears (one batch)", scored * d, "device", "select")
        if p.device_free() < 0 or p.host_free() < 0:
            what = "trainable state, activations, logits and transients" if self.train else \
                "activations, logits and transients"
            tier = "device" if p.device_free() < 0 else "host"
            p.failed.append(f"{what} alone ({fmt_bytes(p.peak(tier))}) exceed the "
                            + ("host memory" if s.cpu or tier == "host" else "device memory"))

    def weights(self) -> None:
        """Non-expert weights, then the frozen experts of the resident layers: device, else host, else disk."""
        p, mc, s, d = self.p, self.mc, self.s, self.d
        # a GGUF's non-expert tensors are all dequantized into memory at load (the prefix layers' too)
        gguf = s.quant == "gguf"
        per_layer = [lc.non_expert_params * d for lc in (mc.layers if gguf else self.layers)]
        head = (mc.lm_head_params or (mc.embed_params if mc.tied else 0)) * d
        need_embed = (not self.train) or (not s.prefix_cache) or mc.tied or gguf
        embed = mc.embed_params * d if need_embed and not mc.tied else 0
        if embed and s.cpu and not gguf and mc.stored_bytes == d:
            # on the CPU the input embeddings stay a view of the checkpoint's memory map (the streamed load):
            # a forward reads only its batch's rows, and only those pages are resident. Not when the compute
            # dtype differs from the checkpoint's (fp32 from bf16 on a CPU without bf16): then they are a copy.
            embed = min(embed, self.n_tok * mc.hidden * d)
        ne_total = sum(per_layer) + head + embed + mc.other_params * d
        ne_staging = max(2 * max(per_layer, default=0), head, embed)
        ex_pieces = [layer_expert_bytes(lc, s.quant, s.group_size, d, s.expert_bits) for lc in self.moe_res]
        staging = 2 * max(ex_pieces)
        # leave room for the experts' streaming buffers (or the experts themselves, if smaller)
        self.ne_placed = _place_block(p, "non-expert weights", [ne_total], ne_staging, ne_staging,
                                      reserve=min(staging, sum(ex_pieces)))
        self.placed = _place_block(p, f"frozen experts ({s.quant})", ex_pieces, staging, staging,
                                   disk=gguf and s.cpu)
        if self.train:  # the scores go to the device if it has room at the selection moment; disk parts
            if not s.cpu and p.select_peak("device") + self.scores <= p.device_budget:
                next(q for q in p.parts if q["item"].startswith("selection: importance"))["tier"] = "device"
            first = self.first
            if s.prefix_cache and (first > 0 or not mc.tied):
                disk_prefix = sum(layer_expert_bytes(lc, s.quant, s.group_size, d, s.expert_bits)
                                  + (0 if gguf else lc.non_expert_params * d) for lc in mc.layers[:first])
                disk_prefix += 0 if mc.tied or gguf else mc.embed_params * d
                what = (f"frozen layers 0-{first - 1}" + ("'s experts" if gguf else " + embeddings") if first > 0
                        else "embeddings")
                if disk_prefix:
                    p.add(f"{what} (prefix-cache build only)", disk_prefix, "disk")
                p.add("prefix cache: hidden states (B x T x H per batch)", self.n_tok * mc.hidden * d, "disk")

    def result(self) -> dict:
        p, s = self.p, self.s
        for tier, budget in (("device", self.dev_budget), ("host", s.host_memory)):
            if (s.cpu and tier == "host") or p.failed:
                continue
            if p.step_peak(tier) > budget:
                p.failed.append(f"{tier if not s.cpu else 'host'} peak {fmt_bytes(p.step_peak(tier))} exceeds the "
                                f"budget {fmt_bytes(budget)}")
            elif self.train and p.select_peak(tier) > budget:
                p.failed.append(f"selection (importance scoring) peak {fmt_bytes(p.select_peak(tier))} on the "
                                f"{tier if not s.cpu else 'host'} exceeds the budget {fmt_bytes(budget)}")
        out = {
            "fits": not p.failed,
            "peak_device_bytes": p.step_peak("device"),
            "peak_host_bytes": p.step_peak("host"),
            "disk_bytes": p.used(("disk",), ("resident",)),
            "layers": [self.resident[0], self.resident[-1]],
            "experts_placement": self.placed,
            "non_expert_placement": next((k for k, v in self.ne_placed.items() if v), "device"),
            "breakdown": p.parts,
            "notes": p.notes,
            "problems": p.failed,
        }
        if self.train:
            out["active_elements"] = self.active
            out["checkpointing"] = "on" if self.act_ckpt else "off"
            out["train_layers"] = [self.rng.start, self.rng.stop - 1]
            sel_ok = p.select_peak("device") <= self.dev_budget and (s.cpu or p.select_peak("host") <= s.host_memory)
            out["step_fits"] = not [f for f in p.failed if not f.startswith("selection")]
            out["select"] = {
                "fits": bool(sel_ok and out["step_fits"]),
                "peak_device_bytes": p.select_peak("device"),
                "peak_host_bytes": p.select_peak("host"),
                "score_buffers_bytes": self.scores,
                "score_buffers_tier": next(q["tier"] for q in p.parts
                                           if q["item"].startswith("selection: importance")),
            }
        return out


# ``--checkpointing auto`` turns checkpointing on when it lowers the predicted training-step peak on the
# compute device by more than this fraction: below it, the 10-20% of step time that it costs (measured,
# docs/memory.md) buys too little.
AUTO_CHECKPOINT_GAIN = 0.02


def checkpointing_on(mc: ModelCounts, s: Settings) -> bool:
    """``usaf train``'s rule (``usaf.memory.policy.use_checkpointing`` asks this plan): ``auto`` is on when the
    predicted training-step peak with checkpointing is lower than without it by more than
    ``AUTO_CHECKPOINT_GAIN``, on the compute device (selection passes are checkpointed either way)."""
    if s.checkpointing != "auto":
        return s.checkpointing == "on"
    on = phase(mc, replace(s, checkpointing="on"), train=True)
    off = phase(mc, replace(s, checkpointing="off"), train=True)
    return on["peak_device_bytes"] < (1 - AUTO_CHECKPOINT_GAIN) * off["peak_device_bytes"]


def score_bytes(s: Settings, moe_train: list[LayerCounts]) -> tuple[int, str]:
    """What ``usaf.engine.select`` holds while scoring a layer: the dense score buffers of one group of its
    experts (in ``score_dtype``, within ``score_budget_mb``, at least one expert), the layer's running
    candidates and one group's top-k (at most ``layer_share_cap`` = 4 times each stack's fair share of the
    budget, twice), and the pool of candidates kept over the layers (about the budget); each candidate a score in
    ``score_dtype`` and an index (int32 below 2^31 elements)."""
    budget = s.score_budget_mb << 20
    elem = 4 if s.score_dtype == "fp32" else 2
    total = sum(lc.expert_params for lc in moe_train)
    budget_el = s.density * total
    worst = 0
    for lc in moe_train:
        per = lc.expert_params // max(1, lc.num_experts)
        group = min(lc.num_experts, max(1, budget // max(1, per * elem))) * per * elem
        cands = sum(2 * min(n, math.ceil(4.0 * budget_el * n / total)) * (elem + (4 if n < 2**31 else 8))
                    for n in lc.stack_numels)
        worst = max(worst, group + cands)
    return worst + int(budget_el) * (elem + 4), ("fp32" if elem == 4 else "bf16")


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)
