"""``usaf export RUN --format gguf``: the merged model as a GGUF file that llama.cpp loads.

Covered: ``qwen3_moe`` (llama.cpp arch ``qwen3moe``), ``qwen2_moe`` (``qwen2moe``, with its gated shared
expert), ``olmoe`` (``olmoe``), ``granitemoe`` (``granitemoe``), ``mixtral`` (arch ``llama`` with
experts), ``deepseek_v3`` and ``deepseek_v2`` (``deepseek2``: MLA's ``kv_b_proj`` split into ``attn_k_b`` /
``attn_v_b``, the router's score bias as ``exp_probs_b``, the gating function named), ``gpt_oss``
(``gpt-oss``) and ``glm4_moe`` (``glm4moe``), as
llama.cpp's own ``convert_hf_to_gguf.py`` writes them:

- tensor names from ``gguf.TensorNameMap``; expert stacks as ``blk.N.ffn_{gate,up,down}_exps.weight``
  (``[E, I, H]`` / ``[E, H, I]`` in numpy order: gate_up rows ``[0, I)`` are gate, ``[I, 2I)`` up);
- llama and granitemoe archs: q/k rows permuted from HF's rotate-half order to llama.cpp's interleaved RoPE;
- 1-D tensors, norms and routers (``ffn_gate_inp``) in F32; other matrices in the chosen type (q8_0 falls
  back to f16 for rows that are not a multiple of 32, like the converter);
- tokenizer: byte-level BPE only (``tokenizer.ggml.model = gpt2``), tokens and types from tokenizer.json,
  merges, special ids and the chat template via ``gguf.SpecialVocab``; the pre-tokenizer name is
  detected from tokenizer.json's pre_tokenizer (``--tokenizer-pre`` overrides).

The check: with ``llama_cpp`` importable, the file is loaded by llama.cpp and its logits on a few tokens are
compared with usaf's merged model (and the tokenizer with transformers'); without it, the file is read back
with ``gguf.GGUFReader`` and its tensor names, shapes and types are compared with what was meant, and its
tensors with the sha256 it records under ``usaf.checksums`` (:func:`verify_gguf`; llama.cpp ignores the key).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..integrity import IntegrityError
from ..load.gguf.model import stored_buffers
from ..load.gguf.names import (
    ARCH,
    EXPERT_LAYOUT,
    MLA,
    arch_name,
    expert_names,
    gguf_name,
    kv_b_names,
    kv_b_rows,
    name_map,
    permute,
    qk_heads,
    split_kv_b,
)
from ..load.gguf.pretok import tokenizer_pre
from ..load.hf import load_tokenizer
from .layout import Checkpoint, ExportCheckError, ExportError, Run, Staged, check_out, disk_dtype, plan
from .reference import DEFAULT_BASE_WEIGHTS, fp32_logits, reference_model

log = logging.getLogger("usaf")

CHECKSUM_KEY = "usaf.checksums"  # GGUF metadata: {tensor name: sha256 of its bytes as stored}
# Per-position relative logit tolerance of the llama.cpp check, per tensor type. Measured median errors
# (tiny models / SmolLM2-135M upcycled): f16 1e-3 / 7e-4, bf16 4e-3 / 5e-3, q8_0 1.2e-2 / 2.9e-2 (q8_0
# weights alone, in transformers: 1.6e-2 on SmolLM2; llama.cpp also rounds activations to 8 bits).
TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 3e-2, "q8_0": 1e-1}
def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def _ftype(name: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[name]


# ------------------------------------------------------------------------------------------------ tokenizer
def _vocab(src: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings (byte-level encoded, as llama.cpp's gpt2 vocab expects) and types, padded to vocab_size."""
    import gguf

    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has id {max(by_id)} >= the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif s in added:
            special = added[s].get("special") or (s.startswith("<|") and s.endswith("|>"))
            tokens.append(s)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _add_tokenizer(w, src: Path, vocab_size: int, pre_override: str | None) -> None:
    import gguf

    path = src / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{src} has no tokenizer.json (GGUF export supports byte-level BPE tokenizers)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    if (tok.get("model") or {}).get("type") != "BPE" or (tok.get("model") or {}).get("byte_fallback"):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (gpt2-style) only")
    pre = pre_override or tokenizer_pre(tok)
    if pre is None:
        raise ExportError("cannot tell llama.cpp's pre-tokenizer for this tokenizer.json; give "
                          "--tokenizer-pre NAME (e.g. gpt-2, qwen2, llama-bpe, smollm)")
    tokens, types = _vocab(src, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    add_bos, add_eos = _adds_special(src)
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    special.add_to_gguf(w, quiet=True)


def _adds_special(src: Path) -> tuple[bool, bool]:
    """Whether transformers' tokenizer adds BOS / EOS to plain text (llama.cpp must do the same)."""
    tok = load_tokenizer(str(src))
    ids = tok("a")["input_ids"]
    return (tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
            tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id] and len(ids) > 1)


