"""What the memory plan needs from a config: parameter counts by kind and the activation widths per layer.

The model is built on the meta device (no memory, no weights), so this works for any size and for a model
that is not downloaded: a config object, a dict, a ``config.json`` path or a checkpoint directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig

from ..engine.discover import moe_site
from ..engine.families import UnsupportedModelError, auto_model_class, family_for, get_path, supported
from ..engine.model import decoder_layers
from ..load.hf import load_config


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
    attn_linear_params: int = 0  # weights of the attention's nn.Linear projections (``--attention-density``)
    shared_linear_params: int = 0  # weights of the shared expert's nn.Linear modules (``--shared-density``)
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
    stored_bytes: int = 2  # bytes per value of the checkpoint's floating tensors (its config's dtype; 2 if unsaid)

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

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        return _config_from_dict(dict(model), "config")
    p = Path(str(model)).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return load_config(str(p))
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

    return load_config(str(model), trust_remote_code)


def _config_from_dict(data: dict, where: str):

    model_type = data.get("model_type")
    if not model_type:
        raise ValueError(f"{where} has no model_type")
    if model_type not in CONFIG_MAPPING:
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

    fam = family_for(config)
    with torch.device("meta"):
        m = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
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
        site = moe_site(layer, fam)
        is_moe = site is not None
        ex, router, shared = (site.experts, site.router, site.shared) if is_moe else (None, None, None)
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
            params = [get_path(ex, st.path) for st in site.layout.stacks]
            stacks = tuple(p.numel() for p in params)
            gu = params[0]
            n_exp = int(gu.shape[0]) if gu.dim() == 3 else int(ex.num_experts)  # dbrx: 2-D [E * I, H]
            width = gu.shape[0] // n_exp if gu.dim() == 2 else gu.shape[2] if site.transposed else gu.shape[1]
            gated_in_one = site.layout.gated and len(params) == 2  # gate and up rows in one stack
            info.update(
                expert_params=numel(params),
                stack_numels=stacks,
                num_experts=n_exp,
                expert_inter=int(width // 2 if gated_in_one else width),
            )
            info["expert_bias_params"] = numel(ex.parameters())  # biases (the stacks are counted already)
            info["router_params"] = numel(router.parameters())
            info["shared_params"] = numel(shared.parameters()) if shared is not None else 0
            info["shared_linear_params"] = sum(mod.weight.numel() for mod in shared.modules()
                                               if isinstance(mod, nn.Linear) and mod.weight.dim() == 2) \
                if shared is not None else 0
            if top_k is None:
                top_k = _top_k(text, site.block, router)
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
        if attn is not None:
            info["attn_linear_params"] = sum(m.weight.numel() for m in attn.modules()
                                             if isinstance(m, nn.Linear) and m.weight.dim() == 2)
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
        stored_bytes=_stored_bytes(config),
    )


def _stored_bytes(config) -> int:
    """Bytes per value of the checkpoint's weights, from its config's ``dtype`` (``torch_dtype`` before
    transformers 5); 2 (bf16) where the config does not say."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt.removeprefix("torch."), None)
    return dt.itemsize if isinstance(dt, torch.dtype) and dt.is_floating_point else 2
