"""Per-tensor uniform integer quantization with dynamic or in-hindsight ranges.

The quantizer is asymmetric and uniform over a range ``[lo, hi]`` (Fournarakis & Nagel,
"In-Hindsight Quantization Range Estimation", CVPRW'21)::

    lo' = min(lo, 0), hi' = max(hi, 0)           (the range always holds 0 exactly)
    s = (hi' - lo') / (2**bits - 1)              (s = 1 if hi' == lo')
    z = round(-lo' / s)                          (zero point, in [0, 2**bits - 1])
    q = clip(round(x / s) + z, 0, 2**bits - 1)   (round half to even)
    x_hat = s * (q - z)

All arithmetic is float64 then cast to float32 (this is the golden model of the int8
path; the accelerator's datapath is BFP, see ``docs/training.md``).

Range sources:

* ``"dynamic"``: ``[lo, hi] = [min x_t, max x_t]`` of the tensor being quantized (needs
  the whole tensor in FP32 before quantizing, which is what in-hindsight avoids);
* ``"hindsight"``: the range for step ``t`` is fixed *before* ``x_t`` exists, from an
  exponential moving average of the min/max of steps ``< t``::

      lo_1 = min x_0                          (initialised from the first batch)
      lo_{t+1} = eta * lo_t + (1 - eta) * min x_t,   eta = 0.9   (same for hi)

  and step 0 (no history yet) uses the first batch's own range. The statistics are the
  min/max of the *unclipped* tensor, which the hardware gathers online with the range
  tracker (:class:`hbfp_hw.gateware.range_tracker.RangeTracker`) while it streams the
  quantized output out; on the emulate backend :meth:`RangeStats.observe` computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hbfp_hw.formats import BFPFormat

__all__ = ["uniform_params", "quantize_uniform", "fake_quantize_uniform", "RangeEMA",
           "UniformQuantizer", "dynamic_int8", "hindsight_int8", "exponent_for_range",
           "StaticExpQuantizer"]


def uniform_params(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """Scale and zero point of the asymmetric ``bits``-bit grid over ``[lo, hi]``."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is out of range; accepted range is [2, 16]")
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    if lo > hi:
        raise ValueError(f"range [{lo}, {hi}] is empty (lo > hi)")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**bits - 1
    s = (hi - lo) / levels if hi > lo else 1.0
    z = int(np.clip(np.rint(-lo / s), 0, levels))
    return s, z


def quantize_uniform(x: np.ndarray, lo: float, hi: float,
                     bits: int = 8) -> tuple[np.ndarray, float, int]:
    """Integer codes ``q`` (uint8/uint16), scale and zero point of ``x`` on ``[lo, hi]``."""
    s, z = uniform_params(lo, hi, bits)
    q = np.clip(np.rint(np.asarray(x, dtype=np.float64) / s) + z, 0, 2**bits - 1)
    return q.astype(np.uint8 if bits <= 8 else np.uint16), s, z


def fake_quantize_uniform(x: np.ndarray, lo: float, hi: float, bits: int = 8) -> np.ndarray:
    """``s * (q - z)`` as float32: the values the integer GEMM sees."""
    q, s, z = quantize_uniform(x, lo, hi, bits)
    return (s * (q.astype(np.float64) - z)).astype(np.float32)


@dataclass
class RangeEMA:
    """EMA of per-step min/max; :attr:`range` is the range to use for the next step."""

    eta: float = 0.9
    lo: float | None = None
    hi: float | None = None
    steps: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta < 1.0:
            raise ValueError(f"eta={self.eta!r} is out of range; accepted range is [0, 1)")

    @property
    def initialised(self) -> bool:
        return self.lo is not None

    @property
    def range(self) -> tuple[float, float]:
        if self.lo is None or self.hi is None:
            raise ValueError("RangeEMA has no statistics yet (no step observed)")
        return self.lo, self.hi

    def update(self, xmin: float, xmax: float) -> None:
        """Fold in the min/max observed at the current step."""
        if self.lo is None:
            self.lo, self.hi = float(xmin), float(xmax)
        else:
            self.lo = self.eta * self.lo + (1.0 - self.eta) * float(xmin)
            self.hi = self.eta * self.hi + (1.0 - self.eta) * float(xmax)
        self.steps += 1


def _init_range_source(q, default_name: str) -> None:
    """Validate ``q.method``; give ``q`` fresh EMA statistics and its default name."""
    if q.method not in ("dynamic", "hindsight"):
        raise ValueError(f"method={q.method!r}; accepted values are 'dynamic', 'hindsight'")
    if q.ema is None:
        q.ema = RangeEMA(q.eta)
    if not q.name:
        q.name = default_name


