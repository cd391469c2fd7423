"""Golden HyperBlock convolution (hbfp_hw.conv): a slow scalar reference written from
docs/conv.md, the float64 error bound, the block-level im2col equivalence with
bfp_matmul, NaN/Inf, quantize-once blocking."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw.conv import (ConvGeometry, bfp_conv2d, bfp_conv2d_input_grad,
                          bfp_conv2d_weight_grad, conv2d_error_bound,
                          conv2d_input_grad_error_bound, conv2d_weight_grad_error_bound,
                          conv_format)


def _data(rng, shape, spread=6):
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread + 1, shape)
    x[rng.random(shape) < 0.1] = 0.0
    return x.astype(np.float32)


def _q(x, fmt, rows, cols, **kw):
    return h.quantize(x, conv_format(fmt, rows, cols), **kw)


# -- independent float64 convolutions (direct sums over the definition) ------------------

def _in_pos(p, k, s, pad, d):
    return p * s + k * d - pad


def _conv64(x, w, s, pad, d):
    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    Ho = (H + 2 * pad[0] - d[0] * (KH - 1) - 1) // s[0] + 1
    Wo = (W + 2 * pad[1] - d[1] * (KW - 1) - 1) // s[1] + 1
    y = np.zeros((N, O, Ho, Wo))
    for i in range(KH):
        for j in range(KW):
            for p in range(Ho):
                hh = _in_pos(p, i, s[0], pad[0], d[0])
                if not 0 <= hh < H:
                    continue
                for q in range(Wo):
                    ww = _in_pos(q, j, s[1], pad[1], d[1])
                    if 0 <= ww < W:
                        y[:, :, p, q] += x[:, :, hh, ww] @ w[:, :, i, j].T
    return y


def _dx64(dy, w, hw, s, pad, d):
    N, O, Ho, Wo = dy.shape
    _, C, KH, KW = w.shape
    dx = np.zeros((N, C) + tuple(hw))
    for i in range(KH):
        for j in range(KW):
            for p in range(Ho):
                hh = _in_pos(p, i, s[0], pad[0], d[0])
                for q in range(Wo):
                    ww = _in_pos(q, j, s[1], pad[1], d[1])
                    if 0 <= hh < hw[0] and 0 <= ww < hw[1]:
                        dx[:, :, hh, ww] += dy[:, :, p, q] @ w[:, :, i, j]
    return dx


def _dw64(dy, x, k, s, pad, d):
    N, O, Ho, Wo = dy.shape
    C, H, W = x.shape[1:]
    dw = np.zeros((O, C) + tuple(k))
    for i in range(k[0]):
        for j in range(k[1]):
            for p in range(Ho):
                hh = _in_pos(p, i, s[0], pad[0], d[0])
                for q in range(Wo):
                    ww = _in_pos(q, j, s[1], pad[1], d[1])
                    if 0 <= hh < H and 0 <= ww < W:
                        dw[:, :, i, j] += dy[:, :, p, q].T @ x[:, :, hh, ww]
    return dw


# -- the slow scalar reference (Python integers, written from docs/conv.md) -------------

class _Op:
    """A quantized 4-D operand as Python lists: mantissa(a, b, u, v), block exponent and
    validity; out-of-range spatial positions are all-zero blocks with exponent emin."""

    def __init__(self, t: h.BFPTensor):
        self.m = t.mantissas.astype(int).tolist()
        self.e = t.exponents.astype(int).tolist()
        self.inv = t.invalid.tolist()
        self.r, self.c = t.fmt.block_shape
        self.emin = t.fmt.emin
        self.f = t.fmt.man_bits - 2
        self.shape = t.shape
        self.padded = t.mantissas.shape

    def inside(self, u, v):
        return 0 <= u < self.shape[2] and 0 <= v < self.shape[3]

    def man(self, a, b, u, v):
        return self.m[a][b][u][v] if self.inside(u, v) else 0

    def block(self, ga, gb, u, v):
        """(exponent, invalid) of block (ga, gb) at position (u, v)."""
        if not self.inside(u, v):
            return self.emin, False
        return self.e[ga][gb][u][v], self.inv[ga][gb][u][v]


def _to_f32(acc, k):
    """acc * 2**k rounded to float32 as the GEMM's step 4: flush below 2**-126, nearest
    even, overflow to +-inf (acc * 2**k is exact in float64 here)."""
    v = math.ldexp(float(acc), k)
    assert float(acc) == acc
    if abs(v) < 2.0**-126:
        return 0.0
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def _output(terms, row_blocks, col_blocks, G, fa, fb):
    """One output: ``terms`` lists (P, ea, eb) per K-block; ``row_blocks`` and
    ``col_blocks`` list (exponent, invalid) of every block of the output's row and
    column."""
    if any(inv for _, inv in row_blocks) or any(inv for _, inv in col_blocks):
        return float("nan")
    e_ref = max(e for e, _ in row_blocks) + max(e for e, _ in col_blocks)
    acc = 0
    for p, ea, eb in terms:
        acc += (p * 2**G) >> (e_ref - ea - eb)       # floor division by 2**s
    return _to_f32(acc, e_ref - G - fa - fb)


def _slow_forward(xq, wq, s, pad, d, G):
    X, Wt = _Op(xq), _Op(wq)
    N, C, H, W = xq.shape
    O, _, KH, KW = wq.shape
    Ho = (H + 2 * pad[0] - d[0] * (KH - 1) - 1) // s[0] + 1
    Wo = (W + 2 * pad[1] - d[1] * (KW - 1) - 1) // s[1] + 1
    bn, bc = X.r, X.c
    bo = Wt.r
    gc = X.padded[1] // bc
    out = np.zeros((N, O, Ho, Wo), np.float32)
    for n in range(N):
        for o in range(O):
            col = [Wt.block(o // bo, cb, i, j)
                   for cb in range(gc) for i in range(KH) for j in range(KW)]
            for p in range(Ho):
                for q in range(Wo):
                    row, terms = [], []
                    for i in range(KH):
                        for j in range(KW):
                            u = _in_pos(p, i, s[0], pad[0], d[0])
                            v = _in_pos(q, j, s[1], pad[1], d[1])
                            for cb in range(gc):
                                ex, ix = X.block(n // bn, cb, u, v)
                                ew, _ = Wt.block(o // bo, cb, i, j)
                                row.append((ex, ix))
                                prod = sum(X.man(n, c, u, v) * Wt.man(o, c, i, j)
                                           for c in range(cb * bc, (cb + 1) * bc))
                                terms.append((prod, ex, ew))
                    out[n, o, p, q] = _output(terms, row, col, G, X.f, Wt.f)
    return out


def _slow_input_grad(gq, wq, hw, s, pad, d, G):
    Gd, Wt = _Op(gq), _Op(wq)
    N, O, Ho, Wo = gq.shape
    _, C, KH, KW = wq.shape
    bn, bo = Gd.r, Gd.c
    bc = Wt.c
    go = Gd.padded[1] // bo
    out = np.zeros((N, C) + tuple(hw), np.float32)
    for n in range(N):
        for c in range(C):
            col = [Wt.block(ob, c // bc, i, j)
                   for ob in range(go) for i in range(KH) for j in range(KW)]
            for u in range(hw[0]):
                for v in range(hw[1]):
                    row, terms = [], []
                    for i in range(KH):
                        for j in range(KW):
                            # output position reading (u, v) through tap (i, j), if any
                            pu, pv = u + pad[0] - i * d[0], v + pad[1] - j * d[1]
                            p = pu // s[0] if pu % s[0] == 0 else -1
                            q = pv // s[1] if pv % s[1] == 0 else -1
                            if not (0 <= p < Ho and 0 <= q < Wo):
                                p = q = -1                   # an all-zero block
                            for ob in range(go):
                                eg, ig = Gd.block(n // bn, ob, p, q)
                                ew, _ = Wt.block(ob, c // bc, i, j)
                                row.append((eg, ig))
                                prod = sum(Gd.man(n, o, p, q) * Wt.man(o, c, i, j)
                                           for o in range(ob * bo, (ob + 1) * bo))
                                terms.append((prod, eg, ew))
                    out[n, c, u, v] = _output(terms, row, col, G, Gd.f, Wt.f)
    return out


def _slow_weight_grad(gq, xq, k, s, pad, d, G):
    Gd, X = _Op(gq), _Op(xq)
    N, O, Ho, Wo = gq.shape
    C = xq.shape[1]
    bn, bo = Gd.r, Gd.c
    bc = X.c
    gn = Gd.padded[0] // bn
    out = np.zeros((O, C) + tuple(k), np.float32)
    for o in range(O):
        row = [Gd.block(nb, o // bo, p, q)
               for nb in range(gn) for p in range(Ho) for q in range(Wo)]
        for c in range(C):
            for i in range(k[0]):
                for j in range(k[1]):
                    col, terms = [], []
                    for nb in range(gn):
                        for p in range(Ho):
                            for q in range(Wo):
                                u = _in_pos(p, i, s[0], pad[0], d[0])
                                v = _in_pos(q, j, s[1], pad[1], d[1])
                                ex, ix = X.block(nb, c // bc, u, v)
                                eg, _ = Gd.block(nb, o // bo, p, q)
                                col.append((ex, ix))
                                prod = sum(Gd.man(n, o, p, q) * X.man(n, c, u, v)
                                           for n in range(nb * bn, (nb + 1) * bn))
                                terms.append((prod, eg, ex))
                    out[o, c, i, j] = _output(terms, row, col, G, Gd.f, X.f)
    return out


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


# -- bit exactness against the scalar reference ------------------------------------------

_SMALL = [
    # N, C, O, H, W, k, stride, padding, dilation, (bn, bc, bo)
    (3, 5, 4, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1), (2, 3, 3)),
    (2, 3, 3, 6, 5, (2, 3), (2, 1), (0, 2), (1, 1), (2, 2, 2)),
    (4, 2, 5, 5, 5, (3, 2), (1, 2), (2, 0), (2, 1), (3, 2, 4)),
    (2, 4, 2, 7, 6, (2, 2), (2, 2), (1, 2), (2, 2), (1, 4, 2)),
    (3, 1, 3, 4, 4, (1, 1), (2, 1), (0, 1), (1, 1), (4, 1, 1)),
]


@pytest.mark.parametrize("case", _SMALL)
@pytest.mark.parametrize("G,fmts", [(8, ("hbfp8", "hbfp8", "hbfp8")),
                                    (0, ("hbfp4", "hbfp8", "hbfp4")),
                                    (3, ("hbfp4", "hbfp4", "hbfp4"))])
def test_matches_slow_scalar_reference(case, G, fmts, rng):
    N, C, O, H, W, k, s, pad, d, (bn, bc, bo) = case
    fx, fw, fg = (h.get_format(f) for f in fmts)
    xq = _q(_data(rng, (N, C, H, W)), fx, bn, bc)
    wq = _q(_data(rng, (O, C) + k), fw, bo, bc)
    geo = ConvGeometry.of(s, pad, d)
    y = bfp_conv2d(xq, wq, geometry=geo, guard_bits=G)
    _same(y, _slow_forward(xq, wq, s, pad, d, G))
    gq = _q(_data(rng, y.shape), fg, bn, bo)
    dx = bfp_conv2d_input_grad(gq, wq, (H, W), geometry=geo, guard_bits=G)
    _same(dx, _slow_input_grad(gq, wq, (H, W), s, pad, d, G))
    dw = bfp_conv2d_weight_grad(gq, xq, k, geometry=geo, guard_bits=G)
    _same(dw, _slow_weight_grad(gq, xq, k, s, pad, d, G))


# -- error bound against float64 ----------------------------------------------------------

@pytest.mark.parametrize("G", [0, 8, 16])
def test_error_bound_random_geometries(G, rng):
    for trial in range(6):
        N, C, O = (int(v) for v in rng.integers(1, 20, 3))
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 3, 2))
        pad = tuple(int(v) for v in rng.integers(0, 3, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        H = int(rng.integers(max(1, d[0] * (kh - 1) + 1 - 2 * pad[0]), 10))
        W = int(rng.integers(max(1, d[1] * (kw - 1) + 1 - 2 * pad[1]), 10))
        bn, bc, bo = (int(v) for v in rng.choice([1, 2, 4, 8, 16], 3))
        fmt = (h.HBFP8, h.HBFP4)[trial % 2]
        x = _data(rng, (N, C, H, W), spread=10)
        w = _data(rng, (O, C, kh, kw), spread=10)
        xq, wq = _q(x, fmt, bn, bc), _q(w, fmt, bo, bc)
        geo = ConvGeometry.of(s, pad, d)
        msg = f"trial {trial}: {(N, C, O, H, W, kh, kw)} s={s} p={pad} d={d} blocks " \
              f"{(bn, bc, bo)} G={G}"
        y = bfp_conv2d(xq, wq, geometry=geo, guard_bits=G).astype(np.float64)
        ref = _conv64(xq.dequantize().astype(np.float64), wq.dequantize().astype(np.float64),
                      s, pad, d)
        bound = conv2d_error_bound(xq, wq, geometry=geo, guard_bits=G)
        slack = 1e-12 * np.abs(ref).max()                     # float64 reference rounding
        assert y.shape == ref.shape, msg
        assert np.all(np.abs(y - ref) <= bound + slack), msg
        gq = _q(_data(rng, y.shape, spread=10), fmt, bn, bo)
        dx = bfp_conv2d_input_grad(gq, wq, (H, W), geometry=geo, guard_bits=G)
        ref = _dx64(gq.dequantize().astype(np.float64), wq.dequantize().astype(np.float64),
                    (H, W), s, pad, d)
        bound = conv2d_input_grad_error_bound(gq, wq, (H, W), geometry=geo, guard_bits=G)
        assert dx.shape == ref.shape, msg
        assert np.all(np.abs(dx - ref) <= bound + 1e-12 * np.abs(ref).max()), msg
        dw = bfp_conv2d_weight_grad(gq, xq, (kh, kw), geometry=geo, guard_bits=G)
        ref = _dw64(gq.dequantize().astype(np.float64), xq.dequantize().astype(np.float64),
                    (kh, kw), s, pad, d)
        bound = conv2d_weight_grad_error_bound(gq, xq, (kh, kw), geometry=geo, guard_bits=G)
        assert dw.shape == ref.shape, msg
        assert np.all(np.abs(dw - ref) <= bound + 1e-12 * np.abs(ref).max()), msg
        if G == 16:     # tight enough to matter: far below the quantization error
            assert bound.max() < 1e-4 * np.abs(ref).max() + 1e-30


def test_lossless_format_is_exact(rng):
    """16-bit mantissas on values k/16 (exact in every block, exponents within the guard
    bits): every convolution equals the float64 one exactly."""
    fmt = h.HBFP8.replace(man_bits=16)
    x = (rng.integers(-127, 128, (5, 6, 7, 7)) / 16.0).astype(np.float32)
    w = (rng.integers(-127, 128, (4, 6, 3, 3)) / 16.0).astype(np.float32)
    dy = (rng.integers(-127, 128, (5, 4, 4, 4)) / 16.0).astype(np.float32)
    xq, wq, gq = _q(x, fmt, 4, 4), _q(w, fmt, 4, 4), _q(dy, fmt, 4, 4)
    s, p, d = (2, 2), (1, 1), (1, 1)
    assert np.array_equal(xq.dequantize(), x)
    np.testing.assert_array_equal(bfp_conv2d(xq, wq, stride=s, padding=p),
                                  _conv64(x.astype(np.float64), w, s, p, d))
    np.testing.assert_array_equal(bfp_conv2d_input_grad(gq, wq, (7, 7), stride=s, padding=p),
                                  _dx64(dy.astype(np.float64), w, (7, 7), s, p, d))
    np.testing.assert_array_equal(bfp_conv2d_weight_grad(gq, xq, (3, 3), stride=s, padding=p),
                                  _dw64(dy.astype(np.float64), x, (3, 3), s, p, d))


# -- the block-level im2col: the same numbers as bfp_matmul --------------------------------

def _blockmat(man, exp, inv, fmt, shape):
    return h.BFPTensor(fmt, shape, man, exp.astype(np.int16), inv)


def _im2col_forward(xq, wq, geo):
    """Y as bfp_matmul of block matrices: rows (p, q, n), K = (i, j, c), columns o; the
    blocks are X's and W's own blocks, padding an all-zero block with exponent emin."""
    (bn, bc), bo = xq.fmt.block_shape, wq.fmt.block_shape[0]
    Np, Cp, H, W = xq.mantissas.shape
    Op, _, KH, KW = wq.mantissas.shape
    Ho, Wo = geo.output_size((H, W), (KH, KW))
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    R, K = Ho * Wo * Np, KH * KW * Cp
    am = np.zeros((R, K), np.int16)
    ae = np.full((R // bn, K // bc), xq.fmt.emin)
    ai = np.zeros((R // bn, K // bc), bool)
    for p in range(Ho):
        for q in range(Wo):
            for i in range(KH):
                for j in range(KW):
                    u, v = p * sh + i * dh - ph, q * sw + j * dw - pw
                    if 0 <= u < H and 0 <= v < W:
                        r0, k0 = (p * Wo + q) * Np, (i * KW + j) * Cp
                        am[r0:r0 + Np, k0:k0 + Cp] = xq.mantissas[:, :, u, v]
                        ae[r0 // bn:(r0 + Np) // bn, k0 // bc:(k0 + Cp) // bc] = \
                            xq.exponents[:, :, u, v]
                        ai[r0 // bn:(r0 + Np) // bn, k0 // bc:(k0 + Cp) // bc] = \
                            xq.invalid[:, :, u, v]
    bm = wq.mantissas.transpose(2, 3, 1, 0).reshape(K, Op)
    be = wq.exponents.transpose(2, 3, 1, 0).reshape(K // bc, Op // bo)
    bi = wq.invalid.transpose(2, 3, 1, 0).reshape(K // bc, Op // bo)
    fa = xq.fmt.replace(block_axes=(0, 1), block_shape=(bn, bc))
    fb = wq.fmt.replace(block_axes=(0, 1), block_shape=(bc, bo))
    y = h.bfp_matmul(_blockmat(am, ae, ai, fa, (R, K)), _blockmat(bm, be, bi, fb, (K, Op)))
    return y.reshape(Ho, Wo, Np, Op).transpose(2, 3, 0, 1)[: xq.shape[0], : wq.shape[0]]


@pytest.mark.parametrize("geo", [ConvGeometry.of(1, 1, 1), ConvGeometry.of((2, 1), (0, 2), 2)])
def test_forward_equals_bfp_matmul_on_block_im2col(geo, rng):
    xq = _q(_data(rng, (6, 7, 8, 7), spread=12), h.HBFP8, 4, 4)
    wq = _q(_data(rng, (5, 7, 3, 2), spread=12), h.HBFP4, 2, 4)
    _same(bfp_conv2d(xq, wq, geometry=geo), _im2col_forward(xq, wq, geo))


# -- NaN / Inf ---------------------------------------------------------------------------

def test_nonfinite_blocks_poison_their_rows_and_columns(rng):
    N, C, O, H, W = 4, 6, 4, 6, 6
    s, pad, d = (2, 1), (1, 1), (1, 1)
    geo = ConvGeometry.of(s, pad, d)
    x = _data(rng, (N, C, H, W))
    w = _data(rng, (O, C, 3, 3))
    x[1, 4, 2, 3] = np.nan                          # X block (0, 1) at (2, 3): bn=2, bc=3
    xq = _q(x, h.HBFP8, 2, 3, nonfinite="flag")
    wq = _q(w, h.HBFP8, 2, 3)
    with pytest.raises(h.NonFiniteBlockError):
        _q(x, h.HBFP8, 2, 3)
    y = bfp_conv2d(xq, wq, geometry=geo)
    # the outputs of samples 0-1 whose receptive field holds position (2, 3)
    hit = _conv64(np.pad(np.ones((1, 1, 1, 1)), [(0, 0), (0, 0), (2, H - 3), (3, W - 4)]),
                  np.ones((1, 1, 3, 3)), s, pad, d)[0, 0] > 0
    expect = np.zeros(y.shape, bool)
    expect[0:2, :, hit] = True
    np.testing.assert_array_equal(np.isnan(y), expect)
    assert np.isfinite(y[~expect]).all()
    # the weight gradient: every (o, c-block 1, tap) column that reads the position
    dy = _data(rng, y.shape)
    gq = _q(dy, h.HBFP8, 2, 2)
    dw = bfp_conv2d_weight_grad(gq, xq, (3, 3), geometry=geo)
    assert np.isnan(dw[:, 3:6]).any() and not np.isnan(dw[:, 0:3]).any()
    # Inf in W: all outputs of that output-channel block, and its dX column
    w[3, 0, 1, 1] = np.inf
    wq = _q(w, h.HBFP8, 2, 3, nonfinite="flag")
    xq = _q(np.nan_to_num(x), h.HBFP8, 2, 3)
    y = bfp_conv2d(xq, wq, geometry=geo)
    assert np.isnan(y[:, 2:4]).all() and np.isfinite(y[:, 0:2]).all()
    dx = bfp_conv2d_input_grad(gq, wq, (H, W), geometry=geo)
    assert np.isnan(dx[:, 0:3]).all() and np.isfinite(dx[:, 3:6]).all()


def test_overflow_and_flush(rng):
    """Results beyond float32 become +-Inf and tiny ones flush to +0.0, as the GEMM's."""
    fmt = h.HBFP8
    x = np.full((2, 2, 3, 3), 2.0**120, np.float32)
    w = np.full((2, 2, 1, 1), 2.0**10, np.float32)
    w[1] = -(2.0**10)
    y = bfp_conv2d(_q(x, fmt, 2, 2), _q(w, fmt, 2, 2))
    assert np.isposinf(y[:, 0]).all() and np.isneginf(y[:, 1]).all()
    x = np.full((2, 2, 3, 3), 2.0**-70, np.float32)
    w = np.full((2, 2, 1, 1), -(2.0**-70), np.float32)
    y = bfp_conv2d(_q(x, fmt, 2, 2), _q(w, fmt, 2, 2))
    assert (y == 0).all() and not np.signbit(y).any()


