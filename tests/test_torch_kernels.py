"""The compiled (numba) kernels of the emulate backend are bit-identical to the golden
model (hbfp_hw.quantize / hbfp_hw.gemm), take the paths they claim, and the pure-PyTorch
fallback gives the same training bits."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import hbfp_hw.host.torch as htorch  # noqa: E402
from hbfp_hw.formats import HBFP4, HBFP8, MXINT8  # noqa: E402
from hbfp_hw.gemm import bfp_matmul  # noqa: E402
from hbfp_hw.host import torch_kernels  # noqa: E402
from hbfp_hw.host.torch_quant import torch_quantize  # noqa: E402
from hbfp_hw.quantize import quantize  # noqa: E402

needs_numba = pytest.mark.skipif(not torch_kernels.HAVE_NUMBA, reason="numba not installed")


@pytest.fixture
def kernels(monkeypatch):
    """Kernels on, path counters reset."""
    monkeypatch.setattr(torch_kernels, "ENABLED", True)
    htorch.kernel_paths.clear()
    return htorch.kernel_paths


def _same(got, ref, msg=""):
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), err_msg=msg)


def _train_steps(model, x, y, steps: int = 3) -> None:
    """``steps`` SGD steps (lr 0.05, momentum 0.9) of cross-entropy training."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _operands(rng, M, K, N, fmt, spread, zero_frac=0.3):
    a = rng.standard_normal((M, K)) * np.exp2(rng.integers(-spread, spread + 1, (M, K)))
    b = rng.standard_normal((K, N)) * np.exp2(rng.integers(-spread, spread + 1, (K, N)))
    a[rng.random((M, K)) < zero_frac] = 0.0
    aq = quantize(a.astype(np.float32), fmt)
    if len(fmt.block_axes) == 1:
        bq = quantize(b.astype(np.float32), fmt.replace(block_axes=(0,)))
    else:
        bq = quantize(np.ascontiguousarray(b.T, dtype=np.float32), fmt).T
    return aq, bq


# -- the quantizer ---------------------------------------------------------------------

@needs_numba
def test_quantize_kernel_is_taken(rng, monkeypatch):
    calls = []
    orig = torch_kernels.quantize_2d
    monkeypatch.setattr(torch_kernels, "ENABLED", True)
    monkeypatch.setattr(torch_kernels, "quantize_2d",
                        lambda *a: calls.append(1) or orig(*a))
    x = rng.standard_normal((40, 24)).astype(np.float32)
    for fmt in (HBFP8, MXINT8, HBFP4.replace(rounding="stochastic", seed=5)):
        assert torch_quantize(torch.from_numpy(x), fmt).equal(quantize(x, fmt))
    assert len(calls) == 3
    monkeypatch.setattr(torch_kernels, "ENABLED", False)
    torch_quantize(torch.from_numpy(x), HBFP8)
    assert len(calls) == 3


@needs_numba
@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the golden model's overflows
@pytest.mark.parametrize("fmt", [
    HBFP8, HBFP8.replace(rounding="stochastic", seed=7, sr_lanes=16, sr_bits=24),
    HBFP4.replace(rounding="stochastic", seed=0xFFFFFFFF, sr_lanes=3, sr_bits=1),
    HBFP8.replace(exp_bits=2, rounding="nearest_away"), HBFP8.replace(exp_bits=10),
    HBFP8.replace(man_bits=2), HBFP8.replace(man_bits=16, exp_bits=4),
    HBFP8.replace(block_shape=(3, 5)), MXINT8.replace(block_shape=(7,)),
], ids=lambda f: f"{f.rounding}-{f.man_bits}b-e{f.exp_bits}-{f.block_shape}-l{f.sr_lanes}")
def test_quantize_kernel_edge_cases(fmt, rng, kernels):
    """Extremes of the format ranges: all widths' limits, 24 random bits, many lanes,
    the all-ones seed, odd block shapes (padding on both axes), values at float32's
    limits (largest finite, smallest normal, subnormals), exponents clamped at both
    ends, exact ties and negative zeros."""
    shape = (29, 43)
    x = np.clip(rng.standard_normal(shape) * np.exp2(rng.integers(-149, 127, shape)),
                -3e38, 3e38).astype(np.float32)
    flat = x.reshape(-1)
    specials = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, -np.finfo(np.float32).tiny,
                         1e-45, -1e-45, 1e-39, -0.0, 0.0, 0.5, 1.5, -2.5, 3.5,
                         2.0**-126 * 1.5, 2.0**127], dtype=np.float32)
    flat[rng.integers(0, flat.size, 200)] = rng.choice(specials, 200)
    x[:8, :8] = 0.0
    x[8:10, :] = np.float32(1e-40)               # rows of subnormals only
    ref = quantize(x, fmt)
    got = torch_quantize(torch.from_numpy(x), fmt)
    np.testing.assert_array_equal(got.mantissas, ref.mantissas)
    np.testing.assert_array_equal(got.exponents, ref.exponents)
    assert got.mantissas.dtype == ref.mantissas.dtype