@dataclass
class UniformQuantizer:
    """A per-tensor ``bits``-bit asymmetric quantizer with a range source.

    Parameters
    ----------
    method : {"dynamic", "hindsight"}
    bits : int
    eta : float
        EMA momentum of the in-hindsight statistics.
    name : str
    """

    method: str = "hindsight"
    bits: int = 8
    eta: float = 0.9
    name: str = ""
    ema: RangeEMA = field(default=None, repr=False)  # type: ignore[assignment]
    #: (lo, hi) used for each quantization, for inspection / tests
    history: list = field(default_factory=list, repr=False)
    keep_history: bool = False

    def __post_init__(self) -> None:
        uniform_params(0.0, 1.0, self.bits)  # validates bits
        _init_range_source(self, f"{self.method}-int{self.bits}")

    def fresh(self) -> "UniformQuantizer":
        """A copy with no statistics (each tensor of each layer needs its own)."""
        return UniformQuantizer(self.method, self.bits, self.eta, self.name,
                                keep_history=self.keep_history)

    def __call__(self, x: np.ndarray, *, update: bool = True) -> np.ndarray:
        """Fake-quantize ``x``; with ``update`` fold its min/max into the statistics."""
        x = np.asarray(x, dtype=np.float32)
        xmin, xmax = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if self.method == "dynamic" or not self.ema.initialised:
            lo, hi = xmin, xmax
        else:
            lo, hi = self.ema.range
        if update or not self.ema.initialised:
            self.ema.update(xmin, xmax)
        if self.keep_history:
            self.history.append((lo, hi))
        return fake_quantize_uniform(x, lo, hi, self.bits)


def dynamic_int8() -> UniformQuantizer:
    """Per-tensor int8 with the current tensor's min/max."""
    return UniformQuantizer("dynamic", 8, name="dynamic-int8")


def hindsight_int8(eta: float = 0.9) -> UniformQuantizer:
    """Per-tensor int8 with in-hindsight (previous steps' EMA) ranges."""
    return UniformQuantizer("hindsight", 8, eta, name="hindsight-int8")


# -- the accelerator's in-hindsight quantizer: one static BFP exponent per tensor --------

def exponent_for_range(lo: float, hi: float, fmt: BFPFormat) -> int:
    """The shared exponent ``E = floor(log2 max(|lo|, |hi|))`` of the BFP rule, clamped to
    ``[fmt.emin, fmt.emax]`` (``emin`` for an all-zero range): with it every value of the
    range is representable without saturation, as in a block whose maximum it is."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    amax = max(abs(float(lo)), abs(float(hi)))
    if amax == 0.0:
        return fmt.emin
    e = int(np.frexp(amax)[1]) - 1          # amax = f * 2**(e+1), f in [0.5, 1)
    return int(min(max(e, fmt.emin), fmt.emax))


@dataclass
class StaticExpQuantizer:
    """A per-tensor symmetric ``man_bits``-bit quantizer with a power-of-two scale: the
    BFP format ``fmt`` with *one* shared exponent for the whole tensor, chosen from a
    range (:func:`exponent_for_range`), elements above the range saturating.

    This is the in-hindsight quantizer the accelerator runs: the exponent is a QUANTIZE
    field (``STATIC_EXP``), so a tensor streams through the quantizer once; the range
    tracker on the quantizer input gathers the min/max that set the next step's range
    (``READ_STATS`` with ``QUANTIZE_INPUT``). With HBFP8 it is int8 (codes in +-127)
    with the scale ``2**(E - 6)``; the result is an ordinary HyperBlock BFP tensor, so the
    MAC array, the tile buffer's transposition and the quantize-once rule apply as for
    any BFP format.

    Parameters
    ----------
    fmt : BFPFormat
        A HyperBlock (2-D tile) format, e.g. ``HBFP8``; on a device backend, one of its
        format slots.
    method : {"dynamic", "hindsight"}
        ``"dynamic"``: the tensor's own min/max (a statistics pass before quantizing);
        ``"hindsight"``: the EMA of the previous steps' min/max (:class:`RangeEMA`, the
        first step uses its own range, as :class:`UniformQuantizer`).
    eta : float
        EMA momentum.
    """

    fmt: BFPFormat
    method: str = "hindsight"
    eta: float = 0.9
    name: str = ""
    ema: RangeEMA = field(default=None, repr=False)  # type: ignore[assignment]
    #: (lo, hi, E) used for each quantization, for inspection / tests
    history: list = field(default_factory=list, repr=False)
    keep_history: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, BFPFormat):
            raise TypeError(f"fmt must be a BFPFormat, got {type(self.fmt).__name__}")
        _init_range_source(self, f"{self.method}-{self.fmt.name}-static")

    def fresh(self) -> "StaticExpQuantizer":
        """A copy with no statistics (each tensor of each layer needs its own)."""
        return StaticExpQuantizer(self.fmt, self.method, self.eta, self.name,
                                  keep_history=self.keep_history)

    @property
    def needs_current_range(self) -> bool:
        """True when this step's exponent needs the tensor's own range first."""
        return self.method == "dynamic" or not self.ema.initialised

    def exponent(self, current: tuple[float, float] | None = None) -> int:
        """This step's exponent: from ``current`` (the tensor's own (min, max)) when
        :attr:`needs_current_range`, else from the EMA of past steps."""
        if self.needs_current_range:
            if current is None:
                raise ValueError(f"{self.name}: this step needs the tensor's own range")
            lo, hi = current
        else:
            lo, hi = self.ema.range
        e = exponent_for_range(lo, hi, self.fmt)
        if self.keep_history:
            self.history.append((lo, hi, e))
        return e

    def observe(self, lo: float, hi: float, *, update: bool = True) -> None:
        """Fold the step's min/max (of the unclipped tensor) into the statistics; as
        :class:`UniformQuantizer`, the first observation always initialises them."""
        if update or not self.ema.initialised:
            self.ema.update(lo, hi)
