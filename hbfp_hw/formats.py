"""Block-floating-point format descriptions (the single source of truth for widths).

A :class:`BFPFormat` says how a tensor is cut into blocks, how wide the shared exponent
and the per-element mantissas are, and how elements are rounded. The golden model
(:mod:`hbfp_hw.quantize`, :mod:`hbfp_hw.gemm`), the gateware and the host driver all
derive their widths from it.

Numeric rules (see ``docs/numerics.md`` for the full statement):

* shared exponent ``E = max floor(log2|x|)`` over the finite non-zero elements of a
  block, clamped to ``[emin, emax] = [-(2**(exp_bits-1) - 1), 2**(exp_bits-1) - 1]``;
  an all-zero block gets ``emin``;
* element: signed integer ``m`` with ``|m| <= 2**(man_bits-1) - 1``, value
  ``m * 2**(E - (man_bits - 2))``;
* exponent encoding on the wire / in hardware: ``code = E + bias`` with
  ``bias = 2**(exp_bits-1) - 1``; the all-ones code marks an invalid (NaN/Inf) block.
  With ``exp_bits=8`` this is OCP's E8M0 scale.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal
from .validate import check_int as _check_int

__all__ = [
    "ROUNDING_MODES",
    "mantissa_max",
    "fraction_bits",
    "exponent_bias",
    "exponent_invalid_code",
    "Rounding",
    "BFPFormat",
    "MXINT8",
    "HBFP8",
    "HBFP4",
    "CBFP8",
    "FORMATS",
    "SCHEME_FORMATS",
    "FP32",
    "FP32Format",
    "FP32Tensor",
    "register_format",
    "is_bfp",
    "get_format",
    "check_keys",
]

Rounding = Literal["nearest_even", "nearest_away", "toward_zero", "stochastic"]

#: Rounding modes, in the order of their hardware encoding (run-time selectable units
#: use the index in this tuple as the mode register value).
ROUNDING_MODES: tuple[str, ...] = ("nearest_even", "nearest_away", "toward_zero", "stochastic")

MAN_BITS_RANGE = (2, 16)
EXP_BITS_RANGE = (2, 10)
BLOCK_DIM_RANGE = (1, 4096)
BLOCK_SIZE_MAX = 65536
SR_BITS_RANGE = (1, 24)
SEED_RANGE = (0, 2**32 - 1)
SR_LANES_RANGE = (1, 256)


def check_keys(what: str, d: dict, accepted, ignored=()) -> None:
    """Raise ``ValueError`` if ``d`` has keys outside ``accepted`` (or ``ignored``: the
    derived keys a ``to_dict`` writes), naming them, a close match and the accepted keys.

    Used by the ``from_dict`` of formats and unit configurations, so that a misspelt key
    in a ``--config`` JSON is an error rather than a silently ignored setting.
    """
    known = set(accepted) | set(ignored)
    unknown = [k for k in d if k not in known]
    if not unknown:
        return
    named = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), list(accepted), n=1, cutoff=0.6)
        named.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    raise ValueError(f"unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(named)} "
                     f"in the {what}; accepted keys are {', '.join(sorted(accepted))}")


def mantissa_max(man_bits: int) -> int:
    """Largest mantissa magnitude of ``man_bits``-bit symmetric elements."""
    return 2 ** (man_bits - 1) - 1


def fraction_bits(man_bits: int) -> int:
    """Fraction bits of a ``man_bits``-bit mantissa: element ``m * 2**(E - frac)``."""
    return man_bits - 2


def exponent_bias(exp_bits: int) -> int:
    """Bias of the exponent code (``code = E + bias``); also ``emax`` and ``-emin``."""
    return 2 ** (exp_bits - 1) - 1


def exponent_invalid_code(exp_bits: int) -> int:
    """The reserved all-ones exponent code of an invalid (NaN/Inf) block."""
    return 2**exp_bits - 1


@dataclass(frozen=True)
class BFPFormat:
    """An immutable, validated block-floating-point format.

    Parameters
    ----------
    man_bits
        Mantissa width in bits, sign included (two's complement, symmetric range),
        in ``[2, 16]``.
    exp_bits
        Shared-exponent width in bits, in ``[2, 10]``. One code (all ones) is reserved
        for invalid blocks.
    block_shape
        Block extent along each of ``block_axes``; each in ``[1, 4096]``, product at
        most 65536.
    block_axes
        Tensor axes the block extends over (negative values count from the end).
        Axes not listed have block extent 1. Must be distinct and as many as
        ``block_shape``.
    rounding
        One of :data:`ROUNDING_MODES`.
    sr_bits
        Random bits per element for stochastic rounding, in ``[1, 24]``.
    seed
        Seed of the stochastic-rounding generators, in ``[0, 2**32 - 1]``.
    sr_lanes
        Number of parallel generators (one per hardware lane) for stochastic rounding,
        in ``[1, 256]``. Element ``n`` of the block-ordered stream uses lane
        ``n % sr_lanes``. Only affects ``rounding="stochastic"``.
    name
        Optional label used in reports.
    """

    man_bits: int = 8
    exp_bits: int = 8
    block_shape: tuple[int, ...] = (32,)
    block_axes: tuple[int, ...] = (-1,)
    rounding: str = "nearest_even"
    sr_bits: int = 8
    seed: int = 0
    sr_lanes: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        _check_int("man_bits", self.man_bits, *MAN_BITS_RANGE)
        _check_int("exp_bits", self.exp_bits, *EXP_BITS_RANGE)
        shape = tuple(self.block_shape) if not isinstance(self.block_shape, int) else (
            self.block_shape,)
        axes = tuple(self.block_axes) if not isinstance(self.block_axes, int) else (
            self.block_axes,)
        object.__setattr__(self, "block_shape", shape)
        object.__setattr__(self, "block_axes", axes)
        if len(shape) == 0:
            raise ValueError("block_shape must have at least one dimension, got ()")
        if len(shape) != len(axes):
            raise ValueError(
                f"block_shape={shape} and block_axes={axes} must have the same length")
        for i, b in enumerate(shape):
            _check_int(f"block_shape[{i}]", b, *BLOCK_DIM_RANGE)
        size = 1
        for b in shape:
            size *= b
        if size > BLOCK_SIZE_MAX:
            raise ValueError(
                f"block size {size} (block_shape={shape}) is out of range; accepted "
                f"range is [1, {BLOCK_SIZE_MAX}]")
        for i, a in enumerate(axes):
            _check_int(f"block_axes[{i}]", a, -32, 31)
        if len(set(axes)) != len(axes):
            raise ValueError(f"block_axes={axes} must be distinct")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(
                f"rounding={self.rounding!r} is not supported; accepted values are "
                f"{', '.join(ROUNDING_MODES)}")
        _check_int("sr_bits", self.sr_bits, *SR_BITS_RANGE)
        _check_int("seed", self.seed, *SEED_RANGE)
        _check_int("sr_lanes", self.sr_lanes, *SR_LANES_RANGE)

    # -- derived constants ---------------------------------------------------------
    @property
    def emax(self) -> int:
        """Largest shared exponent."""
        return exponent_bias(self.exp_bits)

    @property
    def emin(self) -> int:
        """Smallest shared exponent (also the exponent of an all-zero block)."""
        return -exponent_bias(self.exp_bits)

    @property
    def exp_bias(self) -> int:
        """Bias of the exponent code: ``code = E + exp_bias``."""
        return exponent_bias(self.exp_bits)

    @property
    def exp_invalid_code(self) -> int:
        """Reserved exponent code of a block holding NaN or Inf (all ones)."""
        return exponent_invalid_code(self.exp_bits)

    @property
    def mmax(self) -> int:
        """Largest mantissa magnitude, ``2**(man_bits-1) - 1``."""
        return mantissa_max(self.man_bits)

    @property
    def frac_bits(self) -> int:
        """Element value is ``m * 2**(E - frac_bits)``; ``frac_bits = man_bits - 2``."""
        return fraction_bits(self.man_bits)

    @property
    def block_size(self) -> int:
        """Number of elements in one block."""
        n = 1
        for b in self.block_shape:
            n *= b
        return n

    @property
    def rounding_code(self) -> int:
        """Index of :attr:`rounding` in :data:`ROUNDING_MODES`."""
        return ROUNDING_MODES.index(self.rounding)

    @property
    def bits_per_element(self) -> float:
        """Storage cost in bits per element, exponent amortised over the block."""
        return self.man_bits + self.exp_bits / self.block_size

    def replace(self, **changes: object) -> "BFPFormat":
        """Return a copy with some fields changed (validated again).

        A named format whose element width, exponent width or block size changes gets a
        derived name unless ``name=`` is given: ``HBFP8.replace(block_shape=(1, 16))``
        is ``"HBFP8[1x16]"``, ``HBFP8.replace(man_bits=4)`` is ``"HBFP8[man_bits=4]"``
        (a preset's variants are named against the preset, so replacing back gives the
        preset's name again). Rounding, stochastic-rounding settings and the block's
        orientation (``block_axes``, :meth:`transposed`) keep the name.
        """
        new = dataclasses.replace(self, **changes)
        if "name" not in changes and self.name and _identity(new) != _identity(self):
            object.__setattr__(new, "name", _derived_name(self, new))
        return new

    def transposed(self) -> "BFPFormat":
        """The format of the transpose of a 2-D tensor quantized with this format."""
        axes = []
        for a in self.block_axes:
            if a not in (0, 1, -1, -2):
                raise ValueError(
                    f"transposed() needs block axes within a 2-D tensor, got {self.block_axes}")
            axes.append({0: 1, 1: 0, -1: -2, -2: -1}[a])
        return self.replace(block_axes=tuple(axes))

    def to_dict(self) -> dict:
        """A JSON-serialisable description (used in manifests)."""
        d = dataclasses.asdict(self)
        d["block_shape"] = list(self.block_shape)
        d["block_axes"] = list(self.block_axes)
        d.update(emin=self.emin, emax=self.emax, exp_bias=self.exp_bias,
                 exp_invalid_code=self.exp_invalid_code, mmax=self.mmax,
                 block_size=self.block_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BFPFormat":
        """Inverse of :meth:`to_dict` (derived keys are ignored; unknown keys raise
        ``ValueError`` naming them and the accepted keys)."""
        if not isinstance(d, dict):
            raise ValueError(f"a format must be a JSON object, got {type(d).__name__} {d!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        check_keys("format", d, fields, _DERIVED_KEYS)
        kw = {k: v for k, v in d.items() if k in fields}
        for k in ("block_shape", "block_axes"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def describe(self) -> str:
        """A one-line human description."""
        blk = "x".join(str(b) for b in self.block_shape)
        label = f"{self.name}: " if self.name else ""
        rnd = self.rounding
        if rnd == "stochastic":
            rnd += f"({self.sr_bits} bits, seed {self.seed}, {self.sr_lanes} lanes)"
        return (f"{label}{self.man_bits}-bit mantissas, {self.exp_bits}-bit shared exponent "
                f"[{self.emin}, {self.emax}], blocks {blk} on axes {self.block_axes}, "
                f"{rnd}, {self.bits_per_element:.3f} bits/element")


#: Keys :meth:`BFPFormat.to_dict` adds to the fields (ignored by ``from_dict``).
_DERIVED_KEYS = ("emin", "emax", "exp_bias", "exp_invalid_code", "mmax", "block_size")


def _identity(f: BFPFormat) -> tuple:
    """What a format's name stands for: widths and block extents (in any orientation)."""
    return f.man_bits, f.exp_bits, tuple(sorted(f.block_shape))


def _derived_name(old: BFPFormat, new: BFPFormat) -> str:
    """Name of ``new``, made from ``old`` by :meth:`BFPFormat.replace` with other numerics.

    A preset or a variant of one (``"HBFP8"``, ``"HBFP8[1x16]"``) is named against the
    preset; any other name gets the changes against ``old`` appended.
    """
    stem = old.name.split("[", 1)[0] if old.name.endswith("]") else old.name
    preset = FORMATS.get(stem.lower())
    if preset is not None and preset.name == stem:
        base, ref = stem, preset
    else:
        base, ref = old.name, old
    parts = []
    if sorted(new.block_shape) != sorted(ref.block_shape):
        parts.append("x".join(str(b) for b in new.block_shape))
    if new.man_bits != ref.man_bits:
        parts.append(f"man_bits={new.man_bits}")
    if new.exp_bits != ref.exp_bits:
        parts.append(f"exp_bits={new.exp_bits}")
    return f"{base}[{', '.join(parts)}]" if parts else base


#: OCP MXINT8: 8-bit elements k/64, blocks of 32 along the last axis, E8M0 scale.
MXINT8 = BFPFormat(man_bits=8, exp_bits=8, block_shape=(32,), block_axes=(-1,),
                   rounding="nearest_even", name="MXINT8")
#: HBFP with 8-bit mantissas on 16x16 HyperBlock tiles (one exponent per 2-D tile).
HBFP8 = BFPFormat(man_bits=8, exp_bits=8, block_shape=(16, 16), block_axes=(-2, -1),
                  rounding="nearest_even", name="HBFP8")
#: HyperBlock 4-bit: 4-bit mantissas on 16x16 tiles.
HBFP4 = BFPFormat(man_bits=4, exp_bits=8, block_shape=(16, 16), block_axes=(-2, -1),
                  rounding="nearest_even", name="HBFP4")
#: Channel-wise BFP (CBFP): blocks of 16 consecutive channels (axis 1 of NCHW).
CBFP8 = BFPFormat(man_bits=8, exp_bits=8, block_shape=(16,), block_axes=(1,),
                  rounding="nearest_even", name="CBFP8")

FORMATS: dict[str, BFPFormat] = {f.name.lower(): f for f in (MXINT8, HBFP8, HBFP4, CBFP8)}


@dataclass(frozen=True)
class FP32Tensor:
    """The "quantized" tensor of :data:`FP32`: the float32 values themselves."""

    values: "object"
    fmt: "FP32Format"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def dequantize(self):
        return self.values.copy()


@dataclass(frozen=True)
class FP32Format:
    """No quantization: values are cast to float32 (the roles a scheme leaves in FP32,
    e.g. the forward pass of LUQ's "4-bit gradients, FP32 forward").

    :func:`hbfp_hw.quantize` returns an :class:`FP32Tensor`; ``dequantize`` gives the
    float32 values back unchanged.
    """

    name: str = "fp32"

    def replace(self, **changes: object) -> "FP32Format":
        return dataclasses.replace(self, **changes)

    def quantize_array(self, x, **kw) -> FP32Tensor:
        import numpy as np
        if kw:
            raise TypeError(f"the fp32 format takes no quantize options, got "
                            f"{', '.join(sorted(kw))}")
        return FP32Tensor(np.array(x, dtype=np.float32), self)

    def describe(self) -> str:
        return "FP32 (no quantization)"


#: The identity format (``get_format("fp32")``).
FP32 = FP32Format()

#: Registered formats of the other schemes (LUQ, MLS, ...), by lower-case name. They
#: are quantized by the same :func:`hbfp_hw.quantize` (which calls their
#: ``quantize_array``) and dequantized by :func:`hbfp_hw.dequantize`.
SCHEME_FORMATS: dict[str, object] = {"fp32": FP32}


def is_bfp(fmt: object) -> bool:
    """True for a :class:`BFPFormat` (the formats the BFP datapath runs)."""
    return isinstance(fmt, BFPFormat)


def register_format(fmt: object) -> object:
    """Register a preset of another scheme under ``fmt.name.lower()``, so that
    :func:`get_format` finds it. The object must have a ``name``, ``replace(**changes)``
    and ``quantize_array(x, **kw)`` returning a tensor with ``dequantize()``. Returns
    ``fmt``."""
    name = getattr(fmt, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a registered format needs a non-empty name, got {fmt!r}")
    for attr in ("replace", "quantize_array"):
        if not callable(getattr(fmt, attr, None)):
            raise TypeError(f"format {name!r} has no {attr}() method; a registered format "
                            "needs replace() and quantize_array()")
    key = name.lower()
    if key in FORMATS:
        raise ValueError(f"format name {name!r} is taken by a BFP preset")
    old = SCHEME_FORMATS.get(key)
    if old is not None and old != fmt:
        raise ValueError(f"format name {name!r} is already registered as {old!r}")
    SCHEME_FORMATS[key] = fmt
    return fmt


def _all_names() -> str:
    return ", ".join(sorted({*FORMATS, *SCHEME_FORMATS}))


def get_format(name: str):
    """Look up a preset by (case-insensitive) name: a :class:`BFPFormat` of
    :data:`FORMATS` or a registered format of another scheme (:data:`SCHEME_FORMATS`)."""
    if not isinstance(name, str):
        raise ValueError(f"a format name must be a string, got {type(name).__name__} "
                         f"{name!r}; accepted names are {_all_names()}")
    key = name.lower()
    if key in FORMATS:
        return FORMATS[key]
    if key in SCHEME_FORMATS:
        return SCHEME_FORMATS[key]
    raise ValueError(f"unknown format {name!r}; accepted names are {_all_names()}")


def get_bfp_format(name: str, what: str = "this unit") -> BFPFormat:
    """:func:`get_format` restricted to the BFP presets (what the gateware runs)."""
    if isinstance(name, str) and name.lower() not in SCHEME_FORMATS:
        if name.lower() in FORMATS:
            return FORMATS[name.lower()]
        raise ValueError(f"unknown format {name!r}; accepted names are "
                         f"{', '.join(sorted(FORMATS))}")
    fmt = get_format(name)
    if not isinstance(fmt, BFPFormat):
        raise ValueError(f"format {name!r} is not a block-floating-point format; {what} "
                         f"takes one of {', '.join(sorted(FORMATS))}")
    return fmt
