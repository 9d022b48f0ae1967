"""Data parallel training: N processes (gloo, CPU) == 1 process with the same micro-batches, bit for bit.

Rank r's k-th micro-batch is one process's micro-batch k * N + r with ``--grad-accum`` x N (``Batches``), and
every sum over ranks is folded in that order (``usaf.engine.ranks``): the gradients, the selection's score
buffers, reselection's streamed candidates, the step's loss. So the runs must agree exactly: the active sets
after the initial selection and after every reselection, every value, router and AdamW moment of every
step's checkpoint, every logged loss. Two pairs; the data-parallel runs start in the background, the
one-process runs meanwhile in this process (one thread, as each rank):

* 2 processes x ``--grad-accum 2`` (bf16 compute and bf16 score buffers, the defaults; attention deltas too)
  against 1 process x 4;
* 3 processes x ``--grad-accum 1`` (``--dtype fp32 --score-dtype fp32``) against 1 process x 3.

41 training sequences in micro-batches of 2 (the last one partial) and 8 steps of 8 or 6 sequences: both
pairs run past the end of the first epoch, where a global batch spans two epochs.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from usaf.cli import main
from usaf.testing import save_tiny_checkpoint
from usaf.train import distributed
from usaf.train.recipe import calib_batches

STEPS = 8
COMMON = ["--seq-len", "32", "--steps", str(STEPS), "--density", "0.01", "--lr", "0.01", "--batch-size", "2",
          "--quant", "none", "--reselect-every", "2", "--save-every", "1", "--keep-checkpoints", str(STEPS),
          "--quiet"]
PAIRS = {  # name: (processes, --grad-accum of each, one process' --grad-accum, extra flags)
    "two": (2, 2, 4, ["--attention-density", "0.02"]),  # attention deltas too: scored per rank, folded in order
    "three": (3, 1, 3, ["--dtype", "fp32", "--score-dtype", "fp32"]),
}


def _train_args(ckpt, data, out, *extra):
    return ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), *COMMON, *extra]


def _launch(n, args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "usaf"]
    return subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _one_thread(args) -> int:
    """``usaf <args>`` in this process with one thread, as each rank runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt")
    rows = [{"prompt": f"{w} fox {i} ", "completion": f"{w} dog {w} cat {i} " * (1 + i % 3)}
            for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 2)][:46]  # 41 train + 5 eval sequences
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    procs = []
    try:  # the data-parallel runs in the background, the one-process runs here meanwhile
        for name, (n, accum, _, extra) in PAIRS.items():
            procs.append(_launch(n, _train_args(ckpt, data, root / name, "--grad-accum", str(accum), *extra)))
        for name, (_, _, one_accum, extra) in PAIRS.items():
            args = _train_args(ckpt, data, root / f"{name}-one", "--grad-accum", str(one_accum), *extra)
            assert _one_thread(args) == 0
        for p in procs:
            text, _ = p.communicate(timeout=600)
            assert p.returncode == 0, text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return root, ckpt, data


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _state(out, step):
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "state.safetensors")


def _same_state(a: dict, b: dict, what: str):
    keys = [k for k in a if not k.startswith("rng::")]  # active sets, values, routers, masters, moments
    assert sorted(keys) == sorted(k for k in b if not k.startswith("rng::")), what
    assert any(k.endswith(".indices") for k in keys) and any(k.startswith("router::") for k in keys)
    for k in keys:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (what, k)


@pytest.mark.parametrize("name", PAIRS)
def test_n_processes_train_and_select_exactly_like_one(runs, name):
    root, *_ = runs
    n, accum, one_accum, _ = PAIRS[name]
    ranks, one = root / name, root / f"{name}-one"
    la, lb = _log(one), _log(ranks)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for ra, rb in zip(la, lb):
        assert ra["loss"] == rb["loss"] and ra["tokens"] == rb["tokens"] and ra["active"] == rb["active"]
        assert ra.get("reselect", {}).get("grown") == rb.get("reselect", {}).get("grown")
    assert [r["step"] for r in lb if r.get("reselect", {}).get("grown")] == [2, 4, 6]  # real reselections
    for step in range(1, STEPS + 1):  # selection, then every step and every reselection
        _same_state(_state(one, step), _state(ranks, step), f"step {step}")
    m1, mn = (json.loads((x / "metrics.json").read_text()) for x in (one, ranks))
    assert mn["world_size"] == n and mn["global_batch"] == m1["global_batch"] == 2 * accum * n
    assert m1["data"]["sequences"] == 46 and STEPS * mn["global_batch"] > 41  # past the first epoch's end
    assert mn["eval_tokens"] == m1["eval_tokens"]
    for k in ("eval_loss_before", "eval_loss_after"):  # eval sums per rank shard: the order differs
        assert mn[k] == pytest.approx(m1[k], rel=1e-6), k
    attention = 2 * 4 if "--attention-density" in PAIRS[name][3] else 0  # 2 layers x q/k/v/o
    assert any(".self_attn." in k for k in _state(ranks, 1)) == bool(attention)
    assert 0 < mn["active_elements"] < mn["expert_elements"] // 30  # density 0.01 (+ 2% of attention)
    # per step: the gradient bucket (values, routers, one flag per tensor) passes each rank once per
    # micro-batch plus the final broadcast; the micro-batches' losses (float64); the token counts
    router = 2 * 8 * 64  # 2 layers x (8 experts x hidden 64)
    bucket = 4 * (mn["active_elements"] + router + 6 + attention)
    assert mn["comm_bytes"] == bucket * (accum + 1) + 8 * accum * n + 24
    assert all(r["comm_bytes"] == mn["comm_bytes"] for r in lb)
    assert m1["comm_bytes"] == 0


