"""The GEMM engine's datapath for 1-D block formats (MX): one output at a time.

For formats whose blocks are 1-D along the last axis of the stored tensor (OCP MXINT8:
32 elements), a GEMM's K blocks are rows of the stored operand (``A`` as stored, ``B``
stored transposed: both blocked along K, block length ``L`` = the block size) or, in the
other orientation (``A`` stored transposed, ``B`` as stored), single K elements whose
exponent is shared along M (resp. N), ``L`` = 1. Both follow :func:`hbfp_hw.bfp_matmul`
bit for bit: per output ``(i, j)``

1. **reference**: read the exponent code of every K block of A's row block and of B's
   column block; ``e_ref`` = row maximum + column maximum over valid blocks; the output
   is NaN if any of them is invalid;
2. **products**: per K block, ``P = sum_l ma * mb`` (exact integers), then
   ``acc += (P << G) >> min(e_ref - e, 62)`` (arithmetic shift);
3. **conversion**: :class:`~hbfp_hw.gateware.fp32_convert.Fp32Convert` with scale
   ``e_ref - G - fa - fb``; the result goes to ``out[off + i * N + j]`` (STORE) and to
   ``sample``.

With ``L`` a multiple of the buffer word (``tile`` mantissas) a step multiplies a whole
word of A with a whole word of B (``tile`` products); with ``L`` = 1 one element each.
Three clocks per step (A and B may share a buffer, which has one read port). Every
operand buffer sees the same read address; ``rd_buf`` selects whose data is taken (the
data of the address presented a clock earlier).
"""

from __future__ import annotations

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..engine import sample_signature

from ..fp32_convert import SCALE_BITS, Fp32Convert

__all__ = ["MxStream", "mx_job_layout", "mx_stream_signature"]

#: The "no valid block" row/column maximum of the golden model (``hbfp_hw.gemm``).
NO_EXP = -(1 << 14)


def mx_job_layout(operand_buffers: int) -> data.StructLayout:
    """An MX GEMM job (all strides precomputed by the engine).

    ``a_ebase_step`` / ``a_mbase_step``: exponent-index / element steps of A's bases per
    output row ``i`` (``a_ewrap``: the exponent base steps only every ``a_ewrap`` rows);
    ``a_estep`` / ``a_mstep``: steps per K block / per K element; likewise for B per
    output column ``j``. ``wide``: a step covers a whole word (``tile`` elements).
    """
    return data.StructLayout({
        "a": range(operand_buffers), "b": range(operand_buffers), "store": 1, "wide": 1,
        "frac_a": 5, "frac_b": 5, "M": 16, "N": 16, "nkb": 17, "L": 17, "off": 32,
        "a_ebase_step": 32, "a_ewrap": 17, "a_mbase_step": 32, "a_estep": 32, "a_mstep": 32,
        "b_ebase_step": 32, "b_ewrap": 17, "b_mbase_step": 32, "b_estep": 32, "b_mstep": 32})


def mx_stream_signature(*, tile: int, operand_buffers: int, man_width: int,
                        exp_width: int) -> wiring.Signature:
    """The ports of :class:`MxStream` (also used, unelaborated, by a GEMM engine without
    1-D slots: every port then reads 0)."""
    return wiring.Signature({
        "job": In(mx_job_layout(operand_buffers)), "start": In(1), "done": Out(1),
        "rd_buf": Out(range(operand_buffers)), "rd_word": Out(32), "rd_elem": Out(32),
        "man_data": In(man_width * tile), "exp_data": In(exp_width),
        "out_addr": Out(32), "out_data": Out(32), "out_en": Out(1),
        "sample": Out(sample_signature())})


