"""Where the selection puts the budget of active elements: per layer, per stack, per input column and row.

Runs the selection of one usaf method of ``usaf bench quality`` (its data and settings; ``--quick`` size with
the given overrides) in this process, without training, and prints for each trainable layer and stack: the
active count, how many input columns and output rows hold any, and the share held by the top 5 columns, the
top 10% of columns and the top 10% of rows (a JSON line each).

    python bench/budget_spread.py BED TASK [METHOD] [key=value ...]
    python bench/budget_spread.py upcycle chat usaf/rigl=0 calib=4 layers=top:8 seq=256
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from usaf.bench.beds import bed_model
from usaf.bench.methods import parse_method, setup_method
from usaf.bench.quality import ensure_inputs, load_task, parse_settings, task_files
from usaf.load.hf import load_tokenizer


def spread(handle) -> list[dict]:
    out = []
    for m in handle.trainable_layers:
        for n in m.experts.names:
            idx = m.experts.deltas[n].indices.long()
            e, r, c = m.experts.shape(n)
            cols = torch.bincount(idx % c, minlength=c).float()
            rows = torch.bincount((idx // c) % r, minlength=r).float()
            total = max(1.0, float(cols.sum()))
            top_c, top_r = cols.sort(descending=True).values, rows.sort(descending=True).values
            out.append({"layer": m.index, "stack": n, "shape": [e, r, c], "active": int(idx.numel()),
                        "columns_used": int((cols > 0).sum()), "rows_used": int((rows > 0).sum()),
                        "top5_columns_share": round(float(top_c[:5].sum()) / total, 3),
                        "top10pct_columns_share": round(float(top_c[: max(1, c // 10)].sum()) / total, 3),
                        "top10pct_rows_share": round(float(top_r[: max(1, r // 10)].sum()) / total, 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bed")
    ap.add_argument("task")
    ap.add_argument("method", nargs="?", default="usaf/rigl=0")
    ap.add_argument("extra", nargs="*", help="bench settings (key=value) over the --quick ones")
    a = ap.parse_args()
    cfg = parse_settings([f"bed={a.bed}", *a.extra], quick=True)
    cfg.pop("method_list")
    with tempfile.TemporaryDirectory() as w:
        ensure_inputs(cfg, Path(w))
        run = dict(cfg, bed_name=a.bed, model_dir=str(bed_model(a.bed)))
        data = load_task(run, a.task, load_tokenizer(run["model_dir"]), task_files(a.task, Path(run["data_dir"])))
        st = setup_method(parse_method(a.method, run), run, run["model_dir"], data)
        for row in spread(st.handle):
            print(json.dumps(row))  # one JSON line per layer and stack


if __name__ == "__main__":
    main()
