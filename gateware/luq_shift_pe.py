"""Shift-add PE for the backward GEMMs with LUQ gradients (no multipliers).

With ``dY`` in LUQ codes (sign + ``c``, value ``sign * alpha * 2**(c-1)``), every product
of ``dX = dY W`` and ``dW = dY^T X`` is the other operand's BFP mantissa shifted left by
``c - 1``: :class:`LuqShiftPE` computes the datapath of :func:`hbfp_hw.luq.luq_matmul`
for one output row and ``cols`` adjacent output columns (the code row is shared by the
columns: the array mode), ``lanes`` K elements per beat:

====  ==========================================================================
S0    input register (codes, ``cols x lanes`` mantissas, control)
S1a   per column: ``lanes`` terms ``+-(m << (c - 1))`` (0 for ``c = 0``), registered
S1b   their sum over the lanes (adder tree), registered
S2    block sum ``P`` over the beats of one K block (exact integer)
S3    ``(P << G) >>> shift`` (the block's alignment to the column's ``e_ref``)
S4    ``acc = (first block ? 0 : acc) + aligned``; after the output's last block the
      accumulators go to the output register
====  ==========================================================================

The K block (``tile`` elements of the BFP operand sharing one exponent) is sent as
``tile / lanes`` beats; SMP samples of the same K elements may be sent as further beats
of the same block (the golden model sums them into ``P`` too). The alignment shifts
``min(e_ref - E_block, 62)`` per column come with the block's beats, computed by the
sequencer from the BFP exponents (as for the MAC array); the host scales the result by
``2**(e_ref - G - frac_b - log2 samples) * alpha``.

Stream interface with back-pressure: the pipeline advances when its output register is
empty or taken; input ``ready`` is that condition.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw.gemm import DEFAULT_GUARD_BITS
from hbfp_hw.luq import LUQFormat, luq_accumulator_bits
from hbfp_hw.validate import check_int

__all__ = ["LuqShiftPE", "shift_pe_in_layout", "generate"]

SHIFT_BITS = 6          # alignment shifts 0..62 (golden: min(e_ref - E, 62))


def shift_pe_in_layout(bits: int, man_bits: int, lanes: int, cols: int) -> data.StructLayout:
    """Input payload: codes, mantissas ``b[col][lane]``, per-column shifts, flags."""
    return data.StructLayout({
        "code": data.ArrayLayout(bits, lanes),
        "b": data.ArrayLayout(data.ArrayLayout(signed(man_bits), lanes), cols),
        "shift": data.ArrayLayout(SHIFT_BITS, cols),
        "kfirst": 1,    # first beat of a K block
        "klast": 1,     # last beat of a K block
        "ofirst": 1,    # beat of the output's first K block
        "olast": 1,     # beat of the output's last K block
    })


class LuqShiftPE(wiring.Component):
    """``cols`` shift-add PEs sharing one LUQ code row, ``lanes`` terms per beat.

    Parameters
    ----------
    fmt : LUQFormat        code width and ``max_shift``
    man_bits : int         BFP mantissa width of the other operand, in [2, 16]
    lanes, cols : int      K elements per beat, output columns
    tile : int             K block length (a multiple of ``lanes``)
    k_max : int            largest K the accumulator is sized for
    guard_bits : int
    """

    def __init__(self, fmt: LUQFormat, *, man_bits: int = 8, lanes: int = 4, cols: int = 1,
                 tile: int = 16, k_max: int = 1024, guard_bits: int = DEFAULT_GUARD_BITS):
        if not isinstance(fmt, LUQFormat):
            raise TypeError(f"fmt must be a LUQFormat, got {type(fmt).__name__}")
        check_int("man_bits", man_bits, 2, 16)
        check_int("lanes", lanes, 1, 64)
        check_int("cols", cols, 1, 64)
        check_int("tile", tile, 1, 4096)
        check_int("k_max", k_max, 1, 2**20)
        check_int("guard_bits", guard_bits, 0, 24)
        if tile % lanes:
            raise ValueError(f"tile={tile} is not a multiple of lanes={lanes}")
        self.fmt, self.man_bits, self.lanes, self.cols = fmt, man_bits, lanes, cols
        self.tile, self.k_max, self.guard_bits = tile, k_max, guard_bits
        self.term_bits = man_bits + fmt.max_shift + 1
        # P over one block (samples x tile terms of at most mmax * 2**max_shift)
        pmax = fmt.samples * tile * (2 ** (man_bits - 1) - 1) * 2**fmt.max_shift
        self.p_bits = pmax.bit_length() + 1
        self.acc_bits = luq_accumulator_bits(fmt, man_bits, tile, k_max, guard_bits)
        #: cycles from an accepted beat (the output's last) to its output beat
        self.latency = 6
        super().__init__({
            "i": In(stream.Signature(shift_pe_in_layout(fmt.bits, man_bits, lanes, cols))),
            "o": Out(stream.Signature(data.ArrayLayout(signed(self.acc_bits), cols))),
        })

    def elaborate(self, platform):
        m = Module()
        fmt, L, C = self.fmt, self.lanes, self.cols
        G = self.guard_bits
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        ctl = data.StructLayout({"v": 1, "kfirst": 1, "klast": 1, "ofirst": 1, "olast": 1,
                                 "shift": data.ArrayLayout(SHIFT_BITS, C)})

        # S0
        c0 = Signal(ctl)
        in0 = Signal(shift_pe_in_layout(fmt.bits, self.man_bits, L, C))
        with m.If(adv):
            p = self.i.payload
            m.d.sync += [in0.eq(p), c0.v.eq(self.i.valid)]
            m.d.sync += [c0.kfirst.eq(p.kfirst), c0.klast.eq(p.klast), c0.ofirst.eq(p.ofirst),
                         c0.olast.eq(p.olast), c0.shift.eq(p.shift)]
        # S1a: shift-add terms (registered); S1b: lane sum
        c1 = Signal(ctl)
        psum = [Signal(signed(self.term_bits + max(L - 1, 1).bit_length()), name=f"psum{j}")
                for j in range(C)]
        nb = fmt.bits - 1
        for j in range(C):
            terms = []
            for lane in range(L):
                code = in0.code[lane]
                c = code[:nb]
                neg = code[nb]
                b = in0.b[j][lane]
                # negate the narrow mantissa (|b| <= mmax: fits man_bits), then shift
                sb = Signal(signed(self.man_bits), name=f"sb{j}_{lane}")
                m.d.comb += sb.eq(Mux(neg, -b, b))
                term = Signal(signed(self.term_bits), name=f"t{j}_{lane}")
                with m.If(adv):         # S1a: the shifted terms, registered
                    m.d.sync += term.eq(Mux(c == 0, 0, sb << (c - 1)[:nb]))
                terms.append(term)
            while len(terms) > 1:
                terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                         for i in range(0, len(terms), 2)]
            with m.If(adv):
                m.d.sync += psum[j].eq(terms[0])
        c1a = Signal(ctl)
        with m.If(adv):
            m.d.sync += [c1a.eq(c0), c1.eq(c1a)]
        # S2: block sum
        c2 = Signal(ctl)
        P = [Signal(signed(self.p_bits), name=f"P{j}") for j in range(C)]
        with m.If(adv):
            m.d.sync += c2.eq(c1)
            with m.If(c1.v):
                for j in range(C):
                    m.d.sync += P[j].eq(Mux(c1.kfirst, psum[j], P[j] + psum[j]))
        # S3: alignment
        c3 = Signal(ctl)
        aligned = [Signal(signed(self.acc_bits), name=f"aligned{j}") for j in range(C)]
        with m.If(adv):
            m.d.sync += c3.eq(c2)
            for j in range(C):
                wide = Signal(signed(self.p_bits + G), name=f"pg{j}")
                m.d.comb += wide.eq(P[j] << G)
                m.d.sync += aligned[j].eq(wide >> c2.shift[j])
        # S4: accumulate, output
        acc = [Signal(signed(self.acc_bits), name=f"acc{j}") for j in range(C)]
        take = c3.v & c3.klast
        with m.If(adv):
            m.d.sync += self.o.valid.eq(take & c3.olast)
            for j in range(C):
                new = Signal(signed(self.acc_bits), name=f"accn{j}")
                m.d.comb += new.eq(Mux(c3.ofirst, 0, acc[j]) + aligned[j])
                with m.If(take):
                    m.d.sync += [acc[j].eq(new), self.o.payload[j].eq(new)]
        return m


def generate(pe: LuqShiftPE, out_dir, *, name: str = "luq_shift_pe"):
    """Write ``<name>.v`` and its manifest (kind ``luq_shift_pe``)."""
    from pathlib import Path

    from amaranth.back import verilog

    from hbfp_hw.manifest import check_verilog_identifier, write_manifest
    check_verilog_identifier(name, "name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vpath = out / f"{name}.v"
    vpath.write_text(verilog.convert(pe, name=name, emit_src=False))
    cfg = {"format": pe.fmt.to_dict(), "man_bits": pe.man_bits, "lanes": pe.lanes,
           "cols": pe.cols, "tile": pe.tile, "k_max": pe.k_max, "guard_bits": pe.guard_bits}
    mpath = write_manifest(out / f"{name}.json", kind="luq_shift_pe", top=name, config=cfg,
                           ports={}, verilog=vpath, latency_cycles=pe.latency,
                           extra={"acc_bits": pe.acc_bits, "shift_bits": SHIFT_BITS})
    return vpath, mpath
