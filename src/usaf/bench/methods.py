"""The methods ``usaf bench quality`` compares, each training exactly the scope it claims.

A method is a spec string ``name[/key=value...]``: ``usaf/density=0.01/lr=1e-3``, ``lora/r=4``,
``full/lr=3e-5``. The historical names stay: ``usaf-norigl`` = ``usaf/rigl=0``, ``lora-r8`` =
``lora/r=8``, ``lora-r16-experts`` = ``lora/r=16/attn=0``. Every option has a default (:data:`OPTIONS`; the
``lr`` defaults come from the settings ``lr_usaf``, ``lr_lora``, ...).

Scope is asserted, not assumed: :func:`expected_trainable` computes a method's trainable count from the
model's shapes and the chosen layers alone, and :func:`check_scope` fails the worker when the live count
differs or a trainable tensor lies outside the chosen layers. (PEFT's ``layers_to_transform`` is silently
ignored for ``target_parameters``; LoRA's expert targets are therefore spelled out per layer.)
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import usaf

from ..config import UsafConfig
from ..engine.checkpointing import enable_checkpointing
from ..engine.discover import moe_site
from ..engine.experts import UsafExperts
from ..engine.families import family_for
from ..engine.linear import shared_expert_linears
from ..engine.loss import lm_loss, token_weighted_loss
from ..engine.model import decoder_layers, parse_layers
from ..engine.optim import lr_lambda
from ..engine.rigl import RESELECTABLE, drop_fraction, reselect
from ..memory.policy import use_checkpointing
from .harness import rss_mb

# name -> {option: default}; None = the setting named in SETTING_DEFAULTS
OPTIONS: dict[str, dict[str, object]] = {
    "usaf": {"density": None, "lr": None, "router_lr": None, "wd": 0.0, "rigl": None, "rigl_frac": None,
             "rigl_batches": 1,
             "router": 1, "quant": "none", "score": UsafConfig().score, "alloc": "global", "warmup": None, "attn": None,
             "attn_lr": None, "attn_units": "column", "shared": None, "shared_lr": None, "shared_units": "column",
             "ckpt": "auto", "dtype": None, "beta1": 0.9, "beta2": 0.999},
    "router": {"lr": None, "warmup": None, "dtype": None},
    "lora": {"r": 8, "alpha": 0, "lr": None, "attn": 1, "shared": 0, "warmup": None, "dtype": None},
    "full": {"lr": None, "warmup": None},
    "esft": {"lr": None, "top_p": 0.2, "warmup": None},
}
SETTING_DEFAULTS = {("usaf", "density"): "density", ("usaf", "lr"): "lr_usaf", ("usaf", "router_lr"): "lr_router",
                    ("usaf", "rigl"): "reselect", ("usaf", "rigl_frac"): "reselect_fraction",
                    ("usaf", "attn"): "attention_density", ("usaf", "attn_lr"): "lr_attention",
                    ("usaf", "shared"): "shared_density", ("usaf", "shared_lr"): "lr_shared",
                    ("router", "lr"): "lr_router", ("lora", "lr"): "lr_lora", ("full", "lr"): "lr_full",
                    ("esft", "lr"): "lr_esft", ("usaf", "dtype"): "dtype", ("router", "dtype"): "dtype",
                    ("lora", "dtype"): "dtype"}
ALIASES = {"usaf-norigl": "usaf/rigl=0", "lora-r8": "lora/r=8", "lora-r16": "lora/r=16",
           "lora-r16-experts": "lora/r=16/attn=0"}
DEFAULT_METHODS = ("usaf", "usaf-norigl", "router", "lora-r8", "lora-r16", "full", "esft")


class ScopeError(AssertionError):
    """A method trains something else than it claims (count or layers)."""


@dataclass
class Method:
    spec: str  # as given (the name in reports)
    name: str  # usaf | router | lora | full | esft
    opts: dict = field(default_factory=dict)


def parse_method(spec: str, settings: dict) -> Method:
    """``name[/key=value...]`` (or an alias) -> :class:`Method` with every option resolved."""
    full = ALIASES.get(spec, spec)
    name, *pairs = full.split("/")
    if name not in OPTIONS:
        raise ValueError(f"unknown method {spec!r} (methods: {', '.join(OPTIONS)}; aliases: {', '.join(ALIASES)})")
    opts = dict(OPTIONS[name])
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in opts:
            raise ValueError(f"method {spec!r}: {pair!r} is not key=value with a key of {name} "
                             f"({', '.join(opts)})")
        default = opts[key] if opts[key] is not None else settings.get(SETTING_DEFAULTS.get((name, key), key))
        opts[key] = type(default)(value) if isinstance(default, (int, float)) and not isinstance(default, bool) \
            else value
    for key, value in opts.items():
        if value is None:
            opts[key] = settings[SETTING_DEFAULTS.get((name, key), key)]
    if opts.get("dtype", "bf16") not in ("bf16", "fp32"):
        raise ValueError(f"method {spec!r}: dtype must be bf16 or fp32, got {opts['dtype']!r}")
    if name == "usaf" and opts["alloc"] not in RESELECTABLE and int(opts["rigl"] or 0) > 0:
        # refused here, before any worker starts (RigL reselection keeps a global, per-layer or per-stack budget)
        raise ValueError(f"method {spec!r}: alloc={opts['alloc']} needs rigl=0 (RigL reselection keeps a global, "
                         f"per-layer or per-stack budget)")
    return Method(spec, name, opts)


# ------------------------------------------------------------------------------------------------ scope
def moe_modules(model, layers: range):
    """``[(layer index, experts module name, experts module, router module)]`` of a stock model."""
    fam = family_for(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        site = moe_site(layer, fam)
        if site is None or i not in layers:
            continue
        out.append((i, names[id(site.experts)], site.experts, site.router))
    return out


def _attention_linears(model, layers: range):
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        if i in layers:
            attn = layer.self_attn
            out += [(i, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return out


def _shared_linears(model, layers: range):
    """``[(layer index, name, nn.Linear)]``: the shared experts' linears of the chosen layers (full names)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(i, f"{names[id(layer)]}.{rel}", lin) for i, layer in enumerate(decoder_layers(model)) if i in layers
            for rel, lin in shared_expert_linears(layer)]


