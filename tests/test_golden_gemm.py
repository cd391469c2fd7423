"""Golden BFP GEMM: agreement with a slow integer model, error bound, HyperBlock reuse."""

from __future__ import annotations

import numpy as np
import pytest

import hbfp_hw as h
from reference_scalar import bfp_matmul_slow


def _slow(a: h.BFPTensor, b: h.BFPTensor, G: int):
    L = a.layout.block[1]
    return np.array(bfp_matmul_slow(
        a.mantissas.astype(int).tolist(), a.exponents.astype(int).tolist(), a.invalid.tolist(),
        a.layout.block[0], a.fmt.frac_bits,
        b.mantissas.astype(int).tolist(), b.exponents.astype(int).tolist(), b.invalid.tolist(),
        b.layout.block[1], b.fmt.frac_bits, L, G), dtype=np.float32)


def _data(rng, shape, spread=6):
    return (rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread, shape)
            ).astype(np.float32)


@pytest.mark.parametrize("G", [0, 3, 8])
@pytest.mark.parametrize("fa,fb", [(h.HBFP8, h.HBFP8), (h.HBFP4, h.HBFP8.replace(man_bits=6)),
                                   (h.MXINT8, None)])
def test_matches_slow_integer_model(fa, fb, G, rng):
    M, K, N = 21, 45, 18
    x, w = _data(rng, (M, K)), _data(rng, (N, K))
    if fb is None:      # MX: 1-D blocks along K for both operands
        aq = h.quantize(x, fa)
        bq = h.quantize(w, fa).T
    else:
        aq, bq = h.quantize(x, fa), h.quantize(w, fb).T
    got = h.bfp_matmul(aq, bq, guard_bits=G)
    want = _slow(aq, bq, G)[:M, :N]
    assert got.dtype == np.float32 and got.shape == (M, N)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("G", [0, 8, 16])
def test_error_bound_against_float64(G, rng):
    x, w = _data(rng, (40, 100), spread=12), _data(rng, (30, 100), spread=12)
    aq, bq = h.quantize(x, h.HBFP8), h.quantize(w, h.HBFP8).T
    y = h.bfp_matmul(aq, bq, guard_bits=G).astype(np.float64)
    ref = h.matmul_reference(aq, bq)
    bound = h.matmul_error_bound(aq, bq, guard_bits=G)
    assert np.all(np.abs(y - ref) <= bound)
    if G == 16:   # the bound is tight enough to matter: far below the quantisation error
        scale = np.abs(x).max() * np.abs(w).max()
        assert bound.max() < 1e-5 * scale


def test_accumulator_width_at_the_extreme():
    # all mantissas at the maximum magnitude, same exponents, K = k_max: the largest |acc|
    for ma, mb, L, kmax, G in [(8, 8, 16, 256, 8), (4, 4, 32, 4096, 8), (2, 2, 4, 4, 0),
                               (12, 8, 16, 1024, 8)]:
        fa = h.BFPFormat(man_bits=ma, block_shape=(L,), block_axes=(1,))
        fb = h.BFPFormat(man_bits=mb, block_shape=(L,), block_axes=(0,))
        a = np.full((2, kmax), 1.0, np.float32)
        b = np.full((kmax, 2), -1.0, np.float32)
        a[1] = -1.0
        aq, bq = h.quantize(a, fa), h.quantize(b, fb)
        assert np.all(np.abs(aq.mantissas) == 2 ** (ma - 2))
        # push to the max code: values just below 2^(E+1) saturate to mmax
        a2 = np.full((2, kmax), np.float32(1.9999), np.float32)
        b2 = np.full((kmax, 2), np.float32(-1.9999), np.float32)
        aq, bq = h.quantize(a2, fa), h.quantize(b2, fb)
        assert np.all(np.abs(aq.mantissas) == 2 ** (ma - 1) - 1)
        _, acc, _ = h.bfp_matmul(aq, bq, guard_bits=G, k_max=kmax, return_acc=True)
        width = h.accumulator_bits(ma, mb, L, kmax, G)
        expect = kmax * (2 ** (ma - 1) - 1) * (2 ** (mb - 1) - 1) * 2**G
        assert int(np.abs(acc).max()) == expect
        assert expect < 2 ** (width - 1) and expect >= 2 ** (width - 3)


