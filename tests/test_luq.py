"""LUQ golden model: format object, codes against a scalar exact reference, unbiasedness
(statistical, over many seeds), SMP, in-hindsight scale, the shift-add GEMM."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw.formats import BFPFormat, HBFP8, MXINT8
from hbfp_hw.luq import (LUQ4, LUQFormat, LUQTensor, luq_accumulator_bits, luq_matmul,
                         luq_matmul_error_bound, luq_matmul_reference, luq_quantize,
                         sample_seed)

M32 = 0xFFFFFFFF


# ------------------------------------------------------------- independent references
def ref_random_bits(seed: int, lanes: int, count: int, bits: int) -> list[int]:
    """The documented generator, as a scalar loop (xorshift32 13/17/5 per lane)."""
    states = []
    for lane in range(lanes):
        s = (seed ^ (((lane + 1) * 0x9E3779B9) & M32)) & M32
        states.append(s if s else 0x6D2B79F5)
    out = []
    for n in range(count):
        s = states[n % lanes]
        s ^= (s << 13) & M32
        s ^= s >> 17
        s ^= (s << 5) & M32
        states[n % lanes] = s
        out.append(s >> (32 - bits))
    return out


def ref_code(x: float, alpha: Fraction, u: int, r: int, top: int, bits: int) -> int:
    """One element's code, with exact rational arithmetic (docs/luq.md's rule)."""
    a = abs(Fraction(float(x)))
    if a < Fraction(1, 2**126) or alpha == 0:
        return 0
    if a < alpha:
        lo, hi, c_lo = Fraction(0), alpha, 0
    else:
        j = 0
        while a >= alpha * 2 ** (j + 1):
            j += 1
        if j >= top:
            return (top + 1) | ((1 << (bits - 1)) if x < 0 else 0)
        lo, hi, c_lo = alpha * 2**j, alpha * 2 ** (j + 1), j + 1
    c = c_lo + int((a - lo) * 2**r > u * (hi - lo))
    return c | ((1 << (bits - 1)) if (x < 0 and c) else 0)


def ref_quantize(x: np.ndarray, fmt: LUQFormat, max_abs=None) -> tuple[np.ndarray, Fraction]:
    flat = np.asarray(x, np.float32).reshape(-1)
    mags = [abs(float(v)) if abs(float(v)) >= 2.0**-126 else 0.0 for v in flat]
    m = Fraction(max(mags, default=0.0) if max_abs is None else float(np.float32(max_abs)))
    alpha = m / 2**fmt.max_shift
    if alpha < Fraction(1, 2**126):
        alpha = Fraction(0)
    codes = np.zeros((fmt.samples, flat.size), np.uint8)
    for s in range(fmt.samples):
        us = ref_random_bits(sample_seed(fmt.seed, s), fmt.lanes, flat.size, fmt.sr_bits)
        for n, v in enumerate(flat):
            codes[s, n] = ref_code(float(v), alpha, us[n], fmt.sr_bits, fmt.max_shift,
                                   fmt.bits)
    return codes.reshape((fmt.samples, *np.shape(x))), alpha


def ref_value(codes: np.ndarray, alpha: Fraction, fmt: LUQFormat) -> np.ndarray:
    mag = codes & ((1 << (fmt.bits - 1)) - 1)
    sgn = np.where(codes >> (fmt.bits - 1), -1.0, 1.0)
    v = np.where(mag > 0, sgn * np.ldexp(1.0, mag.astype(int) - 1), 0.0) * float(alpha)
    return v.mean(axis=0)


def edge_values(rng, alpha: float, n: int = 200) -> np.ndarray:
    """Values in every binade of alpha (incl. the levels themselves), below alpha,
    subnormal, zero, negative zero."""
    lv = alpha * 2.0 ** np.arange(7)
    vals = [0.0, -0.0, 1e-45, -1e-40, alpha, -alpha, alpha * 64, -alpha * 64, alpha * 0.5,
            *lv, *(lv * 1.5), *(-lv * 1.0000001)]
    vals += list(alpha * 2.0 ** rng.uniform(-30, 6, n) * rng.choice([-1, 1], n))
    return np.array(vals, np.float32)


# ------------------------------------------------------------------------- the format
def test_format_validation():
    assert LUQ4.bits == 4 and LUQ4.magnitudes == 7 and LUQ4.max_shift == 6
    assert LUQ4.replace(samples=4).samples == 4
    with pytest.raises(ValueError, match=r"bits=6 is out of range; accepted range is \[2, 5\]"):
        LUQ4.replace(bits=6)
    with pytest.raises(ValueError, match="alpha='signed' is not supported; accepted values "
                                         "are tensor, hindsight"):
        LUQFormat(alpha="signed")
    with pytest.raises(ValueError, match="samples=3 is not supported; accepted values are "
                                         "1, 2, 4, 8, 16"):
        LUQ4.replace(samples=3)
    with pytest.raises(ValueError, match=r"sr_bits=0 is out of range; accepted range is \[1, 24\]"):
        LUQ4.replace(sr_bits=0)
    with pytest.raises(ValueError, match=r"seed=-1 is out of range"):
        LUQ4.replace(seed=-1)
    with pytest.raises(ValueError, match=r"lanes=0 is out of range; accepted range is \[1, 256\]"):
        LUQ4.replace(lanes=0)
    with pytest.raises(Exception):
        LUQ4.bits = 3                      # frozen
    d = LUQ4.replace(seed=5, lanes=4).to_dict()
    assert LUQFormat.from_dict(d) == LUQ4.replace(seed=5, lanes=4)
    with pytest.raises(ValueError, match="unknown key 'smaples'"):
        LUQFormat.from_dict({"smaples": 2})
    assert "alpha*2^0..alpha*2^6" in LUQ4.describe()


def test_registered_and_one_api():
    fmt = h.get_format("luq4")
    assert fmt is LUQ4 and h.get_format("LUQ4-HS").alpha == "hindsight"
    g = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    q = h.quantize(g, fmt)
    assert isinstance(q, LUQTensor)
    np.testing.assert_array_equal(h.dequantize(q), q.dequantize())
    q2 = h.quantize(g, fmt, max_abs=2 * float(np.abs(g).max()))
    assert q2.alpha == pytest.approx(q.alpha * 2)


# -------------------------------------------------------------------- exact codes
@pytest.mark.parametrize("fmt", [
    LUQ4.replace(seed=11),
    LUQ4.replace(seed=2**32 - 1, lanes=3, samples=2),
    LUQ4.replace(seed=7, sr_bits=3, lanes=8),
    LUQFormat(bits=2, seed=9, sr_bits=24),
    LUQFormat(bits=5, seed=1, sr_bits=9, lanes=2),
], ids=["luq4", "lanes3_smp2", "sr3_lanes8", "bits2_sr24", "bits5"])
def test_codes_match_exact_reference(fmt, rng):
    x = edge_values(rng, 2.0**-10)
    x = np.concatenate([x, rng.standard_normal(150).astype(np.float32) * 1e-3])
    q = luq_quantize(x, fmt)
    codes, alpha = ref_quantize(x, fmt)
    np.testing.assert_array_equal(q.codes, codes)
    assert Fraction(q.alpha) == alpha
    np.testing.assert_array_equal(q.dequantize(), ref_value(codes, alpha, fmt).astype(np.float32))


def test_hand_vectors():
    """alpha = 1 (max 64): exact levels never move; 1.5 rounds up iff u < 2**(r-1)."""
    fmt = LUQ4.replace(seed=123, sr_bits=4)
    x = np.array([64, -64, 1, -2, 4, 32, 0, -0.0, 1.5, 1.5, 1.5, 1.5, 0.25, 48], np.float32)
    q = luq_quantize(x, fmt)
    u = ref_random_bits(123, 1, x.size, 4)
    assert q.alpha == 1.0
    exp = [7, 8 | 7, 1, 8 | 2, 3, 6, 0, 0]
    exp += [1 + (u[i] < 8) for i in range(8, 12)]          # 1.5: up with prob 1/2
    exp += [int(u[12] < 4)]                                 # 0.25 * alpha: up w.p. 1/4
    exp += [6 + (u[13] < 8)]                                # 48 = 1.5 * 32
    np.testing.assert_array_equal(q.codes[0], exp)
    # the 4-bit layout: sign bit 3, magnitude code 0..7
    assert q.codes.max() <= 15 and q.codes.dtype == np.uint8


def test_special_values():
    g = np.array([1.0, np.nan, 2.0], np.float32)
    with pytest.raises(ValueError, match=r"holds nan at index \(1,\)"):
        luq_quantize(g, LUQ4, name="dY")
    q = luq_quantize(g, LUQ4, nonfinite="flag")
    assert q.invalid and np.isnan(q.dequantize()).all()
    tiny = np.array([1e-37, -3e-38, 0.0], np.float32)      # alpha = max/64 is subnormal
    assert not luq_quantize(tiny, LUQ4).dequantize().any()
    assert not luq_quantize(np.zeros((3, 2), np.float32), LUQ4).codes.any()
    with pytest.raises(ValueError, match="max_abs=-1.0 is out of range"):
        luq_quantize(g[:1], LUQ4, max_abs=-1.0)
    with pytest.raises(TypeError, match="fmt must be a LUQFormat"):
        luq_quantize(g, HBFP8)


# ------------------------------------------------------------------- unbiasedness
def _levels(x: float, alpha: float):
    if x < alpha:
        return 0.0, alpha
    j = int(np.floor(np.log2(x / alpha)))
    return alpha * 2.0**j, alpha * 2.0 ** (j + 1)


def test_unbiased_every_binade():
    """Mean over 40 seeds x 2500 copies of each value is within 5 sigma of the value,
    for values below alpha and in each of the 6 binades, both signs."""
    alpha = 2.0**-7
    base = np.array([0.003, 0.2, 0.77, 0.999, 1.25, 2.9, 5.5, 11.1, 23.7, 47.0, 63.9],
                    np.float64) * alpha
    vals = np.concatenate([base, -base]).astype(np.float32)
    reps = 2500
    x = np.concatenate([np.tile(vals, reps), [np.float32(64 * alpha)]])
    total = np.zeros(vals.size)
    seeds = 40
    for s in range(seeds):
        q = luq_quantize(x, LUQ4.replace(seed=1000 + 7919 * s, lanes=4))
        assert q.alpha == alpha
        total += q.dequantize()[:-1].reshape(reps, vals.size).sum(axis=0)
    n = reps * seeds
    mean = total / n
    for v, m in zip(vals.astype(np.float64), mean):
        lo, hi = _levels(abs(v), alpha)
        p = (abs(v) - lo) / (hi - lo)
        sigma = (hi - lo) * np.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(m - v) <= 5 * sigma + (hi - lo) * 2.0**-16, (v, m, sigma)


def test_small_sr_bits_mean_is_quantized_probability():
    """With r random bits the probability is ceil(f 2**r) / 2**r: for r = 2 the mean of
    alpha * 1.1 is alpha * 1.25 (the statistical test detects the bias of a short r)."""
    x = np.full(20000, 1.1, np.float32)
    x[0] = 64
    m = luq_quantize(x, LUQ4.replace(sr_bits=2, seed=5)).dequantize()[1:].mean()
    assert abs(m - 1.25) < 0.02 and abs(m - 1.1) > 0.1
    m16 = luq_quantize(x, LUQ4.replace(seed=5)).dequantize()[1:].mean()
    assert abs(m16 - 1.1) < 0.02


def test_smp_is_the_average_of_sample_seeds(rng):
    g = (rng.standard_normal((6, 10)) * 0.01).astype(np.float32)
    fmt = LUQ4.replace(samples=4, seed=99, lanes=2)
    q = luq_quantize(g, fmt)
    parts = [luq_quantize(g, LUQ4.replace(seed=sample_seed(99, s), lanes=2)).dequantize()
             for s in range(4)]
    np.testing.assert_array_equal(
        q.dequantize(), np.mean(np.array(parts, np.float64), axis=0).astype(np.float32))
    # variance shrinks: SMP x4 error variance about a quarter of one sample's
    x = np.tile((rng.standard_normal(50) * 0.01).astype(np.float32), 400)
    e1 = np.var(luq_quantize(x, LUQ4.replace(seed=1)).dequantize() - x)
    e4 = np.var(luq_quantize(x, LUQ4.replace(seed=1, samples=4)).dequantize() - x)
    assert 0.18 < e4 / e1 < 0.35


def test_train_quantize_hindsight(rng):
    fmt = LUQ4.replace(alpha="hindsight")
    st: dict = {}
    g1 = (rng.standard_normal((4, 5)) * 0.5).astype(np.float32)
    g2 = g1 * 4
    d1 = fmt.train_quantize(g1, role="grad", seed=3, state=st, update=True)
    np.testing.assert_array_equal(d1, luq_quantize(g1, fmt.replace(seed=3)).dequantize())
    assert st["max_abs"] == float(np.abs(g1).max())
    d2 = fmt.train_quantize(g2, role="grad", seed=4, state=st, update=True)
    # the scale of step 2 is step 1's maximum: g2's large values saturate at 64 alpha
    np.testing.assert_array_equal(
        d2, luq_quantize(g2, fmt.replace(seed=4), max_abs=float(np.abs(g1).max())).dequantize())
    assert np.abs(d2).max() == np.float32(np.abs(g1).max())
    assert st["saturated"] > 0 and st["max_abs"] == float(np.abs(g2).max())
    st_t: dict = {}
    d = LUQ4.train_quantize(g2, role="grad", seed=4, state=st_t, update=False)
    assert st_t == {} and np.abs(d).max() == np.float32(np.abs(g2).max())


# ---------------------------------------------------------------------- the GEMM
def ref_acc(a: LUQTensor, b, G: int = 8):
    """Brute force: integer products, K blocks, alignment, as Python ints."""
    M, K = a.shape
    N = b.shape[1]
    L = b.layout.block[0]
    bn = b.layout.block[1]
    mag = a.magnitude_codes
    neg = a.negative
    acc = np.zeros((M, N), object)
    eref = []
    for j in range(N):
        col = [int(b.exponents[kb, j // bn]) for kb in range(-(-K // L))
               if not b.invalid[kb, j // bn]]
        eref.append(max(col) if col else -(1 << 14))
    for i in range(M):
        for j in range(N):
            tot = 0
            for kb in range(-(-K // L)):
                p = 0
                for k in range(kb * L, min(K, (kb + 1) * L)):
                    for s in range(a.fmt.samples):
                        c = int(mag[s, i, k])
                        if c:
                            t = int(b.mantissas[k, j]) << (c - 1)
                            p += -t if neg[s, i, k] else t
                sh = min(eref[j] - int(b.exponents[kb, j // bn]), 62)
                tot += (p << G) >> sh
            acc[i, j] = tot
    return acc, np.array(eref)


@pytest.mark.parametrize("samples", [1, 2])
def test_luq_matmul_dx_dw(samples, rng):
    B, O, I = 20, 33, 18
    dy = (rng.standard_normal((B, O)) * np.exp(rng.uniform(-4, 2, (B, 1)))).astype(np.float32)
    w = (rng.standard_normal((O, I)) * 0.3).astype(np.float32)
    x = rng.standard_normal((B, I)).astype(np.float32)
    g = luq_quantize(dy, LUQ4.replace(samples=samples, seed=4, lanes=4))
    for a, b in ((g, h.quantize(w, HBFP8)),                        # dX = dY W
                 (g.T, h.quantize(x, HBFP8)),                      # dW = dY^T X
                 (g, h.quantize(w, MXINT8.transposed()))):         # 1-D blocks along K
        y, acc, e_ref = luq_matmul(a, b, return_acc=True)
        racc, reref = ref_acc(a, b)
        np.testing.assert_array_equal(acc[:, : b.shape[1]].astype(object), racc)
        np.testing.assert_array_equal(e_ref[: b.shape[1]], reref)
        ref = luq_matmul_reference(a, b)
        assert (np.abs(y - ref) <= luq_matmul_error_bound(a, b)).all()
        assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()


def test_luq_matmul_special_and_errors(rng):
    g = luq_quantize(rng.standard_normal((4, 16)).astype(np.float32), LUQ4)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    w[3, 20] = np.inf
    wq = h.quantize(w, BFPFormat(block_shape=(16, 16), block_axes=(0, 1)), nonfinite="flag")
    y = luq_matmul(g, wq)
    assert np.isnan(y[:, 16:]).all() and np.isfinite(y[:, :16]).all()
    with pytest.raises(TypeError, match="not a LUQTensor"):
        luq_matmul(h.quantize(w[:4, :16], HBFP8), wq)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        luq_matmul(g.T, wq)
    with pytest.raises(ValueError, match="K=16 exceeds k_max=8"):
        luq_matmul(g, wq, k_max=8)
    assert luq_accumulator_bits(LUQ4, 8, 16, 16, 8) == (16 * 64 * 127 << 8).bit_length() + 1


def test_docs_example():
    """The first example of docs/luq.md runs and its assertion holds."""
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "luq.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", src, re.S)
    exec(compile(blocks[0], "docs/luq.md", "exec"), {})