def expected_trainable(m: Method, model, layers: range, picked: dict | None = None) -> int:
    """The trainable count ``m`` must have on a stock ``model`` scoped to ``layers``, from shapes alone."""
    mods = moe_modules(model, layers)
    stacks = [(getattr(ex, n)) for _, _, ex, _ in mods for n in ("gate_up_proj", "down_proj")]
    routers = sum(p.numel() for _, _, _, r in mods for p in r.parameters())
    if m.name == "usaf":
        attn = int(round(m.opts["attn"] * sum(lin.weight.numel() for _, lin in _attention_linears(model, layers))))
        # whole input columns, the last one in part: exactly the budget
        shared = int(round(m.opts["shared"] * sum(lin.weight.numel() for _, _, lin in _shared_linears(model, layers))))
        return int(round(m.opts["density"] * sum(s.numel() for s in stacks))) + (routers if m.opts["router"] else 0) \
            + attn + shared
    if m.name == "router":
        return routers
    if m.name == "full":
        return sum(p.numel() for _, _, ex, _ in mods for p in ex.parameters()) + routers
    if m.name == "esft":
        return sum(len(picked.get(i, ())) * sum(p[0].numel() for p in ex.parameters()) for i, _, ex, _ in mods)
    r = m.opts["r"]  # lora: r x (in + out) per matrix, per expert for the 3-D stacks
    n = sum(r * (s.shape[1] + s.shape[2]) * s.shape[0] for s in stacks)
    if m.opts["attn"]:
        n += sum(r * (lin.in_features + lin.out_features) for _, lin in _attention_linears(model, layers))
    if m.opts["shared"]:
        n += sum(r * (lin.in_features + lin.out_features) for _, _, lin in _shared_linears(model, layers))
    return n


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_scope(m: Method, expected: int, live: int, names: list[str], layers: range) -> None:
    """Raise :class:`ScopeError` unless ``live == expected`` and every trainable tensor is in ``layers``."""
    if live != expected:
        raise ScopeError(f"{m.spec} trains {live:,} parameters, its scope says {expected:,}")
    outside = [n for n in names if (g := _LAYER.search(n)) is None or int(g.group(1)) not in layers]
    if outside:
        raise ScopeError(f"{m.spec} trains tensors outside layers {layers.start}-{layers.stop - 1}: {outside[:3]}")


