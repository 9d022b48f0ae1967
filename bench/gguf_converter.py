"""GGUF files written by llama.cpp's own converter (``convert_hf_to_gguf.py``), loaded by usaf.

For each family usaf reads as GGUF, a tiny model of that family (hidden 256, 4 experts, 2 layers, random
weights) with SmolLM2's real tokenizer (so the converter recognises its pre-tokenizer) is saved in the
published Hugging Face layout, converted by the converter given (``--converter``: a llama.cpp source tree,
e.g. the ``vendor/llama.cpp`` of the llama-cpp-python sdist, with its own ``gguf-py``) to F32 and to Q8_0, and
then loaded with ``--model X.gguf``'s loader. Reported per file: usaf's logits against transformers' on the
checkpoint (F32: the same model, so float rounding; Q8_0: the file's own quantization), usaf's tokenizer
against transformers' on a few texts, and, with llama-cpp-python importable, llama.cpp's logits on the same
file against usaf's.

    python bench/gguf_converter.py --converter DIR [--dir WORK] [--json OUT] [--families qwen3_moe,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from usaf.bench.upcycle import prepare_upcycled_smollm2
from usaf.export import gguf as ge
from usaf.load.gguf.model import load_gguf
from usaf.load.hf import load_model, load_tokenizer
from usaf.testing import GGUF_DIMS, make_tiny_model

VOCAB = 49152
DIMS = GGUF_DIMS
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TEXTS = ["Say apple then river.", "def f(x):\n    return x * 2  # 123", "<|im_start|>user\nHi<|im_end|>"]


def checkpoint(family: str, out: Path, tok_dir: Path) -> Path:
    """The tiny model in the published layout (``save_pretrained``'s default), with SmolLM2's tokenizer."""
    model = make_tiny_model(family, vocab_size=VOCAB, **DIMS[family])
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    if family == "deepseek_v3":  # as DeepSeek-V3's published config.json says (the converter reads it)
        model.config.scoring_func = "sigmoid"
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, out / name)
    return out


def convert(converter: Path, ckpt: Path, out: Path, outtype: str) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=str(converter / "gguf-py"))
    p = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", outtype,
                        "--outfile", str(out)], env=env, capture_output=True, text=True)
    return p.returncode == 0, (p.stderr or p.stdout).strip().splitlines()[-1] if p.returncode else ""


def rel_err(want: torch.Tensor, got: torch.Tensor) -> dict:
    err = ge.position_errors(want, got)
    return {"median": round(float(err.median()), 6), "max": round(float(err.max()), 6),
            "top1_same": round(float((want.argmax(-1) == got.argmax(-1)).float().mean()), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--converter", required=True, help="a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--dir", default="/tmp/usaf-gguf-converter")
    ap.add_argument("--json")
    ap.add_argument("--families", default=",".join(DIMS), help="comma-separated (default: every family)")
    a = ap.parse_args()
    converter, work = Path(a.converter), Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = prepare_upcycled_smollm2()
    ids = ge.gguf_probe_ids(VOCAB)
    results = []
    for family in a.families.split(","):
        ckpt = checkpoint(family, work / family, tok_dir)
        want = load_model(str(ckpt), dtype=torch.float32)
        with torch.no_grad():
            want_logits = want(ids).logits.float()
        tok_ckpt = load_tokenizer(str(ckpt))
        for outtype in ("f32", "q8_0"):
            path = work / f"{family}.{outtype}.gguf"
            ok, why = convert(converter, ckpt, path, outtype)
            rec = {"family": family, "type": outtype, "converted": ok}
            if not ok:
                rec["error"] = why
            else:
                try:
                    h = load_gguf(path, dtype=torch.float32)
                    with torch.no_grad():
                        got = h.model(ids).logits.float()
                    rec["usaf_vs_transformers"] = rel_err(want_logits, got)
                    tok = load_tokenizer(str(path))
                    rec["tokenizer_same"] = all(tok(t)["input_ids"] == tok_ckpt(t)["input_ids"] for t in TEXTS)
                    if ge.have_llama_cpp():
                        rec["llama_cpp_vs_usaf"] = rel_err(got, ge.llama_cpp_logits(path, ids))
                except Exception as e:  # reported per file, the next one still runs
                    rec["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(rec), flush=True)
            results.append(rec)
    if a.json:
        Path(a.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