def test_resume_with_another_number_of_processes(runs, tmp_path, capsys):
    root, ckpt, data = runs
    out = tmp_path / "resumed"
    shutil.copytree(root / "two", out)  # 2 processes x --grad-accum 2, cut back to its checkpoint at step 5
    for step in range(6, STEPS + 1):
        shutil.rmtree(out / "checkpoints" / f"step-{step:07d}")
    capsys.readouterr()
    # the global batch must be kept: 2 processes x 2 x 2 -> 1 x 2 x 2 is refused before anything is loaded
    extra = PAIRS["two"][3]
    assert main(_train_args(ckpt, data, out, "--grad-accum", "2", "--resume", str(out), *extra)) == 2
    err = capsys.readouterr().err
    assert "global batch changed (8 -> 4" in err and "2 process(es)" in err
    # 1 process x --grad-accum 4 continues it exactly like the 1-process run (incl. the reselection at step 6)
    assert _one_thread(_train_args(ckpt, data, out, "--grad-accum", "4", "--resume", str(out), *extra)) == 0
    one = root / "two-one"
    assert [r["loss"] for r in _log(one)] == [r["loss"] for r in _log(out)]
    for step in range(6, STEPS + 1):
        _same_state(_state(one, step), _state(out, step), f"step {step}")
    da, db = load_file(one / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_calibration_is_whole_global_steps():
    """N ranks score ceil(C / (A x N)) x A micro-batches each: one process with --grad-accum A x N the same."""
    for calib in range(1, 10):
        for accum in (1, 2, 3):
            for world in (1, 2, 3):
                per_rank = calib_batches(calib, accum, world)
                total = per_rank * world
                assert total == calib_batches(calib, accum * world, 1)
                assert total >= calib and total % (accum * world) == 0 and total - calib < accum * world
                assert total == math.ceil(calib / (accum * world)) * accum * world


def test_selection_checksum_mismatch_raises(monkeypatch):
    delta = types.SimpleNamespace(indices=torch.tensor([1, 5, 9], dtype=torch.int32))
    handle = types.SimpleNamespace(sparse_deltas=lambda: {"layers.0.experts.down_proj": delta})
    two = distributed.Dist(rank=1, world=2)

    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)  # the other rank has the same sets
    digest = distributed.check_same_selection(handle, two)
    assert digest == distributed.selection_digest(handle)

    def other_rank_differs(t, op=None):  # MIN/MAX over two ranks whose checksums differ
        if op == dist.ReduceOp.MAX:
            t += 1

    monkeypatch.setattr(dist, "all_reduce", other_rank_differs)
    with pytest.raises(RuntimeError, match="different active sets"):
        distributed.check_same_selection(handle, two)


def test_gradient_sum_accumulates_like_autograd():
    """The fold of per-micro-batch gradients equals autograd's own accumulation over the micro-batches, in each
    parameter's dtype (bf16 accumulates in bf16); a parameter without a gradient keeps None."""
    # values where the dtype and order of the sums show: 1 + u/2 + u/2 is 1 added one by one, 1 + u at once
    xs = [torch.tensor([1.0, -3.0, 0.5]), torch.tensor([2.0**-24, 1.0, 2.0**-26]), torch.tensor([2.0**-24, 2.0, 1.0])]
    ys = [torch.tensor(v, dtype=torch.bfloat16) for v in ([1.0, 4.0], [2.0**-8, -1.0], [2.0**-8, 2.0**-6])]

    def params():
        return (torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
                torch.nn.Parameter(torch.zeros(4)))

    def loss(a, b, k):
        return (a * xs[k]).sum() + (b * ys[k]).sum()

    ref = params()
    for k in range(3):  # one process: autograd accumulates .grad micro-batch by micro-batch
        loss(*ref[:2], k).backward()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        a, b, c = params()
        grads = distributed.GradientSum([a, b, c], distributed.Dist())
        for k in range(3):
            loss(a, b, k).backward()
            grads.add(0.5 * k)
            assert a.grad is None and b.grad is None  # taken into the bucket
        sent, total = grads.finish()
    finally:
        dist.destroy_process_group()
    assert torch.equal(a.grad, ref[0].grad) and a.grad.dtype == torch.float32
    assert torch.equal(b.grad, ref[1].grad) and b.grad.dtype == torch.bfloat16
    assert b.grad[0] == 1.0 and a.grad[0] == 1.0  # added in order, in their dtype
    assert (ys[0].float() + (ys[1].float() + ys[2].float())).bfloat16()[0] != 1.0  # another order differs
    assert c.grad is None
    assert total == 0.0 + 0.5 + 1.0 and sent == 4 * (3 + 2 + 4 + 3) * 4 + 8 * 3


def test_nproc_relaunches_through_torchrun(monkeypatch, capsys):
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    calls = []
    monkeypatch.setattr(torchrun, "run", lambda args: calls.append(args))
    argv = ["train", "--model", "m", "--nproc", "3", "--data", "d.jsonl", "--out", "o", "--batch-size", "2"]
    assert main(argv) == 0
    (args,) = calls
    assert args.nproc_per_node == "3" and args.standalone and args.module
    assert [args.training_script, *args.training_script_args] == \
        ["usaf", "train", "--model", "m", "--data", "d.jsonl", "--out", "o", "--batch-size", "2"]

    def failing(code):
        def run(args):
            failure = ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file="/nonexistent")
            raise ChildFailedError("usaf", {0: failure, 1: failure})
        return run

    monkeypatch.setattr(torchrun, "run", failing(2))  # the ranks stopped on a user error (rank 0 printed it)
    assert main(argv) == 2
    monkeypatch.setattr(torchrun, "run", failing(1))
    assert main(argv) == 1 and "2 of 3 processes failed" in capsys.readouterr().err
