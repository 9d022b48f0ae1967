"""Data parallel training: 2 processes (gloo, CPU) == 1 process with the same global batch.

Reference: 1 process with --batch-size 2 --grad-accum 2; data parallel: 2 processes with --batch-size 2 (both
a global batch of 4). Same micro-batch size, so even the selection must agree: importance is summed per
micro-batch of |gradient| (select.py), and every rank scores its micro-batches as one process does; with
--batch-size 4 in one process the selection would differ (it scores batches of 4), not the training step.

The 2-process run (``python -m torch.distributed.run --standalone --nproc-per-node 2 -m usaf train``) is
started first, the 1-process reference runs in this process meanwhile. ``usaf train --nproc 2`` (which
relaunches through the same module) is checked without starting processes.
"""

import json
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

# A real selection (5% of the expert weights); the 2-process run reselects at step 3 (after its checkpoint at
# step 2), the reference does not: they are compared up to step 3 and at the step-2 checkpoint. fp32 score
# buffers: summed in another order (per rank, then all-reduced), bf16 sums may break near-ties differently.
COMMON = ["--seq-len", "32", "--dtype", "fp32", "--steps", "4", "--density", "0.05", "--lr", "0.01",
          "--batch-size", "2", "--save-every", "2", "--score-dtype", "fp32", "--quiet"]
ONE = ["--grad-accum", "2", "--reselect-every", "0"]
TWO = ["--reselect-every", "3"]


def _train_args(ckpt, data, out, *extra):
    return ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), *COMMON, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt")
    rows = [{"text": f"{w} fox {w} dog {i} " * 4} for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 2)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "usaf"]
    two = subprocess.Popen(launch + _train_args(ckpt, data, root / "two", *TWO),
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert main(_train_args(ckpt, data, root / "one", *ONE)) == 0
        text, _ = two.communicate(timeout=300)
        assert two.returncode == 0, text
    finally:
        if two.poll() is None:
            two.kill()
    return root, ckpt, data


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _same_losses(la, lb):
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
        assert rb["tokens"] == ra["tokens"] and rb["active"] == ra["active"]


def _same_delta(da: dict, db: dict):
    keys = [k for k in da if "::" not in k or k.startswith("router::")]  # deltas and routers
    assert keys and set(keys) == {k for k in db if "::" not in k or k.startswith("router::")}
    for k in keys:
        if k.endswith("indices"):
            assert torch.equal(da[k], db[k]), k  # the same active sets
        else:
            assert torch.allclose(da[k], db[k], rtol=1e-4, atol=2e-5), (k, (da[k] - db[k]).abs().max())


def _state(out, step):
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "state.safetensors")


def test_two_processes_train_and_select_like_one_with_the_global_batch(runs):
    root, *_ = runs
    one, two = root / "one", root / "two"
    _same_losses(_log(one)[:3], _log(two)[:3])  # the reselection at step 3 comes after its loss
    _same_delta(_state(one, 2), _state(two, 2))
    m1, m2 = (json.loads((x / "metrics.json").read_text()) for x in (one, two))
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-5)
    assert m2["eval_tokens"] == m1["eval_tokens"]
    assert m2["active_elements"] < m2["expert_elements"] // 10  # a real selection, the same as one process'
    assert m2["world_size"] == 2 and m2["global_batch"] == m1["global_batch"] == 4
    resel = _log(two)[2]["reselect"]
    assert resel["grown"] > 0  # the active sets changed, identically on both ranks (checksum), and trained on
    # bytes per step: the values' and routers' gradients (+ one flag per tensor, the loss, the token counts)
    router = 2 * 8 * 64  # 2 layers x (8 experts x hidden 64)
    assert m2["comm_bytes"] == 4 * (m2["active_elements"] + router + 6 + 1) + 24
    assert all(r["comm_bytes"] == m2["comm_bytes"] for r in _log(two))
    assert m1["comm_bytes"] == 0


def test_resume_with_another_number_of_processes(runs, tmp_path, capsys):
    root, ckpt, data = runs
    out = tmp_path / "resumed"
    shutil.copytree(root / "two", out)  # the 2-process run, cut back to its checkpoint at step 2
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    capsys.readouterr()
    # the global batch must be kept: 2 processes x 2 -> 1 x 2 is refused before anything is loaded
    assert main(_train_args(ckpt, data, out, "--reselect-every", "0", "--resume", str(out))) == 2
    err = capsys.readouterr().err
    assert "global batch changed (4 -> 2" in err and "2 process(es)" in err
    # 1 process x 2 x --grad-accum 2 continues it exactly like the 1-process run (no reselection either)
    assert main(_train_args(ckpt, data, out, *ONE, "--resume", str(out))) == 0
    one = root / "one"
    _same_losses(_log(one), _log(out))
    _same_delta(load_file(one / "delta.safetensors"), load_file(out / "delta.safetensors"))
    m1, m3 = (json.loads((x / "metrics.json").read_text()) for x in (one, out))
    assert m3["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-5)


def test_selection_checksum_mismatch_raises(monkeypatch):
    delta = types.SimpleNamespace(indices=torch.tensor([1, 5, 9], dtype=torch.int32))
    handle = types.SimpleNamespace(deltas=lambda: {"layers.0.experts.down_proj": delta})
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


def test_gradient_bucket_keeps_missing_gradients_missing():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        d = distributed.Dist(rank=0, world=2)  # a one-member group stands in for the sum over ranks
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        c = torch.nn.Parameter(torch.zeros(4))
        a.grad, b.grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0], dtype=torch.bfloat16)
        sent, (loss,) = distributed.all_reduce_grads([a, b, c], d, [7.5])
        assert sent == 4 * (3 + 2 + 4 + 3 + 1) and loss == 7.5
        assert a.grad.tolist() == [1.0, 2.0, 3.0] and b.grad.dtype == torch.bfloat16 and c.grad is None
    finally:
        dist.destroy_process_group()


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
