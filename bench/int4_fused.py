"""A lead for faster steps on the CPU: torch's fused int4 matmul against usaf's dequantize-then-matmul.

    python bench/int4_fused.py                 # Qwen3-30B-A3B width: 128 experts, hidden 2048, width 768
    python bench/int4_fused.py --tokens 2048   # 4 x 512 tokens

One MoE layer's forward expert products ``x @ W_e^T`` (``gate_up_proj`` [2I, H] and ``down_proj`` [H, I]) for
``tokens x top_k / E`` tokens per expert, with random weights quantized by usaf's 4-bit format (group 64, fp16
scale and zero). ``dequant``: what usaf's experts do now (``QuantizedTensor.dequantize`` of one expert into a
reused bf16 buffer, then ``torch.mm``). ``fused``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the same
codes, repacked once (``_convert_weight_to_int4pack_for_cpu``) with each group's scale and zero in bf16 (the
kernel's ``(code - 8) * scale + zero'`` with ``zero' = zero + 8 * scale``). Prints the median of ``--repeat``
timings of each and the largest difference of the products relative to their largest magnitude.

Not used by the engine: the fused kernel computes with bf16 scales and zeros, so its products differ from the
dequantized weights' at bf16 rounding level, and the backward's input gradient needs ``W_e`` itself (another
packing, or the dequantization as now). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from usaf.engine.quant import QuantizedTensor, QuantSpec


def repack(q: QuantizedTensor, e: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` of ``q`` (4-bit, groups along ``cols``) as the fused kernel's packed codes and scales/zeros."""
    gs = q.group_size
    assert cols % gs == 0, "the kernel's groups run along a row: each of usaf's groups must lie in one row"
    b = q.qdata[e].view(-1, gs // 2)  # per group: low nibbles hold the first half, high nibbles the second
    codes = torch.cat([b & 0x0F, b >> 4], 1).reshape(rows, cols).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    s = q.scale[e].float().view(rows, cols // gs)
    z = q.zero[e].float().view(rows, cols // gs)
    return packed, torch.stack([s, z + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def measure(rows: int, cols: int, experts: int, per: int, repeat: int, gs: int = 64) -> dict:
    """Both products for one stack of ``experts`` [rows, cols] matrices and ``per`` tokens each."""
    q = QuantizedTensor.quantize(torch.randn(experts, rows, cols) * 0.02, QuantSpec(4, gs))
    fused = [repack(q, e, rows, cols) for e in range(experts)]
    x = torch.randn(per, cols, dtype=torch.bfloat16)
    buf = torch.empty(1, rows, cols, dtype=torch.bfloat16)

    def dequant(e):
        return x @ q.dequantize(e, e + 1, torch.bfloat16, out=buf)[0].T

    def kernel(e):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, fused[e][0], gs, fused[e][1])

    ref = torch.stack([dequant(e).float() for e in range(0, experts, 16)])
    got = torch.stack([kernel(e).float() for e in range(0, experts, 16)])
    times = {}
    for label, f in (("dequant", dequant), ("fused", kernel)):
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for e in range(experts):
                f(e)
            runs.append(time.perf_counter() - t0)
        times[label] = round(statistics.median(runs), 4)
    return {**{f"{k}_s": v for k, v in times.items()}, "speedup": round(times["dequant"] / times["fused"], 2),
            "max_rel_diff": float((got - ref).abs().max() / ref.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    per = max(1, args.tokens * args.top_k // args.experts)
    out = {"experts": args.experts, "hidden": args.hidden, "width": args.width, "tokens_per_expert": per,
           "threads": torch.get_num_threads()}
    for name, shape in {"gate_up_proj": (2 * args.width, args.hidden), "down_proj": (args.hidden, args.width)}.items():
        out[name] = measure(*shape, args.experts, per, args.repeat)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
