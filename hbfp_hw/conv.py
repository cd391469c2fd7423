"""Golden HyperBlock convolution: forward, input gradient and weight gradient.

The three tensors of a convolution layer are quantized **once** each, with exponents
shared across the batch and depth dimensions at every spatial position (see
``docs/conv.md``):

* ``X[N, C, H, W]``: blocks of ``Bn`` samples x ``Bc`` channels at each ``(h, w)``;
* ``W[O, C, kh, kw]``: blocks of ``Bo`` output x ``Bc`` input channels at each tap;
* ``dY[N, O, H', W']``: blocks of ``Bn`` samples x ``Bo`` channels at each position.

These are ordinary :class:`~hbfp_hw.quantize.BFPTensor` objects: ``quantize(x, fmt)``
with ``fmt.block_axes == (0, 1)`` (:func:`conv_format` builds such a format). Every
product of the three convolutions then reduces over an axis that lies inside blocks
(channels for the forward pass, output channels for ``dX``, samples for ``dW``), so each
convolution is a sum over taps of block-aligned GEMMs on the quantized tensors
(implicit GEMM; no quantized value is copied or quantized again) with the accumulation
of :func:`hbfp_hw.gemm.bfp_matmul`:

1. block products in exact integers, ``P = sum ma * mb`` over one block's reduction
   extent, exponent ``e = Ea + Eb``;
2. one reference exponent per output block, the maximum exponent of the output's "row"
   plus that of its "column" (below), known before any product;
3. ``acc = sum floor(P * 2**G / 2**(e_ref - e))`` with ``G`` guard bits, over taps and
   blocks (order independent);
4. one rounding to FP32 (flush below ``2**-126``, nearest even, overflow to +-Inf).

Rows and columns are those of the GEMM over the *block-level im2col* of the operands:
the result equals :func:`~hbfp_hw.gemm.bfp_matmul` applied to block matrices whose
blocks are the quantized blocks themselves, and whose padding positions are all-zero
blocks with exponent ``emin`` (``docs/conv.md`` states the three cases). Outputs whose
row or column holds an invalid (NaN/Inf) block are NaN, as in the GEMM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .formats import BFPFormat
from .gemm import DEFAULT_GUARD_BITS, acc_to_fp32, accumulator_bits
from .quantize import BFPTensor

__all__ = [
    "ConvGeometry", "conv_format", "conv_operand_blocks",
    "bfp_conv2d", "bfp_conv2d_input_grad", "bfp_conv2d_weight_grad",
    "conv2d_reference", "conv2d_input_grad_reference", "conv2d_weight_grad_reference",
    "conv2d_error_bound", "conv2d_input_grad_error_bound", "conv2d_weight_grad_error_bound",
]

_MAX_ACC_BITS = 53
_LO = -(1 << 14)          # exponent of an invalid block in the row/column maxima


def _pair(name: str, v, lo: int) -> tuple[int, int]:
    t = (v, v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or any(isinstance(a, bool) or not isinstance(a, (int, np.integer))
                          for a in t):
        raise ValueError(f"{name}={v!r}; accepted values are an integer or a pair of integers")
    if min(t) < lo:
        raise ValueError(f"{name}={v!r} is out of range; accepted range is >= {lo}")
    return int(t[0]), int(t[1])


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, zero padding and dilation of a 2-D convolution, each ``(rows, cols)``.

    Output position ``(p, q)`` and tap ``(i, j)`` read input position
    ``(p*stride[0] + i*dilation[0] - padding[0], q*stride[1] + j*dilation[1] -
    padding[1])``; positions outside the input are zero (padding).
    """

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stride", _pair("stride", self.stride, 1))
        object.__setattr__(self, "padding", _pair("padding", self.padding, 0))
        object.__setattr__(self, "dilation", _pair("dilation", self.dilation, 1))

    @classmethod
    def of(cls, stride=1, padding=0, dilation=1) -> "ConvGeometry":
        return cls(_pair("stride", stride, 1), _pair("padding", padding, 0),
                   _pair("dilation", dilation, 1))

    def output_size(self, input_hw: tuple[int, int], kernel_hw: tuple[int, int]
                    ) -> tuple[int, int]:
        """``(H', W')`` of the output for an input ``(H, W)`` and kernel ``(kh, kw)``."""
        out = []
        for n, k, s, p, d in zip(input_hw, kernel_hw, self.stride, self.padding,
                                 self.dilation):
            span = n + 2 * p - d * (k - 1) - 1
            if span < 0:
                raise ValueError(
                    f"kernel {tuple(kernel_hw)} with dilation {self.dilation} does not fit "
                    f"the input {tuple(input_hw)} padded by {self.padding}")
            out.append(span // s + 1)
        return out[0], out[1]


def _geometry(geometry, stride, padding, dilation) -> ConvGeometry:
    if geometry is not None:
        if not isinstance(geometry, ConvGeometry):
            raise TypeError(f"geometry must be a ConvGeometry, got {geometry!r}")
        return geometry
    return ConvGeometry.of(stride, padding, dilation)


def conv_format(fmt: BFPFormat, rows: int | None = None, cols: int | None = None
                ) -> BFPFormat:
    """``fmt`` with blocks of ``rows x cols`` over axes 0 and 1 of a 4-D conv operand.

    ``X[N, C, H, W]``: ``rows = Bn`` samples, ``cols = Bc`` channels; ``W[O, C, kh, kw]``:
    ``Bo x Bc``; ``dY[N, O, H', W']``: ``Bn x Bo``; one exponent per block at every
    spatial position or tap. Without ``rows``/``cols`` they are taken from ``fmt``'s 2-D
    HyperBlock tile (extent along axis 0, then axis 1 of a 2-D operand), so a tile
    ``(batch x in)`` of a linear layer's ``X`` becomes ``(Bn x Bc)``. Widths, rounding
    and seed are kept.
    """
    if not isinstance(fmt, BFPFormat):
        raise TypeError(f"fmt must be a BFPFormat, got {type(fmt).__name__}")
    if rows is None or cols is None:
        axes = [a % 2 if -2 <= a < 2 else None for a in fmt.block_axes]
        if len(axes) != 2 or None in axes or len(set(axes)) != 2:
            raise ValueError(
                f"conv_format needs rows and cols, or a 2-D HyperBlock tile format; "
                f"{fmt.name or fmt.block_shape} has block_axes={fmt.block_axes}")
        tile = dict(zip(axes, fmt.block_shape))
        rows = tile[0] if rows is None else rows
        cols = tile[1] if cols is None else cols
    if fmt.block_axes == (0, 1) and fmt.block_shape == (rows, cols):
        return fmt
    return fmt.replace(block_axes=(0, 1), block_shape=(rows, cols))


def conv_operand_blocks(t: BFPTensor, name: str = "operand") -> tuple[int, int]:
    """The ``(rows, cols)`` block extent of a 4-D conv operand along axes 0 and 1;
    ``ValueError`` if ``t`` is not 4-D or its blocks extend over a spatial axis."""
    if not isinstance(t, BFPTensor):
        raise TypeError(f"{name} must be a BFPTensor, got {type(t).__name__}")
    if t.ndim != 4:
        raise ValueError(f"{name} must be a 4-D tensor, got shape {t.shape}")
    blk = t.layout.block
    if blk[2] != 1 or blk[3] != 1:
        raise ValueError(
            f"{name}'s blocks {blk} extend over a spatial axis; conv operands are blocked "
            f"along axes 0 and 1 only (conv_format)")
    return blk[0], blk[1]


def _check_width(ma: int, mb: int, L: int, k: int, G: int, what: str) -> None:
    width = accumulator_bits(ma, mb, L, max(k, 1), G)
    if width > _MAX_ACC_BITS:
        raise ValueError(
            f"{what}: accumulator of {width} bits (man_bits {ma}x{mb}, block {L}, reduction "
            f"length {k}, guard {G}) exceeds the supported {_MAX_ACC_BITS} bits")


def _exps(t: BFPTensor) -> np.ndarray:
    """Block exponents for the row/column maxima: invalid blocks do not count."""
    return np.where(t.invalid, _LO, t.exponents.astype(np.int64))


def _pad_hw(a: np.ndarray, ph: int, pw: int, value) -> np.ndarray:
    if ph == 0 and pw == 0:
        return a
    return np.pad(a, [(0, 0), (0, 0), (ph, ph), (pw, pw)], constant_values=value)


def _tap(a: np.ndarray, i: int, j: int, geo: ConvGeometry, ho: int, wo: int) -> np.ndarray:
    """The positions tap ``(i, j)`` reads for every output position, from an array padded
    by ``geo.padding`` on its last two axes."""
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    return a[..., i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact batched block products: float64 operands holding integers, every product
    sum below ``2**53`` (the accumulator width check guarantees it). Contiguous copies
    keep NumPy on its BLAS path."""
    return np.matmul(np.ascontiguousarray(a), np.ascontiguousarray(b))


def _shift_sum(p: np.ndarray, s: np.ndarray, G: int) -> np.ndarray:
    """``floor(P * 2**G / 2**s)`` (``s`` clamped to [0, 62]), the accumulator terms."""
    return (p << G) >> np.clip(s, 0, 62)


def _fwd_parts(xq: BFPTensor, wq: BFPTensor, geo: ConvGeometry):
    if xq.ndim != 4 or wq.ndim != 4:
        raise ValueError(f"bfp_conv2d needs 4-D operands, got shapes {xq.shape} and {wq.shape}")
    bn, bc = conv_operand_blocks(xq, "x")
    bo, bc_w = conv_operand_blocks(wq, "w")
    N, C, H, W = xq.shape
    O, Cw, KH, KW = wq.shape
    if C != Cw:
        raise ValueError(f"input channels differ: x is {xq.shape}, w is {wq.shape}")
    if bc != bc_w:
        raise ValueError(f"x's channel block ({bc}) differs from w's ({bc_w}); both operands "
                         f"need the same Bc (the forward pass reduces over channels)")
    return bn, bc, bo, (N, C, H, W), (O, KH, KW)


def bfp_conv2d(xq: BFPTensor, wq: BFPTensor, *, stride=1, padding=0, dilation=1,
               geometry: ConvGeometry | None = None, guard_bits: int = DEFAULT_GUARD_BITS,
               return_acc: bool = False):
    """Forward convolution ``Y = conv(X, W)`` (cross-correlation, as ``torch.nn.Conv2d``).

    ``xq``: ``(N, C, H, W)`` blocked ``(Bn, Bc)`` over axes 0, 1; ``wq``: ``(O, C, kh, kw)``
    blocked ``(Bo, Bc)``. Reference exponent of output block ``(n-block, o-block, p, q)``:
    the largest exponent of the X blocks its receptive field reads (all taps, all channel
    blocks; padding counts as ``emin``) plus the largest exponent of W's blocks of that
    output-channel block (all taps and channel blocks). Returns float32 ``(N, O, H', W')``
    (and the padded accumulator and reference exponents, laid out
    ``(Np, H', W', Op)``, if ``return_acc``).
    """
    geo = _geometry(geometry, stride, padding, dilation)
    bn, bc, bo, (N, C, H, W), (O, KH, KW) = _fwd_parts(xq, wq, geo)
    Ho, Wo = geo.output_size((H, W), (KH, KW))
    fx, fw, G = xq.fmt.frac_bits, wq.fmt.frac_bits, guard_bits
    Np, Cp = xq.layout.padded[:2]
    Op = wq.layout.padded[0]
    gn, gc, go = Np // bn, Cp // bc, Op // bo
    _check_width(xq.fmt.man_bits, wq.fmt.man_bits, bc, Cp * KH * KW, G, "bfp_conv2d")
    ph, pw = geo.padding
    xm = _pad_hw(xq.mantissas, ph, pw, 0).astype(np.float64)
    xe = _pad_hw(xq.exponents.astype(np.int64), ph, pw, xq.fmt.emin)   # (gn, gc, Hp, Wp)
    xe_v = _pad_hw(_exps(xq), ph, pw, xq.fmt.emin)
    xinv = _pad_hw(xq.invalid, ph, pw, False)
    we = wq.exponents.astype(np.int64)                                  # (go, gc, KH, KW)
    col = _exps(wq).max(axis=(1, 2, 3))                                 # (go,)
    row = np.full((gn, Ho, Wo), _LO, np.int64)
    bad_row = np.zeros((gn, Ho, Wo), bool)
    for i in range(KH):
        for j in range(KW):
            row = np.maximum(row, _tap(xe_v, i, j, geo, Ho, Wo).max(axis=1))
            bad_row |= _tap(xinv, i, j, geo, Ho, Wo).any(axis=1)
    e_ref = row[:, :, :, None] + col[None, None, None, :]               # (gn, Ho, Wo, go)
    wm = wq.mantissas.astype(np.float64)
    acc = np.zeros((gn, bn, Ho, Wo, go, bo), np.int64)
    for i in range(KH):
        for j in range(KW):
            xt = _tap(xm, i, j, geo, Ho, Wo).reshape(gn, bn, gc, bc, Ho, Wo)
            a = xt.transpose(2, 0, 1, 4, 5, 3).reshape(gc, Np * Ho * Wo, bc)
            b = wm[:, :, i, j].reshape(Op, gc, bc).transpose(1, 2, 0)      # (gc, bc, Op)
            p = _matmul(a, b).astype(np.int64).reshape(gc, gn, bn, Ho, Wo, go, bo)
            e = (_tap(xe, i, j, geo, Ho, Wo).transpose(1, 0, 2, 3)[..., None]
                 + we[:, :, i, j].T[:, None, None, None, :])               # (gc,gn,Ho,Wo,go)
            s = (e_ref[None] - e)[:, :, None, :, :, :, None]
            acc += _shift_sum(p, s, G).sum(axis=0)
    bad = (bad_row[:, :, :, None] | wq.invalid.any(axis=(1, 2, 3))[None, None, None, :])
    scale = e_ref - G - fx - fw
    out = acc_to_fp32(acc, scale[:, None, :, :, :, None], bad[:, None, :, :, :, None])
    out = out.reshape(Np, Ho, Wo, Op)[:N, :, :, :O].transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out)
    if return_acc:
        e_full = np.broadcast_to(e_ref[:, None, :, :, :, None], acc.shape)
        return out, acc.reshape(Np, Ho, Wo, Op), e_full.reshape(Np, Ho, Wo, Op)
    return out


def _dx_index(n_in: int, n_out: int, k: int, s: int, p: int, d: int) -> np.ndarray:
    """For tap ``k`` and every input position ``h``, the output position ``(h + p - k*d)/s``
    that reads it, or ``n_out`` (an all-zero sentinel) where there is none."""
    h = np.arange(n_in) + p - k * d
    q = h // s
    ok = (h >= 0) & (h % s == 0) & (q < n_out)
    return np.where(ok, q, n_out)


def bfp_conv2d_input_grad(dyq: BFPTensor, wq: BFPTensor, input_size: tuple[int, int], *,
                          stride=1, padding=0, dilation=1,
                          geometry: ConvGeometry | None = None,
                          guard_bits: int = DEFAULT_GUARD_BITS, return_acc: bool = False):
    """Input gradient ``dX`` of :func:`bfp_conv2d` for an input of spatial size
    ``input_size = (H, W)``.

    ``dyq``: ``(N, O, H', W')`` blocked ``(Bn, Bo)``; ``wq``: ``(O, C, kh, kw)`` blocked
    ``(Bo, Bc)``. ``dX[n, c, h, w] = sum over taps (i, j) and o of dY[n, o, p, q] W[o, c, i,
    j]`` where ``h = p*stride + i*dilation - padding`` (taps with no such ``p`` read an
    all-zero block). Reference exponent of output block ``(n-block, c-block, h, w)``: the
    largest exponent of the dY blocks it reads (all taps and output-channel blocks) plus
    the largest exponent of W's blocks of that input-channel block (all taps and
    output-channel blocks). Returns float32 ``(N, C, H, W)``.
    """
    geo = _geometry(geometry, stride, padding, dilation)
    if dyq.ndim != 4 or wq.ndim != 4:
        raise ValueError(f"bfp_conv2d_input_grad needs 4-D operands, got shapes {dyq.shape} "
                         f"and {wq.shape}")
    bn, bo = conv_operand_blocks(dyq, "dy")
    bo_w, bc = conv_operand_blocks(wq, "w")
    N, O, Ho, Wo = dyq.shape
    Ow, C, KH, KW = wq.shape
    H, W = (int(v) for v in input_size)
    if O != Ow:
        raise ValueError(f"output channels differ: dy is {dyq.shape}, w is {wq.shape}")
    if bo != bo_w:
        raise ValueError(f"dy's channel block ({bo}) differs from w's output-channel block "
                         f"({bo_w}); dX reduces over output channels")
    if geo.output_size((H, W), (KH, KW)) != (Ho, Wo):
        raise ValueError(f"dy's spatial size {(Ho, Wo)} is not the output size "
                         f"{geo.output_size((H, W), (KH, KW))} of an input {(H, W)}")
    fg, fw, G = dyq.fmt.frac_bits, wq.fmt.frac_bits, guard_bits
    Np, Op = dyq.layout.padded[:2]
    Cp = wq.layout.padded[1]
    gn, go, gc = Np // bn, Op // bo, Cp // bc
    _check_width(dyq.fmt.man_bits, wq.fmt.man_bits, bo, Op * KH * KW, G,
                 "bfp_conv2d_input_grad")
    # one all-zero sentinel row and column (exponent emin) for "no output position"
    pad = [(0, 0), (0, 0), (0, 1), (0, 1)]
    gm = np.pad(dyq.mantissas, pad).astype(np.float64)
    ge = np.pad(dyq.exponents.astype(np.int64), pad, constant_values=dyq.fmt.emin)
    ge_v = np.pad(_exps(dyq), pad, constant_values=dyq.fmt.emin)
    ginv = np.pad(dyq.invalid, pad)
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    rows = [_dx_index(H, Ho, i, sh, ph, dh) for i in range(KH)]
    cols = [_dx_index(W, Wo, j, sw, pw, dw) for j in range(KW)]

    def gather(a, i, j):
        return a[:, :, rows[i]][:, :, :, cols[j]]

    we = wq.exponents.astype(np.int64)                                  # (go, gc, KH, KW)
    col = _exps(wq).max(axis=(0, 2, 3))                                 # (gc,)
    row = np.full((gn, H, W), _LO, np.int64)
    bad_row = np.zeros((gn, H, W), bool)
    for i in range(KH):
        for j in range(KW):
            row = np.maximum(row, gather(ge_v, i, j).max(axis=1))
            bad_row |= gather(ginv, i, j).any(axis=1)
    e_ref = row[:, :, :, None] + col[None, None, None, :]               # (gn, H, W, gc)
    wm = wq.mantissas.astype(np.float64)
    acc = np.zeros((gn, bn, H, W, gc, bc), np.int64)
    for i in range(KH):
        for j in range(KW):
            gt = gather(gm, i, j).reshape(gn, bn, go, bo, H, W)
            a = gt.transpose(2, 0, 1, 4, 5, 3).reshape(go, Np * H * W, bo)
            b = wm[:, :, i, j].reshape(go, bo, Cp)                         # (go, bo, Cp)
            p = _matmul(a, b).astype(np.int64).reshape(go, gn, bn, H, W, gc, bc)
            e = (gather(ge, i, j).transpose(1, 0, 2, 3)[..., None]
                 + we[:, :, i, j][:, None, None, None, :])                # (go,gn,H,W,gc)
            s = (e_ref[None] - e)[:, :, None, :, :, :, None]
            acc += _shift_sum(p, s, G).sum(axis=0)
    bad = bad_row[:, :, :, None] | wq.invalid.any(axis=(0, 2, 3))[None, None, None, :]
    scale = e_ref - G - fg - fw
    out = acc_to_fp32(acc, scale[:, None, :, :, :, None], bad[:, None, :, :, :, None])
    out = out.reshape(Np, H, W, Cp)[:N, :, :, :C].transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out)
    if return_acc:
        e_full = np.broadcast_to(e_ref[:, None, :, :, :, None], acc.shape)
        return out, acc.reshape(Np, H, W, Cp), e_full.reshape(Np, H, W, Cp)
    return out


def bfp_conv2d_weight_grad(dyq: BFPTensor, xq: BFPTensor, kernel_size: tuple[int, int], *,
                           stride=1, padding=0, dilation=1,
                           geometry: ConvGeometry | None = None,
                           guard_bits: int = DEFAULT_GUARD_BITS, return_acc: bool = False):
    """Weight gradient ``dW`` of :func:`bfp_conv2d` for a kernel ``(kh, kw)``.

    ``dyq``: ``(N, O, H', W')`` blocked ``(Bn, Bo)``; ``xq``: ``(N, C, H, W)`` blocked
    ``(Bn, Bc)`` (the tensor the forward pass used). ``dW[o, c, i, j] = sum over n, p, q
    of dY[n, o, p, q] X[n, c, h, w]`` at the position tap ``(i, j)`` reads; the K-blocks
    are ``(sample block, p, q)``. Reference exponent of output block ``(o-block, c-block,
    i, j)``: the largest exponent of dY's blocks of that output-channel block (all
    samples and positions) plus the largest exponent of the X blocks tap ``(i, j)`` reads
    in that channel block (padding counts as ``emin``). Returns float32 ``(O, C, kh,
    kw)``.
    """
    geo = _geometry(geometry, stride, padding, dilation)
    if dyq.ndim != 4 or xq.ndim != 4:
        raise ValueError(f"bfp_conv2d_weight_grad needs 4-D operands, got shapes {dyq.shape} "
                         f"and {xq.shape}")
    bn, bo = conv_operand_blocks(dyq, "dy")
    bn_x, bc = conv_operand_blocks(xq, "x")
    N, O, Ho, Wo = dyq.shape
    Nx, C, H, W = xq.shape
    KH, KW = (int(v) for v in kernel_size)
    if N != Nx:
        raise ValueError(f"batch sizes differ: dy is {dyq.shape}, x is {xq.shape}")
    if bn != bn_x:
        raise ValueError(f"dy's sample block ({bn}) differs from x's ({bn_x}); dW reduces "
                         f"over samples")
    if geo.output_size((H, W), (KH, KW)) != (Ho, Wo):
        raise ValueError(f"dy's spatial size {(Ho, Wo)} is not the output size "
                         f"{geo.output_size((H, W), (KH, KW))} of an input {(H, W)}")
    fg, fx, G = dyq.fmt.frac_bits, xq.fmt.frac_bits, guard_bits
    Np, Op = dyq.layout.padded[:2]
    Cp = xq.layout.padded[1]
    gn, go, gc = Np // bn, Op // bo, Cp // bc
    nk = gn * Ho * Wo
    _check_width(dyq.fmt.man_bits, xq.fmt.man_bits, bn, Np * Ho * Wo, G,
                 "bfp_conv2d_weight_grad")
    ph, pw = geo.padding
    xm = _pad_hw(xq.mantissas, ph, pw, 0).astype(np.float64)
    xe = _pad_hw(xq.exponents.astype(np.int64), ph, pw, xq.fmt.emin)
    xe_v = _pad_hw(_exps(xq), ph, pw, xq.fmt.emin)
    xinv = _pad_hw(xq.invalid, ph, pw, False)
    ge = dyq.exponents.astype(np.int64)                                 # (gn, go, Ho, Wo)
    row = _exps(dyq).max(axis=(0, 2, 3))                                # (go,)
    bad_row = dyq.invalid.any(axis=(0, 2, 3))
    # K-blocks (n-block, p, q): dY as (nk, Op, bn), exponents (nk, go)
    a = dyq.mantissas.astype(np.float64).reshape(gn, bn, Op, Ho, Wo)
    a = a.transpose(0, 3, 4, 2, 1).reshape(nk, Op, bn)
    ga = ge.transpose(0, 2, 3, 1).reshape(nk, go)
    out = np.empty((Op, Cp, KH, KW), np.float32)
    accs, erefs = [], []
    for i in range(KH):
        for j in range(KW):
            col = _tap(xe_v, i, j, geo, Ho, Wo).max(axis=(0, 2, 3))          # (gc,)
            bad_col = _tap(xinv, i, j, geo, Ho, Wo).any(axis=(0, 2, 3))
            e_ref = row[:, None] + col[None, :]                               # (go, gc)
            xt = _tap(xm, i, j, geo, Ho, Wo).reshape(gn, bn, Cp, Ho, Wo)
            b = xt.transpose(0, 3, 4, 1, 2).reshape(nk, bn, Cp)
            p = _matmul(a, b).astype(np.int64).reshape(nk, go, bo, gc, bc)
            gx = _tap(xe, i, j, geo, Ho, Wo).transpose(0, 2, 3, 1).reshape(nk, gc)
            e = ga[:, :, None] + gx[:, None, :]                               # (nk, go, gc)
            s = (e_ref[None] - e)[:, :, None, :, None]
            acc = _shift_sum(p, s, G).sum(axis=0)                             # (go,bo,gc,bc)
            bad = bad_row[:, None] | bad_col[None, :]
            scale = (e_ref - G - fg - fx)[:, None, :, None]
            out[:, :, i, j] = acc_to_fp32(acc, scale, bad[:, None, :, None]).reshape(Op, Cp)
            accs.append(acc.reshape(Op, Cp))
            erefs.append(np.broadcast_to(e_ref[:, None, :, None], acc.shape).reshape(Op, Cp))
    res = np.ascontiguousarray(out[:O, :C])
    if return_acc:
        shape = (KH, KW, Op, Cp)
        acc_all = np.stack(accs).reshape(shape).transpose(2, 3, 0, 1)
        e_all = np.stack(erefs).reshape(shape).transpose(2, 3, 0, 1)
        return res, acc_all, e_all
    return res


# -- float64 references and error bounds -----------------------------------------------

def _dq64(t: BFPTensor) -> np.ndarray:
    return t.dequantize().astype(np.float64)


def conv2d_reference(xq: BFPTensor, wq: BFPTensor, *, stride=1, padding=0, dilation=1,
                     geometry: ConvGeometry | None = None) -> np.ndarray:
    """float64 convolution of the dequantized operands (the exact value up to float64
    rounding), ``(N, O, H', W')``."""
    geo = _geometry(geometry, stride, padding, dilation)
    x, w = _dq64(xq), _dq64(wq)
    O, _, KH, KW = w.shape
    Ho, Wo = geo.output_size(x.shape[2:], (KH, KW))
    xp = _pad_hw(x, *geo.padding, 0.0)
    out = np.zeros((x.shape[0], O, Ho, Wo))
    for i in range(KH):
        for j in range(KW):
            out += np.einsum("nchw,oc->nohw", _tap(xp, i, j, geo, Ho, Wo), w[:, :, i, j])
    return out


def conv2d_input_grad_reference(dyq: BFPTensor, wq: BFPTensor, input_size, *, stride=1,
                                padding=0, dilation=1,
                                geometry: ConvGeometry | None = None) -> np.ndarray:
    """float64 input gradient of the dequantized operands, ``(N, C, H, W)``."""
    geo = _geometry(geometry, stride, padding, dilation)
    dy, w = _dq64(dyq), _dq64(wq)
    _, C, KH, KW = w.shape
    H, W = input_size
    Ho, Wo = dy.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    dxp = np.zeros((dy.shape[0], C, H + 2 * ph, W + 2 * pw))
    for i in range(KH):
        for j in range(KW):
            dxp[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh,
                j * dw: j * dw + sw * (Wo - 1) + 1: sw] += np.einsum(
                    "nohw,oc->nchw", dy, w[:, :, i, j])
    return dxp[:, :, ph: ph + H, pw: pw + W]


def conv2d_weight_grad_reference(dyq: BFPTensor, xq: BFPTensor, kernel_size, *, stride=1,
                                 padding=0, dilation=1,
                                 geometry: ConvGeometry | None = None) -> np.ndarray:
    """float64 weight gradient of the dequantized operands, ``(O, C, kh, kw)``."""
    geo = _geometry(geometry, stride, padding, dilation)
    dy, x = _dq64(dyq), _dq64(xq)
    KH, KW = kernel_size
    Ho, Wo = dy.shape[2:]
    xp = _pad_hw(x, *geo.padding, 0.0)
    out = np.zeros((dy.shape[1], x.shape[1], KH, KW))
    for i in range(KH):
        for j in range(KW):
            out[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, _tap(xp, i, j, geo, Ho, Wo))
    return out


def _bound(e_ref: np.ndarray, nkb: int, G: int, fa: int, fb: int, ref: np.ndarray
           ) -> np.ndarray:
    lsb = np.ldexp(1.0, np.clip(e_ref - G - fa - fb, -1100, 1100).astype(np.int32))
    return nkb * lsb + np.abs(ref) * 2.0**-24 + 2.0**-126 + math.ulp(0.0)


def conv2d_error_bound(xq: BFPTensor, wq: BFPTensor, *, stride=1, padding=0, dilation=1,
                       geometry: ConvGeometry | None = None,
                       guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """Per-output bound on ``|bfp_conv2d - conv2d_reference|``:
    ``nkb * 2**(e_ref - G - fx - fw) + 2**-24 |y| + 2**-126`` with ``nkb = Cp/Bc * kh * kw``
    K-blocks per output."""
    geo = _geometry(geometry, stride, padding, dilation)
    _, _, e = bfp_conv2d(xq, wq, geometry=geo, guard_bits=guard_bits, return_acc=True)
    N, O = xq.shape[0], wq.shape[0]
    e = e[:N, :, :, :O].transpose(0, 3, 1, 2)
    nkb = xq.layout.grid[1] * wq.shape[2] * wq.shape[3]
    return _bound(e, nkb, guard_bits, xq.fmt.frac_bits, wq.fmt.frac_bits,
                  conv2d_reference(xq, wq, geometry=geo))


def conv2d_input_grad_error_bound(dyq: BFPTensor, wq: BFPTensor, input_size, *, stride=1,
                                  padding=0, dilation=1,
                                  geometry: ConvGeometry | None = None,
                                  guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """Per-output bound on ``|bfp_conv2d_input_grad - conv2d_input_grad_reference|``, with
    ``nkb = Op/Bo * kh * kw``."""
    geo = _geometry(geometry, stride, padding, dilation)
    _, _, e = bfp_conv2d_input_grad(dyq, wq, input_size, geometry=geo,
                                    guard_bits=guard_bits, return_acc=True)
    N, C = dyq.shape[0], wq.shape[1]
    e = e[:N, :, :, :C].transpose(0, 3, 1, 2)
    nkb = dyq.layout.grid[1] * wq.shape[2] * wq.shape[3]
    return _bound(e, nkb, guard_bits, dyq.fmt.frac_bits, wq.fmt.frac_bits,
                  conv2d_input_grad_reference(dyq, wq, input_size, geometry=geo))


def conv2d_weight_grad_error_bound(dyq: BFPTensor, xq: BFPTensor, kernel_size, *, stride=1,
                                   padding=0, dilation=1,
                                   geometry: ConvGeometry | None = None,
                                   guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """Per-output bound on ``|bfp_conv2d_weight_grad - conv2d_weight_grad_reference|``,
    with ``nkb = Np/Bn * H' * W'``."""
    geo = _geometry(geometry, stride, padding, dilation)
    _, _, e = bfp_conv2d_weight_grad(dyq, xq, kernel_size, geometry=geo,
                                     guard_bits=guard_bits, return_acc=True)
    O, C = dyq.shape[1], xq.shape[1]
    nkb = dyq.layout.grid[0] * dyq.shape[2] * dyq.shape[3]
    return _bound(e[:O, :C], nkb, guard_bits, dyq.fmt.frac_bits, xq.fmt.frac_bits,
                  conv2d_weight_grad_reference(dyq, xq, kernel_size, geometry=geo))
