"""Peak memory of loading a GGUF with usaf (streamed: experts stay in the file, memory-mapped) and of one
training step from it, on a generated qwen3moe GGUF of mid size (random weights, Q4_K experts).

    python bench/gguf_load.py --dir /tmp/gguf-bench --layers 8 --experts 64 --hidden 1024 --moe 768

Writes the GGUF once (random Q4_K expert blocks with sane scales, F16 non-expert tensors, the tiny test
tokenizer in the metadata), then in a fresh process per phase measures the process's peak RSS (VmHWM)
after ``import usaf`` (baseline), after ``load_gguf`` (disk tier), after selecting the top layer's
active set (its score buffer), and over one forward + backward + optimizer step (peak reset before it; the
file-backed part of the RSS is the GGUF's mapped pages). Prints JSON: file and expert bytes, non-expert bytes as loaded (bf16), peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np


def write(path: Path, layers: int, experts: int, hidden: int, moe: int, vocab: int = 320) -> None:
    import gguf

    from usaf.testing import make_tiny_tokenizer

    rng = np.random.default_rng(0)
    heads, kv, head_dim = hidden // 128, max(1, hidden // 512), 128
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_count(experts)
    w.add_expert_feed_forward_length(moe)
    w.add_expert_used_count(8)
    tok = make_tiny_tokenizer(vocab)
    tmp = path.parent / "tok"
    tok.save_pretrained(tmp)
    vocab_map = json.loads((tmp / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {i: s for s, i in vocab_map.items()}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab)])
    w.add_token_types([1] * vocab)
    gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab).add_to_gguf(w, quiet=True)

    def f16(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def q4k(*shape):  # random codes; d, dmin small fp16
        n = int(np.prod(shape)) // 256
        raw = rng.integers(0, 256, (n, 144), dtype=np.uint8)
        raw[:, 0:2] = np.full(n, 2e-4, np.float16).view(np.uint8).reshape(n, 2)
        raw[:, 2:4] = np.full(n, 2e-4, np.float16).view(np.uint8).reshape(n, 2)
        return raw.reshape(*shape[:-1], shape[-1] // 256 * 144)

    Q4K = gguf.GGMLQuantizationType.Q4_K
    w.add_tensor("token_embd.weight", f16(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", f16(vocab, hidden))
    for b in range(layers):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "attn_q.weight", f16(heads * head_dim, hidden))
        w.add_tensor(p + "attn_k.weight", f16(kv * head_dim, hidden))
        w.add_tensor(p + "attn_v.weight", f16(kv * head_dim, hidden))
        w.add_tensor(p + "attn_output.weight", f16(hidden, heads * head_dim))
        w.add_tensor(p + "attn_q_norm.weight", np.ones(head_dim, np.float32))
        w.add_tensor(p + "attn_k_norm.weight", np.ones(head_dim, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((experts, hidden)) * 0.02).astype(np.float32))
        w.add_tensor(p + "ffn_gate_exps.weight", q4k(experts, moe, hidden), raw_dtype=Q4K)
        w.add_tensor(p + "ffn_up_exps.weight", q4k(experts, moe, hidden), raw_dtype=Q4K)
        w.add_tensor(p + "ffn_down_exps.weight", q4k(experts, hidden, moe), raw_dtype=Q4K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _peak_mb() -> float:
    """VmHWM: this process's peak RSS (reset by exec, unlike ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _file_rss_mb() -> float:
    """Resident pages that are file-backed (the GGUF's memory map), not anonymous memory."""
    d = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
         if ln.endswith("kB")}
    return (d["Rss"] - d["Anonymous"]) / 1024


def phase(path: str, what: str) -> dict:
    import torch

    import usaf
    from usaf.load.gguf.model import load_gguf

    out = {"baseline_mb": _peak_mb()}
    if what == "import":
        return out
    h = load_gguf(path, usaf.UsafConfig(train_layers="top:1", density=0.005), dtype=torch.bfloat16, tier="disk")
    out["load_peak_mb"] = _peak_mb()
    out["non_expert_mb"] = sum(p.numel() * p.element_size() for p in h.model.parameters()) / 2**20
    if what == "load":
        return out
    ids = torch.randint(0, 320, (1, 256))
    usaf.select(h, [{"input_ids": ids, "labels": ids}])
    out["select_peak_mb"] = _peak_mb()
    opt = usaf.UsafOptimizer(h, lr=1e-3)
    h.model.train()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    out["before_step_rss_mb"] = _peak_mb()
    h.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    out["train_step_peak_mb"] = _peak_mb()
    out["file_backed_rss_mb"] = _file_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/gguf-bench")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe", type=int, default=768)
    ap.add_argument("--phase")
    a = ap.parse_args()
    path = Path(a.dir) / f"q{a.layers}x{a.experts}x{a.hidden}x{a.moe}.gguf"
    if a.phase:
        print(json.dumps(phase(str(path), a.phase)))
        return
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    if not path.exists():
        write(path, a.layers, a.experts, a.hidden, a.moe)
    res = {"file_mb": path.stat().st_size / 2**20}
    for what in ("import", "load", "train"):
        r = subprocess.run([sys.executable, __file__, "--dir", a.dir, "--layers", str(a.layers), "--experts",
                            str(a.experts), "--hidden", str(a.hidden), "--moe", str(a.moe), "--phase", what],
                           capture_output=True, text=True, check=True)
        res[what] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
