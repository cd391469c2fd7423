"""Golden model: quantize / dequantize properties and agreement with the scalar reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hbfp_hw as h
from hbfp_hw.prng import random_bits
from reference_scalar import quantize_block, sr_bits_stream

MODES = ["nearest_even", "nearest_away", "toward_zero", "stochastic"]


def _lsb(q: h.BFPTensor) -> np.ndarray:
    """Per-element weight of one mantissa unit, in the padded layout."""
    lay = q.layout
    e = lay.grid_view(q.exponents.astype(np.float64))
    return np.broadcast_to(2.0 ** (e - q.fmt.frac_bits), lay.interleaved).reshape(lay.padded)


def _crop(a: np.ndarray, shape) -> np.ndarray:
    return a[tuple(slice(0, s) for s in shape)]


def _normal_tensor(rng, shape, spread=8):
    """float32 values well inside the normal range, with varied magnitudes and signs."""
    mag = rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread, size=shape)
    return mag.astype(np.float32)


# ---------------------------------------------------------------- scalar reference
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", [h.MXINT8, h.HBFP4, h.HBFP8.replace(man_bits=5, exp_bits=5),
                                 h.BFPFormat(man_bits=2, block_shape=(3, 5),
                                             block_axes=(0, 2))])
def test_matches_scalar_reference(fmt, mode, rng):
    fmt = fmt.replace(rounding=mode, sr_lanes=3, sr_bits=6, seed=int(rng.integers(2**32)))
    shape = (7, 5, 37) if fmt.block_axes == (0, 2) else (19, 37)
    x = _normal_tensor(rng, shape, spread=20)
    x[0, ...] = 0.0                                    # zero rows / blocks
    x.flat[5] = np.float32(1e-40)                      # a subnormal
    x.flat[9] = np.float32(2.0 ** 127 * 1.5)           # near the top of the range
    q = h.quantize(x, fmt)
    codes, mans = q.stream()
    lay = q.layout
    xs = lay.to_stream(np.pad(x, [(0, p - s) for s, p in zip(x.shape, lay.padded)]))
    us = sr_bits_stream(fmt.seed, fmt.sr_lanes, xs.size, fmt.sr_bits) \
        if mode == "stochastic" else None
    for b in range(xs.shape[0]):
        ub = us[b * xs.shape[1]:(b + 1) * xs.shape[1]] if us else None
        E, m, inv = quantize_block([float(v) for v in xs[b]], fmt, ub)
        assert not inv
        assert codes[b] == E + fmt.exp_bias, f"block {b}"
        assert mans[b].tolist() == m, f"block {b}"


@pytest.mark.parametrize("lanes,count,bits", [
    (1, 5000, 8), (8, 4099, 1), (3, 777, 24), (256, 600, 13), (1, 1, 32), (1, 255, 8),
    (1, 256, 8), (1, 257, 8), (16, 3000, 24), (256, 40000, 8),
    (1, 256 * 4097 + 5, 8),           # past the segment-start tables (4096 segments)
    (2, 2 * 256 * 4100, 7)])
def test_prng_jump_ahead_matches_sequential(lanes, count, bits, rng):
    seed = int(rng.integers(2**32))
    got = random_bits(seed, lanes, count, bits)
    assert got.dtype == np.int64
    assert got.tolist() == sr_bits_stream(seed, lanes, count, bits)


def test_prng_validation():
    with pytest.raises(ValueError, match=r"bits=0 is out of range; accepted range is \[1, 32\]"):
        random_bits(0, 1, 10, 0)
    assert random_bits(0, 1, 0, 8).size == 0


def test_prng_zero_lane_seed_is_replaced():
    # seed chosen so lane 0's initial state would be zero
    seed = 0x9E3779B9
    got = random_bits(seed, 1, 4, 32)
    assert got.tolist() == sr_bits_stream(seed, 1, 4, 32)
    assert all(v != 0 for v in got)


# ---------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, max_side=40),
                    elements=st.floats(-2.0**100, 2.0**100, width=32).filter(
                        lambda v: v == 0 or abs(v) > 1e-30)),
       mode=st.sampled_from(MODES), man_bits=st.integers(2, 12))
def test_idempotent(x, mode, man_bits):
    fmt = h.HBFP8.replace(man_bits=man_bits, rounding=mode, block_shape=(4, 8))
    q = h.quantize(x, fmt)
    q2 = h.quantize(h.dequantize(q), fmt)
    assert q2.equal(q)


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 70)),
                    elements=st.floats(-2.0**60, 2.0**60, width=32)),
       mode=st.sampled_from(MODES))
def test_sign_symmetry(x, mode):
    fmt = h.MXINT8.replace(rounding=mode, sr_lanes=4)
    q, qn = h.quantize(x, fmt), h.quantize(-x, fmt)
    assert np.array_equal(qn.exponents, q.exponents)
    assert np.array_equal(qn.mantissas, -q.mantissas)


@pytest.mark.parametrize("mode", MODES)
def test_error_bound_per_mode(mode, rng):
    fmt = h.HBFP8.replace(man_bits=6, rounding=mode, seed=7)
    x = _normal_tensor(rng, (96, 80))
    q = h.quantize(x, fmt)
    err = np.abs(h.dequantize(q).astype(np.float64) - x)
    lsb = _crop(_lsb(q), x.shape)
    sat = np.abs(x) - fmt.mmax * lsb          # excess over the largest code (saturation)
    if mode.startswith("nearest"):
        assert np.all(err <= np.maximum(0.5 * lsb, sat))
    else:
        assert np.all(err < np.maximum(lsb, sat + lsb))
    if mode == "toward_zero":
        assert np.all(np.abs(h.dequantize(q)) <= np.abs(x))


def test_ties_each_mode():
    # man_bits=4: frac_bits 2, block max 6.0 -> E=2, so y = x / 1; LSB = 1.0
    base = [6.0, 2.5, -2.5, 3.5, -0.5, 1.5, 0.5, 0.0]
    x = np.array([base], dtype=np.float32)
    expect = {
        "nearest_even": [6, 2, -2, 4, 0, 2, 0, 0],
        "nearest_away": [6, 3, -3, 4, -1, 2, 1, 0],
        "toward_zero": [6, 2, -2, 3, 0, 1, 0, 0],
    }
    for mode, m in expect.items():
        q = h.quantize(x, h.BFPFormat(man_bits=4, block_shape=(8,), rounding=mode))
        assert q.exponents.tolist() == [[2]]
        assert q.mantissas.tolist() == [m], mode


def test_saturation():
    fmt = h.BFPFormat(man_bits=4, block_shape=(4,))           # mmax 7, E from max
    # max = 7.9 -> E = 2, y = 7.9 -> rounds to 8 -> saturates to 7
    q = h.quantize(np.array([7.9, -7.9, 7.4, 1.0], np.float32), fmt)
    assert q.exponents.tolist() == [2]
    assert q.mantissas.tolist() == [7, -7, 7, 1]


def test_zero_block_gets_emin():
    fmt = h.BFPFormat(man_bits=8, exp_bits=6, block_shape=(4,))
    q = h.quantize(np.zeros((2, 8), np.float32), fmt)
    assert np.all(q.exponents == fmt.emin) and not q.mantissas.any()
    assert np.all(q.exponent_codes() == 0)


def test_exponent_clamping():
    fmt = h.BFPFormat(man_bits=8, exp_bits=4, block_shape=(2,))   # E in [-7, 7]
    x = np.array([2.0**10, 2.0**9, 2.0**-10, 2.0**-12, 3.0, 1.0], np.float32)
    q = h.quantize(x, fmt)
    assert q.exponents.tolist() == [7, -7, 1]
    # clamped down: both saturate (2^9 / 2^(7-6) = 256 > 127)
    assert q.mantissas.tolist()[:2] == [127, 127]
    # clamped up: y = 2^-10 * 2^(6+7) = 8, 2^-12 -> 2
    assert q.mantissas.tolist()[2:4] == [8, 2]


def test_subnormals_flush_to_zero():
    fmt = h.BFPFormat(man_bits=8, exp_bits=8, block_shape=(3,))
    tiny = np.float32(2.0**-126)
    sub = np.float32(2.0**-127)  # subnormal; would be m=32 without the flush
    q = h.quantize(np.array([tiny, sub, -sub], np.float32), fmt)
    assert q.exponents.tolist() == [-126]
    assert q.mantissas.tolist() == [64, 0, 0]
    # an all-subnormal block is a zero block
    q = h.quantize(np.array([sub, sub, 0], np.float32), fmt)
    assert q.exponents.tolist() == [fmt.emin] and not q.mantissas.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raise_names_block(bad):
    x = np.ones((4, 64), np.float32)
    x[2, 40] = bad
    with pytest.raises(h.NonFiniteBlockError) as ei:
        h.quantize(x, h.MXINT8, name="dY")
    assert ei.value.block_index == (2, 1)
    assert ei.value.flat_index == 2 * 2 + 1
    assert "(2, 1)" in str(ei.value) and "'dY'" in str(ei.value)


def test_nonfinite_flag():
    x = np.ones((4, 64), np.float32)
    x[1, 3] = np.nan
    x[3, 63] = -np.inf
    q = h.quantize(x, h.MXINT8, nonfinite="flag")
    assert q.invalid.tolist() == [[False, False], [True, False], [False, False],
                                  [False, True]]
    codes = q.exponent_codes()
    assert codes[1, 0] == 255 and codes[3, 1] == 255 and codes[0, 0] == 127
    assert not q.mantissas[1, :32].any()
    d = h.dequantize(q)
    assert np.isnan(d[1, :32]).all() and np.isnan(d[3, 32:]).all()
    assert np.isfinite(d[0]).all()


def test_stochastic_unbiased(rng):
    # every element sits at 0.3 LSB above a code: the mean must approach +0.3
    fmt = h.BFPFormat(man_bits=8, block_shape=(64,), rounding="stochastic", sr_bits=8,
                      seed=1234, sr_lanes=8)
    n = 200_000
    x = np.full((n // 64, 64), 10.3, np.float32)
    x[:, 0] = 127.0                            # block max -> E = 6, LSB = 1
    q = h.quantize(x, fmt)
    m = q.mantissas[:, 1:].astype(np.float64)
    # 10.3 in float32 is 10.30000019; with 8 random bits the rounding probability is
    # floor(0.30000019 * 256) / 256 = 76/256 (the stated quantisation of SR with r bits)
    p = 76 / 256
    mean = m.mean() - 10
    sd = np.sqrt(p * (1 - p) / m.size)
    assert abs(mean - p) < 5 * sd, (mean, p, sd)
    assert set(np.unique(m)) == {10.0, 11.0}


def test_stochastic_reproducible_from_seed(rng):
    x = _normal_tensor(rng, (32, 96))
    f = h.HBFP4.replace(rounding="stochastic", seed=99, sr_lanes=4)
    a, b = h.quantize(x, f), h.quantize(x, f)
    assert a.equal(b)
    c = h.quantize(x, f.replace(seed=100))
    assert not np.array_equal(a.mantissas, c.mantissas)


def test_padding_does_not_change_exponent(rng):
    x = _normal_tensor(rng, (5, 33))
    q = h.quantize(x, h.HBFP8)
    assert q.mantissas.shape == (16, 48)
    # the padded tail is zero and the exponents equal those of explicitly padded input
    xp = np.zeros((16, 48), np.float32)
    xp[:5, :33] = x
    qp = h.quantize(xp, h.HBFP8)
    assert np.array_equal(q.exponents, qp.exponents)
    assert np.array_equal(q.mantissas, qp.mantissas)
    assert h.dequantize(q).shape == x.shape


def test_any_rank_and_channelwise(rng):
    x = _normal_tensor(rng, (2, 20, 3, 3))      # NCHW, CBFP blocks of 16 channels
    q = h.quantize(x, h.CBFP8)
    assert q.exponents.shape == (2, 2, 3, 3)
    err = np.abs(h.dequantize(q) - x)
    lsb = _crop(_lsb(q), x.shape)
    assert np.all(err <= 0.5 * lsb + 1e-30)


def test_hyperblock_transpose_equals_quantizing_transpose(rng):
    x = _normal_tensor(rng, (40, 23))
    q = h.quantize(x, h.HBFP8)
    qt = h.quantize(x.T, h.HBFP8)
    assert q.T.equal(qt)
    assert np.array_equal(h.dequantize(q.T), h.dequantize(q).T)


def test_mxint8_matches_ocp_definition():
    """Hand-checked vectors from the OCP MX v1.0 definition of MXINT8.

    Scale X = 2^(floor(log2(amax)) - emax_elem) with emax_elem = 0 for INT8; elements
    are INT8 with an implicit scale 2^-6 (values k/64, |k| <= 127), clamped to the
    largest magnitude. Rounding to nearest, ties to even.
    """
    blk = np.zeros(32, np.float32)
    blk[:6] = [1.0, 0.5, -0.25, 0.75, -1.0, 0.015625]
    # amax 1.0 -> X = 2^0; k = v * 64: 64, 32, -16, 48, -64, 1
    blk2 = np.zeros(32, np.float32)
    blk2[:5] = [3.0, 1.0, 0.01, -3.999, -0.7]
    # amax 3.999 -> floor(log2) = 1 -> X = 2; k = v/2*64 = 32 v:
    # 96, 32, round(0.32)=0, round(-127.968)=-128 -> clamp -127, round(-22.4)=-22
    blk3 = np.zeros(32, np.float32)
    blk3[:3] = [2.0**-100, 2.0**-101 * 3, -(2.0**-102)]
    # amax = 3*2^-101 = 1.5*2^-100 -> floor(log2) = -100 -> X = 2^-100, E8M0 code 27;
    # k = 64, 96, -16
    x = np.stack([blk, blk2, blk3])
    q = h.quantize(x, h.MXINT8)
    assert q.exponent_codes()[:, 0].tolist() == [127, 128, 27]
    assert q.mantissas[0, :6].tolist() == [64, 32, -16, 48, -64, 1]
    assert q.mantissas[1, :5].tolist() == [96, 32, 0, -127, -22]
    assert q.mantissas[2, :3].tolist() == [64, 96, -16]
    assert h.dequantize(q)[1, 0] == 3.0 and h.dequantize(q)[1, 3] == -127 / 32


def test_stream_roundtrip(rng):
    x = _normal_tensor(rng, (3, 17, 29))
    f = h.BFPFormat(block_shape=(4, 8), block_axes=(1, 2), man_bits=6)
    q = h.quantize(x, f)
    codes, mans = q.stream()
    assert mans.shape == (3 * 5 * 4, 32)
    assert h.BFPTensor.from_stream(f, x.shape, codes, mans).equal(q)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="dtype"):
        h.quantize(np.array(["a"]), h.MXINT8)
    with pytest.raises(ValueError, match="block axis -2 .* shape \\(5,\\)"):
        h.quantize(np.zeros(5, np.float32), h.HBFP8)
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        h.quantize(np.zeros(5, np.float32), h.MXINT8, nonfinite="ignore")


# ------------------------------------------------- large tensors: chunked, two threads
@pytest.mark.parametrize("fmt", [h.MXINT8, h.HBFP8.replace(rounding="toward_zero")])
def test_multi_chunk_tensor_matches_scalar_reference(fmt, rng):
    """A tensor of several processing chunks (run on two threads) with edge cases
    planted in different chunks: sampled blocks equal the scalar reference, and the
    first non-finite block in stream order is the one named."""
    from hbfp_hw.quantize import _CHUNK_ELEMS
    shape = (2 * _CHUNK_ELEMS // 1000 + 37, 1000)      # ~2 chunks + a partial one
    x = _normal_tensor(rng, shape, spread=30)
    rows = [3, shape[0] // 2 + 5, shape[0] - 4]          # one row in each chunk
    x[rows[0], :64] = 0.0                                # zero blocks
    x[rows[1], :48] = np.float32(2.0**-127)              # subnormal-only blocks
    x[rows[1], 64:96] = np.float32(2.0**-126)            # tiny exponent: flush applies
    x[rows[1], 70] = np.float32(2.0**-127)               # ...to this subnormal (m=32 if kept)
    x[rows[2], 0:32] = np.float32(2.0**127 * 1.99)       # saturation at the top
    x[rows[2], 40] = np.float32(-3.0e38)
    x[rows[2], 200] = np.nan
    x[rows[1] + 1, 500] = np.inf                         # first bad block in stream order
    q = h.quantize(x, fmt, nonfinite="flag")
    lay = q.layout
    codes, mans = q.stream()
    xs = lay.to_stream(np.pad(x, [(0, p - s) for s, p in zip(x.shape, lay.padded)]))
    bw = lay.block[0]                                    # block rows (1 for MXINT8)
    planted = {int(np.ravel_multi_index((r // bw, c // lay.block[1]), lay.grid))
               for r in rows + [rows[1] + 1] for c in (0, 40, 64, 70, 200, 500)}
    sample = planted | set(rng.integers(0, lay.num_blocks, 300).tolist())
    for b in sorted(sample):
        E, m, inv = quantize_block([float(v) for v in xs[b]], fmt)
        assert bool(q.invalid.reshape(-1)[b]) == inv, f"block {b}"
        if not inv:
            assert codes[b] == E + fmt.exp_bias, f"block {b}"
            assert mans[b].tolist() == m, f"block {b}"
    # dequantize of the chunked path: m * 2**(E - frac_bits), NaN for invalid blocks
    d = h.dequantize(q)
    inv_full = np.repeat(np.repeat(q.invalid, lay.block[0], 0), lay.block[1], 1)
    want = np.where(inv_full, np.nan, q.mantissas * _lsb(q))
    np.testing.assert_array_equal(d, _crop(want, shape).astype(np.float32))
    with pytest.raises(h.NonFiniteBlockError) as ei:
        h.quantize(x, fmt)
    bad = np.argwhere(q.invalid)[0]
    assert ei.value.block_index == tuple(int(i) for i in bad)
    assert ei.value.block_index[0] == (rows[1] + 1) // bw
