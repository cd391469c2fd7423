"""Configuration of the streaming FP32 -> BFP quantizer unit.

:class:`QuantizerConfig` is the single source of truth for the gateware
(:class:`hbfp_hw.gateware.quantizer.Quantizer`), its manifest, its testbenches and the
golden model call that checks it (:meth:`QuantizerConfig.golden_format`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..formats import ROUNDING_MODES, BFPFormat, check_keys, get_bfp_format

__all__ = ["QuantizerConfig", "LANES_RANGE"]

#: Accepted number of FP32 lanes per stream beat.
LANES_RANGE = (1, 64)


@dataclass(frozen=True)
class QuantizerConfig:
    """A validated quantizer configuration.

    Parameters
    ----------
    format : BFPFormat
        Element and exponent widths, block size (``format.block_size`` elements,
        the block shape is flattened: the unit sees blocks in stream order), rounding
        mode (the mode after reset when ``runtime_rounding``), SR bits and seed.
    lanes : int
        FP32 values per input beat and mantissas per output beat, in ``[1, 64]``;
        ``format.block_size`` must be a multiple of it.
    runtime_rounding : bool
        If true the unit has a ``rounding`` input port (value = index in
        :data:`hbfp_hw.formats.ROUNDING_MODES`) and implements every mode; otherwise
        only ``format.rounding`` is built.
    static_exponent : bool
        If true the unit has ``static_en`` / ``static_code`` input ports: while
        ``static_en`` is high every valid block takes the shared exponent
        ``static_code - exp_bias`` instead of its block maximum (golden
        ``quantize(..., exponent=E)``). Off by default (the standalone unit and its
        Verilog are unchanged).
    """

    format: BFPFormat
    lanes: int = 1
    runtime_rounding: bool = False
    static_exponent: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.format, BFPFormat):
            raise ValueError(
                f"format must be a BFPFormat, got {type(self.format).__name__}")
        lo, hi = LANES_RANGE
        if isinstance(self.lanes, bool) or not isinstance(self.lanes, int):
            raise ValueError(f"lanes must be an integer in [{lo}, {hi}], got {self.lanes!r}")
        if not lo <= self.lanes <= hi:
            raise ValueError(f"lanes={self.lanes} is out of range; accepted range is "
                             f"[{lo}, {hi}]")
        bs = self.format.block_size
        if bs % self.lanes:
            raise ValueError(
                f"block size {bs} (block_shape={self.format.block_shape}) is not a multiple "
                f"of lanes={self.lanes}; accepted lanes are the divisors of {bs} in "
                f"[{lo}, {hi}]: {[d for d in range(lo, min(hi, bs) + 1) if bs % d == 0]}")
        if not isinstance(self.runtime_rounding, bool):
            raise ValueError(
                f"runtime_rounding must be True or False, got {self.runtime_rounding!r}")
        if not isinstance(self.static_exponent, bool):
            raise ValueError(
                f"static_exponent must be True or False, got {self.static_exponent!r}")
        if self.format.sr_lanes != self.lanes:
            # the unit has one stochastic-rounding generator per lane: the format it
            # implements (and its manifest) says so
            object.__setattr__(self, "format", self.format.replace(sr_lanes=self.lanes))

    # -- derived constants -----------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.format.block_size

    @property
    def beats_per_block(self) -> int:
        """Input (and output) beats per block."""
        return self.format.block_size // self.lanes

    @property
    def man_bits(self) -> int:
        return self.format.man_bits

    @property
    def exp_bits(self) -> int:
        return self.format.exp_bits

    @property
    def has_stochastic(self) -> bool:
        """Whether the stochastic-rounding generators are built."""
        return self.runtime_rounding or self.format.rounding == "stochastic"

    @property
    def rounding_modes(self) -> tuple[str, ...]:
        """Modes the unit implements."""
        return ROUNDING_MODES if self.runtime_rounding else (self.format.rounding,)

    def golden_format(self, rounding: str | None = None, seed: int | None = None) -> BFPFormat:
        """The golden-model format that the unit reproduces bit for bit.

        A 1-D block of ``block_size`` elements along the last axis, one SR generator per
        lane (``sr_lanes=lanes``), with ``rounding`` / ``seed`` overriding the format's.
        """
        rnd = self.format.rounding if rounding is None else rounding
        if rnd not in self.rounding_modes:
            raise ValueError(f"rounding={rnd!r} is not built into this unit; accepted "
                             f"values are {', '.join(self.rounding_modes)}")
        return self.format.replace(
            block_shape=(self.block_size,), block_axes=(-1,), rounding=rnd,
            sr_lanes=self.lanes, seed=self.format.seed if seed is None else seed)

    def to_dict(self) -> dict:
        d = {"format": self.format.to_dict(), "lanes": self.lanes,
             "runtime_rounding": self.runtime_rounding,
             "block_size": self.block_size, "beats_per_block": self.beats_per_block,
             "rounding_modes": list(self.rounding_modes)}
        if self.static_exponent:   # only when built: default manifests are unchanged
            d["static_exponent"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizerConfig":
        """Inverse of :meth:`to_dict` (derived keys are ignored; unknown keys raise
        ``ValueError`` naming them and the accepted keys). ``format`` is a format object
        or a preset name; missing keys take the defaults (``format``: ``BFPFormat()``)."""
        if not isinstance(d, dict):
            raise ValueError(f"a quantizer config must be a JSON object, got "
                             f"{type(d).__name__}")
        check_keys("quantizer config", d,
                   ("format", "lanes", "runtime_rounding", "static_exponent"),
                   ("block_size", "beats_per_block", "rounding_modes"))
        f = d.get("format", {})
        try:
            fmt = (get_bfp_format(f, "the quantizer") if isinstance(f, str)
                   else BFPFormat.from_dict(f))
        except (ValueError, TypeError) as e:
            raise ValueError(f"format: {e}") from None
        return cls(format=fmt, lanes=d.get("lanes", 1),
                   runtime_rounding=d.get("runtime_rounding", False),
                   static_exponent=d.get("static_exponent", False))
