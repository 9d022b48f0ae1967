"""GGUF files against llama.cpp itself (llama-cpp-python): logits without a delta, and the improvement a
``--like-source`` export keeps as llama.cpp measures it.

    pip install llama-cpp-python     # builds llama.cpp from source (~7 minutes of 2 cores)
    python bench/gguf_llama.py --dir /tmp/gguf-llama --json docs/results/s12/gguf_llama.json

1. **Logits**: a tiny qwen3_moe (hidden 256, 4 experts, expert width 256) written as an F32 GGUF by usaf's
   exporter and requantized to each type (``write_retyped``; K-types with usaf's K-quantizer); usaf loads it
   (``--model X.gguf``, fp32 compute) and llama.cpp loads the same file; per type, the per-position max
   |logit difference| relative to the largest logit (``usaf.export.gguf.position_errors``) over 16 probe
   sequences of 4 tokens: median, max, and the share of positions whose top token agrees; beside it, the same
   error between usaf's logits of the F32 file and of the typed one (what the type's quantization itself does).
2. **Improvement kept**: for each of ``--kept-types``, ``usaf train`` from that GGUF (the given lr and density)
   on a small chat task, ``usaf export --format gguf --like-source``, then the held-out perplexity of the base
   GGUF and of the export **computed from llama.cpp's logits** on the held-out split ``usaf eval --held-out``
   uses (same tokens, same loss mask). kept = (ppl base - ppl export) / (ppl before - ppl after as the run
   measured it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def llama_ppl(gguf: Path, examples) -> float:
    """Token-weighted perplexity of ``examples`` (their loss mask) from llama.cpp's logits of ``gguf``."""
    from usaf.export.gguf import _llama, llama_cpp_logits

    llm = _llama(gguf, max(64, max(len(ex.input_ids) for ex in examples)))
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([list(ex.input_ids)])
        labels = torch.tensor(list(ex.labels))
        logits = llama_cpp_logits(gguf, ids, llm=llm)[0].double()
        target = labels[1:]
        keep = target != -100
        lp = torch.log_softmax(logits[:-1][keep], dim=-1)
        total -= float(lp.gather(1, target[keep].unsqueeze(1)).sum())
        count += int(keep.sum())
    return math.exp(total / max(count, 1))


def logits_row(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> dict:
    """usaf's logits against llama.cpp's (median and max per-position error, top-token agreement), beside what
    the type's own quantization changes (usaf's logits of the exact file against ``ours``)."""
    from usaf.export.gguf import position_errors

    err, own = position_errors(ours, theirs), position_errors(exact, ours)
    return {"median": float(err.median()), "max": float(err.max()),
            "top_token_agrees": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
            "quantization_median": float(own.median()), "quantization_max": float(own.max())}


def main() -> None:
    from gguf_kept import (  # the same tiny GGUFs and toy task (bench/ is sys.path[0])
        toy_chat_data,
        typed_gguf,
    )

    import usaf
    from usaf.cli import main as cli
    from usaf.data.store import load_stored
    from usaf.export.gguf import gguf_probe_ids, have_llama_cpp, llama_cpp_logits
    from usaf.load.hf import load_tokenizer
    from usaf.load.stream import load_prepared
    from usaf.train.inputs import held_out_split
    from usaf.train.trained import evaluate_data

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/gguf-llama")
    ap.add_argument("--types", nargs="+",
                    default=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
    ap.add_argument("--kept-types", nargs="+", default=["q8_0", "q6_k", "q4_k"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", default="3e-3")
    ap.add_argument("--density", default="0.02")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if not have_llama_cpp():
        raise SystemExit("llama_cpp is not importable: pip install llama-cpp-python")
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    def typed(name: str) -> Path:
        return typed_gguf(root, name)

    out: dict = {"command": "python bench/gguf_llama.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(a).items()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "logits": {}, "kept": {}}
    cfg = usaf.UsafConfig(quant="none")
    exact = None  # usaf's logits of the F32 file: what each type's own quantization changes is measured against it
    for name in ["f32"] + [t for t in a.types if t != "f32"]:
        path = typed(name)
        model = load_prepared(str(path), cfg, torch.float32, "cpu").model
        ids = gguf_probe_ids(model.config.vocab_size)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
        exact = ours if exact is None else exact
        row = logits_row(ours, llama_cpp_logits(path, ids), exact)
        out["logits"][name] = row
        print("logits", name, json.dumps(row), flush=True)

    data = toy_chat_data(root)
    for name in a.kept_types:
        q = typed(name)
        run = root / f"run-{name}-lr{a.lr}-d{a.density}"
        if not (run / "metrics.json").exists():
            assert cli(["train", "--model", str(q), "--data", str(data), "--out", str(run), "--steps",
                        str(a.steps), "--seq-len", "32", "--batch-size", "4", "--lr", a.lr, "--density",
                        a.density, "--dtype", "fp32", "--device", "cpu", "--calib-batches", "2", "--quiet"]) == 0
        m = json.loads((run / "metrics.json").read_text())
        exported = root / f"out-{name}-lr{a.lr}-d{a.density}.gguf"
        assert cli(["export", str(run), "--format", "gguf", "--like-source", "--out", str(exported),
                    "--overwrite"]) == 0
        tok = load_tokenizer(str(q))
        held = held_out_split(load_stored(str(data), tok, 32).examples, 0)[1]
        base, export = llama_ppl(q, held), llama_ppl(exported, held)
        usaf_export = evaluate_data(str(exported), str(data), seq_len=32, batch_size=4, dtype="fp32",
                                    held_out=True, device="cpu")["ppl"]
        row = {"ppl_before": m["eval_ppl_before"], "ppl_after": m["eval_ppl_after"], "llama_ppl_base": base,
               "llama_ppl_export": export, "usaf_ppl_export": usaf_export,
               "kept": (base - export) / (m["eval_ppl_before"] - m["eval_ppl_after"])}
        out["kept"][name] = row
        print("kept", name, json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
