"""What choosing each 4-bit group's scale and minimum costs and buys: ``--quant-rounding mse`` against ``minmax``.

    python bench/quant_rounding.py --json docs/results/s21/quant_rounding.json

For each bed of ``usaf bench quality`` (the upcycled and the MoEfied SmolLM2-135M, built and cached on first
use) and each rounding, the bed is loaded in fp32 and prepared by usaf with a 4-bit base (``usaf.prepare``:
every expert stack of every layer quantized, nothing trained), then evaluated as ``usaf train`` evaluates
(``usaf.train.evaluate``) on the quality bench's held-out documentation windows and its general text. Also
the relative squared error of the expert weights, and the time ``prepare`` took (the quantization of every
stack). ``none`` is the unquantized model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import usaf
from usaf.bench.beds import BEDS, bed_model
from usaf.bench.corpora import write_task_files
from usaf.bench.harness import machine_info
from usaf.engine.experts import UsafExperts
from usaf.engine.model import decoder_layers
from usaf.load.hf import load_model, load_tokenizer
from usaf.train.evaluate import evaluate


def windows(tok, path: Path, n: int, seq_len: int) -> torch.Tensor:
    """The first ``n`` windows of ``seq_len`` tokens of the file's text rows, documents joined by EOS."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line).get("text")
        if text:
            ids += tok(text)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * seq_len:
            break
    if len(ids) < n * seq_len:
        raise SystemExit(f"{path} has fewer than {n * seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def batches(x: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        ids = x[i : i + size]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def stacks(model):
    """``((layer, stack name), fp32 weights)`` of every expert stack, dequantized from the frozen store."""
    for i, layer in enumerate(decoder_layers(model)):
        for mod in layer.modules():
            if isinstance(mod, UsafExperts):
                for name, frozen in mod.frozen.items():
                    yield (i, name), frozen.dequantize(dtype=torch.float32)


def expert_error(model, originals: dict) -> float:
    """Sum of squared errors of the dequantized expert stacks over the sum of squares of the originals."""
    err = ref = 0.0
    for key, d in stacks(model):
        w = originals[key]
        err += float((d.reshape(w.shape) - w).square().sum())
        ref += float(w.square().sum())
    return err / ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beds", default=",".join(BEDS))
    ap.add_argument("--seqs", type=int, default=24, help="held-out windows per text")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    files = write_task_files(Path("/tmp/usaf-quant-rounding-task"))
    out = {"command": "python bench/quant_rounding.py " + (f"--json {a.json}" if a.json else ""),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(), "beds": {}}
    for bed in a.beds.split(","):
        path = bed_model(bed)
        tok = load_tokenizer(str(path))
        texts = {"domain": windows(tok, files["domain_eval"], a.seqs, a.seq_len),
                 "general": windows(tok, files["general_eval"], a.seqs, a.seq_len)}
        rows = {}
        originals = None
        for rounding in ("none", "minmax", "mse"):  # "none" first: its stacks are the originals
            model = load_model(str(path), dtype=torch.float32)
            t0 = time.perf_counter()
            cfg = usaf.UsafConfig(quant="none") if rounding == "none" else usaf.UsafConfig(quant_rounding=rounding)
            handle = usaf.prepare(model, cfg)
            prep_s = time.perf_counter() - t0
            if originals is None:
                originals = {key: w.clone() for key, w in stacks(handle.model)}
            row = {"prepare_s": round(prep_s, 1), "rel_sq_error": expert_error(handle.model, originals)}
            for k, x in texts.items():
                row[f"{k}_ppl"] = evaluate(handle.model, batches(x, 4))["ppl"]
            rows[rounding] = row
            print(bed, rounding, row, flush=True)
            del handle, model
        out["beds"][bed] = {"expert_weights": sum(w.numel() for w in originals.values()), "rows": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
