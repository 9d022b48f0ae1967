"""The CUDA paths against the stock model on the same device, against the CPU, and against each other.

Every test here needs a CUDA device (``pytest -m cuda``; ``bench/gpu_check.sh`` runs them). The gradient
checks run in float32 with TF32 off, so the reference is the plain dense autograd on the same GPU.
"""

import copy
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import usaf
from usaf.cli import main
from usaf.testing import FAMILIES, make_tiny_model, save_tiny_checkpoint
from usaf.train import recipe as trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IDS = torch.randint(6, 320, (2, 24), generator=torch.Generator().manual_seed(1))
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _prepared_on_cuda(family, **kw):
    stock = make_tiny_model(family, seed=0).cuda()
    model = copy.deepcopy(stock)
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05, **kw))
    g = torch.Generator().manual_seed(0)
    for d in list(handle.deltas().values()) + list(handle.shared_deltas().values()):
        k = max(1, int(0.02 * d.numel))
        d.set(torch.randperm(d.numel, generator=g)[:k], torch.randn(k, generator=g) * 0.02)
    return stock, model, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_values_and_router_gradients_equal_dense_autograd(family):
    stock, model, handle = _prepared_on_cuda(family)
    ids = IDS.cuda()
    params = dict(stock.named_parameters())
    for p in stock.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for key, d in list(handle.deltas().items()) + list(handle.shared_deltas().items()):
            params[key].add_(d.to_dense().to(params[key].dtype).view(params[key].shape))
    for key in list(handle.deltas()) + list(handle.router_parameters()):
        params[key].requires_grad_(True)
    loss_ref = stock(ids, labels=ids).loss
    loss_ref.backward()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.device.type == "cuda"
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for key, d in handle.deltas().items():
        assert d.values.device.type == "cuda"
        dense = params[key].grad.reshape(-1)[d.indices.long()]
        torch.testing.assert_close(d.values.grad, dense, rtol=1e-4, atol=1e-7)
    for key, p in handle.router_parameters().items():
        torch.testing.assert_close(p.grad, params[key].grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_cuda_lean_checkpointing_gives_the_same_gradients(family):
    from usaf.engine.checkpointing import enable_checkpointing

    _, model, handle = _prepared_on_cuda(family)
    ids = IDS.cuda()
    model.train()
    model(ids, labels=ids).loss.backward()
    params = handle.trainable_parameters()
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    enable_checkpointing(handle)
    assert all(m.experts.mode.lean for m in handle.layers)
    model(ids, labels=ids).loss.backward()
    for a, p in zip(ref, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


# --- the command line on the GPU ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt", per_expert=True)
    rows = [{"text": f"{WORDS[i % 17]} {WORDS[(3 * i + 1) % 17]} and more {i % 5}. " * 3} for i in range(48)]
    data, evald = root / "train.jsonl", root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evald.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    return ckpt, data, evald


def _train(files, out, *extra):
    ckpt, data, evald = files
    return main(["train", "--model", str(ckpt), "--data", str(data), "--eval-data", str(evald), "--out", str(out),
                 "--steps", "8", "--seq-len", "48", "--batch-size", "4", "--lr", "0.01", "--density", "0.05",
                 "--reselect-every", "4", "--calib-batches", "2", "--seed", "3", "--quiet", *extra])


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_cuda_run_matches_the_cpu_run_and_usaf_eval_reproduces_it(files, tmp_path, capsys):
    """fp32: the GPU run's first loss (before any update) equals the CPU's; the later steps and the active sets
    agree closely (different reduction orders can only move top-k boundary ties); `usaf eval --device cuda`
    reproduces the GPU run's own eval."""
    for name, dev in (("gpu", "cuda"), ("cpu", "cpu")):
        assert _train(files, tmp_path / name, "--device", dev, "--dtype", "fp32", "--quant", "none") == 0
    mg = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    mc = json.loads((tmp_path / "cpu" / "metrics.json").read_text())
    assert mg["peak_device_mb"] > 0 and mg["active_elements"] == mc["active_elements"]
    lg, lc = [r["loss"] for r in _log(tmp_path / "gpu")], [r["loss"] for r in _log(tmp_path / "cpu")]
    assert lg[0] == pytest.approx(lc[0], rel=1e-5)
    assert lg == pytest.approx(lc, rel=1e-3)
    assert mg["eval_ppl_after"] == pytest.approx(mc["eval_ppl_after"], rel=1e-3)
    dg, dc = load_file(tmp_path / "gpu" / "delta.safetensors"), load_file(tmp_path / "cpu" / "delta.safetensors")
    assert dg.keys() == dc.keys()
    for k in dg:
        if k.endswith(".indices"):
            a, b = set(dg[k].tolist()), set(dc[k].tolist())
            assert len(a & b) >= 0.99 * len(a | b), k
    capsys.readouterr()
    ckpt, _, evald = files
    assert main(["eval", "--model", str(ckpt), "--delta", str(tmp_path / "gpu" / "delta.safetensors"),
                 "--data", str(evald), "--device", "cuda", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] == mg["eval_tokens"]
    assert res["ppl"] == pytest.approx(mg["eval_ppl_after"], rel=1e-5)


def test_cuda_host_tier_with_side_stream_prefetch_trains_as_the_device_tier(files, tmp_path, monkeypatch):
    """4-bit base, bf16: with --device-memory too small for the experts they go to the host tier (pinned,
    copied ahead on a side stream); the run's losses equal the device tier's."""
    from usaf.load import stream

    tiers = []
    real = stream.choose_tier
    monkeypatch.setattr(stream, "choose_tier", lambda *a, **k: tiers.append(real(*a, **k)) or tiers[-1])
    assert _train(files, tmp_path / "dev", "--device", "cuda", "--quant", "4bit", "--dtype", "bf16") == 0
    assert _train(files, tmp_path / "host", "--device", "cuda", "--quant", "4bit", "--dtype", "bf16",
                  "--device-memory", "1KB") == 0
    assert tiers == ["device", "host"]
    assert [r["loss"] for r in _log(tmp_path / "dev")] == [r["loss"] for r in _log(tmp_path / "host")]


def test_cuda_interrupt_then_resume_equals_the_uninterrupted_run(files, tmp_path, monkeypatch):
    assert _train(files, tmp_path / "a", "--device", "cuda", "--dtype", "fp32") == 0
    calls = {"n": 0}
    real = trainer.token_mean_loss

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # 2 selection batches, steps 1-4, a reselection batch: during step 5
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "token_mean_loss", interrupting)
    assert _train(files, tmp_path / "b", "--device", "cuda", "--dtype", "fp32") == 130
    monkeypatch.setattr(trainer, "token_mean_loss", real)
    assert _train(files, tmp_path / "b", "--device", "cuda", "--dtype", "fp32", "--resume", str(tmp_path / "b")) == 0
    la, lb = [r["loss"] for r in _log(tmp_path / "a")], [r["loss"] for r in _log(tmp_path / "b")]
    assert len(la) == len(lb) == 8
    # CUDA's atomic scatter-adds may order a sum differently from run to run: equal to fp32 rounding
    assert lb == pytest.approx(la, rel=1e-5)
    da, db = load_file(tmp_path / "a" / "delta.safetensors"), load_file(tmp_path / "b" / "delta.safetensors")
    assert da.keys() == db.keys()
    for k in da:
        if k.endswith(".indices"):
            assert torch.equal(da[k], db[k]), k
        else:
            torch.testing.assert_close(db[k], da[k], rtol=1e-4, atol=1e-6)
    print(f"resume on CUDA bitwise identical: {la == lb and all(torch.equal(da[k], db[k]) for k in da)}")


def test_cuda_prefix_cache_trains_as_without_it(files, tmp_path, monkeypatch):
    """--train-layers top:1 on the GPU: the frozen-prefix cache (its layers and the untied input embeddings
    released from the device) gives the losses and eval of the same run without it."""
    monkeypatch.setenv("USAF_PREFIX_CACHE", str(tmp_path / "prefix"))
    common = ("--device", "cuda", "--dtype", "fp32", "--train-layers", "top:1", "--steps", "12")
    assert _train(files, tmp_path / "off", *common, "--no-prefix-cache") == 0
    assert _train(files, tmp_path / "on", *common) == 0
    assert len(list((tmp_path / "prefix").glob("*.bin"))) == 1  # the cache was built and used
    assert [r["loss"] for r in _log(tmp_path / "on")] == pytest.approx([r["loss"] for r in _log(tmp_path / "off")],
                                                                      rel=1e-5)
    mon = json.loads((tmp_path / "on" / "metrics.json").read_text())
    moff = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert mon["eval_ppl_after"] == pytest.approx(moff["eval_ppl_after"], rel=1e-5)
