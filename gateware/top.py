"""The accelerator top: frame decoder -> command executor -> engines -> response encoder,
with a buffer manager owning the memories (Amaranth 0.5). See ``docs/accelerator.md``.

::

    host bytes -> Executor (FrameDecoder, staging, shared checks, dispatch, replay)
                     |  cmd (op, length, decoded header)      ^ status (code/detail or answer)
                     v                                        |
                  engines: buffer_io | stats | quantize | gemm (-> GemmStream -> MacArray)
                           | bitlayer (bit-serial bit-layer GEMM)
                           | luq (LUQ shift-add GEMM and LUQ quantizer)
                           | sparse (transposable N:M sparse GEMM)
                           | mls (MLS GEMM and quantizer)
                     |  buffer ports (owner = the engine running the command)
                     v
                  BufferManager (buffer map, INFO ROM, staging RAM)
                     ^  buffer ports (owner = encoder while answering)
    host bytes <- ResponseEncoder <- response descriptor <- Executor

Which engine runs which opcode is the table :data:`ENGINES`; opcodes, field layouts,
error codes, the buffer map and the CRC come from :mod:`hbfp_hw.protocol`, widths from the
:class:`AcceleratorConfig`. The command semantics are those of the golden device model
(:class:`hbfp_hw.host.emulator.Emulator`), checked field by field in the same order so
error frames carry the same code and detail. What the RTL answers with ``UNSUPPORTED`` is
:func:`unsupported` (also returned by INFO under the ``"gateware"`` key, outside the
hashed device description).

Ports
-----
``i`` / ``o``: byte streams (``stream.Signature(8)``) to and from the host.
``busy``: high while a command executes or a response is being sent.
:class:`UartAccelerator` wraps the top with the UART PHY for boards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from amaranth import Module
from amaranth.back import verilog
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.config.mac_array import DUAL_MAN_BITS, MacArrayConfig
from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import ROUNDING_MODES, BFPFormat

from .buffers import BufferManager
from .engines.bitserial import BitLayerEngine
from .engines.buffer_io import BufferIOEngine
from .engines.gemm import GemmEngine
from .engines.luq import LuqEngine
from .engines.mls import MLSEngine
from .engines.quantize import QuantizeEngine
from .engines.sparse import SparseGemmEngine
from .engines.stats import StatsEngine
from .executor import Executor
from .response import ResponseEncoder

__all__ = ["Accelerator", "UartAccelerator", "ENGINES", "UNSUPPORTED", "unsupported",
           "gemm_slots", "tile_slots", "mx_slots", "runtime_frac", "quant_lanes",
           "quant_rounding", "info_blob", "mac_config", "accumulator_capacity", "generate",
           "register_cli"]

#: The engine that executes each opcode (names of :meth:`Accelerator.engines`).
ENGINES = {
    P.Op.INFO: "buffer_io", P.Op.WRITE: "buffer_io", P.Op.READ: "buffer_io",
    P.Op.RESET: "buffer_io", P.Op.SESSION: "buffer_io", P.Op.READ_STATS: "stats",
    P.Op.QUANTIZE: "quantize", P.Op.GEMM: "gemm", P.Op.BITLAYER: "bitlayer",
    P.Op.LUQ_GEMM: "luq", P.Op.LUQ_QUANTIZE: "luq",
    P.Op.SPARSE_GEMM: "sparse",
    P.Op.CONV: "gemm",     # the GEMM engine's CONV address generator (config.conv)
    P.Op.MLS_GEMM: "mls", P.Op.MLS_QUANTIZE: "mls",
}

#: Features of the protocol the gateware answers with ``ErrorCode.UNSUPPORTED``
#: (configuration-dependent gaps are added by :func:`unsupported`).
UNSUPPORTED = {
    "ops": [],
    "gemm_flags": [],
    "gemm_slots": "format slots with tile x tile HyperBlock blocks or 1-D power-of-two "
                  "blocks (a multiple of tile) along the last axis, with the MAC array's "
                  "exponent format and man_bits up to man_bits_max; others: detail 3 / 4",
    "gemm_mx": "1-D block slots: no ACCUMULATE / EXT_EREF (detail 2), not mixed with a "
               "tile slot (detail 4)",
}

def mac_config(cfg: AcceleratorConfig) -> MacArrayConfig:
    """The MAC array configuration of an accelerator (tile = ``cfg.tile``).

    The array is built for the widest mantissa of the slots, with ``cfg.array_lanes``
    lanes (0: the largest of 4, 2, 1 dividing the tile); when no slot has more than
    :data:`~hbfp_hw.config.mac_array.DUAL_MAN_BITS` mantissa bits its products are packed
    several per multiplier (``mapping="dsp-packed"``). When a HyperBlock slot has
    at most :data:`~hbfp_hw.config.mac_array.DUAL_MAN_BITS` mantissa bits (HBFP4) and
    wider slots exist, the array is ``dual_precision``: jobs whose operands both have
    at most that many bits run two products per multiplier (twice the MACs per cycle).
    """
    T = cfg.tile
    lanes = cfg.array_lanes or next(n for n in (4, 2, 1) if T % n == 0)
    # every slot at most 4 mantissa bits: several products per multiplier (dsp-packed)
    packed = cfg.man_bits_max <= DUAL_MAN_BITS
    base = MacArrayConfig(rows=cfg.array_rows, cols=cfg.array_cols, lanes=lanes, tile=T,
                          man_bits_a=cfg.man_bits_max, man_bits_b=cfg.man_bits_max,
                          exp_bits=cfg.exp_bits_max, k_max=cfg.k_max,
                          guard_bits=cfg.guard_bits,
                          mapping="dsp-packed" if packed else "dsp")
    narrow = [i for i in _tile_slots(cfg, base) if cfg.formats[i].man_bits <= DUAL_MAN_BITS]
    if (narrow and cfg.man_bits_max > DUAL_MAN_BITS and T % (2 * lanes) == 0):
        return base.replace(dual_precision=True)
    return base


def _array_exponent(ref: BFPFormat, f: BFPFormat) -> bool:
    return (f.man_bits <= ref.man_bits and f.exp_bits == ref.exp_bits
            and f.exp_bias == ref.exp_bias and f.exp_invalid_code == ref.exp_invalid_code
            and f.emin == ref.emin and f.emax == ref.emax)


def _tile_slots(cfg: AcceleratorConfig, mc: MacArrayConfig) -> list[int]:
    return [i for i, f in enumerate(cfg.formats)
            if cfg.block_2d(i) == (cfg.tile, cfg.tile) and _array_exponent(mc.format_a(), f)]


def tile_slots(cfg: AcceleratorConfig) -> list[int]:
    """Format slots the MAC array computes (bit-exactly as the golden model).

    A slot qualifies with square ``tile x tile`` blocks (HyperBlock tiles) and the
    array's exponent format; its mantissas may be narrower than the array's
    (``man_bits_max``): they are stored sign-extended, the products and alignment shifts
    are those of the golden model, and the FP32 conversion takes the job's fraction bits
    (:func:`runtime_frac`).
    """
    return _tile_slots(cfg, mac_config(cfg))


def mx_slots(cfg: AcceleratorConfig) -> list[int]:
    """Format slots with 1-D blocks along the last axis (OCP MX: 32 elements) that the
    GEMM engine's MX datapath computes: a power-of-two block that is a whole number of
    buffer words (``tile`` mantissas), the array's exponent format."""
    T = cfg.tile
    out = []
    for i, f in enumerate(cfg.formats):
        bh, bw = cfg.block_2d(i)
        if (bh == 1 and bw > 1 and bw & (bw - 1) == 0 and bw % T == 0 and bw <= 64
                and (bh, bw) != (T, T) and _array_exponent(mac_config(cfg).format_a(), f)):
            out.append(i)
    return out