@needs_numba
def test_chunked_random_stream_is_the_golden_stream(rng):
    """The eight-chain stream (chunk starts by the jump-ahead A**n) is
    hbfp_hw.prng.random_bits_u32, number for number: counts below, at and around
    multiples of 8 chains x lanes, more lanes than numbers, 1-24 bits, zero seed."""
    from hbfp_hw.prng import random_bits_u32
    counts = [*range(0, 40), 63, 64, 65, 255, 256, 257, 4095, 4096, 4097, 65536 + 3]
    for count in counts:
        for lanes in (1, 2, 3, 8, 16, 64):
            bits = int(rng.integers(1, 25))
            seed = 0 if count % 7 == 0 else int(rng.integers(0, 2**32))
            ref = random_bits_u32(seed, lanes, count, bits).astype(np.int64)
            got = torch_kernels._random_stream_fast(seed, lanes, count, bits,
                                                    torch_kernels.jump_table(count, lanes))
            np.testing.assert_array_equal(got, ref, err_msg=f"{count} {lanes} {bits}")
            np.testing.assert_array_equal(
                torch_kernels._random_stream(seed, lanes, count, bits), ref)


@needs_numba
def test_quantize_kernel_noncontiguous_and_empty(rng, kernels):
    x = rng.standard_normal((30, 50)).astype(np.float32)
    xt = torch.from_numpy(x).T                   # a non-contiguous view
    assert torch_quantize(xt, HBFP8).equal(quantize(np.ascontiguousarray(x.T), HBFP8))
    e = np.zeros((0, 5), np.float32)
    assert torch_quantize(torch.from_numpy(e), HBFP8).equal(quantize(e, HBFP8))


# -- the GEMM --------------------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("spread", [0, 3, 9, 30])
def test_kernel_matmul_bit_identical(spread, rng, kernels):
    """Random shapes and exponent spreads: no truncation (one GEMM), some K-blocks
    truncating (mixed), all truncating; every format kind."""
    for trial in range(24):
        M, K, N = (int(v) for v in rng.integers(1, 90, 3))
        fmt = (HBFP8, HBFP4, MXINT8, HBFP8.replace(block_shape=(8, 16)))[trial % 4]
        aq, bq = _operands(rng, M, K, N, fmt, spread)
        if trial % 5 == 0:
            aq.mantissas[: min(M, 16)] = 0       # all-zero tiles (exponents kept)
        _same(htorch.fast_bfp_matmul(aq, bq), bfp_matmul(aq, bq),
              f"trial {trial}: {fmt.name} {M}x{K}x{N}")
    # every GEMM went through the kernels (a mixed one counts a GEMM and block products)
    assert sum(kernels.values()) >= 24
    if spread >= 9:
        assert kernels["blocks"] >= 1


