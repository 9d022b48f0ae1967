"""Qwen3-30B-A3B's exact shapes, random weights, generated locally: train the top layers on this machine.

    python bench/real_shape.py --layers 12 --train-top 8 --seq-len 512 --steps 3 --dir /tmp/q30
    python bench/real_shape.py --layers 48 --train-top 8 --seq-len 512 --steps 3 --dir /tmp/q30   # ~17 GB disk
    python bench/real_shape.py --layers 12 --device cuda --device-cap 8GB --dir /tmp/q30   # a GPU capped at 8 GB

Writes a checkpoint directory (config, tiny tokenizer, non-expert weights in bf16 shards) and generates the
4-bit quantized expert cache *directly* (random codes, per-group scales of a std-0.02 weight; no 61 GB bf16
checkpoint is ever created). Then runs the real path: streamed load (disk tier: mmap of the cache),
frozen-prefix cache for the layers below the trainable range, selection, training steps. Prints JSON with
tokens/s, peak RSS per phase and the planner's prediction.

``--dtype auto`` (the default) computes in bf16 on a GPU and on CPUs with native bf16, in fp32 elsewhere, as
``usaf train --dtype auto`` does (on a CPU with AVX2 only, bf16 runs 10-40x slower); ``--dtype bf16`` forces it.

``--device cuda`` runs the same job on the GPU (the experts' tier chosen as ``usaf train`` chooses it, from the
device's memory) and adds the device's peaks (``torch.cuda.max_memory_allocated`` and ``..._reserved``) of the
selection pass and of the training steps, next to ``usaf plan``'s device prediction. ``--device-cap 8GB``
limits the caching allocator to that much (``torch.cuda.set_per_process_memory_fraction``), as a smaller
card would; the plan is asked for the same budget. ``bench/gpu_check.sh`` runs it at 8 and 12 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

QWEN3_30B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_experts=128,
                 num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=False, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                 max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def heap_in_use() -> int:
    """Bytes the process has allocated with malloc and not freed (glibc ``mallinfo2``: arenas + mmapped).

    Every CPU tensor torch allocates is counted; file mappings (the disk tier's mmap of the quantized
    cache) and library code are not. This is the "simulated device" of ``--device-memory``: on a GPU these
    allocations would be the device's.
    """
    # usaf is imported late in this script: its runtime baseline is measured before
    from usaf.memory.meter import malloc_info

    m = malloc_info()
    return m["in_use"] + m["mapped"]


class HeapPeak:
    """Peak of :func:`heap_in_use`, sampled by a thread every ``interval`` s and at every decoder layer's
    forward and backward (hooks), so short-lived per-layer buffers are seen."""

    def __init__(self, model=None, interval: float = 0.002):
        import threading

        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._lock, self._gen = threading.Lock(), 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hooks = []
        if model is not None:
            from usaf.engine.model import decoder_layers

            for layer in decoder_layers(model):
                self._hooks.append(layer.register_forward_hook(lambda *a: self.sample()))
                self._hooks.append(layer.register_full_backward_pre_hook(lambda *a: self.sample()))
                self._hooks.append(layer.register_full_backward_hook(lambda *a: self.sample()))

    def sample(self) -> None:
        gen, v = self._gen, heap_in_use()
        with self._lock:
            if gen == self._gen:  # not a reading from before a reset
                self.peak = max(self.peak, v)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def reset(self) -> int:
        with self._lock:
            self._gen += 1
            old, self.peak = self.peak, heap_in_use()
        return old

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        for h in self._hooks:
            h.remove()


# Where an op's time is booked: the first of these found among its enclosing Python frames (innermost first;
# torch.profiler's with_stack events). Ops that autograd's engine runs for built-in backward functions have no
# Python frame: "backward of built-in ops".
_PLACES = (("usaf/engine/quant.py", "4-bit dequantization"), ("usaf/engine/delta.py", "delta added to the weights"),
           ("_sparse_grad", "delta-value gradients"), ("usaf/engine/experts.py", "experts: matmuls, gate, gathers"),
           ("usaf/engine/routing.py", "routing bookkeeping"), ("usaf/engine/loss.py", "LM head + loss"),
           ("usaf/engine/optim.py", "optimizer"), ("torch/optim", "optimizer"),
           ("usaf/engine/linear.py", "sparse linear deltas (shared experts, attention)"),
           ("modeling_", "model code: attention, norms, router (forward)"))
_WAITS = ("acquire of _thread.lock", "get of _queue", "threading.py", "real_shape.py")


def where_time_goes(prof) -> str:
    """torch.profiler's self CPU time of one step, by the code that issued each op (see ``_PLACES``)."""
    book: dict[str, float] = {}
    for ev in prof.events():
        if any(w in ev.name for w in _WAITS):
            continue  # a thread waiting (the main thread while autograd's engine runs), or this harness
        place, node = "backward of built-in ops (attention, norms, router, embeddings)", ev
        while node is not None:
            hit = next((name for key, name in _PLACES if key in node.name), None)
            if hit:
                place = hit
                break
            if ".py(" in node.name:
                place = "other Python"
            node = node.cpu_parent
        book[place] = book.get(place, 0.0) + ev.self_cpu_time_total / 1e6
    total = sum(book.values())
    rows = [f"{name:<66} {sec:7.2f} s {100 * sec / total:5.1f}%" for name, sec in sorted(book.items(), key=lambda x: -x[1])]
    return "self CPU time by place (threads' waits left out):\n" + "\n".join(rows) + f"\n{'total':<66} {total:7.2f} s\n"


