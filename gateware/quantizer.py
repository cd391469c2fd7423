"""Streaming FP32 -> BFP quantizer unit.

:class:`Quantizer` turns a stream of IEEE-754 binary32 values, ``lanes`` per beat, into
BFP blocks (one shared exponent code + ``block_size`` mantissas) exactly as
:func:`hbfp_hw.quantize` does for :meth:`QuantizerConfig.golden_format`.

Data path (see ``docs/quantizer.md``)::

    i ──► block buffer (memory, NB banks of B = block/lanes beats) ──► element pipeline ──► o
     └──► per-beat max-exponent tree ──► running max ──► per-bank exponent ──┘

* Write side: each accepted beat is written into the current bank; its lanes' exponent
  fields go through a pipelined :class:`MaxTree`, then a running maximum; when the
  block's last beat has been through, the bank's block exponent is final.
* Read side: a bank whose exponent is final is read beat by beat into a 4-stage
  pipeline (memory read, align, shift, round) of per-lane :class:`ElementQuantizer`.
  The pipeline advances when its output register is empty or taken (``adv``), so
  back-pressure stalls it without losing or duplicating a beat.
* NB = 2 + ceil((T + 1) / B) banks (T = max-tree latency) so that, with the input
  always valid and the output always ready, a beat is accepted every cycle.

Output beats are ``lanes`` wide: each carries ``lanes`` mantissas plus the block's
exponent code, ``invalid`` flag and ``first``/``last`` beat markers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import ROUNDING_MODES, BFPFormat, get_bfp_format, mantissa_max
from hbfp_hw.manifest import check_verilog_identifier, config_from_source, write_manifest

from .fp32 import FP32_EXP_BIAS, FP32_EXP_SPECIAL, FP32Layout
from .prng import XorshiftLanes

__all__ = ["MaxTree", "ElementQuantizer", "Quantizer", "bfp_beat_layout", "fp32_beat_layout",
           "generate", "register_cli"]

EP_SHAPE = signed(12)   # block exponent + 127 (exp_bits <= 10: [-384, 638])


def fp32_beat_layout(lanes: int) -> data.ArrayLayout:
    """Input payload: ``lanes`` binary32 values, lane 0 in the low 32 bits."""
    return data.ArrayLayout(FP32Layout, lanes)


def bfp_beat_layout(lanes: int, man_bits: int, exp_bits: int) -> data.StructLayout:
    """Output payload: ``lanes`` mantissas of one block and the block's exponent."""
    return data.StructLayout({
        "man": data.ArrayLayout(signed(man_bits), lanes),
        "exp": unsigned(exp_bits),   # biased code; all ones when invalid
        "invalid": 1,                # block held NaN or +-Inf (mantissas are zero)
        "first": 1,                  # first beat of a block
        "last": 1,                   # last beat of a block
    })



def _ring_step(m: Module, en, addr, depth: int, beat, beats: int, bank, banks: int):
    """On ``en``: step the buffer address (mod ``depth``), the beat within the block
    (mod ``beats``) and, after a block's last beat, the bank (mod ``banks``).
    Returns the "last beat of a block" condition."""
    last = beat == beats - 1
    with m.If(en):
        m.d.sync += [addr.eq(Mux(addr == depth - 1, 0, addr + 1)),
                     beat.eq(Mux(last, 0, beat + 1))]
        with m.If(last):
            m.d.sync += bank.eq(Mux(bank == banks - 1, 0, bank + 1))
    return last

