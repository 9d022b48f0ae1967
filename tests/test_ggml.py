"""GGML dequantization in torch equals the gguf package's reference (numpy) bit for bit, for every type usaf
reads: random block bytes (every code, scale and bit pattern) with finite fp16 scales, and real quantized data."""

import numpy as np
import pytest
import torch

from usaf.engine import ggml

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
# where each type keeps its fp16 scales (byte offsets in a block)
_F16_AT = {T.MXFP4: [], T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4]


def _random_rows(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    if kind in (T.F32, T.F16, T.BF16):
        x = rng.standard_normal((rows, cols)).astype(np.float32) * 3
        return gguf.quants.quantize(x, kind).view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    if kind == T.MXFP4:  # E8M0 scales up to 2^31 (every code and subnormal scale; no overflow to inf)
        raw[:, 0] = rng.integers(0, 160, len(raw))
    for at in _F16_AT[kind]:
        raw[:, at : at + 2] = (rng.standard_normal(len(raw)) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_dequantize_bit_exact_random_blocks(kind):
    raw = _random_rows(kind, 6, 512)
    want = gguf.quants.dequantize(raw, kind).astype(np.float32)
    got = ggml.dequantize(torch.from_numpy(raw), int(kind), 512)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))
    formula = ggml.dequantize_blocks(torch.from_numpy(raw).reshape(-1, gguf.GGML_QUANT_SIZES[kind][1]), int(kind))
    assert np.array_equal(formula.reshape(want.shape).numpy().view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_chunked_and_unaligned_dequantization_is_the_reference(kind, monkeypatch):
    """Several chunks through the reused buffers, bf16 output, and bytes that are not int32-aligned (the
    byte-wise nibble path): the same values as the reference."""
    monkeypatch.setattr(ggml, "_CHUNK_CPU", 3 * 256)
    raw = _random_rows(kind, 10, 512, seed=3)
    want = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    shifted = torch.from_numpy(np.concatenate([np.zeros(1, np.uint8), raw.reshape(-1)]))[1:].view(raw.shape)
    assert shifted.data_ptr() % 4 == 1
    for r in (torch.from_numpy(raw), shifted):
        assert torch.equal(ggml.dequantize(r, int(kind), 512), want)
        assert torch.equal(ggml.dequantize(r, int(kind), 512, torch.bfloat16), want.to(torch.bfloat16))
    stack = ggml.GGMLStack([shifted.reshape(2, 5, -1)], [int(kind)], 512)
    assert torch.equal(stack.dequantize(1, 2, dtype=torch.float32), want.view(2, 5, 512)[1:2])


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4], ids=lambda k: k.name)
def test_dequantize_bit_exact_quantized_weights(kind):
    x = np.random.default_rng(1).standard_normal((4, 3, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, kind)
    want = gguf.quants.dequantize(q, kind)
    stack = ggml.GGMLStack([torch.from_numpy(q)], [int(kind)], 64)
    assert stack.shape == (4, 3, 64)
    got = stack.dequantize(1, 3, dtype=torch.float32)
    assert np.array_equal(got.numpy().view(np.int32), want[1:3].view(np.int32))


def test_stack_concatenates_parts_and_rounds_once():
    g = np.random.default_rng(2).standard_normal((3, 2, 256)).astype(np.float32)
    parts = [gguf.quants.quantize(g, T.Q8_0), _random_rows(T.Q6_K, 15, 256).reshape(3, 5, -1)]
    stack = ggml.GGMLStack([torch.from_numpy(p) for p in parts], [int(T.Q8_0), int(T.Q6_K)], 256)
    assert stack.shape == (3, 7, 256) and stack.nbytes() == sum(p.size for p in parts)
    want = np.concatenate([gguf.quants.dequantize(parts[0], T.Q8_0), gguf.quants.dequantize(parts[1], T.Q6_K)], 1)
    got = stack.dequantize(0, 3, dtype=torch.bfloat16)
    assert torch.equal(got, torch.from_numpy(want).to(torch.bfloat16))


def test_unknown_type_is_named():
    with pytest.raises(ValueError, match="Q3_K is not supported"):
        ggml.dequantize_blocks(torch.zeros(1, 110, dtype=torch.uint8), int(T.Q3_K))


def test_stack_interleaves_and_transposes_parts_as_gpt_oss_keeps_them():
    """gpt-oss's ``gate_up_proj [E, H, 2I]`` (gate/up columns interleaved) from a GGUF's ``[E, I, H]`` gate and up
    tensors, and ``down_proj [E, I, H]`` from its ``[E, H, I]``: the stack dequantizes straight into that layout."""
    rng = np.random.default_rng(4)
    gate, up = (rng.standard_normal((3, 4, 64)).astype(np.float32) for _ in range(2))
    parts = [torch.from_numpy(gguf.quants.quantize(x, T.MXFP4)) for x in (gate, up)]
    stack = ggml.GGMLStack(parts, [int(T.MXFP4)] * 2, 64, interleave=True, transposed=True)
    assert stack.shape == (3, 64, 8)
    g, u = (gguf.quants.dequantize(p.numpy(), T.MXFP4) for p in parts)
    got = stack.dequantize(1, 3, dtype=torch.float32)
    assert got.is_contiguous()
    assert torch.equal(got[..., 0::2], torch.from_numpy(g[1:3]).transpose(1, 2))
    assert torch.equal(got[..., 1::2], torch.from_numpy(u[1:3]).transpose(1, 2))
    down = ggml.GGMLStack([parts[0]], [int(T.MXFP4)], 64, transposed=True)
    assert down.shape == (3, 64, 4) and torch.equal(down.dequantize(0, 3, dtype=torch.float32),
                                                    torch.from_numpy(g).transpose(1, 2))
    assert down.to("cpu").shape == down.shape