def gemm_slots(cfg: AcceleratorConfig) -> list[int]:
    """Every format slot whose GEMMs the RTL computes (:func:`tile_slots` on the MAC
    array, :func:`mx_slots` on the MX datapath)."""
    return sorted(tile_slots(cfg) + mx_slots(cfg))


def runtime_frac(cfg: AcceleratorConfig) -> bool:
    """Whether the MAC array takes each job's fraction bits: only when a GEMM slot's
    mantissas are narrower than the array's (otherwise the constant scale is kept)."""
    return any(cfg.formats[i].man_bits != cfg.man_bits_max for i in tile_slots(cfg))


def quant_lanes(fmt: BFPFormat) -> tuple[int, bool]:
    """Quantizer lanes for a format slot and whether stochastic rounding can be built.

    Stochastic rounding draws element ``n`` of the block stream from generator
    ``n % fmt.sr_lanes``, so the unit needs ``lanes = sr_lanes`` (a divisor of the block
    size, at most the unit's lane limit); other slots get one lane and no stochastic mode.
    """
    from hbfp_hw.config.quantizer import LANES_RANGE
    L = fmt.sr_lanes
    if L <= LANES_RANGE[1] and fmt.block_size % L == 0:
        return L, True
    return 1, False


def quant_rounding(cfg: AcceleratorConfig, runtime_rounding: bool = True) -> list[list[int]]:
    """Rounding modes (indices in ``ROUNDING_MODES``) QUANTIZE implements, per slot."""
    out = []
    for f in cfg.formats:
        _, sto = quant_lanes(f)
        modes = range(len(ROUNDING_MODES)) if runtime_rounding else [f.rounding_code]
        out.append([r for r in modes if sto or ROUNDING_MODES[r] != "stochastic"])
    return out


