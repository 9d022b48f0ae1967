"""Benchmark usaf.quant on an expert stack shaped like one Qwen3-30B-A3B gate_up layer (fewer experts).

    python bench/quant_bench.py                 # table for 4-bit g64, 4-bit g128, 8-bit g64
    python bench/quant_bench.py --variants      # also time alternative 4-bit dequant formulations

Reports relative Frobenius error, max abs error, bits/weight, quantize time and dequantization
throughput (GB of bf16 output per second, weights per second) for the whole stack in one call
and for one expert per call (the way the trainer uses it).  CPU, torch.set_num_threads(threads).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from usaf.engine.quant import QuantizedTensor, QuantSpec


def make_weights(kind: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(shape, generator=g) * 0.02
    elif kind == "heavy":
        # Student-t (df=4) entries times a log-normal per-output-row scale: heavy tails plus
        # channel-to-channel magnitude differences, as seen in real expert weights.
        df = 4.0
        z = torch.randn(shape, generator=g)
        chi2 = torch.zeros(shape)
        for _ in range(int(df)):
            chi2 += torch.randn(shape, generator=g) ** 2
        t = z / (chi2 / df).sqrt()
        row_scale = torch.exp(0.3 * torch.randn(*shape[:-1], 1, generator=g))
        w = t * 0.015 * row_scale
    else:
        raise ValueError(kind)
    return w.to(torch.bfloat16)


def timeit(fn, reps: int) -> float:
    """Best of ``reps`` calls: the CPU is shared, the minimum is the least disturbed run."""
    return min(time_calls(fn, reps))


def time_calls(fn, reps: int) -> list[float]:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def errors(qt: QuantizedTensor, w: torch.Tensor) -> tuple[float, float]:
    num = 0.0
    den = 0.0
    mx = 0.0
    for e in range(w.shape[0]):  # one expert at a time to keep memory low
        ref = w[e].float()
        d = qt.dequantize(e, e + 1, dtype=torch.float32)[0] - ref
        num += float(d.pow(2).sum())
        den += float(ref.pow(2).sum())
        mx = max(mx, float(d.abs().max()))
    return (num / den) ** 0.5, mx


# ---------------------------------------------------------------- alternative 4-bit dequant formulations
def variants(qt: QuantizedTensor, reps: int) -> list[tuple[str, float, float]]:
    """Time alternative formulations on qt's experts; returns (name, seconds, max |diff| vs chosen)."""
    assert qt.bits == 4
    gs = qt.group_size
    half = gs // 2
    n_exp = qt.num_experts
    rows = n_exp * qt.groups_per_expert
    words = qt.qdata.view(rows, half).view(torch.int32)
    lo = torch.bitwise_and(words, 0x0F0F0F0F).view(torch.uint8)
    hi = torch.bitwise_right_shift(words, 4).bitwise_and_(0x0F0F0F0F).view(torch.uint8)
    codes = torch.cat([lo, hi], dim=1)  # [rows, gs]
    inter = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # interleaved nibble packing
    sf = qt.scale.reshape(rows, 1).float()
    zf = qt.zero.reshape(rows, 1).float()
    sb, zb = qt.scale.reshape(rows, 1).bfloat16(), qt.zero.reshape(rows, 1).bfloat16()
    lut = torch.stack([torch.arange(256) & 15, torch.arange(256) >> 4], dim=-1).float()
    chosen = qt.dequantize()

    def unchunked_fp32():  # split packing, whole range in one fp32 pass, then cast
        b = torch.empty(rows, 2, half)
        b[:, 0] = torch.bitwise_and(words, 0x0F0F0F0F).view(torch.uint8)
        b[:, 1] = torch.bitwise_right_shift(words, 4).bitwise_and_(0x0F0F0F0F).view(torch.uint8)
        return b.view(rows, gs).mul_(sf).add_(zf).to(torch.bfloat16)

    def interleaved_stack():  # interleaved packing, stack of nibbles, fp32 math, cast
        u = torch.stack([inter & 15, inter >> 4], dim=-1).view(rows, gs)
        return (u.float() * sf + zf).to(torch.bfloat16)

    def byte_lut():  # interleaved packing, 256-entry byte->(lo, hi) float LUT via embedding
        u = F.embedding(inter.int(), lut).view(rows, gs)
        return u.mul_(sf).add_(zf).to(torch.bfloat16)

    def group_lut_gather():  # per-group 16-entry bf16 table (exact), gather with int64 codes
        tab = (torch.arange(16, dtype=torch.float32) * sf + zf).to(torch.bfloat16)
        return tab.gather(1, codes.long())

    def bf16_arith():  # split packing, all arithmetic in bf16 (scale/zero rounded to bf16)
        out = torch.empty(rows, 2, half, dtype=torch.bfloat16)
        out[:, 0] = torch.bitwise_and(words, 0x0F0F0F0F).view(torch.uint8)
        out[:, 1] = torch.bitwise_right_shift(words, 4).bitwise_and_(0x0F0F0F0F).view(torch.uint8)
        return out.view(rows, gs).mul_(sb).add_(zb)

    def addcmul_mixed():  # fp32 codes, fp32 params, bf16 out= (mixed-dtype TensorIterator)
        out = torch.empty(rows, gs, dtype=torch.bfloat16)
        return torch.addcmul(zf, codes.float(), sf, out=out)

    fns = [
        ("chosen: split nibbles, 2^19-elem fp32 chunks, cast", qt.dequantize),
        ("split nibbles, whole range fp32, cast", unchunked_fp32),
        ("interleaved nibbles, stack, fp32, cast", interleaved_stack),
        ("interleaved, byte LUT (F.embedding), fp32, cast", byte_lut),
        ("per-group 16-entry bf16 LUT + gather", group_lut_gather),
        ("addcmul fp32 -> bf16 out=", addcmul_mixed),
        ("bf16 arithmetic (inexact)", bf16_arith),
    ]
    diffs = [float((fn().view(chosen.shape).float() - chosen.float()).abs().max()) for _, fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(reps):  # round-robin so every formulation sees the same (shared) CPU conditions
        for i, (_, fn) in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [(name, t, d) for (name, _), t, d in zip(fns, best, diffs)]


def cpu_pressure() -> str:
    """Linux PSI 'some' avg10 for CPU: >~10% means other processes competed for the cores."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1]
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--variants", action="store_true", help="also time alternative 4-bit formulations")
    ap.add_argument("--no-table", action="store_true", help="skip the main table (use with --variants)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.experts, args.rows, args.cols)
    numel = args.experts * args.rows * args.cols
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(f"shape {list(shape)} bf16 ({numel * 2 / 1e6:.0f} MB); cpu pressure at start {cpu_pressure()}\n")
    hdr = (
        f"| {'dist':6} | {'spec':8} | {'bits/w':6} | {'rel frob err':12} | {'max abs err':11} | "
        f"{'quant s':7} | {'all: GB/s':9} | {'all: Gw/s':9} | {'1-exp: GB/s':11} | {'1-exp: Gw/s':11} | "
        f"{'1-exp median GB/s':17} |"
    )
    if not args.no_table:
        print(hdr)
        print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    specs = [QuantSpec(4, 64), QuantSpec(4, 128), QuantSpec(8, 64)]
    for kind in () if args.no_table else ("normal", "heavy"):
        w = make_weights(kind, shape)
        for spec in specs:
            t0 = time.perf_counter()
            qt = QuantizedTensor.quantize(w, spec)
            tq = time.perf_counter() - t0
            rel, mx = errors(qt, w)
            t_all = timeit(qt.dequantize, args.reps)
            one = []  # one expert per call, as the trainer does; every call timed
            for _ in range(args.reps):
                for e in range(qt.num_experts):
                    t0 = time.perf_counter()
                    qt.dequantize(e, e + 1)
                    one.append(time.perf_counter() - t0)
            per_exp = numel // qt.num_experts
            t_one, t_med = min(one), statistics.median(one)
            name = f"{spec.bits}b g{spec.group_size}"
            print(
                f"| {kind:6} | {name:8} | {qt.bits_per_weight():6.3f} | {rel:12.5f} | {mx:11.2e} | "
                f"{tq:7.2f} | {numel * 2 / t_all / 1e9:9.2f} | {numel / t_all / 1e9:9.2f} | "
                f"{per_exp * 2 / t_one / 1e9:11.2f} | {per_exp / t_one / 1e9:11.2f} | "
                f"{per_exp * 2 / t_med / 1e9:17.2f} |",
                flush=True,
            )
        del w
    if args.variants:
        n_exp = min(4, args.experts)
        w = make_weights("normal", (n_exp, args.rows, args.cols))
        qt = QuantizedTensor.quantize(w, QuantSpec(4, 64))
        print(
            f"\n4-bit g64 dequant formulations, {n_exp} experts ({n_exp * args.rows * args.cols / 1e6:.1f}M w):"
        )
        print("| formulation | ms | GB/s bf16 out | max abs diff vs chosen |")
        print("|---|---|---|---|")
        nw = qt.numel()
        for name, t, diff in variants(qt, 2 * args.reps):
            print(f"| {name} | {t * 1e3:.1f} | {nw * 2 / t / 1e9:.2f} | {diff:.1e} |", flush=True)

    print(f"\ncpu pressure at end {cpu_pressure()} (PSI avg10; high values mean the timings were disturbed)")


if __name__ == "__main__":
    main()