@needs_numba
def test_kernel_matmul_takes_every_path(rng, kernels, monkeypatch):
    """The float32 GEMM, the float64 GEMM (bound fails, or forced) and the per-K-block
    truncating products (float32 and float64) are each taken and bit-identical."""
    cases = []
    # small spread: float32 one-GEMM path
    cases.append(_operands(rng, 40, 64, 30, HBFP8, 0))
    # long K at 8 bits with uniform magnitudes: the float32 bound fails -> float64
    a = rng.uniform(0.5, 1.0, (32, 4096)).astype(np.float32)
    b = rng.uniform(0.5, 1.0, (4096, 32)).astype(np.float32)
    cases.append((quantize(a, HBFP8), quantize(np.ascontiguousarray(b.T), HBFP8).T))
    # one K-block shifted far below the others: mixed safe / truncating K-blocks
    a = rng.standard_normal((48, 64)).astype(np.float32)
    a[:, 16:32] *= np.float32(2.0**-20)
    a[:16, 16:32] *= np.float32(2.0**20)         # a live row tile keeps sa large
    b = rng.standard_normal((64, 40)).astype(np.float32)
    cases.append((quantize(a, HBFP8), quantize(np.ascontiguousarray(b.T), HBFP8).T))
    # 16-bit mantissas, truncating: float64 block products
    f16 = HBFP8.replace(man_bits=16)
    cases.append(_operands(rng, 33, 70, 21, f16, 40))
    for aq, bq in cases:
        _same(htorch.fast_bfp_matmul(aq, bq), bfp_matmul(aq, bq))
    assert kernels["f32"] >= 2 and kernels["f64"] >= 1 and kernels["blocks"] >= 2
    monkeypatch.setattr(htorch, "_F32_GEMM_MIN", 1 << 62)
    kernels.clear()
    aq, bq = cases[0]
    _same(htorch.fast_bfp_matmul(aq, bq), bfp_matmul(aq, bq))
    assert kernels == {"f64": 1}


@needs_numba
def test_kernel_matmul_extremes(rng, kernels):
    """Results near float32's limits (flush to zero, overflow to inf), narrow exponents
    (the non-zero blocks found by scanning the mantissas), mixed widths, K of 1."""
    cases = []
    for scale in (2.0**-60, 2.0**-70, 2.0**60, 2.0**64):
        a = (rng.standard_normal((40, 64)) * scale).astype(np.float32)
        b = (rng.standard_normal((64, 30)) * scale).astype(np.float32)
        cases.append((quantize(a, HBFP8), quantize(np.ascontiguousarray(b.T), HBFP8).T))
    narrow = HBFP8.replace(exp_bits=4)
    cases.append(_operands(rng, 37, 50, 21, narrow, 12))
    cases.append(_operands(rng, 37, 50, 21, HBFP4.replace(exp_bits=5), 3))
    a = rng.standard_normal((20, 48)).astype(np.float32)
    b = rng.standard_normal((48, 9)).astype(np.float32)
    cases.append((quantize(a, HBFP4), quantize(np.ascontiguousarray(b.T), HBFP8).T))
    cases.append(_operands(rng, 5, 1, 7, HBFP8, 2))
    for aq, bq in cases:
        _same(htorch.fast_bfp_matmul(aq, bq), bfp_matmul(aq, bq))
    assert sum(kernels.values()) >= len(cases)


@needs_numba
def test_kernel_matmul_leaves_invalid_blocks_to_torch_path(rng, kernels):
    a = rng.standard_normal((20, 96)).astype(np.float32)
    a[3, 40] = np.nan
    aq = quantize(a, MXINT8, nonfinite="flag")
    bq = quantize(rng.standard_normal((96, 7)).astype(np.float32),
                  MXINT8.replace(block_axes=(0,)))
    _same(htorch.fast_bfp_matmul(aq, bq), bfp_matmul(aq, bq))
    assert sum(kernels.values()) == 0


# -- the fused per-layer path ------------------------------------------------------------

