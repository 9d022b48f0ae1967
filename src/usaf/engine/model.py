"""Turn a loaded transformers MoE model into a trainable usaf model: ``prepare(model, UsafConfig())``.

After ``prepare``:
- every fused experts module is a ``UsafExperts`` (frozen base outside the parameters, quantized if
  asked, plus sparse deltas in the trainable layers);
- every parameter is frozen except the delta values and the routers of the trainable layers;
- the model is still the same ``nn.Module`` and runs in a plain PyTorch loop or in ``transformers.Trainer``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..config import UsafConfig
from ..integrity import TORCH_DTYPES, checkpoint_fingerprint, local_checkpoint
from ..io import atomic_save_safetensors, read_safetensors
from .delta import SparseDelta
from .discover import moe_site
from .experts import UsafExperts, jetmoe_block_forward, llama4_block_forward
from .families import Family, UnsupportedModelError, family_for, get_path
from .linear import attach, attention_linears, shared_expert_linears
from .linear import merge as merge_linear
from .linear import unmerge as unmerge_linear
from .spill import PreactSpill
from .store import Workspace

FORMAT_VERSION = "1"
log = logging.getLogger("usaf")


@dataclass
class MoeLayer:
    """One decoder layer's MoE block after ``prepare``."""

    index: int  # decoder layer index
    prefix: str  # module name of the experts module, e.g. "model.layers.3.mlp.experts"
    experts: UsafExperts
    router: nn.Module
    router_prefix: str
    trainable: bool

    def key(self, name: str) -> str:
        """The on-model name of stack ``name`` (delta files, exports): ``<prefix>.<its path>``."""
        return f"{self.prefix}.{self.experts.param_name(name)}"


_TOWERS = ("vision", "visual", "audio")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers (a vision-language model's ``model.language_model.layers``)."""
    cfg = model.config.get_text_config()
    n = cfg.num_hidden_layers
    # longcat_flash counts the 2 attention sublayers of each decoder layer in num_hidden_layers (num_layers)
    counts = {n, getattr(cfg, "num_layers", n)}
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers"):
        layers = get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) in counts:
            return layers
    for name, mod in model.named_modules():  # a vision-language model's towers hold layer lists too
        if isinstance(mod, nn.ModuleList) and len(mod) == n and not any(w in name for w in _TOWERS):
            return mod
    raise UnsupportedModelError(f"could not find the {n} decoder layers of {type(model).__name__}")


