"""The byte formulas of the memory plan: one scenario's settings, and the size of each part per layer.

Each formula mirrors what the code it names allocates; docs/plan.md derives them. ``phase`` places and sums
the parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.experts import GATHER_CHUNK, GATHER_COST
from ..engine.loss import CHUNK_BYTES, MIN_ROWS
from ..engine.model import parse_layers
from ..engine.routing import block_rows, bucket
from .counts import LayerCounts, ModelCounts

# ------------------------------------------------------------------------------------------------ constants
# Fixed runtime costs that are not tensors of the model (see docs/plan.md).
CUDA_RUNTIME_DEVICE = 512 << 20  # CUDA context, cuBLAS workspace, caching-allocator slack (on the device)
CUDA_RUNTIME_HOST = 1536 << 20  # Python + torch + transformers + the CUDA runtime libraries (host RSS)
CPU_RUNTIME_HOST = 512 << 20  # Python + torch + transformers, tokenizer and data (host RSS)
# Elements per step of the dequantization scratch buffer (fp32), as in ``usaf.quant``.
DEQUANT_SCRATCH_ACCEL = 1 << 24
DEQUANT_SCRATCH_CPU = 1 << 19
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTS = ("4bit", "8bit", "none", "gguf")  # gguf: the file's own types (``Settings.expert_bits``)


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """One planning scenario (the flags of ``usaf plan``); budgets in bytes."""

    seq_len: int = 512
    batch_size: int = 1
    density: float = 0.005
    attention_density: float = 0.0
    shared_density: float = 0.1
    train_layers: str = "top:8"
    quant: str = "4bit"
    dtype: str = "bf16"
    device: str = "cuda"
    device_memory: int = 0
    host_memory: int = 0
    chunk_mb: int = 256
    attn: str | None = None  # None: the config's attention implementation (default sdpa)
    checkpointing: str = "auto"  # auto | on | off, as ``usaf train --checkpointing``
    prefix_cache: bool = True
    group_size: int = 64
    score_budget_mb: int = 64
    score_dtype: str = "bf16"
    calib_batches: int = 16  # micro-batches the initial selection records (usaf train --calib-batches)
    expert_bits: float = 0.0  # quant "gguf": the file's expert bytes * 8 / expert weights

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def describe(self) -> str:
        return (
            f"--train-layers {self.train_layers} --seq-len {self.seq_len} --batch-size {self.batch_size} "
            f"--density {self.density:g} --quant {self.quant} --chunk-mb {self.chunk_mb}"
        )


def check_settings(s: Settings) -> None:
    if s.seq_len < 1 or s.batch_size < 1:
        raise ValueError(f"--seq-len and --batch-size must be >= 1, got {s.seq_len} and {s.batch_size}")
    if not 0 < s.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {s.density}")
    if not 0 <= s.attention_density <= 1:
        raise ValueError(f"--attention-density must be in [0, 1], got {s.attention_density}")
    if not 0 <= s.shared_density <= 1:
        raise ValueError(f"--shared-density must be in [0, 1], got {s.shared_density}")
    if s.quant not in QUANTS:
        raise ValueError(f"--quant {s.quant!r} is not one of {', '.join(QUANTS)}")
    if s.dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {s.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if s.attn not in (None, "eager", "sdpa"):
        raise ValueError(f"--attn {s.attn!r} is not eager or sdpa")
    if s.score_dtype not in ("bf16", "fp32"):
        raise ValueError(f"score_dtype {s.score_dtype!r} is not bf16 or fp32")
    if s.checkpointing not in ("auto", "on", "off"):
        raise ValueError(f"--checkpointing {s.checkpointing!r} is not auto, on or off")
    if s.chunk_mb < 1:
        raise ValueError(f"--chunk-mb must be >= 1, got {s.chunk_mb}")
    if s.calib_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {s.calib_batches}")
    if s.group_size < 8 or s.group_size % 8:
        raise ValueError(f"group size must be a positive multiple of 8, got {s.group_size}")


def train_range(spec: str, num_layers: int) -> tuple[range, str | None]:
    """``parse_layers`` with one leniency: ``top:N`` with N above the layer count means all layers."""

    spec = (spec or "all").strip()
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if n > num_layers:
            return range(num_layers), f"--train-layers {spec}: the model has {num_layers} layers; all train"
    return parse_layers(spec, num_layers), None


# ------------------------------------------------------------------------------------------------ formulas
def _quant_bytes(numel_per_expert: int, experts: int, quant: str, group_size: int, d: int,
                 bits: float = 0.0) -> int:
    """Storage of one frozen stack: packed codes + fp16 scale and zero per group (per-expert padding); a
    GGUF's stacks: ``bits`` per weight, as stored in the file."""
    if quant == "gguf":
        return int(numel_per_expert * experts * bits / 8)
    if quant == "none":
        return numel_per_expert * experts * d
    bits = 4 if quant == "4bit" else 8
    groups = -(-numel_per_expert // group_size)
    return experts * groups * (group_size * bits // 8 + 4)


def layer_expert_bytes(lc: LayerCounts, quant: str, group_size: int, d: int, bits: float = 0.0) -> int:
    """Frozen (quantized) bytes of one layer's expert stacks, biases included."""
    if not lc.moe:
        return 0
    total = sum(
        _quant_bytes(n // lc.num_experts, lc.num_experts, quant, group_size, d, bits) for n in lc.stack_numels
    )
    return total + lc.expert_bias_params * d


def dequant_bytes(lc: LayerCounts, chunk_mb: int, d: int) -> int:
    """Dequantized expert weights of one layer's largest run (``UsafExperts.runs`` caps a run at chunk_mb of
    bf16): its gate/up and down weights, in the model's workspace (``usaf.engine.store.Workspace``: reused
    from run to run and layer to layer, and kept from the first forward on)."""
    if not lc.moe:
        return 0
    per_expert = sum(lc.stack_numels) // lc.num_experts
    cap = max(1, (chunk_mb << 20) // max(2 * per_expert, 1))
    return min(cap, lc.num_experts) * per_expert * d


def sparse_grad_bytes(lc: LayerCounts, hidden: int, rows: int, d: int) -> int:
    """The workspace of the delta gradients of one expert (``usaf.engine.experts._sparse_grad``): the dense
    product of its largest stack (the GEMM path), both factors transposed to fp32 and the two gathered
    blocks (the gather path, taken below a density of ``1 / GATHER_COST`` in the expert). ``rows``: the most
    rows an expert gets."""
    if not lc.moe:
        return 0
    numel = max(lc.stack_numels) // lc.num_experts
    sides = numel // max(hidden, 1) + hidden  # rows + columns of that stack ([2I, H] or [H, I])
    gathered = min(GATHER_CHUNK, int(numel / GATHER_COST) * rows)
    return numel * d + sides * rows * 4 + 2 * gathered * 4


def layer_activations(
    mc: ModelCounts, lc: LayerCounts, s: Settings, d: int, attn: str, first: bool = False, preact: bool = True
) -> int:
    """Bytes autograd saves for one layer in training (frozen linears save no inputs; see docs/plan.md).

    ``first``: the lowest layer of the span, whose input does not require grad (it comes from the prefix
    cache or the frozen embeddings), so its norms, attention and frozen MLPs save nothing; only the router
    (which trains) and the experts (whose deltas train) do. ``preact``: the experts keep their gate/up
    pre-activations (off in the lean mode that goes with checkpointing).
    """
    n = s.batch_size * s.seq_len
    h, nh = mc.hidden, lc.heads
    b = 0
    if not first:
        b += n * h * 4 * 2  # the two RMSNorms keep their fp32 input (x^2 and x * rsqrt)
        b += n * lc.attn_norm_width * 4  # q/k norms (or MLA lora norms), fp32 inputs
        if attn == "eager":  # q, repeated k, repeated v; softmax output (fp32) + its cast for P @ V
            b += n * d * (2 * nh * lc.qk_head_dim + nh * lc.v_head_dim)
            b += s.batch_size * nh * s.seq_len * s.seq_len * (4 + d)
        else:  # SDPA (flash / efficient): q, k, v (repeated for GQA when masked), output, logsumexp
            b += n * d * (2 * nh * lc.qk_head_dim + 2 * nh * lc.v_head_dim) + n * nh * 4
        b += n * d * 3 * lc.mlp_width // 2  # frozen SwiGLU MLPs: act input, act output, up output
    if lc.moe:
        sk = n * mc.top_k
        sp = padded(lc, sk)
        b += n * h * d  # the MoE input, kept by the router (it trains) and the experts
        b += n * lc.num_experts * 4 + n * mc.top_k * 12  # fp32 routing probabilities, top-k ids + weights
        b += sp * 16  # the experts' routing: token row and weight slot of every padded row (int64)
        if preact:
            b += sp * d * 2 * lc.expert_inter  # gate/up pre-activations (S', 2I)
    return b


def layer_kept_lean(mc: ModelCounts, lc: LayerCounts, s: Settings, d: int) -> int:
    """Bytes one checkpointed layer keeps between its forward and its backward: the layer input (saved
    by the checkpoint), and what the experts hold outside it (MoE input, routing weights, routing)."""
    n = s.batch_size * s.seq_len
    b = n * mc.hidden * d
    if lc.moe:
        b += n * mc.hidden * d + n * mc.top_k * d + padded(lc, n * mc.top_k) * 16
    return b


def padded(lc: LayerCounts, rows: int) -> int:
    return padded_rows(rows, lc.num_experts)


def padded_rows(rows: int, experts: int) -> int:
    """Rows the expert kernel computes: each expert's rows are padded up to a multiple of the layer's block
    (``usaf.engine.experts.block_rows``). Routing is uneven, so the padding is averaged over per-expert counts
    spread +-50% around the mean ``rows / experts``."""
    block = block_rows(rows, experts)
    hit = max(1, min(experts, rows))
    mean = -(-rows // hit)
    lo, hi = max(1, mean // 2), mean + mean // 2
    samples = sorted({lo + (hi - lo) * i // 63 for i in range(64)})
    pad = sum(bucket(n, block) - n for n in samples) / len(samples)
    return rows + int(round(hit * pad))


def layer_infer_working(mc: ModelCounts, lc: LayerCounts, s: Settings, d: int, attn: str) -> int:
    """Peak transient bytes inside one layer of a no-grad forward (residual + the largest sub-block)."""
    n = s.batch_size * s.seq_len
    h, nh = mc.hidden, lc.heads
    base = n * h * (2 * d + 8)  # residual, normed input, fp32 norm temporaries
    attn_b = n * d * (2 * nh * lc.qk_head_dim + 2 * nh * lc.v_head_dim) + n * lc.attn_norm_width * 4
    if attn == "eager":
        attn_b += s.batch_size * nh * s.seq_len * s.seq_len * (d + 8)  # scores, fp32 upcast, softmax
    mlp_b = 2 * n * lc.mlp_width * d
    moe_b = 0
    if lc.moe:
        # router logits + probabilities; routing (int64 per padded row); the (T, H) output; one expert's rows
        # at a time (input, pre-activations, activation, output), at most ~2x the mean count
        sp = padded(lc, n * mc.top_k)
        rows = 2 * sp // max(1, min(lc.num_experts, n * mc.top_k))
        moe_b = n * lc.num_experts * (d + 4) + sp * 16 + n * h * d + rows * d * (2 * h + 3 * lc.expert_inter)
    return base + max(attn_b, mlp_b + moe_b)


def logits_bytes(mc: ModelCounts, s: Settings, d: int, train: bool) -> int:
    """Inference: a forward's logits (B x T x V, compute dtype). Training uses the
    chunked LM-head loss (``usaf.loss``): one chunk of logits (compute dtype + fp32, and the gradient cast
    back) at a time, plus per-token log-sum-exp, the gathered hidden states and their gradient."""

    tokens = s.batch_size * s.seq_len
    if not train:
        return tokens * mc.vocab * d
    rows = min(tokens, max(MIN_ROWS, CHUNK_BYTES // (4 * mc.vocab)))
    return rows * mc.vocab * (4 + 2 * d) + tokens * (4 + 2 * mc.hidden * d)


# Kinds of parts: ``resident`` (the whole run), ``step`` (every moment of a step), ``loss`` (around the
# loss: forward end + start of backward), ``layer`` (inside one layer's forward/backward), ``save`` (while a
# checkpoint is written, between steps), ``select`` (the selection's calibration pass, beside its loss / layer
# moments), ``score`` (scoring a group of experts after the pass: no activations then), ``selection`` (the whole
# selection: recorded calls, the linears' scores), ``train-step`` / ``select-step`` (like ``step``, in the
# training steps only / the calibration pass only). The step peak is resident + step + train-step + the largest
# of loss / layer / save; the selection peak is resident + step + selection + the largest of loss + select +
# select-step / layer + select + select-step / score.
