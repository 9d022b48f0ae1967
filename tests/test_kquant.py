"""Requantizing the touched blocks of a ``--like-source`` export (``usaf.export.kquant``): the codes packers
agree with the dequantizer for every quantized type, untouched elements keep their exact values, moved ones
land on one of their two nearest grid values and keep small deltas in expectation, and a block whose new
values leave its scales' range is quantized afresh."""

import numpy as np
import pytest
import torch

from usaf.engine import ggml
from usaf.export.kquant import CODE_RANGE, quantize_rows, requantize_touched, with_codes

KINDS = list(CODE_RANGE)


def _deq(blocks, kind):
    return ggml.dequantize(torch.from_numpy(np.ascontiguousarray(blocks)), kind, ggml.BLOCKS[kind][0]).numpy()


def _blocks(kind, n=64, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 256)).astype(np.float32) * 0.02
    return quantize_rows(x, kind).reshape(-1, ggml.BLOCKS[kind][1])


def _grid(blocks, kind):
    block = ggml.BLOCKS[kind][0]
    zero = _deq(with_codes(blocks, np.zeros((len(blocks), block), np.int64), kind), kind)
    return zero, _deq(with_codes(blocks, np.ones((len(blocks), block), np.int64), kind), kind) - zero


@pytest.mark.parametrize("kind", KINDS, ids=ggml.type_name)
def test_codes_round_trip_through_the_dequantizer(kind):
    blocks = _blocks(kind)
    zero, step = _grid(blocks, kind)
    base = _deq(blocks, kind)
    q = np.rint(np.where(step != 0, (base - zero) / np.where(step != 0, step, 1), 0)).astype(np.int64)
    assert q.min() >= CODE_RANGE[kind][0] and q.max() <= CODE_RANGE[kind][1]
    assert np.array_equal(with_codes(blocks, q, kind), blocks)


@pytest.mark.parametrize("kind", KINDS, ids=ggml.type_name)
def test_touched_blocks_keep_their_scales_and_small_deltas_in_expectation(kind):
    blocks = _blocks(kind, n=256)
    base = _deq(blocks, kind)
    zero, step = _grid(blocks, kind)
    rng = np.random.default_rng(1)
    moved = (rng.random(base.shape) < 0.25) & (step != 0)
    target = np.where(moved, base + 0.3 * step, base).astype(np.float32)  # a delta of 0.3 steps
    got = _deq(requantize_touched(blocks, base, target, kind), kind)
    assert np.array_equal(got[~moved], base[~moved])  # untouched elements keep their exact values
    assert (np.abs(got - target)[moved] < np.abs(step)[moved] * 1.0001).all()  # one of the two nearest
    up = (got[moved] - base[moved]) / step[moved]
    assert set(np.unique(np.rint(up))) <= {0.0, 1.0}
    assert abs(up.mean() - 0.3) < 0.03  # the delta is kept in expectation (round-to-nearest would keep 0)
    again = requantize_touched(blocks, base, target, kind)
    assert np.array_equal(again, requantize_touched(blocks, base, target, kind))  # deterministic


@pytest.mark.parametrize("kind", KINDS, ids=ggml.type_name)
def test_a_block_pushed_out_of_its_range_is_quantized_afresh(kind):
    blocks = _blocks(kind, n=4)
    base = _deq(blocks, kind)
    target = base.copy()
    target[1, 3] = np.abs(base[1]).max() * 20 + 1.0  # far beyond what block 1's scales reach
    got = _deq(requantize_touched(blocks, base, target, kind), kind)
    assert np.array_equal(got[[0, 2, 3]], base[[0, 2, 3]])
    assert abs(got[1, 3] - target[1, 3]) < 0.05 * target[1, 3]