# -- formats, blocking, validation --------------------------------------------------------

def test_conv_format_blocks_batch_and_depth_per_position(rng):
    fx = conv_format(h.HBFP4)                      # 16x16 tile -> Bn = Bc = 16
    assert fx.block_axes == (0, 1) and fx.block_shape == (16, 16) and fx.man_bits == 4
    assert conv_format(h.HBFP8, 8, 4).block_shape == (8, 4)
    with pytest.raises(ValueError, match="needs rows and cols"):
        conv_format(h.MXINT8)
    x = _data(rng, (20, 5, 3, 4))
    q = h.quantize(x, conv_format(h.HBFP8, 8, 4))
    assert q.exponents.shape == (3, 2, 3, 4)       # (N/Bn, C/Bc, H, W)
    # each position's (samples x channels) block has its own exponent: the block maximum
    blk = np.abs(x[8:16, 0:4, 1, 2])
    assert q.exponents[1, 0, 1, 2] == math.floor(math.log2(blk.max()))
    # quantizing the channels-last (H, W, N, C) matrix in 2-D tiles gives the same bits
    x2 = np.pad(x, [(0, 4), (0, 3), (0, 0), (0, 0)]).transpose(2, 3, 0, 1).reshape(-1, 8)
    q2 = h.quantize(x2, h.HBFP8.replace(block_shape=(8, 4)))
    m2 = q2.mantissas.reshape(3, 4, 24, 8).transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(m2, q.mantissas)


