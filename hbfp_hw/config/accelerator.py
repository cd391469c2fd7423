"""Configuration of a whole accelerator: formats, array, on-chip buffers, link.

:class:`AcceleratorConfig` is the one object the accelerator top, the wire protocol's
buffer map (:func:`hbfp_hw.protocol.buffer_map`), the device emulator and the host
driver derive from. It is exported to JSON (``to_dict``) into the manifest and
returned by the device's INFO command, so the host checks the build it talks to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..formats import FORMATS, HBFP8, BFPFormat, check_keys, get_bfp_format
from ..gemm import DEFAULT_GUARD_BITS, accumulator_bits
from ..validate import check_int as _check_int

__all__ = ["AcceleratorConfig", "BAUD_RATE_RANGE", "ARRAY_DIM_RANGE", "DEPTH_RANGE",
           "K_MAX_RANGE", "GUARD_BITS_RANGE", "MAX_FORMATS", "MAX_ACCUMULATOR_BITS"]

ARRAY_DIM_RANGE = (1, 64)
TILE_RANGE = (1, 256)
DEPTH_RANGE = (16, 1 << 22)
OPERAND_BUFFERS_RANGE = (2, 8)
K_MAX_RANGE = (1, 1 << 20)
GUARD_BITS_RANGE = (0, 16)
BAUD_RATE_RANGE = (9600, 12_000_000)
CLOCK_HZ_RANGE = (1_000_000, 1_000_000_000)
MAX_FORMATS = 8
#: The golden model converts accumulators exactly through float64 (53 bits).
MAX_ACCUMULATOR_BITS = 53


def _formats_from_json(entries) -> tuple[BFPFormat, ...]:
    """``formats`` of a config JSON: a list of preset names and format objects."""
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"formats must be a list of preset names or format objects, got "
                         f"{type(entries).__name__} {entries!r}")
    out = []
    for i, e in enumerate(entries):
        try:
            if isinstance(e, str):
                out.append(get_bfp_format(e, "the accelerator"))
            elif isinstance(e, dict):
                out.append(BFPFormat.from_dict(e))
            else:
                raise ValueError(f"{e!r} is neither a preset name ({', '.join(sorted(FORMATS))}) "
                                 f"nor a format object")
        except (ValueError, TypeError) as err:
            raise ValueError(f"formats[{i}]: {err}") from None
    return tuple(out)


_NO_VALUE = object()   # the default of fields that :data:`_OMIT_AT_DEFAULT` does not name


def _block_2d(fmt: BFPFormat) -> tuple[int, int]:
    """Block extent (rows, cols) of ``fmt`` on a 2-D tensor."""
    block = [1, 1]
    for a, b in zip(fmt.block_axes, fmt.block_shape):
        block[a % 2] = b
    return block[0], block[1]


#: accepted ``bitlayer_lanes`` (0: no bit-serial engine)
BITLAYER_LANES = (0, 8, 16, 32)
#: accepted ``luq_lanes`` (0: no LUQ engine)
LUQ_LANES = (0, 1, 2, 4, 8)
#: accepted ``sparse_lanes`` (0: no sparse engine; 4: 2:4, 8: 4:8)
SPARSE_LANES = (0, 4, 8)
#: accepted ``conv`` (0: no CONV address generator in the GEMM engine)
CONV_VALUES = (0, 1)
#: accepted ``array_lanes`` (0: the largest of 4, 2, 1 dividing ``tile``)
ARRAY_LANES = (0, 1, 2, 4, 8)
#: accepted ``mls_lanes`` (0: no MLS engine)
MLS_LANES = (0, 1, 2, 4)
#: accepted ``quantize`` (0: no QUANTIZE engine; the host quantizes)
QUANTIZE_VALUES = (0, 1)
#: accepted ``stats`` (0: no statistics engine, READ_STATS answers UNSUPPORTED)
STATS_VALUES = (0, 1)
#: accepted ``info_rom``: ``"full"`` (the whole device description) or ``"config"``
#: (the configuration only; the host derives the protocol and the buffer map)
INFO_ROM_VALUES = ("full", "config")
#: accepted ``stage_ram``: ``"dual"`` (separate write and read addresses) or ``"single"``
#: (one address: maps to an iCE40 SPRAM)
STAGE_RAM_VALUES = ("dual", "single")
#: Fields added after the first hardware builds: left out of :meth:`AcceleratorConfig.
#: to_dict` (and so of the device description and its hash) at their default value, so
#: the builds that predate them keep their device hash.
_OMIT_AT_DEFAULT = {"quantize": 1, "stats": 1, "info_rom": "full", "stage_ram": "dual",
                    "array_clock_hz": 0, "array_lanes": 0}


@dataclass(frozen=True)
class AcceleratorConfig:
    """An immutable, validated accelerator configuration.

    Parameters
    ----------
    formats
        The BFP formats the on-chip quantizer implements, one per *format slot*
        (1 to 8). Commands name a format by its slot index. Block axes must lie within a
        2-D tensor (``-2, -1, 0, 1``), ``man_bits <= 16``, ``exp_bits <= 10``.
    array_rows, array_cols
        MAC array dimensions, each in ``[1, 64]``.
    tile
        Edge of the output tile the array computes per pass, in ``[1, 256]``; a
        multiple of ``array_rows`` and ``array_cols``.
    operand_buffers
        Number of BFP operand buffers (``op0`` ...), in ``[2, 8]``; three hold the
        HyperBlock trio X, W, dY at once.
    operand_depth
        Mantissas per operand buffer, in ``[16, 2**22]``.
    input_depth
        FP32 words in the quantizer's input staging buffer ``fp_in``.
    output_depth
        FP32 words in the result buffer ``out``.
    k_max
        Largest reduction length the accumulators are sized for, in ``[1, 2**20]``.
    guard_bits
        Accumulator guard bits (see :mod:`hbfp_hw.gemm`), in ``[0, 16]``.
    baud_rate
        UART link rate in bit/s (8N1: 10 bits per byte), in ``[9600, 12000000]``.
    clock_hz
        Design clock frequency, in ``[1e6, 1e9]``.
    name
        Label used in reports and as the Verilog top name suffix.
    bitlayer_lanes
        Weight bits per word of the bit-serial engine (BITLAYER, bit-layer GEMMs of
        ``docs/bitlayers.md``): one of ``0, 8, 16, 32``; ``0`` builds no bit-serial engine
        (BITLAYER answers UNSUPPORTED) and no ``bl.*`` buffers.
    luq_lanes
        Generator lanes of the LUQ engine's quantizer (LUQ_GEMM, LUQ_QUANTIZE of
        ``docs/luq.md``; the ``LUQFormat.lanes`` its codes are bit-exact with): one of
        ``0, 1, 2, 4, 8``; ``0`` (the default) builds no LUQ engine (both commands answer
        UNSUPPORTED) and no ``luq.a`` buffer.
    sparse_lanes
        ``M`` of the sparse engine's transposable ``N:M`` pattern, ``N = M / 2`` (SPARSE_GEMM,
        ``docs/sparsity.md``): one of ``0, 4, 8`` (4: 2:4, 8: 4:8; ``tile`` a multiple of
        it); ``0`` (the default) builds no sparse engine (SPARSE_GEMM answers UNSUPPORTED)
        and no ``sp.*`` buffers.
    conv
        ``1`` builds the CONV address generator into the GEMM engine (HyperBlock
        convolutions of ``docs/conv.md`` on the MAC array, opcode CONV); ``0`` (the
        default) builds none and CONV answers UNSUPPORTED.
    mls_lanes
        Element pairs per clock of the MLS engine (MLS_GEMM, MLS_QUANTIZE of
        ``docs/mls.md``): one of ``0, 1, 2, 4``; ``0`` (the default) builds no MLS engine
        (both commands answer UNSUPPORTED) and no ``mls.*`` buffers.
    array_clock_hz
        Clock of the MAC array's own clock domain ``"array"`` (the MAC array and the
        accumulator buffer behind it, fed and drained through asynchronous FIFOs,
        ``gateware/engines/gemm_stream.py``): ``0`` (the default) or in ``[1e6, 1e9]``;
        ``0`` keeps the array on the design clock ``clock_hz``. A board build derives it
        from a second PLL output (``docs/board.md``); a plain top gets ports
        ``array_clk`` / ``array_rst``. Peak throughput counts MACs at this clock. Listed
        in :meth:`to_dict` only when set, so single-clock descriptions are unchanged.
    array_lanes
        Products per PE per clock of the MAC array (its ``lanes``): ``0`` (the default:
        the largest of 4, 2, 1 dividing ``tile``) or one of ``1, 2, 4, 8`` dividing
        ``tile``. Listed in :meth:`to_dict` only when set.
    quantize
        ``1`` (the default) builds the QUANTIZE engine (one quantizer per format slot);
        ``0`` builds none: QUANTIZE answers UNSUPPORTED and the host driver quantizes with
        the golden model and WRITEs the BFP blocks (``Device.matmul``), bit-identical.
        ``input_depth`` (``fp_in``, which only QUANTIZE reads) can then be the minimum,
        16. Listed in :meth:`to_dict` only when 0.
    stats
        ``1`` (the default) builds the statistics engine (READ_STATS, two FP32 range
        trackers); ``0`` builds none and READ_STATS answers UNSUPPORTED. Listed in
        :meth:`to_dict` only when 0.
    info_rom
        What the JSON of the INFO answer holds: ``"full"`` (the default: protocol,
        configuration, buffer map) or ``"config"`` (the configuration only, about a
        fifth of the ROM). INFO's hash always covers the whole description: the host
        derives the protocol and the buffer map from the configuration and checks the
        hash against them. Listed in :meth:`to_dict` only when not ``"full"``.
    stage_ram
        The request staging RAM (one frame's payload, ``MAX_PAYLOAD`` bytes):
        ``"dual"`` (the default: a write and a read address) or ``"single"`` (one
        address, the executor's while it stages a request, the engines' while they run
        it), which yosys maps to an iCE40 SPRAM (``synth_ice40 -spram``) instead of 9
        SB_RAM40_4K. Same behaviour. Listed in :meth:`to_dict` only when ``"single"``.
    """

    formats: tuple[BFPFormat, ...] = (HBFP8,)
    array_rows: int = 8
    array_cols: int = 8
    tile: int = 16
    operand_buffers: int = 3
    operand_depth: int = 65536
    input_depth: int = 16384
    output_depth: int = 16384
    k_max: int = 4096
    guard_bits: int = DEFAULT_GUARD_BITS
    baud_rate: int = 3_000_000
    clock_hz: int = 50_000_000
    name: str = "hbfp"
    bitlayer_lanes: int = 16
    luq_lanes: int = 0
    sparse_lanes: int = 0
    conv: int = 0
    mls_lanes: int = 0
    array_clock_hz: int = 0
    array_lanes: int = 0
    quantize: int = 1
    stats: int = 1
    info_rom: str = "full"
    stage_ram: str = "dual"

    def __post_init__(self) -> None:
        fmts = self.formats
        if isinstance(fmts, BFPFormat):
            fmts = (fmts,)
        fmts = tuple(fmts)
        object.__setattr__(self, "formats", fmts)
        if not 1 <= len(fmts) <= MAX_FORMATS:
            raise ValueError(f"formats has {len(fmts)} entries; accepted range is "
                             f"[1, {MAX_FORMATS}]")
        for i, f in enumerate(fmts):
            if not isinstance(f, BFPFormat):
                raise ValueError(f"formats[{i}] must be a BFPFormat, got {type(f).__name__}")
            for a in f.block_axes:
                if a not in (-2, -1, 0, 1):
                    raise ValueError(
                        f"formats[{i}].block_axes={f.block_axes}: axis {a} is outside a 2-D "
                        f"tensor; accepted axes are -2, -1, 0, 1")
            if len({a % 2 for a in f.block_axes}) != len(f.block_axes):
                raise ValueError(f"formats[{i}].block_axes={f.block_axes} name an axis twice")
        _check_int("array_rows", self.array_rows, *ARRAY_DIM_RANGE)
        _check_int("array_cols", self.array_cols, *ARRAY_DIM_RANGE)
        _check_int("tile", self.tile, *TILE_RANGE)
        for n, d in (("array_rows", self.array_rows), ("array_cols", self.array_cols)):
            if self.tile % d:
                raise ValueError(f"tile={self.tile} must be a multiple of {n}={d}")
        _check_int("operand_buffers", self.operand_buffers, *OPERAND_BUFFERS_RANGE)
        for n in ("operand_depth", "input_depth", "output_depth"):
            _check_int(n, getattr(self, n), *DEPTH_RANGE)
        for i, f in enumerate(fmts):
            if f.block_size > self.operand_depth:
                raise ValueError(
                    f"formats[{i}] block size {f.block_size} exceeds operand_depth="
                    f"{self.operand_depth}; accepted range is [1, {self.operand_depth}]")
        _check_int("k_max", self.k_max, *K_MAX_RANGE)
        _check_int("guard_bits", self.guard_bits, *GUARD_BITS_RANGE)
        _check_int("baud_rate", self.baud_rate, *BAUD_RATE_RANGE)
        _check_int("clock_hz", self.clock_hz, *CLOCK_HZ_RANGE)
        acc = self.accumulator_bits
        if acc > MAX_ACCUMULATOR_BITS:
            raise ValueError(
                f"k_max={self.k_max} with guard_bits={self.guard_bits} needs a "
                f"{acc}-bit accumulator; accepted range is [1, {MAX_ACCUMULATOR_BITS}] bits "
                f"(reduce k_max or guard_bits)")
        if (not isinstance(self.bitlayer_lanes, int) or isinstance(self.bitlayer_lanes, bool)
                or self.bitlayer_lanes not in BITLAYER_LANES):
            raise ValueError(f"bitlayer_lanes={self.bitlayer_lanes!r}; accepted values are "
                             f"{', '.join(map(str, BITLAYER_LANES))} (0: no bit-serial engine)")
        if (not isinstance(self.luq_lanes, int) or isinstance(self.luq_lanes, bool)
                or self.luq_lanes not in LUQ_LANES):
            raise ValueError(f"luq_lanes={self.luq_lanes!r}; accepted values are "
                             f"{', '.join(map(str, LUQ_LANES))} (0: no LUQ engine)")
        if self.luq_lanes:
            from hbfp_hw.luq import LUQFormat, luq_accumulator_bits
            luq_acc = luq_accumulator_bits(LUQFormat(samples=16), self.man_bits_max,
                                           self.tile, self.k_max, self.guard_bits)
            if luq_acc > MAX_ACCUMULATOR_BITS:
                raise ValueError(
                    f"luq_lanes={self.luq_lanes} with k_max={self.k_max} and guard_bits="
                    f"{self.guard_bits} needs a {luq_acc}-bit LUQ accumulator; accepted "
                    f"range is [1, {MAX_ACCUMULATOR_BITS}] bits (reduce k_max or guard_bits)")
        if (not isinstance(self.sparse_lanes, int) or isinstance(self.sparse_lanes, bool)
                or self.sparse_lanes not in SPARSE_LANES):
            raise ValueError(f"sparse_lanes={self.sparse_lanes!r}; accepted values are "
                             f"{', '.join(map(str, SPARSE_LANES))} (0: no sparse engine)")
        if self.sparse_lanes and self.tile % self.sparse_lanes:
            ok = ", ".join(str(v) for v in SPARSE_LANES if not v or self.tile % v == 0)
            raise ValueError(f"sparse_lanes={self.sparse_lanes} needs tile={self.tile} to be "
                             f"a multiple of it; accepted values for this tile are {ok}")
        if (not isinstance(self.conv, int) or isinstance(self.conv, bool)
                or self.conv not in CONV_VALUES):
            raise ValueError(f"conv={self.conv!r}; accepted values are "
                             f"{', '.join(map(str, CONV_VALUES))} (0: no CONV address generator)")
        if (not isinstance(self.mls_lanes, int) or isinstance(self.mls_lanes, bool)
                or self.mls_lanes not in MLS_LANES):
            raise ValueError(f"mls_lanes={self.mls_lanes!r}; accepted values are "
                             f"{', '.join(map(str, MLS_LANES))} (0: no MLS engine)")
        if self.array_clock_hz != 0:
            if (not isinstance(self.array_clock_hz, int) or isinstance(self.array_clock_hz, bool)
                    or not CLOCK_HZ_RANGE[0] <= self.array_clock_hz <= CLOCK_HZ_RANGE[1]):
                raise ValueError(
                    f"array_clock_hz={self.array_clock_hz!r}; accepted values are 0 (the array "
                    f"on the design clock) or an integer in [{CLOCK_HZ_RANGE[0]}, "
                    f"{CLOCK_HZ_RANGE[1]}] Hz")
        if (not isinstance(self.array_lanes, int) or isinstance(self.array_lanes, bool)
                or self.array_lanes not in ARRAY_LANES
                or (self.array_lanes and self.tile % self.array_lanes)):
            ok = ", ".join(str(v) for v in ARRAY_LANES if not v or self.tile % v == 0)
            raise ValueError(f"array_lanes={self.array_lanes!r}; accepted values for "
                             f"tile={self.tile} are {ok} (0: automatic)")
        for n, ok, what in (("quantize", QUANTIZE_VALUES, "no QUANTIZE engine"),
                            ("stats", STATS_VALUES, "no statistics engine")):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v not in ok:
                raise ValueError(f"{n}={v!r}; accepted values are "
                                 f"{', '.join(map(str, ok))} (0: {what})")
        for n, ok in (("info_rom", INFO_ROM_VALUES), ("stage_ram", STAGE_RAM_VALUES)):
            v = getattr(self, n)
            if not isinstance(v, str) or v not in ok:
                raise ValueError(f"{n}={v!r}; accepted values are {', '.join(map(repr, ok))}")
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name={self.name!r} must be a non-empty identifier")

    # -- derived constants ---------------------------------------------------------
    @property
    def man_bits_max(self) -> int:
        """Widest mantissa over all format slots (operand buffer element width)."""
        return max(f.man_bits for f in self.formats)

    @property
    def exp_bits_max(self) -> int:
        """Widest exponent over all format slots (exponent buffer element width)."""
        return max(f.exp_bits for f in self.formats)

    @property
    def min_block_size(self) -> int:
        """Smallest block over all format slots (sizes the exponent buffers)."""
        return min(f.block_size for f in self.formats)

    @property
    def exponent_depth(self) -> int:
        """Exponent codes per operand buffer: one per block of the smallest format."""
        return -(-self.operand_depth // self.min_block_size)

    @property
    def accumulator_bits(self) -> int:
        """Accumulator width (sign included): no overflow for any slot pair up to k_max."""
        width = 0
        for fa in self.formats:
            for fb in self.formats:
                for L in {1, *fa.block_shape, *fb.block_shape}:
                    width = max(width, accumulator_bits(fa.man_bits, fb.man_bits, L,
                                                        self.k_max, self.guard_bits))
        return width

    @property
    def link_bytes_per_second(self) -> float:
        """Raw UART byte rate (8N1: 10 bit times per byte)."""
        return self.baud_rate / 10.0

    def block_2d(self, slot: int) -> tuple[int, int]:
        """Block extent ``(rows, cols)`` of format slot ``slot`` on a 2-D tensor."""
        return _block_2d(self.formats[slot])

    def replace(self, **changes: object) -> "AcceleratorConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serialisable description (manifest, INFO)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if _OMIT_AT_DEFAULT.get(f.name, _NO_VALUE) != getattr(self, f.name)}
        d["formats"] = [f.to_dict() for f in self.formats]
        d["accumulator_bits"] = self.accumulator_bits
        d["exponent_depth"] = self.exponent_depth
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AcceleratorConfig":
        """Inverse of :meth:`to_dict` (derived keys are ignored).

        Unknown keys raise ``ValueError`` naming them and the accepted keys. Each entry
        of ``formats`` is a format object (:meth:`BFPFormat.to_dict` keys) or a preset
        name (``"hbfp8"``, see :data:`hbfp_hw.formats.FORMATS`).
        """
        if not isinstance(d, dict):
            raise ValueError(f"an accelerator config must be a JSON object, got "
                             f"{type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        check_keys("accelerator config", d, names, ("accumulator_bits", "exponent_depth"))
        kw = {k: v for k, v in d.items() if k in names}
        if "formats" in kw:
            kw["formats"] = _formats_from_json(kw["formats"])
        return cls(**kw)

    @classmethod
    def default(cls) -> "AcceleratorConfig":
        """The default accelerator: HBFP8 16x16 tiles, 8x8 array, 64 Ki-element buffers."""
        return cls()