def _edge_tensor(rng, shape, spread):
    """Random values over a spread of exponents with zeros, all-zero tiles, subnormals,
    float32's extremes (saturation), exact mantissa ties and negative zeros."""
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape)))
    x = np.clip(x, -3e38, 3e38).astype(np.float32)
    flat = x.reshape(-1)
    specials = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).tiny, 1e-45,
                         1e-39, -0.0, 0.0, 0.5, 1.5, -2.5, 3.5, 2.0**-126 * 1.5],
                        dtype=np.float32)
    k = max(1, flat.size // 20)
    flat[rng.integers(0, flat.size, k)] = rng.choice(specials, k)
    x[: min(8, shape[0]), : min(8, shape[1])] = 0.0
    if shape[0] > 10:
        x[9, :] = np.float32(1e-40)                  # a row of subnormals only
    return x


_FUSED_CASES = [
    # (weight/act/grad format, grad_stochastic, act_stochastic, (B, I, O), spread)
    (HBFP8, True, False, (32, 64, 128), 3),
    (HBFP4, True, True, (32, 128, 64), 3),
    (HBFP8, False, False, (37, 50, 21), 9),          # padding on every axis
    (HBFP4.replace(block_shape=(8, 8)), True, False, (20, 30, 10), 30),
    (HBFP8.replace(man_bits=12), True, False, (33, 70, 19), 40),   # int16 mantissas
    (HBFP8.replace(exp_bits=4, rounding="nearest_away"), False, False, (24, 40, 16), 6),
    (HBFP4.replace(sr_lanes=3, sr_bits=5), True, True, (17, 48, 33), 2),
    (HBFP8, True, False, (2048, 144, 32), 2),         # the CNN's conv2 shapes
]


@needs_numba
@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the golden model's overflows
@pytest.mark.parametrize("case", range(len(_FUSED_CASES)))
def test_fused_layer_step_is_golden(case, rng, kernels):
    """One training step of a BFPLinear through the fused kernels (one compiled call per
    direction) gives the golden model's Y, dX and dW, bit for bit: quantize X, W, dY with
    ``hbfp_hw.quantize.quantize`` (this step's seeds) and multiply with
    ``hbfp_hw.gemm.bfp_matmul``. The fused path is the one taken."""
    fmt, gsr, asr, (B, I, O), spread = _FUSED_CASES[case]
    layer = htorch.BFPLinear(I, O, bias=False, fmt=fmt, grad_stochastic=gsr,
                             act_stochastic=asr, seed=int(rng.integers(0, 2**32)),
                             layer_id=3)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(_edge_tensor(rng, (O, I), spread)))
    for step in range(2):
        x = torch.from_numpy(_edge_tensor(rng, (B, I), spread)).requires_grad_()
        dy = _edge_tensor(rng, (B, O), spread)
        fx = layer._act_fmt_for_step()
        fg = layer._grad_fmt_for_step()
        htorch.fused_calls.clear()
        y = layer(x)
        y.backward(torch.from_numpy(dy))
        assert htorch.fused_calls == {"forward": 1, "backward": 1}
        xq = quantize(x.detach().numpy(), fx)
        wq = quantize(layer.weight.detach().numpy(), fmt)
        gq = quantize(dy, fg)
        _same(y.detach().numpy(), bfp_matmul(xq, wq.T), f"Y step {step}")
        _same(x.grad.numpy(), bfp_matmul(gq, wq), f"dX step {step}")
        _same(layer.weight.grad.numpy(), bfp_matmul(gq.T, xq), f"dW step {step}")
        layer.weight.grad = None
        assert layer._step == step + 1
    assert dict(layer.quant_calls) == {"act": 2, "weight": 2, "grad": 2}
    assert layer.backend.calls == {"quantize": 6, "matmul": 6}


@needs_numba
def test_fused_layer_float64_and_f32_min_paths(rng, kernels, monkeypatch):
    """A long reduction (batch 4096) over uniform magnitudes fails the float32 bound in
    the dW GEMM (float64 there, K-chunks disabled); forcing float64 everywhere gives the
    same bits."""
    monkeypatch.setattr(htorch, "_F32_MAX_CHUNKS", 1)
    layer = htorch.BFPLinear(32, 32, bias=False, fmt=HBFP8)
    x = torch.from_numpy(rng.uniform(0.5, 1.0, (4096, 32)).astype(np.float32))
    dy = rng.uniform(0.5, 1.0, (4096, 32)).astype(np.float32)
    x.requires_grad_()
    y = layer(x)
    y.backward(torch.from_numpy(dy))
    assert kernels["f64"] >= 1 and htorch.fused_calls["backward"] >= 1
    xq = quantize(x.detach().numpy(), HBFP8)
    wq = quantize(layer.weight.detach().numpy(), HBFP8)
    gq = quantize(dy, HBFP8)
    _same(y.detach().numpy(), bfp_matmul(xq, wq.T))
    _same(x.grad.numpy(), bfp_matmul(gq, wq))
    _same(layer.weight.grad.numpy(), bfp_matmul(gq.T, xq))
    monkeypatch.setattr(htorch, "_F32_GEMM_MIN", 1 << 62)
    kernels.clear()
    y2 = layer(x.detach())
    _same(y2.detach().numpy(), y.detach().numpy())
    assert kernels == {"f64": 1}