def routing_shares(model, mods, batches) -> dict[int, torch.Tensor]:
    """Per trained layer, the share of routed (token, slot) assignments each expert receives (ESFT-Gate's
    criterion, with the top-k assignment as the gate)."""
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for i, _, ex, _router in mods:
        def hook(mod, args, kwargs, i=i):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            c = torch.bincount(idx.reshape(-1), minlength=mod.gate_up_proj.shape[0]).float()
            counts[i] = counts.get(i, 0) + c

        hooks.append(ex.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return {i: c / c.sum() for i, c in counts.items()}


def esft_experts(shares: dict[int, torch.Tensor], top_p: float) -> dict[int, list[int]]:
    """ESFT's rule, per layer: experts in decreasing routing share until their cumulative share reaches
    ``top_p`` (at least one)."""
    out = {}
    for i, s in shares.items():
        order = torch.argsort(s, descending=True, stable=True).tolist()
        picked, total = [], 0.0
        for e in order:
            picked.append(e)
            total += float(s[e])
            if total >= top_p:
                break
        out[i] = sorted(picked)
    return out


# ------------------------------------------------------------------------------------------------ setup
@torch.no_grad()
def resident_rss_mb(model) -> float:
    """RSS with every weight of ``model`` paged in. transformers maps a safetensors checkpoint loaded in its
    own dtype (the bf16 bed) and its pages become resident only when first read: measured right after loading,
    the first forward of training would add the weights themselves (about 240 MB on the moefy bed) to "the
    memory training adds". Reading every parameter and buffer once makes the loaded model's RSS what inference
    holds."""
    def touch(t: torch.Tensor) -> None:  # one element per 4 KiB page: no copy of the tensor
        if t.numel() and not t.is_meta:
            t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].double().sum()

    for t in list(model.parameters()) + list(model.buffers()):
        touch(t)
    for mod in model.modules():  # usaf's frozen stacks live outside the parameters
        if isinstance(mod, UsafExperts):
            for st in mod.frozen.values():
                for t in st.tensors().values():
                    touch(t)
    return rss_mb()


@dataclass
class Setup:
    model: object
    trainable: int
    step: object  # batch -> loss (float)
    info: dict
    ship: object  # () -> bytes of what the method ships
    handle: object = None  # usaf methods: the prepared model (its deltas), for analysis scripts


def _file_bytes(tensors: dict) -> int:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
        return p.stat().st_size


def _schedule(opt_groups, lr_fn):
    base = [g["lr"] for g in opt_groups]

    def apply(k: int) -> None:
        for g, lr in zip(opt_groups, base):
            g["lr"] = lr * lr_fn(k)

    return apply


def setup_method(m: Method, cfg: dict, model_dir: str, data: dict) -> Setup:
    """Load the model for ``m``, make exactly its scope trainable (asserted) and return its training step."""
    fp32 = m.name in ("full", "esft") or m.opts.get("dtype") == "fp32"  # the bench's dtype setting, or per method
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if fp32 else torch.bfloat16)
    model.config.use_cache = False
    loaded = resident_rss_mb(model)  # the loaded model, before anything of the method
    layers = parse_layers(cfg["layers"], len(decoder_layers(model)))
    total = cfg["steps"]
    lr_fn = lr_lambda(int(m.opts["warmup"] * total), total)
    info: dict = {"dtype": "fp32" if fp32 else "bf16", "options": dict(m.opts), "loaded_rss_mb": round(loaded, 1)}
    if m.name in ("usaf", "router"):
        return _setup_usaf(m, cfg, model, layers, data, lr_fn, info)
    mods = moe_modules(model, layers)
    picked = None
    expected = None if m.name == "esft" else expected_trainable(m, model, layers)  # the stock shapes
    if m.name == "lora":
        model, params, ship = _setup_lora(m, model, layers, mods)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if m.name == "full":
            for _i, _name, ex, router in mods:
                for p in list(ex.parameters()) + list(router.parameters()):
                    p.requires_grad_(True)
        else:  # esft
            picked = esft_experts(routing_shares(model, mods, data["calib"]), m.opts["top_p"])
            info["experts"] = {i: e for i, e in picked.items()}
            for i, _name, ex, _router in mods:
                rows = torch.zeros(ex.gate_up_proj.shape[0], dtype=torch.bool)
                rows[picked[i]] = True
                for p in ex.parameters():
                    p.requires_grad_(True)
                    mask = rows.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
                    p.register_hook(lambda g, mask=mask: g * mask)
        params = [p for p in model.parameters() if p.requires_grad]

        def ship() -> int:
            out = {}
            for n, p in model.named_parameters():
                if p.requires_grad:
                    li = int(_LAYER.search(n).group(1))
                    out[n] = (p.detach()[picked[li]] if picked is not None and p.dim() >= 1 and ".experts." in n
                              else p.detach()).to(torch.bfloat16)
            return _file_bytes(out)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if m.name == "esft":
        live = sum(len(picked[int(_LAYER.search(n).group(1))]) * p[0].numel()
                   for n, p in model.named_parameters() if p.requires_grad)
        expected = expected_trainable(m, model, layers, picked)
    else:
        live = sum(p.numel() for p in params)
    check_scope(m, expected, live, names, layers)
    opt = torch.optim.AdamW(params, lr=m.opts["lr"], weight_decay=0.0)
    sched = _schedule(opt.param_groups, lr_fn)
    state = {"step": 0}

    def step(b):
        sched(state["step"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s, n = token_weighted_loss(logits, b["labels"])
        loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return float(loss.detach())

    model.train()
    return Setup(model, live, step, info, ship)


def _setup_lora(m: Method, model, layers: range, mods):
    from peft import LoraConfig, get_peft_model

    r = m.opts["r"]
    # Full names: PEFT matches target_parameters by suffix and ignores layers_to_transform for them.
    targets = [f"{name}.{n}" for _, name, _, _ in mods for n in ("gate_up_proj", "down_proj")]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"] if m.opts["attn"] else []
    # the shared experts' linears, spelled per layer (full names: only the chosen layers' match)
    shared = [name for _, name, _ in _shared_linears(model, layers)] if m.opts["shared"] else []
    if m.opts["shared"] and not shared:
        raise ValueError(f"{m.spec}: the model has no nn.Linear shared experts in the chosen layers")
    lcfg = LoraConfig(r=r, lora_alpha=m.opts["alpha"] or 2 * r, lora_dropout=0.0, target_modules=attn + shared,
                      target_parameters=targets, layers_to_transform=list(layers) if attn else None)
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def ship() -> int:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))

    return model, params, ship