def accumulator_capacity(cfg: AcceleratorConfig) -> int:
    """Outputs (padded to whole tiles) whose accumulators the top keeps between GEMMs.

    A GEMM whose padded ``M x N`` exceeds it runs as usual but keeps no accumulators;
    ``ACCUMULATE`` onto it is answered ``UNSUPPORTED`` (detail 2) after every emulator
    check passed. The host driver's K-split tiles never exceed ``output_depth``.
    """
    return cfg.output_depth


def unsupported(cfg: AcceleratorConfig, runtime_rounding: bool = True) -> dict:
    """:data:`UNSUPPORTED` plus the QUANTIZE rounding modes missing for ``cfg``."""
    out = dict(UNSUPPORTED)
    out["ops"] = list(out["ops"]) + [op.name for op, built in (
        (P.Op.QUANTIZE, cfg.quantize), (P.Op.READ_STATS, cfg.stats)) if not built]
    out["gemm_accumulate"] = (f"ACCUMULATE onto a GEMM whose padded M*N exceeds "
                              f"{accumulator_capacity(cfg)} outputs: detail 2")
    miss = {str(i): [ROUNDING_MODES[r] for r in range(len(ROUNDING_MODES)) if r not in ok]
            for i, ok in enumerate(quant_rounding(cfg, runtime_rounding)) if cfg.quantize}
    miss = {k: v for k, v in miss.items() if v}
    if miss:
        out["quantize_rounding"] = miss   # slot -> modes answered UNSUPPORTED (detail 7)
    return out


def info_blob(cfg: AcceleratorConfig, runtime_rounding: bool = True) -> bytes:
    """INFO's answer stream: fixed fields then the canonical description JSON.

    The JSON is the device description plus a ``"gateware"`` key (the unsupported
    features); the hash covers the description only, so it equals the manifest's. With
    ``cfg.info_rom == "config"`` it is the configuration only
    (:func:`hbfp_hw.protocol.info_description`).
    """
    desc = P.info_description(cfg)
    if cfg.info_rom == "full":     # "config": the configuration only (a smaller ROM)
        desc["gateware"] = {"unsupported": unsupported(cfg, runtime_rounding),
                            "gemm_slots": gemm_slots(cfg)}
    js = P.canonical_json(desc)
    fixed = P.RESPONSES[P.Op.INFO].pack(version=P.PROTOCOL_VERSION,
                                        hash=P.device_hash(cfg), total=len(js))
    return fixed + js