def compute_device(model: nn.Module) -> torch.device:
    """The device of the model's first real (non-meta) parameter: where it computes."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def parse_layers(spec: str, num_layers: int) -> range:
    """``all`` | ``top:N`` | ``a-b`` (inclusive) -> range of decoder layer indices."""
    spec = (spec or "all").strip()
    try:
        if spec == "all":
            return range(num_layers)
        if spec.startswith("top:"):
            n = int(spec[4:])
            if not 1 <= n <= num_layers:
                raise ValueError
            return range(num_layers - n, num_layers)
        a, b = (int(x) for x in spec.split("-"))
        if not 0 <= a <= b < num_layers:
            raise ValueError
        return range(a, b + 1)
    except ValueError:
        raise ValueError(
            f"--train-layers {spec!r} is not valid for a model with {num_layers} layers "
            f"(use all, top:N with 1<=N<={num_layers}, or a-b with 0<=a<=b<={num_layers - 1})"
        ) from None


def fingerprint_keys(model: nn.Module) -> list[str]:
    """Names of the parameters that identify a model built in memory: expert stacks and biases, routers."""
    return [n for n, p in model.named_parameters()
            if ".experts." in f".{n}" or p.dim() == 3 or "router" in n or n.endswith("gate.weight")]


def sample_index(numel: int) -> torch.Tensor:
    """The strided positions of a flattened tensor that enter the in-memory fingerprint."""
    return torch.arange(0, numel, max(1, numel // 4096))


def fingerprint(model: nn.Module, family: Family, samples: dict[str, torch.Tensor] | None = None) -> str:
    """The fingerprint of a model built in memory (no checkpoint behind it): family, shapes and a strided
    sample of every expert/router weight *as loaded*. It depends on the load dtype, so a delta made with it
    matches only the same in-memory build; models loaded from a checkpoint use
    ``usaf.integrity.checkpoint_fingerprint`` instead (:func:`base_fingerprint_of`).

    ``samples`` supplies ``flat[sample_index(numel)]`` for parameters that are not materialized.
    """
    h = hashlib.sha256(family.model_type.encode())
    params = dict(model.named_parameters())
    for name in fingerprint_keys(model):
        p = params[name]
        sample = samples[name] if samples and name in samples else p.detach().reshape(-1)[sample_index(p.numel())]
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def base_fingerprint_of(model: nn.Module, family: Family) -> tuple[str, str]:
    """``(fingerprint, "checkpoint" | "memory")`` of the base a delta is made for.

    A model loaded from a local safetensors checkpoint (``model.config._name_or_path``: a directory, or a hub
    id in the Hugging Face cache) is identified by the checkpoint on disk, whatever dtype it was loaded at
    (``usaf.integrity.checkpoint_fingerprint``); the sampled chunks of every on-disk tensor that the model
    holds under the same name and shape (embeddings, attention, norms, routers: 1-D and 2-D) must equal
    the loaded values, else the model was changed after loading (or built from the config alone) and the
    in-memory :func:`fingerprint` is used, which only the same in-memory build matches.
    """
    src = local_checkpoint(getattr(model.config, "_name_or_path", None))
    if src is not None:
        params = dict(model.named_parameters())
        seen = {"compared": 0, "differs": None}

        def visit(name, dtype, shape, offset, chunk):
            p = params.get(name)
            if seen["differs"] or p is None or p.is_meta or not p.is_floating_point() or p.dim() > 2 \
                    or list(p.shape) != shape or dtype not in TORCH_DTYPES or not TORCH_DTYPES[dtype].is_floating_point:
                return
            disk = torch.frombuffer(bytearray(chunk), dtype=TORCH_DTYPES[dtype]).to(p.dtype)
            i = offset // TORCH_DTYPES[dtype].itemsize
            flat = p.detach().view(-1) if p.is_contiguous() else p.detach().reshape(-1)
            seen["compared"] += 1
            if not torch.equal(flat[i : i + disk.numel()].cpu(), disk):
                seen["differs"] = name

        fp = checkpoint_fingerprint(src, visit)
        if seen["compared"] and not seen["differs"]:
            return fp, "checkpoint"
        why = f"{seen['differs']} differs from" if seen["differs"] else "no tensor could be compared with"
        log.warning("the model's %s %s on disk: its deltas are tied to this in-memory model (fingerprint of its "
                    "weights as loaded), not to the checkpoint", why, src)
    return fingerprint(model, family), "memory"


class UsafModel:
    """Handle on a prepared model: its MoE layers, deltas, routers and the delta file."""

    def __init__(self, model: nn.Module, config: UsafConfig, family: Family, layers: list[MoeLayer],
                 base_fingerprint: str, fingerprint_of: str = "checkpoint"):
        self.model = model
        self.config = config
        self.family = family
        self.layers = layers
        self.fingerprint = base_fingerprint
        self.fingerprint_of = fingerprint_of  # "checkpoint" (on disk) or "memory" (see base_fingerprint_of)
        self.transposed = layers[0].experts.transposed  # stacks stored [E, in, out]
        self.concatenated = True  # gate/up rows concatenated, not interleaved (set by prepare)
        # {"<attention linear name>.weight": linear with a ``usaf_delta``} (``attention_density > 0``)
        self.attention: dict[str, nn.Linear] = {}
        # {"<shared expert linear name>.weight": linear with a ``usaf_delta``} (``shared_density > 0``)
        self.shared: dict[str, nn.Linear] = {}

    # -- views -----------------------------------------------------------------------------------
    @property
    def trainable_layers(self) -> list[MoeLayer]:
        return [m for m in self.layers if m.trainable]

    def deltas(self) -> dict[str, SparseDelta]:
        """``{"<experts prefix>.<tensor name>": SparseDelta}`` for the trainable layers (the model's own parameter
        names: ``gate_up_proj`` / ``down_proj``, nemotron_h's ``up_proj``, dbrx's ``mlp.w1`` ...)."""
        return {m.key(n): m.experts.deltas[n] for m in self.trainable_layers for n in m.experts.names}

    def attention_deltas(self) -> dict[str, SparseDelta]:
        """``{"<linear name>.weight": SparseDelta}`` over the attention projections of the trainable layers
        (shape ``(1, out, in)``; empty unless ``attention_density > 0``)."""
        return {k: lin.usaf_delta for k, lin in self.attention.items()}

    def shared_deltas(self) -> dict[str, SparseDelta]:
        """``{"<linear name>.weight": SparseDelta}`` over the shared experts' linears of the trainable layers
        (shape ``(1, out, in)``; empty unless ``shared_density > 0``)."""
        return {k: lin.usaf_delta for k, lin in self.shared.items()}

    def linears(self) -> dict[str, nn.Linear]:
        """Every ``nn.Linear`` with a sparse delta: the attention projections, then the shared experts'."""
        return {**self.attention, **self.shared}

    def sparse_deltas(self) -> dict[str, SparseDelta]:
        """Every trainable sparse delta: the expert stacks', the attention projections' and the shared experts'."""
        return {**self.deltas(), **self.attention_deltas(), **self.shared_deltas()}

    def router_parameters(self) -> dict[str, nn.Parameter]:
        if not self.config.train_router:
            return {}
        return {f"{m.router_prefix}.{n}": p for m in self.trainable_layers for n, p in m.router.named_parameters()}

    def expert_elements(self) -> int:
        """Weights of the experts that compute in the trainable layers (what the density applies to; stack
        rows of null experts, as longcat_flash's gate_up_proj has, are not counted)."""
        return sum(m.experts.live_numel(n) for m in self.trainable_layers for n in m.experts.names)

    def budget(self, density: float | None = None) -> int:
        density = self.config.density if density is None else density
        return int(round(density * self.expert_elements()))

    def attention_elements(self) -> int:
        """Attention projection weights in the trainable layers (what ``attention_density`` applies to)."""
        return sum(d.numel for d in self.attention_deltas().values())

    def attention_budget(self) -> int:
        return int(round(self.config.attention_density * self.attention_elements()))

    def shared_elements(self) -> int:
        """Shared-expert linear weights in the trainable layers (what ``shared_density`` applies to)."""
        return sum(d.numel for d in self.shared_deltas().values())

    def shared_budget(self) -> int:
        return int(round(self.config.shared_density * self.shared_elements()))

    def active(self) -> int:
        """Active elements of every sparse delta (expert stacks, attention, shared experts)."""
        return sum(len(d) for d in self.sparse_deltas().values())

    def expert_active(self) -> int:
        return sum(len(d) for d in self.deltas().values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [d.values for d in self.sparse_deltas().values()] + list(self.router_parameters().values())

    # -- merge ---------------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the deltas into an unquantized frozen base (``UsafExperts.merge``); ``unmerge`` restores the
        original bytes. While merged, the forward does not add the deltas again."""
        for m in self.trainable_layers:
            m.experts.merge()
        for lin in self.linears().values():
            merge_linear(lin)

    def unmerge(self) -> None:
        for m in self.trainable_layers:
            m.experts.unmerge()
        for lin in self.linears().values():
            unmerge_linear(lin)

    # -- delta file --------------------------------------------------------------------------------
    def delta_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, d in self.sparse_deltas().items():
            out[f"{key}.indices"] = d.indices.detach().cpu().contiguous()
            out[f"{key}.values"] = d.values.detach().float().cpu().contiguous()
        for key, p in self.router_parameters().items():
            out[f"router::{key}"] = p.detach().float().cpu().contiguous()
        return out

    def delta_metadata(self, **extra) -> dict[str, str]:
        shapes = {k: list(d.shape) for k, d in self.sparse_deltas().items()}
        meta = {
            "format": "usaf-delta",
            "version": FORMAT_VERSION,
            "model_type": self.family.model_type,
            "transposed": str(self.transposed),
            "concatenated": str(self.concatenated),
            "base_fingerprint": self.fingerprint,
            "fingerprint_of": self.fingerprint_of,
            "density": repr(self.config.density),
            "active": str(self.active()),
            "train_layers": self.config.train_layers,
            "quant": self.config.quant,
            "group_size": str(self.config.group_size),
            "quant_rounding": self.config.quant_rounding,
            "train_router": str(self.config.train_router),
            "attention_density": repr(self.config.attention_density),
            "shared_density": repr(self.config.shared_density),
            "shapes": json.dumps(shapes),
        }
        meta.update({k: str(v) for k, v in extra.items()})
        return meta

    def save_delta(self, path, **extra) -> None:
        """Write the delta file (safetensors): indices, values, routers, metadata."""
        atomic_save_safetensors(self.delta_state(), path, metadata=self.delta_metadata(**extra))

    def load_delta(self, path, check_fingerprint: bool = True) -> dict[str, str]:
        """Load a delta file into this prepared model (checksums verified); refuses a delta made for another
        base."""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != "usaf-delta":
            raise ValueError(f"{path} is not a usaf delta file")
        if check_fingerprint and meta.get("base_fingerprint") != self.fingerprint:
            older = "" if "fingerprint_of" in meta else "; or by an older usaf, whose fingerprints differ"
            raise ValueError(
                f"{path} was made for another base model (fingerprint {meta.get('base_fingerprint')}, "
                f"this model is {self.fingerprint}{older})"
            )
        self.load_delta_state(tensors)
        return meta

    @torch.no_grad()
    def load_delta_state(self, tensors: dict[str, torch.Tensor]) -> None:
        deltas = self.sparse_deltas()
        keys = {k.rsplit(".", 1)[0] for k in tensors if not k.startswith("router::")}
        missing = keys - set(deltas)
        if missing:
            raise ValueError(f"delta has tensors for layers that do not train here: {sorted(missing)[:3]}")
        for key, d in deltas.items():
            if f"{key}.indices" in tensors:
                d.set(tensors[f"{key}.indices"], tensors[f"{key}.values"])
            else:
                d.set(torch.empty(0, dtype=torch.int64))
        routers = self.router_parameters()
        for k, v in tensors.items():
            if k.startswith("router::"):
                name = k[len("router::"):]
                if name not in routers:
                    raise ValueError(f"delta has a router {name!r} that does not train here")
                routers[name].copy_(v.to(routers[name].dtype))


def prepare(model: nn.Module, config: UsafConfig | None = None, frozen: dict | None = None,
            base_fingerprint: str | None = None) -> UsafModel:
    """Make a loaded transformers MoE model trainable with sparse expert deltas.

    Args:
        model: a ``*ForCausalLM`` whose experts ``usaf.engine.discover`` finds (or with a family row).
        config: engine settings; ``UsafConfig()`` defaults when omitted.
        frozen: ``{experts module name: {stack name: frozen stack}}`` built elsewhere (streamed loading);
            by default the stacks are taken from the model's own parameters.
        base_fingerprint: the checkpoint's fingerprint when known (streamed loading:
            ``usaf.integrity.checkpoint_fingerprint``); by default :func:`base_fingerprint_of`.

    Returns:
        A ``UsafModel`` handle; ``handle.model`` is the same (patched) module.

    Raises:
        UnsupportedModelError: dense model, or a layout usaf cannot train (one line naming why).
        ValueError: a bad ``train_layers`` spec or density.
    """
    config = config or UsafConfig()
    if not 0 < config.density <= 1:
        raise ValueError(f"density must be in (0, 1], got {config.density}")
    if not 0 <= config.attention_density <= 1:
        raise ValueError(f"attention density must be in [0, 1], got {config.attention_density}")
    if not 0 <= config.shared_density <= 1:
        raise ValueError(f"shared density must be in [0, 1], got {config.shared_density}")
    family = family_for(model.config)
    layers = decoder_layers(model)
    train_range = parse_layers(config.train_layers, len(layers))
    base_fp, fp_of = (base_fingerprint, "checkpoint") if base_fingerprint else base_fingerprint_of(model, family)
    moe: list[MoeLayer] = []
    names = {id(m): n for n, m in model.named_modules()}
    sites = [(i, layer, moe_site(layer, family)) for i, layer in enumerate(layers)]
    sites = [(i, layer, site) for i, layer, site in sites if site is not None]  # dense layers have none
    layouts = {site.layout for _, _, site in sites}
    if len(layouts) > 1:
        raise UnsupportedModelError(f"{family.model_type}: its MoE layers have different expert layouts")
    for p in model.parameters():
        p.requires_grad_(False)
    workspace = Workspace()  # one set of dequantization buffers for all the layers (they run one at a time)
    spill = PreactSpill()  # one file for the lean experts' pre-activations of every layer (opened on first use)
    for i, layer, site in sites:
        name = names[id(site.experts)]
        experts = UsafExperts(site.experts, site.layout, config.quant, config.group_size,
                              chunk_bytes=config.chunk_mb << 20, frozen=(frozen or {}).get(name),
                              null_experts=site.null_experts, rounding=config.quant_rounding)
        experts.workspace, experts.preact_spill = workspace, spill
        setattr(site.block, site.attr, experts)
        if family.dispatch == "llama4":
            site.block.forward = types.MethodType(llama4_block_forward, site.block)
        elif family.dispatch == "jetmoe":
            site.block.forward = types.MethodType(jetmoe_block_forward, site.block)
        trainable = i in train_range
        experts.init_deltas(device=next(iter(layer.parameters())).device)
        for d in experts.deltas.values():
            d.values.requires_grad_(trainable)
        if trainable and config.train_router:
            for p in site.router.parameters():
                p.requires_grad_(True)
        moe.append(MoeLayer(i, name, experts, site.router, names[id(site.router)], trainable))
    if not moe:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no fused expert layers (a dense model?); usaf trains "
            f"Mixture-of-Experts models"
        )
    if not any(m.trainable for m in moe):
        raise ValueError(f"--train-layers {config.train_layers!r} contains no MoE layer")
    text_cfg = model.config.get_text_config()
    if hasattr(text_cfg, "output_router_logits"):
        text_cfg.output_router_logits = config.router_aux_loss
        model.config.output_router_logits = config.router_aux_loss
    handle = UsafModel(model, config, family, moe, base_fp, fp_of)
    layout = layouts.pop()
    handle.transposed, handle.concatenated = layout.transposed, layout.concatenated
    if config.attention_density > 0:
        for i in (m.index for m in moe if m.trainable):  # the MoE layers that train (the prefix below is cached)
            for rel, lin in attention_linears(layers[i]):
                attach(lin).values.requires_grad_(True)
                handle.attention[f"{names[id(layers[i])]}.{rel}.weight"] = lin
        if not handle.attention:
            raise UnsupportedModelError(f"{family.model_type}: no attention projections (nn.Linear) were found "
                                        f"in the trainable layers for --attention-density")
    if config.shared_density > 0:
        for i in (m.index for m in moe if m.trainable):
            for rel, lin in shared_expert_linears(layers[i]):
                attach(lin).values.requires_grad_(True)
                handle.shared[f"{names[id(layers[i])]}.{rel}.weight"] = lin
        if not handle.shared:  # the default applies to every family: a note, not an error (the report says 0)
            log.info("%s: no shared expert of nn.Linear modules in the trainable layers (none, or 3-D stacks): "
                     "--shared-density %g trains nothing here", family.model_type, config.shared_density)
    model.usaf = handle  # type: ignore[attr-defined]
    return handle


@torch.no_grad()
def effective_weight(layer: MoeLayer, name: str, dtype=None) -> torch.Tensor:
    """Dense effective ``[E, R, C]`` weight (base + delta) of one stack: for tests, merge and export."""
    ex = layer.experts
    dtype = dtype or ex.base_dtype
    return ex.weight(name, 0, ex.shape(name)[0], dtype, ex.deltas[name].values.device)
