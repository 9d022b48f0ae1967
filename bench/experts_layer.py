"""One MoE layer's experts at Qwen3-30B-A3B width: the fused experts function's forward + backward, alone.

    python bench/experts_layer.py                      # 512 tokens, 4-bit base, density 0.005, lean (checkpointed)
    python bench/experts_layer.py --tokens 2048 --profile

Builds a stock ``Qwen3MoeExperts`` (128 experts, hidden 2048, expert width 768) with random weights, wraps it
in ``UsafExperts`` (4-bit base by default), gives each stack a random active set of the density, routes the
tokens with a random softmax router (top-8) and times ``forward + backward`` (input, routing-weight and
delta-value gradients), as one training step does for each trained layer. Prints the median wall time, CPU
time (user and system: page faults show as system time), minor page faults and the padded rows the kernel
computed; ``--profile`` adds torch.profiler's table of ops by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--quant", default="4bit", choices=("4bit", "8bit", "none"))
    ap.add_argument("--chunk-mb", type=int, default=None, help="UsafExperts chunk (default: usaf's config)")
    ap.add_argument("--keep-preactivations", action="store_true", help="not lean: keep h for the backward")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from usaf.config import UsafConfig
    from usaf.engine.experts import ExpertsLayout, UsafExperts
    from usaf.engine.routing import Routing

    cfg = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
    stock = Qwen3MoeExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(0, 0.02)
    chunk_mb = a.chunk_mb if a.chunk_mb is not None else UsafConfig().chunk_mb
    mod = UsafExperts(stock, ExpertsLayout.fused(transposed=False), quant=a.quant, chunk_bytes=chunk_mb << 20)
    del stock
    mod.init_deltas()
    for name in mod.names:
        d = mod.deltas[name]
        k = int(a.density * d.numel)
        d.set(torch.randperm(d.numel)[:k], torch.randn(k) * 1e-3)
    mod.set_mode(lean=not a.keep_preactivations)
    x = (torch.randn(a.tokens, 2048) * 0.5).to(torch.bfloat16).requires_grad_(True)
    probs = torch.softmax(torch.randn(a.tokens, 128) * 2, -1)
    w, idx = probs.topk(8, -1)
    w = (w / w.sum(-1, keepdim=True)).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(a.tokens, 2048).to(torch.bfloat16)

    def step():
        mod(x, idx, w).backward(g)

    step()
    runs = []
    for _ in range(a.reps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        runs.append((t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
    wall, user, system, faults = sorted(runs)[len(runs) // 2]
    route = Routing.build(idx, 128)
    print(json.dumps({"tokens": a.tokens, "density": a.density, "quant": a.quant, "chunk_mb": chunk_mb,
                      "lean": not a.keep_preactivations, "threads": a.threads, "wall_s": round(wall, 3),
                      "user_s": round(user, 2), "system_s": round(system, 2), "minor_faults": faults,
                      "routed_rows": a.tokens * 8, "computed_rows": route.bounds[-1],
                      "workspace_mb": round(mod.workspace.nbytes() / 2**20, 1)}))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
