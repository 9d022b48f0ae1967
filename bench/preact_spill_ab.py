"""Training steps with the lean experts' pre-activations spilled to disk against recomputed, in one process.

    python bench/preact_spill_ab.py --size mid --rounds 4 --json FILE

The model of ``usaf bench memory size=mid`` (or ``tiny``), built, selected and checkpointed as that bench
does (``usaf.bench.speed``), then ``--rounds`` rounds of three timed passes each, interleaved so that a
machine's drift hits all three alike: a training step with the spill (``usaf.engine.spill``), a training step
recomputing the pre-activations (the spill turned off), and an inference forward of the same model. Medians,
their ratio, and train ÷ forward for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import usaf
from usaf.bench import speed
from usaf.engine.checkpointing import enable_checkpointing
from usaf.engine.loss import token_mean_loss
from usaf.memory.policy import use_checkpointing
from usaf.runtime import tune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid", choices=sorted(speed.SIZES))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    tune()
    torch.set_num_threads(a.threads)
    cfg = speed.parse_extra([f"size={a.size}", "calib=1"])
    batches = speed.make_batches(cfg, 4)
    handle = speed.build_prepared(cfg, usaf.UsafConfig(density=cfg["density"], quant=cfg["quant"], train_layers="all"))
    model = handle.model
    b0 = batches[0]["input_ids"]
    checkpointing = use_checkpointing(handle, "auto", b0.shape[0], b0.shape[1])
    if checkpointing:
        enable_checkpointing(handle)
    usaf.select(handle, batches, n_batches=cfg["calib"])
    opt = usaf.UsafOptimizer(handle, lr=2e-4, router_lr=5e-5)
    spill = handle.layers[0].experts.preact_spill

    def train(b):
        model.train()
        token_mean_loss(model, b).backward()
        opt.step()
        opt.zero_grad()

    def forward(b):
        model.eval()
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    runs = {"spill": train, "recompute": train, "inference": forward}  # the spill is switched per run below
    times: dict[str, list[float]] = {k: [] for k in runs}
    train(batches[0])
    forward(batches[0])
    for r in range(a.rounds):
        for name, fn in runs.items():
            spill.failed = name == "recompute"
            t0 = time.perf_counter()
            fn(batches[r % len(batches)])
            times[name].append(round(time.perf_counter() - t0, 3))
            print(name, times[name][-1], flush=True)
    spill.failed = False
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"command": "python bench/preact_spill_ab.py " + f"--size {a.size} --rounds {a.rounds} --threads {a.threads}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checkpointing": checkpointing,
           "dtype": cfg["dtype"], "step_s": times, "median_s": med,
           "recompute_over_spill": med["recompute"] / med["spill"],
           "train_over_forward": {"spill": med["inference"] / med["spill"],
                                  "recompute": med["inference"] / med["recompute"]}}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
