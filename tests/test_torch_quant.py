"""The torch-native emulate path: quantizer, random bits and the float32 GEMM shortcut
are bit-identical to the golden model (hbfp_hw.quantize / prng / gemm).

The quantizer tests run on both paths (the compiled kernels of
``hbfp_hw.host.torch_kernels`` when numba is installed, and the pure-PyTorch fallback);
the GEMM-shortcut tests here pin the PyTorch path (``tests/test_torch_kernels.py``
covers the compiled GEMM)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import hbfp_hw.host.torch as htorch  # noqa: E402
from hbfp_hw.formats import HBFP4, HBFP8, MXINT8  # noqa: E402
from hbfp_hw.gemm import bfp_matmul  # noqa: E402
from hbfp_hw.quantize import NonFiniteBlockError, quantize  # noqa: E402
from hbfp_hw.host import torch_kernels  # noqa: E402
from hbfp_hw.host.torch_quant import supports, torch_quantize  # noqa: E402

SR8 = HBFP8.replace(rounding="stochastic", seed=1234)


# -- the quantizer ---------------------------------------------------------------------

FORMATS = [
    HBFP8, HBFP4, MXINT8, MXINT8.replace(block_axes=(0,)), SR8,
    HBFP4.replace(rounding="stochastic", seed=3, sr_lanes=4, sr_bits=11),
    HBFP8.replace(man_bits=16, rounding="stochastic", sr_bits=16, seed=9),  # float64 SR
    HBFP8.replace(rounding="nearest_away"), HBFP8.replace(rounding="toward_zero"),
    HBFP8.replace(exp_bits=4),                                   # exponents clamp
    HBFP8.replace(exp_bits=10, man_bits=12, block_shape=(8, 16)),
    HBFP4.replace(block_shape=(1, 8)), HBFP8.replace(block_shape=(32,), block_axes=(0,)),
]


def _nasty(rng, shape):
    """Wide exponent spread, zeros, an all-zero tile, subnormals, exact ties, saturating
    maxima and negative zeros."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-150, 40, shape))
    x[rng.random(shape) < 0.15] = 0.0
    x[:16, :16] = 0.0
    x = x.astype(np.float32)
    flat = x.reshape(-1)
    n = flat.size
    idx = rng.integers(0, n, max(1, n // 20))
    flat[idx[: len(idx) // 3]] = np.float32(1e-41) * rng.integers(1, 100, len(idx) // 3)
    flat[idx[len(idx) // 3:]] = -0.0
    return x


def _ties(rng, shape, fmt):
    """Tiles whose maximum is 1.0 (E = 0) and whose elements sit on, just above and just
    below half-integers of the mantissa grid, plus saturating values (1.99)."""
    step = 2.0 ** -fmt.frac_bits
    k = rng.integers(-2**(fmt.man_bits - 1), 2**(fmt.man_bits - 1), shape)
    off = rng.choice([0.5, 0.5, 0.5 - 2**-14, 0.5 + 2**-14, 0.0, 0.25], shape)
    x = ((k + off) * step).astype(np.float32)
    x = np.clip(x, -1.99, 1.99)
    x[::16, ::16] = 1.0
    x[1::16, 1::16] = -1.99      # rounds past mmax: saturates
    return x


PATHS = ["kernels", "torch"] if torch_kernels.HAVE_NUMBA else ["torch"]


@pytest.fixture(params=PATHS)
def quant_path(request, monkeypatch):
    """Run the test on the compiled kernels and on the PyTorch fallback."""
    monkeypatch.setattr(torch_kernels, "ENABLED", request.param == "kernels")
    return request.param


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.rounding}-"
                         f"{f.man_bits}b-{f.block_shape}-{f.block_axes}-l{f.sr_lanes}")
@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (5, 300), (1, 1), (48, 33)])
def test_quantize_matches_golden(fmt, shape, rng, quant_path):
    for x in (_nasty(rng, shape), _ties(rng, shape, fmt),
              rng.standard_normal(shape).astype(np.float32)):
        ref = quantize(x, fmt)
        got = torch_quantize(torch.from_numpy(x), fmt)
        assert got.shape == ref.shape and got.fmt == fmt
        assert got.mantissas.dtype == ref.mantissas.dtype
        assert got.exponents.dtype == ref.exponents.dtype
        np.testing.assert_array_equal(got.mantissas, ref.mantissas)
        np.testing.assert_array_equal(got.exponents, ref.exponents)
        np.testing.assert_array_equal(got.invalid, ref.invalid)


def test_quantize_large_stochastic_matches_golden(rng, quant_path):
    x = (rng.standard_normal((300, 1100)) * np.exp2(rng.integers(-8, 8, (300, 1)))).astype(
        np.float32)
    for fmt in (SR8, HBFP4.replace(rounding="stochastic", seed=77)):
        assert quantize(x, fmt).equal(torch_quantize(torch.from_numpy(x), fmt))


def test_quantize_nonfinite_and_other_inputs_go_to_golden(rng, quant_path):
    x = rng.standard_normal((20, 20)).astype(np.float32)
    x[17, 3] = np.inf
    with pytest.raises(NonFiniteBlockError) as e:
        torch_quantize(torch.from_numpy(x), HBFP8)
    assert e.value.block_index == (1, 0)
    # other ranks and dtypes: the golden model's answer
    x3 = rng.standard_normal((2, 20, 20)).astype(np.float32)
    assert not supports(x3.shape, HBFP8)
    assert torch_quantize(torch.from_numpy(x3), HBFP8).equal(quantize(x3, HBFP8))
    x64 = rng.standard_normal((20, 20))
    assert torch_quantize(torch.from_numpy(x64), HBFP8).equal(quantize(x64, HBFP8))
    # a numpy input is accepted too
    assert torch_quantize(x3[0], SR8).equal(quantize(x3[0], SR8))


def test_quantized_transpose_is_reusable(rng):
    x = rng.standard_normal((40, 24)).astype(np.float32)
    q = torch_quantize(torch.from_numpy(x), HBFP8)
    assert q.T.equal(quantize(np.ascontiguousarray(x.T), HBFP8))


# -- the float32 GEMM shortcut ---------------------------------------------------------

@pytest.fixture
def f32_counter(monkeypatch):
    """Force the float32 shortcut on every size and count the GEMMs it computed (on the
    PyTorch path: the compiled kernels are switched off)."""
    monkeypatch.setattr(torch_kernels, "ENABLED", False)
    counts = {"f32": 0, "declined": 0}
    orig = htorch._shortcut_f32

    def wrapped(*args):
        out = orig(*args)
        counts["f32" if out is not None else "declined"] += 1
        return out
    monkeypatch.setattr(htorch, "_F32_GEMM_MIN", 0)
    monkeypatch.setattr(htorch, "_shortcut_f32", wrapped)
    return counts


@pytest.mark.parametrize("spread", [0, 2, 6])
def test_f32_shortcut_bit_identical(spread, rng, f32_counter):
    for trial in range(30):
        M, K, N = (int(v) for v in rng.integers(1, 90, 3))
        fmt = (HBFP8, HBFP4, MXINT8)[trial % 3]
        a = rng.standard_normal((M, K)) * np.exp2(rng.integers(-spread, spread + 1, (M, K)))
        b = rng.standard_normal((K, N)) * np.exp2(rng.integers(-spread, spread + 1, (K, N)))
        a[rng.random((M, K)) < 0.3] = 0.0
        if trial % 5 == 0:
            a[: min(M, 16)] = 0.0            # an all-zero row of tiles
        aq = quantize(a.astype(np.float32), fmt)
        if fmt is MXINT8:
            bq = quantize(b.astype(np.float32), fmt.replace(block_axes=(0,)))
        else:
            bq = quantize(b.T.astype(np.float32), fmt).T
        ref, got = bfp_matmul(aq, bq), htorch.fast_bfp_matmul(aq, bq)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"trial {trial}: {fmt.name} {M}x{K}x{N}")
    assert f32_counter["f32"] >= 10


@pytest.mark.parametrize("path", PATHS)
def test_f64_shortcut_bit_identical(path, rng, monkeypatch):
    """The float64 GEMM of the shortcut (taken when the float32 bound fails)."""
    monkeypatch.setattr(torch_kernels, "ENABLED", path == "kernels")
    monkeypatch.setattr(htorch, "_F32_GEMM_MIN", 1 << 62)
    for trial in range(20):
        M, K, N = (int(v) for v in rng.integers(1, 90, 3))
        fmt = (HBFP8, HBFP4, MXINT8)[trial % 3]
        a = rng.standard_normal((M, K)) * np.exp2(rng.integers(-3, 4, (M, K)))
        b = rng.standard_normal((K, N)) * np.exp2(rng.integers(-3, 4, (K, N)))
        aq = quantize(a.astype(np.float32), fmt)
        bt = fmt.replace(block_axes=(0,)) if fmt is MXINT8 else None
        bq = quantize(b.astype(np.float32), bt) if bt else quantize(
            b.T.astype(np.float32), fmt).T
        ref, got = bfp_matmul(aq, bq), htorch.fast_bfp_matmul(aq, bq)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_f32_shortcut_extremes(rng, f32_counter):
    """Tiny and huge exponents (results near float32's limits take the float64
    conversion), long K at 8 bits (the exactness bound fails: float64 GEMM)."""
    cases = []
    for scale in (2.0**-60, 2.0**60, 1.0):
        a = (rng.standard_normal((40, 64)) * scale).astype(np.float32)
        b = (rng.standard_normal((64, 30)) * scale).astype(np.float32)
        cases.append((a, b, HBFP8))
    a = rng.uniform(0.5, 1.0, (32, 4096)).astype(np.float32)       # bound 2**24 * ... fails
    b = rng.uniform(0.5, 1.0, (4096, 32)).astype(np.float32)
    cases.append((a, b, HBFP8))
    for a, b, fmt in cases:
        aq = quantize(a, fmt)
        bq = quantize(np.ascontiguousarray(b.T), fmt).T
        ref, got = bfp_matmul(aq, bq), htorch.fast_bfp_matmul(aq, bq)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert f32_counter["declined"] >= 1 and f32_counter["f32"] >= 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("man_bits", [16, 12, 8])
def test_truncating_path_bit_identical(man_bits, path, rng, monkeypatch):
    """Exponent spreads far past the guard bits (the per-K-block truncating path, shift
    clamping), float64 block products for 16-bit mantissas, negative products that
    floor to -1, and several shift ranges per row and column."""
    monkeypatch.setattr(torch_kernels, "ENABLED", path == "kernels")
    fmt = HBFP8.replace(man_bits=man_bits, block_shape=(8, 16))
    for trial in range(6):
        M, K, N = (int(v) for v in rng.integers(5, 70, 3))
        spread = (10, 30, 70)[trial % 3]
        a = rng.standard_normal((M, K)) * np.exp2(rng.integers(-spread, spread + 1, (M, K)))
        b = rng.standard_normal((K, N)) * np.exp2(rng.integers(-spread, spread + 1, (1, N)))
        aq = quantize(a.astype(np.float32), fmt)
        bq = quantize(np.ascontiguousarray(b.T, dtype=np.float32), fmt).T
        ref, got = bfp_matmul(aq, bq), htorch.fast_bfp_matmul(aq, bq)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"{man_bits}b spread {spread} {M}x{K}x{N}")