class Accelerator(wiring.Component):
    """The accelerator top for ``config`` with a plain byte-stream host port.

    Parameters
    ----------
    config
        The :class:`AcceleratorConfig` (``tile`` a power of two dividing
        ``operand_depth``).
    idle_cycles
        Partial-frame timeout in clocks (default: the protocol's
        ``IDLE_TIMEOUT_BYTES`` byte times at the config's baud rate and clock).
    runtime_rounding
        Build every rounding mode into each slot's quantizer (QUANTIZE's ``rounding``
        field selects it, as in the emulator). ``False`` builds only the slot format's
        own mode; other modes are answered ``UNSUPPORTED`` (detail 7).
    primitives
        Passed to :class:`~hbfp_hw.gateware.mac_array.MacArray`: ``None`` (portable
        ``a * b``) or ``"ecp5"`` (``MULT18X18D`` instances with their input, pipeline and
        output registers; the board build uses it on ECP5). Same cycle behaviour.
    """

    def __init__(self, config: AcceleratorConfig | None = None, *,
                 idle_cycles: int | None = None, runtime_rounding: bool = True,
                 primitives: str | None = None) -> None:
        cfg = config or AcceleratorConfig.default()
        if not isinstance(cfg, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, got {type(cfg).__name__}")
        T = cfg.tile
        if T & (T - 1) or cfg.operand_depth % T:
            raise ValueError(f"tile={T} must be a power of two dividing operand_depth="
                             f"{cfg.operand_depth} for the accelerator top")
        self.config = cfg
        self.mac = mac_config(cfg)
        self.specs = P.buffer_map(cfg)
        self.runtime_rounding = bool(runtime_rounding)
        self.primitives = primitives
        self.info = info_blob(cfg, self.runtime_rounding)
        self.quant = []
        for f in cfg.formats:
            lanes, _ = quant_lanes(f)
            self.quant.append(QuantizerConfig(format=f, lanes=lanes,
                                              runtime_rounding=self.runtime_rounding,
                                              static_exponent=True))
        if idle_cycles is None:
            idle_cycles = P.IDLE_TIMEOUT_BYTES * 10 * cfg.clock_hz // cfg.baud_rate
        self.idle_cycles = idle_cycles
        super().__init__({"i": In(stream.Signature(8)), "o": Out(stream.Signature(8)),
                          "busy": Out(1)})

    def engines(self, names=None) -> dict:
        """The engine components, by :data:`ENGINES` name, in buffer-client order
        (``names``: only those, e.g. to test one engine on its own)."""
        cfg, specs, T, rom = self.config, self.specs, self.config.tile, len(self.info)
        build = {
            "buffer_io": lambda: BufferIOEngine(specs, tile=T, info=self.info),
            "stats": lambda: StatsEngine(specs, tile=T, rom_depth=rom, built=cfg.stats),
            "quantize": lambda: QuantizeEngine(
                cfg, specs, quant=self.quant,
                rounding=quant_rounding(cfg, self.runtime_rounding), rom_depth=rom),
            "gemm": lambda: GemmEngine(
                cfg, specs, mac=self.mac, slots=tile_slots(cfg), mx_slots=mx_slots(cfg),
                acc_capacity=accumulator_capacity(cfg), rom_depth=rom,
                primitives=self.primitives, runtime_frac=runtime_frac(cfg)),
            "bitlayer": lambda: BitLayerEngine(cfg, specs, rom_depth=rom),
            "luq": lambda: LuqEngine(cfg, specs, rom_depth=rom),
            "sparse": lambda: SparseGemmEngine(cfg, specs, rom_depth=rom),
            "mls": lambda: MLSEngine(cfg, specs, rom_depth=rom),
        }
        return {n: f() for n, f in build.items() if names is None or n in names}

    def elaborate(self, platform):
        m = Module()
        engines = self.engines()
        names = list(engines)
        if set(ENGINES.values()) - set(names):
            raise ValueError(f"ENGINES names engines {sorted(set(ENGINES.values()))}; "
                             f"built are {names}")
        E = len(names)
        m.submodules.executor = ex = Executor(
            ops={op: names.index(name) for op, name in ENGINES.items()}, engines=E,
            specs=self.specs, idle_cycles=self.idle_cycles)
        m.submodules.buffers = bm = BufferManager(
            self.specs, tile=self.config.tile, info=self.info, clients=E + 1,
            stage_single_port=self.config.stage_ram == "single")
        m.submodules.encoder = enc = ResponseEncoder(self.specs, tile=self.config.tile,
                                                     rom_depth=len(self.info))
        for k, name in enumerate(names):
            eng = engines[name]
            m.submodules[name] = eng
            wiring.connect(m, getattr(ex, f"e{k}_cmd"), eng.cmd)
            wiring.connect(m, eng.status, getattr(ex, f"e{k}_status"))
            wiring.connect(m, eng.bufs, bm.client(k))
        wiring.connect(m, enc.bufs, bm.client(E))
        wiring.connect(m, ex.desc, enc.desc)
        wiring.connect(m, ex.stage_w, bm.stage_w)
        m.d.comb += bm.owner.eq(ex.owner)
        # engine-to-engine signals: samples for the statistics, RESET's soft reset
        st, io, q, g = (engines[n] for n in ("stats", "buffer_io", "quantize", "gemm"))
        wiring.connect(m, q.sample, st.quant_sample)
        wiring.connect(m, g.sample, st.gemm_sample)
        wiring.connect(m, engines["bitlayer"].sample, st.int_sample)
        m.d.comb += [st.soft_reset.eq(io.soft_reset), g.soft_reset.eq(io.soft_reset),
                     enc.token.eq(io.token)]
        wiring.connect(m, wiring.flipped(self.i), ex.i)
        wiring.connect(m, enc.o, wiring.flipped(self.o))
        m.d.comb += self.busy.eq(ex.busy)
        return m


# ---------------------------------------------------------------------------------------
# Board wrapper, generation, CLI
# ---------------------------------------------------------------------------------------
class UartAccelerator(wiring.Component):
    """The top behind the UART PHY (``rx``/``tx`` pins), for boards.

    A 64-byte receive FIFO absorbs the bytes arriving while the executor is busy (the
    host sends the next request only after the answer, so this is slack, not flow
    control).
    """

    def __init__(self, config: AcceleratorConfig | None = None, *,
                 primitives: str | None = None) -> None:
        from .uart import uart_divisor
        self.config = config or AcceleratorConfig.default()
        self.primitives = primitives
        self.divisor = uart_divisor(self.config.clock_hz, self.config.baud_rate)
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1), "busy": Out(1)})

    def elaborate(self, platform):
        from .uart import UartRx, UartTx
        m = Module()
        m.submodules.core = core = Accelerator(self.config, primitives=self.primitives)
        m.submodules.urx = urx = UartRx(self.divisor)
        m.submodules.utx = utx = UartTx(self.divisor)
        m.submodules.rxq = q = fifo.SyncFIFOBuffered(width=8, depth=64)
        m.d.comb += [urx.rx.eq(self.rx), self.tx.eq(utx.tx), self.busy.eq(core.busy),
                     q.w_data.eq(urx.o.payload), q.w_en.eq(urx.o.valid),
                     urx.o.ready.eq(q.w_rdy),
                     core.i.payload.eq(q.r_data), core.i.valid.eq(q.r_rdy),
                     q.r_en.eq(core.i.ready)]
        wiring.connect(m, core.o, utx.i)
        return m


