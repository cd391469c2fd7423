"""PrecisionBatching bit-layer GEMMs: the golden model of the bit-serial engine.

A weight matrix is stored as *bit-layers*: its signed integers (two's complement,
``bits`` wide) split into 1-bit planes, plane ``i`` holding bit ``i`` (LSB first). The
top plane ``bits - 1`` is the sign plane and weighs ``-2**(bits-1)``; every other plane
weighs ``+2**i``. Activations stay wide, as signed fixed point. A GEMM is the shifted
sum of 1-bit-weight GEMMs, and the number of planes summed (*layers*, counted from the
sign plane down) is a run-time knob trading accuracy for time::

    matmul(x, planes, layers) = sum_{i = bits-layers}^{bits-1} c_i * 2**i * (x @ plane_i.T)
    c_{bits-1} = -1, c_i = +1 otherwise

With every layer the result is ``x @ W.T`` exactly. With ``layers = L < bits`` it is
``x @ (2**d * floor(W / 2**d)).T`` with ``d = bits - L``: the dropped low planes
truncate every weight toward minus infinity (a bias of ``-(2**d - 1) / 2`` LSB on
average). ``matmul(..., round_dropped=True)`` adds ``2**(d-1) * sum(x)`` per output,
i.e. uses the midpoint ``2**d * floor(W / 2**d) + 2**(d-1)`` of each truncated weight's
interval; it is off by default (the engine computes the plain sum).

Real values
-----------
* **Weights** (:func:`quantize_weights`): per output row (``scale="row"``, default) or
  per tensor (``scale="tensor"``) ``s = max|w| / (2**(bits-1) - 1)`` and
  ``w_int = clip(round_half_even(w / s), -2**(bits-1), 2**(bits-1) - 1)``, so
  ``w ~ w_int * s[:, None]``. An all-zero row gets ``s = 1``.
* **Activations** (:func:`to_fixed`): signed fixed point of ``act_bits`` bits with
  ``frac`` fraction bits, ``x_int = clip(round_half_even(x * 2**frac),
  -2**(act_bits-1), 2**(act_bits-1) - 1)``, so ``x ~ x_int * 2**-frac``.
  :func:`fixed_frac` picks the largest ``frac`` whose range holds a calibration maximum.
* A layer's real output is then ``matmul(x_int, planes, L) * s[None, :] * 2**-frac``
  (:func:`linear`).

:class:`BitLayerFormat` wraps the weight side as a registered format (``PB-W8``:
8-bit planes, every layer), for :func:`hbfp_hw.quantize` / fake quantization.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["BITS_RANGE", "ACT_BITS_RANGE", "decompose", "recompose", "matmul",
           "matmul_reference", "quantize_weights", "fixed_frac", "to_fixed", "linear",
           "truncate_weights", "BitLayerTensor", "BitLayerFormat", "PB_W8"]

#: Accepted weight widths (bit-layers per weight), sign plane included.
BITS_RANGE = (1, 16)
#: Accepted activation widths.
ACT_BITS_RANGE = (2, 32)


def _check_bits(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name}={v!r}; accepted range is integers in [{lo}, {hi}]")
    return int(v)


def _int_array(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            return a.astype(np.int64)
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _check_range(name: str, a: np.ndarray, bits: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if a.size and (a.min() < lo or a.max() > hi):
        bad = a[(a < lo) | (a > hi)].flat[0]
        raise ValueError(f"{name} value {int(bad)} is outside the {bits}-bit range "
                         f"[{lo}, {hi}]")


def decompose(w_int, bits: int) -> np.ndarray:
    """Split integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` into bit-planes.

    Returns a ``uint8`` array of shape ``(bits, *w_int.shape)``: plane ``i`` holds bit
    ``i`` of the two's-complement code (LSB first); plane ``bits - 1`` is the sign plane.
    """
    bits = _check_bits("bits", bits, *BITS_RANGE)
    w = _int_array("w_int", w_int)
    _check_range("w_int", w, bits)
    code = w & ((1 << bits) - 1)
    return np.stack([((code >> i) & 1).astype(np.uint8) for i in range(bits)])


def _check_planes(planes) -> np.ndarray:
    p = np.asarray(planes)
    if p.ndim < 1 or p.shape[0] < 1:
        raise ValueError(f"planes must have shape (bits, ...), got {p.shape}")
    _check_bits("bits (planes.shape[0])", p.shape[0], *BITS_RANGE)
    if p.dtype.kind not in "iub" or (p.size and (p.min() < 0 or p.max() > 1)):
        raise ValueError("planes must hold only 0 and 1")
    return p.astype(np.int64)


def _check_layers(layers, bits: int) -> int:
    return bits if layers is None else _check_bits("layers", layers, 1, bits)


def recompose(planes, layers: int | None = None) -> np.ndarray:
    """The integers the top ``layers`` planes stand for: ``sum c_i 2**i plane_i``
    (with every layer, the inverse of :func:`decompose`)."""
    p = _check_planes(planes)
    bits = p.shape[0]
    layers = _check_layers(layers, bits)
    out = np.zeros(p.shape[1:], dtype=np.int64)
    for i in range(bits - layers, bits):
        out += (-1 if i == bits - 1 else 1) * (p[i] << i)
    return out


def truncate_weights(w_int, bits: int, layers: int | None = None, *,
                     round_dropped: bool = False) -> np.ndarray:
    """The weights a ``layers``-layer GEMM uses: ``2**d * floor(w / 2**d)`` with
    ``d = bits - layers`` (plus ``2**(d-1)`` with ``round_dropped`` and ``d > 0``)."""
    bits = _check_bits("bits", bits, *BITS_RANGE)
    layers = _check_layers(layers, bits)
    w = _int_array("w_int", w_int)
    _check_range("w_int", w, bits)
    d = bits - layers
    t = (w >> d) << d
    if round_dropped and d > 0:
        t = t + (1 << (d - 1))
    return t


def matmul(x_int, planes, layers: int | None = None, *,
           round_dropped: bool = False) -> np.ndarray:
    """Exact bit-layer GEMM ``x @ W.T`` over the top ``layers`` planes.

    ``x_int``: integer activations ``(batch, in)``; ``planes``: :func:`decompose` of W
    ``(out, in)``, shape ``(bits, out, in)``. Returns int64 ``(batch, out)``:
    ``sum_{i=bits-layers}^{bits-1} c_i 2**i (x @ plane_i.T)``, ``c_{bits-1} = -1``,
    ``c_i = 1`` otherwise. ``layers=None`` sums every plane (exactly ``x @ W.T``).
    ``round_dropped=True`` (off by default) adds ``2**(d-1) * x.sum(1)`` per output when
    ``d = bits - layers > 0`` (the midpoint of the dropped planes' range).
    """
    p = _check_planes(planes)
    if p.ndim != 3:
        raise ValueError(f"planes must have shape (bits, out, in), got {p.shape}")
    x = _int_array("x_int", x_int)
    if x.ndim != 2 or x.shape[1] != p.shape[2]:
        raise ValueError(f"x_int must have shape (batch, {p.shape[2]}), got {x.shape}")
    if x.size and np.abs(x).max() >= 2**40:
        raise ValueError(f"x_int magnitude {int(np.abs(x).max())} exceeds 2**40 (int64 "
                         "accumulation could overflow)")
    bits = p.shape[0]
    layers = _check_layers(layers, bits)
    y = np.zeros((x.shape[0], p.shape[1]), dtype=np.int64)
    for i in range(bits - layers, bits):
        part = x @ p[i].T                       # 1-bit-weight GEMM, exact int64
        y += (-part if i == bits - 1 else part) << i
    d = bits - layers
    if round_dropped and d > 0:
        y += x.sum(axis=1, keepdims=True) << (d - 1)
    return y


def matmul_reference(x_int, w_int, bits: int, layers: int | None = None, *,
                     round_dropped: bool = False) -> np.ndarray:
    """Independent reference: Python integers, truncated weights, scalar loops."""
    t = truncate_weights(w_int, bits, layers, round_dropped=round_dropped)
    x = _int_array("x_int", x_int)
    out = np.zeros((x.shape[0], t.shape[0]), dtype=object)
    for b in range(x.shape[0]):
        for o in range(t.shape[0]):
            out[b, o] = sum(int(x[b, k]) * int(t[o, k]) for k in range(x.shape[1]))
    return out


def quantize_weights(w, bits: int, scale: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """Real weights ``(out, in)`` -> ``(w_int, s)`` with ``w ~ w_int * s[:, None]``.

    ``scale="row"``: one scale per output row; ``"tensor"``: one for the matrix
    (``s`` still has one entry per row). ``s = max|w| / (2**(bits-1) - 1)`` (1 for an
    all-zero row), round half to even, clipped to the ``bits``-bit range.
    """
    bits = _check_bits("bits", bits, 2, BITS_RANGE[1])
    if scale not in ("row", "tensor"):
        raise ValueError(f"scale={scale!r}; accepted values are 'row', 'tensor'")
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"w must have shape (out, in), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w holds NaN or Inf")
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w).max(axis=1) if scale == "row" else np.full(w.shape[0], np.abs(w).max())
    s = np.where(amax > 0, amax / qmax, 1.0)
    w_int = np.clip(np.rint(w / s[:, None]), -qmax - 1, qmax).astype(np.int64)
    return w_int, s


def fixed_frac(amax: float, act_bits: int) -> int:
    """Largest fraction-bit count ``frac`` with ``amax * 2**frac <= 2**(act_bits-1) - 1``
    (the fixed-point scale of activations whose magnitude reaches ``amax``)."""
    act_bits = _check_bits("act_bits", act_bits, *ACT_BITS_RANGE)
    amax = float(amax)
    if not np.isfinite(amax) or amax < 0:
        raise ValueError(f"amax={amax!r}; accepted values are finite and >= 0")
    if amax == 0:
        return act_bits - 1
    return int(np.floor(np.log2(((1 << (act_bits - 1)) - 1) / amax)))


def to_fixed(x, act_bits: int, frac: int) -> np.ndarray:
    """Real activations -> signed ``act_bits``-bit fixed point with ``frac`` fraction
    bits (round half to even, saturating): ``x ~ x_int * 2**-frac``."""
    act_bits = _check_bits("act_bits", act_bits, *ACT_BITS_RANGE)
    if isinstance(frac, bool) or not isinstance(frac, (int, np.integer)) \
            or not -64 <= frac <= 64:
        raise ValueError(f"frac={frac!r}; accepted range is integers in [-64, 64]")
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or Inf")
    lim = 1 << (act_bits - 1)
    return np.clip(np.rint(np.ldexp(x, int(frac))), -lim, lim - 1).astype(np.int64)


def linear(x, planes, w_scale, act_bits: int, frac: int, layers: int | None = None,
           bias=None, *, round_dropped: bool = False) -> np.ndarray:
    """Real-valued bit-layer linear layer: ``to_fixed`` -> :func:`matmul` -> rescale
    (float64 ``(batch, out)``; ``+ bias`` if given)."""
    x_int = to_fixed(x, act_bits, frac)
    y = matmul(x_int, planes, layers, round_dropped=round_dropped).astype(np.float64)
    y = y * np.asarray(w_scale, dtype=np.float64)[None, :] * 2.0 ** -int(frac)
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)[None, :]


@dataclass(frozen=True)
class BitLayerTensor:
    """Weights quantized by a :class:`BitLayerFormat`: planes, scales, layers used."""

    planes: np.ndarray
    scale: np.ndarray
    layers: int
    round_dropped: bool = False
    orig_shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.orig_shape or tuple(self.planes.shape[1:])

    def int_weights(self) -> np.ndarray:
        """The integer weights the ``layers``-layer GEMM uses."""
        w = recompose(self.planes, self.layers)
        d = self.planes.shape[0] - self.layers
        if self.round_dropped and d > 0:
            w = w + (1 << (d - 1))
        return w

    def dequantize(self) -> np.ndarray:
        w = (self.int_weights() * self.scale[:, None]).astype(np.float32)
        return w.reshape(self.shape)


@dataclass(frozen=True)
class BitLayerFormat:
    """Weights as ``bits`` bit-layers with a per-row (or per-tensor) scale, of which the
    top ``layers`` (None: all) are used. ``quantize_array(w)`` takes a 2-D ``(out, in)``
    weight matrix (higher ranks are flattened to ``(shape[0], -1)``)."""

    bits: int = 8
    layers: int | None = None
    scale: str = "row"
    round_dropped: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits, 2, BITS_RANGE[1])
        if self.layers is not None:
            _check_bits("layers", self.layers, 1, self.bits)
        if self.scale not in ("row", "tensor"):
            raise ValueError(f"scale={self.scale!r}; accepted values are 'row', 'tensor'")

    def replace(self, **changes: object) -> "BitLayerFormat":
        return dataclasses.replace(self, **changes)

    def quantize_array(self, x, **kw) -> BitLayerTensor:
        if kw:
            raise TypeError(f"{self.name or 'BitLayerFormat'} takes no quantize options, "
                            f"got {', '.join(sorted(kw))}")
        x = np.asarray(x, dtype=np.float64)
        shape = x.shape
        w_int, s = quantize_weights(x.reshape(shape[0], -1), self.bits, self.scale)
        return BitLayerTensor(decompose(w_int, self.bits), s, self.layers or self.bits,
                              self.round_dropped, tuple(shape))

    def describe(self) -> str:
        lay = "all" if self.layers is None else str(self.layers)
        return (f"bit-layer weights: {self.bits} planes ({lay} used), per-{self.scale} "
                "scale")


#: 8-bit weights as 8 bit-layers, per-row scale, every layer used.
PB_W8 = BitLayerFormat(bits=8, name="PB-W8")


def _register() -> None:
    from .formats import register_format
    try:
        register_format(PB_W8)
    except ValueError:  # pragma: no cover - re-import with another object
        pass


_register()
