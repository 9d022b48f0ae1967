"""Training from a Q4_K_M GGUF made by llama.cpp against training from the bf16 checkpoint with ``--quant 4bit``.

    pip install llama-cpp-python     # llama.cpp's own quantizer (llama_model_quantize)
    bash scripts/fetch-corpora.sh    # the quality bench's corpora
    python bench/gguf_train.py --dir /tmp/gguf-train --json docs/results/s12/gguf_train.json

The upcycled SmolLM2 of ``usaf bench quality bed=upcycle`` (Mixtral layout, 30 layers, 8 experts) is written as
an F16 GGUF by usaf's exporter and quantized to Q4_K_M by llama.cpp. Then the same ``usaf train`` command runs
twice on the quality bench's docs task (its training rows; held-out split of them), once with ``--model
X.Q4_K_M.gguf`` and once with ``--model CHECKPOINT --quant 4bit``, each in its own process under
``/usr/bin/time -v``: held-out perplexity before/after (the run's own eval) and the peak RSS of each.

``--llama`` adds llama.cpp on this real model: usaf's logits of the Q4_K_M file against llama.cpp's (beside
what Q4_K_M itself changes against usaf's logits of the F16 file), and the improvement that the GGUF run's
``usaf export --format gguf --like-source`` keeps, by llama.cpp's perplexity on the run's held-out split.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


def quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's ``llama_model_quantize`` (the ``llama-quantize`` tool's function)."""
    import llama_cpp.llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


def run(cmd: list[str], log: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "usaf", *cmd], capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return {"wall_s": round(time.perf_counter() - t0, 1), "max_rss_mb": round(rss)}


def against_llama(root: Path, f16: Path, q4: Path, data: Path, seq_len: int, run: dict) -> dict:
    """llama.cpp on this real model: logits of the Q4_K_M file (usaf's against llama.cpp's, beside what the
    Q4_K_M quantization itself changes against usaf's logits of the F16 file), and the improvement kept."""
    from gguf_llama import llama_ppl, logits_row  # bench/ is sys.path[0]

    import usaf
    from usaf.cli import main as cli
    from usaf.data.store import load_stored
    from usaf.export.gguf import gguf_probe_ids, llama_cpp_logits
    from usaf.load.hf import load_tokenizer
    from usaf.load.stream import load_prepared
    from usaf.train.inputs import held_out_split

    cfg = usaf.UsafConfig(quant="none")
    logits = {}
    for name, path in (("f16", f16), ("q4_k_m", q4)):
        model = load_prepared(str(path), cfg, torch.float32, "cpu").model
        ids = gguf_probe_ids(model.config.vocab_size)
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
        del model
    res = {"logits_q4_k_m": logits_row(logits["q4_k_m"], llama_cpp_logits(q4, ids), logits["f16"])}
    exported = root / "gguf_q4_k_m.like-source.gguf"
    assert cli(["export", str(root / "gguf_q4_k_m"), "--format", "gguf", "--like-source", "--out", str(exported),
                "--overwrite"]) == 0
    held = held_out_split(load_stored(str(data), load_tokenizer(str(q4)), seq_len).examples, 0)[1]
    base, export = llama_ppl(q4, held), llama_ppl(exported, held)
    res["kept"] = {"ppl_before": run["eval_ppl_before"], "ppl_after": run["eval_ppl_after"], "llama_ppl_base": base,
                   "llama_ppl_export": export,
                   "kept": (base - export) / (run["eval_ppl_before"] - run["eval_ppl_after"])}
    print("llama.cpp", json.dumps(res), flush=True)
    return res


def main() -> None:
    import usaf
    from usaf.bench.corpora import write_task_files
    from usaf.bench.upcycle import prepare_upcycled_smollm2
    from usaf.export.gguf import write_gguf
    from usaf.load.hf import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/gguf-train")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-layers", default="top:6")
    ap.add_argument("--rows", type=int, default=400, help="training rows taken from the docs task")
    ap.add_argument("--llama", action="store_true",
                    help="also compare with llama.cpp: logits of the Q4_K_M file, and the improvement that the GGUF "
                         "run's --like-source export keeps by llama.cpp's perplexity on the run's held-out split")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = prepare_upcycled_smollm2()
    f16, q4 = root / "smollm2-moe.F16.gguf", root / "smollm2-moe.Q4_K_M.gguf"
    if not f16.exists():
        h = usaf.prepare(load_model(str(ckpt), dtype=torch.bfloat16), usaf.UsafConfig(quant="none"))
        write_gguf(h, ckpt, f16, "f16")
        del h
    if not q4.exists():
        quantize(f16, q4, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    data = root / "docs_train.jsonl"
    if not data.exists():
        files = write_task_files(root / "task")
        lines = files["domain_train"].read_text(encoding="utf-8").splitlines()[: a.rows]
        data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    common = ["--data", str(data), "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch-size",
              str(a.batch_size), "--train-layers", a.train_layers, "--device", "cpu", "--quiet", "--overwrite"]
    out: dict = {"command": "python bench/gguf_train.py " + " ".join(sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "gguf_mb": round(q4.stat().st_size / 2**20), "runs": {}}
    for name, model in (("gguf_q4_k_m", [str(q4)]), ("hf_quant_4bit", [str(ckpt), "--quant", "4bit"])):
        res = run(["train", "--model", *model, "--out", str(root / name), *common], root / f"{name}.log")
        m = json.loads((root / name / "metrics.json").read_text())
        res.update({k: m[k] for k in ("eval_ppl_before", "eval_ppl_after", "peak_rss_mb", "tokens_per_s")
                    if k in m})
        out["runs"][name] = res
        print(name, json.dumps(res), flush=True)
    g, h = out["runs"]["gguf_q4_k_m"], out["runs"]["hf_quant_4bit"]
    out["ppl_after_ratio"] = g["eval_ppl_after"] / h["eval_ppl_after"]
    out["max_rss_ratio"] = g["max_rss_mb"] / h["max_rss_mb"]
    if a.llama:
        out["llama_cpp"] = against_llama(root, f16, q4, data, a.seq_len, g)
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
