"""GGML dequantization on the hot path: ``usaf.engine.ggml.dequantize`` against the plain formulas
(``dequantize_blocks`` over the same chunks and copied into the stack's output: the hot path before) and against usaf's own 4-bit stacks.

    python bench/ggml_dequant.py --json docs/results/s13/ggml_dequant.json

Random block bytes (finite fp16 scales) for one expert run of ``--experts`` experts of ``--rows`` x ``--cols``
(the default: gate and up of eight experts of the upcycled SmolLM2's width, cols rounded up to whole K
blocks), one thread, the best of ``--repeat`` calls to bf16. Both paths are checked equal to the gguf
package's reference before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from usaf.engine import ggml
from usaf.engine.quant import QuantizedTensor, QuantSpec

_F16_AT = {ggml.Q8_0: [0], ggml.Q4_0: [0], ggml.Q4_1: [0, 2], ggml.Q5_0: [0], ggml.Q5_1: [0, 2],
           ggml.Q4_K: [0, 2], ggml.Q5_K: [0, 2], ggml.Q6_K: [208]}


def random_blocks(kind: int, n_elements: int, gen: torch.Generator) -> torch.Tensor:
    block, size = ggml.BLOCKS[kind]
    raw = torch.randint(0, 256, (n_elements // block, size), dtype=torch.uint8, generator=gen)
    for at in _F16_AT[kind]:
        raw[:, at : at + 2] = (torch.randn(raw.shape[0], 1, generator=gen) * 0.01).half().view(torch.uint8)
    return raw


def formulas(raw: torch.Tensor, kind: int, cols: int) -> torch.Tensor:
    """The path before: ``dequantize_blocks`` per chunk of 2^18 elements, each result copied into a tensor of the
    part, which ``GGMLStack.dequantize`` then copied into the stack's output."""
    block, size = ggml.BLOCKS[kind]
    blocks = raw.reshape(-1, size)
    out = torch.empty(blocks.shape[0], block, dtype=torch.bfloat16)
    step = (1 << 18) // block
    for b0 in range(0, blocks.shape[0], step):
        out[b0 : b0 + step] = ggml.dequantize_blocks(blocks[b0 : b0 + step], kind)
    stack = torch.empty(*raw.shape[:-1], cols, dtype=torch.bfloat16)
    stack[:, : raw.shape[1]] = out.reshape(*raw.shape[:-1], cols)
    return stack


def best_ms(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return round(min(times) * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2 * 2560)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import gguf

    e, r, c = args.experts, args.rows, args.cols
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(e, r, c, generator=gen) * 0.02
    qt = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    rows = {"usaf 4-bit (group 64)": {"ms": best_ms(lambda: qt.dequantize(0, e), args.repeat)}}
    for kind in (ggml.Q4_K, ggml.Q5_K, ggml.Q6_K, ggml.Q8_0, ggml.Q4_0, ggml.Q4_1, ggml.Q5_0, ggml.Q5_1):
        raw = random_blocks(kind, e * r * c, gen).reshape(e, r, -1)
        want = torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(e * r, -1),
                                                       gguf.GGMLQuantizationType(kind))).reshape(e, r, c)
        stack = ggml.GGMLStack([raw], [kind], c)
        assert torch.equal(stack.dequantize(0, e, dtype=torch.float32), want)
        assert torch.equal(formulas(raw, kind, c), want.to(torch.bfloat16))
        before = best_ms(lambda raw=raw, kind=kind: formulas(raw, kind, c), args.repeat)
        now = best_ms(lambda stack=stack: stack.dequantize(0, e), args.repeat)
        rows[ggml.type_name(kind)] = {"formulas_ms": before, "ms": now, "speedup": round(before / now, 2)}
    for name, row in rows.items():
        print(f"{name:24s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        out = {"command": "python bench/ggml_dequant.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                       if k != "json" and v != ap.get_default(k)),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shape": [e, r, c],
               "elements": e * r * c, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
