"""Where the memory a quality-bench training loop adds goes: RSS and glibc's heap step by step.

Sets up one method of `usaf bench quality` in this process exactly as its worker does (the same settings, data
and setup), then runs the training steps with a 2 ms RSS sampler and prints, per step, RSS at its start, its
peak and its end, and glibc's heap (``mallinfo2``: bytes in use, free bytes kept in the heap, mapped bytes).
``--mmap-kib N`` sets glibc's mmap and trim thresholds to N KiB before usaf is imported (as
``USAF_MALLOC_THRESHOLD_KIB=N`` does; usaf's default is 1 MiB, ``usaf.runtime``): allocations of N KiB or more are
then mapped afresh and returned when freed.

    python bench/step_memory.py moefy chat --steps 20 [--mmap-kib 256] [--method usaf] [--json FILE]

The "added" figure is the bench's: the steps' peak RSS minus the RSS of the prepared model (every weight paged in).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bed")
    ap.add_argument("task")
    ap.add_argument("--method", default="usaf")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mmap-kib", type=int, default=0, help="glibc's mmap and trim thresholds in KiB (0: usaf's)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.mmap_kib:  # read by usaf.runtime when usaf is imported (below), as in the bench's worker
        os.environ["USAF_MALLOC_THRESHOLD_KIB"] = str(a.mmap_kib)

    import torch

    from usaf.bench.beds import bed_model
    from usaf.bench.methods import parse_method, setup_method
    from usaf.bench.quality import ensure_inputs, load_task, parse_settings, task_files
    from usaf.load.hf import load_tokenizer
    from usaf.memory.meter import malloc_info
    from usaf.memory.meter import rss_mb as rss

    def heap() -> dict:
        m = malloc_info()
        names = {"in_use": "heap_used_mb", "free": "heap_free_mb", "mapped": "mapped_mb"}
        return {names[k]: round(v / 2**20, 1) for k, v in m.items()}

    peak, going = [0.0], [True]

    def sample() -> None:
        while going[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    cfg = parse_settings([f"bed={a.bed}", f"task={a.task}", f"methods={a.method}"])
    work = Path(tempfile.mkdtemp(prefix="usaf-step-memory-"))
    ensure_inputs(cfg, work)
    run = dict(cfg, bed_name=a.bed, model_dir=str(bed_model(a.bed)))
    tok = load_tokenizer(run["model_dir"])
    data = load_task(run, a.task, tok, task_files(a.task, Path(run["data_dir"])))
    torch.manual_seed(cfg["seed"])
    st = setup_method(parse_method(a.method, run), run, run["model_dir"], data)
    loaded = st.info["loaded_rss_mb"]
    doc = {"bed": a.bed, "task": a.task, "method": a.method, "mmap_kib": a.mmap_kib or 1024,
           "loaded_rss_mb": loaded, "setup_peak_rss_mb": round(peak[0], 1),
           "after_setup": dict(rss_mb=round(rss(), 1), **heap()), "steps": []}
    print(f"loaded {loaded:.0f} MB, after setup {rss():.0f} MB (setup peak {peak[0]:.0f}), heap {heap()}")
    t0 = time.perf_counter()
    top = 0.0
    for i, b in enumerate(data["train"][: a.steps]):
        start = peak[0] = rss()
        st.step(b)
        top = max(top, peak[0])
        row = dict(step=i, start_mb=round(start, 1), peak_mb=round(peak[0], 1), end_mb=round(rss(), 1), **heap())
        doc["steps"].append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    going[0] = False
    doc.update(steps_s=round(time.perf_counter() - t0, 1), steps_peak_rss_mb=round(top, 1),
               added_mb=round(top - loaded, 1))
    print(f"{a.steps} steps in {doc['steps_s']} s; steps peak {top:.0f} MB; added {top - loaded:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
