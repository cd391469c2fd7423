"""PyTorch-native BFP quantizer for 2-D operands, bit-identical to the golden model.

:func:`torch_quantize` computes what :func:`hbfp_hw.quantize.quantize` computes for a
2-D tensor (HyperBlock tiles or 1-D blocks along either axis), with the same rules
(``docs/numerics.md``) and the same float32 arithmetic, but on torch tensors and
without the NumPy round trip, so the emulate backend of :mod:`hbfp_hw.host.torch` pays
a few tensor operations per call instead of the golden model's per-call setup. It
returns an ordinary :class:`~hbfp_hw.quantize.BFPTensor` (its arrays share memory with
the torch tensors). Tensors holding NaN/Inf, other ranks and other block layouts are
handed to the golden model itself, so error reporting is the golden model's.

When numba is installed, the work is one compiled kernel per call
(:func:`hbfp_hw.host.torch_kernels.quantize_2d`, the same float operations in one loop
nest); otherwise (or with :data:`hbfp_hw.host.torch_kernels.ENABLED` off) the PyTorch
path below, whose stochastic-rounding bits come from
:func:`hbfp_hw.prng.random_bits_u32`. Both give the golden model's bits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from hbfp_hw.formats import BFPFormat
from hbfp_hw.prng import random_bits_u32
from hbfp_hw.quantize import BFPTensor, quantize

from . import torch_kernels as _kernels

__all__ = ["torch_quantize", "supports"]


# -- the quantizer ---------------------------------------------------------------------

def supports(shape: tuple[int, ...], fmt: BFPFormat) -> bool:
    """Whether :func:`torch_quantize` handles this shape/format itself (2-D tensors,
    blocks over one or both axes)."""
    return _supports_axes(shape, fmt.block_axes)


def _supports_axes(shape: tuple[int, ...], block_axes: tuple[int, ...]) -> bool:
    if len(shape) != 2 or len(block_axes) > 2:
        return False
    axes = [a % 2 for a in block_axes if -2 <= a < 2]
    return len(axes) == len(block_axes) and len(set(axes)) == len(axes)


_plans: dict = {}


def _plan(shape: tuple, block_axes: tuple, block_shape: tuple):
    """:func:`_geometry` if :func:`supports` the shape and blocking, else None (cached:
    one dict lookup per call)."""
    key = (shape, block_axes, block_shape)
    geo = _plans.get(key, False)
    if geo is False:
        ok = _supports_axes(shape, block_axes)
        geo = _geometry(shape, block_axes, block_shape) if ok else None
        if len(_plans) > 4096:
            _plans.clear()
        _plans[key] = geo
    return geo


@lru_cache(maxsize=256)
def _geometry(shape: tuple[int, int], block_axes: tuple[int, ...],
              block_shape: tuple[int, ...]):
    block = [1, 1]
    for a, b in zip(block_axes, block_shape):
        block[a % 2] = b
    b0, b1 = block
    m, n = shape
    mp, np_ = -(-m // b0) * b0, -(-n // b1) * b1
    return b0, b1, mp, np_, mp // b0, np_ // b1


_ABS = 0x7FFFFFFF
_INF = 0x7F800000
_MIN_NORMAL = 0x00800000


def _pow2_np(k: np.ndarray) -> np.ndarray:
    """Exact float32 ``2**k`` for integer ``k`` in [-126, 127] (built from the bits)."""
    return ((k.astype(np.int32) + 127) << 23).view(np.float32)


def torch_quantize(x: torch.Tensor, fmt: BFPFormat) -> BFPTensor:
    """:func:`hbfp_hw.quantize.quantize` (``nonfinite="raise"``) of a 2-D tensor, bit for
    bit, computed with torch. Falls back to the golden model for what it does not
    handle itself (see :func:`supports`; tensors with NaN/Inf)."""
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = x.detach()
    if x.dtype != torch.float32:
        return quantize(x.cpu().numpy(), fmt)
    shape = tuple(x.shape)
    geo = _plan(shape, fmt.block_axes, fmt.block_shape)
    if geo is None:
        return quantize(x.cpu().numpy(), fmt)
    b0, b1, mp, np_, g0, g1 = geo
    x = x.cpu()
    if _kernels.ENABLED:
        xn = x.contiguous().numpy()
        res = _kernels.quantize_2d(xn, fmt, b0, b1, mp, np_)
        if res is None:                     # NaN/Inf: the golden model raises
            return quantize(xn, fmt)
        return BFPTensor(fmt, shape, res[0], res[1], np.zeros((g0, g1), dtype=bool))
    if (mp, np_) != shape:
        xp = x.new_zeros((mp, np_))
        xp[: shape[0], : shape[1]] = x
        x = xp
    else:
        x = x.contiguous()
    bits = x.view(torch.int32) & _ABS
    amax = bits.view(g0, b0, g1, b1).amax(dim=3).amax(dim=1).numpy()  # (g0, g1)
    # grid-level work (one value per block) in NumPy: cheaper per call on small grids
    if (amax >= _INF).any():
        return quantize(x[: shape[0], : shape[1]].numpy(), fmt)
    field = amax >> 23
    # (np.minimum/np.maximum: np.clip's per-call overhead is several times larger)
    exps = np.minimum(np.maximum(np.where(field == 0, fmt.emin, field - 127), fmt.emin),
                      fmt.emax)
    # subnormal inputs are flushed; as in the golden model only where they could round
    # to a non-zero mantissa (non-zero blocks with a very small exponent), elsewhere
    # they give 0 anyway
    xv = x.view(g0, b0, g1, b1)
    if np.where(amax > 0, exps, fmt.emax).min() < -126 + fmt.man_bits + fmt.sr_bits:
        xv = xv.masked_fill(bits.view(g0, b0, g1, b1) < _MIN_NORMAL, 0.0)
    # y = x * 2**k, k = frac_bits - E, as two exact float32 power-of-two multiplies
    # inside the normal range, as the golden model computes it
    k = fmt.frac_bits - np.maximum(exps, -150)
    k1 = np.minimum(np.maximum(k, -126), 126)
    y = xv * torch.from_numpy(_pow2_np(k1))[:, None, :, None]
    if (k != k1).any():
        y.mul_(torch.from_numpy(_pow2_np(k - k1))[:, None, :, None])
    mmax = fmt.mmax
    rnd = fmt.rounding
    if rnd == "nearest_even":
        q = torch.round(y)
    elif rnd == "toward_zero":
        q = torch.trunc(y)
    elif rnd == "nearest_away":
        t = torch.trunc(y)
        q = t + torch.copysign(((y - t).abs() >= 0.5).to(torch.float32), xv)
    else:  # stochastic: q = floor(|y| + u / 2**r) = (floor(|y| 2**r) + u) >> r
        r = fmt.sr_bits
        # every value below is an integer < 2**(man_bits + r + 1) (or that times 2**-r
        # before the last floor): exact in float32 when that fits 24 bits
        dt = torch.float32 if fmt.man_bits + r + 1 <= 24 else torch.float64
        u = random_bits_u32(fmt.seed, fmt.sr_lanes, mp * np_, r).view(np.int32)  # r <= 24
        # stream order: blocks row-major over the grid, elements row-major in a block
        ut = torch.from_numpy(u).view(g0, g1, b0, b1).permute(0, 2, 1, 3).to(
            dt, memory_format=torch.contiguous_format)
        mag = y.abs().to(dt).clamp_(max=2.0 ** fmt.man_bits)
        a = torch.floor(mag.mul_(2.0 ** r))
        qm = torch.floor(a.add_(ut).mul_(2.0 ** -r))
        q = torch.copysign(qm, y)
    q = q.clamp_(-mmax, mmax)
    man = q.to(torch.int8 if fmt.man_bits <= 8 else torch.int16).view(mp, np_)
    return BFPTensor(fmt, shape, man.numpy(), exps.astype(np.int16),
                     np.zeros((g0, g1), dtype=bool))