# -------------------------------------------------------------------------------------------------- tensors
def gguf_tensors(handle, arch_name: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of the merged in-memory model (expert stacks taken from its folded frozen stacks)."""
    cfg = handle.model.config.get_text_config()
    family = handle.family.model_type
    tmap = name_map(family, cfg.num_hidden_layers)
    out = []
    for name, p in [*handle.model.named_parameters(), *stored_buffers(handle.model)]:
        if ".deltas." in name or ".usaf_delta." in name:
            continue
        new = gguf_name(tmap, name)
        if new is None:
            raise ExportError(f"GGUF export: no llama.cpp name for {name}")
        t = p.detach()
        if family in MLA and name.endswith("kv_b_proj.weight"):  # split as llama.cpp's converter does
            out.extend(zip(kv_b_names(int(new.split(".")[1])), split_kv_b(t, *kv_b_rows(cfg))))
            continue
        heads = qk_heads(family, name, cfg)
        out.append((new, permute(t, heads) if heads else t))
    interleaved, transposed = EXPERT_LAYOUT.get(family, (False, False))
    for m in handle.layers:
        gate_up, down = (m.experts.frozen[n].tensor for n in ("gate_up_proj", "down_proj"))
        if transposed:  # [E, in, out] in memory; GGUF rows are outputs
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        inter = gate_up.shape[1] // 2
        names = expert_names(m.index)
        gate, up = (gate_up[:, 0::2], gate_up[:, 1::2]) if interleaved else (gate_up[:, :inter], gate_up[:, inter:])
        out.append((names["gate_up_proj"][0], gate))
        out.append((names["gate_up_proj"][1], up))
        out.append((names["down_proj"][0], down))
        if m.experts.gate_up_bias is not None:  # gpt-oss: beside each stack, as .bias
            b = m.experts.gate_up_bias
            halves = (b[:, 0::2], b[:, 1::2]) if interleaved else (b[:, :inter], b[:, inter:])
            out.extend((n.replace(".weight", ".bias"), t) for n, t in zip(names["gate_up_proj"], halves))
            out.append((names["down_proj"][0].replace(".weight", ".bias"), m.experts.down_bias))
    return out


def _deepseek_routing(w, cfg, sigmoid: bool, norm: bool) -> None:
    """The keys of DeepSeek's MoE (deepseek2 and glm4moe): routed and shared experts, leading dense layers, the
    routing's scale, renormalization, gating function and groups, and the vocabulary size."""
    import gguf

    groups, used = _groups(cfg)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts or 0)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    w.add_expert_weights_norm(bool(norm))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_group_count(groups)
    w.add_expert_group_used_count(used)
    w.add_vocab_size(cfg.vocab_size)


def _mla(w, cfg, family: str) -> None:
    """DeepSeek-V2/V3 as llama.cpp's converter writes ``deepseek2``: MLA as MQA over the compressed cache,
    leading dense layers, shared experts, the routing's constants and YaRN."""
    rope = cfg.rope_parameters or {}
    w.add_head_count_kv(1)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    # V2: softmax, and its top-k weights are never renormalized
    _deepseek_routing(w, cfg, sigmoid=family == "deepseek_v3", norm=family == "deepseek_v3" and cfg.norm_topk_prob)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    _yarn_keys(w, rope)
    if rope.get("rope_type") == "yarn" and rope.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))


def _yarn_keys(w, rope: dict) -> None:
    """YaRN's keys as the converter writes them (nothing for another rope type)."""
    import gguf

    if rope.get("rope_type") != "yarn":
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
        if rope.get(key) is not None:
            add(float(rope[key]))


def _llama_cpp_lite(cfg) -> bool:
    """Whether llama.cpp's deepseek2 loader takes this model for one without q_lora_rank (by its shape)."""
    n = cfg.num_hidden_layers
    return n in (26, 27) or (n == 48 and cfg.vocab_size == 128256)


