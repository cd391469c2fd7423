"""MLS: the multi-level-scaling tensor format and its exact low-bit GEMM (golden model).

A value is ``x = 2**t * 2**-g * e`` with

* ``t`` — the **tensor exponent**, one signed integer per tensor (the tensor-level scale is
  the FP32 power of two ``2**t``);
* ``g`` — the **group shift**, an unsigned ``group_bits``-bit integer per group (the
  group-level scale is ``2**-g``, ``g in [0, gmax]``, ``gmax = 2**group_bits - 1``);
* ``e`` — a low-bit floating-point **element**: sign, ``exp_bits`` exponent bits and
  ``man_bits`` mantissa bits, bias 1, with subnormals and no Inf/NaN codes::

      code c = sign << (E + M) | ec << M | m
      ec = 0:  e = (-1)**sign * m * 2**-M                    (zero and subnormals)
      ec > 0:  e = (-1)**sign * (2**M + m) * 2**(ec - 1 - M)

  As an integer in units of ``2**-M`` the element magnitude is ``V = sig << sh`` with the
  ``(M+1)``-bit significand ``sig = m + (ec > 0) * 2**M`` and ``sh = max(ec - 1, 0)``;
  ``V <= Vmax = (2**(M+1) - 1) << (2**E - 2)``.

Scales are computed dynamically (``floor(log2|x|)`` is the FP32 exponent field; FP32
subnormal inputs are flushed to zero):

* ``T = max floor(log2|x|)`` over the tensor, ``t = T - (2**E - 2)``: the largest value
  falls into the top element binade ``[2**(2**E-2), 2**(2**E-1))`` with ``g = 0``; an
  all-zero tensor gets ``t = 0``;
* per group ``G = max floor(log2|x|)``, ``g = min(T - G, gmax)``; an all-zero group gets
  ``gmax``;
* element: ``w = |x| * 2**(g - t + M)`` (exact) is rounded to ``V`` on the element grid
  (quantum ``2**s``, ``s = max(floor(log2 w) - M, 0)``) by round-to-nearest-even or
  stochastic rounding ``n = floor(w / 2**s + u / 2**r)`` with the ``r``-bit number ``u`` of
  :mod:`hbfp_hw.prng` for the element's stream position, then saturated to ``Vmax``.

Groups: in a tensor of rank 3 or more (convolution operands NCHW / OCkk) one group is one
``(dim0, dim1)`` slice, i.e. all spatial elements of one (sample, channel) or (output,
input channel) pair; in a tensor of rank 1 or 2 a group is ``group_size`` consecutive
elements along ``group_axis`` (zero padded at the end).

The exact GEMM :func:`mls_matmul` multiplies ``(M+1)``-bit significands, adds element
shifts, accumulates a group pair exactly in integers, aligns group pairs by
``2*gmax - ga - gb`` (exact left shifts) and applies the tensor scales once at the end:
the only rounding is the final one to FP32 (round to nearest even to 24 significant bits,
results below ``2**-126`` flushed to zero, overflow to Inf). See ``docs/mls.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from .formats import check_keys
from .prng import random_bits
from .quantize import block_layout
from .validate import check_int as _check_int

__all__ = ["MLSFormat", "MLSTensor", "MLS_E2M1", "MLS_E2M4", "MLS_ROUNDING_MODES",
           "mls_matmul", "mls_matmul_reference", "mls_matmul_error_bound",
           "mls_accumulator_bits", "round_to_fp32", "element_values"]

MLS_ROUNDING_MODES = ("nearest_even", "stochastic")
EXP_BITS_RANGE = (1, 4)
MAN_BITS_RANGE = (0, 10)
GROUP_BITS_RANGE = (1, 6)
GROUP_SIZE_RANGE = (1, 4096)
TENSOR_EXP_RANGE = (-200, 200)
MAX_ACC_BITS = 63          # the golden accumulator is int64


@dataclass(frozen=True)
class MLSFormat:
    """An immutable, validated MLS format.

    Parameters
    ----------
    exp_bits
        Element exponent bits ``E``, in ``[1, 4]``.
    man_bits
        Element mantissa bits ``M`` (the significand has ``M + 1`` bits), in ``[0, 10]``.
    group_bits
        Width of the unsigned group shift ``g``, in ``[1, 6]``.
    group_size
        Group length along ``group_axis`` for tensors of rank 1 or 2, in ``[1, 4096]``.
    group_axis
        Axis of the groups of a rank-1/2 tensor (``-1``: rows of a ``(M, K)`` operand;
        ``0`` or ``-2``: columns of a ``(K, N)`` operand); in ``[-2, 1]``.
    rounding
        ``"nearest_even"`` or ``"stochastic"``.
    sr_bits, seed, sr_lanes
        Stochastic rounding: random bits per element ``[1, 24]``, seed ``[0, 2**32-1]``,
        generator lanes ``[1, 256]`` (stream element ``n`` uses lane ``n % sr_lanes``).
    name
        Optional label used in reports.
    """

    exp_bits: int = 2
    man_bits: int = 4
    group_bits: int = 4
    group_size: int = 16
    group_axis: int = -1
    rounding: str = "nearest_even"
    sr_bits: int = 8
    seed: int = 0
    sr_lanes: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        _check_int("exp_bits", self.exp_bits, *EXP_BITS_RANGE)
        _check_int("man_bits", self.man_bits, *MAN_BITS_RANGE)
        _check_int("group_bits", self.group_bits, *GROUP_BITS_RANGE)
        _check_int("group_size", self.group_size, *GROUP_SIZE_RANGE)
        _check_int("group_axis", self.group_axis, -2, 1)
        if self.rounding not in MLS_ROUNDING_MODES:
            raise ValueError(f"rounding={self.rounding!r} is not supported by MLS; accepted "
                             f"values are {', '.join(MLS_ROUNDING_MODES)}")
        _check_int("sr_bits", self.sr_bits, 1, 24)
        _check_int("seed", self.seed, 0, 2**32 - 1)
        _check_int("sr_lanes", self.sr_lanes, 1, 256)
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")

    # -- derived constants ---------------------------------------------------------
    @property
    def gmax(self) -> int:
        """Largest group shift ``2**group_bits - 1`` (also the shift of a zero group)."""
        return 2**self.group_bits - 1

    @property
    def top_exp(self) -> int:
        """Exponent of the top element binade, ``2**E - 2`` (``t = T - top_exp``)."""
        return 2**self.exp_bits - 2

    @property
    def vmax(self) -> int:
        """Largest element magnitude in units of ``2**-M``: ``(2**(M+1)-1) << (2**E-2)``."""
        return (2 ** (self.man_bits + 1) - 1) << self.top_exp

    @property
    def element_bits(self) -> int:
        """Bits of one element code: ``1 + E + M``."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def sig_bits(self) -> int:
        """Significand width ``M + 1`` (the width of the integer multipliers)."""
        return self.man_bits + 1

    @property
    def max_elem_shift(self) -> int:
        """Largest element shift ``sh = 2**E - 2``."""
        return self.top_exp

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element with the group shift amortised over ``group_size``
        (the tensor exponent is negligible)."""
        return self.element_bits + self.group_bits / self.group_size

    # -- API shared with BFPFormat -------------------------------------------------
    def replace(self, **changes: object) -> "MLSFormat":
        """A copy with some fields changed (validated again). A named format whose
        element or group widths change gets a derived name unless ``name=`` is given."""
        new = dataclasses.replace(self, **changes)
        ident = ("exp_bits", "man_bits", "group_bits", "group_size")
        if "name" not in changes and self.name and any(
                getattr(new, k) != getattr(self, k) for k in ident):
            parts = [f"{k}={getattr(new, k)}" for k in ident
                     if getattr(new, k) != getattr(self, k)]
            object.__setattr__(new, "name", f"{self.name}[{', '.join(parts)}]")
        return new

    def transposed(self) -> "MLSFormat":
        """The format of the transpose of a 2-D tensor quantized with this format."""
        return self.replace(group_axis={-1: -2, -2: -1, 0: 1, 1: 0}[self.group_axis])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(kind="mls", gmax=self.gmax, vmax=self.vmax, element_bits=self.element_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MLSFormat":
        if not isinstance(d, dict):
            raise ValueError(f"a format must be a JSON object, got {type(d).__name__} {d!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        check_keys("MLS format", d, fields, ("kind", "gmax", "vmax", "element_bits"))
        return cls(**{k: v for k, v in d.items() if k in fields})

    def describe(self) -> str:
        label = f"{self.name}: " if self.name else ""
        rnd = self.rounding
        if rnd == "stochastic":
            rnd += f"({self.sr_bits} bits, seed {self.seed}, {self.sr_lanes} lanes)"
        return (f"{label}MLS E{self.exp_bits}M{self.man_bits} elements "
                f"({self.element_bits} bits), {self.group_bits}-bit group shifts [0, "
                f"{self.gmax}], groups of {self.group_size} on axis {self.group_axis} "
                f"(rank>=3: per (dim0, dim1) slice), power-of-two tensor scale, {rnd}, "
                f"{self.bits_per_element:.3f} bits/element")

    # -- quantization (the hbfp_hw.quantize / train hooks) -------------------------
    def layout(self, shape: tuple[int, ...]):
        """The group layout (a :class:`hbfp_hw.quantize.BlockLayout`) on ``shape``."""
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        if nd == 0:
            raise ValueError("MLS quantization needs a tensor of rank >= 1, got a scalar")
        if nd >= 3:
            axes = tuple(range(2, nd))
            blk = tuple(max(1, shape[a]) for a in axes)
        else:
            if not -nd <= self.group_axis < nd:
                raise ValueError(f"group_axis={self.group_axis} does not exist in a tensor "
                                 f"of shape {shape}; accepted axes are [{-nd}, {nd - 1}]")
            axes, blk = (self.group_axis,), (self.group_size,)
        return block_layout(shape, SimpleNamespace(block_axes=axes, block_shape=blk,
                                                   name=self.name))

    def quantize_array(self, x, *, nonfinite: str = "raise", name: str | None = None,
                       tensor_exp: int | None = None) -> "MLSTensor":
        """Quantize ``x`` (any real array, cast to float32) to an :class:`MLSTensor`.

        ``tensor_exp`` fixes ``t`` instead of computing it from the tensor maximum
        (elements above the range saturate). NaN/Inf raise ``ValueError`` naming the
        first position (MLS has no invalid-group code); ``nonfinite`` must be "raise".
        """
        if nonfinite != "raise":
            raise ValueError(f"nonfinite={nonfinite!r}: MLS has no invalid-group code; "
                             f"accepted value is 'raise'")
        return _quantize(x, self, name, tensor_exp)

    def train_quantize(self, x: np.ndarray, *, role: str, seed: int, state: dict,
                       update: bool = True) -> np.ndarray:
        """Fake-quantization hook of the PyTorch layers: round to nearest for weights and
        activations, stochastically (from ``seed``) for gradients; returns float32."""
        if role not in ("act", "weight", "grad"):
            raise ValueError(f"role={role!r}; accepted values are 'act', 'weight', 'grad'")
        fmt = self
        if role == "grad":
            fmt = self.replace(rounding="stochastic", seed=int(seed) & 0xFFFFFFFF,
                               sr_lanes=max(self.sr_lanes, 16))
        elif self.rounding != "nearest_even":
            fmt = self.replace(rounding="nearest_even")
        return fmt.quantize_array(np.asarray(x, dtype=np.float32)).dequantize()


@dataclass(frozen=True, eq=False)
class MLSTensor:
    """A quantized MLS tensor.

    Attributes
    ----------
    fmt : MLSFormat
    shape : tuple of int — the original shape
    tensor_exp : int — ``t``
    group_shift : ndarray of uint8, shape ``layout.grid`` — ``g``
    codes : ndarray of uint16, shape ``layout.padded`` — element codes
    """

    fmt: MLSFormat
    shape: tuple[int, ...]
    tensor_exp: int
    group_shift: np.ndarray
    codes: np.ndarray

    @property
    def layout(self):
        return self.fmt.layout(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def fields(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(sign, sig, sh)`` of every element (padded shape)."""
        return decode(self.codes, self.fmt)

    def magnitudes(self) -> np.ndarray:
        """Signed element integers ``+-V`` (units ``2**-M``), int64, padded shape."""
        s, sig, sh = self.fields()
        v = sig.astype(np.int64) << sh.astype(np.int64)
        return np.where(s.astype(bool), -v, v)

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """Groups in stream order: ``(group_shift[ng], codes[ng, group_len])``."""
        lay = self.layout
        return self.group_shift.reshape(-1).copy(), lay.to_stream(self.codes)

    def dequantize(self) -> np.ndarray:
        """float32 values in the original shape: ``+-V * 2**(t - g - M)`` (exact in
        float64; values below ``2**-126`` flush to zero)."""
        lay = self.layout
        v = self.magnitudes().astype(np.float64).reshape(lay.interleaved)
        e = (self.tensor_exp - self.group_shift.astype(np.int64) - self.fmt.man_bits)
        ev = lay.grid_view(e)
        out = np.ldexp(v, np.broadcast_to(ev, v.shape).astype(np.int32))
        out = np.where(np.abs(out) < 2.0**-126, 0.0, out).astype(np.float32)
        out = out.reshape(lay.padded)
        return out[tuple(slice(0, s) for s in self.shape)]

    @property
    def T(self) -> "MLSTensor":
        """Transpose of a 2-D tensor, no re-quantization (groups travel with it)."""
        if self.ndim != 2:
            raise ValueError(f".T needs a 2-D tensor, this one has shape {self.shape}")
        return MLSTensor(self.fmt.transposed(), self.shape[::-1], self.tensor_exp,
                         self.group_shift.T.copy(), self.codes.T.copy())

    def equal(self, other: "MLSTensor") -> bool:
        return (self.shape == other.shape and self.tensor_exp == other.tensor_exp
                and np.array_equal(self.group_shift, other.group_shift)
                and np.array_equal(self.codes, other.codes))

    def __repr__(self) -> str:
        return (f"MLSTensor(shape={self.shape}, fmt={self.fmt.name or 'MLS'}, "
                f"t={self.tensor_exp}, groups={self.group_shift.shape})")


