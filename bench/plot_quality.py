"""Pareto plots of `usaf bench quality` JSON files: held-out in-domain perplexity against trainable parameters
and against the training loop's peak RSS, one figure per (bed, task), usaf and LoRA as lines.

Each point is the best learning rate of its grid (the method spec without its ``lr=``): every method is tuned
on the same grid and reported at its best, as docs/quality.md says.

    python bench/plot_quality.py docs/results/s5/*.json --out docs/quality_pareto.png   # also prints the tables
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(paths: list[str]) -> dict:
    """``{(bed, task): {"base": rec, "rows": {key: best rec}}}`` with ``key`` the spec without ``lr=`` (plain
    ``usaf`` as ``usaf/density=D``, its density from the record's options)."""
    out: dict = defaultdict(lambda: {"base": None, "rows": {}})
    for p in paths:
        doc = json.load(open(p))
        beds = doc.get("beds") or {doc["settings"].get("bed", "upcycle"): doc["tasks"]}
        for bed, tasks in beds.items():
            for task, res in tasks.items():
                slot = out[(bed, task)]
                slot["base"] = slot["base"] or res["base"]
                for r in res["results"]:
                    if "error" in r:
                        continue
                    key = re.sub(r"/lr=[^/]+", "", r["method"])
                    density = r.get("options", {}).get("density")
                    if key == "usaf" and density is not None:  # the default density: a point of the density line
                        key = f"usaf/density={density:g}"
                    best = slot["rows"].get(key)
                    if best is None or r["ppl_domain"] < best["ppl_domain"]:
                        slot["rows"][key] = r
    return out


def family(key: str) -> str | None:
    name = key.split("/")[0]
    if name == "usaf" and re.fullmatch(r"usaf/density=[0-9.e-]+", key):
        return "usaf"
    if name == "usaf" and re.fullmatch(r"usaf/shared=[0-9.e-]+", key):
        return "usaf (+ shared experts, by shared density)"
    if name == "lora" and re.fullmatch(r"lora/r=\d+", key):
        return "LoRA (experts + attention)"
    if name == "lora" and re.fullmatch(r"lora/r=\d+/shared=1", key):
        return "LoRA (experts + attention + shared experts)"
    if name == "lora" and re.fullmatch(r"lora/r=\d+/attn=0", key):
        return "LoRA (experts only)"
    return None


def plot(data: dict, out: str) -> None:
    keys = sorted(data)
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.6 * len(keys)), squeeze=False)
    for row, (bed, task) in enumerate(keys):
        slot = data[(bed, task)]
        lines = defaultdict(list)
        for key, r in slot["rows"].items():
            fam = family(key)
            if fam:
                lines[fam].append(r)
        for col, (field, label, log) in enumerate([("trainable_params", "trainable parameters", True),
                                                   ("steps_peak_rss_mb", "training-loop peak RSS (MB)", False)]):
            ax = axes[row][col]
            for fam, rs in sorted(lines.items()):
                rs = sorted((r for r in rs if r.get(field)), key=lambda r: r[field])
                ax.plot([r[field] for r in rs], [r["ppl_domain"] for r in rs], "o-", label=fam)
            if slot["base"]:
                ax.axhline(slot["base"]["ppl_domain"], color="gray", ls=":", label="base (before)")
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out in-domain ppl")
            ax.set_title(f"bed {bed}, task {task}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def tables(data: dict) -> str:
    """Markdown, one table per (bed, task): each point at its best learning rate."""
    out = []
    for (bed, task), slot in sorted(data.items()):
        b = slot["base"]
        out.append(f"**bed {bed}, task {task}** (base: in-domain {b['ppl_domain']:.3f}, general {b['ppl_general']:.3f})\n")
        out.append("| method | best lr | in-domain ppl | general ppl (change) | trainable | train-loop peak MB | "
                   "added MB | tokens/s | shipped MB |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for key, r in sorted(slot["rows"].items(), key=lambda kv: (kv[0].split("/")[0], kv[1]["trainable_params"])):
            lr = re.search(r"/lr=([^/]+)", r["method"])
            lr = lr.group(1) if lr else f"{r.get('options', {}).get('lr', 0):g} (default)"
            out.append(f"| {key} | {lr} | {r['ppl_domain']:.3f} | {r['ppl_general']:.3f} "
                       f"({r['ppl_general'] - b['ppl_general']:+.2f}) | {r['trainable_params']:,} | "
                       f"{r.get('steps_peak_rss_mb') or 0:.0f} | {r.get('train_added_mb') or 0:.0f} | "
                       f"{r['tokens_per_s']:.0f} | {r['shipped_bytes'] / 1e6:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    data = points(a.json)
    plot(data, a.out)
    print(tables(data))


if __name__ == "__main__":
    main()
