"""``usaf report RUN``: what a run did, as one self-contained ``report.html`` (``usaf train`` writes it at the end).

Read from the run directory: ``log.jsonl`` (loss, lr, tokens/s, memory, eval, RigL churn per step),
``metrics.json`` (eval perplexity before / after, totals), ``config.yaml``, ``router_load.json`` (tokens per
expert in the eval passes before and after training) and ``delta.safetensors`` (where the active budget went:
its sorted flat indices into each ``[E, R, C]`` stack, counted per layer x expert and per matrix). Any part
that is missing (an older run, a Trainer run without eval) is shown as "not recorded". Rendering:
``report_html``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ..engine.families import interleaved_of, transposed_of
from ..io import atomic_write_text
from .report_html import render

# Stacks that hold only up or only gate rows (by their parameter's name): nemotron_h's up_proj (no gate),
# dbrx's v1 and w1; gate_up_proj is split by rows, anything else is down.
_UP, _GATE = ("up_proj", "v1"), ("w1",)


def write_report(run_dir, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: into the run directory); returns its path.

    Raises:
        ValueError: ``run_dir`` is not a directory holding a usaf run (no ``log.jsonl``, no delta file).
    """
    html = render(read_run(run_dir))
    path = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_text(path, html)
    return path


def read_run(run_dir) -> dict:
    """Everything the report shows, as plain Python data."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory")
    log_path, delta_path = d / "log.jsonl", d / "delta.safetensors"
    if not log_path.is_file() and not delta_path.is_file():
        raise ValueError(f"{d} holds no usaf run (no log.jsonl or delta.safetensors)")
    return {
        "name": d.resolve().name,
        "log": _read_log(log_path),
        "metrics": _read_json(d / "metrics.json") or {},
        "config": _read_yaml(d / "config.yaml") or {},
        "router_load": _read_json(d / "router_load.json"),
        "budget": delta_budget(delta_path) if delta_path.is_file() else None,
    }


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path):
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def delta_budget(path: Path) -> dict:
    """Active elements of a delta file per layer x expert and per matrix (gate, up, down).

    Returns ``{"layers": [l0, ...], "experts": E, "active": [[n per expert] per layer], "capacity":
    [[elements per expert] per layer], "matrix": {"gate" | "up" | "down": [n per layer]},
    "attention": active elements of attention projections, "shared": active elements of the shared experts'
    linears, "model_type": str}``.
    """
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "usaf-delta":
            raise ValueError(f"{path} is not a usaf delta file")
        shapes = json.loads(meta.get("shapes", "{}"))
        model_type = meta.get("model_type", "")
        transposed, interleaved = transposed_of(meta), interleaved_of(meta)
        per_layer: dict[int, dict] = {}
        attention = shared = 0
        for stack, shape in shapes.items():
            m = re.search(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.", stack)  # dbrx: transformer.blocks.N
            if not m or f"{stack}.indices" not in f.keys():
                continue
            layer, name = int(m.group(1)), stack.rsplit(".", 1)[1]
            if ".self_attn." in stack:  # an attention projection's delta (--attention-density): not an expert's
                attention += f.get_slice(f"{stack}.indices").get_shape()[0]
                continue
            if ".shared_expert" in stack:  # a shared expert's linear (--shared-density): not a routed expert's
                shared += f.get_slice(f"{stack}.indices").get_shape()[0]
                continue
            if name == "weight":  # jetmoe's stacks: input_linear.weight (gate then up rows), output_linear.weight
                name = {"input_linear": "gate_up_proj"}.get(stack.rsplit(".", 2)[1], name)
            e, r, c = (int(s) for s in shape)
            idx = f.get_tensor(f"{stack}.indices").long()
            row = per_layer.setdefault(layer, {"active": torch.zeros(e, dtype=torch.int64), "capacity": 0,
                                               "gate": 0, "up": 0, "down": 0})
            counts, active = torch.bincount(idx // (r * c), minlength=e), row["active"]
            n = min(len(active), len(counts))  # longcat_flash's gate_up_proj has rows for its zero experts
            row["active"] = active[:n] + counts[:n]
            row["capacity"] += r * c
            if name == "gate_up_proj":
                local = idx % (r * c)
                if transposed:  # [E, H, 2I]: gate/up along the columns
                    col = local % c
                    gate = (col % 2 == 0) if interleaved else col < c // 2
                else:  # [E, 2I, H]: gate rows, then up rows
                    gate = (local // c) < r // 2
                row["gate"] += int(gate.sum())
                row["up"] += int((~gate).sum())
            elif name in _UP:  # an up_proj without a gate (nemotron_h), dbrx's v1
                row["up"] += int(idx.numel())
            elif name in _GATE:  # dbrx's w1
                row["gate"] += int(idx.numel())
            else:
                row["down"] += int(idx.numel())
    layers = sorted(per_layer)
    experts = max((len(per_layer[k]["active"]) for k in layers), default=0)
    return {
        "layers": layers, "experts": experts, "model_type": model_type,
        "active": [per_layer[k]["active"].tolist() for k in layers],
        "capacity": [[per_layer[k]["capacity"]] * len(per_layer[k]["active"]) for k in layers],
        "matrix": {n: [per_layer[k][n] for k in layers] for n in ("gate", "up", "down")},
        "attention": attention,
        "shared": shared,
    }
