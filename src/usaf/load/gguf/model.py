"""A model from a GGUF file: config and tokenizer from its metadata, non-expert tensors dequantized once, expert
stacks kept in their GGUF quantization as the frozen store (views of the file's memory map on the disk tier).

- config: ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` (metadata only, no tensor read; built
  once in a child process and cached with the tokenizer: ``usaf.load.gguf.hfmeta``),
  corrected where it falls short for MoE: qwen3moe's ``moe_intermediate_size`` (``expert_feed_forward_length``),
  and llama with experts, which it reads as a dense llama: that is Mixtral (``expert_count`` experts);
- tokenizer and chat template: ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` (cached the same way);
- every tensor the model needs must be in the file with the shape the metadata implies (else one line);
- the fingerprint of the base (what a delta is tied to) samples the file's tensors, like
  ``usaf.integrity.checkpoint_fingerprint`` does for safetensors.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from ...config import UsafConfig
from ...engine.discover import fused_experts
from ...engine.experts import NAMES
from ...engine.families import family_for, get_path, supported
from ...engine.ggml import GGMLStack, dequantize
from ...engine.model import UsafModel, decoder_layers, parse_layers, prepare
from ..mmap import register_range
from .hfmeta import gguf_config_values
from .hfmeta import gguf_tokenizer as cached_tokenizer
from .names import (
    ARCH,
    EXPERT_LAYOUT,
    LEADING_DENSE,
    MLA,
    arch_name,
    expert_names,
    family_of_arch,
    gguf_name,
    interleave,
    join_kv_b,
    kv_b_names,
    kv_b_rows,
    name_map,
    qk_heads,
    split_names,
    unpermute,
)
from .reader import GGUFError, GGUFFile

log = logging.getLogger("usaf")
FINGERPRINT_VERSION = "usaf-gguf-fingerprint-1"


def is_gguf(model) -> bool:
    return str(model).lower().endswith(".gguf")


def open_gguf(path) -> GGUFFile:
    """The validated file (:class:`GGUFError` on anything wrong with it)."""
    return GGUFFile(path)


def file_family(f: GGUFFile) -> str | None:
    """The family the file loads as (None when usaf does not load its architecture)."""
    return family_of_arch(f.arch, f.get(f"{f.arch}.expert_gating_func"))


def _dense_or_unknown(f: GGUFFile) -> None:
    family = file_family(f)
    experts = f.get(f"{f.arch}.expert_count", 0)
    if not experts:
        raise GGUFError(f"{f.path} is a dense model (architecture {f.arch!r}, no experts); usaf fine-tunes "
                        f"Mixture-of-Experts models (supported: {supported()})")
    if family is None:
        raise GGUFError(f"{f.path}: GGUF architecture {f.arch!r} is not supported (supported: "
                        f"{', '.join(sorted({arch_name(x) for x in ARCH}))})")


def gguf_config(f: GGUFFile):
    """The transformers config of the model in ``f``."""
    _dense_or_unknown(f)
    family = file_family(f)
    d = gguf_config_values(f)
    d.pop("_model_name_or_path", None)
    d.pop("model_type", None)
    a = f.arch
    experts = f.get(f"{a}.expert_count")
    first = f.get(f"{a}.leading_dense_block_count", 0) if family in LEADING_DENSE else 0
    gate = f.tensors.get(expert_names(first)["gate_up_proj"][0])
    if gate is None:
        raise GGUFError(f"{f.path} has no {expert_names(first)['gate_up_proj'][0]} (experts stored otherwise)")
    inter = gate.shape[1]
    if family in MLA:
        _deepseek(f, d, family, experts, first)
    elif family == "glm4_moe":
        _glm4moe(f, d, experts, first)
    elif family == "gpt_oss":  # llama.cpp's head width is key_length; every layer MoE, biases everywhere
        d.pop("num_experts", None)
        d.pop("rope_scaling", None)  # transformers' reading of the YaRN keys; rope_parameters below
        d.update(num_local_experts=experts, intermediate_size=inter, attention_bias=True,
                 head_dim=f.get(f"{a}.attention.key_length", d["hidden_size"] // d["num_attention_heads"]))
    elif family in ("mixtral", "granitemoe"):
        d.pop("num_experts", None)
        d["num_local_experts"] = experts
        d["num_experts_per_tok"] = f.get(f"{a}.expert_used_count")
        d["intermediate_size"] = inter
        if family == "granitemoe":
            d["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    elif family == "olmoe":  # llama.cpp's olmoe: the experts' width is the feed-forward length; top-k as is
        d.update(num_experts=experts, intermediate_size=inter, norm_topk_prob=False, clip_qkv=None,
                 attention_bias="blk.0.attn_q.bias" in f.tensors)
    else:
        d["num_experts"] = experts
        d["moe_intermediate_size"] = f.get(f"{a}.expert_feed_forward_length", inter)
    if family == "qwen2_moe":
        # llama.cpp's qwen2moe: every layer MoE, top-k weights not renormalized, a gated shared expert
        shexp = f.tensors.get("blk.0.ffn_gate_shexp.weight")
        if shexp is None:
            raise GGUFError(f"{f.path} has no blk.0.ffn_gate_shexp.weight (qwen2moe's shared expert)")
        d["shared_expert_intermediate_size"] = f.get(f"{a}.expert_shared_feed_forward_length", shexp.shape[0])
        d["qkv_bias"] = "blk.0.attn_q.bias" in f.tensors
        d.update(norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    # llama.cpp's convention: a file without output.weight computes the output with token_embd (tied
    # embeddings, e.g. SmolLM2); transformers' reader leaves the config's default (untied for these families)
    d["tie_word_embeddings"] = "output.weight" not in f.tensors
    if "rope_theta" in d:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": float(d.pop("rope_theta"))}
        d["rope_parameters"].update(_yarn(f))
        if family == "glm4_moe":  # the rotated width: rope.dimension_count of head_dim
            d["rope_parameters"]["partial_rotary_factor"] = f.get(f"{a}.rope.dimension_count", d["head_dim"]) / d["head_dim"]
        if family == "gpt_oss" and d["rope_parameters"]["rope_type"] == "yarn":
            # llama.cpp rounds YaRN's correction range to whole dimensions (transformers' truncate=True) for every
            # file; gpt-oss's published config says truncate=False, which a GGUF cannot express: the model is
            # loaded as llama.cpp runs the file
            d["rope_parameters"]["truncate"] = True
    try:
        config = AutoConfig.for_model(family, **d)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{f.path}: its metadata does not make a valid {family} config ({e})") from None
    family_for(config)
    return config


def _yarn(f: GGUFFile) -> dict:
    """transformers' YaRN parameters from llama.cpp's keys (empty without YaRN). llama.cpp keeps DeepSeek's
    ``mscale_all_dim`` as ``0.1 * mscale_all_dim`` (``yarn_log_multiplier``) and no ``mscale``: the official
    DeepSeek-V2/V3 configs have ``mscale == mscale_all_dim``, which is what is assumed here."""
    a = f.arch
    kind = f.get(f"{a}.rope.scaling.type")
    if kind in (None, "none"):
        return {}
    if kind != "yarn":
        raise GGUFError(f"{f.path}: rope scaling {kind!r} is not supported (none or yarn)")
    out = {"rope_type": "yarn", "factor": float(f.get(f"{a}.rope.scaling.factor")),
           "original_max_position_embeddings": int(f.get(f"{a}.rope.scaling.original_context_length"))}
    for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if f.get(f"{a}.rope.scaling.{key}") is not None:
            out[hf] = float(f.get(f"{a}.rope.scaling.{key}"))
    log_mul = f.get(f"{a}.rope.scaling.yarn_log_multiplier")
    if log_mul:
        out["mscale"] = out["mscale_all_dim"] = round(float(log_mul) / 0.1, 6)  # stored as float32
    return out


def _arch_key(f: GGUFFile, key: str, default=None):
    """The file's ``{arch}.key`` (``default`` when absent)."""
    v = f.get(f"{f.arch}.{key}")
    return default if v is None else v


