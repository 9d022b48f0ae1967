"""GGUF tensor names <-> the model's parameters, from the gguf package's tables (``gguf.TensorNameMap``,
``gguf.TENSOR_NAMES``); shared by loading (``usaf.load.gguf.model``) and export (``usaf.export.gguf``).

Families and llama.cpp architectures: ``qwen3_moe`` <-> ``qwen3moe``; ``qwen2_moe`` <-> ``qwen2moe`` (with its
shared expert: ``blk.N.ffn_{gate,up,down}_shexp`` and the shared expert's gate ``blk.N.ffn_gate_inp_shexp``);
``olmoe`` <-> ``olmoe`` (q/k norms over the whole
projection); ``granitemoe`` <-> ``granitemoe`` (q/k permuted like llama's); ``mixtral`` <-> ``llama`` with
experts.
Expert stacks: ``gate_up_proj [E, 2I, H]`` is ``blk.N.ffn_gate_exps`` (rows ``[0, I)``) then
``blk.N.ffn_up_exps``; ``down_proj [E, H, I]`` is ``blk.N.ffn_down_exps`` (numpy order). llama's q/k rows
are permuted from rotate-half order to llama.cpp's interleaved RoPE (:func:`permute` / :func:`unpermute`).
"""

from __future__ import annotations

import torch

# family -> gguf.MODEL_ARCH member name
ARCH = {"qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "olmoe": "OLMOE", "granitemoe": "GRANITE_MOE",
        "mixtral": "LLAMA"}
ROPE_PERMUTED = ("LLAMA", "GRANITE_MOE")  # llama.cpp's converter permutes these archs' q/k rows
# transformers' names that the gguf tables know under an older spelling
_ALIASES = ((".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"),)


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


def family_of_arch(arch: str) -> str | None:
    """The family a GGUF architecture string loads as (None when usaf does not load it)."""
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
    return name


def expert_names(layer: int) -> dict[str, list[str]]:
    """``{stack name: [GGUF tensor names concatenated along dim 1]}`` of decoder layer ``layer``."""
    gguf = _gguf()

    def fmt(kind: str) -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=layer) + ".weight"

    return {"gate_up_proj": [fmt("FFN_GATE_EXP"), fmt("FFN_UP_EXP")], "down_proj": [fmt("FFN_DOWN_EXP")]}


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