def test_validation(rng):
    xq = _q(_data(rng, (4, 4, 5, 5)), h.HBFP8, 2, 4)
    wq = _q(_data(rng, (4, 4, 3, 3)), h.HBFP8, 2, 2)
    with pytest.raises(ValueError, match="channel block"):
        bfp_conv2d(xq, wq)
    with pytest.raises(ValueError, match="spatial axis"):
        bfp_conv2d(xq, h.quantize(_data(rng, (4, 4, 3, 3)), h.HBFP8))
    with pytest.raises(ValueError, match="does not fit"):
        bfp_conv2d(xq, _q(_data(rng, (4, 4, 3, 3)), h.HBFP8, 2, 4), dilation=3)
    with pytest.raises(ValueError, match="stride"):
        ConvGeometry.of(0)
    gq = _q(_data(rng, (4, 4, 3, 3)), h.HBFP8, 2, 2)
    with pytest.raises(ValueError, match="not the output size"):
        bfp_conv2d_input_grad(gq, _q(_data(rng, (4, 4, 3, 3)), h.HBFP8, 2, 4), (6, 6))
    with pytest.raises(ValueError, match="sample block"):
        bfp_conv2d_weight_grad(_q(_data(rng, (4, 4, 3, 3)), h.HBFP8, 4, 2), xq, (3, 3))


def test_docs_example_runs():
    """The python example in docs/conv.md runs and its assertions hold."""
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "conv.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", src, re.S)
    assert blocks, "docs/conv.md has no python example"
    exec(compile(blocks[0], "docs/conv.md", "exec"), {})
