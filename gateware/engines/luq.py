"""LUQ_GEMM and LUQ_QUANTIZE: the LUQ engine (4-bit logarithmic gradients, docs/luq.md).

**LUQ_GEMM** computes :func:`hbfp_hw.luq.luq_matmul` ``y = a @ b`` (the emulator's
``_op_luq_gemm``): ``a`` (rows, k) LUQ codes in ``luq.a`` (sample-major: code ``(s, i,
kk)`` at ``a_offset + (s * rows + i) * k + kk``), ``b`` (k, cols) a BFP operand with
``tile x tile`` blocks in an operand buffer. The datapath is one
:class:`~hbfp_hw.gateware.luq_shift_pe.LuqShiftPE` with ``lanes = 1`` and ``cols = tile``:
per clock one ``opN.man`` word (row ``kk`` of a K block: ``tile`` mantissas of ``tile``
output columns) and one code, every product a shift of a mantissa (no multiplier).

* **Checks**, in the emulator's order: flags, operand buffer (BAD_BUFFER), slot,
  samples, rows / k / cols non-zero, ``k <= k_max`` (K_OVERFLOW), ``alpha`` (0 or a
  positive normal FP32), the operand's size, the ``luq.a`` and ``out`` ranges, then a
  scan of every mantissa word (DATA_RANGE, first element over the slot's ``mmax``) and
  every exponent code (DATA_RANGE, first code above the invalid code).
* **Per column block** ``jb``: ``nkb`` clocks read its exponent codes (reference code
  ``e_ref`` = maximum over valid blocks, invalid block -> NaN column); then for every
  output row ``i`` the beats ``(kb, s, r)`` -- K block, SMP sample, row in the block --
  one per clock, with the block's shift ``min(e_ref - E, 62)`` and codes of ``kk >= k``
  forced to zero. The PE's accumulators (one per column) leave after the row's last K
  block into a shift register that feeds one :class:`Fp32Convert` per clock
  (``acc * 2**(e_ref - G - frac_b - log2 samples)``), then an FP32 multiply by ``alpha``
  (24 x 24 bits, round to nearest even, overflow to Inf, results below ``2**-126`` after
  the rounding of the gradual-underflow product flushed to +0, NaN on NaN columns and
  with ``A_INVALID``), and the columns below ``cols`` are written to ``out``.
* **Time**: the scans (``nkb * gn * tile + nkb * gn`` clocks), then per column block
  ``nkb + rows * nkb * samples * tile`` clocks plus about 20 (pipeline drain):
  ``tile`` shift-add products per clock.

**LUQ_QUANTIZE** is :func:`hbfp_hw.luq.luq_quantize` on ``count`` FP32 words of ``fp_in``
(the emulator's ``_op_luq_quantize``): a first pass (one word per clock) finds NaN/Inf
(INVALID_DATA, first index, nothing written) and ``max|x|`` (subnormals as 0); the scale
is ``max|x| * 2**-6`` or, with ``MAX_ABS``, the ``max_abs`` field's; the generators are
reseeded from ``seed`` unless ``CONTINUE``; a second pass gathers ``lanes`` words per beat
into :class:`~hbfp_hw.gateware.luq_quantizer.LuqQuantizer` and writes its codes to
``luq.a``, counting elements above the top level (``saturated``). Answer: ``alpha``,
``max_abs``, ``saturated``. Time: ``count + ceil(count / lanes) * (lanes + 2)`` clocks
plus about 10.

With ``luq_lanes = 0`` the engine only answers UNSUPPORTED (detail 0).
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed

from hbfp_hw import protocol as P
from hbfp_hw.luq import luq_accumulator_bits

from ..engine import EngineStatus, OptionalEngine, port_name, status_ok
from ..fp32_convert import FP32_NAN, Fp32Convert
from ..luq_quantizer import LuqQuantizer
from ..luq_shift_pe import LuqShiftPE

__all__ = ["LuqEngine", "LUQ_NAN_INF_TIMES_ZERO"]

#: FP32 bits of ``Inf * 0`` as NumPy computes it on x86 (the golden model's ``v * alpha``
#: with ``v = +-Inf`` and ``alpha = 0``): the default NaN with the sign bit set.
LUQ_NAN_INF_TIMES_ZERO = 0xFFC00000


class LuqEngine(OptionalEngine):
    """Engine for LUQ_GEMM and LUQ_QUANTIZE (see the module docstring)."""

    lanes_of = staticmethod(P.luq_lanes)

    def __init__(self, config, specs, *, rom_depth: int) -> None:
        super().__init__(config, specs, rom_depth=rom_depth)
        if self.lanes:
            cfg = config
            self.pe_fmt = P.luq_format(cfg, samples=max(P.LUQ_SAMPLES))
            self.pe_man_bits = cfg.man_bits_max
            self.acc_bits = luq_accumulator_bits(self.pe_fmt, cfg.man_bits_max, cfg.tile,
                                                 cfg.k_max, cfg.guard_bits)

    def elaborate(self, platform):
        m = Module()
        fin = EngineStatus(m, self)
        pay = fin.pay
        L = self.lanes
        if not L:
            return fin.unsupported_only("luq")

        cfg = self.config
        T = cfg.tile
        lt = T.bit_length() - 1
        G = cfg.guard_bits
        sp = {s.name: s for s in self.specs}
        man_specs = [sp[f"op{i}.man"] for i in range(cfg.operand_buffers)]
        exp_specs = [sp[f"op{i}.exp"] for i in range(cfg.operand_buffers)]
        a_s, out_s, fp_s = sp["luq.a"], sp["out"], sp["fp_in"]
        man_r = [getattr(self.bufs, f"{port_name(s)}_r") for s in man_specs]
        exp_r = [getattr(self.bufs, f"{port_name(s)}_r") for s in exp_specs]
        a_r = getattr(self.bufs, f"{port_name(a_s)}_r")
        a_w = getattr(self.bufs, f"{port_name(a_s)}_w")
        out_w = getattr(self.bufs, f"{port_name(out_s)}_w")
        fp_r = getattr(self.bufs, f"{port_name(fp_s)}_r")
        wb = 8 * man_specs[0].wire_bytes            # bits per mantissa lane in a word

        g = self.cmd.payload.args.luq_gemm
        qa = self.cmd.payload.args.luq_quantize
        glay = P.REQUESTS[P.Op.LUQ_GEMM]
        qlay = P.REQUESTS[P.Op.LUQ_QUANTIZE]
        is_gemm = Signal()

        # ------------------------------------------------------------ submodules
        m.submodules.pe = pe = LuqShiftPE(self.pe_fmt, man_bits=self.pe_man_bits, lanes=1,
                                          cols=T, tile=T, k_max=cfg.k_max, guard_bits=G)
        m.submodules.conv = conv = Fp32Convert(acc_bits=pe.acc_bits)
        m.submodules.quant = quant = LuqQuantizer(P.luq_format(cfg))

        # ------------------------------------------------------------ operand selection
        b_sel = g.b[:max(1, (cfg.operand_buffers - 1).bit_length())]
        man_addr = Signal(32)
        exp_addr = Signal(32)
        man_data = Signal(wb * T)
        exp_data = Signal(16)
        for i in range(cfg.operand_buffers):
            m.d.comb += [man_r[i].addr.eq(man_addr), exp_r[i].addr.eq(exp_addr)]
            with m.If(b_sel == i):
                m.d.comb += [man_data.eq(man_r[i].data), exp_data.eq(exp_r[i].data)]
        lanes_v = [man_data[c * wb:(c + 1) * wb].as_signed() for c in range(T)]

        # slot constants
        mmax = Signal(16)
        inv_code = Signal(16)
        bias = Signal(16)
        frac = Signal(5)
        with m.Switch(g.slot_b):
            for i in P.luq_slots(cfg):
                f = cfg.formats[i]
                with m.Case(i):
                    m.d.comb += [mmax.eq(f.mmax), inv_code.eq(f.exp_invalid_code),
                                 bias.eq(f.exp_bias), frac.eq(f.frac_bits)]
        slot_ok = Cat(*[g.slot_b == i for i in P.luq_slots(cfg)]).any()
        slog = Signal(3)
        s_ok = Signal()
        with m.Switch(g.samples):
            for k, s in enumerate(P.LUQ_SAMPLES):
                with m.Case(s):
                    m.d.comb += [slog.eq(k), s_ok.eq(1)]
        ab = g.alpha
        alpha_ok = (ab == 0) | (~ab[31] & (ab[23:31] != 0) & (ab[23:31] != 255))

        # ------------------------------------------------------------ GEMM sizes
        nkb, gn = Signal(16), Signal(16)
        mk, mn = Signal(32), Signal(32)
        nblk = Signal(32)
        smk = Signal(37)
        n_el = Signal(48)
        nwords = Signal(40)

        # scan / loop counters
        sc_i = Signal(40)           # issued index
        ck_v = Signal()             # a read is checked this clock
        ck_i = Signal(40)
        eref = Signal(16)
        badcol = Signal()
        jb, row = Signal(16), Signal(16)
        kb, s_i, r_i = Signal(16), Signal(5), Signal(range(T))
        mblk = Signal(40)           # (kb * gn + jb) * T
        eblk = Signal(32)           # kb * gn + jb
        crow = Signal(33)           # a_offset + row * k
        cblk = Signal(33)           # crow + kb * T
        cs = Signal(37)             # cblk + s * rows * k
        kbT = Signal(17)
        jbT = Signal(17)
        feed = Signal()
        f_kfirst, f_klast, f_ofirst, f_olast, f_mask = (
            Signal(name=n) for n in ("f_kfirst", "f_klast", "f_ofirst", "f_olast", "f_mask"))
        wait = Signal(5)

        # drain side
        d_row = Signal(16)
        out_row = Signal(33)        # out_offset + d_row * cols + jb * T
        ncolv = Signal(17)          # columns of this block below cols
        bank = [Signal(signed(pe.acc_bits), name=f"bank{c}") for c in range(T)]
        dcnt = Signal(range(T + 1))
        dcol = Signal(range(T + 1))
        scale = Signal(signed(16))
        nan_col = Signal()

        # ------------------------------------------------------------ QUANTIZE state
        qn = Signal(32)
        qt = Signal(33)             # issued element
        q_v = Signal()
        q_t = Signal(33)
        amax = Signal(31)
        alpha = Signal(32)
        top = Signal(32)
        sat = Signal(32)
        gl = Signal(range(L + 1))
        gbeat = [Signal(32, name=f"gbeat{i}") for i in range(L)]
        g_v = Signal()
        g_l = Signal(range(L))
        g_t = Signal(33)
        qbase = Signal(33)
        nbeats = Signal(32)
        wbeats = Signal(32)
        wr_busy = Signal()
        wr_l = Signal(range(L + 1))
        wr_t = Signal(33)
        wr_codes = [Signal(4, name=f"wrc{i}") for i in range(L)]
        q_run = Signal()

        def oor(off, n, depth):
            return (off + n) > depth

        def detail(off, depth):
            return Mux(off > depth, off, depth)

        with m.FSM(name="luq"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    with m.If(self.cmd.payload.op == int(P.Op.LUQ_GEMM)):
                        m.d.sync += [is_gemm.eq(1),
                                     nkb.eq((g.k + T - 1) >> lt),
                                     gn.eq((g.cols + T - 1) >> lt),
                                     mk.eq(g.rows * g.k), mn.eq(g.rows * g.cols)]
                        m.next = "G_PRE"
                    with m.Else():
                        m.d.sync += is_gemm.eq(0)
                        m.next = "Q_CHECK"

            # ======================================================== LUQ_GEMM
            with m.State("G_PRE"):
                m.d.sync += [nblk.eq(nkb * gn), smk.eq(mk << slog)]
                m.next = "G_PRE2"
            with m.State("G_PRE2"):
                m.d.sync += [n_el.eq(nblk << (2 * lt)), nwords.eq(nblk << lt)]
                m.next = "G_CHECK"
            with m.State("G_CHECK"):
                with m.If(g.flags & (0xFF & ~int(P.flag_mask(P.LuqGemmFlag)))):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("flags"))
                with m.Elif(g.b >= cfg.operand_buffers):
                    fin.error(P.ErrorCode.BAD_BUFFER, g.b)
                with m.Elif(~slot_ok):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("slot_b"))
                with m.Elif(~s_ok):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("samples"))
                with m.Elif(g.rows == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("rows"))
                with m.Elif(g.k == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("k"))
                with m.Elif(g.cols == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("cols"))
                with m.Elif(g.k > cfg.k_max):
                    fin.error(P.ErrorCode.K_OVERFLOW, g.k)
                with m.Elif(~alpha_ok):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, glay.index("alpha"))
                with m.Elif(n_el > cfg.operand_depth):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, n_el[:32])
                with m.Elif(oor(g.a_offset, smk, a_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.a_offset, a_s.depth))
                with m.Elif(oor(g.out_offset, mn, out_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.out_offset, out_s.depth))
                with m.Else():
                    m.d.sync += [sc_i.eq(0), ck_v.eq(0)]
                    m.next = "G_SCANM"
            with m.State("G_SCANM"):
                # word sc_i is read; it is checked a clock later
                m.d.comb += man_addr.eq(sc_i)
                m.d.sync += [ck_v.eq(sc_i < nwords), ck_i.eq(sc_i)]
                with m.If(sc_i < nwords):
                    m.d.sync += sc_i.eq(sc_i + 1)
                bad = [(v > mmax.as_signed()) | (v < -mmax.as_signed()) for v in lanes_v]
                first = Signal(range(T), name="first_bad")
                for c in reversed(range(T)):
                    with m.If(bad[c]):
                        m.d.comb += first.eq(c)
                with m.If(ck_v & Cat(*bad).any()):
                    fin.error(P.ErrorCode.DATA_RANGE, ((ck_i << lt) | first)[:32])
                with m.Elif(ck_v & (ck_i == nwords - 1)):
                    m.d.sync += [sc_i.eq(0), ck_v.eq(0)]
                    m.next = "G_SCANE"
            with m.State("G_SCANE"):
                m.d.comb += exp_addr.eq(sc_i)
                m.d.sync += [ck_v.eq(sc_i < nblk), ck_i.eq(sc_i)]
                with m.If(sc_i < nblk):
                    m.d.sync += sc_i.eq(sc_i + 1)
                with m.If(ck_v & (exp_data > inv_code)):
                    fin.error(P.ErrorCode.DATA_RANGE, ck_i[:32])
                with m.Elif(ck_v & (ck_i == nblk - 1)):
                    m.d.sync += [jb.eq(0), jbT.eq(0), ncolv.eq(Mux(g.cols > T, T, g.cols)),
                                 sc_i.eq(0), ck_v.eq(0), eref.eq(0), badcol.eq(0),
                                 eblk.eq(0)]
                    m.next = "G_EREF"
            with m.State("G_EREF"):
                # exponent code of block (kb = sc_i, jb) at eblk = sc_i * gn + jb
                m.d.comb += exp_addr.eq(eblk)
                m.d.sync += [ck_v.eq(sc_i < nkb), ck_i.eq(sc_i)]
                with m.If(sc_i < nkb):
                    m.d.sync += [sc_i.eq(sc_i + 1), eblk.eq(eblk + gn)]
                with m.If(ck_v):
                    with m.If(exp_data == inv_code):
                        m.d.sync += badcol.eq(1)
                    with m.Elif(exp_data > eref):
                        m.d.sync += eref.eq(exp_data)
                with m.If(ck_v & (ck_i == nkb - 1)):
                    m.d.sync += [row.eq(0), kb.eq(0), s_i.eq(0), r_i.eq(0), kbT.eq(0),
                                 mblk.eq(jb << lt), eblk.eq(jb),
                                 crow.eq(g.a_offset), cblk.eq(g.a_offset),
                                 cs.eq(g.a_offset), d_row.eq(0),
                                 out_row.eq(g.out_offset + jbT)]
                    m.next = "G_FEED"
            with m.State("G_FEED"):
                m.d.comb += [feed.eq(1), man_addr.eq(mblk + r_i), exp_addr.eq(eblk),
                             a_r.addr.eq(cs + r_i)]
                last_r = r_i == T - 1
                last_s = s_i == g.samples - 1
                last_kb = kb == nkb - 1
                m.d.sync += [f_kfirst.eq((s_i == 0) & (r_i == 0)), f_klast.eq(last_s & last_r),
                             f_ofirst.eq(kb == 0), f_olast.eq(last_kb),
                             f_mask.eq((kbT + r_i) < g.k)]
                m.d.sync += r_i.eq(r_i + 1)
                with m.If(last_r):
                    m.d.sync += [r_i.eq(0), s_i.eq(s_i + 1), cs.eq(cs + mk)]
                    with m.If(last_s):
                        m.d.sync += [s_i.eq(0), kb.eq(kb + 1), kbT.eq(kbT + T),
                                     mblk.eq(mblk + (gn << lt)), eblk.eq(eblk + gn),
                                     cblk.eq(cblk + T), cs.eq(cblk + T)]
                        with m.If(last_kb):
                            m.d.sync += [kb.eq(0), kbT.eq(0), mblk.eq(jb << lt),
                                         eblk.eq(jb), row.eq(row + 1),
                                         crow.eq(crow + g.k), cblk.eq(crow + g.k),
                                         cs.eq(crow + g.k)]
                            with m.If(row == g.rows - 1):
                                m.d.sync += wait.eq(0)
                                m.next = "G_WAIT"
            with m.State("G_WAIT"):
                # every row of this column block drained and written
                with m.If((d_row == g.rows) & (dcnt == 0)):
                    m.d.sync += wait.eq(wait + 1)
                with m.If(wait == 15):
                    m.d.sync += [jb.eq(jb + 1), jbT.eq(jbT + T), sc_i.eq(0), ck_v.eq(0),
                                 eref.eq(0), badcol.eq(0), eblk.eq(jb + 1),
                                 ncolv.eq(Mux(g.cols - (jbT + T) > T, T,
                                              g.cols - (jbT + T)))]
                    with m.If(jb == gn - 1):
                        fin.done(status_ok(m, pay, nfix=0))
                    with m.Else():
                        m.next = "G_EREF"

            # ======================================================== LUQ_QUANTIZE
            with m.State("Q_CHECK"):
                fl = qa.flags
                with m.If(fl & (0xFF & ~int(P.flag_mask(P.LuqQuantizeFlag)))):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, qlay.index("flags"))
                with m.Elif(qa.count == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, qlay.index("count"))
                with m.Elif(fl[0] & (qa.max_abs[31] | (qa.max_abs[23:31] == 255))):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, qlay.index("max_abs"))
                with m.Elif(oor(qa.src_offset, qa.count, fp_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(qa.src_offset, fp_s.depth))
                with m.Elif(oor(qa.dst_offset, qa.count, a_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(qa.dst_offset, a_s.depth))
                with m.Else():
                    m.d.sync += [qn.eq(qa.count), qt.eq(0), q_v.eq(0), amax.eq(0),
                                 nbeats.eq((qa.count + L - 1) >> (L.bit_length() - 1))]
                    m.next = "Q_MAX"
            with m.State("Q_MAX"):
                m.d.comb += fp_r.addr.eq(qa.src_offset + qt)
                m.d.sync += [q_v.eq(qt < qn), q_t.eq(qt)]
                with m.If(qt < qn):
                    m.d.sync += qt.eq(qt + 1)
                x = fp_r.data
                with m.If(q_v & (x[23:31] == 255)):
                    fin.error(P.ErrorCode.INVALID_DATA, q_t[:32])
                with m.Else():
                    with m.If(q_v & (x[23:31] != 0) & (x[:31] > amax)):
                        m.d.sync += amax.eq(x[:31])
                    with m.If(q_v & (q_t == qn - 1)):
                        m.next = "Q_ALPHA"
            with m.State("Q_ALPHA"):
                mm = Mux(qa.flags[0], qa.max_abs[:31], amax)
                me = mm[23:31]
                al = Mux(me > 6, mm - (6 << 23),
                         Mux((me == 6) & (mm[:23] == (1 << 23) - 1), 1 << 23, 0))
                m.d.sync += [alpha.eq(al), sat.eq(0), qbase.eq(0), gl.eq(0), g_v.eq(0),
                             wbeats.eq(0), wr_busy.eq(0)]
                with m.If(~qa.flags[1]):
                    m.d.comb += [quant.seed.eq(qa.seed), quant.reseed.eq(1)]
                m.next = "Q_TOP"
            with m.State("Q_TOP"):
                m.d.sync += top.eq(alpha + (6 << 23))
                m.next = "Q_GATHER"
            with m.State("Q_GATHER"):
                m.d.comb += [q_run.eq(1), fp_r.addr.eq(qa.src_offset + qbase + gl)]
                m.d.sync += [g_v.eq(1), g_l.eq(gl[:len(g_l)]), g_t.eq(qbase + gl),
                             gl.eq(gl + 1)]
                with m.If(gl == L - 1):
                    m.next = "Q_GWAIT"
            with m.State("Q_GWAIT"):
                m.d.comb += q_run.eq(1)
                m.d.sync += g_v.eq(0)
                m.next = "Q_PUSH"
            with m.State("Q_PUSH"):
                m.d.comb += [q_run.eq(1), quant.i.valid.eq(1)]
                with m.If(quant.i.ready):
                    m.d.sync += [gl.eq(0), qbase.eq(qbase + L)]
                    with m.If(qbase + L >= qn):
                        m.next = "Q_DRAIN"
                    with m.Else():
                        m.next = "Q_GATHER"
            with m.State("Q_DRAIN"):
                m.d.comb += q_run.eq(1)
                with m.If(wbeats == nbeats):
                    fin.done(status_ok(m, pay, nfix=12,
                                       fix=Cat(alpha, amax, Const(0, 1), sat)))
            fin.done_state()

        # ------------------------------------------------------------ GEMM feed -> PE
        f_v = Signal()
        m.d.sync += f_v.eq(feed)
        d = Signal(signed(18))
        m.d.comb += d.eq(eref - exp_data[:16])
        shift = Mux(d > 62, 62, Mux(d < 0, 0, d[:6]))
        m.d.comb += [pe.i.valid.eq(f_v),
                     pe.i.payload.code[0].eq(Mux(f_mask, a_r.data[:4], 0)),
                     pe.i.payload.kfirst.eq(f_kfirst), pe.i.payload.klast.eq(f_klast),
                     pe.i.payload.ofirst.eq(f_ofirst), pe.i.payload.olast.eq(f_olast)]
        for c in range(T):
            m.d.comb += [pe.i.payload.b[c][0].eq(lanes_v[c]),
                         pe.i.payload.shift[c].eq(shift)]

        # ------------------------------------------------------------ drain
        m.d.comb += pe.o.ready.eq(1)
        m.d.comb += [scale.eq(eref.as_signed() - bias.as_signed() - G - frac - slog),
                     nan_col.eq(badcol | g.flags[0])]
        emit = dcnt != 0
        with m.If(emit):
            m.d.sync += [dcnt.eq(dcnt - 1), dcol.eq(dcol + 1)]
            for c in range(T - 1):
                m.d.sync += bank[c].eq(bank[c + 1])
        with m.If(pe.o.valid):
            m.d.sync += [dcnt.eq(T), dcol.eq(0)] + [bank[c].eq(pe.o.payload[c])
                                                     for c in range(T)]
        with m.If(emit & (dcnt == 1)):
            m.d.sync += [d_row.eq(d_row + 1), out_row.eq(out_row + g.cols)]
        m.d.comb += [conv.i_valid.eq(emit), conv.acc.eq(bank[0]), conv.scale.eq(scale),
                     conv.nan.eq(nan_col)]
        # write address and enable through the converter's latency
        LAT = Fp32Convert.LATENCY
        wa = [Signal(33, name=f"wa{i}") for i in range(LAT + 2)]
        we = [Signal(name=f"we{i}") for i in range(LAT + 2)]
        m.d.sync += [wa[0].eq(out_row + dcol), we[0].eq(emit & (dcol < ncolv))]
        for i in range(1, LAT + 2):
            m.d.sync += [wa[i].eq(wa[i - 1]), we[i].eq(we[i - 1])]
        # the converter's output is valid LAT clocks after its input (we[LAT-1])
        v_bits = conv.bits
        # stage M1: 24 x 24 product of the significands
        vs = v_bits[31]
        ve, vf = v_bits[23:31], v_bits[:23]
        ae, af = g.alpha[23:31], g.alpha[:23]
        p1 = Signal(48)
        esum = Signal(signed(12))
        m1_nan, m1_inf, m1_zero, m1_s, a_zero = (Signal(name=n) for n in
                                                 ("m1_nan", "m1_inf", "m1_zero", "m1_s",
                                                  "a_zero"))
        m.d.sync += [p1.eq(Cat(vf, Const(1, 1)) * Cat(af, Const(1, 1))),
                     esum.eq(ve + ae), m1_s.eq(vs),
                     m1_nan.eq((ve == 255) & (vf != 0)), m1_inf.eq((ve == 255) & (vf == 0)),
                     m1_zero.eq(ve == 0), a_zero.eq(g.alpha == 0)]
        # stage M2: normalise, round to nearest even, pack
        hi = p1[47]
        pn = Signal(48)
        m.d.comb += pn.eq(Mux(hi, p1, p1 << 1))
        e0 = Signal(signed(12))
        m.d.comb += e0.eq(esum - 127 + hi)
        m24 = pn[24:48]
        up = pn[23] & ((pn[:23] != 0) | m24[0])
        rr = Signal(25)
        m.d.comb += rr.eq(m24 + up)
        e1 = Signal(signed(12))
        m.d.comb += e1.eq(e0 + rr[24])
        fr = Mux(rr[24], 0, rr[:23])
        ybits = Signal(32)
        with m.If(m1_nan):
            m.d.comb += ybits.eq(FP32_NAN)
        with m.Elif(m1_inf):
            m.d.comb += ybits.eq(Mux(a_zero, LUQ_NAN_INF_TIMES_ZERO,
                                     Cat(Const(0, 23), Const(255, 8), m1_s)))
        with m.Elif(m1_zero | a_zero):
            m.d.comb += ybits.eq(0)
        with m.Elif(e1 >= 255):
            m.d.comb += ybits.eq(Cat(Const(0, 23), Const(255, 8), m1_s))
        with m.Elif(e0 >= 1):
            m.d.comb += ybits.eq(Cat(fr, e1[:8], m1_s))
        with m.Elif((e0 == 0) & (pn >= (1 << 48) - (1 << 24))):
            m.d.comb += ybits.eq(Cat(Const(0, 23), Const(1, 8), m1_s))
        m.d.comb += [out_w.addr.eq(wa[LAT]), out_w.data.eq(ybits), out_w.en.eq(we[LAT])]

        # ------------------------------------------------------------ QUANTIZE datapath
        x = fp_r.data
        with m.If(g_v):
            for i in range(L):
                with m.If(g_l == i):
                    m.d.sync += gbeat[i].eq(Mux(g_t < qn, x, 0))
            with m.If((g_t < qn) & (alpha != 0) & (x[23:31] != 0) & (x[:31] > top)):
                m.d.sync += sat.eq(sat + 1)
        m.d.comb += [quant.alpha.eq(alpha)]
        for i in range(L):
            m.d.comb += quant.i.payload[i].eq(gbeat[i])
        # writer: one code per clock into luq.a
        m.d.comb += quant.o.ready.eq(~wr_busy)
        with m.If(quant.o.valid & ~wr_busy):
            m.d.sync += [wr_busy.eq(1), wr_l.eq(0)] + [wr_codes[i].eq(quant.o.payload[i])
                                                        for i in range(L)]
        with m.If(wr_busy):
            m.d.sync += [wr_l.eq(wr_l + 1), wr_t.eq(wr_t + 1)]
            for i in range(L - 1):
                m.d.sync += wr_codes[i].eq(wr_codes[i + 1])
            with m.If(wr_l == L - 1):
                m.d.sync += [wr_busy.eq(0), wbeats.eq(wbeats + 1)]
        with m.If(~q_run):
            m.d.sync += wr_t.eq(0)
        m.d.comb += [a_w.addr.eq(qa.dst_offset + wr_t), a_w.data.eq(wr_codes[0]),
                     a_w.en.eq(wr_busy & (wr_t < qn))]
        return m
