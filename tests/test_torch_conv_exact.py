"""The compiled HyperBlock-convolution path of BFPConv2d (host/torch.py ``_conv_forward``
/ ``_conv_backward``, host/torch_kernels.py ``conv_quantize_4d`` / ``conv_check``):
bit for bit against hbfp_hw.conv on every path (float32, float32 halves, float64, the
bit-level fallback), with the paths forced by the data and checked by the counters."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import hbfp_hw.host.torch as htorch  # noqa: E402
from hbfp_hw.conv import (ConvGeometry, bfp_conv2d, bfp_conv2d_input_grad,  # noqa: E402
                          bfp_conv2d_weight_grad, conv_format)
from hbfp_hw.formats import HBFP4, HBFP8  # noqa: E402
from hbfp_hw.host import torch_kernels  # noqa: E402
from hbfp_hw.quantize import quantize  # noqa: E402

pytestmark = pytest.mark.skipif(not torch_kernels.ENABLED,
                                reason="the compiled conv path needs numba")


def _same(a, b, msg=""):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, msg
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=msg)


def _operand(x: np.ndarray, fmt):
    """The compiled quantization of ``x`` and the golden model's, checked equal."""
    op = htorch._conv_operand(torch.from_numpy(x), fmt)
    q = quantize(x, fmt)
    assert isinstance(op, htorch._ConvOperand)
    np.testing.assert_array_equal(op.man, q.mantissas)
    np.testing.assert_array_equal(op.exps, q.exponents)
    return op, q


def _run(x, w, dy, fmt_x, fmt_w, fmt_g, geo):
    """Forward, dX and dW through the compiled path and through hbfp_hw.conv: equal bit
    for bit; returns the paths taken."""
    htorch.conv_paths.clear()
    xo, xq = _operand(x, fmt_x)
    wo, wq = _operand(w, fmt_w)
    go, gq = _operand(dy, fmt_g)
    y = htorch._conv_forward(xo, wo, geo)
    y_ref = bfp_conv2d(xq, wq, geometry=geo)
    _same(y, y_ref, "forward")
    bias = np.linspace(-1, 1, w.shape[0], dtype=np.float32)
    _same(htorch._conv_forward(xo, wo, geo, bias=bias), y_ref + bias[None, :, None, None],
          "forward + bias")
    dx, dw = htorch._conv_backward(go, wo, xo, x.shape[2:], w.shape[2:], geo, True, True)
    _same(dx, bfp_conv2d_input_grad(gq, wq, x.shape[2:], geometry=geo), "dX")
    _same(dw, bfp_conv2d_weight_grad(gq, xq, w.shape[2:], geometry=geo), "dW")
    return {k: v for k, v in htorch.conv_paths.items()}


# the geometries of the digits CNNs (cnn: 3x3 padding 1; cnn2: and stride 2) and others
_GEOS = [ConvGeometry.of(1, 1, 1), ConvGeometry.of(2, 1, 1), ConvGeometry.of(1, 0, 1),
         ConvGeometry.of((1, 2), (2, 0), (2, 1))]


@pytest.mark.parametrize("fmt", [HBFP8, HBFP4], ids=["hbfp8", "hb4"])
@pytest.mark.parametrize("geo", _GEOS, ids=["s1p1", "s2p1", "s1p0", "mixed"])
def test_compiled_conv_matches_golden(fmt, geo, rng):
    _check_random(fmt, geo, rng)


@pytest.mark.parametrize("fmt", [HBFP8.replace(man_bits=12), HBFP8.replace(exp_bits=5)],
                         ids=["12-bit mantissas", "5-bit exponents"])
def test_compiled_conv_other_widths(fmt, rng):
    """12-bit mantissas (int16, no mantissa halves: float64 when float32 fails) and 5-bit
    exponents (a zero block's exponent emin is also a live one's: liveness from the
    mantissas): same bits as the golden model."""
    _check_random(fmt, ConvGeometry.of(2, 1, 1), rng)


