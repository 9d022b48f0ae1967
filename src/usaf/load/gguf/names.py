"""GGUF tensor names <-> the model's parameters, from the gguf package's tables (``gguf.TensorNameMap``,
``gguf.TENSOR_NAMES``); shared by loading (``usaf.load.gguf.model``) and export (``usaf.export.gguf``).

Families and llama.cpp architectures: ``qwen3_moe`` <-> ``qwen3moe``; ``qwen2_moe`` <-> ``qwen2moe`` (with its
shared expert: ``blk.N.ffn_{gate,up,down}_shexp`` and the shared expert's gate ``blk.N.ffn_gate_inp_shexp``);
``olmoe`` <-> ``olmoe`` (q/k norms over the whole
projection); ``granitemoe`` <-> ``granitemoe`` (q/k permuted like llama's); ``mixtral`` <-> ``llama`` with
experts; ``deepseek_v3`` (sigmoid gating, ``expert_gating_func`` 2) and ``deepseek_v2`` (softmax) <->
``deepseek2``: multi-head latent attention stored as llama.cpp's converter writes it, ``kv_b_proj`` split per head
into ``blk.N.attn_k_b`` (its key rows, transposed: ``[heads, kv_lora_rank, qk_nope]``) and ``blk.N.attn_v_b``
(``[heads, v_head_dim, kv_lora_rank]``; :func:`split_kv_b` / :func:`join_kv_b`), and the router's score bias
``e_score_correction_bias`` as ``blk.N.exp_probs_b.bias``; ``gpt_oss`` <-> ``gpt-oss``: experts kept
``[E, in, out]`` with gate/up interleaved in memory (``gate_up_proj [E, H, 2I]``: gate column j is 2j, up 2j + 1)
and stored as the other families' ``[E, out, in]`` gate, up and down tensors (:data:`EXPERT_LAYOUT`), their
biases beside them (``gate_up_proj_bias`` split likewise: :func:`split_names`), attention sinks
``blk.N.attn_sinks.weight``; ``glm4_moe`` <-> ``glm4moe`` (DeepSeek-V3's routing with grouped-query attention,
partial rotary embedding, leading dense layers; the file's multi-token-prediction blocks, counted in its
``block_count``, are not part of the model).
Expert stacks: ``gate_up_proj [E, 2I, H]`` is ``blk.N.ffn_gate_exps`` (rows ``[0, I)``) then
``blk.N.ffn_up_exps``; ``down_proj [E, H, I]`` is ``blk.N.ffn_down_exps`` (numpy order). llama's q/k rows
are permuted from rotate-half order to llama.cpp's interleaved RoPE (:func:`permute` / :func:`unpermute`).
"""

from __future__ import annotations

import torch

# family -> gguf.MODEL_ARCH member name
ARCH = {"qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "olmoe": "OLMOE", "granitemoe": "GRANITE_MOE",
        "mixtral": "LLAMA", "deepseek_v3": "DEEPSEEK2", "deepseek_v2": "DEEPSEEK2", "gpt_oss": "GPT_OSS",
        "glm4_moe": "GLM4_MOE"}
LEADING_DENSE = ("deepseek_v3", "deepseek_v2", "glm4_moe")  # ``{arch}.leading_dense_block_count`` dense layers first
# family -> (gate/up rows interleaved, stacks transposed) of its experts in memory against the GGUF's tensors
EXPERT_LAYOUT = {"gpt_oss": (True, True)}
MLA = ("deepseek_v3", "deepseek_v2")  # kv_b_proj stored split (attn_k_b, attn_v_b)
ROPE_PERMUTED = ("LLAMA", "GRANITE_MOE")  # llama.cpp's converter permutes these archs' q/k rows
# transformers' names that the gguf tables know under an older spelling
_ALIASES = ((".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"),
            (".mlp.gate.e_score_correction_bias", ".mlp.gate.e_score_correction.bias"),
            (".mlp.experts.down_proj_bias", ".mlp.experts.down_proj.bias"))
