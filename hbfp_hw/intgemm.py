"""Golden uniform-integer GEMM: integer codes in, int64 accumulators, one FP32 scaling step.

Quantizer (:class:`IntFormat`, :func:`quantize_int`)
----------------------------------------------------
A ``bits``-bit code ``q`` in ``[0, L]``, ``L = 2**bits - 1``, a float32 scale ``s > 0``
(one per tensor, or one per channel along ``axis``) and a zero point ``z`` that is an
integer or, for the symmetric grid, the half-integer ``L / 2``::

    q     = clip(rint(x / s + z), 0, L)       (x / s + z in float64, rint = half to even)
    x_hat = s * (q - z)

Three grids, set by ``kind`` and a clipping value ``alpha > 0`` (or a range):

* ``"unsigned"`` (post-ReLU activations): ``s = fp32(alpha / L)``, ``z = 0``: the grid
  ``k * alpha / L``, ``k = 0 .. L`` (negative inputs clip to 0);
* ``"symmetric"`` (weights): ``s = fp32(2 * alpha / L)``, ``z = L / 2``: the grid
  ``-alpha + k * 2 * alpha / L``, ``2**bits`` levels symmetric about 0, no exact zero;
* ``"asymmetric"`` over ``[lo, hi]`` (``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``):
  ``s = fp32((hi' - lo') / L)``, ``z = clip(rint(-lo' / s), 0, L)`` (integer, so 0 is
  exact).

``fp32(v)`` rounds the float64 value ``v`` to float32 (nearest even). A zero range
(``alpha == 0`` or ``hi' == lo'``) uses ``s = 1``.

GEMM operands
-------------
The GEMM never sees ``q`` itself but the signed integer ``c`` and its unit ``u``
(:meth:`IntTensor.operand`)::

    c = q - z,       u = s       (integer zero point)
    c = 2q - L,      u = s / 2   (symmetric grid, z = L / 2)

so ``x_hat = u * c`` exactly and ``|c| <= L``: every operand fits a signed
``bits + 1``-bit slot. ``u * c`` is exact in float64 (a 24-bit by 17-bit product).

GEMM (:func:`int_linear`, :func:`int_conv2d`)
---------------------------------------------
For activations ``a`` (per-tensor unit ``ua``) and weights ``w`` (``(N, K)``, unit
``uw[n]`` per output channel)::

    acc[m, n] = sum_k ca[m, k] * cw[n, k]            exact, int64
    S[n]      = fp32(ua * uw[n])                     one FP32 scale per output channel
    y[m, n]   = fp32(acc[m, n] * S[n])               one rounding, nearest even

where ``acc * S`` is the exact real product (no intermediate rounding). If the exact
``|acc * S|`` is below ``2**-126`` the output is ``+0.0`` (flush to zero, no subnormal
outputs); a rounded magnitude of ``2**128`` or more is ``+-Inf``. The accumulator needs
:func:`int_accumulator_bits` bits (sign included); the model supports up to 53.
Convolutions are im2col GEMMs: the padding positions contribute the operand ``c = 0``
(the value 0 exactly, whatever the zero point).

Error bound against the float64 product ``y64`` of the dequantized operands
(:func:`int_matmul_error_bound`)::

    |y - y64| <= 2**-22 * |y64| + K * 2**-51 * (|a_hat| @ |w_hat|^T) + 2**-126

(``S`` and the final rounding each cost at most ``2**-24`` relative; the rest covers
float64 summation of the reference itself.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["INT_KINDS", "IntFormat", "IntTensor", "INT8", "UINT8", "INT4", "UINT4",
           "INT_FORMATS", "int_params", "quantize_int", "int_accumulator_bits",
           "int_linear", "int_conv2d", "int_matmul_reference", "int_matmul_error_bound",
           "scale_to_fp32", "round_fp32_exact", "int_gemm_codes", "im2col"]

INT_KINDS = ("unsigned", "symmetric", "asymmetric")
BITS_RANGE = (2, 16)
MAX_ACC_BITS = 53           # the golden model accumulates exactly in float64 / int64
_FAST_ACC = 1 << 29         # |acc| < 2**29: acc * S (24-bit significand) exact in float64
_FTZ = 2.0**-126


def _check_bits(name: str, v) -> None:
    lo, hi = BITS_RANGE
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name}={v!r} is out of range; accepted range is [{lo}, {hi}]")


@dataclass(frozen=True)
class IntFormat:
    """An immutable, validated uniform integer format.

    Parameters
    ----------
    bits
        Code width in ``[2, 16]`` (``2**bits`` levels).
    kind
        ``"unsigned"``, ``"symmetric"`` or ``"asymmetric"`` (see the module docstring).
    axis
        ``None`` for one scale per tensor, or the channel axis of per-channel scales
        (weights: 0, the output channel).
    name
        Optional label.

    Without an explicit clipping value the range is the tensor's own: ``alpha = max|x|``
    (``max(x, 0)`` for unsigned) per tensor or per channel, ``[min x, max x]`` for
    asymmetric.
    """

    bits: int = 8
    kind: str = "asymmetric"
    axis: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        if self.kind not in INT_KINDS:
            raise ValueError(f"kind={self.kind!r} is not supported; accepted values are "
                             f"{', '.join(INT_KINDS)}")
        if self.axis is not None and (isinstance(self.axis, bool)
                                      or not isinstance(self.axis, int)
                                      or not -32 <= self.axis <= 31):
            raise ValueError(f"axis={self.axis!r} is out of range; accepted values are None "
                             f"or an integer in [-32, 31]")

    @property
    def levels(self) -> int:
        """``L = 2**bits - 1``, the largest code."""
        return 2**self.bits - 1

    def replace(self, **changes: object) -> "IntFormat":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        label = f"{self.name}: " if self.name else ""
        gran = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return f"{label}{self.bits}-bit uniform integer, {self.kind} grid, scale {gran}"

    def quantize_array(self, x, *, alpha=None, lo=None, hi=None, name=None,
                       nonfinite: str = "raise") -> "IntTensor":
        """``hbfp_hw.quantize(x, fmt)`` hook: :func:`quantize_int` with this format."""
        if nonfinite != "raise":
            raise ValueError(f"nonfinite={nonfinite!r} is not supported by integer formats; "
                             f"accepted value is 'raise'")
        return quantize_int(x, self, alpha=alpha, lo=lo, hi=hi)


#: Presets (max-abs / min-max ranges unless a clipping value is given).
INT8 = IntFormat(8, "asymmetric", None, "INT8-ASYM")
UINT8 = IntFormat(8, "unsigned", None, "UINT8")
INT4 = IntFormat(4, "symmetric", None, "INT4-SYM")
UINT4 = IntFormat(4, "unsigned", None, "UINT4")
INT_FORMATS = {f.name.lower(): f for f in (INT8, UINT8, INT4, UINT4)}


def int_params(fmt: IntFormat, *, alpha=None, lo=None, hi=None) -> tuple[np.ndarray, int]:
    """Scale (float32, scalar or per channel) and twice the zero point, ``z2 = 2 z``.

    ``alpha`` (unsigned / symmetric) or ``lo``, ``hi`` (asymmetric) may be scalars or
    per-channel arrays.
    """
    L = fmt.levels
    if fmt.kind == "asymmetric":
        if lo is None or hi is None:
            raise ValueError("an asymmetric grid needs lo= and hi=")
        lo64 = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
        hi64 = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
        if not (np.all(np.isfinite(lo64)) and np.all(np.isfinite(hi64))):
            raise ValueError(f"range [{lo}, {hi}] is not finite")
        if np.any(lo64 > hi64):
            raise ValueError(f"range [{lo}, {hi}] is empty (lo > hi)")
        span = hi64 - lo64
        s = np.where(span > 0, span / L, 1.0).astype(np.float32)
        z = np.clip(np.rint(-lo64 / s.astype(np.float64)), 0, L).astype(np.int64)
        if z.ndim and np.any(z != z.flat[0]):
            raise ValueError("per-channel asymmetric ranges must share one zero point; "
                             "use one range per tensor")
        return s, 2 * int(z.flat[0]) if z.ndim else 2 * int(z)
    if alpha is None:
        raise ValueError(f"a {fmt.kind} grid needs alpha=")
    a64 = np.asarray(alpha, dtype=np.float64)
    if not np.all(np.isfinite(a64)) or np.any(a64 < 0):
        raise ValueError(f"alpha={alpha!r} is out of range; accepted range is [0, inf) "
                         f"(finite)")
    if fmt.kind == "unsigned":
        return np.where(a64 > 0, a64 / L, 1.0).astype(np.float32), 0
    return np.where(a64 > 0, 2.0 * a64 / L, 1.0).astype(np.float32), L


@dataclass(frozen=True, eq=False)
class IntTensor:
    """Codes ``q`` (uint16), float32 ``scale`` (scalar or per channel along ``axis``),
    ``z2 = 2 z`` and the format. Value ``scale * (q - z2 / 2)``."""

    q: np.ndarray
    scale: np.ndarray
    z2: int
    fmt: IntFormat

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def _bcast(self, v: np.ndarray) -> np.ndarray:
        if np.ndim(v) == 0 or self.fmt.axis is None:
            return np.asarray(v).reshape(())
        shape = [1] * self.q.ndim
        shape[self.fmt.axis] = -1
        return np.asarray(v).reshape(shape)

    def operand(self) -> tuple[np.ndarray, np.ndarray]:
        """The GEMM operand ``c`` (int64, ``|c| <= L``) and its float32 unit ``u``
        (scalar or per channel, unbroadcast) with ``value = u * c`` exactly."""
        q = self.q.astype(np.int64)
        if self.z2 % 2:
            return 2 * q - self.z2, (self.scale.astype(np.float64) / 2).astype(np.float32)
        return q - self.z2 // 2, self.scale

    def dequantize64(self) -> np.ndarray:
        """Exact values as float64."""
        c, u = self.operand()
        return c.astype(np.float64) * self._bcast(u).astype(np.float64)

    def dequantize(self) -> np.ndarray:
        """Values as float32 (``u * c`` rounded to nearest even)."""
        return self.dequantize64().astype(np.float32)

    def equal(self, other: "IntTensor") -> bool:
        return (self.fmt == other.fmt and self.z2 == other.z2
                and np.array_equal(self.q, other.q) and np.array_equal(self.scale, other.scale))

    def __repr__(self) -> str:
        return (f"IntTensor(shape={self.shape}, {self.fmt.describe()}, z={self.z2 / 2:g}, "
                f"scale={np.asarray(self.scale).ravel()[:4]}...)")


def _channel_reduce(x: np.ndarray, axis: int | None, fn) -> np.ndarray:
    if axis is None:
        return np.asarray(fn(x)) if x.size else np.asarray(0.0)
    ax = axis % x.ndim
    others = tuple(i for i in range(x.ndim) if i != ax)
    if x.size == 0:
        return np.zeros(x.shape[ax])
    return fn(x, axis=others)


def quantize_int(x, fmt: IntFormat, *, alpha=None, lo=None, hi=None) -> IntTensor:
    """Quantize ``x`` (any shape; float) with ``fmt``; see the module docstring.

    ``alpha`` / ``lo``, ``hi`` default to the tensor's own range (per channel when
    ``fmt.axis`` is set). Non-finite inputs raise ``ValueError``.
    """
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"fmt must be an IntFormat, got {type(fmt).__name__}")
    x64 = np.asarray(x, dtype=np.float64)
    if fmt.axis is not None and not -x64.ndim <= fmt.axis < x64.ndim:
        raise ValueError(f"axis={fmt.axis} is out of range for a {x64.ndim}-D tensor; "
                         f"accepted range is [{-x64.ndim}, {x64.ndim - 1}]")
    if not np.all(np.isfinite(x64)):
        raise ValueError("quantize_int: the input holds NaN or Inf")
    if fmt.kind == "asymmetric":
        if lo is None:
            lo = _channel_reduce(x64, fmt.axis, np.min)
        if hi is None:
            hi = _channel_reduce(x64, fmt.axis, np.max)
        s, z2 = int_params(fmt, lo=lo, hi=hi)
    else:
        if alpha is None:
            ax = x64 if fmt.kind == "symmetric" else np.maximum(x64, 0.0)
            alpha = _channel_reduce(np.abs(ax), fmt.axis, np.max)
        s, z2 = int_params(fmt, alpha=alpha)
    if fmt.axis is not None:
        n = x64.shape[fmt.axis]
        if s.size == 1:
            s = np.full(n, s.ravel()[0], np.float32)
        elif s.shape != (n,):
            raise ValueError(f"per-channel clipping values have shape {s.shape}, expected "
                             f"({n},) for axis {fmt.axis} of a tensor of shape {x64.shape}")
    elif s.ndim and s.size != 1:
        raise ValueError(f"a per-tensor format takes one clipping value, got shape {s.shape}")
    s = s if fmt.axis is not None else s.reshape(())
    sb = s.astype(np.float64)
    if fmt.axis is not None:
        shape = [1] * x64.ndim
        shape[fmt.axis] = -1
        sb = sb.reshape(shape)
    q = np.clip(np.rint(x64 / sb + z2 / 2), 0, fmt.levels).astype(np.uint16)
    return IntTensor(q, s, z2, fmt)


def int_accumulator_bits(bits_a: int, bits_w: int, k: int) -> int:
    """Width (sign included) of an accumulator that cannot overflow for ``K = k``:
    ``|acc| <= k * (2**bits_a - 1) * (2**bits_w - 1)``."""
    _check_bits("bits_a", bits_a)
    _check_bits("bits_w", bits_w)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 2**24:
        raise ValueError(f"k={k!r} is out of range; accepted range is [1, {2**24}]")
    return (int(k) * (2**bits_a - 1) * (2**bits_w - 1)).bit_length() + 1


def scale_to_fp32(ua, uw) -> np.ndarray:
    """``S = fp32(ua * uw)``: the per-channel output scale (float32); ``ValueError`` if
    it is not a finite float32."""
    with np.errstate(over="ignore"):
        S = (np.float64(np.float32(ua)) * np.asarray(uw, np.float32).astype(np.float64)
             ).astype(np.float32)
    if not np.all(np.isfinite(S)):
        raise ValueError(f"output scale ua * uw = {float(ua)!r} * {np.max(uw)!r} overflows "
                         f"float32; accepted range of the product is below 2**128")
    return S


def _round_fp32_big(acc: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Exact ``fp32(acc * S)`` (with flush to zero) through Python integers."""
    out = np.empty(acc.shape, np.float32)
    Sb = np.broadcast_to(S, acc.shape)
    for idx in np.ndindex(acc.shape):
        out[idx] = round_fp32_exact(Fraction(int(acc[idx])) * Fraction(float(Sb[idx])))
    return out


