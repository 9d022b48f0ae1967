import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import usaf.engine.quant as quant
from usaf.engine.quant import QuantizedTensor, QuantSpec


def _rand(shape, seed=0, dtype=torch.float32, heavy=False):
    g = torch.Generator().manual_seed(seed)
    if heavy:  # Student-t-ish heavy tails
        x = torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp_min(0.05).sqrt()
    else:
        x = torch.randn(shape, generator=g)
    return (x * 0.02).to(dtype)


def _group_bound(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Exact per-element error bound of min/max RTN with fp16 scale/zero, shaped like w (fp32)."""
    e = w.shape[0]
    x = w.float().reshape(e, -1)
    n = x.shape[1]
    gs = spec.group_size
    groups = -(-n // gs)
    pad = groups * gs - n
    if pad:
        x = torch.cat([x, x[:, -1:].expand(e, pad)], dim=1)
    g = x.view(e, groups, gs)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (mx - mn) / spec.qmax
    s16, z16 = s.half().float(), mn.half().float()
    bound = torch.maximum(s16 / 2, (mn - z16).abs() + spec.qmax * (s - s16).abs())
    # fp32 arithmetic slack (a few ulps of the magnitudes involved)
    bound = bound + 4 * torch.finfo(torch.float32).eps * (g.abs().amax(-1, keepdim=True) + s16 * spec.qmax)
    return bound.expand(e, groups, gs).reshape(e, -1)[:, :n].reshape(w.shape)


SPECS = [QuantSpec(4, 32, "minmax"), QuantSpec(4, 64, "minmax"), QuantSpec(4, 128, "minmax"), QuantSpec(8, 64),
         QuantSpec(8, 128)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}g{s.group_size}")
@pytest.mark.parametrize("shape", [(3, 64, 96), (3, 7, 13), (2, 33, 65), (5,), (4, 1, 8)])
@pytest.mark.parametrize("heavy", [False, True])
def test_roundtrip_error_within_group_bound(spec, shape, heavy):
    w = _rand(shape, seed=sum(shape), heavy=heavy)
    qt = QuantizedTensor.quantize(w, spec)
    d32 = qt.dequantize(dtype=torch.float32)
    assert d32.shape == w.shape and d32.dtype == torch.float32
    bound = _group_bound(w, spec)
    err = (d32 - w).abs()
    assert torch.all(err <= bound), (err - bound).max()
    # the bound is tight: most elements are within scale/2 (not dominated by fp16 slack)
    assert err.max() > 0
    # bf16 output = fp32 result rounded once to bf16
    d16 = qt.dequantize()
    assert d16.dtype == torch.bfloat16
    torch.testing.assert_close(d16, d32.to(torch.bfloat16), rtol=0, atol=0)
    assert torch.all((d16.float() - w).abs() <= bound + d32.abs() * 2.0**-8)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes_and_noncontiguous(in_dtype):
    w = _rand((6, 40, 48), seed=3, dtype=in_dtype)
    spec = QuantSpec(4, 64)
    qt = QuantizedTensor.quantize(w, spec)
    _assert_nearest_codes(w, qt)
    minmax = QuantSpec(4, 64, "minmax")
    err = QuantizedTensor.quantize(w, minmax).dequantize(dtype=torch.float32) - w.float()
    assert torch.all(err.abs() <= _group_bound(w, minmax))
    wt = w.transpose(1, 2)  # non-contiguous view
    assert not wt.is_contiguous()
    qt_t = QuantizedTensor.quantize(wt, spec)
    ref = QuantizedTensor.quantize(wt.contiguous(), spec)
    for k in ("qdata", "scale", "zero"):
        assert torch.equal(qt_t.tensors()[k], ref.tensors()[k])
    assert qt_t.dequantize().shape == (6, 48, 40)


def test_bits_per_weight():
    w = _rand((4, 128, 256))
    expected = {(4, 64): 4.5, (4, 128): 4.25, (4, 32): 5.0, (8, 64): 8.5, (8, 128): 8.25}
    for (bits, gs), bpw in expected.items():
        qt = QuantizedTensor.quantize(w, QuantSpec(bits, gs))
        assert qt.bits_per_weight() == pytest.approx(bpw)
        assert qt.nbytes() == sum(t.numel() * t.element_size() for t in qt.tensors().values())
        assert qt.nbytes() * 8 == pytest.approx(bpw * w.numel())
    assert QuantizedTensor.quantize(w, QuantSpec(4)).bits_per_weight() <= 4.5


def test_layout_contiguous_per_expert_and_packing():
    w = _rand((3, 10, 20))
    qt = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    groups = math.ceil(200 / 64)
    assert qt.qdata.shape == (3, groups * 32) and qt.qdata.dtype == torch.uint8
    assert qt.scale.shape == (3, groups) and qt.scale.dtype == torch.float16
    assert qt.zero.shape == (3, groups) and qt.zero.dtype == torch.float16
    assert all(t.is_contiguous() for t in qt.tensors().values())
    # documented nibble layout: byte j = elem j (low) | elem j + gs/2 (high)
    v = (torch.arange(64) // 4).float().view(1, 64)  # one group: min 0, max 15 -> scale 1, codes = j // 4
    qv = QuantizedTensor.quantize(v, QuantSpec(4, 64))
    j = torch.arange(32)
    assert torch.equal(qv.qdata[0], ((j // 4) | (((j + 32) // 4) << 4)).to(torch.uint8))
    assert qv.scale.item() == 1.0 and qv.zero.item() == 0.0
    assert torch.equal(qv.dequantize(dtype=torch.float32), v)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, 32)], ids=["b4", "b8"])
@pytest.mark.parametrize("shape", [(5, 16, 24), (5, 3, 7)])
def test_expert_range_equals_slice(spec, shape):
    w = _rand(shape, seed=7)
    qt = QuantizedTensor.quantize(w, spec)
    full = qt.dequantize()
    for start in range(shape[0] + 1):
        for stop in range(start, shape[0] + 1):
            part = qt.dequantize(start, stop)
            assert part.shape == (stop - start, *shape[1:])
            assert torch.equal(part, full[start:stop])
    assert torch.equal(qt.dequantize(-2), full[-2:])
    assert torch.equal(qt.dequantize(1, -1, device="cpu"), full[1:-1])
    assert torch.equal(
        qt.dequantize(2, 3, dtype=torch.float16), qt.dequantize(dtype=torch.float32)[2:3].half()
    )
    with pytest.raises(IndexError):
        qt.dequantize(0, shape[0] + 1)
    with pytest.raises(IndexError):
        qt.dequantize(3, 2)


def test_chunking_does_not_change_results(monkeypatch):
    w = _rand((7, 9, 50), seed=11)  # 450 elems/expert, not divisible by 64
    spec = QuantSpec(4, 64)
    ref = QuantizedTensor.quantize(w, spec)
    ref_d = ref.dequantize()
    ref_d32 = ref.dequantize(dtype=torch.float32)
    monkeypatch.setattr(quant, "_QUANT_CHUNK", 1)  # one expert per step
    one = QuantizedTensor.quantize(w, spec)
    monkeypatch.setattr(quant, "_QUANT_CHUNK", 3 * 512)  # three experts per step, last partial
    three = QuantizedTensor.quantize(w, spec)
    monkeypatch.setattr(quant, "_SEARCH_BLOCK", 64 * 3)  # the search on 3 groups at a time, last partial
    blocks = QuantizedTensor.quantize(w, spec)
    for k in ("qdata", "scale", "zero"):
        assert torch.equal(one.tensors()[k], ref.tensors()[k])
        assert torch.equal(three.tensors()[k], ref.tensors()[k])
        assert torch.equal(blocks.tensors()[k], ref.tensors()[k])
    monkeypatch.setattr(quant, "_DEQUANT_CHUNK_CPU", 64 * 5)  # 5 groups per step, crosses experts
    assert torch.equal(ref.dequantize(), ref_d)
    assert torch.equal(ref.dequantize(dtype=torch.float32), ref_d32)
    assert torch.equal(ref.dequantize(2, 6), ref_d[2:6])


def test_deterministic():
    w = _rand((4, 32, 64), seed=5, heavy=True)
    a = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    b = QuantizedTensor.quantize(w.clone(), QuantSpec(4, 64))
    for k in ("qdata", "scale", "zero"):
        assert torch.equal(a.tensors()[k], b.tensors()[k])
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_tensors(bits):
    spec = QuantSpec(bits, 64)
    for value in (0.0, 0.37, -1.25, 3.0e-3):
        w = torch.full((3, 5, 30), value)
        qt = QuantizedTensor.quantize(w, spec)
        d = qt.dequantize(dtype=torch.float32)
        assert torch.isfinite(d).all() and torch.isfinite(qt.scale).all()
        assert torch.equal(d, torch.full_like(w, torch.tensor(value).half().item()))
    # per-expert constants and a constant group inside otherwise random data
    w = _rand((3, 4, 64), seed=2)
    w[1] = 0.5
    w[2, 1] = -0.125
    qt = QuantizedTensor.quantize(w, spec)
    d = qt.dequantize(dtype=torch.float32)
    assert torch.isfinite(d).all()
    assert torch.equal(d[1], w[1]) and torch.equal(d[2, 1], w[2, 1])
    _assert_nearest_codes(w, qt)


def test_non_divisible_shapes():
    for shape, gs in [((3, 5, 7), 64), ((2, 65), 64), ((4, 3, 43), 128), ((1, 1, 1), 32)]:
        w = _rand(shape, seed=shape[-1])
        spec = QuantSpec(4, gs)
        qt = QuantizedTensor.quantize(w, spec)
        d = qt.dequantize(dtype=torch.float32)
        assert d.shape == w.shape and d.is_contiguous()
        _assert_nearest_codes(w, qt)
        minmax = QuantizedTensor.quantize(w, QuantSpec(4, gs, "minmax")).dequantize(dtype=torch.float32)
        assert torch.all((minmax - w).abs() <= _group_bound(w, QuantSpec(4, gs, "minmax")))
        assert qt.qdata.shape[1] == math.ceil(math.prod(shape[1:]) / gs) * gs // 2


def test_safetensors_roundtrip(tmp_path):
    w = _rand((3, 24, 40), seed=9)
    for spec in (QuantSpec(4, 64), QuantSpec(8, 128)):
        qt = QuantizedTensor.quantize(w, spec)
        path = tmp_path / f"q{spec.bits}.safetensors"
        save_file({f"layer0.experts.{k}": v for k, v in qt.tensors().items()}, str(path))
        loaded = load_file(str(path))
        sub = {k.rsplit(".", 1)[1]: v for k, v in loaded.items()}
        qt2 = QuantizedTensor.from_tensors(sub, qt.shape, qt.bits, qt.group_size)
        assert qt2.shape == qt.shape and qt2.bits == qt.bits and qt2.group_size == qt.group_size
        assert torch.equal(qt2.dequantize(), qt.dequantize())
        assert qt2.nbytes() == qt.nbytes()
    with pytest.raises(KeyError):
        QuantizedTensor.from_tensors({"qdata": qt.qdata}, qt.shape, qt.bits, qt.group_size)
    with pytest.raises(ValueError):
        QuantizedTensor.from_tensors(qt.tensors(), (3, 24, 60), qt.bits, qt.group_size)


def test_8bit_much_more_accurate_than_4bit():
    w = _rand((4, 64, 128), seed=1, heavy=True)

    def rel(spec):
        d = QuantizedTensor.quantize(w, spec).dequantize(dtype=torch.float32)
        return ((d - w).norm() / w.norm()).item()

    r4, r8 = rel(QuantSpec(4, 64)), rel(QuantSpec(8, 64))
    assert r8 < r4 / 10, (r4, r8)
    assert rel(QuantSpec(4, 32)) < r4 < rel(QuantSpec(4, 128))


def test_invalid_inputs():
    with pytest.raises(ValueError):
        QuantSpec(3)
    with pytest.raises(ValueError):
        QuantSpec(4, 60)
    w = _rand((2, 8, 8))
    w[1, 2, 3] = float("nan")
    with pytest.raises(ValueError):
        QuantizedTensor.quantize(w, QuantSpec(4))
    with pytest.raises(ValueError):
        QuantizedTensor.quantize(torch.full((2, 64), 1.0e6), QuantSpec(4))
    with pytest.raises(TypeError):
        QuantizedTensor.quantize(torch.zeros(2, 8, dtype=torch.int32), QuantSpec(4))


def test_to_and_empty():
    w = _rand((2, 8, 8))
    qt = QuantizedTensor.quantize(w, QuantSpec(4))
    assert qt.to("cpu") is qt
    assert qt.dequantize(1, 1).shape == (0, 8, 8)
    e = QuantizedTensor.quantize(torch.zeros(0, 4, 4), QuantSpec(4))
    assert e.dequantize().shape == (0, 4, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = _rand((6, 48, 80), seed=4, heavy=True)
    for spec in (QuantSpec(4, 64), QuantSpec(8, 64), QuantSpec(4, 128)):
        q_cpu = QuantizedTensor.quantize(w, spec)
        q_gpu = QuantizedTensor.quantize(w.cuda(), spec)
        assert q_gpu.device.type == "cuda"
        for k in ("qdata", "scale", "zero"):
            assert torch.equal(q_gpu.tensors()[k].cpu(), q_cpu.tensors()[k])
        ref = q_cpu.dequantize(1, 5, dtype=torch.float32)
        got = q_gpu.dequantize(1, 5, dtype=torch.float32)
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-7)
        moved = q_cpu.dequantize(1, 5, dtype=torch.float32, device="cuda")
        assert moved.device.type == "cuda"
        torch.testing.assert_close(moved.cpu(), ref, rtol=0, atol=1e-7)
        assert q_cpu.to("cuda").to("cpu").dequantize().equal(q_cpu.dequantize())


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_unaligned_buffer(offset):
    # mmap'd safetensors tensors may start at any byte; the 4-bit unpacker reads int32 words
    w = _rand((3, 16, 40), seed=12)
    qt = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    raw = bytearray(offset) + bytearray(qt.qdata.numpy().tobytes())
    q = torch.frombuffer(raw, dtype=torch.uint8, count=qt.qdata.numel(), offset=offset).view(qt.qdata.shape)
    moved = QuantizedTensor(q, qt.scale, qt.zero, qt.shape, qt.bits, qt.group_size)
    assert torch.equal(moved.dequantize(), qt.dequantize())
    assert torch.equal(moved.dequantize(1, 3, dtype=torch.float32), qt.dequantize(1, 3, dtype=torch.float32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 12, 64), (3, 7, 10)])  # whole groups; a padded last group
def test_dequantize_into_a_workspace_equals_a_fresh_tensor(bits, shape):
    from usaf.engine.store import DenseStack, Workspace

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q = QuantizedTensor.quantize(w, QuantSpec(bits=bits, group_size=64))
    ws = Workspace()
    for start, stop in ((0, shape[0]), (1, 3), (2, 3)):
        fresh = q.dequantize(start, stop, torch.bfloat16)
        out = ws.get("w", (stop - start, *shape[1:]), torch.bfloat16, torch.device("cpu"))
        got = q.dequantize(start, stop, out=out, workspace=ws)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, fresh)
    dense = DenseStack(w)
    out = ws.get("w", (2, *shape[1:]), torch.float32, torch.device("cpu"))
    assert torch.equal(dense.dequantize(1, 3, out=out), w[1:3].float())
    with pytest.raises(ValueError, match="contiguous"):
        q.dequantize(0, 2, out=torch.empty(2, *shape[1:]).transpose(1, 2))


def test_workspace_reuses_its_memory_and_grows():
    from usaf.engine.store import Workspace

    ws, cpu = Workspace(), torch.device("cpu")
    a = ws.get("x", (4, 8), torch.float32, cpu)
    b = ws.get("x", (2, 8), torch.bfloat16, cpu)  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8) and b.dtype == torch.bfloat16
    c = ws.get("x", (16, 8), torch.float32, cpu)  # larger: a new buffer of that size
    assert c.shape == (16, 8) and ws.nbytes() == 16 * 8 * 4
    assert ws.get("y", (3,), torch.int32, cpu).data_ptr() != c.data_ptr()  # slots do not share
    ws.clear()
    assert ws.nbytes() == 0


def test_workspace_hands_back_a_seen_shape_without_a_tensor_op():
    """The hot path asks for buffers thousands of times a step; on a GPU each tensor op is host time. A shape
    seen before costs no op (the same view), a new one one op; after the buffer grows, no view of the old one
    is handed out."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from usaf.engine.store import Workspace

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    ws, cpu = Workspace(), torch.device("cpu")
    a = ws.get("x", (4, 8), torch.float32, cpu)
    with Ops() as ops:
        again = ws.get("x", (4, 8), torch.float32, "cpu")  # the device as a string: the same slot
        other = ws.get("x", (2, 8), torch.float32, cpu)
    assert again is a and sum(ops.n.values()) == 1 and other.data_ptr() == a.data_ptr()
    a.fill_(1.0)
    big = ws.get("x", (64, 8), torch.float32, cpu)  # grows: a new buffer
    assert big.data_ptr() != a.data_ptr()
    assert ws.get("x", (4, 8), torch.float32, cpu).data_ptr() == big.data_ptr()  # not the stale view


def _groups(w: torch.Tensor, gs: int) -> torch.Tensor:
    """``w``'s per-expert groups ``[E, G, gs]`` in fp32, the last one padded by its last element."""
    x = w.float().reshape(w.shape[0], -1)
    pad = -x.shape[1] % gs
    if pad:
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
    return x.view(x.shape[0], -1, gs)


def _assert_nearest_codes(w: torch.Tensor, qt: QuantizedTensor) -> None:
    """Whatever chose the stored scale and zero, each code is the nearest one for them (the format's rule)."""
    g = _groups(w, qt.group_size)
    s, z = qt.scale.float().unsqueeze(-1), qt.zero.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = ((g - z) / safe).round().clamp(0, (1 << qt.bits) - 1)
    expect = (codes * s + z).reshape(w.shape[0], -1)[:, : math.prod(w.shape[1:])].reshape(w.shape)
    torch.testing.assert_close(qt.dequantize(dtype=torch.float32), expect, rtol=0, atol=0)


def _weighted_error(w: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Per group: sum of (rms(group) + |x|) (x_hat - x)^2, the search's objective."""
    g = _groups(w, qt.group_size)
    d = _groups(qt.dequantize(dtype=torch.float32), qt.group_size)
    wt = g.square().mean(-1, keepdim=True).sqrt() + g.abs()
    return (wt * (d - g).square()).sum(-1)


@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_mse_rounding_never_worse_than_minmax_per_group(heavy, gs):
    w = _rand((6, 48, 80), seed=gs, heavy=heavy)
    mse = QuantizedTensor.quantize(w, QuantSpec(4, gs))
    minmax = QuantizedTensor.quantize(w, QuantSpec(4, gs, "minmax"))
    _assert_nearest_codes(w, mse)
    e_mse, e_mm = _weighted_error(w, mse), _weighted_error(w, minmax)
    assert torch.all(e_mse <= e_mm * (1 + 1e-5)), (e_mse - e_mm).max()
    # and much better overall: the search finds a better scale and minimum in most groups
    assert (e_mse < e_mm * 0.99).float().mean() > 0.5
    assert e_mse.sum() < 0.95 * e_mm.sum(), (e_mse.sum(), e_mm.sum())
    plain = lambda q: ((q.dequantize(dtype=torch.float32) - w).norm() / w.norm()).item()  # noqa: E731
    assert plain(mse) < 0.99 * plain(minmax)


def test_mse_rounding_touches_only_4bit():
    w = _rand((3, 16, 64), seed=4, heavy=True)
    for k in ("qdata", "scale", "zero"):
        assert torch.equal(QuantizedTensor.quantize(w, QuantSpec(8, 64)).tensors()[k],
                           QuantizedTensor.quantize(w, QuantSpec(8, 64, "minmax")).tensors()[k])
    assert not torch.equal(QuantizedTensor.quantize(w, QuantSpec(4, 64)).scale,
                           QuantizedTensor.quantize(w, QuantSpec(4, 64, "minmax")).scale)
    with pytest.raises(ValueError, match="rounding"):
        QuantSpec(4, 64, "nearest")


def test_mse_rounding_is_the_same_whole_per_expert_and_on_any_thread_count(monkeypatch):
    """The streamed load quantizes expert by expert, a loaded model whole stacks: the codes must not depend on
    how many groups the search takes at once, nor on the threads (its sums run in a fixed order)."""
    w = _rand((3, 256, 520), seed=21, heavy=True)  # enough groups per block for the kernels to go parallel
    whole = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    experts = [QuantizedTensor.quantize(w[e : e + 1], QuantSpec(4, 64)) for e in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(quant, "_SEARCH_BLOCK", 64 * 7)
    small_blocks = QuantizedTensor.quantize(w, QuantSpec(4, 64))
    for k in ("qdata", "scale", "zero"):
        assert torch.equal(torch.cat([q.tensors()[k] for q in experts]), whole.tensors()[k])
        assert torch.equal(one_thread.tensors()[k], whole.tensors()[k])
        assert torch.equal(small_blocks.tensors()[k], whole.tensors()[k])