class MaxTree(wiring.Component):
    """Pipelined maximum of ``n`` unsigned values (the block max-exponent tree).

    A balanced binary tree of compare-and-select nodes with a register after every
    ``levels_per_stage`` levels and on the output; :attr:`latency` cycles from ``i`` to
    ``o``. It has no enable: it is fed every cycle.
    """

    def __init__(self, *, width: int, n: int, levels_per_stage: int = 2):
        if n < 1:
            raise ValueError(f"n={n} is out of range; accepted range is [1, inf)")
        if levels_per_stage < 1:
            raise ValueError(f"levels_per_stage={levels_per_stage} must be >= 1")
        self.width, self.n, self.lps = width, n, levels_per_stage
        self.levels = (n - 1).bit_length()
        self.latency = max(1, -(-self.levels // levels_per_stage))
        super().__init__({"i": In(data.ArrayLayout(width, n)), "o": Out(width)})

    def elaborate(self, platform):
        m = Module()
        vals = [self.i[k] for k in range(self.n)]
        for level in range(1, self.levels + 1):
            nxt = []
            for k in range(0, len(vals), 2):
                if k + 1 < len(vals):
                    a, b = vals[k], vals[k + 1]
                    nxt.append(Mux(a > b, a, b))
                else:
                    nxt.append(vals[k])
            vals = nxt
            if level % self.lps == 0 and level != self.levels:
                regs = [Signal(self.width, name=f"l{level}_{k}") for k in range(len(vals))]
                m.d.sync += [r.eq(v) for r, v in zip(regs, vals)]
                vals = regs
        m.d.sync += self.o.eq(vals[0])
        return m


class ElementQuantizer(wiring.Component):
    """Quantize one FP32 element given its block's exponent: a 3-stage pipeline.

    Stage 1 (inputs ``x``, ``ep``, ``kill``, ``mode``): alignment distance
    ``d = ep - x.exp`` (``ep`` = block exponent + 127) and the significand bits that
    can matter. Stage 2: shift right by ``d`` keeping ``fw`` fraction bits and a sticky
    bit. Stage 3 (input ``u``, the random bits of this element): round the magnitude,
    saturate to ``±(2**(man_bits-1)-1)``, apply the sign. All registers advance only
    when ``en`` is high; ``m`` is valid 3 enabled cycles after the inputs, and ``u``
    must belong to the element in stage 3 (presented 2 enabled cycles after it).

    Zero, subnormal (flushed) and ``kill``-ed inputs give 0.
    """

    def __init__(self, *, man_bits: int, modes: tuple[str, ...], sr_bits: int = 8):
        for md in modes:
            if md not in ROUNDING_MODES:
                raise ValueError(f"rounding mode {md!r} is not supported; accepted values are "
                                 f"{', '.join(ROUNDING_MODES)}")
        if not 2 <= man_bits <= 16:
            raise ValueError(f"man_bits={man_bits} is out of range; accepted range is [2, 16]")
        self.man_bits = man_bits
        self.modes = tuple(modes)
        self.stochastic = "stochastic" in modes
        self.sr_bits = sr_bits
        self.fw = sr_bits if self.stochastic else 1
        self.latency = 3
        super().__init__({
            "en": In(1), "x": In(FP32Layout), "ep": In(EP_SHAPE), "kill": In(1),
            "mode": In(2), "u": In(sr_bits), "m": Out(signed(man_bits))})

    def elaborate(self, platform):
        m = Module()
        mb, fw = self.man_bits, self.fw
        width = mb - 1 + fw                  # integer bits + kept fraction bits
        k = 25 - mb                          # LSB position of the integer part at d=0
        mfull = Cat(self.x.frac, Const(1, 1))
        if k >= fw:
            mtop = mfull[k - fw:]
            sticky0 = mfull[:k - fw].any() if k > fw else Const(0, 1)
        else:
            mtop = Cat(Const(0, fw - k), mfull)
            sticky0 = Const(0, 1)
        assert len(mtop) == width

        # -- stage 1: alignment distance ----------------------------------------
        d = Signal(signed(14))
        m.d.comb += d.eq(self.ep - self.x.exp)
        s1_mtop = Signal(width)
        s1_st0 = Signal()
        s1_d = Signal(range(width + 1))
        s1_sat = Signal()
        s1_zero = Signal()
        s1_sign = Signal()
        s1_mode = Signal(2)
        with m.If(self.en):
            m.d.sync += [
                s1_mtop.eq(mtop), s1_st0.eq(sticky0),
                s1_d.eq(Mux(d > width, width, Mux(d < 0, 0, d[:len(s1_d)]))),
                s1_sat.eq(d < 0),
                s1_zero.eq((self.x.exp == 0) | self.kill),
                s1_sign.eq(self.x.sign), s1_mode.eq(self.mode)]

        # -- stage 2: shift with sticky ------------------------------------------
        shifted = (s1_mtop >> s1_d)[:width]
        prefix = [Const(0, 1)] + [s1_mtop[:j].any() for j in range(1, width + 1)]
        sticky = Array(prefix)[s1_d] | s1_st0
        s2_int = Signal(mb - 1)
        s2_frac = Signal(fw)
        s2_sticky = Signal()
        s2_sat = Signal()
        s2_zero = Signal()
        s2_sign = Signal()
        s2_mode = Signal(2)
        with m.If(self.en):
            m.d.sync += [
                s2_int.eq(shifted[fw:]), s2_frac.eq(shifted[:fw]), s2_sticky.eq(sticky),
                s2_sat.eq(s1_sat), s2_zero.eq(s1_zero), s2_sign.eq(s1_sign),
                s2_mode.eq(s1_mode)]

        # -- stage 3: round, saturate, sign --------------------------------------
        guard = s2_frac[fw - 1]
        rest = s2_frac[:fw - 1].any() | s2_sticky if fw > 1 else s2_sticky
        incs = {
            "nearest_even": guard & (rest | s2_int[0]),
            "nearest_away": guard,
            "toward_zero": Const(0, 1),
        }
        if self.stochastic:
            incs["stochastic"] = (s2_frac + self.u)[fw]
        inc = Signal()
        if len(self.modes) == 1:
            m.d.comb += inc.eq(incs[self.modes[0]])
        else:
            with m.Switch(s2_mode):
                for md in self.modes:
                    with m.Case(ROUNDING_MODES.index(md)):
                        m.d.comb += inc.eq(incs[md])
        # One adder does increment and sign: -(I + inc) == ~I + (1 - inc). Saturation
        # (I + inc > mmax) happens only when I is all ones and inc is set.
        mmax = mantissa_max(mb)
        smask = s2_sign.replicate(mb)
        signed_q = Signal(signed(mb))
        m.d.comb += signed_q.eq((Cat(s2_int, Const(0, 1)) ^ smask)
                                + Cat(inc ^ s2_sign, Const(0, mb - 1)))
        sat = s2_sat | (s2_int.all() & inc)
        with m.If(self.en):
            m.d.sync += self.m.eq(Mux(s2_zero, 0,
                                      Mux(sat, Mux(s2_sign, -mmax, mmax), signed_q)))
        return m


class Quantizer(wiring.Component):
    """Streaming FP32 -> BFP quantizer (see the module docstring and docs/quantizer.md).

    Parameters
    ----------
    config : QuantizerConfig

    Ports
    -----
    i : In(stream.Signature(fp32_beat_layout(lanes)))
        ``lanes`` FP32 values per beat; ``block_size / lanes`` consecutive beats form
        one block (blocks are counted from reset).
    o : Out(stream.Signature(bfp_beat_layout(lanes, man_bits, exp_bits)))
        One output beat per input beat, in order.
    rounding : In(2)
        Only when ``config.runtime_rounding``: rounding mode (index in
        ``ROUNDING_MODES``), sampled per beat as it leaves the block buffer; change it
        only while the unit is idle.
    seed, reseed : In(32), In(1)
        Only when stochastic rounding is built: while ``reseed`` is high the per-lane
        generators restart from ``seed`` (a new stream); assert it only while idle.
        After reset they hold the sequence of ``format.seed``.
    static_en, static_code : In(1), In(exp_bits)
        Only when ``config.static_exponent``: while ``static_en`` is high every valid
        block gets the shared exponent ``E = static_code - exp_bias`` (a biased code in
        ``[emin + bias, emax + bias]``; the caller checks the range) instead of its
        block maximum: elements at or above ``2**(E+1)`` saturate, an all-zero block
        gets ``E``, a block holding NaN/Inf is still flagged invalid. Sampled with
        ``rounding`` (per beat as it leaves the block buffer); change them only while
        the unit is idle.
    """

    def __init__(self, config: QuantizerConfig, *, tree_levels_per_stage: int = 1):
        if not isinstance(config, QuantizerConfig):
            raise TypeError(f"config must be a QuantizerConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.lanes = cfg.lanes
        self.beats = cfg.beats_per_block
        self.tree = MaxTree(width=8, n=cfg.lanes, levels_per_stage=tree_levels_per_stage)
        self.banks = 2 + -(-(self.tree.latency + 1) // self.beats)
        #: Cycles from the acceptance of a block's last input beat to the block's first
        #: output beat (no stalls).
        self.latency = self.tree.latency + 2 + 1 + 3
        members = {
            "i": In(stream.Signature(fp32_beat_layout(cfg.lanes))),
            "o": Out(stream.Signature(bfp_beat_layout(cfg.lanes, cfg.man_bits, cfg.exp_bits))),
        }
        if cfg.runtime_rounding:
            members["rounding"] = In(2, init=cfg.format.rounding_code)
        if cfg.has_stochastic:
            members["seed"] = In(32, init=cfg.format.seed)
            members["reseed"] = In(1)
        if cfg.static_exponent:
            members["static_en"] = In(1)
            members["static_code"] = In(cfg.exp_bits, init=cfg.format.exp_bias)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        cfg, fmt = self.config, self.config.format
        L, B, NB = self.lanes, self.beats, self.banks
        depth = NB * B

        m.submodules.mem = mem = Memory(shape=unsigned(32 * L), depth=depth, init=[])
        wp = mem.write_port()
        rp = mem.read_port(domain="sync")
        m.submodules.tree = tree = self.tree

        busy = Signal(NB)      # bank written completely, not yet read out
        expok = Signal(NB)     # bank's block exponent is final
        bank_f = Array(Signal(8, name=f"bank_f{b}") for b in range(NB))
        busy_set = Signal(NB)
        busy_clr = Signal(NB)
        exp_set = Signal(NB)
        m.d.sync += [busy.eq((busy | busy_set) & ~busy_clr),
                     expok.eq((expok | exp_set) & ~busy_clr)]

        # ---------------------------------------------------------------- write side
        wbank = Signal(range(NB))
        wbeat = Signal(range(B))
        waddr = Signal(range(depth))
        accept = Signal()
        m.d.comb += [self.i.ready.eq(~busy.bit_select(wbank, 1)),
                     accept.eq(self.i.valid & self.i.ready),
                     wp.addr.eq(waddr), wp.data.eq(self.i.payload), wp.en.eq(accept)]
        wlast = _ring_step(m, accept, waddr, depth, wbeat, B, wbank, NB)
        with m.If(accept & wlast):
            m.d.comb += busy_set.eq(Const(1, NB) << wbank)

        # exponent pipeline: x1 (fields registered) -> tree (latency T) -> running max
        x1 = Signal(data.ArrayLayout(8, L))
        m.d.sync += x1.eq(Cat(*(self.i.payload[k].exp for k in range(L))))
        m.d.comb += tree.i.eq(x1)
        tag_v, tag_last, tag_bank = accept, wlast, wbank
        for stage in range(1 + tree.latency):
            nv, nl, nb = Signal(name=f"xv{stage}"), Signal(name=f"xl{stage}"), \
                Signal(range(NB), name=f"xb{stage}")
            m.d.sync += [nv.eq(tag_v), nl.eq(tag_last), nb.eq(tag_bank)]
            tag_v, tag_last, tag_bank = nv, nl, nb
        run = Signal(8)
        newmax = Mux(tree.o > run, tree.o, run)
        with m.If(tag_v):
            with m.If(tag_last):
                m.d.sync += [bank_f[tag_bank].eq(newmax), run.eq(0)]
                m.d.comb += exp_set.eq(Const(1, NB) << tag_bank)
            with m.Else():
                m.d.sync += run.eq(newmax)

        # ----------------------------------------------------------------- read side
        adv = Signal()
        m.d.comb += adv.eq(~self.o.valid | self.o.ready)
        rbank = Signal(range(NB))
        rbeat = Signal(range(B))
        raddr = Signal(range(depth))
        issue = Signal()
        m.d.comb += [issue.eq(adv & expok.bit_select(rbank, 1)),
                     rp.addr.eq(raddr), rp.en.eq(adv)]
        rlast = _ring_step(m, issue, raddr, depth, rbeat, B, rbank, NB)
        with m.If(issue & rlast):
            m.d.comb += busy_clr.eq(Const(1, NB) << rbank)

        # block exponent: E = clamp(F - 127, emin, emax), emin for an all-zero block
        f = bank_f[rbank]
        e_raw = Signal(signed(10))
        m.d.comb += e_raw.eq(f - FP32_EXP_BIAS)
        e = Signal(signed(12))
        m.d.comb += e.eq(Mux((f == 0) | (e_raw < fmt.emin), fmt.emin,
                             Mux(e_raw > fmt.emax, fmt.emax, e_raw)))
        if cfg.static_exponent:
            # static shared exponent: replaces the block's E; ``inv`` still comes from
            # the block's real maximum field, so NaN/Inf blocks stay flagged
            e_dyn = e
            e = Signal(signed(12), name="e_sel")
            m.d.comb += e.eq(Mux(self.static_en, self.static_code - fmt.exp_bias, e_dyn))
        inv = f == FP32_EXP_SPECIAL

        ctrl = data.StructLayout({"valid": 1, "first": 1, "last": 1, "inv": 1,
                                  "code": unsigned(fmt.exp_bits), "ep": EP_SHAPE,
                                  "mode": 2})
        c1 = Signal(ctrl)
        mode = self.rounding if cfg.runtime_rounding else Const(fmt.rounding_code, 2)
        with m.If(adv):
            m.d.sync += [c1.valid.eq(issue), c1.first.eq(rbeat == 0), c1.last.eq(rlast),
                         c1.inv.eq(inv),
                         c1.code.eq(Mux(inv, fmt.exp_invalid_code, e + fmt.exp_bias)),
                         c1.ep.eq(e + FP32_EXP_BIAS), c1.mode.eq(mode)]
        # c1 is aligned with rp.data; the element pipeline adds 3 stages.
        stages = [c1]
        for s in range(2, 5):
            c = Signal(ctrl, name=f"c{s}")
            with m.If(adv):
                m.d.sync += c.eq(stages[-1])
            stages.append(c)
        c3, c4 = stages[2], stages[3]

        if cfg.has_stochastic:
            m.submodules.prng = prng = XorshiftLanes(lanes=L, bits=fmt.sr_bits,
                                                     reset_seed=fmt.seed)
            # the element in stage 3 of the element pipeline is aligned with c3
            m.d.comb += [prng.seed.eq(self.seed), prng.reseed.eq(self.reseed),
                         prng.step.eq(adv & c3.valid)]
        data_in = rp.data
        for lane in range(L):
            eq = ElementQuantizer(man_bits=fmt.man_bits, modes=cfg.rounding_modes,
                                  sr_bits=fmt.sr_bits)
            m.submodules[f"elem{lane}"] = eq
            m.d.comb += [eq.en.eq(adv), eq.x.eq(data_in[32 * lane:32 * (lane + 1)]),
                         eq.ep.eq(c1.ep), eq.kill.eq(c1.inv), eq.mode.eq(c1.mode),
                         self.o.payload.man[lane].eq(eq.m)]
            if cfg.has_stochastic:
                m.d.comb += eq.u.eq(prng.u[lane * fmt.sr_bits:(lane + 1) * fmt.sr_bits])
        m.d.comb += [self.o.valid.eq(c4.valid), self.o.payload.exp.eq(c4.code),
                     self.o.payload.invalid.eq(c4.inv), self.o.payload.first.eq(c4.first),
                     self.o.payload.last.eq(c4.last)]
        return m


# ------------------------------------------------------------------------- generation
def _port_map(q: Quantizer, top: str) -> dict:
    """Verilog port names, directions and widths, and the payload field offsets."""
    cfg = q.config
    ports: dict = {"clk": {"dir": "in", "width": 1}, "rst": {"dir": "in", "width": 1}}
    for path, member, _ in q.signature.flatten(q):
        name = "__".join(str(p) for p in path)
        ports[name] = {"dir": "in" if member.flow == In else "out",
                       "width": Shape_width(member.shape)}
    olay = bfp_beat_layout(cfg.lanes, cfg.man_bits, cfg.exp_bits)
    fields = {}
    for fname, field in olay:
        fields[fname] = {"offset": field.offset, "width": field.width}
    fields["man"]["element_width"] = cfg.man_bits
    return {"signals": ports,
            "i_payload": {"lane_width": 32, "lanes": cfg.lanes, "lane_layout": "fp32"},
            "o_payload": fields,
            "stream": {"in": "i", "out": "o", "valid": "valid", "ready": "ready",
                       "payload": "payload"}}


def Shape_width(shape) -> int:  # noqa: N802 - helper mirroring Shape.cast(...).width
    from amaranth.hdl import Shape
    return Shape.cast(shape).width


def generate(config: QuantizerConfig, out_dir: str | Path, *, name: str = "quantizer") \
        -> tuple[Path, Path]:
    """Write ``<name>.v`` and ``<name>.json`` (manifest) into ``out_dir``.

    ``name`` (the top module and file name) must be a Verilog identifier."""
    check_verilog_identifier(name, "name")
    q = Quantizer(config)
    text = verilog.convert(q, name=name, emit_src=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vpath = out / f"{name}.v"
    vpath.write_text(text)
    mpath = write_manifest(
        out / f"{name}.json", kind="quantizer", top=name, config=config.to_dict(),
        ports=_port_map(q, name), verilog=vpath, latency_cycles=q.latency,
        extra={"banks": q.banks})
    return vpath, mpath


# ------------------------------------------------------------------------------- CLI
def _config_from_args(a: argparse.Namespace) -> QuantizerConfig:
    """``--config`` (if given) as the base, then every option given on top of it."""
    base = None
    if getattr(a, "config", None):
        base = config_from_source(a.config, "quantizer", QuantizerConfig.from_dict)
    if a.format:
        fmt = get_bfp_format(a.format, "the quantizer")
    else:
        fmt = base.format if base is not None else BFPFormat()
    changes = {}
    if a.man_bits is not None:
        changes["man_bits"] = a.man_bits
    if a.exp_bits is not None:
        changes["exp_bits"] = a.exp_bits
    if a.block is not None:
        changes.update(block_shape=(a.block,), block_axes=(-1,))
    if a.rounding is not None:
        changes["rounding"] = a.rounding
    if a.sr_bits is not None:
        changes["sr_bits"] = a.sr_bits
    if a.seed is not None:
        changes["seed"] = a.seed
    if changes:
        fmt = fmt.replace(**changes)

    def pick(value, field, default):
        if value is not None:
            return value
        return getattr(base, field) if base is not None else default

    return QuantizerConfig(format=fmt, lanes=pick(a.lanes, "lanes", 1),
                           runtime_rounding=pick(a.runtime_rounding, "runtime_rounding", False),
                           static_exponent=base.static_exponent if base is not None else False)


def _cmd_generate(a: argparse.Namespace) -> int:
    cfg = _config_from_args(a)
    vpath, mpath = generate(cfg, a.output, name=a.name)
    print(f"wrote {vpath} and {mpath} ({cfg.format.describe()}, {cfg.lanes} lanes"
          f"{', run-time rounding' if cfg.runtime_rounding else ''})")
    return 0


def register_cli(subparsers, generate_subparsers) -> None:
    """Add ``hbfp-hw generate quantizer``."""
    p = generate_subparsers.add_parser(
        "quantizer", help="streaming FP32 -> BFP quantizer",
        description="Write the quantizer's Verilog and JSON manifest. Start from "
                    "--config or --format (default: 8-bit mantissas, 8-bit exponent, blocks "
                    "of 32, nearest_even, 1 lane) and override single fields.")
    p.add_argument("--config", metavar="JSON",
                   help="QuantizerConfig JSON (a file or literal text; a quantizer manifest "
                        "works too) to start from; the options below override it")
    p.add_argument("--format", help="preset format name (mxint8, hbfp8, hbfp4, cbfp8)")
    p.add_argument("--man-bits", type=int, help="mantissa bits incl. sign [2, 16]")
    p.add_argument("--exp-bits", type=int, help="shared-exponent bits [2, 10]")
    p.add_argument("--block", type=int, help="block size in elements (1-D)")
    p.add_argument("--lanes", type=int, default=None,
                   help="FP32 values per beat (default 1, or --config's)")
    p.add_argument("--rounding", choices=ROUNDING_MODES, help="rounding mode")
    p.add_argument("--runtime-rounding", action="store_true", default=None,
                   help="build every rounding mode, selected by the 'rounding' port")
    p.add_argument("--sr-bits", type=int, help="random bits per element for stochastic")
    p.add_argument("--seed", type=int, help="stochastic-rounding seed after reset")
    p.add_argument("--name", default="quantizer",
                   help="top module name, a Verilog identifier (default quantizer)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=_cmd_generate)
