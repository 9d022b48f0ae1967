"""``usaf plan``: predict the peak memory of inference and of one training step, and where each part goes.

Reads ``config.json`` only (the model is built on the meta device, like ``usaf inspect``), so it works for a
model that is not downloaded. For both INFERENCE (a no-grad forward of ``batch x seq`` with the loss, as
``usaf eval`` runs it) and TRAINING (one step: forward + backward through the trainable layers, then the
optimizer step; plus the importance-scoring phase of selection/reselection), it predicts the peak bytes on
the *device* tier (the accelerator; host RAM with ``--device cpu``) and on the *host* tier, with a greedy
placement of every part on device, host or disk under the given budgets. When something does not fit it
says so and re-runs the predictor on candidate settings (fewer ``--train-layers``, shorter ``--seq-len``,
...) to report the first that fits. The model, formulas and assumptions are in ``docs/plan.md``.

Python API: :func:`predict` (a dict, see its docstring), :func:`count_model` (parameter counts by kind),
:func:`parse_memory` (``"12GB"`` -> bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ModelCounts",
    "LayerCounts",
    "Settings",
    "parse_memory",
    "count_model",
    "predict",
    "format_plan",
    "add_parser",
]

# ------------------------------------------------------------------------------------------------ constants
# Fixed runtime costs that are not tensors of the model (see docs/plan.md).
CUDA_RUNTIME_DEVICE = 512 << 20  # CUDA context, cuBLAS workspace, caching-allocator slack (on the device)
CUDA_RUNTIME_HOST = 1536 << 20  # Python + torch + transformers + the CUDA runtime libraries (host RSS)
CPU_RUNTIME_HOST = 512 << 20  # Python + torch + transformers, tokenizer and data (host RSS)
# Elements per step of the dequantization scratch buffer (fp32), as in ``usaf.quant``.
DEQUANT_SCRATCH_ACCEL = 1 << 24
DEQUANT_SCRATCH_CPU = 1 << 19
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTS = ("4bit", "8bit", "none")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory(text: str | int | float, flag: str = "memory") -> int:
    """``"12GB"`` -> 12 * 10**9, ``"12GiB"`` -> 12 * 2**30, ``"512MB"``, ``"1.5TB"``, a plain number = bytes.

    Raises:
        ValueError: one line naming ``flag`` and the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"{flag} {text!r} is not a memory size (use e.g. 12GB, 12GiB, 512MB)")
    if isinstance(text, (int, float)):
        if text <= 0 or not math.isfinite(text):
            raise ValueError(f"{flag} must be positive, got {text!r}")
        return int(text)
    m = _MEM_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{flag} {text!r} is not a memory size (use e.g. 12GB, 12GiB, 512MB; GB = 10^9 bytes, GiB = 2^30)"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{flag} must be positive, got {text!r}")
    return value


def fmt_bytes(n: float) -> str:
    """Decimal units, like the inputs: 1.23 GB, 456.7 MB."""
    n = float(n)
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


# ------------------------------------------------------------------------------------------------ counting
@dataclass(frozen=True)
class LayerCounts:
    """Parameter counts and activation widths of one decoder layer (from the meta model).

    Attributes:
        index: decoder layer index.
        moe: the layer has a fused expert stack.
        expert_params: elements of the routed expert stacks (``gate_up_proj`` + ``down_proj``).
        expert_bias_params: elements of per-expert biases (gpt_oss), kept unquantized.
        stack_numels: elements of each stack (decides 4- or 8-byte delta indices).
        num_experts / expert_inter: E and I (the expert MLP width; the gate/up stack is 2I wide).
        router_params / shared_params / other_params: router, shared experts, everything else (attention,
            norms, dense MLP).
        attn_norm_width: per-token width normalized inside the attention (q/k norms, MLA lora norms).
        mlp_width: per-token output width of the frozen dense/shared MLP projections other than the
            down projection (gate + up for a SwiGLU MLP).
        heads / kv_heads / qk_head_dim / v_head_dim: the attention's shape (per layer: some families mix
            head sizes across layers).
    """

    index: int
    moe: bool
    expert_params: int = 0
    expert_bias_params: int = 0
    stack_numels: tuple[int, ...] = ()
    num_experts: int = 0
    expert_inter: int = 0
    router_params: int = 0
    shared_params: int = 0
    other_params: int = 0
    attn_norm_width: int = 0
    mlp_width: int = 0
    heads: int = 1
    kv_heads: int = 1
    qk_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def non_expert_params(self) -> int:
        return self.router_params + self.shared_params + self.other_params


@dataclass(frozen=True)
class ModelCounts:
    """What the predictor needs from a config: parameter counts by kind and the shapes of the activations."""

    model_type: str
    name: str
    hidden: int
    vocab: int
    top_k: int
    attn: str
    use_cache: bool
    tied: bool
    layers: tuple[LayerCounts, ...]
    embed_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    other_params: int  # final norm and anything outside the decoder layers, embeddings and head
    total_params: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return [x.index for x in self.layers if x.moe]

    @property
    def expert_params(self) -> int:
        return sum(x.expert_params for x in self.layers)

    @property
    def active_params(self) -> int:
        """Parameters used per token: everything but the routed experts a token does not visit."""
        unused = sum(x.expert_params * (1 - self.top_k / x.num_experts) for x in self.layers if x.moe)
        return int(round(self.total_params - unused))

    def by_kind(self) -> dict[str, int]:
        return {
            "total": self.total_params,
            "active": self.active_params,
            "experts": self.expert_params + sum(x.expert_bias_params for x in self.layers),
            "routers": sum(x.router_params for x in self.layers),
            "shared_experts": sum(x.shared_params for x in self.layers),
            "attention_dense": sum(x.other_params for x in self.layers),
            "embeddings": self.embed_params,
            "lm_head": self.lm_head_params,
            "other": self.other_params,
        }


