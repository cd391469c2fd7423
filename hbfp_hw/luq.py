"""LUQ: logarithmic unbiased quantization of neural gradients, and its shift-add GEMM.

A :class:`LUQFormat` quantizes a tensor to signed powers of two times one per-tensor
scale ``alpha``. With ``bits = b`` each element is a ``b``-bit code: one sign bit and a
``b-1``-bit magnitude code ``c``::

    c = 0            value 0
    c = 1 .. n       value sign * alpha * 2**(c - 1),    n = 2**(b-1) - 1 magnitudes

(``luq4``: zero and the 7 magnitudes ``alpha * 2**0 .. alpha * 2**6``). The scale is
``alpha = m * 2**-(n-1)``, where ``m`` is

* ``alpha="tensor"``: ``max|x|`` of the tensor being quantized (two passes), so the
  largest element maps to the top code exactly;
* ``alpha="hindsight"``: ``max|x|`` of the *previous* step's tensor of the same layer and
  role (kept in the ``state`` of :meth:`LUQFormat.train_quantize`; the hardware's range
  tracker measures it while the previous tensor streams through), so one pass suffices.
  The first step has no history and uses its own maximum.

(The signed ``max(x)`` would give ``alpha <= 0`` for a tensor without positive entries;
the maximum magnitude is used.)

Rounding is **unbiased** in two regimes, each one Bernoulli draw per element:

* stochastic underflow: ``|x| < alpha`` becomes ``alpha`` with probability
  ``|x| / alpha``, else 0;
* logarithmic stochastic rounding: ``alpha 2**j <= |x| < alpha 2**(j+1)`` becomes
  ``alpha 2**(j+1)`` with probability ``(|x| - alpha 2**j) / (alpha 2**j)``, else
  ``alpha 2**j``.

Both are "round up from the lower level ``lo`` to the upper level ``hi`` with probability
``(|x| - lo) / (hi - lo)``". With ``r = sr_bits`` random bits ``u`` per element (the
generator of :mod:`hbfp_hw.prng`) the decision is the exact comparison::

    up  <=>  |x| * 2**r  >  (b * 2**r + u) * alpha * 2**j

with ``b = 0, j = 0`` in the underflow regime and ``b = 1`` in a binade. The probability
of ``up`` is ``ceil(f * 2**r) / 2**r`` for the exact fraction ``f``: the mean is the
input up to less than ``2**-r`` of the level spacing (``sr_bits=16`` by default).
Elements at or above ``alpha * 2**(n-1)`` (possible only with an in-hindsight scale
below this step's maximum) saturate to the top code, the one biased case.

Element ``t`` of the row-major (C order) stream uses lane ``t % lanes`` of the
generator; SMP sample ``s`` (``samples`` independent draws averaged) uses the seed
``(seed + s * 0x85EBCA6B) mod 2**32``.

Special values: float inputs are cast to float32; subnormal inputs are flushed to zero;
if ``alpha`` is not a normal float32 (``m < 2**(n - 127)``) the whole tensor quantizes
to zero; NaN or Inf raise (or, with ``nonfinite="flag"``, mark the tensor invalid: it
dequantizes to NaN).

:func:`luq_matmul` is the golden model of the shift-add GEMM: ``dX = dY W`` and
``dW = dY^T X`` with ``dY`` in LUQ codes and the other operand a BFP tensor; every
product is a BFP mantissa shifted left by ``c - 1`` (no multiplier), accumulated exactly
as :func:`hbfp_hw.bfp_matmul` does. See ``docs/luq.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .formats import check_keys
from .gemm import DEFAULT_GUARD_BITS, acc_to_fp32
from .prng import random_bits
from .quantize import BFPTensor
from .validate import check_int as _check_int

__all__ = ["LUQFormat", "LUQTensor", "LUQ4", "LUQ4_HS", "LUQ_FORMATS", "ALPHA_SOURCES",
           "SAMPLE_SEED_STEP", "luq_quantize", "luq_alpha", "sample_seed", "luq_matmul",
           "luq_matmul_reference", "luq_matmul_error_bound", "luq_accumulator_bits"]

ALPHA_SOURCES = ("tensor", "hindsight")
BITS_RANGE = (2, 5)
SR_BITS_RANGE = (1, 24)
SEED_RANGE = (0, 2**32 - 1)
LANES_RANGE = (1, 256)
SAMPLES_ALLOWED = (1, 2, 4, 8, 16)
#: seed increment between SMP samples
SAMPLE_SEED_STEP = 0x85EBCA6B
_MAX_ACC_BITS = 53
_MIN_NORMAL = np.float32(2.0**-126)
_FLT_MAX = float(np.finfo(np.float32).max)


def sample_seed(seed: int, sample: int) -> int:
    """Generator seed of SMP sample ``sample``: ``(seed + sample * 0x85EBCA6B) mod 2**32``."""
    return (seed + sample * SAMPLE_SEED_STEP) & 0xFFFFFFFF


@dataclass(frozen=True)
class LUQFormat:
    """An immutable, validated LUQ (logarithmic unbiased) format.

    Parameters
    ----------
    bits
        Code width, sign included, in ``[2, 5]``: zero and ``2**(bits-1) - 1``
        magnitudes ``alpha * 2**0 .. alpha * 2**(2**(bits-1) - 2)``.
    alpha
        Source of the scale's maximum: ``"tensor"`` (this tensor's ``max|x|``) or
        ``"hindsight"`` (the previous step's, in :meth:`train_quantize`).
    samples
        SMP: number of independent quantizations averaged, one of 1, 2, 4, 8, 16
        (a power of two, so the average is an exact exponent shift).
    sr_bits
        Random bits per element and draw, in ``[1, 24]``.
    seed
        Generator seed, in ``[0, 2**32 - 1]``.
    lanes
        Parallel generators (hardware lanes), in ``[1, 256]``: element ``t`` of the
        stream uses lane ``t % lanes``.
    name
        Optional label.
    """

    bits: int = 4
    alpha: str = "tensor"
    samples: int = 1
    sr_bits: int = 16
    seed: int = 0
    lanes: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, *BITS_RANGE)
        if self.alpha not in ALPHA_SOURCES:
            raise ValueError(f"alpha={self.alpha!r} is not supported; accepted values are "
                             f"{', '.join(ALPHA_SOURCES)}")
        if (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                or self.samples not in SAMPLES_ALLOWED):
            raise ValueError(f"samples={self.samples!r} is not supported; accepted values "
                             f"are {', '.join(map(str, SAMPLES_ALLOWED))}")
        _check_int("sr_bits", self.sr_bits, *SR_BITS_RANGE)
        _check_int("seed", self.seed, *SEED_RANGE)
        _check_int("lanes", self.lanes, *LANES_RANGE)
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")

    # -- derived constants ---------------------------------------------------------
    @property
    def magnitudes(self) -> int:
        """Number of non-zero magnitudes, ``2**(bits-1) - 1`` (7 for 4 bits)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def max_shift(self) -> int:
        """Exponent of the top magnitude: ``alpha * 2**max_shift`` (6 for 4 bits)."""
        return self.magnitudes - 1

    @property
    def sign_bit(self) -> int:
        """Bit position of the sign in a code (``bits - 1``)."""
        return self.bits - 1

    @property
    def bits_per_element(self) -> float:
        return float(self.bits)

    def replace(self, **changes: object) -> "LUQFormat":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(kind="luq", magnitudes=self.magnitudes, max_shift=self.max_shift)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LUQFormat":
        if not isinstance(d, dict):
            raise ValueError(f"a format must be a JSON object, got {type(d).__name__} {d!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        check_keys("LUQ format", d, fields, ("kind", "magnitudes", "max_shift"))
        return cls(**{k: v for k, v in d.items() if k in fields})

    def describe(self) -> str:
        label = f"{self.name}: " if self.name else ""
        smp = f", SMP x{self.samples}" if self.samples > 1 else ""
        return (f"{label}LUQ {self.bits}-bit log codes (zero + {self.magnitudes} magnitudes "
                f"alpha*2^0..alpha*2^{self.max_shift}), alpha = max|x|/2^{self.max_shift} "
                f"({self.alpha}), stochastic underflow + log rounding ({self.sr_bits} bits, "
                f"seed {self.seed}, {self.lanes} lanes){smp}")

    # -- the scheme API ------------------------------------------------------------
    def quantize_array(self, x, *, max_abs: float | None = None, nonfinite: str = "raise",
                       name: str | None = None) -> "LUQTensor":
        """Quantize ``x``; see :func:`luq_quantize`."""
        return luq_quantize(x, self, max_abs=max_abs, nonfinite=nonfinite, name=name)

    def train_quantize(self, x: np.ndarray, *, role: str, seed: int, state: dict,
                       update: bool = True) -> np.ndarray:
        """One training step's quantize-dequantize of ``x`` (float32, same shape).

        ``seed`` replaces the format's seed (a new stream per layer and step); with
        ``alpha="hindsight"`` the scale comes from ``state["max_abs"]``, the maximum
        magnitude of the previous call's tensor (this call's own maximum on the first
        call). ``update`` stores this tensor's maximum for the next call.
        """
        fmt = self if self.seed == seed else self.replace(seed=int(seed) & 0xFFFFFFFF)
        prev = state.get("max_abs") if self.alpha == "hindsight" else None
        q = luq_quantize(x, fmt, max_abs=prev, name=role)
        if update:
            state["max_abs"] = q.max_abs
            state["steps"] = state.get("steps", 0) + 1
            if q.saturated:
                state["saturated"] = state.get("saturated", 0) + q.saturated
        return q.dequantize()


#: 4-bit LUQ: sign + 3 bits, zero and alpha*2^0..alpha*2^6, per-tensor alpha.
LUQ4 = LUQFormat(bits=4, alpha="tensor", name="LUQ4")
#: 4-bit LUQ with the in-hindsight scale (previous step's max|x|).
LUQ4_HS = LUQFormat(bits=4, alpha="hindsight", name="LUQ4-HS")
LUQ_FORMATS: dict[str, LUQFormat] = {f.name.lower(): f for f in (LUQ4, LUQ4_HS)}


def _register() -> None:
    try:
        from .formats import register_format
    except ImportError:          # the shared registry is not in this checkout yet
        return
    for f in LUQ_FORMATS.values():
        register_format(f)


_register()


@dataclass(frozen=True, eq=False)
class LUQTensor:
    """A LUQ-quantized tensor.

    Attributes
    ----------
    fmt : LUQFormat
    shape : tuple of int
    codes : ndarray of uint8, shape ``(samples, *shape)``
        ``sign << (bits-1) | c`` per element and SMP sample (a zero is code 0).
    alpha : float
        The scale (a normal float32, or 0.0: the tensor is all zeros).
    max_abs : float
        ``max|x|`` of the input (flushed subnormals count as 0): the statistic an
        in-hindsight scale uses at the next step.
    saturated : int
        Elements at or above ``alpha * 2**max_shift`` that were not exactly on it
        (clamped to the top code: only with a scale from another tensor).
    invalid : bool
        The input held NaN or Inf (``nonfinite="flag"``): dequantizes to NaN.
    """

    fmt: LUQFormat
    shape: tuple
    codes: np.ndarray
    alpha: float
    max_abs: float
    saturated: int = 0
    invalid: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def magnitude_codes(self) -> np.ndarray:
        """``c`` per sample and element (``(samples, *shape)``, 0 = zero)."""
        return self.codes & np.uint8((1 << self.fmt.sign_bit) - 1)

    @property
    def negative(self) -> np.ndarray:
        return (self.codes >> np.uint8(self.fmt.sign_bit)).astype(bool)

    def signed_powers(self) -> np.ndarray:
        """Integer ``sum_s sign * 2**(c-1)`` (0 for c = 0) per element, int64: the
        value is this times ``alpha / samples``."""
        c = self.magnitude_codes.astype(np.int64)
        p = np.where(c > 0, np.left_shift(1, np.maximum(c - 1, 0)), 0)
        return np.where(self.negative, -p, p).sum(axis=0)

    def dequantize(self) -> np.ndarray:
        """float32 values (the SMP average), original shape; exact."""
        if self.invalid:
            return np.full(self.shape, np.nan, np.float32)
        v = self.signed_powers().astype(np.float64) * (self.alpha / self.fmt.samples)
        return v.astype(np.float32)

    @property
    def T(self) -> "LUQTensor":
        """Transpose of a 2-D tensor (no re-quantization)."""
        if self.ndim != 2:
            raise ValueError(f".T needs a 2-D tensor, this one has shape {self.shape}")
        return dataclasses.replace(self, shape=self.shape[::-1],
                                   codes=np.ascontiguousarray(self.codes.transpose(0, 2, 1)))

    def equal(self, other: "LUQTensor") -> bool:
        return (self.shape == other.shape and self.alpha == other.alpha
                and self.invalid == other.invalid
                and np.array_equal(self.codes, other.codes))

    def __repr__(self) -> str:
        return (f"LUQTensor(shape={self.shape}, fmt={self.fmt.name or self.fmt.bits}, "
                f"alpha={self.alpha!r}, samples={self.fmt.samples})")


def luq_alpha(max_abs: float, fmt: LUQFormat) -> float:
    """The scale ``max_abs * 2**-max_shift`` as float32; 0.0 if it is not a normal
    float32 (the tensor then quantizes to zero)."""
    a = np.float32(np.float32(max_abs) * np.float32(2.0 ** -fmt.max_shift))
    return float(a) if a >= _MIN_NORMAL else 0.0


def _as_float32(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"LUQ quantize needs a real array, got dtype {a.dtype}")
    with np.errstate(over="ignore"):
        return a.astype(np.float32, copy=False)


def luq_quantize(x, fmt: LUQFormat, *, max_abs: float | None = None,
                 nonfinite: str = "raise", name: str | None = None) -> LUQTensor:
    """Quantize ``x`` (any shape) to LUQ codes.

    Parameters
    ----------
    x : array_like
        Cast to float32.
    fmt : LUQFormat
    max_abs : float, optional
        The maximum the scale derives from (``alpha = max_abs * 2**-max_shift``);
        default: this tensor's ``max|x|``. An in-hindsight caller passes the previous
        step's. Must be finite and ``>= 0``.
    nonfinite : {"raise", "flag"}
    name : str, optional
        Tensor name in error messages.
    """
    if not isinstance(fmt, LUQFormat):
        raise TypeError(f"fmt must be a LUQFormat, got {type(fmt).__name__}")
    if nonfinite not in ("raise", "flag"):
        raise ValueError(f"nonfinite={nonfinite!r}; accepted values are 'raise', 'flag'")
    x32 = _as_float32(x)
    shape = tuple(x32.shape)
    flat = x32.reshape(-1)
    S = fmt.samples
    ax = np.abs(flat)
    finite = np.isfinite(ax)
    if not finite.all():
        pos = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), shape))
        if nonfinite == "raise":
            what = f"tensor {name!r}" if name else "tensor"
            raise ValueError(f"{what} holds {float(x32[pos])!r} at index {pos}: LUQ quantizes "
                             f"finite values only; pass nonfinite='flag' to mark the tensor "
                             f"invalid")
        return LUQTensor(fmt, shape, np.zeros((S, *shape), np.uint8), 0.0, float("nan"),
                         0, True)
    ax = np.where(ax < _MIN_NORMAL, np.float32(0), ax)       # flush subnormals
    cur_max = float(ax.max()) if ax.size else 0.0
    if max_abs is None:
        m = cur_max
    else:
        m = float(max_abs)
        if not (math.isfinite(m) and 0 <= m <= _FLT_MAX):
            raise ValueError(f"max_abs={max_abs!r} is out of range; accepted range is "
                             f"[0, {_FLT_MAX:.8g}] (a finite float32)")
    alpha = luq_alpha(m, fmt)
    codes = np.zeros((S, flat.size), np.uint8)
    saturated = 0
    if alpha > 0 and flat.size:
        a64 = ax.astype(np.float64)
        nz = a64 > 0
        # k = floor(log2(|x| / alpha)) exactly, from exponents and significands
        eg = np.frexp(a64)[1]
        fa_m, fa_e = math.frexp(alpha)
        mg = np.frexp(a64)[0]
        k = (eg - fa_e) - (mg < fa_m).astype(np.int64)
        top = fmt.max_shift
        sat = nz & (k >= top)
        saturated = int((sat & (a64 != alpha * 2.0**top)).sum())
        under = nz & (k < 0)
        j = np.clip(k, 0, top)
        base = np.where(under, 0.0, 2.0 ** fmt.sr_bits)
        t_j = alpha * np.ldexp(1.0, j)                       # exact
        lhs = np.ldexp(a64, fmt.sr_bits)                     # exact
        neg = np.signbit(flat)
        for s in range(S):
            u = random_bits(sample_seed(fmt.seed, s), fmt.lanes, flat.size, fmt.sr_bits)
            up = lhs > (base + u) * t_j                     # exact: <= 49-bit products
            c = np.where(under, up.astype(np.int64), k + 1 + up)
            c = np.where(sat, top + 1, c)
            c = np.where(nz, c, 0)
            code = c.astype(np.uint8)
            code |= ((neg & (c > 0)).astype(np.uint8) << np.uint8(fmt.sign_bit))
            codes[s] = code
    return LUQTensor(fmt, shape, codes.reshape((S, *shape)), alpha, cur_max, saturated)