def _uniform_signed(rng, shape, lo=0.5):
    """Magnitudes in [lo, 1) with random signs: mantissas near the top of their range,
    so long reductions fail the float32 exactness bound."""
    x = rng.uniform(lo, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return x.astype(np.float32)


@needs_numba
@pytest.mark.parametrize("fmt, gsr, B", [(HBFP8, False, 4096), (HBFP8, True, 2048),
                                         (HBFP8.replace(sr_lanes=3), True, 2100)])
def test_fused_layer_k_chunks(fmt, gsr, B, rng, kernels, monkeypatch):
    """The dW GEMM's reduction (the batch) is too long for one exact float32 GEMM (with
    chunks disabled it runs in float64), but cut into K-chunks that each pass the bound
    it runs as float32 GEMMs added in float64: the chunked path is taken, and Y, dX, dW
    are the golden model's bits (deterministic and stochastic gradients, the CNN's
    2048-row conv2 weight gradient, padding)."""
    layer = htorch.BFPLinear(144, 32, bias=False, fmt=fmt, grad_stochastic=gsr, seed=5)
    x = torch.from_numpy(_uniform_signed(rng, (B, 144))).requires_grad_()
    dy = _uniform_signed(rng, (B, 32))
    fx, fg = layer._act_fmt_for_step(), layer._grad_fmt_for_step()
    y = layer(x)
    y.backward(torch.from_numpy(dy))
    assert kernels["chunks"] >= 1 and kernels["f64"] == 0, dict(kernels)
    assert htorch.fused_calls["backward"] >= 1
    xq = quantize(x.detach().numpy(), fx)
    wq = quantize(layer.weight.detach().numpy(), fmt)
    gq = quantize(dy, fg)
    _same(y.detach().numpy(), bfp_matmul(xq, wq.T))
    _same(x.grad.numpy(), bfp_matmul(gq, wq))
    dw = bfp_matmul(gq.T, xq)
    _same(layer.weight.grad.numpy(), dw)
    # the same GEMM with chunks disabled: the whole-K bound fails (float64), same bits
    monkeypatch.setattr(htorch, "_F32_MAX_CHUNKS", 1)
    kernels.clear()
    _same(htorch.fast_bfp_matmul(gq.T, xq), dw)
    assert kernels == {"f64": 1}
    # and per call (not fused) with chunks: chunked again, same bits
    monkeypatch.setattr(htorch, "_F32_MAX_CHUNKS", 16)
    kernels.clear()
    _same(htorch.fast_bfp_matmul(gq.T, xq), dw)
    assert kernels == {"chunks": 1}


@needs_numba
def test_k_chunks_decline_to_float64(rng, kernels, monkeypatch):
    """Float64 is still taken where chunks cannot help: a single K-block fails the bound
    (a K-block 8 binades below the row maxima makes the shift w = G = 8, so an unshifted
    K-block of full mantissas exceeds 2**(24 - w)), or more chunks than allowed."""
    a = _uniform_signed(rng, (32, 64), lo=0.9)
    a[:, 16:32] *= np.float32(2.0**-8)
    b = _uniform_signed(rng, (64, 24), lo=0.9)
    aq, bq = quantize(a, HBFP8), quantize(np.ascontiguousarray(b.T), HBFP8).T
    _same(htorch.fast_bfp_matmul(aq, bq), bfp_matmul(aq, bq))
    assert kernels == {"f64": 1}
    # 4096-long reduction: needs more than 2 chunks
    a = _uniform_signed(rng, (16, 4096))
    b = _uniform_signed(rng, (4096, 16))
    aq, bq = quantize(a, HBFP8), quantize(np.ascontiguousarray(b.T), HBFP8).T
    ref = bfp_matmul(aq, bq)
    kernels.clear()
    _same(htorch.fast_bfp_matmul(aq, bq), ref)
    assert kernels == {"chunks": 1}
    monkeypatch.setattr(htorch, "_F32_MAX_CHUNKS", 2)
    kernels.clear()
    _same(htorch.fast_bfp_matmul(aq, bq), ref)
    assert kernels == {"f64": 1}


@needs_numba
def test_k_chunk_boundaries(rng):
    """The greedy chunking itself: fewest chunks on K-block boundaries, each passing the
    bound, the bound recomputed from scratch by brute force on the integer operands."""
    for trial in range(30):
        nkb, M, N, L = int(rng.integers(1, 40)), int(rng.integers(1, 9)), \
            int(rng.integers(1, 9)), 4
        w = int(rng.integers(0, 4))
        top = int(rng.integers(2, 4000))
        a = rng.integers(0, top, (M, nkb * L))
        b = rng.integers(0, top, (nkb * L, N))
        a[:, rng.random(nkb * L) < 0.2] = 0
        rs = a.reshape(M, nkb, L).sum(2).T.copy()
        cs = b.reshape(nkb, L, N).sum(1)
        ak, bk = a.reshape(M, nkb, L).max((0, 2)), b.reshape(nkb, L, N).max((1, 2))
        ch = np.empty(nkb + 1, np.int64)
        st = torch_kernels._chunks(rs, cs, ak, bk, w, L, 64, ch)
        lim = 2.0 ** (24 + w)

        def passes(k0, k1):
            sa, sb = a[:, k0:k1], b[k0:k1]
            return min(float(sa.sum(1).max()) * float(sb.max()),
                       float(sa.max()) * float(sb.sum(0).max())) <= lim

        if st == 1:
            assert not all(passes(k * L, k * L + L) for k in range(nkb))
            continue
        nc = max(1, st >> 1)
        bounds = [int(v) for v in ch[: nc + 1]]
        assert bounds[0] == 0 and bounds[-1] == nkb * L
        assert all(v % L == 0 for v in bounds) and bounds == sorted(set(bounds))
        for k0, k1 in zip(bounds, bounds[1:]):
            assert passes(k0, k1)
            if k1 < nkb * L:
                assert not passes(k0, k1 + L)      # greedy: maximal chunks
        if st == 0:
            assert passes(0, nkb * L)


@needs_numba
def test_fused_path_matches_per_call_path_in_training(rng, monkeypatch):
    """MLP and CNN training (stochastic gradients and input dither, bias, an input layer
    without dX) gives the same weights through the fused path as through the per-call
    kernels (a subclass of EmulateBackend does not take the fused path)."""
    from hbfp_hw.host.train import format_kwargs, make_model

    class PerCall(htorch.EmulateBackend):
        pass

    monkeypatch.setattr(torch_kernels, "ENABLED", True)
    for name in ("mlp", "cnn"):
        for fname in ("hbfp8", "hb4", "hb4-in8"):
            x = torch.from_numpy(rng.random((24, 1, 8, 8), dtype=np.float32))
            y = torch.from_numpy(rng.integers(0, 10, 24))
            torch.manual_seed(0)
            base = make_model(name)
            finals = []
            for be in ("emulate", PerCall()):
                htorch.fused_calls.clear()
                m = htorch.convert(copy.deepcopy(base), backend=be, **format_kwargs(fname))
                _train_steps(m, x, y)
                n = len(htorch.bfp_layers(m))
                fused = {"forward": 3 * n, "backward": 3 * n}
                assert htorch.fused_calls == (fused if be == "emulate" else {})
                finals.append([p.detach().clone() for p in m.parameters()])
            for p, q in zip(*finals):
                assert torch.equal(p, q), (name, fname)


@needs_numba
def test_fused_path_nonfinite_and_fallbacks(rng, kernels):
    """NaN/Inf in X or dY: the fused kernel declines and the per-call path raises the
    golden model's error; MX formats, float64 operands and evaluation after training
    (a new plan) are handled."""
    layer = htorch.BFPLinear(32, 16, fmt=HBFP8, grad_stochastic=True)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    x[2, 5] = np.inf
    with pytest.raises(ValueError):
        layer(torch.from_numpy(x))
    x[2, 5] = 1.0
    xt = torch.from_numpy(x).requires_grad_()
    out = layer(xt)
    dy = torch.zeros_like(out)
    dy[0, 0] = float("nan")
    with pytest.raises(ValueError):
        out.backward(dy)
    spy = htorch.BFPLinear(32, 16, fmt=HBFP8)
    spy._quant = lambda x, fmt, role: htorch.BFPLayerMixin._quant(spy, x, fmt, role)
    htorch.fused_calls.clear()
    spy(torch.from_numpy(x)).sum().backward()
    assert not htorch.fused_calls and sum(spy.quant_calls.values()) == 3
    mx = htorch.BFPLinear(32, 16, fmt=MXINT8)
    htorch.fused_calls.clear()
    mx(torch.from_numpy(x)).sum().backward()
    assert not htorch.fused_calls
    layer.eval()
    with torch.no_grad():
        ref = bfp_matmul(quantize(x, HBFP8), quantize(layer.weight.numpy(), HBFP8).T)
        got = layer(torch.from_numpy(x)) - layer.bias
        assert torch.equal(got + layer.bias, layer(torch.from_numpy(x)))
        _same((torch.from_numpy(ref) + layer.bias).numpy(),
              layer(torch.from_numpy(x)).numpy())
    assert htorch.fused_calls["forward"] >= 1


# -- training: kernels versus fallback ---------------------------------------------------

@pytest.mark.parametrize("fmt", ["hbfp8", "mxint8"])
def test_training_bits_same_with_and_without_kernels(fmt, rng, monkeypatch):
    """A few CNN training steps (stochastic gradients for hbfp8) give identical weights
    with the compiled kernels and with the pure-PyTorch fallback."""
    pytest.importorskip("sklearn")
    from hbfp_hw.host.train import format_kwargs, make_model
    x = torch.from_numpy(rng.random((16, 1, 8, 8), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 16))
    torch.manual_seed(0)
    base = make_model("cnn")
    finals = []
    for enabled in ([True, False] if torch_kernels.HAVE_NUMBA else [False]):
        monkeypatch.setattr(torch_kernels, "ENABLED", enabled)
        htorch.kernel_paths.clear()
        m = htorch.convert(copy.deepcopy(base), backend="emulate", **format_kwargs(fmt))
        _train_steps(m, x, y)
        assert (sum(htorch.kernel_paths.values()) > 0) == enabled
        finals.append([p.detach().clone() for p in m.parameters()])
    for p, q in zip(finals[0], finals[-1]):
        assert torch.equal(p, q)


def test_fallback_without_numba():
    """With numba unavailable (HBFP_HW_NO_NUMBA=1) the emulate backend runs on its
    PyTorch paths and gives the golden model's bits."""
    code = (
        "import numpy as np, torch\n"
        "from hbfp_hw.host import torch_kernels as k\n"
        "from hbfp_hw.host.torch import fast_bfp_matmul, kernel_paths\n"
        "from hbfp_hw.host.torch_quant import torch_quantize\n"
        "from hbfp_hw.formats import HBFP8\n"
        "from hbfp_hw.gemm import bfp_matmul\n"
        "from hbfp_hw.quantize import quantize\n"
        "assert not k.HAVE_NUMBA and not k.ENABLED\n"
        "x = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)\n"
        "q = torch_quantize(torch.from_numpy(x), HBFP8)\n"
        "assert q.equal(quantize(x, HBFP8))\n"
        "r = fast_bfp_matmul(q, q.T)\n"
        "assert (r.view(np.uint32) == bfp_matmul(q, q.T).view(np.uint32)).all()\n"
        "assert not kernel_paths\n")
    env = dict(os.environ, HBFP_HW_NO_NUMBA="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