def test_k_max_is_enforced(rng):
    aq = h.quantize(_data(rng, (4, 64)), h.MXINT8)
    bq = h.quantize(_data(rng, (4, 64)), h.MXINT8).T
    with pytest.raises(ValueError, match="K=64 exceeds k_max=32"):
        h.bfp_matmul(aq, bq, k_max=32)
    with pytest.raises(ValueError, match="exceeds the supported 53 bits"):
        h.bfp_matmul(h.quantize(_data(rng, (4, 64)), h.MXINT8.replace(man_bits=16)),
                     h.quantize(_data(rng, (4, 64)), h.MXINT8.replace(man_bits=16)).T,
                     guard_bits=24, k_max=2**20)


def test_mismatched_blocks_rejected(rng):
    aq = h.quantize(_data(rng, (4, 64)), h.MXINT8)
    bq = h.quantize(_data(rng, (64, 4)), h.HBFP8)
    with pytest.raises(ValueError, match="block length along K"):
        h.bfp_matmul(aq, bq)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        h.bfp_matmul(aq, h.quantize(_data(rng, (32, 4)), h.HBFP8))


def test_invalid_blocks_give_nan(rng):
    x, w = _data(rng, (32, 48)), _data(rng, (32, 48))
    x[20, 5] = np.inf
    w[3, 40] = np.nan
    aq = h.quantize(x, h.HBFP8, nonfinite="flag")
    bq = h.quantize(w, h.HBFP8, nonfinite="flag").T
    y = h.bfp_matmul(aq, bq)
    nan_rows = np.zeros(32, bool)
    nan_rows[16:32] = True          # tile row of x[20]
    nan_cols = np.zeros(32, bool)
    nan_cols[0:16] = True           # tile row of w[3]
    expect = nan_rows[:, None] | nan_cols[None, :]
    assert np.array_equal(np.isnan(y), expect)


def test_zero_operands_and_far_apart_exponents(rng):
    x = np.zeros((16, 32), np.float32)
    w = _data(rng, (16, 32))
    assert not h.bfp_matmul(h.quantize(x, h.HBFP8), h.quantize(w, h.HBFP8).T).any()
    # K-blocks with exponents 2^60 apart: the small block is shifted out entirely
    x = np.ones((16, 32), np.float32)
    x[:, 16:] = 2.0**-60
    y = h.bfp_matmul(h.quantize(x, h.HBFP8), h.quantize(np.ones((16, 32), np.float32),
                                                         h.HBFP8).T)
    assert np.all(y == 16.0)


def test_overflow_to_inf_and_flush_to_zero():
    big = np.full((16, 16), 2.0**100, np.float32)
    y = h.bfp_matmul(h.quantize(big, h.HBFP8), h.quantize(big, h.HBFP8).T)
    assert np.all(np.isposinf(y))
    tiny = np.full((16, 16), 2.0**-70, np.float32)
    y = h.bfp_matmul(h.quantize(tiny, h.HBFP8), h.quantize(tiny, h.HBFP8).T)
    assert np.all(y == 0.0) and not np.signbit(y).any()


def test_hyperblock_training_trio_quantize_once(rng):
    """Forward, dX and dW of a linear layer from X, W, dY each quantized once."""
    B, I, O = 48, 40, 24
    x, w, dy = _data(rng, (B, I), 3), _data(rng, (O, I), 3), _data(rng, (B, O), 3)
    fmt = h.HBFP8
    calls = []
    orig = h.quantize

    def counting_quantize(t, f, **kw):
        calls.append(t.shape)
        return orig(t, f, **kw)

    xq, wq, dyq = (counting_quantize(t, fmt) for t in (x, w, dy))
    y = h.bfp_matmul(xq, wq.T)          # reduces over in  (X's and W's axis 1)
    dx = h.bfp_matmul(dyq, wq)          # reduces over out (dY's axis 1, W's axis 0)
    dw = h.bfp_matmul(dyq.T, xq)        # reduces over batch (dY's and X's axis 0)
    assert len(calls) == 3
    for got, a, b in ((y, xq, wq.T), (dx, dyq, wq), (dw, dyq.T, xq)):
        ref = h.matmul_reference(a, b)
        assert np.all(np.abs(got - ref) <= h.matmul_error_bound(a, b))
    # and the quantized operands stay close to the float64 math of the raw tensors
    for got, ref in ((y, x @ w.T), (dx, dy @ w), (dw, dy.T @ x)):
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel < 0.05, rel
    # the transposed operands are bit-identical to re-quantizing the transposes
    assert wq.T.equal(orig(w.T, fmt)) and dyq.T.equal(orig(dy.T, fmt))