def generate(config: AcceleratorConfig, outdir: str | Path, *, uart: bool = False,
             name: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.v`` and ``<name>.json`` (manifest with the device description)."""
    from hbfp_hw.manifest import write_manifest
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = name or f"{config.name}_accel"
    top = UartAccelerator(config) if uart else Accelerator(config)
    text = verilog.convert(top, name=name, emit_src=False)
    vpath = outdir / f"{name}.v"
    vpath.write_text(text)
    mpath = write_manifest(outdir / f"{name}.json", kind="accelerator", top=name,
                           config=config.to_dict(), ports=_port_map(uart),
                           extra=P.manifest_extra(config))
    return vpath, mpath


def _port_map(uart: bool) -> dict:
    if uart:
        return {"rx": {"dir": "in", "width": 1}, "tx": {"dir": "out", "width": 1},
                "busy": {"dir": "out", "width": 1}}
    return {"i": {"dir": "in", "stream": 8}, "o": {"dir": "out", "stream": 8},
            "busy": {"dir": "out", "width": 1}}


def _cli_generate(args) -> int:
    import json
    if args.config:
        src = Path(args.config)
        d = json.loads(src.read_text()) if src.exists() else json.loads(args.config)
        cfg = AcceleratorConfig.from_dict(d.get("config", d))
    else:
        from .sim_device import SIM_CONFIG
        cfg = SIM_CONFIG if args.sim else None
    import time
    t0 = time.perf_counter()
    if args.board:
        from .build import generate_board_sources
        print(f"elaborating the {args.board} board top and writing its Verilog and "
              "constraints (up to a minute or two) ...", flush=True)
        paths = generate_board_sources(args.board, args.variant, cfg, args.output,
                                       name=args.name)
        print(f"wrote {', '.join(str(p) for p in paths)} "
              f"({time.perf_counter() - t0:.0f} s)")
        return 0
    if args.variant:
        raise ValueError("--variant needs --board")
    cfg = cfg or AcceleratorConfig.default()
    print(f"elaborating the accelerator ({cfg.array_rows}x{cfg.array_cols} array, "
          f"{len(cfg.formats)} format slot(s)) and writing Verilog (up to a minute) ...",
          flush=True)
    v, mf = generate(cfg, args.output, uart=args.uart, name=args.name)
    extra = ""
    if args.uart:
        from .constraints import uart_top_constraints, write_constraints
        cons = write_constraints(uart_top_constraints(cfg, v.stem), v.parent)
        extra = f", constraints {', '.join(p.name for p in cons)}"
    print(f"wrote {v} and {mf}{extra} (device hash {P.device_hash(cfg).hex()[:16]}..., "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


def register_cli(subparsers, generate_subparsers) -> None:
    p = generate_subparsers.add_parser(
        "accelerator", help="the accelerator top (byte-stream port, or UART with --uart)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="AcceleratorConfig JSON (file or literal; a manifest "
                                    "works too); default: the default accelerator")
    p.add_argument("--sim", action="store_true", help="use the small sim:// configuration")
    p.add_argument("--uart", action="store_true",
                   help="wrap the top in the UART PHY (also writes .sdc/.xdc constraints)")
    p.add_argument("--board", default=None,
                   help="write the board top (clock, PLL, reset, UART pins, LEDs) of this "
                        "board with its pin and timing constraints, as for 'hbfp-hw build'")
    p.add_argument("--variant", default=None, help="board variant (with --board)")
    p.add_argument("--name", default=None, help="top module name")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=_cli_generate)
