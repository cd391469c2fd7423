"""Boards: the platform, the PLL and the board top around the UART accelerator.

:data:`BOARDS` lists the supported boards (an amaranth-boards platform, the UART and LED
resources, the board's default :class:`~hbfp_hw.config.accelerator.AcceleratorConfig`
overrides and the FPGA's resources). :class:`BoardTop` wraps
:class:`~hbfp_hw.gateware.top.UartAccelerator` with the board clock (through
:func:`ecp5_pll` when the design clock differs), the reset synchroniser, the UART pins and
two LEDs. :func:`resource_estimate` predicts block RAM and multiplier use before a build.
The build flow itself is :mod:`hbfp_hw.gateware.build`.

Clocking
--------
The ULX3S has a 25 MHz oscillator. The design clock is made by an ECP5 ``EHXPLLL``
whose dividers :func:`ecp5_pll` computes (the search of Trellis' ``ecppll``); the
*achieved* PLL frequency (not the requested one) becomes the configuration's
``clock_hz``, so the UART divisor (:func:`~hbfp_hw.gateware.uart.uart_divisor`), the
partial-frame timeout and the device description all derive from the real clock. The
board default is 45 MHz: an exact PLL ratio (25 MHz / 5 x 9) and an exact UART divisor
of 15 at 3 Mbaud (25 MHz itself cannot carry 3 Mbaud: divisor 8.33), met by the routed
board accelerator (Fmax 47.9 MHz, docs/board.md; 60 MHz, the next exact divisor, is not
met). The 3 Mbaud link, not the clock, bounds the board's throughput.
A requested clock equal to the board clock bypasses the PLL. The iCEBreaker (iCE40UP5K)
runs its reduced build (:data:`ICEBREAKER_CONFIG`) from the 12 MHz oscillator, no PLL.

A config with ``array_clock_hz`` runs the MAC array in its own clock domain ``array``
(``gateware/engines/gemm_stream.py``): :func:`ecp5_pll2` adds the PLL's second output
CLKOS for it (the achieved frequency replaces ``array_clock_hz``), with its own reset
synchroniser; both clocks get a ``FREQUENCY NET`` constraint.

Reset: the ``sync`` domain is held in reset (through a reset synchroniser) until the PLL
reports lock. LED 0 shows ``busy``, LED 1 the PLL lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from amaranth import ClockDomain, ClockSignal, Elaboratable, Instance, Module, Signal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, HBFP8

from .top import UartAccelerator
from .uart import uart_divisor

__all__ = ["BOARDS", "Board", "BoardTop", "PllParams", "ResourceEstimate", "ULX3S_CONFIG",
           "ULX3S_FAST_CONFIG", "ULX3S_45F_CONFIG", "ULX3S_SMALL_CONFIG", "board_config",
           "board_pins", "board_platform", "board_preset", "ecp5_pll", "ecp5_pll2",
           "resource_estimate", "ICEBREAKER_CONFIG", "ICE40_RESOURCES"]


# -------------------------------------------------------------------------------------
# boards
# -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Board:
    """A supported board: its amaranth-boards platforms and defaults.

    ``variants`` maps a variant name to ``(module, class name)`` in amaranth-boards;
    ``family`` selects the tool chain (``"ecp5"`` or ``"ice40"``); ``clock_hz`` is the
    default design clock for this board (see the module docstring).
    """

    name: str
    variants: dict
    default_variant: str
    family: str
    clock_hz: int
    uart: str = "uart"
    programmer: str = ""
    #: the programming command (``{bit}``: the bitstream), into volatile configuration
    #: memory (SRAM), and the extra arguments that write the flash instead
    program_argv: tuple = ()
    flash_args: tuple = ()
    #: the bitstream's file extension
    bitstream_ext: str = ".bit"
    #: fields of :meth:`AcceleratorConfig.default` changed for this board's default build
    config: dict = field(default_factory=dict)
    #: MULT18X18D / DP16KD available per variant (the resource check of
    #: :func:`resource_estimate`)
    resources: dict = field(default_factory=dict)
    #: named builds besides the default (``hbfp-hw build --preset NAME``): fields of
    #: :meth:`AcceleratorConfig.default` changed, like ``config``
    presets: dict = field(default_factory=dict)
    #: per variant, fields changed over ``config`` for that variant's default build (a
    #: smaller device gets a smaller accelerator)
    variant_config: dict = field(default_factory=dict)


#: The ULX3S default accelerator (changes to :meth:`AcceleratorConfig.default`). The
#: default 8x8 array needs 261 MULT18X18D, the LFE5U-85F has 156: a 4x4 array (64
#: products, 4 lanes each PE) fits with room to spare. Buffers: 16 Ki-element operand
#: buffers (64 HyperBlock 16x16 tiles, e.g. a 128x128 operand; one DP16KD deep, 8 wide
#: per buffer), 4 Ki-word ``fp_in`` / ``out`` (a 64x64 FP32 tile; 8 DP16KD each). Deeper
#: buffers fit the block RAMs too (the default depths use ~173 of 208) but are built
#: from cascades of DP16KD with read-data multiplexers and address fan-out on the
#: critical read paths, and the 3 Mbaud link, not the buffer size, bounds the host's
#: throughput (the host driver splits tensors and GEMMs to the buffer depths). The
#: bit-serial BITLAYER engine is left out (``bitlayer_lanes`` 0): the board build and its
#: timing were measured without it.
ULX3S_CONFIG = {"array_rows": 4, "array_cols": 4, "operand_depth": 16384,
                "input_depth": 4096, "output_depth": 4096, "bitlayer_lanes": 0}

#: The ULX3S high-throughput preset (``--preset fast``, 85F): ULX3S_CONFIG with an 8x8 array
#: of 8 lanes on 8x8 HBFP4 tiles (4-bit mantissas: four products per MULT18X18D, 512 MACs
#: per clock on 128 of the 156 multipliers) in its own clock domain (PLL CLKOS). Routed
#: with 50 / 100 MHz requested it reached 46.26 MHz (design clock) and 47.68 MHz (array);
#: the clocks here sit below those: 45 MHz (exact UART divisor 15) for both (VCO 585 MHz
#: / 13), 23.0 GMAC/s peak (docs/board.md, "Presets").
ULX3S_FAST_CONFIG = {**ULX3S_CONFIG, "array_rows": 8, "array_cols": 8, "tile": 8,
                     "array_lanes": 8, "clock_hz": 45_000_000, "array_clock_hz": 45_000_000,
                     "formats": (HBFP4.replace(block_shape=(8, 8), name="HBFP4T8"),),
                     "name": "hbfp_fast"}

#: The smaller ULX3S variants' default builds (changes over ULX3S_CONFIG), chosen by
#: resource estimate and checked by a routed build each (docs/board.md, "Variants"):
#: the 45F (72 MULT18X18D, 108 DP16KD, 43,848 LUT4) a 4x2 array (38 / 63); the 12F and
#: 25F (28, 56) a 2x2 array with half-depth buffers and only the GEMM path (no QUANTIZE
#: or statistics engine, configuration-only INFO), as the iCEBreaker build. (nextpnr
#: places the 12F on the 25F's die, 24,288 LUT4; Lattice rates the 12F at 12,288.)
ULX3S_45F_CONFIG = {"array_rows": 4, "array_cols": 2}
ULX3S_SMALL_CONFIG = {"array_rows": 2, "array_cols": 2, "operand_depth": 8192,
                      "input_depth": 2048, "output_depth": 2048, "quantize": 0,
                      "stats": 0, "info_rom": "config"}

#: ECP5 LFE5U resources: (MULT18X18D, DP16KD) per variant (Lattice DS1044).
ECP5_RESOURCES = {"12F": (28, 56), "25F": (28, 56), "45F": (72, 108), "85F": (156, 208)}

#: The iCEBreaker (iCE40UP5K) default accelerator: the reduced top (changes to
#: :meth:`AcceleratorConfig.default`): one HBFP8 slot on 4x4 tiles, a 1x1 array (4
#: lanes: 4 SB_MAC16), two 1 Ki-element operand buffers, 256-word ``out``, no QUANTIZE
#: engine (the host quantizes, ``fp_in`` at its 16-word minimum), no statistics engine,
#: no bit-serial engine, the configuration-only INFO ROM, the staging RAM in an SPRAM;
#: the 12 MHz oscillator directly
#: and 1 Mbaud (UART divisor 12). What it needs is measured in docs/board.md.
ICEBREAKER_CONFIG = {"formats": (HBFP8.replace(block_shape=(4, 4), name="HBFP8T4"),),
                     "array_rows": 1, "array_cols": 1, "tile": 4, "operand_buffers": 2,
                     "operand_depth": 1024, "input_depth": 16, "output_depth": 256,
                     "k_max": 256, "baud_rate": 1_000_000, "bitlayer_lanes": 0,
                     "quantize": 0, "stats": 0, "info_rom": "config", "stage_ram": "single",
                     "name": "hbfp_ice"}

#: iCE40 resources: (SB_MAC16, SB_RAM40_4K) per device (Lattice FPGA-DS-02008); the
#: UP5K also has 5280 logic cells and 4 SB_SPRAM256KA.
ICE40_RESOURCES = {"UP5K": (8, 30)}

BOARDS: dict[str, Board] = {
    "ulx3s": Board(
        name="ulx3s",
        variants={v: ("amaranth_boards.ulx3s", f"ULX3S_{v}_Platform")
                  for v in ("12F", "25F", "45F", "85F")},
        default_variant="85F", family="ecp5", clock_hz=45_000_000,
        programmer="openFPGALoader -b ulx3s {bit}  (SRAM; add -f to write the flash)",
        program_argv=("openFPGALoader", "-b", "ulx3s", "{bit}"), flash_args=("-f",),
        config=ULX3S_CONFIG, resources=ECP5_RESOURCES,
        presets={"fast": ULX3S_FAST_CONFIG},
        variant_config={"12F": ULX3S_SMALL_CONFIG, "25F": ULX3S_SMALL_CONFIG,
                        "45F": ULX3S_45F_CONFIG}),
    "icebreaker": Board(
        name="icebreaker", variants={"UP5K": ("amaranth_boards.icebreaker",
                                              "ICEBreakerPlatform")},
        default_variant="UP5K", family="ice40", clock_hz=12_000_000,
        programmer="iceprog {bit}  (writes the SPI flash the board boots from)",
        program_argv=("iceprog", "{bit}"), flash_args=(), bitstream_ext=".bin",
        config=ICEBREAKER_CONFIG, resources=ICE40_RESOURCES),
}


def _board(board: str) -> Board:
    if board not in BOARDS:
        raise ValueError(f"board={board!r} is not supported; accepted boards are "
                         f"{', '.join(sorted(BOARDS))}")
    return BOARDS[board]


def board_platform(board: str = "ulx3s", variant: str | None = None):
    """An amaranth-boards platform instance for ``board`` / ``variant``."""
    b = _board(board)
    variant = b.default_variant if variant is None else variant
    if variant not in b.variants:
        raise ValueError(f"variant={variant!r} is not a {board} variant; accepted variants "
                         f"are {', '.join(b.variants)}")
    import importlib
    mod, cls = b.variants[variant]
    return getattr(importlib.import_module(mod), cls)()


# -------------------------------------------------------------------------------------
# ECP5 PLL
# -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PllParams:
    """``EHXPLLL`` dividers for CLKOP fed back through CLKOP (as Trellis' ``ecppll``)."""

    clkin_hz: int
    refclk_div: int     # CLKI_DIV
    feedback_div: int   # CLKFB_DIV
    output_div: int     # CLKOP_DIV
    #: CLKOS_DIV of the second output (the ``array`` clock domain); 0: CLKOS unused
    secondary_div: int = 0

    @property
    def fout(self) -> Fraction:
        return Fraction(self.clkin_hz) / self.refclk_div * self.feedback_div

    @property
    def fout2(self) -> Fraction:
        """The second output's frequency (CLKOS: VCO / ``secondary_div``; 0 if unused)."""
        return self.fvco / self.secondary_div if self.secondary_div else Fraction(0)

    @property
    def fout2_hz(self) -> int:
        return round(self.fout2)

    @property
    def fvco(self) -> Fraction:
        return self.fout * self.output_div

    @property
    def fout_hz(self) -> int:
        """Achieved output frequency rounded to an integer number of Hz."""
        return round(self.fout)


# ECP5 sysCLOCK PLL limits (MHz), as in Trellis' ecppll.
_PFD = (Fraction(3125, 1000), 400)
_VCO = (400, 800)
_OUT = (10, 400)


def _check_pll_out(*freqs_hz: int) -> None:
    for f in freqs_hz:
        if not _OUT[0] * 1_000_000 <= f <= _OUT[1] * 1_000_000:
            raise ValueError(f"clock {f / 1e6:g} MHz is outside the ECP5 PLL output range; "
                             f"accepted range is [{_OUT[0]}, {_OUT[1]}] MHz")


def _pll_search(clkin_hz: int, fout_hz: int, score) -> PllParams:
    """The ``EHXPLLL`` setting with the smallest ``score(fout, fvco) -> (key, sd)`` over
    every divider triple within the PLL's limits (``sd``: the CLKOS divider, or 0)."""
    fin = Fraction(clkin_hz, 1_000_000)
    best = None
    for rd in range(1, 129):
        pfd = fin / rd
        if not _PFD[0] <= pfd <= _PFD[1]:
            continue
        for fd in range(1, 81):
            fout = pfd * fd
            for od in range(1, 129):
                fvco = fout * od
                if not _VCO[0] <= fvco <= _VCO[1]:
                    continue
                key, sd = score(fout, fvco)
                if best is None or key < best[0]:
                    best = (key, PllParams(clkin_hz, rd, fd, od, sd))
    if best is None:  # pragma: no cover - every output in range has a solution
        raise ValueError(f"no ECP5 PLL setting for {fout_hz} Hz from {clkin_hz} Hz")
    return best[1]


def ecp5_pll(clkin_hz: int, fout_hz: int) -> PllParams:
    """The ``EHXPLLL`` dividers closest to ``fout_hz`` (ties: VCO nearest 600 MHz).

    Same search and limits as Trellis' ``ecppll`` (PFD 3.125-400 MHz, VCO 400-800 MHz,
    output 10-400 MHz), in exact arithmetic.
    """
    _check_pll_out(fout_hz)
    target = Fraction(fout_hz, 1_000_000)
    return _pll_search(clkin_hz, fout_hz,
                       lambda fout, fvco: ((abs(fout - target), abs(fvco - 600)), 0))


def ecp5_pll2(clkin_hz: int, fout_hz: int, fout2_hz: int) -> PllParams:
    """``EHXPLLL`` dividers for two outputs sharing the VCO: CLKOP closest to ``fout_hz``
    (fed back, as :func:`ecp5_pll`), then CLKOS (``VCO / secondary_div``) closest to
    ``fout2_hz``, ties to the VCO nearest 600 MHz. Exact pairs exist when both clocks
    divide a VCO frequency in 400-800 MHz (e.g. 50 and 100 MHz: VCO 600 MHz)."""
    _check_pll_out(fout_hz, fout2_hz)
    t1, t2 = Fraction(fout_hz, 1_000_000), Fraction(fout2_hz, 1_000_000)

    def score(fout, fvco):
        sd = max(1, min(128, round(fvco / t2)))
        return (abs(fout - t1), abs(fvco / sd - t2), abs(fvco - 600)), sd
    return _pll_search(clkin_hz, fout_hz, score)


def _ehxplll(p: PllParams, clkin, clkout, locked, clkout2=None) -> Instance:
    two = {}
    if p.secondary_div:
        two = dict(a_FREQUENCY_PIN_CLKOS=f"{float(p.fout2) / 1e6:g}",
                   p_CLKOS_ENABLE="ENABLED", p_CLKOS_DIV=p.secondary_div,
                   p_CLKOS_CPHASE=p.secondary_div - 1, p_CLKOS_FPHASE=0,
                   o_CLKOS=clkout2, i_ENCLKOS=0)
    return Instance(
        "EHXPLLL",
        a_FREQUENCY_PIN_CLKI=f"{p.clkin_hz / 1e6:g}",
        a_FREQUENCY_PIN_CLKOP=f"{float(p.fout) / 1e6:g}",
        a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
        a_MFG_GMCREF_SEL="2",
        p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
        p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
        p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
        p_CLKI_DIV=p.refclk_div, p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=p.output_div,
        p_CLKOP_CPHASE=p.output_div - 1, p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP",
        p_CLKFB_DIV=p.feedback_div,
        i_RST=0, i_STDBY=0, i_CLKI=clkin, o_CLKOP=clkout, i_CLKFB=clkout,
        i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
        i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=locked, **two)


# -------------------------------------------------------------------------------------
# board top
# -------------------------------------------------------------------------------------
def board_preset(board: str = "ulx3s", preset: str = "default",
                 variant: str | None = None) -> AcceleratorConfig:
    """The configuration of a named build of ``board``: ``"default"`` (:attr:`Board.config`,
    with :attr:`Board.variant_config` of ``variant`` over it) or a key of
    :attr:`Board.presets` (ulx3s: ``"fast"``, :data:`ULX3S_FAST_CONFIG`)."""
    b = _board(board)
    if preset != "default" and preset not in b.presets:
        raise ValueError(f"preset={preset!r} is not a {board} preset; accepted presets are "
                         f"{', '.join(['default', *b.presets])}")
    if variant is not None and variant not in b.variants:
        raise ValueError(f"variant={variant!r} is not a {board} variant; accepted variants "
                         f"are {', '.join(b.variants)}")
    changes = ({**b.config, **b.variant_config.get(variant or b.default_variant, {})}
               if preset == "default" else b.presets[preset])
    return AcceleratorConfig.default().replace(**{"clock_hz": b.clock_hz, **changes})


def board_config(board: str = "ulx3s", config: AcceleratorConfig | None = None, *,
                 clock_hz: int | None = None, variant: str | None = None
                 ) -> tuple[AcceleratorConfig, PllParams | None]:
    """The configuration actually built, and the PLL (``None``: the board clock direct).

    Without ``config`` the board's default accelerator for ``variant`` is built
    (:func:`board_preset`: :meth:`AcceleratorConfig.default` with :attr:`Board.config`
    and the variant's changes; ulx3s 85F: :data:`ULX3S_CONFIG`, a 4x4 array with smaller
    buffers).
    The requested clock is ``clock_hz``, else ``config.clock_hz`` when a config is given,
    else the board's default; the returned config's ``clock_hz`` is the achieved one.
    Raises ``ValueError`` if the baud rate is not reachable from that clock.
    """
    b = _board(board)
    cfg = config if config is not None else board_preset(board, "default", variant)
    if not isinstance(cfg, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, got {type(cfg).__name__}")
    want = cfg.clock_hz if clock_hz is None else clock_hz
    board_hz = int(board_platform(board).default_clk_frequency)
    if cfg.array_clock_hz:       # the array domain: a second PLL output
        if b.family != "ecp5":
            raise ValueError(f"array_clock_hz={cfg.array_clock_hz}: board {board} has no "
                             f"second clock; accepted array_clock_hz is 0")
        pll = ecp5_pll2(board_hz, want, cfg.array_clock_hz)
        cfg = cfg.replace(clock_hz=pll.fout_hz, array_clock_hz=pll.fout2_hz)
        uart_divisor(cfg.clock_hz, cfg.baud_rate)
        return cfg, pll
    if want == board_hz:
        pll = None
        actual = board_hz
    elif b.family == "ecp5":
        pll = ecp5_pll(board_hz, want)
        actual = pll.fout_hz
    else:  # iCE40 boards run at the board clock (no PLL is generated for them)
        raise ValueError(f"board {board} runs at its {board_hz} Hz clock only; "
                         f"accepted clock_hz is {board_hz}")
    cfg = cfg.replace(clock_hz=actual)
    uart_divisor(cfg.clock_hz, cfg.baud_rate)  # fail early with the UART's own message
    return cfg, pll


def _primitives(b: Board) -> str | None:
    """MAC array primitives for a board family (ECP5: registered MULT18X18D)."""
    return "ecp5" if b.family == "ecp5" else None


#: DP16KD aspect ratios (depth, width): true dual port up to 18 bits, 36 as a simple
#: dual port (one write, one read port).
DP16KD_MODES = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
#: Memories this small (bits) are left to LUTRAM / flip-flops in the estimate.
LUTRAM_BITS = 2048


@dataclass(frozen=True)
class ResourceEstimate:
    """DSP and block-RAM use of the accelerator, derived from the elaborated design.

    ``dsps``: the ``MULT18X18D`` instances (the MAC array with ``primitives="ecp5"``)
    plus one DSP per 18x18 piece of every multiplication of two non-constant operands
    left in the design (yosys maps those to MULT18X18D). ``brams``: per memory, the
    fewest DP16KD over the aspect ratios of :data:`DP16KD_MODES`, one copy per read port
    (one write and one read port each; ROMs two read ports), memories of at most
    :data:`LUTRAM_BITS` bits excluded. ``memories`` lists ``(path, width, depth,
    read ports, DP16KD)``. An estimate, not yosys' mapping: yosys may trim constant or
    unused bits (fewer BRAMs).

    iCE40 (``family="ice40"``): SB_MAC16 per 16x16 piece; SB_RAM40_4K (aspect ratios
    :data:`EBR_MODES`) for every memory read synchronously and larger than
    :data:`ICE40_FF_BITS` bits (the device has no LUT RAM; yosys builds memories read
    asynchronously, and smaller ones, from flip-flops); a memory whose read and write
    ports share one address (``stage_ram="single"``) counts in ``sprams`` (16 Ki x 16
    each, ``synth_ice40 -spram``) instead.
    """

    dsps: int
    brams: int
    multipliers: tuple
    memories: tuple
    sprams: int = 0

    def fits(self, board: str = "ulx3s", variant: str | None = None) -> bool:
        return not self.misfits(board, variant)

    def misfits(self, board: str = "ulx3s", variant: str | None = None) -> list[str]:
        """What does not fit ``board`` / ``variant``: one line per resource, naming the
        need and the capacity (empty when the design fits)."""
        b = _board(board)
        variant = variant or b.default_variant
        dsp, bram = b.resources[variant]
        names = FAMILY_RESOURCES[b.family]
        out = []
        spram = ICE40_SPRAM if b.family == "ice40" else 0
        for what, need, have in ((names[0], self.dsps, dsp), (names[1], self.brams, bram),
                                 ("SB_SPRAM256KA (SPRAM)", self.sprams, spram)):
            if need > have:
                out.append(f"{need} {what} needed, the {b.name} {variant} has {have}")
        return out


#: the (multiplier, block RAM) primitive names of each FPGA family
FAMILY_RESOURCES = {"ecp5": ("MULT18X18D (DSP)", "DP16KD (block RAM)"),
                    "ice40": ("SB_MAC16 (DSP)", "SB_RAM40_4K (block RAM)")}
#: iCE40 SB_RAM40_4K aspect ratios (depth, width)
EBR_MODES = ((256, 16), (512, 8), (1024, 4), (2048, 2))
#: iCE40 memories of at most this many bits are left to flip-flops in the estimate
#: (yosys' choice on the accelerator: a 2 x 54 FIFO in flip-flops, 9 x 33 in a block)
ICE40_FF_BITS = 256
#: SB_SPRAM256KA (16 Ki x 16) of the iCE40UP5K
ICE40_SPRAM = 4


def _dp16kd(width: int, depth: int, reads: int, writes: int,
            modes: tuple = DP16KD_MODES, lutram: int = LUTRAM_BITS) -> int:
    if width * depth <= lutram:
        return 0
    one = min(-(-depth // d) * -(-width // w) for d, w in modes)
    copies = reads if writes else -(-reads // 2)
    return one * max(1, copies)


def _significant(v, cells=None) -> int:
    """Bits of a netlist value without its zero / sign extension; with the netlist's
    ``cells``, a value shifted right by a constant counts its operand's bits less the
    shift (``(rows + 3) >> 2`` of a 16-bit field: 15 bits, as yosys' ``wreduce`` finds)."""
    nets = list(v)
    while len(nets) > 1 and ((nets[-1].is_const and nets[-1] == nets[-1].from_const(0))
                             or nets[-1] == nets[-2]):
        nets.pop()
    n = len(nets)
    if cells is not None and all(x.is_cell for x in nets) and \
            len({x.cell for x in nets}) == 1 and [x.bit for x in nets] == list(range(n)):
        from amaranth.hdl import _nir
        cell = cells[nets[0].cell]
        if (isinstance(cell, _nir.Operator) and cell.operator in ("u>>", "s>>")
                and all(x.is_const for x in cell.inputs[1])):
            sh = sum(int(x == x.from_const(1)) << i for i, x in enumerate(cell.inputs[1]))
            return max(1, min(n, _significant(cell.inputs[0], cells) - sh))
    return n


def resource_estimate(config: AcceleratorConfig, *, primitives: str | None = "ecp5",
                      uart: bool = True, family: str = "ecp5") -> ResourceEstimate:
    """DSPs and block RAMs of the (UART) accelerator for ``config``, without synthesis
    (see :class:`ResourceEstimate`); elaborates the design (a few seconds). ``family``
    ``"ice40"`` counts SB_MAC16 (16x16) and SB_RAM40_4K instead of MULT18X18D (18x18) and
    DP16KD."""
    if family not in FAMILY_RESOURCES:
        raise ValueError(f"family={family!r}; accepted values are "
                         f"{', '.join(FAMILY_RESOURCES)}")
    side, modes = (18, DP16KD_MODES) if family == "ecp5" else (16, EBR_MODES)
    from amaranth.hdl import Fragment
    from amaranth.hdl import _ir, _nir

    from .top import Accelerator
    top = (UartAccelerator(config, primitives=primitives) if uart
           else Accelerator(config, primitives=primitives))
    netlist = _ir.build_netlist(Fragment.get(top, None), name="top")
    mems, mults, dsps, sprams = {}, [], 0, 0
    ports, addrs = {}, {}
    for idx, cell in enumerate(netlist.cells):
        if isinstance(cell, _nir.Memory):
            mems[idx] = cell
        elif isinstance(cell, (_nir.SyncReadPort, _nir.AsyncReadPort)):
            ports.setdefault(cell.memory, [0, 0, 0])[0] += 1
            ports[cell.memory][2] += isinstance(cell, _nir.AsyncReadPort)
            addrs.setdefault(cell.memory, set()).add(tuple(cell.addr))
        elif isinstance(cell, _nir.SyncWritePort):
            ports.setdefault(cell.memory, [0, 0, 0])[1] += 1
            addrs.setdefault(cell.memory, set()).add(tuple(cell.addr))
        elif isinstance(cell, _nir.Instance) and cell.type == "MULT18X18D":
            dsps += 1
        elif isinstance(cell, _nir.Operator) and cell.operator == "*":
            if not any(all(n.is_const for n in v) for v in cell.inputs):
                mults.append(tuple(_significant(v, netlist.cells) for v in cell.inputs))
    shared = {i for i, a in addrs.items() if len(a) == 1 and ports[i][0] and ports[i][1]}
    memories = []
    for idx, mem in mems.items():
        r, w, asy = ports.get(idx, (0, 0, 0))
        if family == "ice40" and idx in shared:           # one address: SPRAM
            sprams += -(-mem.depth // 16384) * -(-mem.width // 16)
            n = 0
        elif family == "ice40":
            # no LUT RAM: yosys puts every memory read synchronously into SB_RAM40_4K,
            # one read asynchronously into flip-flops
            n = 0 if asy or not r else _dp16kd(mem.width, mem.depth, r, w, modes,
                                               lutram=ICE40_FF_BITS)
        else:
            n = _dp16kd(mem.width, mem.depth, r, w, modes)
        memories.append((mem.name, mem.width, mem.depth, r, n))
    dsps += sum(-(-wa // side) * -(-wb // side) for wa, wb in mults)
    return ResourceEstimate(dsps=dsps, brams=sum(m[-1] for m in memories),
                            multipliers=tuple(mults), memories=tuple(memories),
                            sprams=sprams)


class BoardTop(Elaboratable):
    """:class:`UartAccelerator` on a board: clock (via the PLL), reset, UART, LEDs."""

    def __init__(self, config: AcceleratorConfig, pll: PllParams | None = None,
                 uart: str = "uart", primitives: str | None = None) -> None:
        self.config = config
        self.pll = pll
        self.uart = uart
        #: MAC array DSP primitives (``"ecp5"`` on ECP5 boards: registered MULT18X18D)
        self.primitives = primitives
        #: UART clocks per bit, as :class:`UartAccelerator` computes it
        self.divisor = uart_divisor(config.clock_hz, config.baud_rate)

    def elaborate(self, platform):
        m = Module()
        clk_in = platform.request(platform.default_clk, dir="-")
        m.submodules.clk_buf = clk_buf = io.Buffer("i", clk_in)
        m.domains.sync = ClockDomain("sync")
        clk = Signal()
        array_clk = Signal()     # CLKOS: the MAC array's domain (array_clock_hz)
        if self.pll is None:
            locked = Signal(init=1)
            m.d.comb += clk.eq(clk_buf.i)
        else:
            locked = Signal()
            m.submodules.pll = _ehxplll(self.pll, clk_buf.i, clk, locked, array_clk)
        m.d.comb += ClockSignal("sync").eq(clk)
        platform.add_clock_constraint(clk, self.config.clock_hz)
        m.submodules.rst_sync = ResetSynchronizer(~locked, domain="sync")
        if self.config.array_clock_hz:
            if self.pll is None or not self.pll.secondary_div:
                raise ValueError("array_clock_hz needs a PLL with a second output "
                                 "(board_config)")
            m.domains.array = ClockDomain("array")
            m.d.comb += ClockSignal("array").eq(array_clk)
            platform.add_clock_constraint(array_clk, self.config.array_clock_hz)
            m.submodules.rst_sync_array = ResetSynchronizer(~locked, domain="array")

        m.submodules.accel = acc = UartAccelerator(self.config, primitives=self.primitives)
        assert acc.divisor == self.divisor
        uart = platform.request(self.uart, 0, dir="-")
        m.submodules.rx_buf = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [acc.rx.eq(rx_buf.i), tx_buf.o.eq(acc.tx)]
        for i, sig in enumerate((acc.busy, locked)):
            led = io.Buffer("o", platform.request("led", i, dir="-"))
            m.submodules[f"led{i}_buf"] = led
            m.d.comb += led.o.eq(sig)
        return m


def _pins(platform, name: str, number: int = 0) -> dict:
    res = platform.lookup(name, number)
    out = {}
    for sub in res.ios:
        if hasattr(sub, "ios") and sub.ios and hasattr(sub.ios[0], "names"):
            out[sub.name] = list(sub.ios[0].names)
    return out


def board_pins(board: str = "ulx3s", variant: str | None = None) -> dict:
    """Pin names of the board signals the top uses (``{"rx": ["M1"], ...}``)."""
    b = _board(board)
    plat = board_platform(board, variant)
    uart = _pins(plat, b.uart)
    clk = plat.lookup(plat.default_clk, 0)
    return {"clk": list(clk.ios[0].names), "rx": uart["rx"], "tx": uart["tx"],
            "led_busy": list(plat.lookup("led", 0).ios[0].names),
            "led_locked": list(plat.lookup("led", 1).ios[0].names)}
