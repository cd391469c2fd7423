"""Golden model: FP32 -> BFP quantization and back.

The rules are stated in ``docs/numerics.md``; in short, for each block

1. inputs are IEEE-754 binary32 (other float dtypes are cast to float32 first, with
   NumPy's round-to-nearest-even); subnormal inputs are flushed to zero;
2. ``E = clamp(max floor(log2|x|), emin, emax)`` over the finite non-zero elements
   (``emin`` for an all-zero block); a block holding NaN or +-Inf is *invalid*;
3. ``y = |x| * 2**(man_bits - 2 - E)`` is rounded to an integer ``q`` with the format's
   rounding mode, ``m = sign(x) * min(q, 2**(man_bits-1) - 1)``.

Rounding works on the magnitude and re-applies the sign, so every mode is sign
symmetric. ``stochastic`` is ``q = floor(|y| + u / 2**r)`` with ``u`` the ``r``-bit
number of :mod:`hbfp_hw.prng` for this element's position in the block stream.

The implementation is vectorised NumPy; all arithmetic on ``y`` is exact (scaling by a
power of two, ``rint``/``trunc``/``floor`` of exactly representable values).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .formats import BFPFormat
from .prng import random_bits

__all__ = ["BFPTensor", "NonFiniteBlockError", "quantize", "dequantize", "block_layout",
           "check_exponent"]

_ABS_MASK = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_MIN_NORMAL_BITS = np.uint32(0x00800000)
_CHUNK_ELEMS = 1 << 19          # elements per chunk: amortises ~20 NumPy calls per chunk,
                                # temporaries stay in L2/L3 cache
_WORKERS = min(2, os.cpu_count() or 1)


class NonFiniteBlockError(ValueError):
    """A block holds NaN or Inf and ``nonfinite="raise"`` was asked for.

    Attributes
    ----------
    block_index : tuple of int
        Index of the first bad block in the block grid.
    flat_index : int
        Its position in the block stream order.
    """

    def __init__(self, message: str, block_index: tuple[int, ...], flat_index: int,
                 tensor: str | None = None):
        super().__init__(message)
        self.block_index = block_index
        self.flat_index = flat_index
        self.tensor = tensor


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of a given shape is cut into blocks by a format."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]          # normalised, in the order of fmt.block_axes
    block: tuple[int, ...]         # block extent per tensor dimension (1 off the axes)
    padded: tuple[int, ...]
    grid: tuple[int, ...]

    @property
    def interleaved(self) -> tuple[int, ...]:
        """Shape ``(g0, b0, g1, b1, ...)`` that views the padded tensor block-wise."""
        out: list[int] = []
        for g, b in zip(self.grid, self.block):
            out += [g, b]
        return tuple(out)

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid, dtype=np.int64))

    @property
    def block_size(self) -> int:
        return int(np.prod(self.block, dtype=np.int64))

    def grid_view(self, grid_array: np.ndarray) -> np.ndarray:
        """Reshape a grid-shaped array so it broadcasts against the interleaved view."""
        shp: list[int] = []
        for g in self.grid:
            shp += [g, 1]
        return grid_array.reshape(shp)

    def to_stream(self, padded: np.ndarray) -> np.ndarray:
        """Padded tensor -> ``(num_blocks, block_size)`` in block stream order."""
        nd = len(self.shape)
        v = padded.reshape(self.interleaved)
        v = v.transpose(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
        return v.reshape(self.num_blocks, self.block_size)

    def from_stream(self, stream: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_stream`."""
        nd = len(self.shape)
        v = np.asarray(stream).reshape(tuple(self.grid) + tuple(self.block))
        inv = []
        for d in range(nd):
            inv += [d, nd + d]
        return v.transpose(inv).reshape(self.padded)