class MxStream(wiring.Component):
    """Reference-exponent scan, block dot products and FP32 conversion per output.

    Ports as :class:`~hbfp_hw.gateware.engines.gemm_stream.GemmStream` (``job``,
    ``start``, ``done``, ``rd_buf`` / ``rd_word`` / ``rd_elem`` with ``man_data`` /
    ``exp_data``, ``out_*``, ``sample``).
    """

    def __init__(self, *, tile: int, operand_buffers: int, man_width: int, exp_width: int,
                 man_bits: int, exp_bias: int, exp_invalid_code: int, guard_bits: int,
                 acc_bits: int, psum_bits: int) -> None:
        self.tile, self.mw, self.man_bits = tile, man_width, man_bits
        self.bias, self.inv, self.G = exp_bias, exp_invalid_code, guard_bits
        self.acc_bits, self.psum_bits = acc_bits, psum_bits
        super().__init__(mx_stream_signature(tile=tile, operand_buffers=operand_buffers,
                                             man_width=man_width, exp_width=exp_width))

    def elaborate(self, platform):
        m = Module()
        j, T, mw = self.job, self.tile, self.mw
        tsh = T.bit_length() - 1
        i_, j_ = Signal(16), Signal(16)               # output position
        i_in, j_in = Signal(17), Signal(17)           # position inside the exponent block
        a_eb, a_mb, b_eb, b_mb = (Signal(32, name=n) for n in ("a_eb", "a_mb", "b_eb",
                                                               "b_mb"))
        ae, am, be, bm = (Signal(32, name=n) for n in ("ae", "am", "be", "bm"))
        kb = Signal(17)
        el = Signal(17)                               # K element inside the block
        rmax, cmax = Signal(signed(18)), Signal(signed(18))
        bad = Signal()
        code_a = Signal.like(self.exp_data)
        word_a = Signal.like(self.man_data)
        lane_a, lane_b = Signal(max(tsh, 1)), Signal(max(tsh, 1))
        e_ref = Signal(signed(18))
        shift = Signal(range(64))
        psum = Signal(signed(self.psum_bits))
        acc = Signal(signed(self.acc_bits))
        optr = Signal(32)

        def lanes(word):
            return [word[mw * k: mw * k + self.man_bits].as_signed() for k in range(T)]

        # the step's products: a whole word of each operand, or one lane of each
        la, lb = lanes(word_a), lanes(self.man_data)
        wide_sum = la[0] * lb[0]
        for k in range(1, T):
            wide_sum = wide_sum + la[k] * lb[k]
        one_a, one_b = Signal(signed(self.man_bits)), Signal(signed(self.man_bits))
        with m.Switch(lane_a):
            for k in range(T):
                with m.Case(k):
                    m.d.comb += one_a.eq(la[k])
        with m.Switch(lane_b):
            for k in range(T):
                with m.Case(k):
                    m.d.comb += one_b.eq(lb[k])
        prod = Mux(j.wide, wide_sum, one_a * one_b)

        def code_to_e(code):
            return code - self.bias

        m.submodules.conv = conv = Fp32Convert(acc_bits=self.acc_bits)
        e_ref_c = Mux(e_ref < NO_EXP, NO_EXP, e_ref)
        scale = Signal(signed(SCALE_BITS))
        m.d.comb += [scale.eq(e_ref_c - self.G - j.frac_a - j.frac_b), conv.acc.eq(acc),
                     conv.scale.eq(scale), conv.nan.eq(bad)]
        step_el = Mux(j.wide, T, 1)
        m.d.comb += [self.out_addr.eq(optr), self.out_data.eq(conv.bits)]
        m.d.sync += [self.sample.valid.eq(0), self.sample.payload.eq(conv.bits)]
        shifted = Signal(signed(self.psum_bits + self.G))
        m.d.comb += shifted.eq((psum << self.G) >> shift)

        with m.FSM(name="mx"):
            with m.State("IDLE"):
                m.d.comb += self.done.eq(1)
                with m.If(self.start):
                    m.d.sync += [i_.eq(0), j_.eq(0), i_in.eq(0), j_in.eq(0), a_eb.eq(0),
                                 a_mb.eq(0), b_eb.eq(0), b_mb.eq(0), optr.eq(j.off)]
                    m.next = "O_START"
            with m.State("O_START"):
                m.d.sync += [kb.eq(0), ae.eq(a_eb), be.eq(b_eb), rmax.eq(NO_EXP),
                             cmax.eq(NO_EXP), bad.eq(0)]
                m.next = "R_A"
            # 1. reference exponents (and invalid blocks) of the row and column
            with m.State("R_A"):
                m.d.comb += [self.rd_buf.eq(j.a), self.rd_elem.eq(ae)]
                m.next = "R_B"
            with m.State("R_B"):
                m.d.comb += [self.rd_buf.eq(j.a), self.rd_elem.eq(be)]
                m.d.sync += code_a.eq(self.exp_data)
                m.next = "R_C"
            with m.State("R_C"):
                m.d.comb += self.rd_buf.eq(j.b)
                ea, eb = code_to_e(code_a), code_to_e(self.exp_data)
                with m.If(code_a == self.inv):
                    m.d.sync += bad.eq(1)
                with m.Elif(ea > rmax):
                    m.d.sync += rmax.eq(ea)
                with m.If(self.exp_data == self.inv):
                    m.d.sync += bad.eq(1)
                with m.Elif(eb > cmax):
                    m.d.sync += cmax.eq(eb)
                m.d.sync += [ae.eq(ae + j.a_estep), be.eq(be + j.b_estep), kb.eq(kb + 1)]
                with m.If(kb == j.nkb - 1):
                    m.next = "P_INIT"
                with m.Else():
                    m.next = "R_A"
            with m.State("P_INIT"):
                m.d.sync += [e_ref.eq(rmax + cmax), acc.eq(0), kb.eq(0), ae.eq(a_eb),
                             be.eq(b_eb), am.eq(a_mb), bm.eq(b_mb)]
                m.next = "PE_A"
            # 2. per K block: its exponents, then its products
            with m.State("PE_A"):
                m.d.comb += [self.rd_buf.eq(j.a), self.rd_elem.eq(ae)]
                m.next = "PE_B"
            with m.State("PE_B"):
                m.d.comb += [self.rd_buf.eq(j.a), self.rd_elem.eq(be)]
                m.d.sync += code_a.eq(self.exp_data)
                m.next = "PE_C"
            with m.State("PE_C"):
                m.d.comb += self.rd_buf.eq(j.b)
                s = Signal(signed(20))
                m.d.comb += s.eq(e_ref - code_to_e(code_a) - code_to_e(self.exp_data))
                m.d.sync += [shift.eq(Mux(s < 0, 0, Mux(s > 62, 62, s))), psum.eq(0),
                             el.eq(0)]
                m.next = "PM_A"
            with m.State("PM_A"):
                m.d.comb += [self.rd_buf.eq(j.a), self.rd_word.eq(am >> tsh)]
                m.next = "PM_B"
            with m.State("PM_B"):
                m.d.comb += [self.rd_buf.eq(j.a), self.rd_word.eq(bm >> tsh)]
                m.d.sync += [word_a.eq(self.man_data), lane_a.eq(am), lane_b.eq(bm)]
                m.next = "PM_C"
            with m.State("PM_C"):
                m.d.comb += self.rd_buf.eq(j.b)
                m.d.sync += [psum.eq(psum + prod), el.eq(el + step_el),
                             am.eq(am + Mux(j.wide, T, j.a_mstep)),
                             bm.eq(bm + Mux(j.wide, T, j.b_mstep))]
                with m.If(el + step_el >= j.L):
                    m.next = "P_ACC"
                with m.Else():
                    m.next = "PM_A"
            with m.State("P_ACC"):
                m.d.sync += [acc.eq(acc + shifted), kb.eq(kb + 1), ae.eq(ae + j.a_estep),
                             be.eq(be + j.b_estep)]
                with m.If(kb == j.nkb - 1):
                    m.next = "CONV"
                with m.Else():
                    m.next = "PE_A"
            # 3. conversion and the output write
            with m.State("CONV"):
                m.d.comb += conv.i_valid.eq(1)
                m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(conv.o_valid):
                    m.d.comb += self.out_en.eq(j.store)
                    m.d.sync += [self.sample.valid.eq(j.store), optr.eq(optr + 1)]
                    m.next = "NEXT"
            with m.State("NEXT"):
                with m.If(j_ == j.N - 1):
                    m.d.sync += [j_.eq(0), j_in.eq(0), b_eb.eq(0), b_mb.eq(0),
                                 i_.eq(i_ + 1), a_mb.eq(a_mb + j.a_mbase_step)]
                    with m.If(i_in == j.a_ewrap - 1):
                        m.d.sync += [i_in.eq(0), a_eb.eq(a_eb + j.a_ebase_step)]
                    with m.Else():
                        m.d.sync += i_in.eq(i_in + 1)
                    with m.If(i_ == j.M - 1):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "O_START"
                with m.Else():
                    m.d.sync += [j_.eq(j_ + 1), b_mb.eq(b_mb + j.b_mbase_step)]
                    with m.If(j_in == j.b_ewrap - 1):
                        m.d.sync += [j_in.eq(0), b_eb.eq(b_eb + j.b_ebase_step)]
                    with m.Else():
                        m.d.sync += j_in.eq(j_in + 1)
                    m.next = "O_START"
        return m