def _groups(cfg) -> tuple[int, int]:
    """(expert groups, groups used) as llama.cpp takes them: every group used is no grouping (its loader
    requires fewer groups used than groups)."""
    n, used = cfg.n_group or 1, cfg.topk_group or 1
    return (1, 1) if used >= n else (n, used)


def _hparams(w, cfg, family: str, qtype: str) -> None:
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "yarn", None):
        raise ExportError(f"GGUF export: rope_type {rope.get('rope_type')!r} is not supported (default or yarn)")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if family in MLA:
        _mla(w, cfg, family)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_file_type(_ftype(qtype))
        return
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if family == "mixtral":
        w.add_expert_count(cfg.num_local_experts)
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    elif family == "olmoe":  # llama.cpp's olmoe: the experts' width is the feed-forward length
        w.add_expert_count(cfg.num_experts)
    elif family == "granitemoe":  # llama's hyper-parameters and granite's four scales
        w.add_expert_count(cfg.num_local_experts)
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    elif family == "glm4_moe":  # as the converter: DeepSeek-V3's routing keys, the rotated width
        _deepseek_routing(w, cfg, sigmoid=True, norm=cfg.norm_topk_prob)
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
    elif family == "gpt_oss":  # as the converter: YaRN, the sliding window (every other layer, from layer 0)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_sliding_window(cfg.sliding_window)
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    _yarn_keys(w, rope)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_file_type(_ftype(qtype))


def _supported(cfg, family: str) -> None:
    if family not in ARCH:
        raise ExportError(f"GGUF export supports {', '.join(ARCH)}; this model is {family}")
    if family == "olmoe":
        if getattr(cfg, "norm_topk_prob", False):
            raise ExportError("GGUF export: olmoe with norm_topk_prob=True has no llama.cpp equivalent")
        if getattr(cfg, "clip_qkv", None) is not None:
            raise ExportError("GGUF export: olmoe with clip_qkv is not supported")
        if cfg.num_key_value_heads != cfg.num_attention_heads:  # llama.cpp sizes attn_k_norm by n_embd
            raise ExportError("GGUF export: olmoe with grouped-query attention (num_key_value_heads "
                              f"{cfg.num_key_value_heads} < num_attention_heads {cfg.num_attention_heads}) has no "
                              "llama.cpp equivalent")
    if family in ("qwen3_moe", "qwen2_moe"):
        # llama.cpp renormalizes the top-k weights for qwen3moe and never for qwen2moe
        if bool(getattr(cfg, "norm_topk_prob", family == "qwen3_moe")) != (family == "qwen3_moe"):
            raise ExportError(f"GGUF export: {family} with norm_topk_prob={cfg.norm_topk_prob} has no llama.cpp "
                              "equivalent")
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise ExportError(f"GGUF export: {family} with dense (mlp_only) layers is not supported")
        if getattr(cfg, "use_sliding_window", False):
            raise ExportError("GGUF export: sliding-window attention is not supported")
    if family in MLA:
        if getattr(cfg, "attention_bias", False):
            raise ExportError(f"GGUF export: {family} with attention_bias has no llama.cpp equivalent")
        if family == "deepseek_v3" and not getattr(cfg, "rope_interleave", True):
            raise ExportError("GGUF export: deepseek_v3 with rope_interleave=False has no llama.cpp equivalent "
                              "(its deepseek2 graph rotates interleaved pairs)")
        lite = _llama_cpp_lite(cfg)
        if (cfg.q_lora_rank is None) != lite:  # llama.cpp tells them apart by the layer count alone
            raise ExportError(f"GGUF export: llama.cpp reads a deepseek2 file {'with' if lite else 'without'} "
                              f"q_lora_rank at {cfg.num_hidden_layers} layers (it takes 26 or 27 layers, or 48 with "
                              f"a 128256-token vocabulary, for a model without q_lora_rank); this model has "
                              f"q_lora_rank={cfg.q_lora_rank}")
        if family == "deepseek_v2" and getattr(cfg, "topk_method", "greedy") != "greedy" and _groups(cfg)[0] > 1:
            raise ExportError("GGUF export: deepseek_v2 with group_limited_greedy routing has no llama.cpp "
                              "equivalent (llama.cpp ranks groups by their top-2 sum, DeepSeek-V2 by their max)")
    if family == "gpt_oss":
        pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_hidden_layers)]
        if list(cfg.layer_types) != pattern:
            raise ExportError("GGUF export: gpt_oss with layer_types other than sliding/full alternating from "
                              "layer 0 has no llama.cpp equivalent")
        if not cfg.attention_bias:
            raise ExportError("GGUF export: gpt_oss without attention biases has no llama.cpp equivalent")
        if cfg.tie_word_embeddings:
            raise ExportError("GGUF export: gpt_oss with tied embeddings has no llama.cpp equivalent (it reads "
                              "output.weight)")
        rope = cfg.rope_parameters or {}
        if rope.get("rope_type") == "yarn" and not rope.get("truncate", True):
            log.warning("GGUF export: llama.cpp computes YaRN with its correction range rounded to whole "
                        "dimensions (transformers' truncate=True); this gpt_oss config says truncate=False, so "
                        "llama.cpp's logits on the file differ slightly from transformers' on the model (as for "
                        "any gpt-oss file llama.cpp's converter writes)")
    if family == "mixtral" and getattr(cfg, "sliding_window", None):
        raise ExportError("GGUF export: mixtral with sliding_window is not supported")


