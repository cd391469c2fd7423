"""Golden uniform-integer GEMM (hbfp_hw.intgemm) against slow scalar references.

The references below are written from the documented rules with Python integers and
``fractions.Fraction`` (exact arithmetic), element by element; they share no code with
the vectorised model.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from hbfp_hw import formats as _formats
from hbfp_hw.intgemm import (INT4, INT8, UINT4, IntFormat, int_accumulator_bits, int_conv2d,
                             int_gemm_codes, int_linear, int_matmul_error_bound,
                             int_matmul_reference, quantize_int)

F = Fraction


def ref_round_f32(v: Fraction) -> float:
    """Scalar reference of the output rule: flush |v| < 2**-126, else nearest-even to
    24 significant bits, Inf from 2**128. Brute force over the exponent."""
    if abs(v) < F(1, 2**126):
        return 0.0
    neg, a = v < 0, abs(v)
    e = -126
    while F(2) ** (e + 1) <= a:
        e += 1
    ulp = F(2) ** (e - 23)
    lo = (a // ulp) * ulp
    hi = lo + ulp
    if a - lo < hi - a:
        r = lo
    elif a - lo > hi - a:
        r = hi
    else:
        r = lo if (lo / ulp) % 2 == 0 else hi
    if r >= F(2) ** 128:
        return float("-inf") if neg else float("inf")
    return -float(r) if neg else float(r)


def ref_f32(x: float) -> Fraction:
    return F(float(np.float32(x)))


def ref_quantize(x: float, bits: int, kind: str, alpha=None, lo=None, hi=None):
    """(q, s, z) of one element from the documented definitions."""
    L = 2**bits - 1
    if kind == "unsigned":
        s, z = (ref_f32(alpha / L) if alpha > 0 else F(1)), F(0)
    elif kind == "symmetric":
        s, z = (ref_f32(2 * alpha / L) if alpha > 0 else F(1)), F(L, 2)
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = ref_f32((hi - lo) / L) if hi > lo else F(1)
        z = F(min(max(round(-lo / float(s)), 0), L))    # Python round: half to even
    t = F(x) / s + z
    q = round(t)                                         # exact, half to even
    return min(max(q, 0), L), s, z


@pytest.mark.parametrize("kind", ["unsigned", "symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizer_matches_scalar_definition(rng, kind, bits):
    x = (rng.standard_normal((6, 9)) * rng.uniform(0.1, 5)).astype(np.float32)
    x[0, 0] = 0.0
    fmt = IntFormat(bits, kind)
    alpha = float(rng.uniform(0.2, 1.5) * np.abs(x).max())
    kw = dict(lo=float(x.min()) * 0.7, hi=float(x.max()) * 0.9) if kind == "asymmetric" \
        else dict(alpha=alpha)
    t = quantize_int(x, fmt, **kw)
    vals = t.dequantize64()
    for idx in np.ndindex(x.shape):
        q, s, z = ref_quantize(float(x[idx]), bits, kind, **kw)
        assert int(t.q[idx]) == q, (idx, x[idx])
        assert F(float(vals[idx])) == s * (q - z)


def test_grids(rng):
    w = rng.standard_normal(1000)
    t = quantize_int(w, INT4, alpha=1.0)
    v = np.unique(t.dequantize64())
    s = float(np.float32(2 / 15))
    assert len(v) == 16 and not np.any(v == 0)                   # no exact zero
    np.testing.assert_array_equal(v, s * (np.arange(16) - 7.5))   # -a + k*2a/(2^b-1)
    a = quantize_int(np.abs(w), UINT4, alpha=2.0)
    np.testing.assert_array_equal(np.unique(a.q), np.arange(16))
    assert quantize_int(-np.abs(w), UINT4, alpha=2.0).dequantize64().max() == 0.0
    g = quantize_int(np.array([-1.0, 0.0, 3.0]), INT8)
    assert g.dequantize64()[1] == 0.0                             # asymmetric: 0 exact
    # inside the range the error is at most half a step
    x = rng.uniform(-1, 1, 500)
    t = quantize_int(x, INT8.replace(kind="symmetric"), alpha=1.0)
    assert np.abs(t.dequantize64() - x).max() <= float(t.scale) / 2 * (1 + 1e-12)


def test_operand_slot(rng):
    for fmt in (INT4, UINT4, INT8, INT8.replace(kind="symmetric", bits=3)):
        x = rng.standard_normal(300) * 3
        t = quantize_int(x, fmt)
        c, u = t.operand()
        assert np.abs(c).max() <= fmt.levels                 # fits bits+1 signed
        np.testing.assert_array_equal(c * np.float64(u), t.dequantize64())


def _ref_linear(a, w):
    ca, ua = a.operand()
    cw, uw = w.operand()
    uw = np.broadcast_to(uw, (w.shape[0],))
    M, K = ca.shape
    y = np.empty((M, w.shape[0]), np.float32)
    for i in range(M):
        for j in range(w.shape[0]):
            acc = sum(int(ca[i, k]) * int(cw[j, k]) for k in range(K))
            S = F(ref_round_f32(F(float(ua)) * F(float(uw[j]))))
            y[i, j] = ref_round_f32(acc * S)
    return y


@pytest.mark.parametrize("case", range(6))
def test_int_linear_bit_exact(rng, case):
    bits_a, bits_w = [(4, 4), (3, 3), (4, 2), (8, 8), (2, 5), (8, 4)][case]
    M, K, N = rng.integers(1, 7), rng.integers(1, 40), rng.integers(1, 7)
    x = rng.standard_normal((M, K)) * rng.uniform(0.01, 10)
    w = rng.standard_normal((N, K)) * rng.uniform(0.01, 10)
    akind = ["unsigned", "asymmetric"][case % 2]
    a = quantize_int(np.maximum(x, 0) if akind == "unsigned" else x, IntFormat(bits_a, akind))
    wq = quantize_int(w, IntFormat(bits_w, "symmetric", axis=0 if case % 3 else None))
    y = int_linear(a, wq)
    np.testing.assert_array_equal(y, _ref_linear(a, wq))
    assert np.all(np.abs(y - int_matmul_reference(a, wq)) <= int_matmul_error_bound(a, wq))
    # the raw-code entry point (what an integer mode of the accelerator receives)
    _, acc, S = int_linear(a, wq, return_acc=True)
    y2, acc2 = int_gemm_codes(a.q, a.z2, wq.q, wq.z2, S, return_acc=True)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(acc2, acc)


def test_int_linear_wide_accumulator_and_specials(rng):
    # 16-bit operands: |acc| >= 2**29 takes the exact big-integer path
    x = rng.standard_normal((3, 12))
    w = rng.standard_normal((4, 12))
    a = quantize_int(x, IntFormat(16, "asymmetric"))
    wq = quantize_int(w, IntFormat(16, "symmetric", axis=0))
    y, acc, _ = int_linear(a, wq, return_acc=True)
    assert np.abs(acc).max() >= 2**29
    np.testing.assert_array_equal(y, _ref_linear(a, wq))
    # tiny scales flush to zero, huge ones overflow to Inf
    for scale, check in ((1e-30, lambda v: np.all(v == 0)),
                         (2e19, lambda v: np.any(np.isinf(v)))):
        a = quantize_int(np.abs(x) * scale, UINT4)
        wq = quantize_int(w * scale, INT4, alpha=float(np.abs(w).max() * scale))
        y = int_linear(a, wq)
        np.testing.assert_array_equal(y, _ref_linear(a, wq))
        assert check(y)


def _ref_conv(a, w, stride, pad):
    ca, ua = a.operand()
    cw, uw = w.operand()
    uw = np.broadcast_to(uw, (w.shape[0],))
    N, C, H, W = ca.shape
    O, _, kh, kw = cw.shape
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    y = np.empty((N, O, Ho, Wo), np.float32)
    for n in range(N):
        for o in range(O):
            S = F(ref_round_f32(F(float(ua)) * F(float(uw[o]))))
            for i in range(Ho):
                for j in range(Wo):
                    acc = 0
                    for c in range(C):
                        for di in range(kh):
                            for dj in range(kw):
                                r, s = i * stride + di - pad, j * stride + dj - pad
                                if 0 <= r < H and 0 <= s < W:
                                    acc += int(ca[n, c, r, s]) * int(cw[o, c, di, dj])
                    y[n, o, i, j] = ref_round_f32(acc * S)
    return y


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 0), (1, 0), (2, 1)])
def test_int_conv2d_bit_exact(rng, stride, pad):
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 2))
    a = quantize_int(x, IntFormat(4, "asymmetric"))       # zero point != 0: padding is c=0
    wq = quantize_int(w, IntFormat(3, "symmetric", axis=0))
    y = int_conv2d(a, wq, stride=stride, padding=pad)
    np.testing.assert_array_equal(y, _ref_conv(a, wq, stride, pad))


def test_accumulator_bits_and_errors():
    assert int_accumulator_bits(4, 4, 1) == (225).bit_length() + 1
    assert int_accumulator_bits(8, 8, 512) == (512 * 255 * 255).bit_length() + 1
    with pytest.raises(ValueError, match=r"bits=1 is out of range; accepted range is \[2, 16\]"):
        IntFormat(1)
    with pytest.raises(ValueError, match="kind='x'.*unsigned, symmetric, asymmetric"):
        IntFormat(4, "x")
    with pytest.raises(ValueError, match=r"alpha=-1.0 is out of range"):
        quantize_int(np.ones(3), INT4, alpha=-1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int(np.array([np.nan]), INT4)
    with pytest.raises(ValueError, match=r"k=0 is out of range"):
        int_accumulator_bits(4, 4, 0)
    a = quantize_int(np.ones((2, 3)), UINT4)
    with pytest.raises(ValueError, match="needs a \\(M, K\\) and w \\(N, K\\)"):
        int_linear(a, quantize_int(np.ones((2, 4)), INT4))
    with pytest.raises(TypeError, match="not an IntTensor"):
        int_linear(np.ones((2, 3)), a)
    huge = quantize_int(np.ones((1, 3)) * 1e30, UINT4)
    with pytest.raises(ValueError, match="overflows float32"):
        int_linear(huge, quantize_int(np.ones((1, 3)) * 1e30, INT4))
    big = quantize_int(np.ones((1, 2**21)), IntFormat(16, "unsigned"))
    with pytest.raises(ValueError, match="exceeds the supported 53 bits"):
        int_linear(big, quantize_int(np.ones((1, 2**21)), IntFormat(16, "symmetric")))


def test_registered_formats():
    if not hasattr(_formats, "register_format"):
        pytest.skip("hbfp_hw.formats.register_format is not available")
    import hbfp_hw
    for name, f in (("int4-sym", INT4), ("int8-asym", INT8), ("uint4", UINT4)):
        assert _formats.get_format(name) is f
    t = hbfp_hw.quantize(np.array([0.5, -1.0]), INT4)
    s = float(np.float32(2 / 15))        # alpha = max|x| = 1; codes 11 and 0, z = 7.5
    np.testing.assert_array_equal(hbfp_hw.dequantize(t), np.float32([s * 3.5, s * -7.5]))