_WEIGHT_SUFFIXED = (".self_attn.sinks",)  # stored with ".weight" added (llama.cpp's converter adds it)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF files need the gguf package: pip install 'usaf[gguf]'") from None
    return gguf


def arch_name(family: str) -> str:
    """llama.cpp's architecture string of a family (``qwen3moe``)."""
    gguf = _gguf()
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCH[family])]


def family_of_arch(arch: str, gating: int | None = None) -> str | None:
    """The family a GGUF architecture string loads as (None when usaf does not load it). ``deepseek2`` is
    DeepSeek-V3's family with sigmoid gating (``{arch}.expert_gating_func`` 2), else DeepSeek-V2's (softmax:
    llama.cpp's reading of a file without the key)."""
    if arch == arch_name("deepseek_v3"):
        return "deepseek_v3" if gating == 2 else "deepseek_v2"
    return next((f for f in ARCH if arch_name(f) == arch), None)


def name_map(family: str, n_layers: int):
    gguf = _gguf()
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCH[family]), n_layers)


def gguf_name(tmap, param: str) -> str | None:
    """The GGUF name of a (non-expert) parameter of the model, or None."""
    name = tmap.get_name(param, try_suffixes=(".weight", ".bias"))
    for new, old in _ALIASES:
        if name is None and param.endswith(new):
            name = tmap.get_name(param[: -len(new)] + old, try_suffixes=(".weight", ".bias"))
    if name is not None and param.endswith(_WEIGHT_SUFFIXED):
        name += ".weight"
    return name


def split_names(family: str, param: str) -> list[str] | None:
    """The GGUF tensors a parameter is stored as when it is several (interleaved along its last dim), else None:
    gpt-oss's ``gate_up_proj_bias [E, 2I]`` is ``blk.N.ffn_gate_exps.bias`` (even columns) and
    ``blk.N.ffn_up_exps.bias`` (odd)."""
    if family == "gpt_oss" and param.endswith(".mlp.experts.gate_up_proj_bias"):
        layer = int(param.split(".layers.")[1].split(".")[0])
        return [n.replace(".weight", ".bias") for n in expert_names(layer)["gate_up_proj"]]
    return None


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Parts ``[..., n]`` -> ``[..., len(parts) * n]``, element j of part i at ``len(parts) * j + i``."""
    return torch.stack(parts, dim=-1).flatten(-2)


def expert_names(layer: int) -> dict[str, list[str]]:
    """``{stack name: [GGUF tensor names concatenated along dim 1]}`` of decoder layer ``layer``."""
    gguf = _gguf()

    def fmt(kind: str) -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=layer) + ".weight"

    return {"gate_up_proj": [fmt("FFN_GATE_EXP"), fmt("FFN_UP_EXP")], "down_proj": [fmt("FFN_DOWN_EXP")]}


def kv_b_names(layer: int) -> tuple[str, str]:
    """The GGUF names of the two halves of layer ``layer``'s ``kv_b_proj`` (keys, values)."""
    gguf = _gguf()
    return tuple(gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, k)].format(bid=layer) + ".weight"
                 for k in ("ATTN_K_B", "ATTN_V_B"))


def split_kv_b(w: torch.Tensor, heads: int, nope: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj [heads * (nope + v), rank]`` -> ``(k_b [heads, rank, nope], v_b [heads, v, rank])``, as
    llama.cpp's converter splits it (its keys transposed, for the absorbed attention)."""
    kv = w.reshape(heads, nope + v, w.shape[-1])
    k_b, v_b = kv.split([nope, v], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_kv_b`."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


def kv_b_rows(config) -> tuple[int, int, int]:
    """``(heads, qk_nope_head_dim, v_head_dim)`` of an MLA config."""
    return config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved RoPE order (convert_hf_to_gguf's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(family: str, param: str, config) -> int | None:
    """Heads whose rows llama.cpp permutes in this parameter (llama arch q/k projections), else None."""
    if ARCH.get(family) not in ROPE_PERMUTED:
        return None
    if param.endswith("q_proj.weight"):
        return config.num_attention_heads
    if param.endswith("k_proj.weight"):
        return config.num_key_value_heads
    return None