def _deepseek(f: GGUFFile, d: dict, family: str, experts: int, first: int) -> None:
    """DeepSeek-V2/V3's config from a ``deepseek2`` file: MLA's ranks and head widths (llama.cpp stores the
    attention as MQA over the compressed cache: its ``head_count_kv`` is 1, the model's is ``head_count``),
    leading dense layers, shared experts and the routing's constants."""
    a = f.arch

    def get(key, default=None):
        return _arch_key(f, key, default)

    rope = get("rope.dimension_count")
    kv_rank = get("attention.kv_lora_rank")
    if rope is None or kv_rank is None:
        raise GGUFError(f"{f.path} lacks {a}.rope.dimension_count or {a}.attention.kv_lora_rank (MLA's widths)")
    if get("attention.key_length_mla") is not None:  # kv_b_proj split into attn_k_b / attn_v_b
        nope, v = get("attention.key_length_mla") - rope, get("attention.value_length_mla")
    else:  # an older file: kv_b_proj whole (attn_kv_b), key/value lengths per head
        nope, v = get("attention.key_length") - rope, get("attention.value_length")
    norm = bool(get("expert_weights_norm", False))
    groups, used = get("expert_group_count", 1), get("expert_group_used_count", 1)
    d.pop("num_experts", None)
    d.update(num_key_value_heads=d["num_attention_heads"], n_routed_experts=experts, first_k_dense_replace=first,
             moe_intermediate_size=get("expert_feed_forward_length"), n_shared_experts=get("expert_shared_count", 0),
             routed_scaling_factor=float(get("expert_weights_scale", 1.0)), n_group=groups, topk_group=used,
             q_lora_rank=get("attention.q_lora_rank") or None, kv_lora_rank=kv_rank, qk_rope_head_dim=rope,
             qk_nope_head_dim=nope, v_head_dim=v, head_dim=rope, attention_bias=False)
    if family == "deepseek_v3":
        d.update(norm_topk_prob=norm, rope_interleave=True)
    else:  # transformers' DeepSeek-V2 scales the softmax top-k weights and never renormalizes them
        if norm:
            raise GGUFError(f"{f.path}: DeepSeek-V2 routing with renormalized top-k weights "
                            f"({a}.expert_weights_norm) is not supported")
        d["topk_method"] = "greedy" if groups <= 1 else "group_limited_greedy"