# -- element codes ----------------------------------------------------------------------

def encode(sign: np.ndarray, v: np.ndarray, fmt: MLSFormat) -> np.ndarray:
    """Element codes from signs and magnitudes ``V`` (on the element grid, ``<= Vmax``)."""
    M = fmt.man_bits
    v = np.asarray(v, dtype=np.int64)
    _, ex = np.frexp(v.astype(np.float64))            # exact: V < 2**53
    sh = np.maximum(ex.astype(np.int64) - (M + 1), 0)
    sig = v >> sh
    ec = np.where(sh > 0, sh + 1, sig >> M)
    m = sig & ((1 << M) - 1)
    s = np.where(v == 0, 0, np.asarray(sign, dtype=np.int64))   # canonical +0
    return ((s << (fmt.exp_bits + M)) | (ec << M) | m).astype(np.uint16)


def decode(codes: np.ndarray, fmt: MLSFormat):
    """``(sign, sig, sh)`` arrays (int64) of element codes."""
    M, E = fmt.man_bits, fmt.exp_bits
    c = np.asarray(codes, dtype=np.int64)
    m = c & ((1 << M) - 1)
    ec = (c >> M) & ((1 << E) - 1)
    s = (c >> (M + E)) & 1
    sig = np.where(ec > 0, m + (1 << M), m)
    sh = np.maximum(ec - 1, 0)
    return s, sig, sh


