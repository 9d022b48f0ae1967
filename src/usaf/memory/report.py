"""The human-readable report of ``usaf plan`` (a :func:`usaf.memory.plan.predict` result)."""

from __future__ import annotations

import json

from ..units import fmt_bytes
from .phase import WHEN


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


# ------------------------------------------------------------------------------------------------ output
def format_plan(r: dict) -> str:
    """The human-readable report of a :func:`predict` result."""
    m, s, pc = r["model"], r["settings"], r["model"]["params"]
    cpu = s["device"] == "cpu"
    dev_name = "host RAM" if cpu else "device"
    train, infer = r["train"], r["infer"]
    lines = [
        f"model       {m['name']} ({m['model_type']}): {m['num_layers']} layers ({m['moe_layers']} MoE), "
        f"{m['num_experts']} experts, top-{m['top_k']}, attention {m['attn']}",
        f"parameters  {_fmt_count(pc['total'])} total, {_fmt_count(pc['active'])} active per token",
        f"            experts {_fmt_count(pc['experts'])}, routers {_fmt_count(pc['routers'])}, "
        f"shared experts {_fmt_count(pc['shared_experts'])}, "
        f"attention/dense {_fmt_count(pc['attention_dense'])}, "
        f"embeddings {_fmt_count(pc['embeddings'])}, lm_head "
        + ("tied" if m["tied_embeddings"] else _fmt_count(pc["lm_head"])),
        f"settings    train layers {train['train_layers'][0]}-{train['train_layers'][1]} "
        f"({s['train_layers']}), seq {s['seq_len']} x batch {s['batch_size']}, density {s['density']:g} "
        f"({_fmt_count(train['active_elements'])} active),",
        f"            {s['quant']} experts, {s['dtype']}, "
        f"checkpointing {train['checkpointing']}{' (auto)' if s['checkpointing'] == 'auto' else ''}, "
        f"{'prefix cache' if s['prefix_cache'] else 'no prefix cache'}, chunk {s['chunk_mb']} MB",
        "budgets     "
        + (
            f"host RAM {fmt_bytes(s['host_memory'])} (--device cpu)"
            if cpu
            else f"device {fmt_bytes(s['device_memory'])}, host {fmt_bytes(s['host_memory'])}"
        ),
        "",
        f"{'peak':<24}{'training step':>16}{'selection':>16}{'inference':>16}",
    ]
    sel = train["select"]
    if cpu:
        lines.append(
            f"{'host RAM':<24}{fmt_bytes(train['peak_device_bytes']):>16}"
            f"{fmt_bytes(sel['peak_device_bytes']):>16}{fmt_bytes(infer['peak_device_bytes']):>16}"
        )
    else:
        lines.append(
            f"{'device':<24}{fmt_bytes(train['peak_device_bytes']):>16}"
            f"{fmt_bytes(sel['peak_device_bytes']):>16}{fmt_bytes(infer['peak_device_bytes']):>16}"
        )
        lines.append(
            f"{'host':<24}{fmt_bytes(train['peak_host_bytes']):>16}"
            f"{fmt_bytes(sel['peak_host_bytes']):>16}{fmt_bytes(infer['peak_host_bytes']):>16}"
        )
    lines.append(
        f"{'disk (mmap / cache)':<24}{fmt_bytes(train['disk_bytes']):>16}{'':>16}"
        f"{fmt_bytes(infer['disk_bytes']):>16}"
    )

    def ok(f: bool) -> str:
        return "fits" if f else "DOES NOT FIT"

    lines.append(f"{'':<24}{ok(train['step_fits']):>16}{ok(sel['fits']):>16}{ok(infer['fits']):>16}")
    st = r.get("stages")
    if st:
        names = (("load (1st run)", "load_first"), ("load (cached)", "load_cached"), ("prefix build", "prefix"),
                 ("export delta", "export_delta"))
        lines += ["", "".join(f"{n:>16}" for n, _ in names).rjust(24 + 16 * len(names)),
                  f"{'host RAM':<24}" + "".join(f"{fmt_bytes(st[k]['peak_bytes']):>16}" for _, k in names),
                  f"            (around the steps: frozen experts on the {st['expert_tier']} tier)"]
    for title, ph in (("training step", train), ("inference", infer)):
        lines += ["", f"{title}: where each part goes"]
        for part in ph["breakdown"]:
            tier = dev_name if part["tier"] == "device" else part["tier"]
            when = WHEN.get(part["kind"], "")
            lines.append(f"  {part['item'][:64]:<66}{fmt_bytes(part['bytes']):>12}  {tier}{when}")
        for note in ph["notes"]:
            lines.append(f"  note: {note}")
    lines.append("")
    if r["fits"]:
        lines.append("verdict     fits: training, selection and inference stay within the budgets")
    else:
        problems = [f"training: {x}" for x in train["problems"]] + [
            f"inference: {x}" for x in infer["problems"]
        ]
        lines.append("verdict     DOES NOT FIT")
        lines += [f"  - {x}" for x in problems]
        for x in r.get("suggestions", []):
            lines.append(f"  try: {x}")
    return "\n".join(lines)


def json_safe(r: dict) -> dict:
    return json.loads(json.dumps(r, default=str))