def _setup_usaf(m: Method, cfg: dict, model, layers: range, data: dict, lr_fn, info: dict) -> Setup:
    o = m.opts
    router_only = m.name == "router"
    ucfg = usaf.UsafConfig(density=o.get("density", cfg["density"]), quant=o.get("quant", "none"),
                           train_layers=f"{layers.start}-{layers.stop - 1}", train_router=bool(o.get("router", 1)),
                           score=o.get("score", UsafConfig().score), allocation=o.get("alloc", "global"),
                           attention_density=0.0 if router_only else o["attn"],
                           attention_units=o.get("attn_units", "element"),
                           shared_density=0.0 if router_only else o["shared"],
                           shared_units=o.get("shared_units", "column"))
    expected = expected_trainable(m, model, layers)  # from the stock shapes, before prepare swaps the experts
    handle = usaf.prepare(model, ucfg)
    info["loaded_rss_mb"] = round(resident_rss_mb(model), 1)  # the prepared model (its 4-bit base, when quant=4bit)
    # activation checkpointing decided as usaf train decides it (--checkpointing auto: the memory plan)
    info["checkpointing"] = use_checkpointing(handle, o.get("ckpt", "auto"), cfg["batch"], cfg["seq"])
    if info["checkpointing"]:
        enable_checkpointing(handle)

    def loss_of(mod, b):  # usaf's training loss: chunked LM head, the same value as the others'
        s, n = lm_loss(mod, b, "cpu")
        return s / n.clamp(min=1)

    if not router_only:  # router only: no selection, so no delta is active
        t0 = time.perf_counter()
        rep = usaf.select(handle, data["calib"], loss_fn=loss_of)
        info["selection_s"] = round(time.perf_counter() - t0, 2)
        info["active"] = rep["active"]
    opt = usaf.UsafOptimizer(handle, lr=o.get("lr", 0.0) if not router_only else 0.0,
                             router_lr=o["lr"] if router_only else o["router_lr"], weight_decay=o.get("wd", 0.0),
                             attention_lr=o.get("attn_lr") or o.get("lr", 0.0),
                             shared_lr=o.get("shared_lr") or o.get("lr", 0.0),
                             betas=(float(o.get("beta1", 0.9)), float(o.get("beta2", 0.999))))
    sched = _schedule(opt.param_groups, lr_fn)
    state = {"step": 0, "reselect_s": 0.0, "recent": []}
    total, period = cfg["steps"], int(o.get("rigl", 0))
    # RigL grows by the last rigl_batches training batches: 1 = |g| of the step's batch, streamed; more = the
    # selection's score (|Σg| by default) over them, exact (calibration pass and replay)
    n_recent = max(1, int(o.get("rigl_batches", 1)))
    # training mode, as `usaf train`'s loop sets it: from_pretrained returns the model in eval mode, and
    # transformers checkpoints a layer only in training mode (without this, checkpointing was silently off)
    model.train()

    def step(b):
        k = state["step"]
        sched(k)
        loss = loss_of(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        state["step"] = k + 1
        state["recent"] = (state["recent"] + [b])[-n_recent:]
        if period and state["step"] % period == 0 and state["step"] < total:
            r = reselect(handle, opt, list(state["recent"]), drop_fraction(state["step"], total, o["rigl_frac"]),
                         loss_fn=loss_of, exact=n_recent > 1)
            state["reselect_s"] += r["seconds"]
        return float(loss.detach())

    routers = handle.router_parameters()
    live = (0 if router_only else handle.active()) + sum(p.numel() for p in routers.values())
    names = list(routers) + ([] if router_only else [k for k, d in handle.sparse_deltas().items() if len(d)])
    check_scope(m, expected, live, names, layers)

    def ship() -> int:
        info["reselection_s"] = round(state["reselect_s"], 2)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "delta.safetensors"
            handle.save_delta(p)
            return p.stat().st_size

    return Setup(model, live, step, info, ship, handle)

