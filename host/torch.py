"""PyTorch layers whose GEMMs run in block floating point (HyperBlock training).

:class:`BFPLinear` and :class:`BFPConv2d` replace :class:`torch.nn.Linear` and
:class:`torch.nn.Conv2d`; :func:`convert` swaps them into an existing model. Each layer
is the GEMM ``Y = X Wᵀ`` (a convolution through im2col: ``X`` is
``(batch·positions) × (in·kh·kw)``) with a custom autograd function:

* forward quantizes ``X`` (activation format) and ``W`` (weight format) and computes
  ``Y = bfp_matmul(Xq, Wqᵀ)``;
* backward quantizes ``dY`` (gradient format) and computes ``dX = bfp_matmul(dYq, Wq)``
  and ``dW = bfp_matmul(dYqᵀ, Xq)``.

With HyperBlock formats (2-D tiles over both axes of the 2-D operand, ``docs/numerics.md``)
``X``, ``W`` and ``dY`` are each quantized **once** per step and the quantized tensor is
reused, transposed without re-quantization, by both GEMMs it enters: 3 quantizer calls
per layer per step. Formats blocked along one axis only (MXINT8, blocks of 32 along the
reduction axis) cannot be transposed that way, so the layer re-quantizes every operand
along each GEMM's reduction axis, as microscaling does: 6 calls per layer per step.
:attr:`BFPLayerMixin.quant_calls` counts them.

Convolutions with HyperBlock formats run by default as HyperBlock convolutions
(``conv_mode="hyperblock"``, ``docs/conv.md``): ``X[N, C, H, W]``, ``W`` and ``dY`` are
quantized once each with one exponent per (samples x channels) block at every spatial
position, and forward, dX and dW are the implicit-GEMM convolutions of
:mod:`hbfp_hw.conv` on those three tensors (:func:`fast_bfp_conv2d` and its two
gradients, bit-identical in PyTorch). With the compiled kernels the emulate backend
quantizes through :func:`torch_kernels.conv_quantize_4d` and, where
:func:`torch_kernels.conv_check` proves it exact, runs the three convolutions as
PyTorch float32 (or float64) convolutions of the operands scaled by powers of two,
rounded once to FP32 (``_conv_forward`` / ``_conv_backward``; :data:`conv_paths`
counts the paths taken). ``conv_mode="im2col_tiles"`` keeps the im2col GEMM
above; it is also what runs on a backend without convolutions (:class:`DeviceBackend`).

Per-tensor uniform int8 quantizers from :mod:`hbfp_hw.host.ranges` (dynamic or
in-hindsight ranges) can be used as the activation and gradient "formats" too; their
GEMMs run in FP32 on the dequantized integers (the accelerator has no int8 mode).

Bias, activations, normalisation and the optimizer stay FP32. Weights keep an FP32
master copy unless ``shadow_fmt`` is given: then :func:`round_weights` (call it after
``optimizer.step()``) stores the weights rounded to that wide BFP format, HBFP's
"shadow" copy.

Backends: :class:`EmulateBackend` runs the golden model's arithmetic in PyTorch
(:func:`hbfp_hw.host.torch_quant.torch_quantize` and :func:`fast_bfp_matmul`, which the
tests prove bit-identical to :func:`hbfp_hw.quantize.quantize` and
:func:`hbfp_hw.gemm.bfp_matmul`); :class:`DeviceBackend` routes every quantization and
GEMM through a ``hbfp_hw.host`` device (``Device.quantize`` / ``Device.matmul_q``).
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections import Counter
from functools import lru_cache
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hbfp_hw.conv import (ConvGeometry, bfp_conv2d, bfp_conv2d_input_grad,
                          bfp_conv2d_weight_grad, conv_format, conv_operand_blocks)
from hbfp_hw.formats import HBFP8, BFPFormat
from hbfp_hw.gemm import DEFAULT_GUARD_BITS, accumulator_bits, k_block_length
from hbfp_hw.quantize import BFPTensor, NonFiniteBlockError, block_layout, quantize

from . import torch_kernels as _kernels
from .ranges import StaticExpQuantizer, UniformQuantizer
from .torch_fake import ROLE_IDS, FakeConv, FakeGemm, fake_quantize, is_scheme_format
from .torch_quant import supports, torch_quantize

__all__ = [
    "Backend",
    "EmulateBackend",
    "DeviceBackend",
    "get_backend",
    "fast_bfp_matmul",
    "fast_bfp_conv2d",
    "fast_bfp_conv2d_input_grad",
    "fast_bfp_conv2d_weight_grad",
    "conv_quantize",
    "CONV_MODES",
    "BFPLinear",
    "BFPConv2d",
    "convert", "ConversionReport", "input_dither_default", "INPUT_DITHER_MAN_BITS",
    "round_weights",
    "bfp_layers",
    "is_hyperblock",
]

Quantizer = Union[BFPFormat, UniformQuantizer, StaticExpQuantizer]


# -- the exact GEMM in PyTorch ---------------------------------------------------------

def fast_bfp_matmul(a: BFPTensor, b: BFPTensor, *,
                    guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """:func:`hbfp_hw.gemm.bfp_matmul`, bit for bit, computed with PyTorch.

    Without truncation (no live block pair shifted past the guard bits) the result is
    one GEMM of pre-shifted mantissas, in float32 when :func:`_shortcut_f32` proves it
    exact, else in float64. Otherwise (truncating path) every step is exact: the
    per-K-block products ``P`` are integers below ``2**53`` (the accumulator width check
    guarantees it; float32 when below ``2**24``), ``P * 2**(G - s)`` is a power-of-two
    scaling (applied to the operands, as ``s = sa + sb`` is separable), ``floor`` of it
    equals the arithmetic shift ``(P << G) >> s``, and the running float64 sum stays an
    integer below ``2**53``. Nothing is materialised at element resolution except the
    products themselves.
    """
    lay_a, lay_b = _layout(a), _layout(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or (
            lay_a.block[1] != lay_b.block[0]):
        k_block_length(a, b)        # raises the golden model's message
    L = lay_a.block[1]
    fa, fb = a.fmt.frac_bits, b.fmt.frac_bits
    width = _acc_bits(a.fmt.man_bits, b.fmt.man_bits, L, max(a.shape[1], 1), guard_bits)
    if width > 53:
        raise ValueError(f"accumulator of {width} bits exceeds the exact float64 path")
    if _kernels.ENABLED:
        out = _kernel_matmul(a, b, lay_a, lay_b, guard_bits)
        if out is not None:
            return out
    Mp, Kp = lay_a.padded
    Np = lay_b.padded[1]
    nkb = Kp // L
    bm, bn = lay_a.block[0], lay_b.block[1]
    gm, gn = Mp // bm, Np // bn
    # grid-level work (one value per block) in NumPy: cheaper per call on small grids
    lo = -(1 << 14)
    ea = np.where(a.invalid, lo, a.exponents.astype(np.int64))                 # (gm, nkb)
    eb = np.where(b.invalid, lo, b.exponents.astype(np.int64))                 # (nkb, gn)
    ea_row = ea.max(axis=1) if nkb else np.full(gm, lo)                       # (gm,)
    eb_col = eb.max(axis=0) if nkb else np.full(gn, lo)                       # (gn,)
    e_ref = ea_row[:, None] + eb_col[None, :]                                   # (gm, gn)
    # shift of block pair (i, kb, j): s = e_ref - e = (ea_row[i] - ea[i, kb])
    #                                              + (eb_col[j] - eb[kb, j]) = sa + sb
    sa_i = ea_row[:, None] - ea                                                 # (gm, nkb)
    sb_i = eb_col[None, :] - eb                                                 # (nkb, gn)

    # Exact shortcut: if no pair of non-zero blocks is shifted by more than G bits, no
    # truncation happens and acc = 2**G * (A' @ B') with A' = ma * 2**-sa,
    # B' = mb * 2**-sb. Every product and partial sum is a multiple of 2**-G below
    # 2**(53-G): one float64 GEMM is exact in any order. Both the shift and the
    # "both blocks non-zero" condition are separable, so the test is per K-block:
    # max over live rows of sa + max over live columns of sb <= G.
    nz_a = _nonzero_blocks(a, ea, (gm, bm, nkb, L))                             # (gm, nkb)
    nz_b = _nonzero_blocks(b, eb, (nkb, L, gn, bn))                             # (nkb, gn)
    neg = -(1 << 20)
    if nkb and gm and gn:
        worst = (np.where(nz_a, sa_i, neg).max(axis=0)
                 + np.where(nz_b, sb_i, neg).max(axis=1))                       # (nkb,)
        wmax = int(worst.max())
    else:
        wmax = -1
    if wmax <= guard_bits:
        sa = np.where(nz_a, sa_i, 0)
        sb = np.where(nz_b, sb_i, 0)
        if Mp * Kp * Np >= _F32_GEMM_MIN:
            out = _shortcut_f32(a, b, sa, sb, nz_a, nz_b, max(wmax, 0),
                                e_ref - fa - fb, (gm, bm, nkb, L, gn, bn))
            if out is not None:
                return out
        ap = (torch.from_numpy(a.mantissas).to(torch.float64).view(gm, bm, nkb, L)
              * torch.from_numpy(np.ldexp(1.0, -sa))[:, None, :, None]).reshape(Mp, Kp)
        bp = (torch.from_numpy(b.mantissas).to(torch.float64).view(nkb, L, gn, bn)
              * torch.from_numpy(np.ldexp(1.0, -sb))[:, None, :, None]).reshape(Kp, Np)
        acc = (ap @ bp).view(gm, bm, gn, bn)
        return _to_fp32(acc, e_ref - fa - fb, a, b, Mp, Np, bm, bn)

    sa_i, sb_i = torch.from_numpy(sa_i), torch.from_numpy(sb_i)
    # Truncating path: per K-block P = ma_kb @ mb_kb, then floor(P * 2**(G - s)) with
    # s = sa + sb (sa, sb >= 0). The scaling is separable, so it is applied to the
    # operands before the products: (ma * 2**(G - sa)) @ (mb * 2**-sb) = P * 2**(G - s)
    # exactly (one power of two per output and K-block). Block products in float32 when
    # they are exact there (|P| <= L*mmax_a*mmax_b < 2**24, e.g. 8-bit mantissas and
    # L <= 1040), else float64; the sum over K-blocks is done in float64. sa and sb are
    # clamped to c, with 2**(G - c) * max|P| < 1: a pair with a clamped shift has both
    # s and the clamped s' >= c, where floor gives 0 (P >= 0) or -1 (P < 0) either way,
    # and the factors stay in the normal range.
    pmax = L * a.fmt.mmax * b.fmt.mmax
    dt = torch.float32 if pmax < 2**24 else torch.float64
    c = pmax.bit_length() + guard_bits + 1
    exact = bool((sa_i.max(dim=0).values + sb_i.max(dim=1).values <= guard_bits).all())
    one = torch.ones((), dtype=dt)
    fa_ = torch.ldexp(one, (guard_bits - sa_i.clamp(max=c)).to(dt))            # (gm, nkb)
    fb_ = torch.ldexp(one, (-sb_i.clamp(max=c)).to(dt))                        # (nkb, gn)
    am = (torch.from_numpy(a.mantissas).to(dt).view(gm, bm, nkb, L)
          * fa_[:, None, :, None]).reshape(Mp, nkb, L).transpose(0, 1)
    bmn = (torch.from_numpy(b.mantissas).to(dt).view(nkb, L, gn, bn)
           * fb_[:, None, :, None]).reshape(nkb, L, Np)
    p = torch.bmm(am, bmn).view(nkb, gm, bm, gn, bn)
    if not exact:
        p.floor_()
    # sum over K-blocks in float64 (a loop over contiguous slices is the fastest on CPU)
    acc = p[0].to(torch.float64)                                                # (gm,bm,gn,bn)
    for k in range(1, nkb):
        acc += p[k]
    return _to_fp32(acc, e_ref - guard_bits - fa - fb, a, b, Mp, Np, bm, bn)


#: GEMMs computed by the compiled path, per kind: "f32" / "f64" (the K-blocks without
#: truncation as one GEMM of pre-shifted mantissas, float32 when provably exact),
#: "chunks" (that GEMM as float32 GEMMs over K-chunks each provably exact),
#: "blocks" (some K-blocks truncate: formed one by one, floored)
kernel_paths: Counter[str] = Counter()


def _kernel_matmul(a: BFPTensor, b: BFPTensor, lay_a, lay_b, guard_bits: int):
    """:func:`fast_bfp_matmul` with the per-call work in compiled kernels
    (:mod:`hbfp_hw.host.torch_kernels`), the GEMMs PyTorch ``mm`` / ``bmm``. The
    K-blocks in which no pair of non-zero blocks is shifted past the guard bits ("safe")
    are summed exactly in one GEMM of pre-shifted mantissas (the shortcut below, applied
    per K-block); the others are formed one by one with the shift folded into the
    operands and floored (the truncating path below). ``None`` for operands with
    invalid blocks (the PyTorch path handles them)."""
    prep = _kernels.matmul_prepare(a, b, lay_a, lay_b, guard_bits, _F32_GEMM_MIN,
                                   _F32_MAX_CHUNKS)
    if prep is None:
        return None
    status, er, ec, A, B, U, V, ch = prep
    acc = _safe_gemm(status, torch.from_numpy(A), torch.from_numpy(B), ch) if A.size \
        else _EMPTY_ACC
    if U.shape[0]:
        p = torch.bmm(torch.from_numpy(U), torch.from_numpy(V)).numpy()
        kernel_paths["blocks"] += 1
    else:
        p = _EMPTY_P
    return _kernels.matmul_finish(acc, p, er, ec, guard_bits, -a.fmt.frac_bits - b.fmt.frac_bits,
                                  a.shape[0], b.shape[1], lay_a.block[0], lay_b.block[1])


def _safe_gemm(status: int, At: torch.Tensor, Bt: torch.Tensor, ch: np.ndarray) -> np.ndarray:
    """The GEMM of the safe K-blocks' pre-shifted operands as the prepare kernel's
    ``status`` says: ``(1, M, N)`` float32 (exact), ``(1, M, N)`` float64 (bit 0: the
    float32 bound failed), or ``(nc, M, N)`` float32, one exact ``mm`` per K-chunk
    ``ch[c]:ch[c+1]`` (``nc = status >> 1``; summed exactly in float64 by
    :func:`torch_kernels.matmul_finish`)."""
    if status & 1:
        kernel_paths["f64"] += 1
        return torch.mm(At.to(torch.float64), Bt.to(torch.float64)).numpy()[None]
    nc = status >> 1
    if nc < 2:
        kernel_paths["f32"] += 1
        return torch.mm(At, Bt).numpy()[None]
    kernel_paths["chunks"] += 1
    out = torch.empty((nc, At.shape[0], Bt.shape[1]), dtype=torch.float32)
    for c in range(nc):
        k0, k1 = int(ch[c]), int(ch[c + 1])
        torch.mm(At[:, k0:k1], Bt[k0:k1], out=out[c])
    return out.numpy()


_EMPTY_ACC = np.zeros((0, 0, 0), np.float32)
_EMPTY_P = np.zeros((0, 0, 0), np.float32)


_layouts: dict = {}


def _layout(t: BFPTensor):
    """``t.layout``, cached per (shape, blocking) (``BFPTensor.layout`` recomputes it)."""
    f = t.fmt
    key = (t.shape, f.block_axes, f.block_shape)
    lay = _layouts.get(key)
    if lay is None:
        if len(_layouts) > 4096:
            _layouts.clear()
        lay = _layouts[key] = block_layout(t.shape, f)
    return lay


_acc_bits = lru_cache(maxsize=1024)(accumulator_bits)


@lru_cache(maxsize=256)
def _transposed_fmt(fmt: BFPFormat, axes: tuple) -> BFPFormat:
    pairs = sorted((1 - a, b) for a, b in zip(axes, fmt.block_shape))
    return fmt.replace(block_axes=tuple(a for a, _ in pairs),
                       block_shape=tuple(b for _, b in pairs))


_tfmts: dict = {}


def transpose_q(q: BFPTensor, fmt: BFPFormat | None = None) -> BFPTensor:
    """``q.T`` (no re-quantization) with the transposed format cached (or given as
    ``fmt`` by a caller that has it); the same mantissas, exponents and flags as
    :attr:`BFPTensor.T`."""
    if q.ndim != 2:
        return q.T
    if fmt is None:
        f = q.fmt
        ent = _tfmts.get(id(f))             # per format object: cheaper than hashing it
        if ent is not None and ent[0] is f:
            fmt = ent[1]
        else:
            if f.rounding == "stochastic":      # one lru entry for all seeds
                fmt = _with_seed(_transposed_fmt(_with_seed(f, 0), _layout(q).axes), f.seed)
            else:
                fmt = _transposed_fmt(f, _layout(q).axes)
            if len(_tfmts) > 1024:
                _tfmts.clear()
            _tfmts[id(f)] = (f, fmt)        # the reference keeps the id valid
    return BFPTensor(fmt, q.shape[::-1], q.mantissas.T.copy(), q.exponents.T.copy(),
                     q.invalid.T.copy())


def _with_seed(fmt: BFPFormat, seed: int) -> BFPFormat:
    """``fmt.replace(seed=seed)`` without re-running the validation (a valid format with
    a valid 32-bit seed stays valid)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} is out of range; accepted range is [0, 2**32-1]")
    new = object.__new__(type(fmt))         # copy.copy, several times cheaper
    new.__dict__.update(fmt.__dict__)
    object.__setattr__(new, "seed", seed)
    return new