def round_fp32_exact(v: Fraction) -> np.float32:
    """Round an exact rational to float32: flush ``|v| < 2**-126`` to +0, nearest even,
    ``+-Inf`` at ``2**128``. (Scalar; the reference rule of the GEMM output.)"""
    if v == 0 or abs(v) < Fraction(1, 2**126):
        return np.float32(0.0)
    sign = -1 if v < 0 else 1
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    # 2**e <= a < 2**(e+1); keep 24 significant bits
    m = a / Fraction(2) ** (e - 23)
    mi = m.numerator // m.denominator
    r = m - mi
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and mi % 2):
        mi += 1
    with np.errstate(over="ignore"):
        val = math.ldexp(mi, e - 23)
        return np.float32(sign * val) if val < 2.0**128 else np.float32(sign * np.inf)


def _epilogue(acc: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``y = fp32(acc * S)`` per the module rule; ``S`` broadcasts along the last axis."""
    if acc.size == 0 or int(np.abs(acc).max()) < _FAST_ACC:
        with np.errstate(over="ignore"):
            v = acc.astype(np.float64) * S.astype(np.float64)       # exact
            return np.where(np.abs(v) < _FTZ, 0.0, v).astype(np.float32)
    return _round_fp32_big(acc, S)


def _check_pair(a, w, fn: str) -> None:
    for arg, v in (("a", a), ("w", w)):
        if not isinstance(v, IntTensor):
            raise TypeError(f"{fn}: argument {arg!r} is a {type(v).__name__}, not an "
                            f"IntTensor; quantize it first with quantize_int")
    if a.fmt.axis is not None:
        raise ValueError(f"{fn}: activations need one scale per tensor (axis=None), got "
                         f"axis={a.fmt.axis}")
    if w.fmt.axis not in (None, 0):
        raise ValueError(f"{fn}: weights need per-tensor or per-output-channel (axis=0) "
                         f"scales, got axis={w.fmt.axis}")


def _acc_exact(ca: np.ndarray, cw: np.ndarray, bits_a: int, bits_w: int) -> np.ndarray:
    """``ca (M, K) @ cw (N, K)^T`` exactly (float64 BLAS of integers below 2**53)."""
    K = ca.shape[1]
    width = int_accumulator_bits(bits_a, bits_w, max(K, 1))
    if width > MAX_ACC_BITS:
        raise ValueError(f"accumulator of {width} bits (bits {bits_a}x{bits_w}, K={K}) "
                         f"exceeds the supported {MAX_ACC_BITS} bits; reduce K or the bits")
    return (ca.astype(np.float64) @ cw.astype(np.float64).T).astype(np.int64)


def _golden_acc(ca: np.ndarray, w: "IntTensor", bits_a: int) -> np.ndarray:
    return _acc_exact(ca, w.operand()[0], bits_a, w.fmt.bits)


def _linear(a: IntTensor, w: IntTensor, acc_fn, return_acc: bool):
    """:func:`int_linear` with the integer sums from ``acc_fn(ca, w, bits_a)`` (the
    golden model's or a device's, :mod:`hbfp_hw.host.int_gemm`)."""
    _check_pair(a, w, "int_linear")
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"int_linear needs a (M, K) and w (N, K), got {a.shape} and "
                         f"{w.shape}")
    ca, ua = a.operand()
    _, uw = w.operand()
    acc = acc_fn(ca, w, a.fmt.bits)
    S = np.broadcast_to(scale_to_fp32(ua, uw), (w.shape[0],))
    y = _epilogue(acc, S)
    return (y, acc, S) if return_acc else y


def int_linear(a: IntTensor, w: IntTensor, *, return_acc: bool = False):
    """Golden integer GEMM ``y = a_hat @ w_hat^T``: ``a (M, K)`` per-tensor,
    ``w (N, K)`` per-tensor or per output channel. float32 ``(M, N)`` (and
    ``(acc, S)`` if ``return_acc``)."""
    return _linear(a, w, _golden_acc, return_acc)


def int_gemm_codes(qa, z2a: int, qw, z2w: int, S, *, return_acc: bool = False):
    """The integer GEMM from raw codes, as an accelerator's integer mode receives them:
    ``qa (M, K)`` and ``qw (N, K)`` unsigned codes, twice their zero points ``z2a``,
    ``z2w`` and the float32 output scales ``S`` (scalar or ``(N,)``, e.g. from
    :func:`int_linear` with ``return_acc=True``). Operands ``c = q - z2/2`` for an even
    ``z2``, ``2q - z2`` for an odd one (see the module docstring); then the same
    accumulation and output step as :func:`int_linear`."""
    ops = []
    for nm, q, z2 in (("qa", qa, z2a), ("qw", qw, z2w)):
        q = np.asarray(q)
        if q.ndim != 2 or not np.issubdtype(q.dtype, np.integer) or (q.size and q.min() < 0):
            raise ValueError(f"{nm} must be a 2-D array of non-negative integer codes, got "
                             f"{q.dtype} {q.shape}")
        if isinstance(z2, bool) or not isinstance(z2, (int, np.integer)) or z2 < 0:
            raise ValueError(f"the doubled zero point of {nm} is {z2!r}; accepted values are "
                             f"integers >= 0")
        q = q.astype(np.int64)
        ops.append(2 * q - int(z2) if z2 % 2 else q - int(z2) // 2)
    ca, cw = ops
    if ca.shape[1] != cw.shape[1]:
        raise ValueError(f"qa is {ca.shape} and qw is {cw.shape}: K differs")
    bits = max(1, int(max(np.abs(ca).max(initial=0), np.abs(cw).max(initial=0))).bit_length())
    bits = min(max(bits, 2), 16)
    acc = _acc_exact(ca, cw, bits, bits)
    S = np.broadcast_to(np.asarray(S, np.float32), (cw.shape[0],))
    y = _epilogue(acc, S)
    return (y, acc) if return_acc else y


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2 or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                          for i in t):
        raise ValueError(f"{name}={v!r} must be an int or a pair of ints")
    return int(t[0]), int(t[1])


def im2col(c: np.ndarray, kh: int, kw: int, stride=1, padding=0) -> tuple[np.ndarray, tuple]:
    """``(N, C, H, W)`` -> rows ``(N*Ho*Wo, C*kh*kw)`` (zero padding), and ``(N, Ho, Wo)``."""
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"stride={stride!r} must be >= 1 and padding={padding!r} >= 0")
    N, C, H, W = c.shape
    cp = np.pad(c, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"kernel {kh}x{kw} is larger than the padded input {cp.shape[2:]}")
    win = np.lib.stride_tricks.sliding_window_view(cp, (kh, kw), axis=(2, 3))
    win = win[:, :, ::sh, ::sw][:, :, :Ho, :Wo]                # (N, C, Ho, Wo, kh, kw)
    rows = win.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C * kh * kw)
    return rows, (N, Ho, Wo)


def _conv2d(a: IntTensor, w: IntTensor, stride, padding, acc_fn, return_acc: bool):
    """:func:`int_conv2d` with the integer sums of the im2col GEMM from ``acc_fn``."""
    _check_pair(a, w, "int_conv2d")
    if a.ndim != 4 or w.ndim != 4 or a.shape[1] != w.shape[1]:
        raise ValueError(f"int_conv2d needs a (N, C, H, W) and w (O, C, kh, kw), got "
                         f"{a.shape} and {w.shape}")
    ca, ua = a.operand()
    _, uw = w.operand()
    O, C, kh, kw = w.shape
    rows, (N, Ho, Wo) = im2col(ca, kh, kw, stride, padding)
    w2 = IntTensor(w.q.reshape(O, -1), w.scale, w.z2, w.fmt)
    acc = acc_fn(rows, w2, a.fmt.bits)
    S = np.broadcast_to(scale_to_fp32(ua, uw), (O,))
    y = _epilogue(acc, S).reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2)
    if return_acc:
        return y, acc.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2), S
    return y


def int_conv2d(a: IntTensor, w: IntTensor, *, stride=1, padding=0, return_acc: bool = False):
    """Golden integer convolution (cross-correlation, as ``torch.nn.functional.conv2d``):
    ``a (N, C, H, W)`` per-tensor, ``w (O, C, kh, kw)`` per-tensor or per output channel,
    as an im2col GEMM with the same epilogue as :func:`int_linear`. float32
    ``(N, O, Ho, Wo)``."""
    return _conv2d(a, w, stride, padding, _golden_acc, return_acc)


def int_matmul_reference(a: IntTensor, w: IntTensor) -> np.ndarray:
    """float64 ``a_hat @ w_hat^T`` of the exact dequantized operands."""
    _check_pair(a, w, "int_matmul_reference")
    return a.dequantize64() @ w.dequantize64().T


def int_matmul_error_bound(a: IntTensor, w: IntTensor) -> np.ndarray:
    """Per-output bound on ``|int_linear(a, w) - int_matmul_reference(a, w)|``."""
    _check_pair(a, w, "int_matmul_error_bound")
    a64, w64 = a.dequantize64(), w.dequantize64()
    K = a.shape[1]
    return (2.0**-22 * np.abs(a64 @ w64.T) + K * 2.0**-51 * (np.abs(a64) @ np.abs(w64).T)
            + _FTZ)


def _register() -> None:
    from . import formats as _formats
    reg = getattr(_formats, "register_format", None)
    if reg is None:
        return
    for f in INT_FORMATS.values():
        reg(f)


_register()