def element_values(fmt: MLSFormat) -> np.ndarray:
    """All non-negative element magnitudes ``V`` (units ``2**-M``), sorted, by
    enumerating the codes (a brute-force description of the element grid)."""
    codes = np.arange(2 ** (fmt.exp_bits + fmt.man_bits))
    _, sig, sh = decode(codes, fmt)
    return np.unique(sig << sh)


# -- quantization -----------------------------------------------------------------------

def _as_float32(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"MLS quantization needs a real array, got dtype {a.dtype}")
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


def _quantize(x, fmt: MLSFormat, name, tensor_exp) -> MLSTensor:
    x32 = _as_float32(x)
    if x32.ndim == 0:
        x32 = x32.reshape(1)
    bad = ~np.isfinite(x32)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        what = f"tensor {name!r}" if name else "tensor"
        raise ValueError(f"{what} holds {float(x32[pos])!r} at index {pos}; MLS quantizes finite "
                         f"FP32 values only (|x| <= {float(np.finfo(np.float32).max):.8g})")
    lay = fmt.layout(x32.shape)
    if lay.padded != x32.shape:
        x32 = np.pad(x32, [(0, p - s) for s, p in zip(x32.shape, lay.padded)])
    bits = x32.view(np.uint32)
    field = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
    nz = field > 0                                      # subnormals flush to zero
    fexp = np.where(nz, field - 127, -(1 << 20))        # floor(log2|x|)
    M = fmt.man_bits
    if tensor_exp is None:
        t = int(fexp.max()) - fmt.top_exp if nz.any() else 0
    else:
        t = _check_int("tensor_exp", tensor_exp, *TENSOR_EXP_RANGE)
    T = t + fmt.top_exp
    gexp = fexp.reshape(lay.interleaved).max(axis=tuple(range(1, 2 * x32.ndim, 2)))
    g = np.where(gexp < -(1 << 19), fmt.gmax, np.clip(T - gexp, 0, fmt.gmax))
    gv = np.broadcast_to(lay.grid_view(g), lay.interleaved).reshape(lay.padded)
    mag = np.where(nz, np.abs(x32.astype(np.float64)), 0.0)
    w = np.ldexp(mag, (gv - t + M).astype(np.int32))    # exact (float64 range)
    w = np.minimum(w, 2.0 ** (fmt.top_exp + M + 1))     # above the range: saturates
    _, ex = np.frexp(w)
    s = np.maximum(ex.astype(np.int64) - 1 - M, 0)     # quantum exponent
    y = np.ldexp(w, (-s).astype(np.int32))             # exact, < 2**(M+2)
    if fmt.rounding == "nearest_even":
        n = np.rint(y).astype(np.int64)
    else:
        r = fmt.sr_bits
        u = random_bits(fmt.seed, fmt.sr_lanes, lay.num_blocks * lay.block_size, r)
        u = lay.from_stream(u.reshape(lay.num_blocks, lay.block_size))
        a = np.floor(np.ldexp(np.minimum(y, 2.0 ** (M + 3)), r)).astype(np.int64)
        n = (a + u) >> r
    v = np.minimum(n << s, fmt.vmax)
    codes = encode(np.signbit(x32), v, fmt)
    return MLSTensor(fmt, tuple(lay.shape), int(t), g.astype(np.uint8), codes)