def write_gguf(handle, src: Path, path: Path, qtype: str = "f16", tokenizer_pre_name: str | None = None) -> list:
    """Write ``handle``'s merged model to ``path``; returns [(name, numpy shape, GGML type)] as written."""
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs every tensor at INFO
    cfg = handle.model.config.get_text_config()
    family = handle.family.model_type
    _supported(cfg, family)
    arch_name = ARCH[family]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(src.name)
    _hparams(w, cfg, family, qtype)
    _add_tokenizer(w, src, cfg.vocab_size, tokenizer_pre_name)
    written, sums = [], {}
    for name, t in gguf_tensors(handle, arch_name):
        data = t.float().contiguous().numpy()
        kind = _qtype(qtype)
        if data.ndim <= 1 or name.endswith(("_norm.weight", ".bias")) or ".ffn_gate_inp" in name:  # routers
            kind = gguf.GGMLQuantizationType.F32
        try:
            q = gguf.quants.quantize(data, kind)
        except gguf.QuantError:
            kind = gguf.GGMLQuantizationType.F16
            q = gguf.quants.quantize(data, kind)
        w.add_tensor(name, q, raw_dtype=kind)
        written.append((name, tuple(data.shape), kind))
        sums[name] = hashlib.sha256(np.ascontiguousarray(q).tobytes()).hexdigest()
    w.add_string(CHECKSUM_KEY, json.dumps(sums, sort_keys=True, separators=(",", ":")))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# ---------------------------------------------------------------------------------------------------- check
def _llama(path: Path, n_ctx: int):
    """A llama_cpp.Llama on ``path`` without llama.cpp's extra CPU buffer types (repacked/AMX weights).

    The check is about the file, not the kernels; and with llama-cpp-python 0.3.36 (built from source on an
    AVX512/AMX_INT8 CPU) any 2-D Q8_0 weight in those buffers segfaulted (dense matmuls, unrelated to MoE or
    to this writer), which would kill the export instead of failing it.
    """
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    default = lc.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                     n_threads=max(1, min(4, torch.get_num_threads())))
    finally:
        lc.llama_model_default_params = default


def llama_cpp_logits(path: Path, ids: torch.Tensor, llm=None) -> torch.Tensor:
    """Logits of every position of each row of ``ids`` as computed by llama.cpp (llama_cpp.Llama)."""
    llm = llm or _llama(path, max(32, ids.shape[1]))
    rows = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
    return torch.stack(rows)


def llama_cpp_tokens(path: Path, text: str, llm=None) -> list[int]:
    """llama.cpp's tokenization of ``text`` (special tokens parsed, BOS as the GGUF says)."""
    llm = llm or _llama(path, 64)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    return llm.tokenize(text.encode(), add_bos=add_bos, special=True)


