"""MLS golden model against independent scalar references (brute force, Fractions)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import hbfp_hw
from hbfp_hw.mls import (MLS_E2M1, MLS_E2M4, MLSFormat, MLSTensor, decode, encode,
                         mls_accumulator_bits, mls_matmul, mls_matmul_error_bound,
                         mls_matmul_reference, round_to_fp32)
from hbfp_hw.prng import random_bits

FORMATS = [MLS_E2M1, MLS_E2M4, MLSFormat(exp_bits=3, man_bits=2, group_bits=3, group_size=4)]


# -- independent scalar reference ----------------------------------------------------

def grid(fmt: MLSFormat) -> list[tuple[Fraction, int]]:
    """(value, mantissa field) of every non-negative element, from the format's
    definition (subnormals m 2**-M, normals (1 + m 2**-M) 2**(ec-1))."""
    M, E = fmt.man_bits, fmt.exp_bits
    out = [(Fraction(m, 2**M), m) for m in range(2**M)]
    for ec in range(1, 2**E):
        out += [((1 + Fraction(m, 2**M)) * Fraction(2) ** (ec - 1), m) for m in range(2**M)]
    return sorted(out)


def flog2(v: float) -> int:
    return math.frexp(v)[1] - 1


def ref_quantize(x: np.ndarray, fmt: MLSFormat, u=None) -> tuple[int, list, list]:
    """Scalar loop over groups of a 2-D tensor grouped along axis 1 (x's width must be
    a multiple of group_size). Returns (t, g per group, values as Fractions)."""
    x = x.astype(np.float32)
    vals = [abs(float(v)) for v in x.reshape(-1) if abs(float(v)) >= 2.0**-126]
    T = max(flog2(v) for v in vals) if vals else None
    t = 0 if T is None else T - (2**fmt.exp_bits - 2)
    T = t + 2**fmt.exp_bits - 2
    G = grid(fmt)
    top = G[-1][0]
    rows, cols = x.shape
    L = fmt.group_size
    gs, out = [], []
    n = 0
    for i in range(rows):
        for j0 in range(0, cols, L):
            grp = [float(v) for v in x[i, j0:j0 + L]]
            nzv = [abs(v) for v in grp if abs(v) >= 2.0**-126]
            g = fmt.gmax if not nzv else min(T - max(flog2(v) for v in nzv), fmt.gmax)
            gs.append(g)
            for v in grp:
                a = Fraction(abs(v)) if abs(v) >= 2.0**-126 else Fraction(0)
                z = a * Fraction(2) ** (g - t)
                if u is None:
                    if z >= top:
                        q = top
                    else:
                        best = min(G, key=lambda e: (abs(e[0] - z), e[1] % 2))
                        q = best[0]
                else:
                    # stochastic: floor(z / quantum + u / 2**r) * quantum
                    k = flog2(float(z)) if z > 0 else -1
                    qexp = max(k, 0) - fmt.man_bits
                    quantum = Fraction(2) ** qexp
                    r = fmt.sr_bits
                    zz = math.floor(z / quantum * 2**r)
                    q = min(((zz + int(u[n])) >> r) * quantum, top)
                n += 1
                out.append((-q if v < 0 else q) * Fraction(2) ** (t - g))
    return t, gs, out


def rne_fp32(v: Fraction) -> float:
    """Exact rational -> float32 value (24-bit RNE, flush below 2**-126), independent of
    the implementation (integer arithmetic on the Fraction)."""
    if v == 0:
        return 0.0
    s = -1 if v < 0 else 1
    a = abs(v)
    e = math.floor(math.log2(a.numerator) - math.log2(a.denominator))
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    scaled = a / Fraction(2) ** (e - 23)          # in [2**23, 2**24)
    q, rem = divmod(scaled.numerator, scaled.denominator)
    if 2 * rem > scaled.denominator or (2 * rem == scaled.denominator and q % 2):
        q += 1
    r = q * 2.0 ** (e - 23)
    if r < 2.0**-126:
        return 0.0
    return s * float(np.float32(r))


# -- format object --------------------------------------------------------------------

def test_presets_and_registry():
    assert hbfp_hw.get_format("mls-e2m1") is MLS_E2M1
    assert hbfp_hw.get_format("MLS-E2M4") is MLS_E2M4
    assert MLS_E2M1.element_bits == 4 and MLS_E2M4.element_bits == 7
    assert MLS_E2M1.vmax == 12 and MLS_E2M4.vmax == 124      # 6.0 and 7.75
    f = MLS_E2M4.replace(group_size=8)
    assert f.name == "MLS-E2M4[group_size=8]" and MLS_E2M4.group_size == 16
    assert MLS_E2M4.replace(rounding="stochastic").name == "MLS-E2M4"
    assert MLSFormat.from_dict(MLS_E2M4.to_dict()) == MLS_E2M4
    with pytest.raises(dataclasses_frozen()):
        MLS_E2M4.man_bits = 3


def dataclasses_frozen():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kw, msg", [
    (dict(exp_bits=5), r"exp_bits=5 is out of range; accepted range is \[1, 4\]"),
    (dict(man_bits=-1), r"man_bits=-1 is out of range; accepted range is \[0, 10\]"),
    (dict(group_bits=7), r"group_bits=7 is out of range; accepted range is \[1, 6\]"),
    (dict(group_size=0), r"group_size=0 is out of range"),
    (dict(rounding="toward_zero"), r"rounding='toward_zero' is not supported by MLS"),
    (dict(sr_bits=25), r"sr_bits=25 is out of range"),
])
def test_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MLSFormat(**kw)
    with pytest.raises(ValueError, match="unknown key 'man_bit'"):
        MLSFormat.from_dict({"man_bit": 3})


def test_codes_roundtrip_and_grid():
    for fmt in FORMATS:
        codes = np.arange(2 ** fmt.element_bits)
        s, sig, sh = decode(codes, fmt)
        v = sig << sh
        again = encode(s, v, fmt)
        negzero = codes == (1 << (fmt.element_bits - 1))
        assert np.array_equal(again[~negzero], codes[~negzero])
        ref = sorted({int(val * 2**fmt.man_bits) for val, _ in grid(fmt)})
        assert sorted(set(v.tolist())) == ref
        assert max(ref) == fmt.vmax
        assert sig.max() < 2 ** (fmt.man_bits + 1)      # (M+1)-bit significands


# -- quantization ---------------------------------------------------------------------

def _rand(rng, shape, spread=6):
    return (rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread, shape)
            ).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name or "e3m2")
def test_nearest_matches_scalar_reference(fmt):
    rng = np.random.default_rng(11)
    for trial in range(6):
        x = _rand(rng, (3, 4 * fmt.group_size), spread=3 + 3 * trial)
        x[0, :fmt.group_size] = 0                       # a zero group
        x[1, 1] = -x[1, 1]
        if trial == 1:
            x[:] = 0                                    # an all-zero tensor
        if trial == 2:                                  # ties on the element grid
            x[2] = np.float32(2.0 ** -fmt.man_bits * 1.5) * 2.0 ** rng.integers(0, 3, x.shape[1])
        q = fmt.quantize_array(x)
        t, gs, vals = ref_quantize(x, fmt)
        assert q.tensor_exp == t
        assert q.group_shift.reshape(-1).tolist() == gs
        ref = np.array([float(v) for v in vals], dtype=np.float64).reshape(x.shape)
        assert np.array_equal(q.dequantize().astype(np.float64), ref)


def test_stochastic_matches_scalar_reference_and_is_unbiased():
    fmt = MLS_E2M1.replace(rounding="stochastic", seed=1234, sr_lanes=4, sr_bits=10)
    rng = np.random.default_rng(5)
    x = _rand(rng, (4, 32), spread=2)
    q = fmt.quantize_array(x)
    u = random_bits(1234, 4, x.size, 10)
    t, gs, vals = ref_quantize(x, fmt, u=u)
    assert q.tensor_exp == t and q.group_shift.reshape(-1).tolist() == gs
    assert np.array_equal(q.dequantize().astype(np.float64),
                          np.array([float(v) for v in vals]).reshape(x.shape))
    # unbiased: the mean over seeds approaches x (values inside the element range)
    y = np.full((1, 16), 0.37, np.float32)
    y[0, 0] = 1.0                                         # fixes t and g
    m = np.mean([fmt.replace(seed=s).quantize_array(y).dequantize()[0, 5]
                 for s in range(400)])
    assert abs(m - 0.37) < 0.02
    assert not np.array_equal(fmt.quantize_array(x).codes,
                              fmt.replace(seed=1).quantize_array(x).codes)


def test_saturation_zero_and_static_tensor_exp():
    fmt = MLS_E2M4
    x = np.array([[100.0, -3.0, 0.5] + [0.0] * 13], np.float32)
    q = fmt.quantize_array(x, tensor_exp=-2)            # top binade [1, 2): 100 saturates
    d = q.dequantize()[0]
    assert d[0] == fmt.vmax * 2.0 ** (-2 - fmt.man_bits)
    assert d[1] == -d[0]
    z = fmt.quantize_array(np.zeros((2, 16), np.float32))
    assert z.tensor_exp == 0 and (z.group_shift == fmt.gmax).all() and (z.codes == 0).all()
    # a group far below the tensor maximum: clamped at gmax, flushes to zero
    y = np.zeros((1, 32), np.float32)
    y[0, 0], y[0, 16] = 1.0, 2.0**-40
    qy = fmt.quantize_array(y)
    assert qy.group_shift.tolist() == [[0, fmt.gmax]] and qy.dequantize()[0, 16] == 0
    with pytest.raises(ValueError, match=r"tensor_exp=300 is out of range"):
        fmt.quantize_array(x, tensor_exp=300)
    bad = x.copy()
    bad[0, 2] = np.nan
    with pytest.raises(ValueError, match=r"holds nan at index \(0, 2\)"):
        fmt.quantize_array(bad, name="X")


def test_conv_groups_per_channel_slice():
    rng = np.random.default_rng(3)
    x = _rand(rng, (2, 3, 5, 5))
    q = MLS_E2M4.quantize_array(x)
    assert q.group_shift.shape == (2, 3, 1, 1)
    # each (n, c) slice on its own equals a 2-D row group of 25 with the same t
    fmt25 = MLS_E2M4.replace(group_size=25)
    q2 = fmt25.quantize_array(x.reshape(6, 25))
    assert np.array_equal(q.dequantize().reshape(6, 25), q2.dequantize())


def test_dispatch_through_hbfp_quantize():
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    q = hbfp_hw.quantize(x, MLS_E2M4)
    assert isinstance(q, MLSTensor)
    assert np.array_equal(hbfp_hw.dequantize(q), MLS_E2M4.quantize_array(x).dequantize())
    x[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"tensor 'X' holds inf at index \(1, 3\)"):
        hbfp_hw.quantize(x, MLS_E2M4, name="X")
    with pytest.raises(ValueError, match="MLS has no invalid-group code"):
        hbfp_hw.quantize(x, MLS_E2M4, nonfinite="flag")


def test_train_quantize_roles():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    a = MLS_E2M1.train_quantize(x, role="act", seed=1, state={})
    assert a.dtype == np.float32 and a.shape == x.shape
    assert np.array_equal(a, MLS_E2M1.quantize_array(x).dequantize())
    g1 = MLS_E2M1.train_quantize(x, role="grad", seed=1, state={})
    g2 = MLS_E2M1.train_quantize(x, role="grad", seed=2, state={})
    assert not np.array_equal(g1, g2)
    assert np.array_equal(g1, MLS_E2M1.train_quantize(x, role="grad", seed=1, state={}))
    with pytest.raises(ValueError, match="role='bias'"):
        MLS_E2M1.train_quantize(x, role="bias", seed=1, state={})


# -- GEMM -----------------------------------------------------------------------------

def _exact_gemm(a: MLSTensor, b: MLSTensor) -> list[list[Fraction]]:
    A = [[Fraction(float(v)) for v in row] for row in a.dequantize().astype(np.float64)]
    B = [[Fraction(float(v)) for v in row] for row in b.dequantize().astype(np.float64)]
    return [[sum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))]
            for i in range(len(A))]


@pytest.mark.parametrize("fmt", [MLS_E2M1, MLS_E2M4], ids=lambda f: f.name)
def test_gemm_bit_exact_against_fractions(fmt):
    rng = np.random.default_rng(8)
    for _ in range(3):
        a = fmt.quantize_array(_rand(rng, (5, 48), spread=5))
        b = fmt.transposed().quantize_array(_rand(rng, (48, 4), spread=5))
        out = mls_matmul(a, b)
        ex = _exact_gemm(a, b)
        ref = np.array([[rne_fp32(v) for v in row] for row in ex], dtype=np.float32)
        assert np.array_equal(out, ref)
        # the same through .T of a row-grouped tensor
        bt = fmt.quantize_array(b.dequantize().T.copy())
        assert np.array_equal(mls_matmul(a, bt.T), out)


def test_gemm_error_bound_and_wide_accumulator():
    rng = np.random.default_rng(9)
    fmt = MLS_E2M4
    a = fmt.quantize_array(_rand(rng, (16, 256), spread=8))
    b = fmt.transposed().quantize_array(_rand(rng, (256, 12), spread=8))
    out, acc, scale = mls_matmul(a, b, return_acc=True)
    ref = mls_matmul_reference(a, b)
    bound = mls_matmul_error_bound(a, b)
    assert (np.abs(out - ref) <= bound).all()
    assert np.abs(acc).max() >= 2**40                   # alignment shifts really used
    assert acc.dtype == np.int64
    assert mls_accumulator_bits(fmt, fmt, 16, 256) == 53
    with pytest.raises(ValueError, match="exceeds the supported 63 bits"):
        mls_matmul(a, b, k_max=2**20)
    with pytest.raises(ValueError, match="grouped along K"):
        mls_matmul(a, fmt.quantize_array(b.dequantize()))
    with pytest.raises(TypeError, match="not an MLSTensor"):
        mls_matmul(a, np.zeros((256, 3)))


def test_round_to_fp32_wide_integers():
    vals = [0, 1, -1, 2**24 + 1, 2**24 + 3, 2**53 + 1, -(2**60 + 2**36 + 1), 2**62 - 1,
            (2**25 - 1) << 30]
    out = round_to_fp32(np.array(vals, np.int64), -3)
    for v, o in zip(vals, out):
        assert float(o) == rne_fp32(Fraction(v, 8)), v
    assert np.isinf(round_to_fp32(np.array([2**40]), 100)[0])
    assert round_to_fp32(np.array([5]), -130)[0] == 0


def test_docs_quick_start(capsys):
    """docs/mls.md's quick start runs and prints what the page shows."""
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "mls.md").read_text()
    code = re.findall(r"```python\n(.*?)```", src, re.S)[0]
    shown = re.findall(r"```text\n(.*?)```", src, re.S)[0]
    exec(compile(code, "docs/mls.md", "exec"), {})
    assert capsys.readouterr().out == shown


def test_training_rows_through_convert():
    """The TRAIN_FORMATS rows convert a model; its forward GEMM runs on MLS operands."""
    torch = pytest.importorskip("torch")
    from hbfp_hw.host.torch import convert
    from hbfp_hw.host.train_mls import TRAIN_FORMATS

    assert set(TRAIN_FORMATS) == {"mls-e2m4", "mls-e2m1"}
    kw = TRAIN_FORMATS["mls-e2m1"][1]()
    assert kw["grad_fmt"] is MLS_E2M1 and kw["weight_fmt"] is MLS_E2M1
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(32, 8))
    w = lin[0].weight.detach().numpy().copy()
    b = lin[0].bias.detach().numpy().copy()
    convert(lin, **kw)
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = lin(xt)
    xq = MLS_E2M1.quantize_array(x).dequantize().astype(np.float64)
    wq = MLS_E2M1.quantize_array(w).dequantize().astype(np.float64)
    assert np.allclose(y.detach().numpy(), xq @ wq.T + b, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert np.isfinite(xt.grad.numpy()).all()