# -- the exact GEMM ---------------------------------------------------------------------

def mls_accumulator_bits(fmt_a: MLSFormat, fmt_b: MLSFormat, group_len: int,
                         k_max: int) -> int:
    """Width (sign included) of the exact accumulator: ``ceil(k_max / L) * L * Vmax_a *
    Vmax_b << (gmax_a + gmax_b)`` fits."""
    _check_int("group_len", group_len, 1, 65536)
    _check_int("k_max", k_max, 1, 2**24)
    nkb = -(-k_max // group_len)
    bound = (nkb * group_len * fmt_a.vmax * fmt_b.vmax) << (fmt_a.gmax + fmt_b.gmax)
    return bound.bit_length() + 1


def _check_gemm(a, b, fn: str) -> int:
    for arg, v in (("a", a), ("b", b)):
        if not isinstance(v, MLSTensor):
            raise TypeError(f"{fn}: argument {arg!r} is a {type(v).__name__}, not an "
                            f"MLSTensor; quantize it first (b with fmt.transposed())")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{fn} needs 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {a.shape}, b is {b.shape}")
    la, lb = a.layout.block, b.layout.block
    if la[0] != 1 or lb[1] != 1 or la[1] != lb[0]:
        raise ValueError(f"{fn}: a must be grouped along K (axis 1) and b along K (axis 0) "
                         f"with equal group lengths; got groups {la} and {lb} (quantize b "
                         f"with fmt.transposed())")
    return la[1]


def round_to_fp32(acc: np.ndarray, scale_exp) -> np.ndarray:
    """``acc * 2**scale_exp`` (``acc`` int64) as float32: one round to nearest even to 24
    significant bits (in integers), then results below ``2**-126`` flush to zero and
    results of ``2**128`` or more become Inf."""
    acc = np.asarray(acc, dtype=np.int64)
    mag = np.abs(acc)
    _, nb = np.frexp(mag.astype(np.float64))
    nb = nb.astype(np.int64)
    over = (nb > 0) & ((mag >> np.maximum(nb - 1, 0)) == 0)     # float64 rounded up
    nb = np.where(over, nb - 1, nb)
    drop = np.maximum(nb - 24, 0)
    q = mag >> drop
    rem = mag - (q << drop)
    half = np.where(drop > 0, np.int64(1) << np.maximum(drop - 1, 0), 1 << 62)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    r = (q + up.astype(np.int64)) << drop
    with np.errstate(over="ignore"):
        v = np.ldexp(r.astype(np.float64), np.asarray(scale_exp, dtype=np.int64)
                     .astype(np.int32))
        v = np.where(v < 2.0**-126, 0.0, v)
        out = np.where(acc < 0, -v, v).astype(np.float32)
    return out


def mls_matmul(a: MLSTensor, b: MLSTensor, *, k_max: int | None = None,
               return_acc: bool = False):
    """Exact MLS GEMM ``a @ b`` as float32 (bit-exact model of the MLS MAC).

    ``a`` is ``(M, K)`` grouped along K, ``b`` is ``(K, N)`` grouped along K (quantize it
    with ``fmt.transposed()``, or take ``.T`` of a tensor grouped along its rows), equal
    group length ``L``. Per output::

        P[kb] = sum_l  (+-sig_a sig_b) << (sh_a + sh_b)            (exact, one group pair)
        acc   = sum_kb P[kb] << (gmax_a + gmax_b - g_a[kb] - g_b[kb])   (exact)
        out   = fp32(acc * 2**(t_a + t_b - gmax_a - gmax_b - M_a - M_b))

    The one rounding is :func:`round_to_fp32`, so ``|out - exact| <= 2**-24 |exact|`` for
    results in the FP32 normal range (see :func:`mls_matmul_error_bound`).
    ``return_acc`` also returns the integer accumulators (padded shape) and the scale
    exponent.
    """
    L = _check_gemm(a, b, "mls_matmul")
    K = a.shape[1]
    k_max = K if k_max is None else k_max
    if K > k_max:
        raise ValueError(f"K={K} exceeds k_max={k_max} the accumulator is sized for")
    width = mls_accumulator_bits(a.fmt, b.fmt, L, max(k_max, 1))
    if width > MAX_ACC_BITS:
        raise ValueError(f"exact accumulator of {width} bits (K up to {k_max}) exceeds the "
                         f"supported {MAX_ACC_BITS} bits; reduce k_max, group_bits or L")
    va, vb = a.magnitudes(), b.magnitudes()
    Mp, Kp = va.shape
    Np = vb.shape[1]
    nkb = Kp // L
    ga = a.group_shift.astype(np.int64)        # (Mp, nkb)
    gb = b.group_shift.astype(np.int64)        # (nkb, Np)
    G = a.fmt.gmax + b.fmt.gmax
    A = va.astype(np.float64).reshape(Mp, nkb, L).transpose(1, 0, 2)
    B = vb.astype(np.float64).reshape(nkb, L, Np)
    acc = np.zeros((Mp, Np), dtype=np.int64)
    for k0 in range(0, nkb, 64):
        k1 = min(nkb, k0 + 64)
        p = np.matmul(A[k0:k1], B[k0:k1]).astype(np.int64)     # exact: |p| < 2**53
        sh = G - ga[:, k0:k1].T[:, :, None] - gb[k0:k1][:, None, :]
        acc += (p << sh).sum(axis=0)
    scale = a.tensor_exp + b.tensor_exp - G - a.fmt.man_bits - b.fmt.man_bits
    out = round_to_fp32(acc, scale)[: a.shape[0], : b.shape[1]]
    if return_acc:
        return out, acc, scale
    return out


def mls_matmul_reference(a: MLSTensor, b: MLSTensor) -> np.ndarray:
    """float64 product of the dequantized operands."""
    _check_gemm(a, b, "mls_matmul_reference")
    return a.dequantize().astype(np.float64) @ b.dequantize().astype(np.float64)


def mls_matmul_error_bound(a: MLSTensor, b: MLSTensor) -> np.ndarray:
    """Per-output bound on ``|mls_matmul(a, b) - mls_matmul_reference(a, b)|``:
    ``2**-24 |ref| + K 2**-52 (|A| @ |B|) + 2**-126`` — the one FP32 rounding (and the
    flush), plus the float64 reference's own summation error."""
    _check_gemm(a, b, "mls_matmul_error_bound")
    A = np.abs(a.dequantize().astype(np.float64))
    B = np.abs(b.dequantize().astype(np.float64))
    ref = np.abs(mls_matmul_reference(a, b))
    K = a.shape[1]
    return ref * 2.0**-24 + (K + 2) * 2.0**-52 * (A @ B) * (1 + 2.0**-24) + 2.0**-126 \
        + math.ulp(0.0)


#: MLS with 2-bit element exponents and 1-bit mantissas (4-bit elements).
MLS_E2M1 = MLSFormat(exp_bits=2, man_bits=1, name="MLS-E2M1")
#: MLS with 2-bit element exponents and 4-bit mantissas (7-bit elements).
MLS_E2M4 = MLSFormat(exp_bits=2, man_bits=4, name="MLS-E2M4")


def _register() -> None:
    from . import formats
    reg = getattr(formats, "register_format", None)
    for f in (MLS_E2M1, MLS_E2M4):
        if reg is not None:
            reg(f)
        else:                       # before the shared registry exists
            formats.FORMATS[f.name.lower()] = f


_register()