def write_checkpoint(d: Path, layers: int) -> None:
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from usaf.testing import make_tiny_tokenizer

    cfg = Qwen3MoeConfig(**{**QWEN3_30B, "num_hidden_layers": layers})
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(d / name))
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for key, p in model.named_parameters():
        if p.dim() == 3:
            continue  # expert stacks: only in the quantized cache
        if "norm" in key:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[key] = t
        shard_bytes += t.numel() * 2
        if shard_bytes > 1 << 30:
            flush()
    flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_quant_cache(path: Path, layers: int, group: int = 64) -> None:
    """A safetensors file of 4-bit stacks written tensor by tensor (never all in memory)."""
    cfg = QWEN3_30B
    e, h, i = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    shapes = {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}
    entries = []
    for layer in range(layers):
        for name, shape in shapes.items():
            per = shape[1] * shape[2]
            groups = math.ceil(per / group)
            key = f"model.layers.{layer}.mlp.experts.{name}"
            entries += [(f"{key}.qdata", "U8", [e, groups * group // 2]), (f"{key}.scale", "F16", [e, groups]),
                        (f"{key}.zero", "F16", [e, groups])]
    header, off = {}, 0
    for key, dt, shape in entries:
        size = math.prod(shape) * (1 if dt == "U8" else 2)
        header[key] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    header["__metadata__"] = {"base_fingerprint": "random-qwen3-30b-shape", "quant": "4bit", "group_size": str(group)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(1)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, dt, shape in entries:
            if dt == "U8":
                for _ in range(shape[0]):
                    f.write(torch.randint(0, 256, (shape[1],), dtype=torch.uint8, generator=g).numpy().tobytes())
            elif key.endswith("scale"):  # range of a std-0.02 group of 64 is ~0.1 -> step 0.1/15
                f.write(torch.full(shape, 0.1 / 15, dtype=torch.float16).numpy().tobytes())
            else:
                f.write(torch.full(shape, -0.05, dtype=torch.float16).numpy().tobytes())
    tmp.rename(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--train-top", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--calib-batches", type=int, default=1,
                    help="calibration batches of the selection (usaf train's default is 16; each is --batch-size "
                         "of the --sequences, cycled)")
    ap.add_argument("--dir", default="/tmp/usaf-qwen3-30b-shape")
    ap.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                    help="as usaf train --checkpointing (auto: the plan's rule)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the job runs (cuda: device peaks and the plan's device prediction are added)")
    ap.add_argument("--device-cap", default="",
                    help="cuda only: cap the caching allocator at this size (e.g. 8GB) with "
                         "torch.cuda.set_per_process_memory_fraction; the plan is asked for the same budget")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                    help="compute dtype (auto: bf16 on a GPU and on CPUs with native bf16, else fp32, as usaf train)")
    ap.add_argument("--profile", default="",
                    help="write torch.profiler's table of the second training step (ops by self CPU time) to this "
                         "file")
    ap.add_argument("--device-memory", default="",
                    help="simulate a device of this size (e.g. 8GB): compare usaf plan's device peaks for it "
                         "with the heap bytes in use (malloc'd, i.e. every tensor) plus the frozen stacks the "
                         "plan puts on the device")
    a = ap.parse_args()
    # The generated 4-bit cache carries no per-tensor checksums: verified, it would be taken for a damaged cache,
    # deleted and rebuilt from the checkpoint, which has no expert tensors (LayoutError).
    os.environ.setdefault("USAF_VERIFY_CACHE", "0")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("real_shape.py --device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        device = torch.device("cuda", torch.cuda.current_device())  # the allocator's calls need the index
        if a.device_memory:
            sys.exit("--device-memory simulates a device on the CPU; with --device cuda use --device-cap")
        if a.device_cap:
            from usaf.units import parse_bytes

            total = torch.cuda.get_device_properties(device).total_memory
            cap = parse_bytes(a.device_cap)
            if not 0 < cap <= total:
                sys.exit(f"--device-cap {a.device_cap}: must be > 0 and at most the device's {total / 2**30:.1f} GiB")
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
    elif a.device_cap:
        sys.exit("--device-cap needs --device cuda")

    import transformers  # noqa: F401 - imported before the runtime baseline, as in a training run

    import usaf
    from usaf.data.examples import Example
    from usaf.engine.loss import token_mean_loss
    from usaf.load.stream import ShardReader, cache_path, load_streamed
    from usaf.load.tiers import Prefetcher
    from usaf.memory.prefix import PrefixCache, first_trainable_layer, release_prefix

    heap_runtime = heap_in_use()  # Python + torch + transformers imported: the plan's host "runtime" item
    from usaf.units import DTYPES, auto_dtype_name

    dtype_name = auto_dtype_name(on_cpu=device.type == "cpu") if a.dtype == "auto" else a.dtype
    dtype = DTYPES[dtype_name]
    d = Path(a.dir) / f"L{a.layers}"
    cfg = usaf.UsafConfig(quant="4bit", train_layers=f"top:{a.train_top}", density=0.005)
    t0 = time.perf_counter()
    if not (d / "config.json").exists():
        write_checkpoint(d, a.layers)
    cpath = cache_path(d, ShardReader(d), cfg, dtype, Path(a.dir) / "quant")
    if not cpath.exists():
        write_quant_cache(cpath, a.layers)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if device.type == "cuda":  # the tier `usaf train` (load_prepared, --tier auto) would choose for this device
        from transformers import AutoConfig

        from usaf.load.stream import expert_bytes
        from usaf.load.tiers import choose_tier

        tier = choose_tier(expert_bytes(AutoConfig.from_pretrained(d), cfg), device, a.device_cap or None)
    else:
        tier = "disk"
    handle = load_streamed(d, cfg, dtype=dtype, device=device, tier=tier, cache_root=Path(a.dir) / "quant")
    model = handle.model
    model.to(device)
    load_s, rss_load = time.perf_counter() - t0, rss_mb()
    pf = Prefetcher(handle)
    g = torch.Generator().manual_seed(2)
    examples = []
    for _ in range(a.sequences):
        ids = torch.randint(10, QWEN3_30B["vocab_size"], (a.seq_len,), generator=g).tolist()
        examples.append(Example(ids, ids))
    start = first_trainable_layer(handle)
    t0 = time.perf_counter()
    if start > 0:
        model.usaf_prefix = PrefixCache.build(handle, examples, start, a.batch_size, 0,
                                              cache_root=Path(a.dir) / "prefix")
        release_prefix(handle, start)
    prefix_s, peak_prefix = time.perf_counter() - t0, peak_mb()

    from usaf.data.batches import collate

    def batch(k):
        rows = [examples[(k * a.batch_size + j) % len(examples)] for j in range(a.batch_size)]
        b = collate(rows, 0)
        b["index"] = torch.tensor([(k * a.batch_size + j) % len(examples) for j in range(a.batch_size)])
        return b

    if a.device_memory:
        # The non-expert weights the device would hold (all but the input embeddings, which only the prefix
        # build used) may be zero-copy views of the checkpoint's mmap: copy them so the heap counts them.
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            for p in model.parameters():
                if not p.is_meta and p is not emb:
                    p.data = p.data.clone()
    from usaf.engine.checkpointing import enable_checkpointing
    from usaf.memory.policy import use_checkpointing

    ckpt = use_checkpointing(handle, a.checkpointing, a.batch_size, a.seq_len)  # auto: usaf train's choice
    if ckpt:
        enable_checkpointing(handle)
    # The heap sampler (glibc mallinfo2 every 2 ms and at every layer) walks the heap: it cost about a sixth of
    # a core at this shape, so it runs only where its figures are used (--device-memory).
    heap = HeapPeak(model).__enter__() if a.device_memory else None
    heap_resident = heap_in_use()  # non-expert weights of the trainable range, prefix cache handle, data
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        dev_resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    usaf.select(handle, [batch(k) for k in range(a.calib_batches)], loss_fn=token_mean_loss)
    if cuda:
        torch.cuda.synchronize(device)
        dev_select = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)
    select_s = time.perf_counter() - t0
    peak_select = peak_mb()
    heap_select = heap.reset() if heap else 0
    from usaf.bench.harness import reset_peak_rss

    steps_phase = reset_peak_rss()  # the kernel's high-water mark, reset: the steps' own peak is measured below
    opt = usaf.UsafOptimizer(handle, lr=1e-4)
    times, rss_steps, cpu_user, cpu_sys = [], [], [], []
    for k in range(a.steps):
        prof = None
        if a.profile and k == min(1, a.steps - 1):
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], with_stack=True).__enter__()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        b = batch(k)
        from usaf.engine.loss import lm_loss  # the loss `usaf train` uses

        s, n = lm_loss(model, b, device)
        (s / n).backward()
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_user.append(ru1.ru_utime - ru0.ru_utime)
        cpu_sys.append(ru1.ru_stime - ru0.ru_stime)
        rss_steps.append(rss_mb())
        if prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
            Path(a.profile).write_text(f"step {k}: {times[-1]:.2f} s wall, {cpu_user[-1]:.2f} s user, "
                                       f"{cpu_sys[-1]:.2f} s system\n{where_time_goes(prof)}\n{table}")
    if heap:
        heap.__exit__(None, None, None)
    heap_steps = heap.peak if heap else 0
    pf.close()
    step_s = sorted(times)[len(times) // 2]
    out = {
        "layers": a.layers, "train_top": a.train_top, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "generate_s": round(gen_s, 1), "load_s": round(load_s, 1), "rss_after_load_mb": round(rss_load),
        "prefix_s": round(prefix_s, 1), "peak_rss_through_prefix_mb": round(peak_prefix),
        "calib_batches": a.calib_batches, "select_s": round(select_s, 1), "step_s_median": round(step_s, 2),
        "step_cpu_user_s": [round(x, 2) for x in cpu_user], "step_cpu_sys_s": [round(x, 2) for x in cpu_sys],
        "tokens_per_s": round(a.seq_len * a.batch_size / step_s, 1),
        "rss_during_steps_mb": round(max(rss_steps)), "peak_rss_through_select_mb": round(peak_select),
        "steps_peak_rss_mb": round(peak_mb()) if steps_phase else None,
        "peak_rss_mb": round(max(peak_select, peak_mb())),
        "active": handle.active(), "cache_gb": round(cpath.stat().st_size / 1e9, 2),
        "checkpointing": ckpt, "device": str(device), "threads": a.threads, "dtype": dtype_name,
    }
    if cuda:
        from usaf.memory.plan import predict
        from usaf.units import parse_bytes

        mb = lambda x: round(x / 2**20)  # noqa: E731
        p = predict(json.loads((d / "config.json").read_text()), seq_len=a.seq_len, batch_size=a.batch_size,
                    density=0.005, train_layers=f"top:{a.train_top}", quant="4bit", dtype=dtype_name, calib_batches=a.calib_batches,
                    device_memory=a.device_cap or None, device="cuda")
        runtime = sum(q["bytes"] for q in p["train"]["breakdown"]
                      if q["tier"] == "device" and q["item"].startswith("runtime (CUDA"))
        out["cuda"] = {
            "name": torch.cuda.get_device_name(device), "cap": a.device_cap or None,
            "cap_mb": mb(parse_bytes(a.device_cap) if a.device_cap else torch.cuda.get_device_properties(device).total_memory),
            "tier": tier, "resident_mb": mb(dev_resident),
            "select_peak_allocated_mb": mb(dev_select[0]), "select_peak_reserved_mb": mb(dev_select[1]),
            "step_peak_allocated_mb": mb(torch.cuda.max_memory_allocated(device)),
            "step_peak_reserved_mb": mb(torch.cuda.max_memory_reserved(device)),
            # the plan's device peaks include its CUDA runtime item (context, workspaces), which the allocator's
            # counters do not see: compare the counters with the plan minus that item
            "plan_select_peak_mb": mb(p["select_peak_device_bytes"]),
            "plan_step_peak_mb": mb(p["train_peak_device_bytes"]),
            "plan_cuda_runtime_mb": mb(runtime),
            "plan_budget_mb": mb(p["device_budget_bytes"]) if p.get("device_budget_bytes") else None,
            "plan_fits": p["fits"],
        }
    try:
        from usaf.memory.plan import predict

        p = predict(json.loads((d / "config.json").read_text()), seq_len=a.seq_len, batch_size=a.batch_size,
                    density=0.005, train_layers=f"top:{a.train_top}", quant="4bit", dtype=dtype_name, calib_batches=a.calib_batches,
                    device_memory=None, host_memory=None, device="cpu", prefix_cache=start > 0)  # as run here
        out["plan_train_peak_host_mb"] = round(p.get("train_peak_host_bytes", 0) / 2**20)
        out["plan_select_peak_host_mb"] = round(p.get("select_peak_host_bytes", 0) / 2**20)
        out["plan_step_peak_host_mb"] = round(p.get("train", {}).get("step_peak_host_bytes", 0) / 2**20)
    except Exception as e:  # noqa: BLE001 - the planner is optional here
        out["plan_error"] = str(e).splitlines()[0][:200]
    if a.device_memory:
        # Simulated device: what a GPU run would hold on the device = every tensor allocated by the run
        # (heap in use above the runtime baseline) + the frozen stacks the plan places on the device (here
        # they stay in the disk tier's mmap, which the heap does not count).
        from usaf.memory.plan import predict

        p = predict(json.loads((d / "config.json").read_text()), seq_len=a.seq_len, batch_size=a.batch_size,
                    density=0.005, train_layers=f"top:{a.train_top}", quant="4bit", dtype=dtype_name, calib_batches=a.calib_batches,
                    device_memory=a.device_memory, device="cuda")
        parts = p["train"]["breakdown"]
        on_dev = lambda pred: sum(q["bytes"] for q in parts if q["tier"] == "device" and pred(q["item"]))  # noqa: E731
        frozen_dev = on_dev(lambda item: item.startswith("frozen experts"))
        cuda_runtime = on_dev(lambda item: item.startswith("runtime (CUDA"))
        mb = lambda x: round(x / 2**20)  # noqa: E731
        out["device_sim"] = {
            "device_memory": a.device_memory, "budget_mb": mb(p["device_budget_bytes"]),
            "frozen_experts_on_device_mb": mb(frozen_dev),
            "heap_runtime_baseline_mb": mb(heap_runtime), "heap_resident_mb": mb(heap_resident - heap_runtime),
            "measured_select_peak_mb": mb(heap_select - heap_runtime + frozen_dev),
            "measured_step_peak_mb": mb(heap_steps - heap_runtime + frozen_dev),
            "plan_select_peak_mb": mb(p["select_peak_device_bytes"] - cuda_runtime),
            "plan_step_peak_mb": mb(p["train_peak_device_bytes"] - cuda_runtime),
            "plan_cuda_runtime_mb (not simulated)": mb(cuda_runtime),
            "plan_fits": p["fits"],
        }
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