def _check_random(fmt, geo, rng):
    """Random data with channel/sample padding (N=18, C=5, O=20 against 16x16 blocks),
    zero blocks and a sample block with stochastic dY: all three convolutions equal the
    golden model's bit for bit (whatever path the data sends them down)."""
    x = (rng.standard_normal((18, 5, 7, 6)) * 2.0 ** rng.integers(-3, 4, (18, 5, 7, 6)))
    x[:, :, 2] = 0.0                                  # a row of all-zero blocks
    x = np.maximum(x, 0).astype(np.float32)           # ReLU-like activations
    w = (rng.standard_normal((20, 5, 3, 3)) * 0.3).astype(np.float32)
    ho, wo_ = geo.output_size((7, 6), (3, 3))
    dy = (rng.standard_normal((18, 20, ho, wo_)) * 1e-3).astype(np.float32)
    f = conv_format(fmt)
    g = conv_format(fmt.replace(rounding="stochastic", seed=int(rng.integers(1 << 30))))
    paths = _run(x, w, dy, f, f, g, geo)
    assert sum(paths.values()) == 4       # forward twice (with and without bias)


def _blocky(rng, shape, man, exps):
    """A tensor whose (16 x 16)-block exponents are ``exps`` (shape (g0, g1, H, W)) and
    whose elements have mantissa magnitudes near ``man`` (HBFP8: 6 fraction bits)."""
    x = np.empty(shape, np.float32)
    g0, g1 = exps.shape[:2]
    for i in range(g0):
        for j in range(g1):
            blk = x[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            m = rng.integers(man - 8, man + 1, blk.shape) * rng.choice([-1, 1], blk.shape)
            blk[...] = m * np.exp2(exps[i, j].astype(np.float64) - 6)
    return x


@pytest.mark.parametrize("shift, path", [(0, "f32"), (4, "split"), (8, "f64"),
                                         (9, "golden")])
def test_each_path_is_taken_and_exact(shift, path, rng):
    """Forward convolutions built to take each path: large mantissas over 32 channels
    (HBFP8) and one input position whose blocks are ``shift`` binades below the rest
    (the smallest live pair's unit falls by ``shift``): 0 -> float32, 4 -> two float32
    halves, 8 (= guard bits) -> float64, 9 -> a truncating pair -> the bit-level path.
    Each is checked bit for bit and by the path counters."""
    f = conv_format(HBFP8)
    ex = np.zeros((2, 2, 5, 5), np.int64)
    ex[:, :, 2, 2] = -shift
    x = _blocky(rng, (32, 32, 5, 5), 120, ex)
    w = _blocky(rng, (16, 32, 3, 3), 120, np.zeros((1, 2, 3, 3), np.int64))
    geo = ConvGeometry.of(1, 1, 1)
    htorch.conv_paths.clear()
    xo, xq = _operand(x, f)
    wo, wq = _operand(w, f)
    _same(htorch._conv_forward(xo, wo, geo), bfp_conv2d(xq, wq, geometry=geo))
    assert dict(htorch.conv_paths) == {("fwd", path): 1}


@pytest.mark.parametrize("max_status, path", [(2, "golden"), (0, "golden"), (-1, "golden")])
def test_forced_fallback(max_status, path, rng, monkeypatch):
    """With the allowed paths restricted (``_CONV_MAX_STATUS``) a convolution that needs
    a wider path runs the bit-level one: same bits."""
    monkeypatch.setattr(htorch, "_CONV_MAX_STATUS", max_status)
    f = conv_format(HBFP8)
    ex = np.zeros((2, 2, 5, 5), np.int64)
    ex[:, :, 2, 2] = -8 if max_status >= 0 else 0
    x = _blocky(rng, (32, 32, 5, 5), 120, ex)
    w = _blocky(rng, (16, 32, 3, 3), 120, np.zeros((1, 2, 3, 3), np.int64))
    dy = _blocky(rng, (32, 16, 5, 5), 60, np.full((2, 1, 5, 5), -3))
    paths = _run(x, w, dy, f, f, f, ConvGeometry.of(1, 1, 1))
    assert paths[("fwd", path)] == 2


def test_backward_paths(rng):
    """dX and dW on the per-sample-block (dW), halves and float64 paths (a dY position
    ``shift`` binades below the rest), bit for bit; dX and dW take different paths in
    one call."""
    f = conv_format(HBFP8)
    x = _blocky(rng, (32, 32, 5, 5), 120, np.zeros((2, 2, 5, 5), np.int64))
    w = _blocky(rng, (32, 32, 3, 3), 120, np.zeros((2, 2, 3, 3), np.int64))
    seen = set()
    for shift in (1, 2, 4, 6):
        e = np.zeros((2, 2, 5, 5), np.int64)
        e[:, :, 1, 3] = -shift
        dy = _blocky(rng, (32, 32, 5, 5), 100, e)
        seen |= {kp for kp in _run(x, w, dy, f, f, f, ConvGeometry.of(1, 1, 1))
                 if kp[0] != "fwd"}
    assert {("dw", "chunks"), ("dw", "split"), ("dw", "f64"), ("dx", "f32"), ("dx", "split"),
            ("dx", "f64")} <= seen


def test_zero_and_tiny_tensors(rng):
    """All-zero operands (every block dead), a single sample, and subnormal inputs
    (flushed to zero by the quantizer): same bits as the golden model."""
    f = conv_format(HBFP4)
    geo = ConvGeometry.of(2, 1, 1)
    x = np.zeros((1, 3, 5, 5), np.float32)
    x[0, 0, 0, 0] = 1e-40                                 # subnormal
    w = (rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    dy = np.zeros((1, 4, 3, 3), np.float32)
    _run(x, w, dy, f, f, f, geo)
    x = rng.random((1, 3, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    _run(x, w, dy, f, f, f, geo)


def test_wide_exponent_range_takes_the_bit_level_path(rng):
    """An operand whose live blocks span more than CONV_MAX_RANGE binades is not scaled
    into float32: the bit-level path, same bits."""
    f = conv_format(HBFP8)
    x = rng.random((16, 16, 3, 3)).astype(np.float32)
    x[:, :, 0, 0] *= np.float32(2.0**-80)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    paths = _run(x, w, dy, f, f, f, ConvGeometry.of(1, 1, 1))
    assert paths[("fwd", "golden")] == 2 and paths[("dw", "golden")] == 1


def test_quantizer_nonfinite_and_rounding_modes(rng):
    """conv_quantize_4d: NaN/Inf -> None (the golden model then decides); every rounding
    mode and stochastic lanes give the golden mantissas, exponents and statistics."""
    x = rng.standard_normal((20, 18, 3, 2)).astype(np.float32)
    f = conv_format(HBFP8)
    bad = x.copy()
    bad[3, 4, 1, 1] = np.inf
    assert torch_kernels.conv_quantize_4d(bad, f, 16, 16, 32, 32) is None
    for fmt in (HBFP8.replace(rounding="toward_zero"), HBFP8.replace(rounding="nearest_away"),
                HBFP4.replace(rounding="stochastic", seed=5, sr_lanes=3),
                HBFP4.replace(rounding="stochastic", seed=7),
                HBFP8.replace(rounding="stochastic", seed=9, sr_bits=24)):
        op, q = _operand(x, conv_format(fmt))
        m = np.abs(q.mantissas.astype(np.int64)).reshape(2, 16, 2, 16, 3, 2)
        np.testing.assert_array_equal(op.stats[0], m.max(axis=(1, 3)))
        np.testing.assert_array_equal(op.stats[1], m.sum(axis=3).max(axis=1))
        np.testing.assert_array_equal(op.stats[2], m.sum(axis=1).max(axis=2))
        deq = q.mantissas[:20, :18] * np.exp2(np.repeat(np.repeat(
            q.exponents.astype(np.float64) - op.eref, 16, 0), 16, 1)[:20, :18])
        np.testing.assert_array_equal(op.val.numpy().astype(np.float64), deq)
    # one real channel in a block of 16, padded samples (a model input, stochastic): the
    # padding's random numbers are skipped, the real elements' are the golden ones
    for seed in (0, 3):
        _operand(rng.standard_normal((33, 1, 5, 3)).astype(np.float32),
                 conv_format(HBFP4.replace(rounding="stochastic", seed=seed)))


def test_check_picks_a_path_every_output_block_allows():
    """The halves' bound is not implied by the float32 one: when one output block passes
    float32 but not the halves and another passes only the halves, the check must fall
    back to float64 (a path exact for both), not to the halves. Built on the block
    statistics directly (a 1x1 convolution, two channel blocks 12 binades apart, two
    output blocks)."""
    xe = np.array([0, -12], np.int16).reshape(1, 2, 1, 1)
    xs = np.zeros((3, 1, 2, 1, 1), np.int32)
    xs[:, 0, 0, 0, 0] = [127, 2032, 2032]       # max |m|, largest row sum, column sum
    xs[:, 0, 1, 0, 0] = [1, 1, 1]
    we = np.zeros((2, 2, 1, 1), np.int16)
    ws = np.ones((3, 2, 2, 1, 1), np.int32)
    ws[:, 0, 0, 0, 0] = [2, 300, 300]   # block 0: float32 sum 4064 <= 2**12, halves 4500
    ws[:, 1, 0, 0, 0] = [127, 100, 100]  # block 1: float32 sum 12700, halves 1500
    geo = ConvGeometry.of(1, 0, 1)
    assert torch_kernels.conv_check("fwd", xe, xs, we, ws, (1, 1), geo, 20) == \
        torch_kernels.CONV_F64
    # each block alone takes its own cheapest path
    assert torch_kernels.conv_check("fwd", xe, xs, we[:1], ws[:, :1], (1, 1), geo, 20) == \
        torch_kernels.CONV_F32
    assert torch_kernels.conv_check("fwd", xe, xs, we[1:], ws[:, 1:], (1, 1), geo, 20) == \
        torch_kernels.CONV_SPLIT


@pytest.mark.parametrize("fmt", [HBFP4, HBFP8], ids=["hb4", "hbfp8"])
def test_whole_tensor_float32_test_agrees_with_the_block_check(fmt, rng):
    """conv_check's whole-tensor float32 test (given the reduction length) fires only
    where the per-block check also finds float32 for every output block, for the three
    convolutions of operands with 0-7 binades between positions; it fires for some."""
    geo = ConvGeometry.of(1, 1, 1)
    f = conv_format(fmt)
    fired = 0
    for trial in range(24):
        spread = trial % 8

        def t(shape):
            v = rng.standard_normal(shape) * np.exp2(
                rng.integers(0, spread + 1, (1, 1) + shape[2:]))
            return torch.from_numpy(v.astype(np.float32))
        xo = htorch._conv_operand(t((32, 16, 6, 6)), f)
        wo = htorch._conv_operand(t((16, 16, 3, 3)), f)
        go = htorch._conv_operand(t((32, 16, 6, 6)), f)
        for kind, a, b, size, k in (
                ("fwd", xo, wo, (6, 6), wo.man.shape[1] * 9),
                ("dx", go, wo, (6, 6), wo.man.shape[0] * 9),
                ("dw", go, xo, (3, 3), go.man.shape[0] * 36)):
            fast = torch_kernels.conv_check(kind, a.exps, a.stats, b.exps, b.stats, size,
                                            geo, 8, k)
            block = torch_kernels.conv_check(kind, a.exps, a.stats, b.exps, b.stats, size,
                                             geo, 8)
            assert fast == block, (kind, spread)
            if torch_kernels._conv_global_f32(a.exps, a.stats, b.exps, b.stats, k, 8):
                fired += 1
                assert block == torch_kernels.CONV_F32
    if fmt is HBFP4:
        assert fired > 0
