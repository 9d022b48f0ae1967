"""How much of a run's improvement a ``--like-source`` GGUF export keeps, per type, evaluated by usaf itself.

    python bench/gguf_kept.py --dir /tmp/gguf-kept --types q8_0 q6_k q4_k --steps 30

For each type: a tiny qwen3_moe (hidden 256, 4 experts, expert width 256) is written as an F32 GGUF by usaf's
exporter and requantized to the type (K-types with usaf's round-to-nearest K-quantizer); ``usaf train`` runs
from that GGUF on a small chat task; ``usaf export --format gguf --like-source`` writes the trained model back
in the same types; ``usaf eval`` measures the held-out perplexity of the base GGUF and of the export (no
delta). kept = (ppl base - ppl export) / (ppl before - ppl after as the run measured it). llama.cpp is not
used (not installed here): this is usaf's evaluation of the exported file, not llama.cpp's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import torch


def tiny_f32_gguf(root: Path) -> Path:
    """``root/m-f32.gguf``: a tiny qwen3_moe (hidden 256, 4 experts, expert width 256) written by usaf's
    exporter in F32 (once)."""
    import usaf
    from usaf.export.gguf import write_gguf
    from usaf.load.hf import load_model
    from usaf.testing import save_tiny_checkpoint

    f32 = root / "m-f32.gguf"
    if not f32.exists():
        ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt", hidden_size=256, moe_intermediate_size=256,
                                    num_experts=4)
        h = usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none"))
        write_gguf(h, ckpt, f32, "f32")
    return f32


def typed_gguf(root: Path, name: str) -> Path:
    """``root/m-<name>.gguf``: the F32 file with every matrix whose rows fit the type's block in ``name``
    (routers and norms stay F32; K-types by usaf's K-quantizer). ``f32``: the F32 file itself."""
    from usaf.export.gguf_source import TYPES, write_retyped
    from usaf.load.gguf.reader import GGUFFile

    f32 = tiny_f32_gguf(root)
    if name == "f32":
        return f32
    q = root / f"m-{name}.gguf"
    if not q.exists():
        src, kind = GGUFFile(f32), TYPES[name]
        block = {8: 32, 2: 32, 3: 32, 6: 32, 7: 32}.get(kind, 256)  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: 32
        kinds = {n: kind for n, t in src.tensors.items()
                 if len(t.shape) >= 2 and ".ffn_gate_inp." not in n and t.shape[-1] % block == 0}
        write_retyped(src, q, {}, kinds)
    return q


def toy_chat_data(root: Path) -> Path:
    """``root/train.jsonl``: 80 chat rows ("Say apple then river" -> "apple river")."""
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "paper", "seven", "table"]
    rows = [{"messages": [{"role": "user", "content": f"Say {words[i % 10]} then {words[(3 * i + 1) % 10]}"},
                          {"role": "assistant", "content": f"{words[i % 10]} {words[(3 * i + 1) % 10]}"}]}
            for i in range(80)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def main() -> None:
    from usaf.cli import main as cli

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/gguf-kept")
    ap.add_argument("--types", nargs="+", default=["q8_0", "q6_k", "q4_k"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", default="0.01")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    data = toy_chat_data(root)

    def ppl(model: Path, delta: Path | None = None) -> float:
        buf = io.StringIO()
        args = ["eval", "--model", str(model), "--data", str(data), "--held-out", "--device", "cpu",
                "--dtype", "fp32", "--seq-len", "32", "--batch-size", "4"]
        with contextlib.redirect_stdout(buf):
            assert cli(args + (["--delta", str(delta)] if delta else [])) == 0
        return float(buf.getvalue().split()[1])

    out = {}
    for name in a.types:
        q = typed_gguf(root, name)
        run = root / f"run-{name}"
        if not (run / "metrics.json").exists():
            assert cli(["train", "--model", str(q), "--data", str(data), "--out", str(run), "--steps",
                        str(a.steps), "--seq-len", "32", "--batch-size", "4", "--lr", a.lr, "--density", "0.02",
                        "--dtype", "fp32", "--device", "cpu", "--calib-batches", "2", "--quiet"]) == 0
        m = json.loads((run / "metrics.json").read_text())
        exported = root / f"out-{name}.gguf"
        assert cli(["export", str(run), "--format", "gguf", "--like-source", "--out", str(exported),
                    "--overwrite"]) == 0
        base, after_usaf, export = ppl(q), ppl(q, run / "delta.safetensors"), ppl(exported)
        out[name] = {"ppl_before": m["eval_ppl_before"], "ppl_after": m["eval_ppl_after"], "ppl_base": base,
                     "ppl_base_plus_delta": after_usaf, "ppl_export": export,
                     "kept": (base - export) / (m["eval_ppl_before"] - m["eval_ppl_after"])}
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