def _glm4moe(f: GGUFFile, d: dict, experts: int, first: int) -> None:
    """GLM-4.5's config from a ``glm4moe`` file: DeepSeek-V3's routing (sigmoid, score bias, groups, scale,
    renormalization), leading dense layers, shared experts, q/k/v biases and q/k norms where the file has them;
    its ``block_count`` also counts the multi-token-prediction blocks (``nextn_predict_layers``), which the
    model does not include."""
    def get(key, default=None):
        return _arch_key(f, key, default)

    if get("expert_gating_func", 2) != 2:
        raise GGUFError(f"{f.path}: glm4moe with a gating function other than sigmoid is not supported")
    d.pop("num_experts", None)
    d["num_hidden_layers"] -= get("nextn_predict_layers", 0)
    d.update(n_routed_experts=experts, first_k_dense_replace=first, num_nextn_predict_layers=0,
             moe_intermediate_size=get("expert_feed_forward_length"), n_shared_experts=get("expert_shared_count", 0),
             routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
             norm_topk_prob=bool(get("expert_weights_norm", False)), n_group=get("expert_group_count", 1),
             topk_group=get("expert_group_used_count", 1),
             head_dim=get("attention.key_length", d["hidden_size"] // d["num_attention_heads"]),
             use_qk_norm="blk.0.attn_q_norm.weight" in f.tensors, attention_bias="blk.0.attn_q.bias" in f.tensors)


def gguf_tokenizer(path):
    """The tokenizer (and chat template) stored in the GGUF file (built once, then cached:
    :mod:`usaf.load.gguf.hfmeta`)."""
    return cached_tokenizer(open_gguf(path))


def gguf_fingerprint(f: GGUFFile) -> str:
    """Architecture, then per tensor in name order: name, type, shape and a sample of its bytes (whole up to
    64 KiB, else 8 chunks of 4 KiB spread over it). 32 hex digits."""
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}|{f.arch}\n".encode())
    for name in sorted(f.tensors):
        t = f.tensors[name]
        h.update(f"{name}|{t.ggml_type}|{list(t.shape)}|{t.nbytes}\n".encode())
        if t.nbytes <= 64 << 10:
            h.update(f.bytes_of(name))
            continue
        last = t.nbytes - 4096
        for i in range(8):
            h.update(f.pread(t.offset + last * i // 7, 4096))
    return h.hexdigest()[:32]


def stored_buffers(model):
    """``(name, buffer)`` of the buffers a GGUF stores: DeepSeek-V3's router score bias
    (``e_score_correction_bias``)."""
    return [(k, b) for k, b in model.named_buffers() if k.endswith(".e_score_correction_bias")]


def expected_tensors(model, family: str, config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{GGUF name: (parameter or buffer, numpy shape)}`` of the non-expert parameters (tied lm_head left out)
    and the stored buffers (:func:`stored_buffers`)."""
    tmap = name_map(family, config.num_hidden_layers)
    out = {}
    seen = set()
    for key, p in [*model.named_parameters(remove_duplicate=True), *stored_buffers(model)]:
        if key.rsplit(".", 1)[-1] in NAMES or split_names(family, key):  # the latter: :func:`split_tensors`
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        name = gguf_name(tmap, key)
        if name is None:
            raise GGUFError(f"no GGUF name for the model's {key}")
        out[name] = (key, tuple(p.shape))
    return out


def split_tensors(model, family: str) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """``{parameter: (GGUF names, numpy shape of each)}`` of the parameters stored as several interleaved tensors
    (:func:`usaf.load.gguf.names.split_names`)."""
    out = {}
    for key, p in model.named_parameters():
        names = split_names(family, key)
        if names:
            out[key] = (names, (*p.shape[:-1], p.shape[-1] // len(names)))
    return out


def _split_kv_b(f: GGUFFile, want: dict, family: str, config) -> dict[str, tuple[str, str]]:
    """MLA's ``kv_b_proj`` stored as llama.cpp's converter writes it (``attn_k_b`` + ``attn_v_b``): taken out
    of ``want`` (checked here) and returned as ``{parameter: (k_b name, v_b name)}``; a file holding it whole
    (``attn_kv_b``, older conversions) keeps it in ``want``."""
    if family not in MLA:
        return {}
    heads, nope, v = kv_b_rows(config)
    out = {}
    for name in [n for n in want if n.endswith(".attn_kv_b.weight") and n not in f.tensors]:
        key, _ = want.pop(name)
        k_b, v_b = kv_b_names(int(name.split(".")[1]))
        _check_shape(f, k_b, (heads, config.kv_lora_rank, nope))
        _check_shape(f, v_b, (heads, v, config.kv_lora_rank))
        out[key] = (k_b, v_b)
    return out


def _dequantized(f: GGUFFile, name: str, dtype) -> torch.Tensor:
    t = f.tensors[name]
    # computed in fp32 a chunk at a time and rounded once to ``dtype``: no fp32 copy of a whole tensor
    w = dequantize(f.raw(name), t.ggml_type, t.shape[-1], dtype=dtype).reshape(t.shape)
    f.release(name)  # read once: its pages of the map are not kept
    return w


def _set(model, key: str, w: torch.Tensor, device) -> None:
    mod_name, _, pname = key.rpartition(".")
    mod = get_path(model, mod_name)
    if pname in mod._buffers:
        mod._buffers[pname] = w.to(device=device, dtype=mod._buffers[pname].dtype)
    else:
        mod._parameters[pname] = torch.nn.Parameter(w.to(device=device), requires_grad=False)


def _check_shape(f: GGUFFile, name: str, shape: tuple[int, ...]) -> None:
    t = f.tensors.get(name)
    if t is None:
        raise GGUFError(f"{f.path} lacks tensor {name}")
    if t.shape != tuple(shape):
        raise GGUFError(f"{f.path}: tensor {name} has shape {list(t.shape)}, but the metadata implies "
                        f"{list(shape)}")


def load_gguf(path, cfg: UsafConfig | None = None, dtype=torch.bfloat16, device="cpu", tier: str = "disk",
              attn_implementation: str | None = None, prefix_mapped: bool = False) -> UsafModel:
    """Build and prepare the model of a GGUF file without dequantizing its experts.

    Args:
        tier: where the frozen expert stacks live: "disk" (views of the file's memory map), "host" (a copy of
            their GGUF bytes in RAM) or "device".
        prefix_mapped: the stacks of the layers below the trainable range stay views of the file whatever
            ``tier`` says (they run once, for the frozen-prefix cache; see ``usaf.load.stream.load_streamed``).
    """
    cfg = cfg or UsafConfig()
    f = open_gguf(path)
    config = gguf_config(f)
    family = family_for(config)
    text = config.get_text_config()
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    model.config._name_or_path = str(path)
    model.tie_weights()  # tied embeddings share one meta parameter: no output.weight is expected
    want = expected_tensors(model, family.model_type, text)
    inter, transposed = EXPERT_LAYOUT.get(family.model_type, (False, False))
    stacks = {}
    below = parse_layers(cfg.train_layers, len(decoder_layers(model))).start if prefix_mapped else 0
    mapped = set()
    for layer_idx, layer in enumerate(decoder_layers(model)):
        ex = fused_experts(layer, family)
        if ex is None:
            continue
        prefix = next(n for n, m in model.named_modules() if m is ex)
        names = expert_names(layer_idx)
        e, two_i, h = ex.gate_up_proj.shape
        down = tuple(ex.down_proj.shape)
        if transposed:  # [E, in, out] in memory
            (e, h, two_i), down = ex.gate_up_proj.shape, (down[0], down[2], down[1])
        for g in names["gate_up_proj"]:
            _check_shape(f, g, (e, two_i // 2, h))
        _check_shape(f, names["down_proj"][0], down)
        stacks[prefix] = names
        if layer_idx < below:
            mapped.add(prefix)
    split = _split_kv_b(f, want, family.model_type, text)
    for name, (_, shape) in want.items():
        _check_shape(f, name, shape)
    joined = split_tensors(model, family.model_type)
    for names, shape in joined.values():
        for name in names:
            _check_shape(f, name, shape)

    for name, (key, _) in want.items():  # non-expert tensors: dequantized once
        w = _dequantized(f, name, dtype)
        heads = qk_heads(family.model_type, key, text)
        if heads:
            w = unpermute(w, heads).contiguous()
        _set(model, key, w, device)
        del w
    for key, (k_b, v_b) in split.items():
        _set(model, key, join_kv_b(_dequantized(f, k_b, dtype), _dequantized(f, v_b, dtype)), device)
    for key, (names, _) in joined.items():
        _set(model, key, interleave([_dequantized(f, n, dtype) for n in names]), device)
    model.tie_weights()
    frozen = {}
    for prefix, names in stacks.items():
        frozen[prefix] = {}
        for stack, parts in names.items():
            raws = []
            for n in parts:
                raw = f.raw(n)
                if tier == "disk" or prefix in mapped:
                    register_range(raw, f.mm, f.tensors[n].offset, f.tensors[n].nbytes)
                else:
                    raw = raw.to("cpu" if tier == "host" else device, copy=True)
                    f.release(n)  # copied: the file's pages are not kept as well
                raws.append(raw)
            frozen[prefix][stack] = GGMLStack(raws, [f.tensors[n].ggml_type for n in parts],
                                              f.tensors[parts[0]].shape[-1], interleave=inter, transposed=transposed)
    missing = [n for n, p in model.named_parameters() if p.is_meta and n.rsplit(".", 1)[-1] not in NAMES]
    if missing:
        raise GGUFError(f"{f.path} lacks the model's {missing[0]}")
    handle = prepare(model, cfg, frozen=frozen, base_fingerprint=gguf_fingerprint(f))
    handle.gguf = f  # keeps the memory map alive as long as the model
    model.eval()
    return handle


def gguf_expert_bytes(path) -> int:
    """Bytes of the expert stacks as stored in the file."""
    f = open_gguf(path)
    return sum(t.nbytes for n, t in f.tensors.items() if "_exps." in n)


def gguf_expert_bits(path) -> float:
    """Bits per expert weight as stored in the file (for the planner)."""
    f = open_gguf(path)
    exps = [t for n, t in f.tensors.items() if "_exps." in n]
    n = sum(int(torch.Size(t.shape).numel()) for t in exps)
    return 8 * sum(t.nbytes for t in exps) / max(n, 1)
