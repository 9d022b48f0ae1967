"""The demo's training job alone, in a fresh process: the peak RSS (VmHWM) of each phase, reset between them.

    USAF_CACHE=DIR usaf demo --out /tmp/d           # once: prepares the upcycled checkpoint and its caches
    USAF_CACHE=DIR python bench/demo_phases.py /tmp/phases

Prints ``{"load": MB, "selection": MB, "loop+finish": MB}`` and the held-out perplexity after training. The
load phase ends when selection starts (``usaf.train.recipe.select`` is wrapped to read and reset the mark).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import usaf.train.recipe as recipe
from usaf.bench.harness import reset_peak_rss
from usaf.bench.upcycle import prepare_upcycled_smollm2
from usaf.demo import demo_config, write_demo_data


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/demo-phases")
    model_dir = str(prepare_upcycled_smollm2())
    train_p, eval_p, _ = write_demo_data(out / "data")
    cfg = demo_config(model_dir, train_p, eval_p, out / "run", quiet=True)
    marks: dict[str, float] = {}
    select = recipe.select

    def timed_select(*a, **k):
        marks["load"] = vm_hwm_mb()
        reset_peak_rss()
        rep = select(*a, **k)
        marks["selection"] = vm_hwm_mb()
        reset_peak_rss()
        return rep

    recipe.select = timed_select
    reset_peak_rss()
    metrics = recipe.train(cfg)
    marks["loop+finish"] = vm_hwm_mb()
    print(json.dumps({k: round(v) for k, v in marks.items()}), "ppl after", round(metrics["eval_ppl_after"], 3))


if __name__ == "__main__":
    main()
