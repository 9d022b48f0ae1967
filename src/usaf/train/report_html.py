"""The run report as one self-contained HTML file: inline CSS and SVG, no script, nothing fetched.

:func:`render` takes :func:`usaf.train.report.read_run`'s data. Charts are small SVG builders (lines, bars,
heatmaps); every mark has a ``<title>`` (the browser's tooltip) with its exact value.
"""

from __future__ import annotations

import math
from html import escape

W, H = 560, 256  # chart size (px)
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 44, 40  # the legend row is at y = 32
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
# viridis at 5 stops, interpolated linearly
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1220px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-bottom:16px} .grid{display:flex;flex-wrap:wrap;gap:16px}
table{border-collapse:collapse;font-size:14px} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} .none{color:#888;font-style:italic}
svg{background:#fff;border:1px solid #eee} svg text{font-size:11px;fill:#333} .t{font-size:13px;font-weight:600}
"""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _frame(title: str, xlabel: str, ylabel: str, x0, x1, y0, y1, w=W, h=H):
    """SVG header, axes and ticks; returns (parts, sx, sy) with sx/sy mapping data to pixels."""
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - 1, y0 + 1)
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x0 + 1)
    pw, ph = w - PAD_L - PAD_R, h - PAD_T - PAD_B

    def sx(x):
        return PAD_L + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return PAD_T + ph - (y - y0) / (y1 - y0) * ph

    p = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
         f'<text class="t" x="{PAD_L}" y="16">{escape(title)}</text>',
         f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" stroke="#999"/>',
         f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" stroke="#999"/>',
         f'<text x="{PAD_L + pw / 2}" y="{h - 6}" text-anchor="middle">{escape(xlabel)}</text>',
         f'<text x="12" y="{PAD_T + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {PAD_T + ph / 2})">'
         f'{escape(ylabel)}</text>']
    for t in _ticks(y0, y1):
        p.append(f'<line x1="{PAD_L - 4}" y1="{sy(t):.1f}" x2="{PAD_L + pw}" y2="{sy(t):.1f}" stroke="#eee"/>'
                 f'<text x="{PAD_L - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(float(t))}</text>')
    return p, sx, sy


def line_chart(title: str, series: list[tuple[str, list, list]], xlabel="step", ylabel="") -> str:
    """Lines (with dots where there are few points); ``series``: (label, xs, ys)."""
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return _none(title)
    xs_all, ys_all = [x for x, _ in pts], [y for _, y in pts]
    lo, hi = min(ys_all), max(ys_all)
    margin = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    p, sx, sy = _frame(title, xlabel, ylabel, min(xs_all), max(xs_all), lo - margin, hi + margin)
    for t in _ticks(min(xs_all), max(xs_all), 8):
        p.append(f'<text x="{sx(t):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for k, (label, xs, ys) in enumerate(series):
        c = COLORS[k % len(COLORS)]
        xy = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(xy) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in xy)
            p.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{path}"/>')
        for x, y in xy if len(xy) <= 60 else []:
            p.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}">'
                     f'<title>{escape(label)} at {xlabel} {_fmt(x)}: {_fmt(y)}</title></circle>')
    return "".join(p + _legend([label for label, _, _ in series])) + "</svg>"


def bar_chart(title: str, labels: list, series: list[tuple[str, list]], xlabel="", ylabel="") -> str:
    """Grouped bars: one group per label, one bar per series."""
    vals = [v for _, vs in series for v in vs if v is not None]
    if not labels or not vals:
        return _none(title)
    top = max(max(vals), 0) or 1.0
    p, sx, sy = _frame(title, xlabel, ylabel, 0, len(labels), 0, top * 1.08)
    group = (W - PAD_L - PAD_R) / len(labels)
    bw = max(1.0, group * 0.8 / len(series))
    every = max(1, math.ceil(len(labels) / 24))
    for i, lab in enumerate(labels):
        if i % every == 0:
            p.append(f'<text x="{sx(i) + group / 2:.1f}" y="{H - PAD_B + 14}" text-anchor="middle">'
                     f'{escape(str(lab))}</text>')
        for k, (name, vs) in enumerate(series):
            v = vs[i] or 0
            x = sx(i) + group * 0.1 + k * bw
            p.append(f'<rect x="{x:.1f}" y="{sy(v):.1f}" width="{bw:.1f}" height="{sy(0) - sy(v):.1f}" '
                     f'fill="{COLORS[k % len(COLORS)]}"><title>{escape(name)}, {escape(str(lab))}: {_fmt(v)}'
                     f'</title></rect>')
    return "".join(p + (_legend([name for name, _ in series]) if len(series) > 1 else [])) + "</svg>"


def _legend(labels: list[str]) -> list[str]:
    out, x = [], PAD_L
    for k, label in enumerate(labels):
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{COLORS[k % len(COLORS)]}"/>'
                   f'<text x="{x + 14}" y="33">{escape(label)}</text>')
        x += 24 + 7 * len(label)
    return out


def _viridis(t: float) -> str:
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + (b_ - a) * f) for a, b_ in zip(_VIRIDIS[i], _VIRIDIS[i + 1]))
    return f"rgb({r},{g},{b})"


def heatmap(title: str, rows: list, cols: list, values: list[list[float]], unit: str = "",
            vmax: float | None = None) -> str:
    """Rows (layers) x columns (experts), colored by value (viridis, 0 .. max)."""
    if not rows or not cols:
        return _none(title)
    cell = max(8, min(28, 720 // max(len(cols), 1)))
    ch = max(8, min(22, 480 // max(len(rows), 1)))
    w, h = PAD_L + cell * len(cols) + 80, max(PAD_T + ch * len(rows) + PAD_B, PAD_T + 140)
    top = vmax if vmax is not None else max((v for r in values for v in r), default=0) or 1.0
    p = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
         f'<text class="t" x="{PAD_L}" y="16">{escape(title)}</text>']
    p.append(f'<text x="{PAD_L + cell * len(cols) / 2:.1f}" y="{PAD_T + ch * len(rows) + 28}" '
             f'text-anchor="middle">expert</text>')
    for i, lab in enumerate(rows):
        y = PAD_T + i * ch
        if len(rows) <= 24 or i % math.ceil(len(rows) / 24) == 0:
            p.append(f'<text x="{PAD_L - 6}" y="{y + ch / 2 + 4:.1f}" text-anchor="end">layer {escape(str(lab))}</text>')
        for j, v in enumerate(values[i]):
            p.append(f'<rect x="{PAD_L + j * cell}" y="{y}" width="{cell - 1}" height="{ch - 1}" '
                     f'fill="{_viridis(v / top)}"><title>layer {escape(str(lab))}, expert {cols[j]}: '
                     f'{_fmt(v)}{escape(unit)}</title></rect>')
    every = max(1, math.ceil(len(cols) / 32))
    for j, lab in enumerate(cols):
        if j % every == 0:
            p.append(f'<text x="{PAD_L + j * cell + cell / 2:.1f}" y="{PAD_T + ch * len(rows) + 14}" '
                     f'text-anchor="middle">{escape(str(lab))}</text>')
    x = PAD_L + cell * len(cols) + 12  # color scale
    for k in range(20):
        p.append(f'<rect x="{x}" y="{PAD_T + (19 - k) * 6}" width="12" height="6" fill="{_viridis(k / 19)}"/>')
    p.append(f'<text x="{x + 16}" y="{PAD_T + 8}">{_fmt(float(top))}{escape(unit)}</text>'
             f'<text x="{x + 16}" y="{PAD_T + 120}">0</text>')
    return "".join(p) + "</svg>"


def _none(title: str) -> str:
    return f'<div><b>{escape(title)}</b><p class="none">not recorded in this run</p></div>'


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f'<tr><th>{escape(k)}</th><td class="n">{escape(_fmt(v))}</td></tr>' for k, v in rows)
    return f"<table>{body}</table>"


def _fractions(load: dict[str, list[int]]) -> tuple[list[int], list[list[float]]]:
    layers = sorted(load, key=int)
    return [int(k) for k in layers], [[c / max(sum(load[k]), 1) for c in load[k]] for k in layers]


def render(run: dict) -> str:
    """The report page of :func:`usaf.train.report.read_run`'s data."""
    log, m, cfg = run["log"], run["metrics"], run["config"]
    steps = [r["step"] for r in log]
    u = cfg.get("usaf", {}) if isinstance(cfg.get("usaf"), dict) else {}
    sec = []
    summary = [("model", cfg.get("model")), ("steps", m.get("steps", steps[-1] if steps else None)),
               ("eval perplexity before", m.get("eval_ppl_before")), ("eval perplexity after", m.get("eval_ppl_after")),
               ("first loss", m.get("loss_first")), ("mean of the last 10 losses", m.get("loss_last10")),
               ("active elements", m.get("active_elements")), ("expert elements (trainable layers)", m.get("expert_elements")),
               ("density", u.get("density")), ("train layers", u.get("train_layers")), ("quant", u.get("quant")),
               ("tokens/s", m.get("tokens_per_s")), ("peak RSS (MB)", m.get("peak_rss_mb")),
               ("selection (s)", m.get("selection_s")), ("reselection (s)", m.get("reselection_s")),
               ("skipped steps", m.get("skipped_steps")), ("wall time (s)", m.get("wall_s"))]
    sec.append("<h2>Summary</h2>" + _table([(k, v) for k, v in summary if v is not None]))

    ev = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    loss_series = [("train loss", steps, [r.get("loss") for r in log])]
    if ev:
        loss_series.append(("eval loss", [s for s, _ in ev], [v for _, v in ev]))
    ppl = [v for v in (m.get("eval_ppl_before"), m.get("eval_ppl_after")) if v is not None]
    sec.append('<h2>Loss and learning rate</h2><div class="grid">'
               + line_chart("loss", loss_series, ylabel="loss")
               + line_chart("learning rate (deltas)", [("lr", steps, [r.get("lr") for r in log])], ylabel="lr")
               + (bar_chart("eval perplexity", ["before", "after"][: len(ppl)], [("perplexity", ppl)], ylabel="ppl")
                  if len(ppl) == 2 else _none("eval perplexity before and after")) + "</div>")

    b = run["budget"]
    if b and b["layers"]:
        cols = list(range(b["experts"]))
        dens = [[a / max(c, 1) for a, c in zip(ra, rc)] for ra, rc in zip(b["active"], b["capacity"])]
        sec.append('<h2>Where the budget went</h2><div class="grid">'
                   + heatmap("active elements per layer x expert", b["layers"], cols, b["active"])
                   + heatmap("density per layer x expert", b["layers"], cols, [[100 * v for v in r] for r in dens], "%")
                   + bar_chart("active elements per matrix", b["layers"],
                               [(n, b["matrix"][n]) for n in ("gate", "up", "down")], "layer", "active elements")
                   + "</div>")
    else:
        sec.append("<h2>Where the budget went</h2>" + _none("active budget (no delta.safetensors)"))

    rl = run["router_load"] or {}
    if rl.get("before") and rl.get("after"):
        lb, fb = _fractions(rl["before"])
        la, fa = _fractions(rl["after"])
        top = max(max(map(max, fb)), max(map(max, fa)))
        cols = list(range(len(fb[0])))
        total_b = [sum(r[j] for r in fb) / len(fb) for j in cols]
        total_a = [sum(r[j] for r in fa) / len(fa) for j in cols]
        sec.append('<h2>Router load per expert (eval tokens)</h2><div class="grid">'
                   + heatmap("share of routed tokens, before training", lb, cols, fb, vmax=top)
                   + heatmap("share of routed tokens, after training", la, cols, fa, vmax=top)
                   + bar_chart("mean share over the trainable layers", cols,
                               [("before", total_b), ("after", total_a)], "expert", "share") + "</div>")
    else:
        sec.append("<h2>Router load per expert</h2>" + _none("router load before and after"))

    rs = [(r["step"], r["reselect"]) for r in log if isinstance(r.get("reselect"), dict)]
    if rs:
        active = {r["step"]: r.get("active") for r in log}
        churn = [100 * x.get("grown", 0) / max(active.get(s) or 1, 1) for s, x in rs]
        sec.append('<h2>RigL churn</h2><div class="grid">'
                   + bar_chart("elements dropped and grown at each reselection", [s for s, _ in rs],
                               [("dropped", [x.get("dropped", 0) for _, x in rs]),
                                ("grown", [x.get("grown", 0) for _, x in rs])], "step", "elements")
                   + bar_chart("replaced, % of the active set", [s for s, _ in rs], [("churn", churn)], "step", "%")
                   + "</div>")
    else:
        sec.append("<h2>RigL churn</h2>" + _none("reselections"))

    sec.append('<h2>Speed and memory</h2><div class="grid">'
               + line_chart("tokens/s", [("tokens/s", steps, [r.get("tokens_per_s") for r in log])], ylabel="tokens/s")
               + line_chart("peak memory", [("MB", steps, [r.get("peak_mem_mb") for r in log])], ylabel="MB")
               + "</div>")
    title = f"usaf run report: {run['name']}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f'<div class="sub">{len(log)} logged steps; made by <code>usaf report</code></div>'
            + "".join(sec) + "</body></html>\n")