#: GEMMs at least this large (M*K*N) try the float32 exact path of the shortcut (all:
#: it also needs fewer operations than the float64 one; the tests raise it to reach
#: the float64 path)
_F32_GEMM_MIN = 0

#: compiled path: when the float32 exactness bound fails on the whole K, K may be cut
#: into at most this many chunks (on K-block boundaries) that each pass it; each chunk
#: is one float32 ``mm``, the results are added exactly in float64
#: (:func:`torch_kernels._chunks`). More chunks needed (or one K-block failing alone):
#: one float64 GEMM. 1 disables the chunks (the tests use it to reach float64).
_F32_MAX_CHUNKS = 16


def _pow2_f32(k: np.ndarray) -> np.ndarray:
    """Exact float32 ``2**k`` for integer ``k`` in [-126, 127] (built from the bits)."""
    return ((np.asarray(k).astype(np.int32) + 127) << 23).view(np.float32)


def _shortcut_f32(a, b, sa, sb, nz_a, nz_b, w, scale_exp, dims):
    """The no-truncation shortcut as one float32 GEMM, when that is provably exact.

    ``A' = ma * 2**-sa`` and ``B' = mb * 2**-sb`` are exact in float32. Every product
    of two non-zero blocks is an integer multiple of ``2**-w`` (``w`` = the largest
    ``sa + sb`` of a live block pair), so every partial sum of any summation order is
    such a multiple, bounded by ``S = max_ij sum_k |a'_ik b'_kj|``; if
    ``S <= 2**(24 - w)`` all of them are exact in float32 and the float32 GEMM equals
    the float64 one. ``S`` is bounded by ``max_i ||a'_i||_1 * max|b'|`` and by
    ``max|a'| * max_j ||b'_j||_1``. The FP32 conversion ``acc * 2**scale`` is then an
    exact float32 multiply if no live tile's result can leave float32's normal range;
    otherwise it runs in float64 as the golden model does. Returns None (use float64)
    when the bound does not hold."""
    gm, bm, nkb, L, gn, bn = dims
    Mp, Kp, Np = gm * bm, nkb * L, gn * bn
    ap = (torch.from_numpy(a.mantissas).view(gm, bm, nkb, L).to(torch.float32)
          * torch.from_numpy(_pow2_f32(-sa))[:, None, :, None]).view(Mp, Kp)
    bp = (torch.from_numpy(b.mantissas).view(nkb, L, gn, bn).to(torch.float32)
          * torch.from_numpy(_pow2_f32(-sb))[:, None, :, None]).view(Kp, Np)
    # the format-only bound first (free), then the data-dependent one
    bound = float(Kp * a.fmt.mmax * b.fmt.mmax)
    if bound > 2.0 ** (24 - w):
        if Kp > 1 << 20:
            return None
        # float32 sums of K non-negative terms are within a relative K * 2**-24 of the
        # exact ones; the factor (1 + K * 2**-22) makes the bound a safe upper bound
        aa, ba = ap.abs(), bp.abs()
        bound = min(float(aa.sum(dim=1).max()) * float(ba.max()),
                    float(aa.max()) * float(ba.sum(dim=0).max())) * (1.0 + Kp * 2.0**-22)
        if bound > 2.0 ** (24 - w):
            return None
    acc = (ap @ bp).view(gm, bm, gn, bn)
    live = nz_a.any(axis=1)[:, None] & nz_b.any(axis=0)[None, :]            # (gm, gn)
    k = np.where(live, scale_exp, w)
    if a.invalid.any() or b.invalid.any() or not (
            int(k.min()) - w >= -126 and int(k.max()) + 24 - w <= 127):
        return _to_fp32(acc.to(torch.float64), scale_exp, a, b, Mp, Np, bm, bn)
    # |acc| is 0 or in [2**-w, 2**(24-w)]: acc * 2**k is a normal float32 (or 0),
    # exact; + 0.0 turns a -0.0 into +0.0 as the integer accumulator would
    v = acc.mul_(torch.from_numpy(_pow2_f32(k))[:, None, :, None]).add_(0.0).view(Mp, Np)
    return v[: a.shape[0], : b.shape[1]].numpy()


def _nonzero_blocks(t: BFPTensor, e: np.ndarray, shape: tuple) -> np.ndarray:
    """Blocks holding a non-zero mantissa. With ``emin < -126`` (``exp_bits >= 8``) a
    block has ``E == emin`` exactly when it is all zero (FP32 normals have exponents
    >= -126, subnormals are flushed), so the exponents tell; otherwise look."""
    if t.fmt.emin < -126:
        return e > t.fmt.emin
    return (t.mantissas.reshape(shape) != 0).any(axis=(1, 3))


def _to_fp32(acc, scale_exp, a, b, Mp, Np, bm, bn) -> np.ndarray:
    """``acc * 2**scale_exp`` (per tile) to float32 as the golden model converts it."""
    # acc * 2**k is exact in float64 (|k| < 400), so a multiply by the tile's power of
    # two equals ldexp.
    scale = torch.from_numpy(np.ldexp(1.0, np.asarray(scale_exp)))
    v = (acc * scale[:, None, :, None]).reshape(Mp, Np)
    v.masked_fill_(v.abs() < 2.0**-126, 0.0)
    out = v.to(torch.float32)
    if a.invalid.any() or b.invalid.any():
        bad = (torch.from_numpy(np.repeat(a.invalid.any(axis=1), bm))[:, None]
               | torch.from_numpy(np.repeat(b.invalid.any(axis=0), bn))[None, :])
        out = torch.where(bad, torch.tensor(float("nan")), out)
    return out[: a.shape[0], : b.shape[1]].numpy()


# -- the HyperBlock convolution in PyTorch ----------------------------------------------

_LO = -(1 << 14)        # exponent of an invalid block in the row/column maxima


def _conv_dtype(L: int, fa: BFPFormat, fb: BFPFormat, guard_bits: int):
    """Block-product dtype, shift clamp and largest accumulator term of a convolution
    whose reduction blocks hold ``L`` elements: float32 when every block product is an
    integer below ``2**24``, else float64; shifts are clamped to ``c`` with
    ``2**(G - c) * max|P| < 1`` (a pair with a clamped shift floors to 0 or -1 either
    way, as the golden model's shift does); a term is at most ``max|P| * 2**G``."""
    pmax = L * fa.mmax * fb.mmax
    dt = torch.float32 if pmax < 2**24 else torch.float64
    return dt, pmax.bit_length() + guard_bits + 1, pmax << guard_bits


def _pow2(k: np.ndarray, dt) -> torch.Tensor:
    """Exact ``2**k`` (integer ``k`` inside the dtype's normal range) as a torch tensor."""
    return torch.from_numpy(np.ldexp(1.0, k.astype(np.int32))).to(dt)


def _np_taps(a: np.ndarray, geo, kh: int, kw: int, ho: int, wo: int) -> np.ndarray:
    """``(kh, kw, *lead, ho, wo)`` view of the positions each tap reads, from an array
    padded by ``geo.padding`` on its last two axes."""
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    st = a.strides
    return np.lib.stride_tricks.as_strided(
        a, (kh, kw) + a.shape[:-2] + (ho, wo),
        (st[-2] * dh, st[-1] * dw) + st[:-2] + (st[-2] * sh, st[-1] * sw), writeable=False)


def _torch_taps(t: torch.Tensor, geo, kh: int, kw: int, ho: int, wo: int) -> torch.Tensor:
    """:func:`_np_taps` for a contiguous torch tensor."""
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    st = t.stride()
    return t.as_strided((kh, kw) + tuple(t.shape[:-2]) + (ho, wo),
                        (st[-2] * dh, st[-1] * dw) + st[:-2] + (st[-2] * sh, st[-1] * sw))


def _pad_np(a: np.ndarray, ph: int, pw: int, value) -> np.ndarray:
    if ph == 0 and pw == 0:
        return a
    return np.pad(a, [(0, 0), (0, 0), (ph, ph), (pw, pw)], constant_values=value)


def _valid_exps(t: BFPTensor) -> np.ndarray:
    e = t.exponents.astype(np.int64)
    return np.where(t.invalid, _LO, e) if t.invalid.any() else e


def _product_sum(a: torch.Tensor, b: torch.Tensor, term_max: int) -> torch.Tensor:
    """Block products of pre-shifted operands, floored, summed over the leading (batch)
    axis. Every term is an integer of magnitude at most ``term_max``: runs of up to
    ``(2**24 - 1) // term_max`` terms are summed in float32 (every partial sum an integer
    below ``2**24``: exact), the run sums in float64 (integers below ``2**53``: exact in
    any order)."""
    p = torch.matmul(a, b)
    p.floor_()
    n = p.shape[0]
    m = (2**24 - 1) // term_max if p.dtype == torch.float32 else 0
    if m >= n:
        return p.sum(dim=0).to(torch.float64)
    if m >= 2:
        q = n // m
        acc = p[: q * m].view((q, m) + tuple(p.shape[1:])).sum(dim=1).to(torch.float64)
        acc = acc.sum(dim=0)
        if n > q * m:
            acc += p[q * m:].sum(dim=0)
        return acc
    if n <= 32:             # a loop over contiguous slices is the fastest on CPU
        acc = p[0].to(torch.float64)
        for k in range(1, n):
            acc += p[k]
        return acc
    return p.to(torch.float64).sum(dim=0)


def _conv_fp32(acc: torch.Tensor, scale_exp: np.ndarray, bad: np.ndarray) -> torch.Tensor:
    """``acc * 2**scale_exp`` to float32 as the golden model converts it (flush below
    ``2**-126``, nearest even, overflow to +-Inf), NaN where ``bad`` (broadcast)."""
    v = acc * torch.from_numpy(np.ldexp(1.0, np.clip(scale_exp, -1100, 1100).astype(np.int32)))
    v.masked_fill_(v.abs() < 2.0**-126, 0.0)
    out = v.to(torch.float32)
    if bad.any():
        out.masked_fill_(torch.from_numpy(np.broadcast_to(bad, out.shape).copy()), float("nan"))
    return out


def _conv_blocks(a: BFPTensor, b: BFPTensor, names: tuple, red: tuple):
    """Blocks of two conv operands, or None when the golden model must handle (and
    reject) them: ``red`` says which block axis of each operand is the reduction one."""
    try:
        ba = conv_operand_blocks(a, names[0])
        bb = conv_operand_blocks(b, names[1])
    except (TypeError, ValueError):
        return None
    if ba[red[0]] != bb[red[1]]:
        return None
    return ba, bb


