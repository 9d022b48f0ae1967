"""``usaf inspect``: family, MoE layout, expert/router parameter counts, budget at a density.

Reads config.json only (the model is built on the meta device), so it works for any size.
"""

from __future__ import annotations

import torch

from ..engine.discover import moe_site
from ..engine.families import FAMILIES, UnsupportedModelError, auto_model_class, family_for, get_path
from ..engine.model import decoder_layers
from .gguf.model import is_gguf, open_gguf
from .hf import load_config


def inspect_model(model: str, density: float = 0.005, trust_remote_code: bool = False) -> dict:
    if not 0 < density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {density}")
    config = load_config(model, trust_remote_code)
    fam = family_for(config)
    with torch.device("meta"):
        m = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    layers = decoder_layers(m)
    moe_layers, expert_params, router_params, shapes, site = [], 0, 0, None, None
    for i, layer in enumerate(layers):
        s = moe_site(layer, fam)
        if s is None:
            continue
        site, ex = s, s.experts
        moe_layers.append(i)
        stacks = {st.path: get_path(ex, st.path) for st in site.layout.stacks}
        expert_params += sum(p.numel() for p in stacks.values())
        router_params += sum(p.numel() for p in site.router.parameters())
        shapes = {path: list(p.shape) for path, p in stacks.items()}
    if site is None:
        raise UnsupportedModelError(f"{model} has no fused expert layers (a dense model?); usaf trains "
                                    f"Mixture-of-Experts models")
    total = sum(p.numel() for p in m.parameters())
    layout = "transposed [E, in, out]" if site.transposed else "standard [E, out, in]"
    if not site.concatenated:
        layout += ", gate/up interleaved"
    if not site.layout.gated:
        layout += ", no gate (up_proj + activation)"
    if site.bias:
        layout += " + expert biases"
    names = {id(mod): n.split(".")[-1] for n, mod in layers[moe_layers[0]].named_modules()}
    shared = names.get(id(site.shared)) if site.shared is not None else None
    report = {
        "model_type": fam.model_type, "family": fam.model_type, "layout": layout,
        "dispatch": fam.dispatch, "discovered": fam.discovered,
        "block": site.block_path or "(decoder layer)", "experts": site.attr, "router": site.router_path,
        "shared_experts": shared, "num_layers": len(layers), "moe_layers": moe_layers,
        "expert_shapes": shapes, "total_params": total, "expert_params": expert_params,
        "router_params": router_params, "density": density,
        "active_budget_all_layers": int(round(density * expert_params)),
    }
    where = "found in the module tree" if fam.discovered else "row in usaf.engine.families"
    if fam.discovered and fam.model_type in FAMILIES:  # e.g. step3p5: experts without layout flags
        where += "; layout flags from its row in usaf.engine.families"
    report["text"] = "\n".join([
        f"family        {fam.model_type} ({layout}; {where})",
        f"MoE block     layer.{site.block_path}{'.' if site.block_path else ''}{site.attr} / router "
        f"layer.{site.router_path}{'; shared: ' + shared if shared else ''}",
        f"layers        {len(layers)} decoder layers, {len(moe_layers)} MoE",
        f"expert stacks {shapes}",
        f"parameters    {total:,} total, {expert_params:,} in experts, {router_params:,} in routers",
        f"budget        {report['active_budget_all_layers']:,} active expert weights at density {density} "
        f"(all layers)",
    ])
    if is_gguf(model):
        report["gguf"] = gguf_summary(model)
        report["text"] += "\ngguf          " + report["gguf"]["text"]
    return report


def gguf_summary(path: str) -> dict:
    """Architecture, file size and tensor types of a GGUF (experts and the rest, by bytes)."""
    f = open_gguf(path)
    experts, other = {}, {}
    for name, t in f.tensors.items():
        side = experts if "_exps." in name else other
        side[t.type_name] = side.get(t.type_name, 0) + t.nbytes

    def fmt(d):
        return ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

    text = f"{f.arch}, {f.size / 2**20:.1f} MiB; experts (frozen store, as stored): {fmt(experts)}; other " \
           f"tensors (dequantized at load): {fmt(other)}"
    return {"arch": f.arch, "bytes": f.size, "expert_types": experts, "other_types": other, "text": text}