def block_layout(shape: tuple[int, ...], fmt: BFPFormat) -> BlockLayout:
    """The :class:`BlockLayout` of ``fmt`` on a tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    axes = []
    for a in fmt.block_axes:
        if not -nd <= a < nd:
            raise ValueError(
                f"block axis {a} of format {fmt.name or fmt.block_shape} does not exist in a "
                f"tensor of shape {shape}; accepted axes are [{-nd}, {nd - 1}]")
        axes.append(a % nd)
    if len(set(axes)) != len(axes):
        raise ValueError(f"block_axes={fmt.block_axes} name the same axis twice for ndim {nd}")
    block = [1] * nd
    for a, b in zip(axes, fmt.block_shape):
        block[a] = b
    padded = tuple(-(-s // b) * b for s, b in zip(shape, block))
    grid = tuple(p // b for p, b in zip(padded, block))
    return BlockLayout(shape, tuple(axes), tuple(block), padded, grid)


@dataclass(frozen=True, eq=False)
class BFPTensor:
    """A quantized tensor: integer mantissas and one shared exponent per block.

    Attributes
    ----------
    fmt : BFPFormat
    shape : tuple of int
        Shape of the original tensor.
    mantissas : ndarray of int8 or int16
        Signed mantissas, shape ``layout.padded`` (zero padding included).
    exponents : ndarray of int16
        Shared exponents ``E``, shape ``layout.grid`` (``emin`` for invalid blocks).
    invalid : ndarray of bool
        Blocks that held NaN or Inf, shape ``layout.grid``.
    """

    fmt: BFPFormat
    shape: tuple[int, ...]
    mantissas: np.ndarray
    exponents: np.ndarray
    invalid: np.ndarray

    @property
    def layout(self) -> BlockLayout:
        return block_layout(self.shape, self.fmt)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def exponent_codes(self) -> np.ndarray:
        """Biased exponent codes as stored in hardware (invalid blocks: all ones)."""
        codes = self.exponents.astype(np.int32) + self.fmt.exp_bias
        return np.where(self.invalid, self.fmt.exp_invalid_code, codes).astype(np.int32)

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """Blocks in stream order: ``(exponent_codes[nb], mantissas[nb, block_size])``."""
        lay = self.layout
        return (self.exponent_codes().reshape(-1),
                lay.to_stream(self.mantissas))

    @classmethod
    def from_stream(cls, fmt: BFPFormat, shape: tuple[int, ...], codes: np.ndarray,
                    mantissas: np.ndarray) -> "BFPTensor":
        """Build a tensor from blocks in stream order (inverse of :meth:`stream`)."""
        lay = block_layout(shape, fmt)
        codes = np.asarray(codes, dtype=np.int64).reshape(lay.grid)
        invalid = codes == fmt.exp_invalid_code
        exps = np.where(invalid, fmt.emin, codes - fmt.exp_bias).astype(np.int16)
        man = lay.from_stream(np.asarray(mantissas)).astype(_man_dtype(fmt))
        return cls(fmt, tuple(shape), man, exps, invalid)

    @property
    def T(self) -> "BFPTensor":
        """Transpose of a 2-D tensor, with no re-quantization (HyperBlock reuse)."""
        if self.ndim != 2:
            raise ValueError(f".T needs a 2-D tensor, this one has shape {self.shape}")
        lay = self.layout
        pairs = sorted((1 - a, b) for a, b in zip(lay.axes, self.fmt.block_shape))
        fmt = self.fmt.replace(block_axes=tuple(a for a, _ in pairs),
                               block_shape=tuple(b for _, b in pairs))
        return BFPTensor(fmt, self.shape[::-1], self.mantissas.T.copy(),
                         self.exponents.T.copy(), self.invalid.T.copy())

    def equal(self, other: "BFPTensor") -> bool:
        """Bit-for-bit equality of mantissas, exponents, flags and shape."""
        return (self.shape == other.shape
                and self.fmt.man_bits == other.fmt.man_bits
                and np.array_equal(self.mantissas, other.mantissas)
                and np.array_equal(self.exponents, other.exponents)
                and np.array_equal(self.invalid, other.invalid))

    def dequantize(self) -> np.ndarray:
        return dequantize(self)

    def __repr__(self) -> str:
        return (f"BFPTensor(shape={self.shape}, fmt={self.fmt.name or self.fmt.block_shape}, "
                f"blocks={self.exponents.shape}, invalid={int(self.invalid.sum())})")


def _man_dtype(fmt: BFPFormat) -> type:
    return np.int8 if fmt.man_bits <= 8 else np.int16


def _as_float32(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.float32:
        return a
    if a.dtype.kind == "f" or (a.dtype.kind in "iu"):
        with np.errstate(over="ignore"):
            return a.astype(np.float32)
    raise TypeError(
        f"quantize needs a real floating-point (or integer) array, got dtype {a.dtype}")


def _first_overflow(x_in, x32: np.ndarray):
    """``(index, value)`` of the first finite element of ``x_in`` that became +-Inf in
    its float32 cast ``x32`` (a float64 above FLT_MAX), or None."""
    a = np.asarray(x_in)
    if a.dtype == np.float32 or a.shape != x32.shape:
        return None
    if a.dtype.kind == "f":
        bad = np.isfinite(a) & np.isinf(x32)
    else:                       # integers: every value is finite
        bad = np.isinf(x32)
    if not bad.any():
        return None
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    return pos, a[pos].item()


def _pow2_f32(k: np.ndarray) -> np.ndarray:
    """Exact float32 powers of two for integer exponents in [-126, 127], from their bits."""
    return ((k.astype(np.int32) + 127) << 23).view(np.float32)


def _grid_view(g: np.ndarray) -> np.ndarray:
    """Reshape a block-grid array ``(g0, g1, ...)`` to ``(g0, 1, g1, 1, ...)`` so it
    broadcasts against the interleaved view of the same grid rows."""
    return g.reshape([s for d in g.shape for s in (d, 1)])


def _block_max(a: np.ndarray, baxes: tuple[int, ...]) -> np.ndarray:
    """Grid-shaped max over the block axes of an interleaved view ``(g0, b0, g1, b1, ...)``.

    Outer block axes are reduced first: an element-wise maximum of contiguous rows
    (vectorised) that also shrinks the data. The innermost block axis, a short
    contiguous run per block, goes through ``maximum.reduceat`` on the flat array
    (``max(axis=-1)`` would cost one inner-loop call per block).
    """
    inner = a.ndim - 1
    outer = tuple(ax for ax in baxes if ax != inner)
    if outer:
        a = a.max(axis=outer, keepdims=True)
    b = a.shape[-1]
    if b > 1:
        flat = np.ascontiguousarray(a).reshape(-1)
        a = np.maximum.reduceat(flat, np.arange(0, flat.size, b)).reshape(a.shape[:-1] + (1,))
    return a.reshape(a.shape[0::2])


def _chunks(lay: BlockLayout) -> list[tuple[int, int]]:
    """Ranges of grid rows (axis 0) of about :data:`_CHUNK_ELEMS` elements each."""
    g0 = lay.grid[0] if lay.grid else 1
    per_row = lay.block_size * (lay.num_blocks // max(g0, 1))
    rows = max(1, _CHUNK_ELEMS // max(per_row, 1))
    return [(r, min(g0, r + rows)) for r in range(0, g0, rows)]


def _run_chunks(fn, ranges: list[tuple[int, int]]) -> None:
    """Run ``fn(r0, r1)`` over chunk ranges, on two threads when there are several
    (NumPy releases the GIL inside its loops)."""
    if len(ranges) < 2 or _WORKERS < 2:
        for r in ranges:
            fn(*r)
        return
    with ThreadPoolExecutor(_WORKERS) as pool:
        for f in [pool.submit(fn, *r) for r in ranges]:
            f.result()


def check_exponent(exponent, fmt: BFPFormat, where: str = "") -> int:
    """``exponent`` as an int if it is a valid static shared exponent of ``fmt`` (an
    integer in ``[fmt.emin, fmt.emax]``), else ``ValueError`` naming the value and the
    range (``where`` says whose range, e.g. a device's format slot)."""
    if isinstance(exponent, bool) or not isinstance(exponent, (int, np.integer)):
        raise ValueError(f"exponent={exponent!r} is not an integer (got "
                         f"{type(exponent).__name__}); the shared exponent is an int in "
                         f"[{fmt.emin}, {fmt.emax}] (the exponent range of "
                         f"{where + ', ' if where else ''}{fmt.describe()})")
    if not fmt.emin <= exponent <= fmt.emax:
        raise ValueError(f"exponent={exponent!r} is out of range; accepted range is "
                         f"[{fmt.emin}, {fmt.emax}] (the exponent range of "
                         f"{where + ', ' if where else ''}{fmt.describe()})")
    return int(exponent)


def quantize(x, fmt: BFPFormat, *, nonfinite: str = "raise",
             name: str | None = None, exponent: int | None = None, **kw) -> BFPTensor:
    """Quantize a tensor to BFP (or to another scheme's format).

    A format that is not a :class:`BFPFormat` (LUQ, MLS, ``get_format("fp32")``, ...)
    quantizes through its own ``quantize_array(x, **kw)``; the keyword arguments are
    that format's (see its documentation). The rest of this description is BFP's.

    Parameters
    ----------
    x : array_like
        Real tensor of any rank; cast to float32 (the hardware input format).
    fmt : BFPFormat
        The format (block shape and axes, widths, rounding).
    nonfinite : {"raise", "flag"}
        ``"raise"`` (default): a block holding NaN or Inf raises
        :class:`NonFiniteBlockError` naming the first such block. ``"flag"``: such
        blocks are marked in ``BFPTensor.invalid`` (zero mantissas, reserved exponent
        code) and dequantize to NaN.
    name : str, optional
        Tensor name used in error messages.
    exponent : int, optional
        A *static* shared exponent ``E`` in ``[fmt.emin, fmt.emax]`` used by every valid
        block instead of the block maximum (rule 2): elements at or above
        ``2**(E+1)`` saturate to ``+-(2**(man_bits-1)-1)``, all-zero blocks keep ``E``.
        With one ``E`` for the whole tensor this is a per-tensor symmetric integer
        quantizer with the power-of-two scale ``2**(E - man_bits + 2)`` (the
        accelerator's QUANTIZE ``STATIC_EXP``; in-hindsight ranges choose ``E`` before
        the tensor exists). Invalid blocks are still found and flagged.

    Returns
    -------
    BFPTensor
    """
    if not isinstance(fmt, BFPFormat):
        return _scheme_quantize(x, fmt, nonfinite=nonfinite, name=name, exponent=exponent,
                                **kw)
    if kw:
        raise TypeError(f"unexpected keyword arguments for a BFP format: "
                        f"{', '.join(sorted(kw))}")
    if not isinstance(fmt, BFPFormat):
        raise TypeError(f"fmt must be a BFPFormat, got {type(fmt).__name__}")
    if nonfinite not in ("raise", "flag"):
        raise ValueError(f"nonfinite={nonfinite!r}; accepted values are 'raise', 'flag'")
    if exponent is not None:
        exponent = check_exponent(exponent, fmt)
    x_in = x
    x = x32 = _as_float32(x)
    lay = block_layout(x.shape, fmt)
    if lay.padded != x.shape:
        x = np.pad(x, [(0, p - s) for s, p in zip(x.shape, lay.padded)])
    xv_all = x.reshape(lay.interleaved)
    man = np.empty(lay.padded, dtype=_man_dtype(fmt))
    man_all = man.reshape(lay.interleaved)
    u_all = None
    if fmt.rounding == "stochastic":
        u = random_bits(fmt.seed, fmt.sr_lanes, lay.num_blocks * lay.block_size, fmt.sr_bits)
        u_all = lay.from_stream(u.reshape(lay.num_blocks, lay.block_size)).reshape(
            lay.interleaved)
    baxes = tuple(range(1, 2 * x.ndim, 2))
    exps_all = np.empty(lay.grid, np.int16)
    invalid_all = np.empty(lay.grid, bool)
    emin, emax, frac_bits, mmax = fmt.emin, fmt.emax, fmt.frac_bits, fmt.mmax
    # Subnormal inputs only matter (could round to a non-zero mantissa) in blocks with a
    # very small exponent; they are flushed explicitly only in chunks that have one.
    flush_below = -126 + fmt.man_bits + fmt.sr_bits

    # One pass per chunk of grid rows while the chunk is in cache: block maxima,
    # shared exponents and flags, then scale, round, saturate and store.
    def work(r0: int, r1: int) -> None:
        xv = xv_all[r0:r1]
        absbits = np.bitwise_and(xv.view(np.uint32), _ABS_MASK)
        amax = _block_max(absbits, baxes)
        inv = amax >= _INF_BITS
        field = (amax >> np.uint32(23)).astype(np.int32)
        if exponent is None:
            e = np.where(field == 0, emin, field - 127)
            np.clip(e, emin, emax, out=e)
        else:
            e = np.full(field.shape, exponent, np.int32)
        chunk_invalid = bool(inv.any())
        if chunk_invalid:
            e[inv] = emin
            xv = np.where(_grid_view(inv), np.float32(0), xv)
        exps_all[r0:r1] = e
        invalid_all[r0:r1] = inv
        if e.size and int(e.min()) < flush_below:
            xv = np.where(absbits < _MIN_NORMAL_BITS, np.float32(0), xv)
        # y = x * 2**k, k = frac_bits - E: exact power-of-two multiplies, each factor
        # inside float32's normal range.
        k = frac_bits - np.maximum(e, -150)
        k1 = np.clip(k, -126, 126)
        # a static exponent below the data overflows y to +-inf on purpose (saturated
        # below); errstate is per thread, so it is set here in the worker
        with np.errstate(over="ignore") if exponent is not None else nullcontext():
            y = np.multiply(xv, _grid_view(_pow2_f32(k1)))
            if np.any(k != k1):
                y *= _grid_view(_pow2_f32(k - k1))
        if exponent is not None:
            # elements above the static range saturate; bounding |y| first keeps every
            # rounding mode finite (no inf - inf) without changing any result
            lim = np.float32(2.0 ** fmt.man_bits)
            np.clip(y, -lim, lim, out=y)
        if fmt.rounding == "nearest_even":
            q = np.rint(y, out=y)
        elif fmt.rounding == "toward_zero":
            q = np.trunc(y, out=y)
        elif fmt.rounding == "nearest_away":
            t = np.trunc(y)
            y -= t
            np.abs(y, out=y)
            q = t + np.copysign((y >= 0.5).astype(np.float32), xv)
        else:  # stochastic: q = floor(|y| + u / 2**r), exact in int64
            r = fmt.sr_bits
            mag = np.minimum(np.abs(y).astype(np.float64), 2.0 ** fmt.man_bits)
            a = np.floor(np.ldexp(mag, r)).astype(np.int64)
            qm = (a + u_all[r0:r1]) >> r
            q = np.where(np.signbit(y), -qm, qm)
        np.clip(q, -mmax, mmax, out=q)
        man_all[r0:r1] = q

    if x.size:
        _run_chunks(work, _chunks(lay))
    any_invalid = bool(invalid_all.any())
    if nonfinite == "raise" and any_invalid:
        idx = tuple(int(i) for i in np.argwhere(invalid_all)[0])
        flat = int(np.ravel_multi_index(idx, lay.grid))
        span = ", ".join(f"{i * b}:{min((i + 1) * b, s)}"
                         for i, b, s in zip(idx, lay.block, lay.shape))
        what = f"tensor {name!r}" if name else "tensor"
        big = _first_overflow(x_in, x32)
        if big is not None:
            pos, v = big
            idx = tuple(p // b for p, b in zip(pos, lay.block))
            flat = int(np.ravel_multi_index(idx, lay.grid))
            raise NonFiniteBlockError(
                f"{what} holds {v!r} at index {pos}, outside the FP32 range "
                f"(|x| <= {float(np.finfo(np.float32).max):.8g}): it overflows to Inf when "
                f"cast to float32, the accelerator's input format (block {idx}, "
                f"block {flat} of {lay.num_blocks} in stream order); scale the tensor "
                f"into the FP32 range, or pass nonfinite='flag' to mark such blocks invalid",
                idx, flat, name)
        raise NonFiniteBlockError(
            f"{what} holds NaN or Inf in block {idx} (block {flat} of {lay.num_blocks} in "
            f"stream order; elements [{span}]); pass nonfinite='flag' to mark such blocks "
            f"invalid instead", idx, flat, name)
    return BFPTensor(fmt, tuple(lay.shape), man, exps_all, invalid_all)


def _scheme_quantize(x, fmt, *, nonfinite, name, exponent, **kw):
    fn = getattr(fmt, "quantize_array", None)
    if not callable(fn):
        raise TypeError(f"fmt must be a BFPFormat or a registered scheme format (with "
                        f"quantize_array), got {type(fmt).__name__} {fmt!r}")
    if exponent is not None:
        raise TypeError(f"exponent= is a BFP option; format {fmt.name!r} does not take it")
    if nonfinite != "raise":
        kw["nonfinite"] = nonfinite
    if name is not None:
        kw["name"] = name
    return fn(x, **kw)


def dequantize(q: BFPTensor) -> np.ndarray:
    """The float32 values of a :class:`BFPTensor` (or another scheme's quantized
    tensor, through its ``dequantize()``), in the original shape.

    Exact: every BFP value ``m * 2**(E - (man_bits-2))`` is representable in float32.
    Invalid blocks come back as NaN.
    """
    if not isinstance(q, BFPTensor):
        fn = getattr(q, "dequantize", None)
        if not callable(fn):
            raise TypeError(f"dequantize takes a quantized tensor, got {type(q).__name__}")
        return fn()
    lay = q.layout
    e = np.maximum(q.exponents.astype(np.int32) - q.fmt.frac_bits, -150)
    e1 = np.maximum(e, -126)
    scale = _pow2_f32(e1)
    if np.any(e != e1):
        scale = scale * _pow2_f32(e - e1)       # a subnormal power of two (2**-150 -> 0)
    scale = np.where(q.invalid, np.float32(np.nan), scale)
    scale_v = _grid_view(scale)
    out = np.empty(lay.padded, dtype=np.float32)
    out_v = out.reshape(lay.interleaved)
    man_v = q.mantissas.reshape(lay.interleaved)

    def work(r0: int, r1: int) -> None:
        o = out_v[r0:r1]
        np.copyto(o, man_v[r0:r1])              # integer -> float32, exact
        np.multiply(o, scale_v[r0:r1], out=o)

    _run_chunks(work, _chunks(lay))
    if lay.padded != lay.shape:
        out = out[tuple(slice(0, s) for s in lay.shape)]
    return out