def _load_config(model: Any, trust_remote_code: bool = False):
    """A transformers config from a config object, a dict, a config.json path or a checkpoint directory."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        return _config_from_dict(dict(model), "config")
    p = Path(str(model)).expanduser()
    if p.is_file():
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{p} is not a readable JSON config ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} is not a config (a JSON object with model_type)")
        config = _config_from_dict(data, str(p))
        config._name_or_path = str(p.resolve().parent)
        return config
    from ..load.hf import load_config

    return load_config(str(model), trust_remote_code)


def _config_from_dict(data: dict, where: str):
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise ValueError(f"{where} has no model_type")
    if model_type not in CONFIG_MAPPING:
        from ..engine.families import UnsupportedModelError, supported

        raise UnsupportedModelError(
            f"model_type {model_type!r} is not known to transformers (usaf supports: {supported()})"
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as e:  # noqa: BLE001 - any config-class complaint is a user error here
        raise ValueError(
            f"cannot build a {model_type} config from {where}: {str(e).splitlines()[0]}"
        ) from None


def _top_k(text_cfg, block, router) -> int:
    for obj, attrs in (
        (text_cfg, ("num_experts_per_tok", "top_k_experts", "num_experts_per_token", "moe_topk")),
        (router, ("top_k",)),
        (block, ("top_k",)),
    ):
        for a in attrs:
            v = getattr(obj, a, None) if obj is not None else None
            if isinstance(v, int) and v > 0:
                return v
    raise ValueError("cannot find the number of experts per token (num_experts_per_tok) in the config")


def _int_attr(obj, name: str) -> int:
    """An int attribute, 0 when missing (some configs raise on per-layer attributes read globally)."""
    try:
        v = getattr(obj, name, 0)
    except Exception:  # noqa: BLE001
        return 0
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _attention_module(layer):
    for name in ("self_attn", "attention", "attn"):
        mod = getattr(layer, name, None)
        if mod is not None:
            return mod
    for name, mod in layer.named_children():
        if "attn" in name or "attention" in name:
            return mod
    return None


_COUNTS: dict[tuple[str, bool], ModelCounts] = {}


def count_model(model: Any, trust_remote_code: bool = False) -> ModelCounts:
    """Parameter counts by kind for a config (object, dict, ``config.json`` path or checkpoint directory).

    Builds the model on the meta device (no memory, no weights). Cached per config.

    Raises:
        UnsupportedModelError: a dense model or an unknown MoE family (one line naming the supported ones).
        ValueError: an unreadable config.
    """
    from ..engine.families import family_for

    config = _load_config(model, trust_remote_code)
    family_for(config)  # one-line error for dense / unknown models before building anything
    try:
        key = (config.to_json_string(use_diff=False), trust_remote_code)
    except (TypeError, ValueError):
        return _count(config, trust_remote_code)
    if key not in _COUNTS:
        if len(_COUNTS) >= 16:
            _COUNTS.clear()
        _COUNTS[key] = _count(config, trust_remote_code)
    return _COUNTS[key]


def _count(config, trust_remote_code: bool) -> ModelCounts:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from ..engine.families import UnsupportedModelError, family_for, fused_experts, get_path
    from ..engine.model import decoder_layers

    fam = family_for(config)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = m.config.get_text_config()
    hidden = int(text.hidden_size)
    layers = decoder_layers(m)
    counted: set[int] = set()

    def numel(params) -> int:
        n = 0
        for p in params:
            if id(p) not in counted:
                counted.add(id(p))
                n += p.numel()
        return n

    embed = m.get_input_embeddings()
    head = m.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    embed_params = numel(embed.parameters()) if embed is not None else 0
    head_params = numel(head.parameters()) if head is not None else 0

    top_k = None
    out_layers: list[LayerCounts] = []
    heads = _int_attr(text, "num_attention_heads") or 1
    cfg_qk = _int_attr(text, "qk_head_dim") or (
        _int_attr(text, "qk_nope_head_dim") + _int_attr(text, "qk_rope_head_dim")
    )
    cfg_qk = cfg_qk or _int_attr(text, "head_dim") or hidden // heads
    cfg_kv = _int_attr(text, "num_key_value_heads") or heads
    for i, layer in enumerate(layers):
        block = get_path(layer, fam.block)
        ex = fused_experts(layer, fam)
        is_moe = ex is not None
        router = get_path(block, fam.router) if is_moe else None
        shared = get_path(block, fam.shared) if is_moe and fam.shared else None
        attn = _attention_module(layer)
        skip = {id(mod) for mod in (ex, router, shared, attn) if mod is not None}
        qk_dim = _int_attr(attn, "qk_head_dim") or _int_attr(attn, "head_dim") or cfg_qk
        v_dim = _int_attr(attn, "v_head_dim") or qk_dim
        groups = _int_attr(attn, "num_key_value_groups")
        kv_heads = heads // groups if groups else cfg_kv
        info: dict[str, Any] = {
            "index": i,
            "moe": is_moe,
            "heads": heads,
            "kv_heads": kv_heads,
            "qk_head_dim": qk_dim,
            "v_head_dim": v_dim,
        }
        if is_moe:
            gu, dn = ex.gate_up_proj, ex.down_proj
            stacks = (gu.numel(), dn.numel())
            info.update(
                expert_params=numel([gu, dn]),
                stack_numels=stacks,
                num_experts=int(gu.shape[0]),
                expert_inter=int((gu.shape[2] if fam.transposed else gu.shape[1]) // 2),
            )
            info["expert_bias_params"] = numel(ex.parameters())  # biases (the stacks are counted already)
            info["router_params"] = numel(router.parameters())
            info["shared_params"] = numel(shared.parameters()) if shared is not None else 0
            if top_k is None:
                top_k = _top_k(text, block, router)
        # attention: per-token widths normalized in fp32 inside it (q/k norms are per head)
        norm_width = 0
        if attn is not None:
            for name, mod in attn.named_modules():
                w = getattr(mod, "weight", None)
                if "norm" in type(mod).__name__.lower() and w is not None and w.dim() == 1:
                    leaf = name.rsplit(".", 1)[-1]
                    per_head = (
                        leaf[:1] in ("q", "k", "v") and "_a_" not in leaf and w.numel() in (qk_dim, v_dim)
                    )
                    n_heads = heads if leaf.startswith("q") else kv_heads
                    norm_width += w.numel() * (n_heads if per_head else 1)
        # frozen dense / shared MLP projections (not attention, experts, router): their widths
        mlp_width = 0
        stack = [layer]
        while stack:
            mod = stack.pop()
            if id(mod) in skip and mod is not shared:
                continue
            if isinstance(mod, nn.Linear) and mod.out_features != hidden:
                mlp_width += mod.out_features
            stack.extend(mod.children())
        info["attn_norm_width"] = norm_width
        info["mlp_width"] = mlp_width
        info["other_params"] = numel(layer.parameters())  # what is left: attention, norms, dense MLP
        out_layers.append(LayerCounts(**info))
    if not any(x.moe for x in out_layers):
        raise UnsupportedModelError(
            f"{type(m).__name__} has no fused expert layers (a dense model?); usaf trains Mixture-of-Experts "
            f"models"
        )
    other = numel(m.parameters())
    total = sum(p.numel() for p in m.parameters())
    attn_impl = getattr(m.config, "_attn_implementation", None) or "sdpa"
    name = (getattr(config, "_name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1] or fam.model_type
    return ModelCounts(
        model_type=fam.model_type,
        name=name,
        hidden=hidden,
        vocab=int(text.vocab_size),
        top_k=int(top_k),
        attn="eager" if attn_impl == "eager" else "sdpa",
        use_cache=bool(getattr(text, "use_cache", True)),
        tied=tied,
        layers=tuple(out_layers),
        embed_params=embed_params,
        lm_head_params=head_params,
        other_params=other,
        total_params=total,
    )


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """One planning scenario (the flags of ``usaf plan``); budgets in bytes."""

    seq_len: int = 512
    batch_size: int = 1
    density: float = 0.005
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
    score_budget_mb: int = 1024
    score_dtype: str = "bf16"
    score_layers: int = 1

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def describe(self) -> str:
        return (
            f"--train-layers {self.train_layers} --seq-len {self.seq_len} --batch-size {self.batch_size} "
            f"--density {self.density:g} --quant {self.quant} --chunk-mb {self.chunk_mb}"
        )


def _check(s: Settings) -> None:
    if s.seq_len < 1 or s.batch_size < 1:
        raise ValueError(f"--seq-len and --batch-size must be >= 1, got {s.seq_len} and {s.batch_size}")
    if not 0 < s.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {s.density}")
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
    if s.group_size < 8 or s.group_size % 8:
        raise ValueError(f"group size must be a positive multiple of 8, got {s.group_size}")


def _train_range(spec: str, num_layers: int) -> tuple[range, str | None]:
    """``parse_layers`` with one leniency: ``top:N`` with N above the layer count means all layers."""
    from ..engine.model import parse_layers

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
def _quant_bytes(numel_per_expert: int, experts: int, quant: str, group_size: int, d: int) -> int:
    """Storage of one frozen stack: packed codes + fp16 scale and zero per group (per-expert padding)."""
    if quant == "none":
        return numel_per_expert * experts * d
    bits = 4 if quant == "4bit" else 8
    groups = -(-numel_per_expert // group_size)
    return experts * groups * (group_size * bits // 8 + 4)


def layer_expert_bytes(lc: LayerCounts, quant: str, group_size: int, d: int) -> int:
    """Frozen (quantized) bytes of one layer's expert stacks, biases included."""
    if not lc.moe:
        return 0
    total = sum(
        _quant_bytes(n // lc.num_experts, lc.num_experts, quant, group_size, d) for n in lc.stack_numels
    )
    return total + lc.expert_bias_params * d


def _dequant_bytes(lc: LayerCounts, chunk_mb: int, d: int) -> int:
    """Peak dequantized expert weights of one layer (``UsafExperts.runs`` caps a run at chunk_mb of bf16).

    One run holds its gate/up and down weights; when a layer has several runs, the next run's gate/up is
    dequantized while the previous run's weights are still referenced.
    """
    if not lc.moe:
        return 0
    per_expert = sum(lc.stack_numels) // lc.num_experts
    cap = max(1, (chunk_mb << 20) // max(2 * per_expert, 1))
    run = min(cap, lc.num_experts) * per_expert * d
    if cap >= lc.num_experts:
        return run
    return run + run * lc.stack_numels[0] // sum(lc.stack_numels)


def _layer_activations(
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
        sp = _padded(lc, sk)
        b += n * h * d  # the MoE input, kept by the router (it trains) and the experts
        b += n * lc.num_experts * 4 + n * mc.top_k * 12  # fp32 routing probabilities, top-k ids + weights
        b += sp * 16  # the experts' routing: token row and weight slot of every padded row (int64)
        if preact:
            b += sp * d * 2 * lc.expert_inter  # gate/up pre-activations (S', 2I)
    return b


def _layer_kept_lean(mc: ModelCounts, lc: LayerCounts, s: Settings, d: int) -> int:
    """Bytes one checkpointed layer keeps between its forward and its backward: the layer input (saved
    by the checkpoint), and what the experts hold outside it (MoE input, routing weights, routing)."""
    n = s.batch_size * s.seq_len
    b = n * mc.hidden * d
    if lc.moe:
        b += n * mc.hidden * d + n * mc.top_k * d + _padded(lc, n * mc.top_k) * 16
    return b


def _padded(lc: LayerCounts, rows: int) -> int:
    return padded_rows(rows, lc.num_experts)


def padded_rows(rows: int, experts: int) -> int:
    """Rows the expert kernel computes: each expert's rows are padded up to a multiple of the layer's block
    (``usaf.engine.experts.block_rows``). Routing is uneven, so the padding is averaged over per-expert counts
    spread +-50% around the mean ``rows / experts``."""
    try:
        from ..engine.experts import _bucket, block_rows
    except ImportError:  # no padding in this version of the hot path
        return rows
    block = block_rows(rows, experts)
    hit = max(1, min(experts, rows))
    mean = -(-rows // hit)
    lo, hi = max(1, mean // 2), mean + mean // 2
    samples = sorted({lo + (hi - lo) * i // 63 for i in range(64)})
    pad = sum(_bucket(n, block) - n for n in samples) / len(samples)
    return rows + int(round(hit * pad))


def _layer_infer_working(mc: ModelCounts, lc: LayerCounts, s: Settings, d: int, attn: str) -> int:
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
        sp = _padded(lc, n * mc.top_k)
        rows = 2 * sp // max(1, min(lc.num_experts, n * mc.top_k))
        moe_b = n * lc.num_experts * (d + 4) + sp * 16 + n * h * d + rows * d * (2 * h + 3 * lc.expert_inter)
    return base + max(attn_b, mlp_b + moe_b)


def _logits_bytes(mc: ModelCounts, s: Settings, d: int, train: bool) -> int:
    """Inference: a forward's logits (B x T x V, compute dtype). Training uses the
    chunked LM-head loss (``usaf.loss``): one chunk of logits (compute dtype + fp32, and the gradient cast
    back) at a time, plus per-token log-sum-exp, the gathered hidden states and their gradient."""
    from ..engine.loss import CHUNK_BYTES, MIN_ROWS

    tokens = s.batch_size * s.seq_len
    if not train:
        return tokens * mc.vocab * d
    rows = min(tokens, max(MIN_ROWS, CHUNK_BYTES // (4 * mc.vocab)))
    return rows * mc.vocab * (4 + 2 * d) + tokens * (4 + 2 * mc.hidden * d)


# Kinds of parts: ``resident`` (the whole run), ``step`` (every moment of a step), ``loss`` (around the
# loss: forward end + start of backward), ``layer`` (inside one layer's forward/backward), ``save`` (while a
# checkpoint is written, between steps), ``select`` (importance scoring: the score buffers live through a
# forward + backward pass), ``train-step`` / ``select-step`` (like ``step``, in the training steps only /
# the selection passes only). The step peak is resident + step + train-step + the largest of loss / layer /
# save; the selection peak is resident + step + select-step + select + the larger of loss / layer.
_STEP_MOMENTS = (("loss",), ("layer",), ("save",))
_SELECT_MOMENTS = (("loss", "select"), ("layer", "select"))
_WHEN = {
    "step": " (during the step)",
    "train-step": " (during a training step)",
    "select-step": " (during a selection pass)",
    "loss": " (at the loss)",
    "layer": " (inside a layer)",
    "save": " (while saving)",
    "select": " (while scoring, selection)",
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
        return self.used(tiers, ("resident", "step", "select-step")) + max(
            self.used(tiers, m) for m in _SELECT_MOMENTS)

    def peak(self, tier: str) -> int:
        """Peak bytes of a tier over every moment (step and selection)."""
        return max(self.step_peak(tier), self.select_peak(tier))

    def device_free(self) -> int:
        return self.device_budget - self.peak("device")

    def host_free(self) -> int:
        return self.host_budget - self.peak("host")


def _place_block(
    p: _Plan, name: str, pieces: list[int], device_staging: int, mapped: int, reserve: int = 0
) -> dict:
    """Greedy placement of frozen pieces (layers): device if they all fit, else device/host/disk per piece.

    Pieces not on the device are streamed: ``device_staging`` bytes of device buffers (current + prefetched
    piece) are reserved first; if any piece ends on disk, ``mapped`` bytes of its mmap pages stay resident
    in host RAM (reserved before placing, so the greedy fill leaves room for them). ``reserve``: device
    bytes to leave free for what is placed later (its streaming buffers at least).
    """
    total = sum(pieces)
    counts = {"device": 0, "host": 0, "disk": 0}
    if total == 0:
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


def _phase(mc: ModelCounts, s: Settings, train: bool) -> dict:
    """Place and sum one phase (train or infer). Returns the phase dict of :func:`predict`."""
    d = DTYPE_BYTES[s.dtype]
    attn = s.attn or mc.attn
    L = mc.num_layers
    rng, note = _train_range(s.train_layers, L)
    dev_budget = s.host_memory if s.cpu else s.device_memory
    p = _Plan(cpu=s.cpu, device_budget=dev_budget, host_budget=s.host_memory)
    if note:
        p.notes.append(note)
    dev_tier = "device"
    host_tier = "device" if s.cpu else "host"
    n_tok = s.batch_size * s.seq_len

    # -- which layers are resident ------------------------------------------------------------------
    first = rng.start
    span = list(range(first, L)) if train else list(range(L))
    resident = list(range(L)) if train and not s.prefix_cache else span
    layers = [mc.layers[i] for i in resident]
    moe_train = [mc.layers[i] for i in rng if mc.layers[i].moe]
    if not moe_train:
        raise ValueError(
            f"--train-layers {s.train_layers!r} contains no MoE layer (MoE layers: {_ranges(mc.moe_layers)})"
        )

    # -- runtime ------------------------------------------------------------------------------------
    if s.cpu:
        p.add("runtime (Python, torch, transformers, data)", CPU_RUNTIME_HOST, dev_tier)
    else:
        p.add("runtime (CUDA context, workspaces, allocator slack)", CUDA_RUNTIME_DEVICE, "device")
        p.add("runtime (Python, torch, transformers, CUDA libraries)", CUDA_RUNTIME_HOST, "host")

    # -- trainable state (hottest) --------------------------------------------------------------------
    active = sum(int(round(s.density * numel)) for lc in moe_train for numel in lc.stack_numels)
    idx_bytes = sum(4 if numel < 2**31 else 8 for lc in moe_train for numel in lc.stack_numels)
    per_el = idx_bytes / (2 * len(moe_train))  # mean index size over the stacks
    offsets = sum((lc.num_experts + 1) * 8 * len(lc.stack_numels) for lc in moe_train)
    router = sum(lc.router_params for lc in moe_train)
    if train:
        p.add(
            "deltas: indices + fp32 values + AdamW moments (16 B/elt)",
            int(active * (per_el + 12)) + offsets,
            dev_tier,
        )
        p.add("deltas: fp32 gradients (4 B/elt)", active * 4, dev_tier, "layer")
        master = 0 if d == 4 else 4  # fp32 models: the router parameter is its own master
        p.add("routers: fp32 masters + AdamW moments", router * (master + 8), dev_tier)
        p.add("routers: gradients", router * (d + (4 if master else 0)), dev_tier, "layer")
    else:
        p.add("deltas: indices + fp32 values (applied)", int(active * (per_el + 4)) + offsets, dev_tier)

    # -- activations ----------------------------------------------------------------------------------
    span_layers = [mc.layers[i] for i in span]
    if train:
        # Selection passes always run checkpointed (usaf.memory.prefix.lean_passes); the steps when it is on.
        kept = sum(_layer_kept_lean(mc, lc, s, d) for lc in span_layers)
        lean = max(_layer_activations(mc, lc, s, d, attn, first=k == 0, preact=False)
                   for k, lc in enumerate(span_layers))
        act_ckpt = _checkpointing(mc, s)
        p.add(f"activations: layer inputs, MoE inputs + routing ({len(span)} layers)", kept, dev_tier,
              "step" if act_ckpt else "select-step")
        p.add("activations: one layer recomputed (experts not re-run)", lean, dev_tier,
              "layer" if act_ckpt else "select")
        if not act_ckpt:
            full = [_layer_activations(mc, lc, s, d, attn, first=k == 0) for k, lc in enumerate(span_layers)]
            p.add(f"activations: {len(span)} layers in full", sum(full), dev_tier, "train-step")
        sp = max(_padded(lc, n_tok * mc.top_k) for lc in moe_train)
        p.add(
            "backward working set (input grads, residual grads, routing-weight grads)",
            n_tok * mc.hidden * d + sp * 4 + 4 * n_tok * mc.hidden * 4,
            dev_tier,
            "layer",
        )
        p.add("final norm input (fp32)", n_tok * mc.hidden * 4, dev_tier, "step")
    else:
        p.add(
            "activations: one layer's working set + residual",
            max(_layer_infer_working(mc, lc, s, d, attn) for lc in layers),
            dev_tier,
            "layer",
        )
        if mc.use_cache:
            kv = sum(n_tok * lc.kv_heads * (lc.qk_head_dim + lc.v_head_dim) * d for lc in mc.layers)
            p.add("KV cache (use_cache)", kv, dev_tier, "step")
    p.add(
        "logits: one chunk of rows x V (compute dtype + fp32) + gradient" if train else
        "logits (B x T x V)",
        _logits_bytes(mc, s, d, train),
        dev_tier,
        "loss",
    )

    # -- dequantization transients (current layer) -------------------------------------------------------
    moe_res = [lc for lc in layers if lc.moe]
    dq = max(_dequant_bytes(lc, s.chunk_mb, d) for lc in moe_res)
    scratch_el = DEQUANT_SCRATCH_CPU if s.cpu else DEQUANT_SCRATCH_ACCEL
    scratch = 0 if s.quant == "none" else min(scratch_el, max(sum(lc.stack_numels) for lc in moe_res)) * 4
    p.add(
        f"dequantized expert weights (runs of <= {s.chunk_mb} MB) + scratch", dq + scratch, dev_tier, "layer"
    )

    # -- training: checkpoint staging and the importance scores of selection / reselection ------------------
    scores = 0
    if train:
        ckpt = int(active * (per_el + 12)) + router * 12
        p.add("checkpoint staging (host copy of deltas, moments, routers)", ckpt, host_tier, "save")
        scores, score_dtype = _score_bytes(s, moe_train)
        dw = max(sum(lc.stack_numels) // lc.num_experts for lc in moe_train) * (d + 4)
        p.add("selection: dense |dW| of one expert", dw, dev_tier, "select")
        # scores are less hot than the frozen weights: planned on the host (RAM on CPU), moved below if room
        p.add(
            f"selection: importance scores ({score_dtype}, one layer group) + top-k",
            scores,
            host_tier,
            "select",
        )
    if p.device_free() < 0 or p.host_free() < 0:
        what = (
            "trainable state, activations, logits and transients"
            if train
            else "activations, logits and transients"
        )
        tier = "device" if p.device_free() < 0 else "host"
        p.failed.append(
            f"{what} alone ({fmt_bytes(p.peak(tier))}) exceed the "
            + ("host memory" if s.cpu or tier == "host" else "device memory")
        )

    # -- non-expert weights (bf16): device if they fit, else host, else disk ---------------------------------
    per_layer = [lc.non_expert_params * d for lc in layers]
    head = (mc.lm_head_params or (mc.embed_params if mc.tied else 0)) * d
    need_embed = (not train) or (not s.prefix_cache) or mc.tied
    embed = mc.embed_params * d if need_embed and not mc.tied else 0
    ne_total = sum(per_layer) + head + embed + mc.other_params * d
    ne_staging = max(2 * max(per_layer, default=0), head, embed)
    ex_pieces = [layer_expert_bytes(lc, s.quant, s.group_size, d) for lc in moe_res]
    staging = 2 * max(ex_pieces)
    # leave room for the experts' streaming buffers (or the experts themselves, if smaller)
    ne_placed = _place_block(
        p, "non-expert weights", [ne_total], ne_staging, ne_staging, reserve=min(staging, sum(ex_pieces))
    )

    # -- frozen experts of the resident layers: device, else host (streamed), else disk (mmap) ----------
    placed = _place_block(p, f"frozen experts ({s.quant})", ex_pieces, staging, staging)

    # -- training: the scores go to the device if it has room at the selection moment; disk parts ------
    if train:
        if not s.cpu and p.select_peak("device") + scores <= p.device_budget:
            next(q for q in p.parts if q["item"].startswith("selection: importance"))["tier"] = "device"
        if s.prefix_cache and (first > 0 or not mc.tied):
            disk_prefix = sum(
                layer_expert_bytes(lc, s.quant, s.group_size, d) + lc.non_expert_params * d
                for lc in mc.layers[:first]
            )
            disk_prefix += 0 if mc.tied else mc.embed_params * d
            what = f"frozen layers 0-{first - 1} + embeddings" if first > 0 else "embeddings"
            p.add(f"{what} (prefix-cache build only)", disk_prefix, "disk")
            p.add("prefix cache: hidden states (B x T x H per batch)", n_tok * mc.hidden * d, "disk")

    for tier, budget in (("device", dev_budget), ("host", s.host_memory)):
        if (s.cpu and tier == "host") or p.failed:
            continue
        if p.step_peak(tier) > budget:
            p.failed.append(
                f"{tier if not s.cpu else 'host'} peak {fmt_bytes(p.step_peak(tier))} exceeds the "
                f"budget {fmt_bytes(budget)}"
            )
        elif train and p.select_peak(tier) > budget:
            p.failed.append(
                f"selection (importance scoring) peak {fmt_bytes(p.select_peak(tier))} on the "
                f"{tier if not s.cpu else 'host'} exceeds the budget {fmt_bytes(budget)}"
            )
    out = {
        "fits": not p.failed,
        "peak_device_bytes": p.step_peak("device"),
        "peak_host_bytes": p.step_peak("host"),
        "disk_bytes": p.used(("disk",), ("resident",)),
        "layers": [resident[0], resident[-1]],
        "experts_placement": placed,
        "non_expert_placement": next((k for k, v in ne_placed.items() if v), "device"),
        "breakdown": p.parts,
        "notes": p.notes,
        "problems": p.failed,
    }
    if train:
        out["active_elements"] = active
        out["checkpointing"] = "on" if act_ckpt else "off"
        out["train_layers"] = [rng.start, rng.stop - 1]
        sel_ok = p.select_peak("device") <= dev_budget and (s.cpu or p.select_peak("host") <= s.host_memory)
        out["step_fits"] = not [f for f in p.failed if not f.startswith("selection")]
        out["select"] = {
            "fits": bool(sel_ok and out["step_fits"]),
            "peak_device_bytes": p.select_peak("device"),
            "peak_host_bytes": p.select_peak("host"),
            "score_buffers_bytes": scores,
            "score_buffers_tier": next(
                q["tier"] for q in p.parts if q["item"].startswith("selection: importance")
            ),
        }
    return out


# ``--checkpointing auto`` turns checkpointing on when it lowers the predicted training-step peak on the
# compute device by more than this fraction: below it, the 10-20% of step time that it costs (measured,
# docs/memory.md) buys too little.
AUTO_CHECKPOINT_GAIN = 0.02


def _checkpointing(mc: ModelCounts, s: Settings) -> bool:
    """``usaf train``'s rule (``usaf.memory.prefix.use_checkpointing`` asks this plan): ``auto`` is on when the
    predicted training-step peak with checkpointing is lower than without it by more than
    ``AUTO_CHECKPOINT_GAIN``, on the compute device (selection passes are checkpointed either way)."""
    if s.checkpointing != "auto":
        return s.checkpointing == "on"
    on = _phase(mc, replace(s, checkpointing="on"), train=True)
    off = _phase(mc, replace(s, checkpointing="off"), train=True)
    return on["peak_device_bytes"] < (1 - AUTO_CHECKPOINT_GAIN) * off["peak_device_bytes"]


def _score_bytes(s: Settings, moe_train: list[LayerCounts]) -> tuple[int, str]:
    """Dense score buffers of the largest group of layers scored at once, as ``usaf.select`` allocates them:
    in ``score_dtype``, ``score_layers`` layers at a time within ``score_budget_mb`` (at least one), plus the
    top-k candidates of the largest stack (values + int64 indices)."""
    budget = s.score_budget_mb << 20
    elem = 4 if s.score_dtype == "fp32" else 2
    groups, cur, n = [], 0, 0
    for lc in reversed(moe_train):
        size = lc.expert_params * elem
        if cur and (cur + size > budget or n >= max(1, s.score_layers)):
            groups.append(cur)
            cur, n = 0, 0
        cur += size
        n += 1
    groups.append(cur)
    total = sum(lc.expert_params for lc in moe_train)
    budget_el = s.density * total
    biggest = max(n for lc in moe_train for n in lc.stack_numels)
    k = min(biggest, math.ceil(4.0 * budget_el * biggest / total))  # layer_share_cap = 4
    return max(groups) + k * (elem + 8), ("fp32" if elem == 4 else "bf16")


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


# ------------------------------------------------------------------------------------------------ predict
def _host_default() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _evaluate(mc: ModelCounts, s: Settings) -> dict:
    train = _phase(mc, s, train=True)
    infer = _phase(mc, s, train=False)
    return {"fits": train["fits"] and infer["fits"], "train": train, "infer": infer}


def _min_budget(mc: ModelCounts, s: Settings, key: str = "") -> int | None:
    """Smallest budget (``device_memory``, or ``host_memory``; default: the device tier's) at which these
    settings fit, by bisection; None if not even 1 PB does."""
    key = key or ("host_memory" if s.cpu else "device_memory")

    def ok(b: int) -> bool:
        t = replace(s, **{key: b})
        if t.cpu:
            t = replace(t, host_memory=b, device_memory=b)
        return _evaluate(mc, t)["fits"]

    lo, hi = 1 << 20, max(getattr(s, key), 1 << 30)
    while not ok(hi):
        hi *= 2
        if hi > 1 << 50:
            return None
    while hi - lo > (8 << 20):
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


_FLAGS = (
    ("train_layers", "--train-layers"),
    ("seq_len", "--seq-len"),
    ("batch_size", "--batch-size"),
    ("density", "--density"),
    ("quant", "--quant"),
    ("chunk_mb", "--chunk-mb"),
)


def _label(s: Settings, c: Settings) -> str:
    """The flags that differ between the user's settings and a candidate, e.g. ``--seq-len 256``."""
    out = [
        f"{flag} {getattr(c, name):g}" if name == "density" else f"{flag} {getattr(c, name)}"
        for name, flag in _FLAGS
        if getattr(c, name) != getattr(s, name)
    ]
    if c.batch_size < s.batch_size:
        out.append(f"(raise --grad-accum x{s.batch_size // c.batch_size} to keep the tokens per step)")
    return " ".join(out)


def _halvings(start: int, stop: int) -> list[int]:
    out, v = [], start // 2
    while v >= stop:
        out.append(v)
        v //= 2
    return out


def _candidates(mc: ModelCounts, s: Settings) -> list[Settings]:
    """Settings to try when the plan does not fit, least intrusive first."""
    rng, _ = _train_range(s.train_layers, mc.num_layers)
    layer_opts = [f"top:{n}" for n in _halvings(len(rng), 1)]
    seq_opts = _halvings(s.seq_len, 64)
    out: list[Settings] = []
    if s.quant != "4bit":
        out.append(replace(s, quant="4bit"))
    base = replace(s, quant="4bit", batch_size=1)
    out.append(base)
    out += [replace(base, train_layers=n) for n in layer_opts]
    out += [replace(base, density=s.density / k) for k in (2, 4)]
    out += [replace(base, seq_len=t) for t in seq_opts]
    if s.chunk_mb > 64:
        out.append(replace(base, chunk_mb=64))
    out += [replace(base, seq_len=t, train_layers=n) for t in seq_opts for n in layer_opts]
    small = replace(
        base,
        seq_len=seq_opts[-1] if seq_opts else s.seq_len,
        chunk_mb=min(s.chunk_mb, 64),
        train_layers=layer_opts[-1] if layer_opts else s.train_layers,
    )
    out.append(small)
    seen, uniq = {s}, []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _suggest(mc: ModelCounts, s: Settings, result: dict) -> dict:
    """What would make it fit: the first candidate that fits, and the budgets the current settings need."""
    where = "host" if s.cpu else "device"
    lines: list[str] = []
    first = None
    for cand in _candidates(mc, s):
        r = _evaluate(mc, cand)
        if r["fits"]:
            label = _label(s, cand)
            first = {
                "change": label,
                "settings": cand.describe(),
                "train_peak_device_bytes": r["train"]["peak_device_bytes"],
                "infer_peak_device_bytes": r["infer"]["peak_device_bytes"],
            }
            lines.append(
                f"fits with {label} (training peak {fmt_bytes(r['train']['peak_device_bytes'])}, "
                f"inference peak {fmt_bytes(r['infer']['peak_device_bytes'])} on the {where})"
            )
            break
    need = _min_budget(mc, s)
    if need is not None:
        flag = "--host-memory" if s.cpu else "--device-memory"
        lines.append(
            f"{'or, ' if lines else ''}with these settings: {flag} {fmt_bytes(need).replace(' ', '')} "
            f"(about what they need)"
        )
    if not s.cpu:
        host_short = (
            max(
                result["train"]["peak_host_bytes"],
                result["infer"]["peak_host_bytes"],
                result["train"]["select"]["peak_host_bytes"],
            )
            > s.host_memory
        )
        if host_short:
            need_host = _min_budget(mc, s, "host_memory")
            if need_host is not None:
                lines.append(
                    f"the host tier needs --host-memory {fmt_bytes(need_host).replace(' ', '')} (frozen "
                    f"weights that do not fit there go to disk, but the streaming buffers and runtime "
                    f"must)"
                )
        need_cpu = _min_budget(mc, replace(s, device="cpu", device_memory=s.host_memory))
        if need_cpu is not None and need_cpu <= s.host_memory:
            lines.append(
                f"or run on the CPU: --device cpu fits in {fmt_bytes(s.host_memory)} of host memory "
                f"(needs about {fmt_bytes(need_cpu)})"
            )
    if not lines:
        lines.append("nothing tried fits; use a smaller model or a larger device")
    return {"first_fit": first, "min_budget_bytes": need, "lines": lines}


def _on_off(v: str | bool) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def predict(
    config: Any,
    seq_len: int = 512,
    batch_size: int = 1,
    density: float = 0.005,
    train_layers: str = "top:8",
    quant: str = "4bit",
    dtype: str = "bf16",
    device_memory: int | str | None = None,
    host_memory: int | str | None = None,
    device: str = "cuda",
    *,
    chunk_mb: int = 256,
    attn: str | None = None,
    checkpointing: str | bool = "auto",
    prefix_cache: bool = True,
    group_size: int = 64,
    score_budget_mb: int = 1024,
    score_dtype: str = "bf16",
    score_layers: int = 1,
    suggest: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Predict peak memory and placement of inference and of one training step.

    Args:
        config: a transformers config, a config dict (``model_type`` + fields), a ``config.json`` path or a
            checkpoint directory.
        seq_len, batch_size: tokens per sequence and sequences per micro-batch.
        density: fraction of the trainable layers' expert weights that train.
        train_layers: ``all`` | ``top:N`` | ``a-b`` (``top:N`` above the layer count means all).
        quant: frozen expert storage, ``4bit`` | ``8bit`` | ``none``.
        dtype: compute dtype of the non-expert weights and activations, ``bf16`` | ``fp16`` | ``fp32``.
        device_memory: device budget (bytes or a string like ``"12GB"``); required unless ``device="cpu"``.
        host_memory: host budget; default this machine's RAM. With ``device="cpu"`` it is the only budget
            (``device_memory`` is used when ``host_memory`` is not given).
        device: ``cuda`` (also ``cuda:N``, ``mps``, ``xpu``: any accelerator with its own memory) or ``cpu``.
        chunk_mb: ``UsafConfig.chunk_mb`` (dequantized expert weights held at once per layer).
        attn: ``eager`` | ``sdpa``; default the config's attention implementation (sdpa if unset).
        checkpointing: activation checkpointing at layer boundaries: ``auto`` (``usaf train``'s rule: on
            when it lowers the predicted training peak by more than 2%), ``on``/True, ``off``/False (every layer of the
            span keeps its activations).
        prefix_cache: layers below the trainable range run once to build a cache of hidden states and are
            not resident while training (``usaf train --prefix-cache``, the default). False keeps them
            resident.
        group_size, score_budget_mb, score_layers, score_dtype: ``UsafConfig`` fields of the same names.
        suggest: when it does not fit, try candidate settings and report the first that fits.

    Returns:
        ``{"fits", "train_peak_device_bytes", "train_peak_host_bytes", "infer_peak_device_bytes",
        "infer_peak_host_bytes", "select_peak_device_bytes", "select_peak_host_bytes", "device_budget_bytes",
        "host_budget_bytes", "model" (name, family, counts), "settings", "train", "infer", "suggestion",
        "suggestions"}``; ``train`` / ``infer`` hold ``breakdown`` (item, bytes, tier, kind), placement and
        ``problems``. With ``device="cpu"`` the device tier is host RAM and both peaks are the same number.

    Raises:
        ValueError: bad settings or budgets (one line); ``UnsupportedModelError`` for dense / unknown models.
    """
    dev = str(device)
    if dev == "cpu":
        dev_kind = "cpu"
    elif dev.split(":")[0] in ("cuda", "gpu", "mps", "xpu"):
        dev_kind = "cuda"  # any accelerator with its own memory
    else:
        raise ValueError(f"--device {device!r} is not cpu or cuda (cuda:N, mps and xpu plan like cuda)")
    host = parse_memory(host_memory, "--host-memory") if host_memory is not None else None
    dev_mem = parse_memory(device_memory, "--device-memory") if device_memory is not None else None
    if dev_kind == "cpu":
        host = host or dev_mem or _host_default()
        dev_mem = host
    else:
        if dev_mem is None:
            raise ValueError("--device-memory is required (e.g. --device-memory 12GB), or use --device cpu")
        host = host or _host_default()
    s = Settings(
        seq_len=int(seq_len),
        batch_size=int(batch_size),
        density=float(density),
        train_layers=str(train_layers),
        quant=str(quant),
        dtype=str(dtype),
        device=dev_kind,
        device_memory=dev_mem,
        host_memory=host,
        chunk_mb=int(chunk_mb),
        attn=attn,
        checkpointing=_on_off(checkpointing),
        prefix_cache=bool(prefix_cache),
        group_size=int(group_size),
        score_budget_mb=int(score_budget_mb),
        score_dtype=str(score_dtype),
        score_layers=int(score_layers),
    )
    _check(s)
    mc = count_model(config, trust_remote_code)
    res = _evaluate(mc, s)
    train, infer = res["train"], res["infer"]
    out: dict[str, Any] = {
        "fits": bool(res["fits"]),
        "train_fits": train["fits"],
        "infer_fits": infer["fits"],
        "train_peak_device_bytes": train["peak_device_bytes"],
        "train_peak_host_bytes": train["peak_host_bytes"],
        "infer_peak_device_bytes": infer["peak_device_bytes"],
        "infer_peak_host_bytes": infer["peak_host_bytes"],
        "select_peak_device_bytes": train["select"]["peak_device_bytes"],
        "select_peak_host_bytes": train["select"]["peak_host_bytes"],
        "device_budget_bytes": s.device_memory,
        "host_budget_bytes": s.host_memory,
        "model": {
            "name": mc.name,
            "model_type": mc.model_type,
            "num_layers": mc.num_layers,
            "moe_layers": len(mc.moe_layers),
            "num_experts": max(x.num_experts for x in mc.layers),
            "top_k": mc.top_k,
            "tied_embeddings": mc.tied,
            "attn": s.attn or mc.attn,
            "params": mc.by_kind(),
        },
        "settings": {k: getattr(s, k) for k in Settings.__dataclass_fields__},
        "train": train,
        "infer": infer,
        "suggestion": None,
        "suggestions": [],
    }
    out["settings"]["attn"] = s.attn or mc.attn
    if suggest and not res["fits"]:
        sug = _suggest(mc, s, res)
        out["suggestion"] = sug["first_fit"]
        out["suggestions"] = sug["lines"]
        out["min_budget_bytes"] = sug["min_budget_bytes"]
    return out


# ------------------------------------------------------------------------------------------------ output
def format_plan(r: dict) -> str:
    """The human-readable report of a :func:`predict` result."""
    m, s, pc = r["model"], r["settings"], r["model"]["params"]
    cpu = s["device"] == "cpu"
    dev_name = "host RAM" if cpu else "device"
    train, infer = r["train"], r["infer"]
    lines = [
        f"model       {m['name']} ({m['model_type']}): {m['num_layers']} layers ({m['moe_layers']} MoE), "
        f"{m['num_experts']} experts, top-{m['top_k']}, attention {m['attn']}",
        f"parameters  {_fmt_count(pc['total'])} total, {_fmt_count(pc['active'])} active per token",
        f"            experts {_fmt_count(pc['experts'])}, routers {_fmt_count(pc['routers'])}, "
        f"shared experts {_fmt_count(pc['shared_experts'])}, "
        f"attention/dense {_fmt_count(pc['attention_dense'])}, "
        f"embeddings {_fmt_count(pc['embeddings'])}, lm_head "
        + ("tied" if m["tied_embeddings"] else _fmt_count(pc["lm_head"])),
        f"settings    train layers {train['train_layers'][0]}-{train['train_layers'][1]} "
        f"({s['train_layers']}), seq {s['seq_len']} x batch {s['batch_size']}, density {s['density']:g} "
        f"({_fmt_count(train['active_elements'])} active),",
        f"            {s['quant']} experts, {s['dtype']}, "
        f"checkpointing {train['checkpointing']}{' (auto)' if s['checkpointing'] == 'auto' else ''}, "
        f"{'prefix cache' if s['prefix_cache'] else 'no prefix cache'}, chunk {s['chunk_mb']} MB",
        "budgets     "
        + (
            f"host RAM {fmt_bytes(s['host_memory'])} (--device cpu)"
            if cpu
            else f"device {fmt_bytes(s['device_memory'])}, host {fmt_bytes(s['host_memory'])}"
        ),
        "",
        f"{'peak':<24}{'training step':>16}{'selection':>16}{'inference':>16}",
    ]
    sel = train["select"]
    if cpu:
        lines.append(
            f"{'host RAM':<24}{fmt_bytes(train['peak_device_bytes']):>16}"
            f"{fmt_bytes(sel['peak_device_bytes']):>16}{fmt_bytes(infer['peak_device_bytes']):>16}"
        )
    else:
        lines.append(
            f"{'device':<24}{fmt_bytes(train['peak_device_bytes']):>16}"
            f"{fmt_bytes(sel['peak_device_bytes']):>16}{fmt_bytes(infer['peak_device_bytes']):>16}"
        )
        lines.append(
            f"{'host':<24}{fmt_bytes(train['peak_host_bytes']):>16}"
            f"{fmt_bytes(sel['peak_host_bytes']):>16}{fmt_bytes(infer['peak_host_bytes']):>16}"
        )
    lines.append(
        f"{'disk (mmap / cache)':<24}{fmt_bytes(train['disk_bytes']):>16}{'':>16}"
        f"{fmt_bytes(infer['disk_bytes']):>16}"
    )

    def ok(f: bool) -> str:
        return "fits" if f else "DOES NOT FIT"

    lines.append(f"{'':<24}{ok(train['step_fits']):>16}{ok(sel['fits']):>16}{ok(infer['fits']):>16}")
    for title, ph in (("training step", train), ("inference", infer)):
        lines += ["", f"{title}: where each part goes"]
        for part in ph["breakdown"]:
            tier = dev_name if part["tier"] == "device" else part["tier"]
            when = _WHEN.get(part["kind"], "")
            lines.append(f"  {part['item'][:64]:<66}{fmt_bytes(part['bytes']):>12}  {tier}{when}")
        for note in ph["notes"]:
            lines.append(f"  note: {note}")
    lines.append("")
    if r["fits"]:
        lines.append("verdict     fits: training, selection and inference stay within the budgets")
    else:
        problems = [f"training: {x}" for x in train["problems"]] + [
            f"inference: {x}" for x in infer["problems"]
        ]
        lines.append("verdict     DOES NOT FIT")
        lines += [f"  - {x}" for x in problems]
        for x in r.get("suggestions", []):
            lines.append(f"  try: {x}")
    return "\n".join(lines)


def _json_safe(r: dict) -> dict:
    return json.loads(json.dumps(r, default=str))


def cmd_plan(args: argparse.Namespace) -> int:
    """Handler of ``usaf plan``: prints the table (or JSON); exit code 0 (also when it does not fit)."""
    r = predict(
        args.model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        density=args.density,
        train_layers=args.train_layers,
        quant=args.quant,
        dtype=args.dtype,
        device_memory=args.device_memory,
        host_memory=args.host_memory,
        device=args.device,
        chunk_mb=args.chunk_mb,
        attn=args.attn,
        checkpointing=args.checkpointing,
        prefix_cache=args.prefix_cache,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(_json_safe(r), indent=2) if args.json else format_plan(r))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``usaf plan`` to the CLI's subparsers; returns the subparser."""
    q = sub.add_parser(
        "plan",
        help="predict peak memory of inference and training, and where each part goes",
        description="Predict peak device/host memory of inference and of one training step from "
        "config.json alone, with a device/host/disk placement; says what to change "
        "when it does not fit. Sizes: 12GB = 12*10^9 bytes, 12GiB = 12*2^30.",
    )
    q.add_argument("--model", required=True, help="checkpoint directory, path to a config.json, or a hub id")
    q.add_argument("--device-memory", help="device budget, e.g. 12GB (required unless --device cpu)")
    q.add_argument("--host-memory", help="host RAM budget (default: this machine's RAM)")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--density", type=float, default=0.005)
    q.add_argument("--train-layers", default="top:8", help="all | top:N | a-b (default: top:8)")
    q.add_argument("--quant", default="4bit", choices=QUANTS)
    q.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES))
    q.add_argument("--device", default="cuda", help="cuda (any accelerator) or cpu (default: cuda)")
    q.add_argument("--chunk-mb", type=int, default=256, help="dequantized expert weights per run, MB")
    q.add_argument(
        "--attn", choices=("eager", "sdpa"), help="attention implementation (default: the config's)"
    )
    q.add_argument(
        "--checkpointing",
        default="auto",
        choices=("auto", "on", "off"),
        help="activation checkpointing at layer boundaries, as in usaf train (default: auto = on "
        "when it lowers the predicted training peak by more than 2%%)",
    )
    q.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="layers below the trainable range are cached hidden states, not resident (default: on)",
    )
    q.add_argument("--json", action="store_true", help="print the full prediction as JSON")
    q.add_argument("--trust-remote-code", action="store_true")
    q.set_defaults(func=cmd_plan)
    return q
