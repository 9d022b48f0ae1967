"""``usaf plan``: predict the peak memory of inference and of one training step, and where each part goes.

Reads ``config.json`` only (the model is built on the meta device, like ``usaf inspect``), so it works for a
model that is not downloaded. For both INFERENCE (a no-grad forward of ``batch x seq`` with the loss, as
``usaf eval`` runs it) and TRAINING (one step: forward + backward through the trainable layers, then the
optimizer step; plus the importance-scoring phase of selection/reselection), it predicts the peak bytes on
the *device* tier (the accelerator; host RAM with ``--device cpu``) and on the *host* tier, with a greedy
placement of every part on device, host or disk under the given budgets. When something does not fit it
says so and re-runs the predictor on candidate settings (fewer ``--train-layers``, shorter ``--seq-len``,
...) to report the first that fits. The model, formulas and assumptions are in ``docs/plan.md``.

Layout: ``counts`` (what a config holds) -> ``sizes`` (the byte formulas) -> ``phase`` (one phase placed and
summed) -> this module (:func:`predict`, and the suggestions when it does not fit) -> ``report`` (the text).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import psutil

from ..load.gguf.model import gguf_expert_bits, is_gguf
from ..units import fmt_bytes, parse_memory
from .counts import ModelCounts, count_model
from .phase import phase
from .sizes import Settings, check_settings, train_range
from .stages import expert_tier, stages


# ------------------------------------------------------------------------------------------------ predict
def _host_default() -> int:

    return int(psutil.virtual_memory().total)


def _evaluate(mc: ModelCounts, s: Settings) -> dict:
    train = phase(mc, s, train=True)
    infer = phase(mc, s, train=False)
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
    rng, _ = train_range(s.train_layers, mc.num_layers)
    layer_opts = [f"top:{n}" for n in _halvings(len(rng), 1)]
    seq_opts = _halvings(s.seq_len, 64)
    out: list[Settings] = []
    if s.quant not in ("4bit", "gguf"):  # a GGUF's experts stay in the file's types
        out.append(replace(s, quant="4bit"))
    base = replace(s, quant=s.quant if s.quant == "gguf" else "4bit", batch_size=1)
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
    score_budget_mb: int = 64,
    score_dtype: str = "bf16",
    calib_batches: int = 16,
    attention_density: float = 0.0,
    shared_density: float = 0.1,
    suggest: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Predict peak memory and placement of inference and of one training step.

    Args:
        config: a transformers config, a config dict (``model_type`` + fields), a ``config.json`` path or a
            checkpoint directory.
        seq_len, batch_size: tokens per sequence and sequences per micro-batch.
        density: fraction of the trainable layers' expert weights that train.
        attention_density: fraction of their attention projection weights that train (sparse deltas too).
        shared_density: fraction of their shared experts' linear weights that train (sparse deltas too).
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
        group_size, score_budget_mb, score_dtype: ``UsafConfig`` fields of the same names.
        calib_batches: micro-batches the initial selection records (``usaf train --calib-batches``).
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
    expert_bits = 0.0
    if isinstance(config, (str, os.PathLike)) and is_gguf(config):  # the file's own types, not --quant
        quant, expert_bits = "gguf", gguf_expert_bits(config)
    s = Settings(
        expert_bits=expert_bits,
        seq_len=int(seq_len),
        batch_size=int(batch_size),
        density=float(density),
        attention_density=float(attention_density),
        shared_density=float(shared_density),
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
        calib_batches=int(calib_batches),
    )
    check_settings(s)
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
    tier = expert_tier(mc, s)
    out["stages"] = {"expert_tier": tier, **stages(mc, s, tier)}
    for k in ("load_first", "load_cached", "prefix", "export_delta"):
        out[f"{k}_peak_host_bytes"] = out["stages"][k]["peak_bytes"]
    out["settings"]["attn"] = s.attn or mc.attn
    if suggest and not res["fits"]:
        sug = _suggest(mc, s, res)
        out["suggestion"] = sug["first_fit"]
        out["suggestions"] = sug["lines"]
        out["min_budget_bytes"] = sug["min_budget_bytes"]
    return out
