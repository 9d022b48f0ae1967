"""Calibrate GATHER_COST in usaf/engine/experts.py: gather-dot vs GEMM-then-gather for the delta gradient.

    python bench/sparse_grad.py

For one expert's (T x R) and (T x C) operands and n active elements, times the engine's own ``_sparse_grad``
on each path:
  gemm:   (left^T @ right).view(-1)[idx], into a reused buffer   ~ T*R*C multiply-adds, very efficient
  gather: rows of left^T and right^T gathered, multiplied, summed  ~ T*n multiply-adds, memory-bound
and prints the break-even ratio (gather cost per multiply-add / GEMM cost per multiply-add): the gather path
is taken when n * GATHER_COST < R * C.
"""

import time

import torch

from usaf.engine.experts import _sparse_grad
from usaf.engine.store import Workspace

torch.set_num_threads(2)


def bench(fn, reps=10):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    print(f"{'T':>5} {'R':>5} {'C':>5} {'density':>8} {'dtype':>9} {'gemm ms':>8} {'gather ms':>9} {'ratio':>7}")
    ws = Workspace()
    for dtype in (torch.bfloat16, torch.float32):
        for t, r, c in ((32, 1536, 2048), (32, 2048, 768), (128, 1536, 2048), (96, 1152, 576), (256, 512, 256),
                        (1024, 512, 256)):
            for density in (0.005, 0.02, 0.05):
                left, right = torch.randn(t, r, dtype=dtype), torch.randn(t, c, dtype=dtype)
                n = int(density * r * c)
                idx = torch.randperm(r * c)[:n].sort().values.to(torch.int32)
                g = bench(lambda: _sparse_grad(left, right, idx, gather_cost=1e30, workspace=ws))  # noqa: B023
                q = bench(lambda: _sparse_grad(left, right, idx, gather_cost=0.0, workspace=ws))  # noqa: B023
                ratio = (q / (t * n)) / (g / (t * r * c))
                print(f"{t:>5} {r:>5} {c:>5} {density:>8} {str(dtype)[6:]:>9} {g * 1e3:>8.2f} {q * 1e3:>9.2f} "
                      f"{ratio:>7.0f}")


if __name__ == "__main__":
    main()
