"""Amaranth-sim tests of the whole MAC array against hbfp_hw.bfp_matmul, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gemm import bfp_matmul

from mac_array_helpers import quantized, random_operand, run_gemm_amaranth


def _check(cfg, sa, ta, sb, tb, rng, **kw):
    got = run_gemm_amaranth(cfg, sa, ta, sb, tb, rng, **kw)
    exp = bfp_matmul(sa.T if ta else sa, sb.T if tb else sb, guard_bits=cfg.guard_bits,
                     k_max=cfg.k_max)
    gb, eb = got.view(np.uint32), exp.view(np.uint32)
    bad = np.argwhere(gb != eb)
    assert not len(bad), f"{len(bad)} outputs differ, first {bad[0]}: {gb[tuple(bad[0])]:#x} " \
                         f"vs {eb[tuple(bad[0])]:#x}"
    return got


CONFIGS = [
    MacArrayConfig(rows=2, cols=2, lanes=2, tile=4, man_bits_a=4, man_bits_b=4, k_max=64,
                   mapping="lut"),
    MacArrayConfig(rows=2, cols=4, lanes=1, tile=4, man_bits_a=8, man_bits_b=6, k_max=64,
                   mapping="dsp"),
    MacArrayConfig(rows=1, cols=2, lanes=4, tile=4, man_bits_a=4, man_bits_b=4, k_max=64,
                   mapping="dsp-packed", guard_bits=3),
    # 2x2 products per multiplier, 8 lanes (two-stage lane sums)
    MacArrayConfig(rows=2, cols=2, lanes=8, tile=8, man_bits_a=4, man_bits_b=4, k_max=64,
                   mapping="dsp-packed"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.rows}x{c.cols}x{c.lanes}-"
                         f"{c.man_bits_a}b{c.man_bits_b}-{c.mapping}")
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_random_gemm_padded_with_stalls(cfg, ta, tb, rng):
    M, K, N = 5, 11, 7               # not multiples of tile, rows or cols
    A, B = random_operand(rng, (M, K), 2), random_operand(rng, (K, N), 2)
    sa = quantized(cfg, A.T if ta else A)
    sb = quantized(cfg, B.T if tb else B, "b")
    _check(cfg, sa, bool(ta), sb, bool(tb), rng, stall=0.4)


def test_accumulator_extreme_no_overflow(rng):
    """All mantissas at the maximum magnitude over K = k_max: the accumulator reaches
    its derived bound (nkb * T * mmax_a * mmax_b * 2**G) without overflowing."""
    cfg = MacArrayConfig(rows=2, cols=2, lanes=4, tile=4, man_bits_a=5, man_bits_b=5,
                         k_max=40, guard_bits=8, mapping="dsp")
    K = cfg.k_max
    bound = (K // cfg.tile) * cfg.tile * cfg.mmax_a * cfg.mmax_b << cfg.guard_bits
    # the width is exactly what the bound needs: one bit less would overflow
    assert bound < 2 ** (cfg.acc_bits - 1) and bound >= 2 ** (cfg.acc_bits - 2)
    big = np.float32(1.999)
    A = np.full((2, K), big, np.float32)
    A[1] = -big
    B = np.full((K, 2), big, np.float32)
    sa, sb = quantized(cfg, A), quantized(cfg, B, "b")
    assert np.all(np.abs(sa.mantissas[:2, :K]) == cfg.mmax_a)
    assert np.all(np.abs(sb.mantissas[:K, :2]) == cfg.mmax_b)
    _, acc, _ = bfp_matmul(sa, sb, guard_bits=cfg.guard_bits, k_max=K, return_acc=True)
    assert acc[0, 0] == bound and acc[1, 0] == -bound
    got = _check(cfg, sa, False, sb, False, rng, stall=0.0)
    # value check independent of the golden: bound * 2**(e_ref - G - fa - fb)
    e = 0  # 1.999 has exponent 0 in both operands
    want = np.float32(bound * 2.0 ** (e + e - cfg.guard_bits - cfg.frac_a - cfg.frac_b))
    assert got[0, 0] == want and got[0, 1] == want
    assert got[1, 0] == -want and got[1, 1] == -want


def test_hyperblock_three_gemms_from_one_quantization(rng):
    """X, W, dY quantized once: forward X W^T, dX = dY W, dW = dY^T X."""
    cfg = MacArrayConfig(rows=2, cols=2, lanes=2, tile=4, man_bits_a=6, man_bits_b=6,
                         k_max=64, mapping="dsp")
    batch, d_in, d_out = 9, 7, 6
    X = quantized(cfg, random_operand(rng, (batch, d_in)))
    W = quantized(cfg, random_operand(rng, (d_out, d_in)), "b")
    dY = quantized(cfg, random_operand(rng, (batch, d_out)))
    y = _check(cfg, X, False, W, True, rng)
    dx = _check(cfg, dY, False, W, False, rng)
    dw = _check(cfg, dY, True, X, False, rng)
    assert y.shape == (batch, d_out) and dx.shape == (batch, d_in) and dw.shape == (d_out, d_in)


def test_invalid_blocks_give_nan(rng):
    cfg = CONFIGS[0]
    A, B = random_operand(rng, (8, 8)), random_operand(rng, (8, 8))
    A[5, 1] = np.inf
    sa = quantized(cfg, A, nonfinite="flag")
    sb = quantized(cfg, B, "b", nonfinite="flag")
    got = _check(cfg, sa, False, sb, False, rng)
    assert np.isnan(got[4:8]).all() and not np.isnan(got[:4]).any()


@pytest.mark.sweep
@pytest.mark.parametrize("rows,cols,lanes,tile", [(1, 1, 1, 2), (2, 4, 2, 8), (4, 2, 8, 8),
                                                  (4, 4, 4, 4)])
@pytest.mark.parametrize("ma,mb", [(2, 2), (3, 7), (8, 8), (12, 5)])
@pytest.mark.parametrize("mapping", ["lut", "dsp", "dsp-packed"])
def test_sweep_shapes_widths(rows, cols, lanes, tile, ma, mb, mapping, rng):
    cfg = MacArrayConfig(rows=rows, cols=cols, lanes=lanes, tile=tile, man_bits_a=ma,
                         man_bits_b=mb, k_max=4 * tile, mapping=mapping)
    M, K, N = (int(x) for x in rng.integers(1, 2 * tile + 2, 3))
    K = min(K, cfg.k_max)
    A, B = random_operand(rng, (M, K)), random_operand(rng, (K, N))
    ta, tb = (bool(x) for x in rng.integers(0, 2, 2))
    _check(cfg, quantized(cfg, A.T if ta else A), ta, quantized(cfg, B.T if tb else B, "b"),
           tb, rng)