def position_errors(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per-position max |logit difference|, relative to the largest reference logit: (rows * positions,)."""
    return ((ref - got).abs().amax(-1) / ref.abs().max().clamp_min(1.0)).flatten()


def gguf_probe_ids(vocab_size: int) -> torch.Tensor:
    """16 short sequences of 4 tokens: a routing flip (below) spoils at most the rest of one sequence."""
    g = torch.Generator().manual_seed(4321)
    return torch.randint(0, vocab_size, (16, 4), generator=g)


def compare_positions(ref: torch.Tensor, got: torch.Tensor, tol: float, min_ok: float = 0.8) -> float:
    """At least ``min_ok`` of the positions within ``tol``; returns the median error.

    Not the max: with rounded weights a near-tie in a router can flip one token's expert choice, which
    changes that position's logits (and, through attention, the later positions of its sequence) a lot
    without anything being wrong with the file; a wrong file (tensor layout, permutation, hyper-parameters)
    is off at almost every position.
    """
    if got.shape != ref.shape:
        raise ExportCheckError(f"check failed: llama.cpp's logits have shape {tuple(got.shape)}, expected "
                               f"{tuple(ref.shape)}; output removed")
    err = position_errors(ref, got)
    ok = float((err <= tol).float().mean())
    if ok < min_ok:
        raise ExportCheckError(f"check failed: llama.cpp's logits differ from usaf's merged model at "
                               f"{1 - ok:.0%} of the positions (median relative error {float(err.median()):.2e}, "
                               f"tolerance {tol:.0e}); output removed")
    return float(err.median())


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build is as good as none
        return False
    return True


def _read_back(path: Path, written: list) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: (tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type) for t in reader.tensors}
    want = {n: (s, k) for n, s, k in written}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or [n for n in want if got[n] != want[n]]
        raise ExportCheckError(f"check failed: the GGUF reads back with different tensors (e.g. {bad[0]}); "
                               f"output removed")
    verify_gguf(path, reader)


def verify_gguf(path: Path, reader=None) -> None:
    """Every tensor must match the sha256 under ``usaf.checksums`` (``IntegrityError``); none recorded: no check."""
    import gguf

    reader = reader or gguf.GGUFReader(str(path))
    field = reader.fields.get(CHECKSUM_KEY)
    if field is None:
        return
    sums = json.loads(bytes(field.parts[field.data[0]]).decode())
    for t in reader.tensors:
        if hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest() != sums.get(t.name):
            raise IntegrityError(f"{path} is corrupted: tensor {t.name} does not match its checksum")


CHECK_TEXT = "The quick brown fox jumps over the lazy dog. 42 + 7 = 49?\n<|im_start|>user\nHi!<|im_end|>"


def export_gguf(run: Run, out, qtype: str = "f16", base_weights: str = DEFAULT_BASE_WEIGHTS,
                overwrite: bool = False, check: bool = True, tokenizer_pre_name: str | None = None) -> dict:
    """Write the merged model as GGUF; then check it (llama.cpp logits when available, else the reader)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install gguf") from None
    if qtype not in TOLERANCE:
        raise ExportError(f"--type must be one of {tuple(TOLERANCE)}, got {qtype!r}")
    ckpt = Checkpoint(run.base)
    check_out(out, overwrite)
    _, maps = plan(run.tensors, run.meta, ckpt)
    family = run.meta.get("model_type", "")
    if family not in ARCH:
        raise ExportError(f"GGUF export supports {', '.join(ARCH)}; this model is {family}")
    dequant = base_weights == "dequantized" and run.meta.get("quant", "none") != "none"
    ref = reference_model(run.base, run.tensors, run.meta, disk_dtype(ckpt, maps),
                          run.meta.get("quant") if dequant else "none",
                          run.train_dtype if dequant else None)
    report = {"out": str(out), "type": qtype, "arch": arch_name(family), "check": "skipped"}
    with Staged(out, overwrite, is_dir=False) as st:
        written = write_gguf(ref, ckpt.dir, st.path, qtype, tokenizer_pre_name)
        report["tensors"] = len(written)
        if not check:
            return report
        _read_back(st.path, written)  # names, shapes, types and checksums
        if not have_llama_cpp():
            report["check"] = "names/shapes/types read back with gguf.GGUFReader (llama_cpp not installed)"
            return report
        ids = gguf_probe_ids(ref.model.config.get_text_config().vocab_size)
        want = fp32_logits(ref.model, ids)
        del ref
        llm = _llama(st.path, 64)
        err = compare_positions(want, llama_cpp_logits(st.path, ids, llm), TOLERANCE[qtype])

        hf_ids = load_tokenizer(str(ckpt.dir))(CHECK_TEXT)["input_ids"]
        same = llama_cpp_tokens(st.path, CHECK_TEXT, llm) == hf_ids
        llm.close() if hasattr(llm, "close") else None
        del llm
        if not same:
            raise ExportCheckError("check failed: llama.cpp tokenizes differently from transformers; output removed")
        report["check"] = f"llama.cpp logits ok (median rel. error {err:.1e}), tokenizer ok"
        report["check_error"] = err
    return report
