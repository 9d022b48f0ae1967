"""How far the trained deltas move the weights, and what scaling them after training does.

Trains one usaf method of ``usaf bench quality`` (the same data, settings and steps as the bench) in this
process, then reports the deltas' magnitudes against the base weights they change (per stack kind) and the
held-out in-domain and general perplexities with every trained delta multiplied by each scale ``s``
(``s = 1``: the bench's own figures; ``s < 1``: the delta pulled toward the base after training).

    python bench/delta_scale.py BED TASK METHOD [SCALES] [--json OUT]
    python bench/delta_scale.py upcycle chat usaf 1,0.75,0.5 --json docs/results/s15/up_chat_delta_scale.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from usaf.bench.beds import bed_model
from usaf.bench.methods import parse_method, setup_method
from usaf.bench.quality import _evaluate, ensure_inputs, load_task, parse_settings, task_files
from usaf.load.hf import load_tokenizer


def magnitudes(handle, model_dir: str) -> dict:
    """Per stack kind: active elements, RMS of the deltas, RMS of the whole base stacks (weighted like the
    deltas), the share of deltas larger than the base weight they change, and the largest |delta|."""
    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = dict(stock.named_parameters())
    acc: dict[str, list[float]] = {}
    for key, d in handle.sparse_deltas().items():
        if not len(d) or key not in base:
            continue
        w = base[key].detach()
        v = d.values.detach().float()
        sel = w.reshape(-1)[d.indices.long()]
        kind = "shared" if "shared" in key else key.rsplit(".", 1)[-1]
        a = acc.setdefault(kind, [0, 0.0, 0.0, 0.0, 0.0])
        a[0] += len(d)
        a[1] += float(v.square().sum())
        a[2] += float(w.square().mean()) * len(d)
        a[3] += float((v.abs() > sel.abs()).sum())
        a[4] = max(a[4], float(v.abs().max()))
    return {k: {"active": int(a[0]), "rms_delta": round((a[1] / a[0]) ** 0.5, 5),
                "rms_base_stack": round((a[2] / a[0]) ** 0.5, 5), "share_delta_above_weight": round(a[3] / a[0], 4),
                "max_delta": round(a[4], 5)} for k, a in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bed")
    ap.add_argument("task")
    ap.add_argument("method")
    ap.add_argument("scales", nargs="?", default="1,0.75,0.5")
    ap.add_argument("--json")
    a = ap.parse_args()
    cfg = parse_settings([f"bed={a.bed}", f"task={a.task}"])
    ensure_inputs(cfg, Path(tempfile.mkdtemp(prefix="usaf-delta-scale-")))
    cfg["model_dir"], cfg["bed_name"] = str(bed_model(a.bed)), a.bed
    torch.manual_seed(cfg["seed"])
    data = load_task(cfg, a.task, load_tokenizer(cfg["model_dir"]), task_files(a.task, Path(cfg["data_dir"])))
    st = setup_method(parse_method(a.method, cfg), cfg, cfg["model_dir"], data)
    t0 = time.perf_counter()
    for b in data["train"]:
        st.step(b)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    res = {"bed": a.bed, "task": a.task, "method": a.method, "magnitudes": magnitudes(st.handle, cfg["model_dir"]),
           "evals": {}}
    print(json.dumps(res["magnitudes"], indent=1))
    trained = {k: d.values.detach().clone() for k, d in st.handle.sparse_deltas().items()}
    st.model.eval()
    for s in (float(x) for x in a.scales.split(",")):
        with torch.no_grad():
            for k, d in st.handle.sparse_deltas().items():
                d.values.copy_(trained[k] * s)
        res["evals"][str(s)] = _evaluate(st.model, data)
        print(f"scale {s}: {res['evals'][str(s)]}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