def fast_bfp_conv2d(xq: BFPTensor, wq: BFPTensor, geometry: ConvGeometry, *,
                    guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """:func:`hbfp_hw.conv.bfp_conv2d`, bit for bit, computed with PyTorch.

    All taps at once: the positions each tap reads are a strided view of the padded
    mantissas; the shift ``s = (row max - Ex) + (column max - Ew)`` of every block pair is
    separable, so ``2**(G - sx)`` and ``2**-sw`` scale the operands (exact powers of two);
    one batched ``matmul`` over (tap, channel block) forms every block product
    ``P * 2**(G - s)`` exactly, ``floor`` gives the accumulator terms, a float64 sum
    over taps and channel blocks the accumulator (order independent, exact)."""
    geo = geometry
    G = guard_bits
    blocks = _conv_blocks(xq, wq, ("x", "w"), (1, 1))
    if blocks is None or xq.shape[1] != wq.shape[1]:
        return bfp_conv2d(xq, wq, geometry=geo, guard_bits=G)
    (bn, bc), (bo, _) = blocks
    N, C, H, W = xq.shape
    O, _, KH, KW = wq.shape
    Ho, Wo = geo.output_size((H, W), (KH, KW))
    Np, Cp = xq.mantissas.shape[:2]
    Op = wq.mantissas.shape[0]
    gn, gc, go = Np // bn, Cp // bc, Op // bo
    if _acc_bits(xq.fmt.man_bits, wq.fmt.man_bits, bc, Cp * KH * KW, G) > 53:
        return bfp_conv2d(xq, wq, geometry=geo, guard_bits=G)
    dt, c, tmax = _conv_dtype(bc, xq.fmt, wq.fmt, G)
    ph, pw = geo.padding
    emin = xq.fmt.emin
    # block grid (NumPy): reference exponents, shifts, invalid rows/columns
    xe = _pad_np(xq.exponents.astype(np.int64), ph, pw, emin)               # (gn,gc,Hp,Wp)
    xe_t = _np_taps(xe, geo, KH, KW, Ho, Wo)                               # (KH,KW,gn,gc,Ho,Wo)
    if xq.invalid.any():
        xv_t = _np_taps(_pad_np(_valid_exps(xq), ph, pw, emin), geo, KH, KW, Ho, Wo)
        bad_row = _np_taps(_pad_np(xq.invalid, ph, pw, False), geo, KH, KW, Ho, Wo
                           ).any(axis=(0, 1, 3))
    else:
        xv_t, bad_row = xe_t, np.zeros((gn, Ho, Wo), bool)
    row = xv_t.max(axis=(0, 1, 3))                                          # (gn, Ho, Wo)
    we = wq.exponents.astype(np.int64)                                     # (go,gc,KH,KW)
    col = _valid_exps(wq).max(axis=(1, 2, 3))                              # (go,)
    sx = np.clip(row[None, None, :, None] - xe_t, 0, c)
    sw = np.clip(col[:, None, None, None] - we, 0, c)
    # elements (torch): pre-shifted operands, one batched product over (tap, c-block)
    xm = torch.from_numpy(xq.mantissas).to(dt)
    if ph or pw:
        xm = F.pad(xm, (pw, pw, ph, ph))
    ce = C if gc == 1 else bc               # one channel block: its padding left out
    xt = _torch_taps(xm.view(gn, bn, gc, bc, H + 2 * ph, W + 2 * pw), geo, KH, KW, Ho, Wo)
    a = torch.empty((KH, KW, gc, gn, Ho, Wo, bn, ce), dtype=dt)
    torch.mul(xt[:, :, :, :, :, :ce].permute(0, 1, 4, 2, 6, 7, 3, 5),
              _pow2(G - sx, dt).permute(0, 1, 3, 2, 4, 5)[..., None, None], out=a)
    b = (torch.from_numpy(wq.mantissas).to(dt).view(go, bo, gc, bc, KH, KW)[:, :, :, :ce]
         * _pow2(-sw, dt)[:, None, :, None]).permute(4, 5, 2, 3, 0, 1)
    acc = _product_sum(a.view(KH * KW * gc, gn * Ho * Wo * bn, ce),
                       b.reshape(KH * KW * gc, ce, Op), tmax)                   # (M, Op)
    e_ref = row[:, :, :, None] + col[None, None, None, :]                  # (gn,Ho,Wo,go)
    bad = bad_row[:, :, :, None] | wq.invalid.any(axis=(1, 2, 3))[None, None, None, :]
    k = e_ref - G - xq.fmt.frac_bits - wq.fmt.frac_bits
    out = _conv_fp32(acc.view(gn, Ho, Wo, bn, go, bo), k[:, :, :, None, :, None],
                     bad[:, :, :, None, :, None])
    out = out.view(gn, Ho, Wo, bn, Op).permute(0, 3, 4, 1, 2).reshape(Np, Op, Ho, Wo)
    return out[:N, :O].contiguous().numpy()


def _upsampled(n_out: int, s: int, lead: int, n_z: int):
    """Where the rows of an ``n_out``-long axis land when spread ``s`` apart from offset
    ``lead`` in an axis of ``n_z`` (rows falling outside are dropped): ``(source slice,
    target slice)``, or None if none lands."""
    p0 = max(0, -(lead // s)) if lead < 0 else 0
    p1 = min(n_out - 1, (n_z - 1 - lead) // s) if n_z - 1 - lead >= 0 else -1
    if p0 > p1:
        return None
    return slice(p0, p1 + 1), slice(lead + s * p0, lead + s * p1 + 1, s)


def fast_bfp_conv2d_input_grad(gq: BFPTensor, wq: BFPTensor, input_size, geometry, *,
                               guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """:func:`hbfp_hw.conv.bfp_conv2d_input_grad`, bit for bit, computed with PyTorch.

    The blocks tap ``(i, j)`` of input position ``(h, w)`` reads are those of ``dY``
    spread ``stride`` apart (zero blocks, exponent ``emin``, in between) and shifted by
    ``dilation*(k-1) - padding``, read by the flipped tap with stride 1: a strided view
    again; then the same pre-shifted batched product, floor and exact sum as
    :func:`fast_bfp_conv2d`."""
    geo = geometry
    G = guard_bits
    H, W = (int(v) for v in input_size)
    blocks = _conv_blocks(gq, wq, ("dy", "w"), (1, 0))
    if (blocks is None or gq.shape[1] != wq.shape[0]
            or geo.output_size((H, W), wq.shape[2:]) != tuple(gq.shape[2:])):
        return bfp_conv2d_input_grad(gq, wq, (H, W), geometry=geo, guard_bits=G)
    (bn, bo), (_, bc) = blocks
    N, O, Ho, Wo = gq.shape
    _, C, KH, KW = wq.shape
    Np, Op = gq.mantissas.shape[:2]
    Cp = wq.mantissas.shape[1]
    gn, go, gc = Np // bn, Op // bo, Cp // bc
    if _acc_bits(gq.fmt.man_bits, wq.fmt.man_bits, bo, Op * KH * KW, G) > 53:
        return bfp_conv2d_input_grad(gq, wq, (H, W), geometry=geo, guard_bits=G)
    dt, c, tmax = _conv_dtype(bo, gq.fmt, wq.fmt, G)
    (sh, sw_), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    Zh, Zw = H + dh * (KH - 1), W + dw * (KW - 1)
    rh = _upsampled(Ho, sh, dh * (KH - 1) - ph, Zh)
    rw = _upsampled(Wo, sw_, dw * (KW - 1) - pw, Zw)
    up_geo = ConvGeometry((1, 1), (0, 0), (dh, dw))

    def up(a, fill):
        if isinstance(a, torch.Tensor):
            z = torch.full(tuple(a.shape[:-2]) + (Zh, Zw), fill, dtype=a.dtype)
        else:
            z = np.full(a.shape[:-2] + (Zh, Zw), fill, dtype=a.dtype)
        if rh is not None and rw is not None:
            z[..., rh[1], rw[1]] = a[..., rh[0], rw[0]]
        return z

    emin = gq.fmt.emin
    ge_t = _np_taps(up(gq.exponents.astype(np.int64), emin), up_geo, KH, KW, H, W)
    if gq.invalid.any():                                     # (KH, KW, gn, go, H, W)
        gv_t = _np_taps(up(_valid_exps(gq), emin), up_geo, KH, KW, H, W)
        bad_row = _np_taps(up(gq.invalid, False), up_geo, KH, KW, H, W).any(axis=(0, 1, 3))
    else:
        gv_t, bad_row = ge_t, np.zeros((gn, H, W), bool)
    row = gv_t.max(axis=(0, 1, 3))                                         # (gn, H, W)
    we = wq.exponents.astype(np.int64)[:, :, ::-1, ::-1]                   # flipped taps
    col = _valid_exps(wq).max(axis=(0, 2, 3))                              # (gc,)
    sg = np.clip(row[None, None, :, None] - ge_t, 0, c)
    sw = np.clip(col[None, :, None, None] - we, 0, c)                      # (go,gc,KH,KW)
    gm = up(torch.from_numpy(gq.mantissas).to(dt), 0.0)
    gt = _torch_taps(gm.view(gn, bn, go, bo, Zh, Zw), up_geo, KH, KW, H, W)
    a = torch.empty((KH, KW, go, gn, H, W, bn, bo), dtype=dt)
    torch.mul(gt.permute(0, 1, 4, 2, 6, 7, 3, 5),
              _pow2(G - sg, dt).permute(0, 1, 3, 2, 4, 5)[..., None, None], out=a)
    ce = C if gc == 1 else bc               # one channel block: its padding left out
    b = (torch.from_numpy(wq.mantissas).to(dt).view(go, bo, gc, bc, KH, KW)[:, :, :, :ce]
         .flip((4, 5)) * _pow2(-sw, dt)[:, None, :, None]).permute(4, 5, 0, 1, 2, 3)
    acc = _product_sum(a.view(KH * KW * go, gn * H * W * bn, bo),
                       b.reshape(KH * KW * go, bo, gc * ce), tmax)          # (M, Ce)
    e_ref = row[:, :, :, None] + col[None, None, None, :]                  # (gn,H,W,gc)
    bad = bad_row[:, :, :, None] | wq.invalid.any(axis=(0, 2, 3))[None, None, None, :]
    k = e_ref - G - gq.fmt.frac_bits - wq.fmt.frac_bits
    out = _conv_fp32(acc.view(gn, H, W, bn, gc, ce), k[:, :, :, None, :, None],
                     bad[:, :, :, None, :, None])
    out = out.view(gn, H, W, bn, gc * ce).permute(0, 3, 4, 1, 2).reshape(Np, gc * ce, H, W)
    return out[:N, :C].contiguous().numpy()


def fast_bfp_conv2d_weight_grad(gq: BFPTensor, xq: BFPTensor, kernel_size, geometry, *,
                                guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """:func:`hbfp_hw.conv.bfp_conv2d_weight_grad`, bit for bit, computed with PyTorch
    (per tap and K-block ``(sample block, p, q)`` the pre-shifted block products in one
    batched ``matmul``, floor, float64 sum over the K-blocks)."""
    geo = geometry
    G = guard_bits
    KH, KW = (int(v) for v in kernel_size)
    blocks = _conv_blocks(gq, xq, ("dy", "x"), (0, 0))
    if (blocks is None or gq.shape[0] != xq.shape[0]
            or geo.output_size(xq.shape[2:], (KH, KW)) != tuple(gq.shape[2:])):
        return bfp_conv2d_weight_grad(gq, xq, (KH, KW), geometry=geo, guard_bits=G)
    (bn, bo), (_, bc) = blocks
    N, O, Ho, Wo = gq.shape
    _, C, H, W = xq.shape
    Np, Op = gq.mantissas.shape[:2]
    Cp = xq.mantissas.shape[1]
    gn, go, gc = Np // bn, Op // bo, Cp // bc
    nk = gn * Ho * Wo
    if _acc_bits(gq.fmt.man_bits, xq.fmt.man_bits, bn, Np * Ho * Wo, G) > 53:
        return bfp_conv2d_weight_grad(gq, xq, (KH, KW), geometry=geo, guard_bits=G)
    dt, c, tmax = _conv_dtype(bn, gq.fmt, xq.fmt, G)
    ph, pw = geo.padding
    emin = xq.fmt.emin
    ge = gq.exponents.astype(np.int64)                                     # (gn,go,Ho,Wo)
    row = _valid_exps(gq).max(axis=(0, 2, 3))                              # (go,)
    bad_row = gq.invalid.any(axis=(0, 2, 3))
    xe_t = _np_taps(_pad_np(xq.exponents.astype(np.int64), ph, pw, emin), geo, KH, KW, Ho, Wo)
    if xq.invalid.any():
        xv_t = _np_taps(_pad_np(_valid_exps(xq), ph, pw, emin), geo, KH, KW, Ho, Wo)
        bad_col = _np_taps(_pad_np(xq.invalid, ph, pw, False), geo, KH, KW, Ho, Wo
                           ).any(axis=(2, 4, 5))
    else:
        xv_t, bad_col = xe_t, np.zeros((KH, KW, gc), bool)
    col = xv_t.max(axis=(2, 4, 5))                                         # (KH, KW, gc)
    sg = np.clip(row[None, :, None, None] - ge, 0, c)                      # (gn,go,Ho,Wo)
    sx = np.clip(col[:, :, None, :, None, None] - xe_t, 0, c)              # (KH,KW,gn,gc,Ho,Wo)
    a = torch.empty((gn, Ho, Wo, go, bo, bn), dtype=dt)
    torch.mul(torch.from_numpy(gq.mantissas).to(dt).view(gn, bn, go, bo, Ho, Wo
                                                          ).permute(0, 4, 5, 2, 3, 1),
              _pow2(G - sg, dt).permute(0, 2, 3, 1)[..., None, None], out=a)
    xm = torch.from_numpy(xq.mantissas).to(dt)
    if ph or pw:
        xm = F.pad(xm, (pw, pw, ph, ph))
    ce = C if gc == 1 else bc               # one channel block: its padding left out
    xt = _torch_taps(xm.view(gn, bn, gc, bc, H + 2 * ph, W + 2 * pw), geo, KH, KW, Ho, Wo)
    b = torch.empty((gn, Ho, Wo, bn, KH, KW, gc, ce), dtype=dt)
    torch.mul(xt[:, :, :, :, :, :ce].permute(2, 6, 7, 3, 0, 1, 4, 5),
              _pow2(-sx, dt).permute(2, 4, 5, 0, 1, 3)[:, :, :, None, :, :, :, None], out=b)
    # one product per K-block for all taps: (Op x bn) @ (bn x kh*kw*Ce)
    acc = _product_sum(a.view(nk, Op, bn), b.view(nk, bn, KH * KW * gc * ce), tmax)
    e_ref = row[:, None, None, None] + col[None]                           # (go,KH,KW,gc)
    bad = bad_row[:, None, None, None] | bad_col[None]
    k = e_ref - G - gq.fmt.frac_bits - xq.fmt.frac_bits
    out = _conv_fp32(acc.view(go, bo, KH, KW, gc, ce), k[:, None, :, :, :, None],
                     bad[:, None, :, :, :, None])
    out = out.view(Op, KH, KW, gc * ce)[:O, :, :, :C].permute(0, 3, 1, 2)
    return out.contiguous().numpy()


def conv_quantize(x: torch.Tensor, fmt: BFPFormat) -> BFPTensor:
    """:func:`hbfp_hw.quantize.quantize` of a 4-D conv operand blocked over axes 0 and 1
    (:func:`hbfp_hw.conv.conv_format`), bit for bit, through the 2-D quantizer.

    Blocks ``(rows x cols)`` at every spatial position, numbered row-major over the grid
    ``(N/rows, C/cols, H, W)``, are the 2-D tiles of the matrix ``(grid blocks * rows,
    cols)`` that lists each block's rows one after the other: the same blocks in the
    same stream order, hence the same exponents, mantissas and stochastic-rounding bits.
    Tensors holding NaN/Inf go to the golden model (its error or flags)."""
    x = _as_f32_tensor(x)
    N, C, H, W = x.shape
    lay = _conv_layout(tuple(x.shape), fmt)
    bn, bc = lay.block[0], lay.block[1]
    Np, Cp = lay.padded[:2]
    gn, gc = Np // bn, Cp // bc
    xp = x
    if (Np, Cp) != (N, C):
        xp = F.pad(x, (0, 0, 0, 0, 0, Cp - C, 0, Np - N))
    z = xp.reshape(gn, bn, gc, bc, H, W).permute(0, 2, 4, 5, 1, 3).reshape(-1, bc)
    try:
        q = torch_quantize(z, fmt)
    except NonFiniteBlockError:         # the golden model names the block of the 4-D tensor
        return quantize(x.numpy(), fmt)
    man = np.ascontiguousarray(
        q.mantissas.reshape(gn, gc, H, W, bn, bc).transpose(0, 4, 1, 5, 2, 3)
    ).reshape(Np, Cp, H, W)
    return BFPTensor(fmt, (N, C, H, W), man, q.exponents.reshape(gn, gc, H, W),
                     np.zeros((gn, gc, H, W), bool))


def _conv_layout(shape: tuple, fmt: BFPFormat):
    key = (shape, fmt.block_axes, fmt.block_shape)
    lay = _layouts.get(key)
    if lay is None:
        if len(_layouts) > 4096:
            _layouts.clear()
        lay = _layouts[key] = block_layout(shape, fmt)
    return lay


def _is_conv_blocking(shape: tuple, fmt: BFPFormat) -> bool:
    """A 4-D tensor blocked over axes 0 and 1 only (a HyperBlock conv operand)."""
    return len(shape) == 4 and sorted(a % 4 for a in fmt.block_axes) in ([0, 1], [0], [1])


@lru_cache(maxsize=256)
def _conv_fmt_cached(fmt: BFPFormat) -> BFPFormat:
    return conv_format(fmt)


def _cached_conv_fmt(cache: dict, fmt: BFPFormat) -> BFPFormat:
    """``_conv_fmt(fmt)`` kept in ``cache`` (a layer's: its formats do not change)."""
    c = cache.get("conv")
    if c is None:
        c = cache["conv"] = _conv_fmt(fmt)
    return c


def _conv_fmt(fmt: BFPFormat) -> BFPFormat:
    """The conv-operand format of a role's 2-D tile format (stochastic formats: one cache
    entry for all seeds)."""
    if fmt.rounding == "stochastic":
        return _with_seed(_conv_fmt_cached(_with_seed(fmt, 0)), fmt.seed)
    return _conv_fmt_cached(fmt)


# -- backends --------------------------------------------------------------------------

class Backend:
    """Where quantizations and BFP GEMMs run. Counts calls in :attr:`calls`.

    :attr:`supports_conv` says whether the backend runs the HyperBlock convolutions of
    :mod:`hbfp_hw.conv` (:meth:`conv2d`, :meth:`conv2d_input_grad`,
    :meth:`conv2d_weight_grad`); :class:`BFPConv2d` falls back to its im2col-tile GEMMs
    on a backend that does not.
    """

    name = "backend"
    supports_conv = False

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def quantize(self, x: Union[torch.Tensor, np.ndarray], fmt: BFPFormat) -> BFPTensor:
        """Quantize ``x`` (a torch tensor or a NumPy array, cast to float32)."""
        self.calls["quantize"] += 1
        return self._quantize(x, fmt)

    def matmul(self, a: BFPTensor, b: BFPTensor) -> np.ndarray:
        self.calls["matmul"] += 1
        return self._matmul(a, b)

    def quantize_static(self, x, fmt: BFPFormat,
                        exponent: int) -> tuple[BFPTensor, tuple[float, float]]:
        """Quantize ``x`` with one static shared exponent (``quantize(..., exponent=)``);
        also returns the ``(min, max)`` of its finite elements, ``(0.0, 0.0)`` when
        there are none: the statistics the device's range tracker gathers on the
        quantizer input while the tensor streams through."""
        self.calls["quantize_static"] += 1
        return self._quantize_static(x, fmt, exponent)

    def input_range(self, x, fmt: BFPFormat) -> tuple[float, float]:
        """The ``(min, max)`` of ``x``'s finite elements, as :meth:`quantize_static`
        reports them, before quantizing (a dynamic range's statistics pass)."""
        self.calls["range_pass"] += 1
        return self._input_range(x, fmt)

    def conv2d(self, xq: BFPTensor, wq: BFPTensor, geometry: ConvGeometry) -> np.ndarray:
        """:func:`hbfp_hw.conv.bfp_conv2d` of two quantized conv operands."""
        self.calls["conv2d"] += 1
        return self._conv2d(xq, wq, geometry)

    def conv2d_input_grad(self, gq: BFPTensor, wq: BFPTensor, input_size: tuple[int, int],
                          geometry: ConvGeometry) -> np.ndarray:
        """:func:`hbfp_hw.conv.bfp_conv2d_input_grad`."""
        self.calls["conv2d_input_grad"] += 1
        return self._conv2d_input_grad(gq, wq, input_size, geometry)

    def conv2d_weight_grad(self, gq: BFPTensor, xq: BFPTensor, kernel_size: tuple[int, int],
                           geometry: ConvGeometry) -> np.ndarray:
        """:func:`hbfp_hw.conv.bfp_conv2d_weight_grad`."""
        self.calls["conv2d_weight_grad"] += 1
        return self._conv2d_weight_grad(gq, xq, kernel_size, geometry)

    def _conv2d(self, xq, wq, geometry):
        raise NotImplementedError(f"{type(self).__name__} has no HyperBlock convolution")

    def _conv2d_input_grad(self, gq, wq, input_size, geometry):
        raise NotImplementedError(f"{type(self).__name__} has no HyperBlock convolution")

    def _conv2d_weight_grad(self, gq, xq, kernel_size, geometry):
        raise NotImplementedError(f"{type(self).__name__} has no HyperBlock convolution")

    def _quantize(self, x, fmt: BFPFormat) -> BFPTensor:  # pragma: no cover
        raise NotImplementedError

    def _quantize_static(self, x, fmt, exponent):  # pragma: no cover
        raise NotImplementedError

    def _input_range(self, x, fmt):  # pragma: no cover
        raise NotImplementedError

    def _matmul(self, a: BFPTensor, b: BFPTensor) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class EmulateBackend(Backend):
    """The golden model in-process, in PyTorch: :func:`~hbfp_hw.host.torch_quant.torch_quantize`
    (bit-identical to :func:`~hbfp_hw.quantize.quantize`; 4-D conv operands through
    :func:`conv_quantize`), :func:`fast_bfp_matmul` (bit-identical to
    :func:`~hbfp_hw.gemm.bfp_matmul`) and the HyperBlock convolutions
    :func:`fast_bfp_conv2d`, :func:`fast_bfp_conv2d_input_grad`,
    :func:`fast_bfp_conv2d_weight_grad` (bit-identical to :mod:`hbfp_hw.conv`)."""

    name = "emulate"
    supports_conv = True

    def _quantize(self, x, fmt: BFPFormat) -> BFPTensor:
        x = _as_f32_tensor(x)
        if _is_conv_blocking(tuple(x.shape), fmt):
            return conv_quantize(x, fmt)
        return torch_quantize(x, fmt)

    def _matmul(self, a: BFPTensor, b: BFPTensor) -> np.ndarray:
        return fast_bfp_matmul(a, b)

    def _conv2d(self, xq, wq, geometry):
        return fast_bfp_conv2d(xq, wq, geometry)

    def _conv2d_input_grad(self, gq, wq, input_size, geometry):
        return fast_bfp_conv2d_input_grad(gq, wq, input_size, geometry)

    def _conv2d_weight_grad(self, gq, xq, kernel_size, geometry):
        return fast_bfp_conv2d_weight_grad(gq, xq, kernel_size, geometry)

    def _quantize_static(self, x, fmt, exponent):
        a = _as_f32_array(x)
        return quantize(a, fmt, exponent=exponent), _finite_range(a)

    def _input_range(self, x, fmt):
        return _finite_range(_as_f32_array(x))


class DeviceBackend(Backend):
    """Every quantization and GEMM through a :mod:`hbfp_hw.host` device.

    Parameters
    ----------
    device : str or Device
        A device URL for ``hbfp_hw.host.open`` (e.g. ``"emulate://"``) or an open
        device object with ``quantize(x, fmt)`` and ``matmul_q(a_q, b_q)``.

    A stochastic-rounding tensor larger than one device QUANTIZE (whose random stream
    restarts per command) is quantized on the host by the golden model instead, so both
    backends draw one stream per tensor and give identical bits; ``calls`` counts these
    as ``"host_quantize"``.

    :attr:`supports_conv` is True when the device runs HyperBlock convolutions (its
    configuration has the CONV address generator, ``conv=1``): :class:`BFPConv2d`
    layers then quantize ``X``, ``W`` and ``dY`` once each with the device's QUANTIZE
    (through the block-row matrix of :func:`conv_quantize`, whose tiles are the conv
    blocks) and run the forward, ``dX`` and ``dW`` convolutions with the CONV command
    (``Device.conv2d``, ``conv2d_input_grad``, ``conv2d_weight_grad``). Without it
    they run their im2col-tile GEMMs on the device (``conv_mode="im2col_tiles"``, with a
    warning when the HyperBlock convolution was the default).
    """

    def __init__(self, device: Any) -> None:
        super().__init__()
        if isinstance(device, str):
            from hbfp_hw import host
            opener = getattr(host, "open", None)
            if opener is None:
                raise ValueError(
                    f"device URL {device!r} needs hbfp_hw.host.open (the host driver), which "
                    "is not available in this installation; use backend='emulate'")
            self.name = device
            device = opener(device)
        else:
            self.name = type(device).__name__
        self.device = device

    @property
    def supports_conv(self) -> bool:
        cfg = getattr(self.device, "config", None)
        return bool(getattr(cfg, "conv", 0)) and hasattr(self.device, "conv2d")

    def _conv2d(self, xq, wq, geometry):
        return self.device.conv2d(xq, wq, geometry=geometry)

    def _conv2d_input_grad(self, gq, wq, input_size, geometry):
        return self.device.conv2d_input_grad(gq, wq, input_size, geometry=geometry)

    def _conv2d_weight_grad(self, gq, xq, kernel_size, geometry):
        return self.device.conv2d_weight_grad(gq, xq, kernel_size, geometry=geometry)

    def _quantize(self, x, fmt: BFPFormat) -> BFPTensor:
        x = _as_f32_array(x)
        if _is_conv_blocking(tuple(x.shape), fmt) and len(fmt.block_axes) == 2:
            return self._conv_quantize(x, fmt)
        return self._quantize_2d(x, fmt)

    def _conv_quantize(self, x: np.ndarray, fmt: BFPFormat) -> BFPTensor:
        """A 4-D conv operand through the 2-D quantizer on its block-row matrix (the
        blocks of :func:`conv_quantize`, in the same stream order)."""
        N, C, H, W = x.shape
        lay = _conv_layout(tuple(x.shape), fmt)
        bn, bc = lay.block[0], lay.block[1]
        (Np, Cp), (gn, gc) = lay.padded[:2], lay.grid[:2]
        xp = np.zeros((Np, Cp, H, W), np.float32)
        xp[:N, :C] = x
        z = np.ascontiguousarray(
            xp.reshape(gn, bn, gc, bc, H, W).transpose(0, 2, 4, 5, 1, 3).reshape(-1, bc))
        try:
            q = self._quantize_2d(z, fmt)
        except NonFiniteBlockError:     # the golden model names the block of the 4-D tensor
            return quantize(x, fmt)
        codes, man = q.stream()
        return BFPTensor.from_stream(fmt, (N, C, H, W), codes, man)

    def _quantize_2d(self, x: np.ndarray, fmt: BFPFormat) -> BFPTensor:
        tiles = getattr(self.device, "quantize_tiles", None)
        if (fmt.rounding == "stochastic" and tiles is not None and x.ndim == 2
                and len(tiles(x.shape, fmt)) > 1):
            # the device restarts the random stream per QUANTIZE; one stream over the
            # whole tensor (as on emulate) is the golden model's quantization
            self.calls["host_quantize"] += 1
            return quantize(x, fmt)
        return self.device.quantize(x, fmt)

    def _matmul(self, a: BFPTensor, b: BFPTensor) -> np.ndarray:
        return np.asarray(self.device.matmul_q(a, b), dtype=np.float32)

    def _quantize_static(self, x, fmt, exponent):
        # the quantize-input range tracker's window is exactly this tensor's QUANTIZEs
        self.device.read_stats(clear=True, source="quantize")
        q = self.device.quantize(_as_f32_array(x), fmt, exponent=exponent)
        st = self.device.read_stats(clear=True, source="quantize")
        return q, ((float(st["min"]), float(st["max"])) if st["count"] else (0.0, 0.0))

    def _input_range(self, x, fmt):
        # a statistics pass: the tensor streams through QUANTIZE once more (what the
        # in-hindsight range avoids)
        return self._quantize_static(x, fmt, fmt.emax)[1]


def _as_f32_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x if x.dtype == torch.float32 else x.to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _as_f32_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of the finite elements of a float32 array, ``(0.0, 0.0)`` if none."""
    if a.size and not np.isfinite(a).all():
        a = a[np.isfinite(a)]
    return (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)


def get_backend(backend: Union[str, Backend, None]) -> Backend:
    """``None``/``"emulate"`` -> :class:`EmulateBackend`; a URL -> :class:`DeviceBackend`."""
    if backend is None or backend == "emulate":
        return EmulateBackend()
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        if "://" not in backend:
            raise ValueError(
                f"backend={backend!r}; accepted values are 'emulate' or a device URL such "
                "as 'emulate://'")
        return DeviceBackend(backend)
    raise TypeError(f"backend must be 'emulate', a device URL or a Backend, got {backend!r}")


# -- format helpers --------------------------------------------------------------------

def _norm_axes(fmt: BFPFormat) -> tuple[int, ...]:
    return tuple(sorted(a % 2 for a in fmt.block_axes))


def is_hyperblock(fmt: BFPFormat) -> bool:
    """True for a 2-D tile format (blocks over both axes of a 2-D operand)."""
    return len(fmt.block_axes) == 2 and _norm_axes(fmt) == (0, 1)


def _tile(fmt: BFPFormat) -> tuple[int, int]:
    d = dict(zip((a % 2 for a in fmt.block_axes), fmt.block_shape))
    return d[0], d[1]


@lru_cache(maxsize=256)
def _along(fmt: BFPFormat, axis: int) -> BFPFormat:
    """``fmt`` blocked along one axis of a 2-D operand (per-GEMM re-quantization)."""
    return fmt.replace(block_axes=(axis,), block_shape=(fmt.block_size,))


def _bfp_of(q: Quantizer) -> Quantizer:
    """The BFP format a role's quantizer produces (a static-exponent quantizer's own)."""
    return q.fmt if isinstance(q, StaticExpQuantizer) else q


def _check_formats(w: Quantizer, a: Quantizer, g: Quantizer) -> str:
    for role, q in (("weight", w), ("act", a), ("grad", g)):
        f = q.fmt if isinstance(q, StaticExpQuantizer) else q
        if isinstance(f, BFPFormat) and len(f.block_shape) > 2:
            raise ValueError(
                f"{role} format {f.name or f.block_shape!r} has {len(f.block_shape)}-D blocks "
                f"{f.block_shape}; the layers take 1-D blocks (along each GEMM's reduction "
                "axis) or 2-D HyperBlock tiles")
    if any(is_scheme_format(q) for q in (w, a, g)):
        for role, q in (("weight", w), ("act", a), ("grad", g)):
            if not (isinstance(q, BFPFormat) or is_scheme_format(q)):
                raise TypeError(
                    f"{role} format {q!r}: a layer with a scheme format (LUQ, MLS, fp32 ...) "
                    "takes BFP or scheme formats in its other roles, not int quantizers")
        return "fake"
    for role, q in (("weight", w), ("act", a), ("grad", g)):
        if not isinstance(q, (BFPFormat, UniformQuantizer, StaticExpQuantizer)):
            raise TypeError(f"{role} format must be a BFPFormat, UniformQuantizer or "
                            f"StaticExpQuantizer, got {q!r}")
    static = [isinstance(q, StaticExpQuantizer) for q in (w, a, g)]
    w, a, g = (_bfp_of(q) for q in (w, a, g))
    kinds = {isinstance(q, BFPFormat) for q in (w, a, g)}
    if any(static) and not (kinds == {True} and all(is_hyperblock(q) for q in (w, a, g))):
        raise ValueError("a StaticExpQuantizer needs HyperBlock (2-D tile) formats in all "
                         "three roles")
    if kinds == {False}:
        return "uniform"
    if kinds != {True}:
        raise ValueError("weight, activation and gradient formats must be all BFP or all "
                         "uniform int quantizers")
    hb = [is_hyperblock(q) for q in (w, a, g)]
    if all(hb):
        # X (b x i), W (o x i), dY (b x o): each GEMM's reduction axis must agree.
        (xb, xi), (wo, wi), (gb, go) = _tile(a), _tile(w), _tile(g)
        if not (xi == wi and wo == go and xb == gb):
            raise ValueError(
                f"HyperBlock tiles must agree along each GEMM's reduction axis: activation "
                f"{(xb, xi)} (batch x in), weight {(wo, wi)} (out x in), gradient "
                f"{(gb, go)} (batch x out)")
        return "hyperblock"
    if any(hb):
        raise ValueError("mixing HyperBlock (2-D tile) and 1-D block formats in one layer "
                         "is not supported")
    sizes = {q.block_size for q in (w, a, g)}
    if len(sizes) != 1:
        raise ValueError(f"1-D block formats need one block length, got {sorted(sizes)}")
    return "per_gemm"


def _mix_seed(*parts: int) -> int:
    # the bytes of np.asarray(parts, dtype=np.int64): native-order int64s
    return zlib.crc32(struct.pack(f"={len(parts)}q", *parts))


# -- the fused per-layer path -----------------------------------------------------------

#: layer steps run by the fused kernels (one compiled call per layer and direction,
#: :func:`torch_kernels.layer_forward` / :func:`torch_kernels.layer_backward`), per
#: direction: "forward", "backward"
fused_calls: Counter[str] = Counter()


class _LayerPlan:
    """What a HyperBlock layer's fused step needs, worked out once per (shapes, formats,
    stochastic flags): the kernels' parameter arrays, tiles, padded sizes, mantissa
    dtypes and the FP32 conversion offsets of the three GEMMs."""

    __slots__ = ("key", "px", "pw", "pg", "jx", "jw", "jg", "dtx", "dtw", "dtg", "xb",
                 "xi", "wo", "Bp", "Ip", "Op", "off_y", "off_dx", "off_dw", "act_sr",
                 "grad_sr", "fx", "fw", "fg", "bf", "bdx", "bdw")


def _layer_plan(layer: "BFPLayerMixin", x: torch.Tensor, w: torch.Tensor):
    """The layer's :class:`_LayerPlan` for these operands (cached on the layer), or None
    where the fused path does not apply: another backend (including subclasses of
    :class:`EmulateBackend`, which may override its methods), the layer's quantizer or
    step formats replaced (subclass or instance attribute), not HyperBlock, not float32
    on the CPU, empty operands, or anything the per-call path would reject or hand to
    the golden model."""
    d = layer.__dict__
    if layer._static or "_quant" in d or "_act_fmt_for_step" in d or "_grad_fmt_for_step" in d:
        return None                     # replaced on the instance (e.g. a test's spy)
    act_sr = layer.act_stochastic and layer.training
    key = (x.shape, w.shape, x.dtype, w.dtype, x.is_cpu, w.is_cpu, layer.act_fmt,
           layer.weight_fmt, layer.grad_fmt, act_sr, layer.grad_stochastic)
    plan = d.get("_fused_plan")
    if plan is not None and plan.key == key:
        return plan
    plan = _make_plan(layer, x, w, key, act_sr)
    d["_fused_plan"] = plan if plan is not None else _NoPlan(key)
    return plan


class _NoPlan:
    """A cached "no fused path" for a key (so that the checks are not redone)."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key


def _make_plan(layer, x, w, key, act_sr):
    if not (layer._mode == "hyperblock" and type(layer.backend) is EmulateBackend):
        return None
    cls = type(layer)
    if (cls._quant is not BFPLayerMixin._quant
            or cls._act_fmt_for_step is not BFPLayerMixin._act_fmt_for_step
            or cls._grad_fmt_for_step is not BFPLayerMixin._grad_fmt_for_step):
        return None                     # a subclass changes what a step quantizes
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or 0 in (*x.shape, *w.shape):
        return None
    if not (x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu"):
        return None
    fx, fw, fg = layer.act_fmt, layer.weight_fmt, layer.grad_fmt
    if act_sr:
        fx = fx.replace(rounding="stochastic")
    if layer.grad_stochastic:
        fg = fg.replace(rounding="stochastic")
    (xb, xi), (wo, wi), (gb, go) = _tile(fx), _tile(fw), _tile(fg)
    if not (xi == wi and wo == go and xb == gb):
        return None
    B, I = x.shape
    O = w.shape[0]
    G = DEFAULT_GUARD_BITS
    for ma, mb, L, K in ((fx, fw, xi, I), (fg, fw, go, O), (fg, fx, gb, B)):
        if _acc_bits(ma.man_bits, mb.man_bits, L, K, G) > 53:
            return None
    p = _LayerPlan()
    p.key, p.act_sr, p.grad_sr = key, act_sr, layer.grad_stochastic
    p.fx, p.fw, p.fg = fx, fw, fg
    p.px, p.pw, p.pg = (_kernels.format_param_array(f) for f in (fx, fw, fg))
    p.dtx, p.dtw, p.dtg = (_kernels._format_params(f)[6] for f in (fx, fw, fg))
    p.xb, p.xi, p.wo = xb, xi, wo
    p.Bp, p.Ip, p.Op = -(-B // xb) * xb, -(-I // xi) * xi, -(-O // wo) * wo
    p.jx = _kernels.operand_jump(fx, p.Bp, p.Ip)
    p.jw = _kernels.operand_jump(fw, p.Op, p.Ip)
    p.jg = _kernels.operand_jump(fg, p.Bp, p.Op)
    GB = _kernels.GemmBuffers
    p.bf = GB(p.Bp, p.Ip, p.Op, xb, xi, wo, fx.mmax, fw.mmax)        # Y = X Wᵀ
    p.bdx = GB(p.Bp, p.Op, p.Ip, gb, go, xi, fg.mmax, fw.mmax)       # dX = dY W
    p.bdw = GB(p.Op, p.Bp, p.Ip, go, gb, xi, fg.mmax, fx.mmax)       # dW = dYᵀ X
    p.off_y = -fx.frac_bits - fw.frac_bits
    p.off_dx = -fg.frac_bits - fw.frac_bits
    p.off_dw = -fg.frac_bits - fx.frac_bits
    return p


def _run_fused(status, nu, g, offset, M, N, bm, bn) -> np.ndarray:
    """The GEMMs of a product prepared into the buffers ``g``
    (:class:`torch_kernels.GemmBuffers`) and its conversion to FP32."""
    if nu == g.nkb:
        acc = _EMPTY_ACC
    elif status == 0:                   # one exact float32 GEMM, into the reused buffer
        torch.mm(g.At, g.Bt, out=g.acct)
        acc = g.acc
        kernel_paths["f32"] += 1
    else:
        acc = _safe_gemm(status, g.At, g.Bt, g.ch)
    if nu:
        p = torch.bmm(g.Ut[:nu], g.Vt[:nu]).numpy()
        kernel_paths["blocks"] += 1
    else:
        p = _EMPTY_P
    return _kernels._finish_kernel(acc, p, g.er, g.ec, DEFAULT_GUARD_BITS, offset, M, N,
                                   bm, bn)


def _fused_forward(ctx, plan: _LayerPlan, layer, x, w):
    """``Y = Xq Wqᵀ`` through one fused kernel call; None if an operand holds NaN/Inf
    (the caller then takes the per-call path, where the golden model raises)."""
    xn = x.detach().contiguous().numpy()
    wn = w.detach().contiguous().numpy()
    px = plan.px
    if plan.act_sr:
        px[_kernels.P_SEED] = _mix_seed(layer.seed, layer.layer_id, layer._step, 1)
    xm = np.empty((plan.Bp, plan.Ip), plan.dtx)
    wm = np.empty((plan.Op, plan.Ip), plan.dtw)
    ex, ew, st, nu = _kernels.layer_forward(xn, wn, xm, wm, px, plan.pw, plan.jx, plan.jw,
                                            plan.xb, plan.xi, plan.wo, DEFAULT_GUARD_BITS,
                                            _F32_GEMM_MIN, plan.bf, _F32_MAX_CHUNKS)
    if st < 0:
        return None
    B, O = xn.shape[0], wn.shape[0]
    y = _run_fused(st, nu, plan.bf, plan.off_y, B, O, plan.xb, plan.wo)
    qc, bc = layer.quant_calls, layer.backend.calls
    qc["act"] += 1
    qc["weight"] += 1
    bc["quantize"] += 2
    bc["matmul"] += 1
    fused_calls["forward"] += 1
    ctx.saved = (xm, ex, wm, ew)
    ctx.fused = (plan, xn.shape, wn.shape)
    return y


def _fused_backward(ctx, layer, dy):
    """dX and dW through one fused kernel call (quantize dY, prepare both GEMMs);
    None if ``dy`` holds NaN/Inf."""
    plan, xshape, wshape = ctx.fused
    xm, ex, wm, ew = ctx.saved
    dyn = dy.detach()
    if dyn.dtype != torch.float32:
        dyn = dyn.to(torch.float32)
    dyn = dyn.cpu().contiguous().numpy()
    pg = plan.pg
    if plan.grad_sr:
        pg[_kernels.P_SEED] = _mix_seed(layer.seed, layer.layer_id, layer._step)
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gmn = np.empty((plan.Bp, plan.Op), plan.dtg)
    ok, s1, n1, s2, n2 = _kernels.layer_backward(
        dyn, gmn, pg, plan.jg, xm, ex, plan.px, wm, ew, plan.pw, plan.xb, plan.wo, plan.xi,
        DEFAULT_GUARD_BITS, _F32_GEMM_MIN, need_dx, need_dw, plan.bdx, plan.bdw,
        _F32_MAX_CHUNKS)
    if not ok:
        return None
    B, I = xshape
    O = wshape[0]
    dx = _run_fused(s1, n1, plan.bdx, plan.off_dx, B, I, plan.xb, plan.xi) if need_dx else None
    dw = _run_fused(s2, n2, plan.bdw, plan.off_dw, O, I, plan.wo, plan.xi) if need_dw else None
    layer.quant_calls["grad"] += 1
    bc = layer.backend.calls
    bc["quantize"] += 1
    bc["matmul"] += need_dx + need_dw
    fused_calls["backward"] += 1
    return dx, dw


def _saved_bfp(ctx) -> tuple:
    """The forward's quantized X and W as BFPTensors (for the per-call backward)."""
    plan, xshape, wshape = ctx.fused
    xm, ex, wm, ew = ctx.saved
    return (BFPTensor(plan.fx, tuple(xshape), xm, ex, np.zeros(ex.shape, bool)),
            BFPTensor(plan.fw, tuple(wshape), wm, ew, np.zeros(ew.shape, bool)))


# -- the autograd function -------------------------------------------------------------

class _BFPGemm(torch.autograd.Function):
    """``Y = X Wᵀ (+ b)`` with X (B, I), W (O, I); the layer carries formats/backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias, layer: "BFPLayerMixin"):
        ctx.layer = layer
        ctx.fused = None
        ctx.has_bias = bias is not None
        if _kernels.ENABLED:
            plan = _layer_plan(layer, x, w)
            if type(plan) is _LayerPlan:
                y = _fused_forward(ctx, plan, layer, x, w)
                if y is not None:
                    out = torch.from_numpy(y)
                    return out + bias.detach() if bias is not None else out
        xd, wd = x.detach(), w.detach()
        mode, be = layer._mode, layer.backend
        if mode == "hyperblock":
            xq = layer._quant(xd, layer._act_fmt_for_step(), "act")
            wq = layer._quant(wd, layer.weight_fmt, "weight")
            y = be.matmul(xq, transpose_q(wq))
            ctx.saved = (xq, wq)
        elif mode == "per_gemm":
            xq = layer._quant(xd, _along(layer.act_fmt, 1), "act")
            wq = layer._quant(wd, _along(layer.weight_fmt, 1), "weight")
            y = be.matmul(xq, transpose_q(wq))
            ctx.saved = (xd, wd)
        else:  # uniform: fake-quantized values, FP32 GEMM (in torch: one thread)
            xn, wn = xd.cpu().numpy(), wd.cpu().numpy()
            xq = torch.from_numpy(layer._uquant(xn, layer.act_fmt, "act"))
            wq = torch.from_numpy(layer._uquant(wn, layer.weight_fmt, "weight"))
            y = (xq @ wq.T).numpy()
            ctx.saved = (xq, wq)
        out = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(x.device)
        if bias is not None:
            out = out + bias.detach()
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layer = ctx.layer
        if ctx.fused is not None:
            r = _fused_backward(ctx, layer, dy) if _kernels.ENABLED else None
            if r is not None:
                layer.__dict__["_step"] = layer._step + 1     # (skips Module.__setattr__)
                ctx.saved = None
                db = dy.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
                return (None if r[0] is None else torch.from_numpy(r[0]),
                        None if r[1] is None else torch.from_numpy(r[1]), db, None)
            ctx.saved = _saved_bfp(ctx)
        be = layer.backend
        dyn = dy.detach()
        gfmt = layer._grad_fmt_for_step()
        if layer._mode == "hyperblock":
            xq, wq = ctx.saved
            gq = layer._quant(dyn, gfmt, "grad")
            dx = be.matmul(gq, wq) if ctx.needs_input_grad[0] else None
            dw = (be.matmul(transpose_q(gq, layer._grad_fmt_t), xq)
                  if ctx.needs_input_grad[1] else None)
        elif layer._mode == "per_gemm":
            xn, wn = ctx.saved
            dx = dw = None
            if ctx.needs_input_grad[0]:
                dx = be.matmul(layer._quant(dyn, _along(gfmt, 1), "grad"),
                               layer._quant(wn, _along(layer.weight_fmt, 0), "weight"))
            if ctx.needs_input_grad[1]:
                dw = be.matmul(transpose_q(layer._quant(dyn, _along(gfmt, 0), "grad")),
                               layer._quant(xn, _along(layer.act_fmt, 0), "act"))
        else:
            xq, wq = ctx.saved
            gq = torch.from_numpy(layer._uquant(dyn.cpu().numpy(), gfmt, "grad"))
            dx = (gq @ wq).numpy() if ctx.needs_input_grad[0] else None
            dw = (gq.T @ xq).numpy() if ctx.needs_input_grad[1] else None
        layer._step += 1
        ctx.saved = None

        def t(a):
            return None if a is None else torch.from_numpy(
                np.ascontiguousarray(a, dtype=np.float32)).to(dy.device)
        db = dy.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return t(dx), t(dw), db, None


def _conv_direct(layer: "BFPConv2d", x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a HyperBlock conv step takes the direct path: the plain
    :class:`EmulateBackend` with the compiled kernels, float32 CPU operands, and neither
    the layer's quantizer nor its step formats replaced (on the instance or in a
    subclass); otherwise the per-call path goes through the backend's methods."""
    d = layer.__dict__
    if not _kernels.ENABLED or type(layer.backend) is not EmulateBackend:
        return False
    if "_quant" in d or "_act_fmt_for_step" in d or "_grad_fmt_for_step" in d:
        return False
    cls = type(layer)
    if (cls._quant is not BFPLayerMixin._quant
            or cls._act_fmt_for_step is not BFPLayerMixin._act_fmt_for_step
            or cls._grad_fmt_for_step is not BFPLayerMixin._grad_fmt_for_step):
        return False
    return (x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu")


class _ConvOperand:
    """A conv operand quantized by the compiled kernel (:func:`torch_kernels.conv_quantize_4d`):
    the :class:`BFPTensor` parts, plus the operand scaled by exact powers of two
    (``val = m * 2**(E - eref)``, float32, unpadded) and the per-block L1 statistics of
    the exact float32 convolutions (:func:`_exact_conv`)."""

    __slots__ = ("fmt", "shape", "man", "exps", "val", "stats", "eref", "ok", "block", "_t")

    def __init__(self, fmt, shape, block, r) -> None:
        self.fmt, self.shape, self.block = fmt, shape, block
        self.man, self.exps, val, self.stats, self.eref, self.ok = r
        self.val = torch.from_numpy(val)
        self._t = None

    def bfp(self) -> BFPTensor:
        if self._t is None:
            self._t = BFPTensor(self.fmt, self.shape, self.man, self.exps,
                                np.zeros(self.exps.shape, bool))
        return self._t


def _conv_operand(x: torch.Tensor, fmt: BFPFormat):
    """:func:`conv_quantize` through the compiled kernel (same bits): a
    :class:`_ConvOperand`, or the golden model's :class:`BFPTensor` (or its error) when
    ``x`` holds NaN/Inf."""
    x = x.contiguous()
    shape = tuple(x.shape)
    lay = _conv_layout(shape, fmt)
    r = _kernels.conv_quantize_4d(x.numpy(), fmt, lay.block[0], lay.block[1],
                                  lay.padded[0], lay.padded[1])
    if r is None:
        return conv_quantize(x, fmt)
    return _ConvOperand(fmt, shape, lay.block[:2], r)


def _bfp(t) -> BFPTensor:
    return t.bfp() if isinstance(t, _ConvOperand) else t


#: the exact convolutions' paths taken (by :func:`_exact_conv`), per direction and path:
#: ``("fwd", "f32")``, ``("dx", "f64")``, ``("dw", "golden")`` ...
conv_paths: Counter = Counter()

#: the largest status of :func:`torch_kernels.conv_check` that may run as a convolution
#: (tests lower it to force the fallbacks): 3 = any (float32, float32 per sample block,
#: float32 halves, float64); 0 = float32 only; -1 = always the bit-level PyTorch path
#: (:func:`fast_bfp_conv2d` and its gradients)
_CONV_MAX_STATUS = 3

_PATH_NAMES = ("f32", "chunks", "split", "f64")


def _conv_status(kind: str, a, b, size, geo, G: int) -> int:
    """:func:`torch_kernels.conv_check` of one convolution (0 float32, 1 float32 per
    sample block (dW), 2 float32 in two halves of ``a``'s mantissas, 3 float64), or 4
    when it cannot run as a convolution (golden-model operands, an operand's exponent
    range too wide, mismatched blocks, an accumulator wider than 53 bits, a truncating
    block pair: the bit-level path handles or rejects those)."""
    if not (isinstance(a, _ConvOperand) and isinstance(b, _ConvOperand) and a.ok and b.ok):
        return 4
    ma, mb = a.fmt.man_bits, b.fmt.man_bits
    if kind == "fwd":
        if a.block[1] != b.block[1]:
            return 4
        L, k = a.block[1], b.man.shape[1] * b.shape[2] * b.shape[3]
    elif kind == "dx":
        if a.block[1] != b.block[0]:
            return 4
        L, k = a.block[1], b.man.shape[0] * b.shape[2] * b.shape[3]
    else:
        if a.block[0] != b.block[0]:
            return 4
        L, k = a.block[0], a.man.shape[0] * a.shape[2] * a.shape[3]
    if _acc_bits(ma, mb, L, k, G) > 53:
        return 4
    st = _kernels.conv_check(kind, a.exps, a.stats, b.exps, b.stats, size, geo, G, k)
    if st == 2 and ma > 8:                  # the halves' bound assumes |m| <= 127
        st = 3
    return st if st <= _CONV_MAX_STATUS else 4


def _conv_parts(a: "_ConvOperand", st: int):
    """The first operand's float tensors for path ``st``: ``[val]`` (float32 or
    float64) or the two halves of :func:`torch_kernels.conv_split`."""
    if st == 0:
        return [a.val]
    if st == 3:
        return [a.val.to(torch.float64)]
    hi, lo = _kernels.conv_split(a.man, a.exps, a.eref, a.block[0], a.block[1], a.shape)
    return [torch.from_numpy(hi), torch.from_numpy(lo)]


def _conv_sum(rs: list) -> np.ndarray:
    """One exact result from the parts' exact results (float64 sum of two float32s)."""
    if len(rs) == 1:
        return rs[0].contiguous().numpy()
    return (rs[0].to(torch.float64) + rs[1]).numpy()


def _conv_forward(xo, wo, geo, G: int = DEFAULT_GUARD_BITS, bias=None) -> torch.Tensor:
    """:func:`fast_bfp_conv2d` of two conv operands (bit for bit): the float32 (or
    float64) convolution of the scaled operands when :func:`_conv_status` allows. With
    ``bias`` (a float32 array), the result plus ``bias`` per channel."""
    KH, KW = wo.shape[2:]
    H, W = xo.shape[2:]
    st = _conv_status("fwd", xo, wo, geo.output_size((H, W), (KH, KW)), geo, G)
    if st == 4:
        conv_paths["fwd", "golden"] += 1
        y = torch.from_numpy(fast_bfp_conv2d(_bfp(xo), _bfp(wo), geo, guard_bits=G))
        return y if bias is None else y + torch.from_numpy(bias).view(1, -1, 1, 1)
    conv_paths["fwd", _PATH_NAMES[st]] += 1
    w = wo.val.to(torch.float64) if st == 3 else wo.val
    ys = [F.conv2d(x, w, None, geo.stride, geo.padding, geo.dilation)
          for x in _conv_parts(xo, st)]
    k = xo.eref + wo.eref - xo.fmt.frac_bits - wo.fmt.frac_bits
    return torch.from_numpy(_kernels.conv_finish(_conv_sum(ys), k, bias))


def _conv_backward(go_, wo, xo, in_hw, ksize, geo, need_dx: bool, need_dw: bool,
                   G: int = DEFAULT_GUARD_BITS):
    """dX and dW (:func:`fast_bfp_conv2d_input_grad` / ``_weight_grad``, bit for bit)
    from the quantized ``dY``, ``W`` and ``X``; the convolutions that may (see
    :func:`_conv_status`) run as ``convolution_backward`` calls, dX and dW together when
    they take the same path."""
    sx = _conv_status("dx", go_, wo, in_hw, geo, G) if need_dx else None
    sw = _conv_status("dw", go_, xo, ksize, geo, G) if need_dw else None
    dx = dw = None
    if sx == 4:
        conv_paths["dx", "golden"] += 1
        dx = torch.from_numpy(fast_bfp_conv2d_input_grad(_bfp(go_), _bfp(wo), in_hw, geo,
                                                         guard_bits=G))
    if sw == 4:
        conv_paths["dw", "golden"] += 1
        dw = torch.from_numpy(fast_bfp_conv2d_weight_grad(_bfp(go_), _bfp(xo), ksize, geo,
                                                          guard_bits=G))
    args = (list(geo.stride), list(geo.padding), list(geo.dilation), False, [0, 0], 1)
    if sw == 1:                             # one float32 dW per sample block
        conv_paths["dw", "chunks"] += 1
        bn, n = go_.block[0], go_.shape[0]
        acc = None
        for n0 in range(0, n, bn):
            r = torch.ops.aten.convolution_backward(
                go_.val[n0: n0 + bn], xo.val[n0: n0 + bn], wo.val, None, *args,
                [False, True, False])[1]
            acc = r.to(torch.float64) if acc is None else acc.add_(r)
        k = go_.eref + xo.eref - go_.fmt.frac_bits - xo.fmt.frac_bits
        dw = torch.from_numpy(_kernels.conv_finish(acc.numpy(), k))
    for st in (0, 2, 3):
        mx, mw = sx == st, sw == st
        if not (mx or mw):
            continue
        dt = torch.float64 if st == 3 else torch.float32
        w = wo.val.to(dt)
        rx, rw = [], []
        for g in _conv_parts(go_, st):
            xv = xo.val.to(dt) if mw else g.new_empty(1).expand(
                (g.shape[0], wo.shape[1]) + tuple(in_hw))
            r = torch.ops.aten.convolution_backward(g, xv, w, None, *args, [mx, mw, False])
            rx.append(r[0])
            rw.append(r[1])
        if mx:
            conv_paths["dx", _PATH_NAMES[st]] += 1
            k = go_.eref + wo.eref - go_.fmt.frac_bits - wo.fmt.frac_bits
            dx = torch.from_numpy(_kernels.conv_finish(_conv_sum(rx), k))
        if mw:
            conv_paths["dw", _PATH_NAMES[st]] += 1
            k = go_.eref + xo.eref - go_.fmt.frac_bits - xo.fmt.frac_bits
            dw = torch.from_numpy(_kernels.conv_finish(_conv_sum(rw), k))
    return dx, dw


class _BFPConv(torch.autograd.Function):
    """HyperBlock convolution (:mod:`hbfp_hw.conv`): ``X`` (act), ``W`` (weight) and
    ``dY`` (grad) quantized once each with exponents shared over (samples x channels)
    at every position; forward, dX and dW are implicit-GEMM convolutions of those three
    tensors, the forward's ``Xq`` reused by dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias, layer: "BFPConv2d"):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.in_hw = (int(x.shape[2]), int(x.shape[3]))
        xd, wd = x.detach(), w.detach()
        be, geo = layer.backend, layer.geometry
        ctx.direct = _conv_direct(layer, xd, wd)
        fw = _conv_fmt(layer.weight_fmt)
        if ctx.direct:
            fx = layer._act_fmt_for_step(conv=True)
            xq, wq = _conv_operand(xd, fx), _conv_operand(wd, fw)
            b = None
            if bias is not None and bias.dtype == torch.float32:
                b, bias = bias.detach().contiguous().numpy(), None
            y = _conv_forward(xq, wq, geo, bias=b)
            qc, bc = layer.quant_calls, be.calls
            qc["act"] += 1
            qc["weight"] += 1
            bc["quantize"] += 2
            bc["conv2d"] += 1
            fused_calls["forward"] += 1
        else:
            fx = _conv_fmt(layer._act_fmt_for_step())
            xq = layer._quant(xd, fx, "act")
            wq = layer._quant(wd, fw, "weight")
            y = be.conv2d(xq, wq, geo)
        ctx.saved = (xq, wq)
        out = y if isinstance(y, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(y, dtype=np.float32))
        out = out.to(x.device)
        if bias is not None:
            out = out + bias.detach().view(1, -1, 1, 1)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layer = ctx.layer
        be, geo = layer.backend, layer.geometry
        xq, wq = ctx.saved
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ksize = tuple(wq.shape[2:])
        if ctx.direct:
            gq = _conv_operand(dy.detach(), layer._grad_fmt_for_step(conv=True))
            dx, dw = _conv_backward(gq, wq, xq, ctx.in_hw, ksize, geo, need_dx, need_dw)
            layer.quant_calls["grad"] += 1
            bc = be.calls
            bc["quantize"] += 1
            bc["conv2d_input_grad"] += need_dx
            bc["conv2d_weight_grad"] += need_dw
            fused_calls["backward"] += 1
        else:
            gq = layer._quant(dy.detach(), _conv_fmt(layer._grad_fmt_for_step()), "grad")
            dx = be.conv2d_input_grad(gq, wq, ctx.in_hw, geo) if need_dx else None
            dw = be.conv2d_weight_grad(gq, xq, ksize, geo) if need_dw else None
        layer.__dict__["_step"] = layer._step + 1         # (skips Module.__setattr__)
        ctx.saved = None

        def t(a):
            if a is None:
                return None
            if not isinstance(a, torch.Tensor):
                a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            return a.to(dy.device)
        db = dy.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return t(dx), t(dw), db, None


# -- layers ----------------------------------------------------------------------------

class BFPLayerMixin:
    """Formats, backend and counters shared by :class:`BFPLinear` and :class:`BFPConv2d`."""

    def _setup_bfp(self, *, fmt: Quantizer | None, weight_fmt: Quantizer | None,
                   act_fmt: Quantizer | None, grad_fmt: Quantizer | None,
                   backend: Union[str, Backend, None], grad_stochastic: bool, seed: int,
                   shadow_fmt: BFPFormat | None, layer_id: int,
                   act_stochastic: bool = False) -> None:
        base = HBFP8 if fmt is None else fmt
        self.weight_fmt = weight_fmt if weight_fmt is not None else base
        self.act_fmt = act_fmt if act_fmt is not None else base
        self.grad_fmt = grad_fmt if grad_fmt is not None else base
        stateful = (UniformQuantizer, StaticExpQuantizer)
        if isinstance(self.act_fmt, stateful):
            self.act_fmt = self.act_fmt.fresh()
        if isinstance(self.grad_fmt, stateful):
            self.grad_fmt = self.grad_fmt.fresh()
        if isinstance(self.weight_fmt, stateful):
            self.weight_fmt = self.weight_fmt.fresh()
        self._mode = _check_formats(self.weight_fmt, self.act_fmt, self.grad_fmt)
        #: a role quantizes with a static exponent (no fused kernel path)
        self._static = any(isinstance(q, StaticExpQuantizer)
                           for q in (self.weight_fmt, self.act_fmt, self.grad_fmt))
        if grad_stochastic and not isinstance(self.grad_fmt, BFPFormat):
            raise ValueError("grad_stochastic needs a BFP gradient format")
        if act_stochastic and not (self._mode == "hyperblock"
                                   and isinstance(self.act_fmt, BFPFormat)):
            raise ValueError("act_stochastic needs a HyperBlock (2-D tile) BFP activation "
                             "format")
        if shadow_fmt is not None and not isinstance(shadow_fmt, BFPFormat):
            raise TypeError(f"shadow_fmt must be a BFPFormat or None, got {shadow_fmt!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r} is out of range; accepted range is [0, 2**32-1]")
        self.backend = get_backend(backend)
        if self._mode == "fake" and not isinstance(self.backend, EmulateBackend):
            raise ValueError(
                f"scheme formats (LUQ, MLS, fp32 roles) train on the emulate backend only "
                f"(backend {self.backend.name!r}): the accelerator runs BFP GEMMs")
        #: per-role state of the scheme formats' train_quantize (fake mode)
        self._fake_state = {"act": {}, "weight": {}, "grad": {}}
        if self._mode == "uniform" and not isinstance(self.backend, EmulateBackend):
            raise ValueError(
                f"per-tensor int quantizers run on the emulate backend only (backend "
                f"{self.backend.name!r}): the accelerator's datapath is BFP; its range "
                "tracker (READ_STATS) is not wired to an int8 path yet")
        self.grad_stochastic = bool(grad_stochastic)
        self.act_stochastic = bool(act_stochastic)
        self.seed = seed
        self.layer_id = int(layer_id)
        self.shadow_fmt = shadow_fmt
        self._step = 0
        #: quantizer calls per tensor role ("act", "weight", "grad") since construction
        self.quant_calls: Counter[str] = Counter()

    # quantizers ----------------------------------------------------------------------
    def _quant(self, x: torch.Tensor, fmt: BFPFormat | StaticExpQuantizer,
               role: str) -> BFPTensor:
        self.quant_calls[role] += 1
        if isinstance(fmt, StaticExpQuantizer):
            return self._static_quant(x, fmt, role)
        return self.backend.quantize(x, fmt)

    def _static_quant(self, x: torch.Tensor, q: StaticExpQuantizer, role: str) -> BFPTensor:
        """One static-exponent quantization: the exponent from the range of past steps
        (in-hindsight) or, for a dynamic range or the first step, from a statistics pass
        over ``x``; the min/max the backend reports while quantizing (the device's
        range tracker) update the statistics (activations only in training)."""
        be = self.backend
        cur = be.input_range(x, q.fmt) if q.needs_current_range else None
        xq, (lo, hi) = be.quantize_static(x, q.fmt, q.exponent(cur))
        q.observe(lo, hi, update=self.training or role == "grad")
        return xq

    def _fake_quant(self, x: np.ndarray, fmt, role: str) -> np.ndarray:
        """One fake quantization (fake mode, :mod:`hbfp_hw.host.torch_fake`)."""
        self.quant_calls[role] += 1
        seed = _mix_seed(self.seed, self.layer_id, self._step, ROLE_IDS[role]) % 2**32
        return fake_quantize(fmt, x, role=role, seed=seed, state=self._fake_state[role],
                             update=self.training or role == "grad")

    def _uquant(self, x: np.ndarray, q: UniformQuantizer, role: str) -> np.ndarray:
        self.quant_calls[role] += 1
        return q(x, update=self.training or role == "grad")

    def _grad_fmt_for_step(self, conv: bool = False) -> Quantizer:
        """This step's gradient format; sets :attr:`_grad_fmt_t`, its transpose (for a
        2-D stochastic format, else None: :func:`transpose_q` finds it). ``conv``: the
        HyperBlock conv operand format of it (``_conv_fmt`` of the result; the direct
        conv path asks for it, the seed-free part is cached)."""
        g = self.grad_fmt
        d = self.__dict__                   # (plain attributes: skips Module.__setattr__)
        d["_grad_fmt_t"] = None
        if not self.grad_stochastic:
            return _conv_fmt(g) if conv else g
        base = d.get("_sr_fmt_base")
        if base is None or base[0] is not g:
            sr = g.replace(rounding="stochastic")
            srt = (_transposed_fmt(sr, tuple(a % 2 for a in sr.block_axes))
                   if len(sr.block_axes) == 2 else None)
            base = d["_sr_fmt_base"] = (g, sr, srt, {})
        seed = _mix_seed(self.seed, self.layer_id, self._step)
        if conv:
            return _with_seed(_cached_conv_fmt(base[3], base[1]), seed)
        if base[2] is not None:
            d["_grad_fmt_t"] = _with_seed(base[2], seed)
        return _with_seed(base[1], seed)

    def _act_fmt_for_step(self, conv: bool = False) -> Quantizer:
        """This step's activation format: with :attr:`act_stochastic`, in training mode,
        the activation format with stochastic rounding, seeded from
        ``(seed, layer index, step, 1)`` (a stream apart from the gradients'); else
        :attr:`act_fmt` (evaluation stays deterministic, round to nearest). ``conv``: as
        :meth:`_grad_fmt_for_step`."""
        a = self.act_fmt
        if not (self.act_stochastic and self.training):
            return _conv_fmt(a) if conv else a
        d = self.__dict__
        base = d.get("_sr_act_base")
        if base is None or base[0] is not a:
            base = d["_sr_act_base"] = (a, a.replace(rounding="stochastic"), {})
        seed = _mix_seed(self.seed, self.layer_id, self._step, 1)
        if conv:
            return _with_seed(_cached_conv_fmt(base[2], base[1]), seed)
        return _with_seed(base[1], seed)

    def _gemm(self, x2d: torch.Tensor) -> torch.Tensor:
        w2d = self.weight.reshape(self.weight.shape[0], -1)
        if self._mode == "fake":
            return FakeGemm.apply(x2d, w2d, self.bias, self)
        return _BFPGemm.apply(x2d, w2d, self.bias, self)

    def extra_repr_bfp(self) -> str:
        def nm(q):
            return getattr(q, "name", "") or repr(q)
        return (f"weight={nm(self.weight_fmt)}, "
                f"act={nm(self.act_fmt)}{' (SR)' if self.act_stochastic else ''}, "
                f"grad={nm(self.grad_fmt)}{' (SR)' if self.grad_stochastic else ''}, "
                f"backend={self.backend.name}, mode={self._mode}")


def _check_input(layer: nn.Module, x: torch.Tensor) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"{type(layer).__name__} takes float32 input (the accelerator's FP32 "
                        f"interface), got {x.dtype}; convert it with x.float()")


class BFPLinear(nn.Linear, BFPLayerMixin):
    """:class:`torch.nn.Linear` whose forward, dX and dW GEMMs run in BFP.

    Parameters
    ----------
    in_features, out_features, bias
        As :class:`torch.nn.Linear`.
    fmt
        Default format for weights, activations and gradients (default HBFP8).
    weight_fmt, act_fmt, grad_fmt
        Per-role formats (BFP formats or :class:`~hbfp_hw.host.ranges.UniformQuantizer`).
    backend
        ``"emulate"`` (default), a device URL, or a :class:`Backend` (shared by layers).
    grad_stochastic
        Round gradients stochastically, with a seed that changes every step.
    act_stochastic
        Round this layer's input ``X`` stochastically in training mode (seed changes every
        step; HyperBlock formats only); evaluation rounds to nearest.
    seed
        Base seed of the stochastic rounding.
    shadow_fmt
        Wide BFP format the stored weights are rounded to by :func:`round_weights`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 fmt: Quantizer | None = None, weight_fmt: Quantizer | None = None,
                 act_fmt: Quantizer | None = None, grad_fmt: Quantizer | None = None,
                 backend: Union[str, Backend, None] = "emulate", grad_stochastic: bool = False,
                 seed: int = 0, shadow_fmt: BFPFormat | None = None, layer_id: int = 0,
                 act_stochastic: bool = False, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_bfp(fmt=fmt, weight_fmt=weight_fmt, act_fmt=act_fmt, grad_fmt=grad_fmt,
                        backend=backend, grad_stochastic=grad_stochastic, seed=seed,
                        shadow_fmt=shadow_fmt, layer_id=layer_id,
                        act_stochastic=act_stochastic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        lead = x.shape[:-1]
        y = self._gemm(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self.extra_repr_bfp()


#: convolution modes of :class:`BFPConv2d`
CONV_MODES = ("hyperblock", "im2col_tiles")


class BFPConv2d(nn.Conv2d, BFPLayerMixin):
    """:class:`torch.nn.Conv2d` in BFP (``groups=1``, zero padding), in one of two modes
    (``conv_mode``):

    * ``"hyperblock"`` (the default for HyperBlock BFP formats, see
      ``docs/conv.md``): ``X[N, C, H, W]``, ``W[O, C, kh, kw]`` and ``dY[N, O, H', W']``
      are quantized once each with one exponent per (samples x channels) block at every
      spatial position or tap (the roles' 2-D tiles read as ``(Bn x Bc)``, ``(Bo x
      Bc)``, ``(Bn x Bo)``), and forward, dX and dW are the exact implicit-GEMM
      convolutions of :mod:`hbfp_hw.conv` (one rounding to FP32 each, dX included);
    * ``"im2col_tiles"``: ``X`` is the unfolded input, ``(batch·out_positions) ×
      (in·kh·kw)``, ``W`` the weight viewed as ``out × (in·kh·kw)``, each a 2-D operand
      of the BFP GEMM with the format's tiles; the col2im of ``dX`` is an FP32 sum. The
      only mode for MX/1-D block formats, per-tensor int quantizers and
      :class:`~hbfp_hw.host.ranges.StaticExpQuantizer` roles.

    A layer with a scheme format (LUQ, MLS, ``get_format("fp32")`` ...) in any role
    runs ``conv_mode="fake"``: an FP32 convolution on the quantized 4-D operands
    (:mod:`hbfp_hw.host.torch_fake`).

    ``conv_mode=None`` picks ``"hyperblock"`` when the formats allow it and the backend
    runs HyperBlock convolutions (:attr:`Backend.supports_conv`); on a backend that does
    not (:class:`DeviceBackend` on a device built without CONV, ``conv=0``) it falls
    back to ``"im2col_tiles"`` with a :class:`UserWarning`. :attr:`conv_mode` holds the
    mode that runs. Format arguments as :class:`BFPLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, fmt: Quantizer | None = None,
                 weight_fmt: Quantizer | None = None, act_fmt: Quantizer | None = None,
                 grad_fmt: Quantizer | None = None,
                 backend: Union[str, Backend, None] = "emulate", grad_stochastic: bool = False,
                 seed: int = 0, shadow_fmt: BFPFormat | None = None, layer_id: int = 0,
                 act_stochastic: bool = False, conv_mode: str | None = None, device=None,
                 dtype=None) -> None:
        if groups != 1:
            raise ValueError(f"groups={groups}; BFPConv2d supports groups=1 only")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode={padding_mode!r}; BFPConv2d supports 'zeros' only")
        if isinstance(padding, str):
            raise ValueError(f"padding={padding!r}; BFPConv2d needs explicit integer padding")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        self._setup_bfp(fmt=fmt, weight_fmt=weight_fmt, act_fmt=act_fmt, grad_fmt=grad_fmt,
                        backend=backend, grad_stochastic=grad_stochastic, seed=seed,
                        shadow_fmt=shadow_fmt, layer_id=layer_id,
                        act_stochastic=act_stochastic)
        #: the convolution mode that runs (``"hyperblock"`` or ``"im2col_tiles"``)
        self.conv_mode = self._resolve_conv_mode(conv_mode)
        self._geo = None

    def _resolve_conv_mode(self, conv_mode: str | None) -> str:
        if self._mode == "fake":
            if conv_mode not in (None, "fake"):
                raise ValueError(f"conv_mode={conv_mode!r}: a layer with scheme formats "
                                 "(LUQ, MLS, fp32 ...) runs its convolutions in FP32 on the "
                                 "quantized operands (conv_mode None or 'fake')")
            return "fake"
        hb = self._mode == "hyperblock" and not self._static
        if conv_mode is None:
            if not hb:
                return "im2col_tiles"
            if not self.backend.supports_conv:
                warnings.warn(
                    "BFPConv2d: this backend has no HyperBlock convolution (the accelerator "
                    "has no convolution command); the layer runs its im2col-tile GEMMs on "
                    "it instead (conv_mode='im2col_tiles')", UserWarning, stacklevel=4)
                return "im2col_tiles"
            return "hyperblock"
        if conv_mode not in CONV_MODES:
            raise ValueError(f"conv_mode={conv_mode!r}; accepted values are "
                             f"{', '.join(repr(m) for m in CONV_MODES)} or None")
        if conv_mode == "hyperblock":
            if not hb:
                raise ValueError(
                    "conv_mode='hyperblock' needs HyperBlock (2-D tile) BFP formats in all "
                    "three roles (not MX/1-D blocks, int quantizers or static exponents)")
            if not self.backend.supports_conv:
                raise ValueError(
                    f"conv_mode='hyperblock': backend {self.backend.name!r} has no HyperBlock "
                    "convolution (the accelerator has no convolution command); use "
                    "conv_mode='im2col_tiles' or the emulate backend")
        return conv_mode

    @property
    def geometry(self) -> ConvGeometry:
        """Stride, padding and dilation as a :class:`hbfp_hw.conv.ConvGeometry`."""
        key = (tuple(self.stride), tuple(self.padding), tuple(self.dilation))
        if self._geo is None or self._geo[0] != key:
            self._geo = (key, ConvGeometry(*key))
        return self._geo[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if x.dim() == 3:                                    # unbatched (C, H, W)
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} takes (N, C, H, W) or (C, H, W) input, "
                             f"got shape {tuple(x.shape)}")
        if self.conv_mode == "hyperblock":
            return _BFPConv.apply(x, self.weight, self.bias, self)
        if self.conv_mode == "fake":
            return FakeConv.apply(x, self.weight, self.bias, self)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)                                # (N, C*kh*kw, L)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        x2d = cols.transpose(1, 2).reshape(n * ho * wo, -1)
        y = self._gemm(x2d)                                                 # (N*L, O)
        return y.reshape(n, ho * wo, self.out_channels).transpose(1, 2).reshape(
            n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (nn.Conv2d.extra_repr(self) + ", " + self.extra_repr_bfp()
                + f", conv_mode={self.conv_mode}")


# -- model conversion ------------------------------------------------------------------

def bfp_layers(model: nn.Module) -> list[BFPLayerMixin]:
    """The BFP layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, BFPLayerMixin)]


class ConversionReport:
    """What :func:`convert` did: :attr:`converted` (qualified module names) and
    :attr:`skipped` (``(name, reason)``) for layers it left in FP32."""

    def __init__(self) -> None:
        self.converted: list[str] = []
        self.skipped: list[tuple[str, str]] = []

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s): "
                 f"{', '.join(self.converted) or '-'}"]
        lines += [f"left in FP32: {n} ({why})" for n, why in self.skipped]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ConversionReport(converted={self.converted!r}, skipped={self.skipped!r})"


def _skip_reason(child: nn.Module) -> str | None:
    """Why a layer that looks like a GEMM layer is not converted (None: not one)."""
    if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
        return (f"{type(child).__name__} is a subclass of nn.Linear; its forward may not be "
                "nn.Linear's, so it is not replaced (convert a plain nn.Linear)")
    if type(child) is nn.Conv2d:
        if child.groups != 1:
            return f"Conv2d with groups={child.groups} (BFPConv2d supports groups=1)"
        if child.padding_mode != "zeros":
            return f"Conv2d with padding_mode={child.padding_mode!r} (BFPConv2d: 'zeros')"
        if isinstance(child.padding, str):
            return f"Conv2d with padding={child.padding!r} (BFPConv2d: integer padding)"
        return None
    if isinstance(child, nn.modules.conv._ConvNd):
        return (f"{type(child).__name__} is not supported (the BFP layers are Linear and "
                "Conv2d)")
    return None


#: Widest model-input mantissa that :func:`convert` dithers by default.
INPUT_DITHER_MAN_BITS = 4


def input_dither_default(fmt, weight_fmt=None, act_fmt=None, grad_fmt=None) -> bool:
    """Whether :func:`convert` rounds the model input stochastically in training when
    ``input_act_stochastic`` is not given: the first layer's activation format is
    HyperBlock BFP with at most :data:`INPUT_DITHER_MAN_BITS` mantissa bits and round to
    nearest, and its weight and gradient formats are HyperBlock BFP too."""
    base = HBFP8 if fmt is None else fmt
    w, a, g = (base if q is None else q for q in (weight_fmt, act_fmt, grad_fmt))
    if not all(isinstance(q, BFPFormat) and is_hyperblock(q) for q in (w, a, g)):
        return False
    return a.man_bits <= INPUT_DITHER_MAN_BITS and a.rounding != "stochastic"


def convert(model: nn.Module, fmt: Quantizer | None = HBFP8, *,
            weight_fmt: Quantizer | None = None, act_fmt: Quantizer | None = None,
            grad_fmt: Quantizer | None = None, backend: Union[str, Backend, None] = "emulate",
            grad_stochastic: bool = False, seed: int = 0,
            shadow_fmt: BFPFormat | None = None,
            input_act_fmt: Quantizer | None = None,
            input_act_stochastic: bool | None = None, conv_mode: str | None = None,
            sparsity: str | None = None, mask_period: int = 100,
            include=None, verbose: bool = False) -> nn.Module:
    """Replace every :class:`~torch.nn.Linear` / :class:`~torch.nn.Conv2d` of ``model``
    (in place) with its BFP counterpart, keeping the parameters.

    ``input_act_fmt``, if given, is the activation format of the first converted layer
    (in module order; it quantizes the model input), e.g. 8-bit input data in an
    otherwise 4-bit model. ``input_act_stochastic=True`` rounds that layer's input
    stochastically in training mode (a dither of the model input; see
    :class:`BFPLinear`'s ``act_stochastic``); evaluation rounds to nearest. The default
    ``None`` dithers it when that input is 4-bit HyperBlock BFP (e.g. the HBFP4 preset:
    a 4-bit model input costs accuracy when it is rounded the same way every step,
    ``docs/training.md``) and all three roles of that layer are HyperBlock BFP formats;
    ``False`` keeps round-to-nearest. All converted layers share one backend
    instance (so its :attr:`Backend.calls` counts the whole model). ``conv_mode`` is
    passed to every :class:`BFPConv2d` (None: HyperBlock convolutions where the formats
    and the backend allow them). ``sparsity`` (e.g. ``"2:4-transposable"``, ``"2:4"``)
    prunes every converted layer's weight with N:M masks recomputed every
    ``mask_period`` steps, straight-through to the dense weights
    (:func:`hbfp_hw.host.torch_sparsity.apply_sparsity`, ``docs/sparsity.md``).

    ``include(name, module) -> bool``, if given, picks the layers to convert (``name`` is
    the qualified name, as in ``model.named_modules()``). Layers that are not converted
    although they compute a GEMM (subclasses of ``nn.Linear``, ``Conv1d``/``Conv3d``,
    grouped or non-zero-padded ``Conv2d``, or excluded by ``include``) are left in FP32
    and listed, with the reason, in the :class:`ConversionReport` stored as
    ``model.bfp_conversion`` (printed with ``verbose=True``). The new layers are all built
    before the first is put in place: an error leaves ``model`` unchanged.

    Formats of the other schemes (LUQ, MLS, ``get_format("fp32")`` ...) in any role put
    the layers in the fake-quantization mode of :mod:`hbfp_hw.host.torch_fake`.
    Returns ``model``.
    """
    if include is not None and not callable(include):
        raise TypeError(f"include must be a callable (name, module) -> bool, got {include!r}")
    be = get_backend(backend)
    counter = [0]
    report = ConversionReport()
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []

    def kw():
        counter[0] += 1
        act = act_fmt
        if counter[0] == 1 and input_act_fmt is not None:
            act = input_act_fmt
        first = counter[0] == 1
        dither = input_act_stochastic
        if dither is None:
            dither = first and input_dither_default(fmt, weight_fmt, act, grad_fmt)
        return dict(fmt=fmt, weight_fmt=weight_fmt, act_fmt=act, grad_fmt=grad_fmt,
                    backend=be, grad_stochastic=grad_stochastic, seed=seed,
                    shadow_fmt=shadow_fmt, layer_id=counter[0],
                    act_stochastic=bool(dither) and first)

    def plan(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qual = f"{prefix}{name}"
            if isinstance(child, BFPLayerMixin):
                continue
            gemm = isinstance(child, (nn.Linear, nn.modules.conv._ConvNd))
            if not gemm:
                plan(child, qual + ".")
                continue
            why = _skip_reason(child)
            if why is None and include is not None and not include(qual, child):
                why = "excluded by include"
            if why is not None:
                report.skipped.append((qual, why))
                continue
            if type(child) is nn.Linear:
                new = BFPLinear(child.in_features, child.out_features, child.bias is not None,
                                **kw())
            else:
                new = BFPConv2d(child.in_channels, child.out_channels, child.kernel_size,
                                child.stride, child.padding, child.dilation, child.groups,
                                child.bias is not None, child.padding_mode,
                                conv_mode=conv_mode, **kw())
            new.weight = child.weight
            new.bias = child.bias
            new.train(child.training)
            swaps.append((parent, name, child, new))
            report.converted.append(qual)

    plan(model, "")
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    if sparsity is not None:
        try:
            from .torch_sparsity import apply_sparsity
            apply_sparsity(model, sparsity, mask_period)
        except BaseException:
            for parent, name, old, _ in swaps:
                setattr(parent, name, old)
            raise
    model.bfp_conversion = report
    if verbose:
        print(report)
    return model


@torch.no_grad()
def round_weights(model: nn.Module) -> None:
    """Round the stored weights of every BFP layer with a ``shadow_fmt`` to that format
    (HBFP's wide weight copy); call after each ``optimizer.step()``."""
    for layer in bfp_layers(model):
        if layer.shadow_fmt is None:
            continue
        # a pruned layer (apply_sparsity) computes .weight from the dense original
        par = getattr(layer, "parametrizations", None)
        w = par.weight.original if par is not None and "weight" in par else layer.weight
        w2d = w.detach().cpu().reshape(w.shape[0], -1)
        if supports(tuple(w2d.shape), layer.shadow_fmt):
            q = torch_quantize(w2d, layer.shadow_fmt).dequantize()
        else:
            q = quantize(w2d.numpy(), layer.shadow_fmt).dequantize()
        w.copy_(torch.from_numpy(q.reshape(w.shape)))