# ---------------------------------------------------------------------------- the GEMM
def luq_accumulator_bits(fmt: LUQFormat, man_bits_b: int, block_len: int, k_max: int,
                         guard_bits: int = DEFAULT_GUARD_BITS) -> int:
    """Signed width of an accumulator of the shift-add GEMM that cannot overflow:
    ``|acc| <= ceil(k_max/L) * L * samples * 2**max_shift * mmax_b * 2**G``."""
    for nm, v, lo, hi in (("man_bits_b", man_bits_b, 2, 16), ("block_len", block_len, 1, 65536),
                          ("k_max", k_max, 1, 2**24), ("guard_bits", guard_bits, 0, 24)):
        _check_int(nm, v, lo, hi)
    nkb = -(-k_max // block_len)
    bound = nkb * block_len * fmt.samples * (2**fmt.max_shift) * (2 ** (man_bits_b - 1) - 1)
    return (bound << guard_bits).bit_length() + 1


def _check_gemm(a, b, fn: str) -> int:
    if not isinstance(a, LUQTensor):
        raise TypeError(f"{fn}: argument 'a' is a {type(a).__name__}, not a LUQTensor; "
                        f"quantize the gradient with a LUQ format first")
    if not isinstance(b, BFPTensor):
        raise TypeError(f"{fn}: argument 'b' is a {type(b).__name__}, not a BFPTensor")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{fn} needs 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {a.shape}, b is {b.shape}")
    return b.layout.block[0]


def luq_matmul(a: LUQTensor, b: BFPTensor, *, guard_bits: int = DEFAULT_GUARD_BITS,
               k_max: int | None = None, return_acc: bool = False):
    """Bit-exact golden model of the shift-add GEMM ``a @ b``.

    ``a`` is ``(M, K)`` in LUQ codes (``dY`` for ``dX = dY W``, ``dY.T`` for
    ``dW = dY^T X``); ``b`` is a ``(K, N)`` BFP tensor, blocks of length ``L`` along K.

    1. Block sums (exact integers), K-block ``kb``:
       ``P[kb] = sum_{k in kb} sum_s sign * (mb[k, j] << (c[s, i, k] - 1))``
       (codes with ``c = 0`` add nothing): a shift per product, no multiplier.
    2. ``e_ref[j] = max_kb Eb[kb, j]`` over valid blocks.
    3. ``acc = sum_kb floor(P[kb] * 2**G / 2**(e_ref - Eb[kb]))`` (as ``bfp_matmul``).
    4. ``v = acc * 2**(e_ref - G - fb - log2(samples))`` to FP32 with the rules of
       :func:`hbfp_hw.gemm.acc_to_fp32`; then ``y = v * alpha`` as one FP32 multiply
       (round to nearest even, overflow to +-Inf, results below ``2**-126`` flushed to 0).
    5. NaN where ``b``'s column holds an invalid block, everywhere if ``a`` is invalid.

    Returns float32 ``(M, N)`` (and ``(acc, e_ref)`` with ``return_acc``, padded N).
    """
    L = _check_gemm(a, b, "luq_matmul")
    K = a.shape[1]
    k_max = K if k_max is None else k_max
    if K > k_max:
        raise ValueError(f"K={K} exceeds k_max={k_max} the accumulator is sized for")
    fmt = a.fmt
    width = luq_accumulator_bits(fmt, b.fmt.man_bits, L, max(k_max, 1), guard_bits)
    if width > _MAX_ACC_BITS:
        raise ValueError(f"accumulator of {width} bits exceeds the supported {_MAX_ACC_BITS}; "
                         f"reduce k_max or guard_bits")
    lay = b.layout
    Kp, Np = lay.padded
    nkb = Kp // L
    bn = lay.block[1]
    M = a.shape[0]
    A = np.zeros((M, Kp), np.int64)
    A[:, :K] = a.signed_powers()
    valid = ~b.invalid
    lo = -(1 << 14)
    eb = np.where(valid, b.exponents.astype(np.int64), lo)             # (nkb, gn)
    e_col = eb.max(axis=0)                                             # (gn,)
    e_ref = np.repeat(e_col, bn)                                       # (Np,)
    eb_full = np.repeat(b.exponents.astype(np.int64), bn, axis=1)      # (nkb, Np)
    Af = A.astype(np.float64).reshape(M, nkb, L).transpose(1, 0, 2)
    Bm = b.mantissas.astype(np.float64).reshape(nkb, L, Np)
    p = np.matmul(Af, Bm).astype(np.int64)                             # exact
    s = np.minimum(e_ref[None, :] - eb_full, 62)                       # (nkb, Np)
    acc = ((p << guard_bits) >> s[:, None, :]).sum(axis=0)             # (M, Np)
    shift_s = int(math.log2(fmt.samples))
    scale = np.broadcast_to(e_ref - guard_bits - b.fmt.frac_bits - shift_s, acc.shape)
    bad = np.broadcast_to(np.repeat(b.invalid.any(axis=0), bn)[None, :], acc.shape)
    v = acc_to_fp32(acc, scale)
    with np.errstate(over="ignore", under="ignore"):
        y = v * np.float32(a.alpha)
    y = np.where(np.abs(y) < _MIN_NORMAL, np.float32(0), y).astype(np.float32)
    y = np.where(bad | a.invalid, np.float32(np.nan), y)[:, : b.shape[1]]
    if return_acc:
        return y, acc, e_ref
    return y


def luq_matmul_reference(a: LUQTensor, b: BFPTensor) -> np.ndarray:
    """float64 product of the dequantized operands."""
    _check_gemm(a, b, "luq_matmul_reference")
    return a.dequantize().astype(np.float64) @ b.dequantize().astype(np.float64)


def luq_matmul_error_bound(a: LUQTensor, b: BFPTensor,
                           guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """Per-output bound on ``|luq_matmul(a, b) - luq_matmul_reference(a, b)|``:
    ``alpha * (nkb * lsb + 2**-24 |v|) + 2**-24 |y| + 2**-126`` with
    ``lsb = 2**(e_ref - G - fb - log2 samples)`` (truncations, two roundings, flush)."""
    L = _check_gemm(a, b, "luq_matmul_error_bound")
    nkb = b.layout.padded[0] // L
    eb = np.where(b.invalid, -(1 << 14), b.exponents.astype(np.int64)).max(axis=0)
    e_ref = np.repeat(eb, b.layout.block[1])[: b.shape[1]]
    lsb = np.ldexp(1.0, (e_ref - guard_bits - b.fmt.frac_bits
                         - int(math.log2(a.fmt.samples))).astype(np.int32))
    ref = np.abs(luq_matmul_reference(a, b))
    v = ref / a.alpha if a.alpha else ref
    return (a.alpha * (nkb * lsb[None, :] + 2.0**-23 * v) + 2.0**-23 * ref
            + 2.0**-125 + math.ulp(0.0))
