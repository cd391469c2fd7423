"""MLS_GEMM and MLS_QUANTIZE: the multi-level-scaling engine (``docs/mls.md``).

Both commands are bit-exact with the emulator's ``_op_mls_gemm`` / ``_op_mls_quantize``
(:func:`hbfp_hw.mls.mls_matmul`, :meth:`hbfp_hw.mls.MLSFormat.quantize_array`), in the
device format :func:`hbfp_hw.protocol.mls_format` (E2M4 elements, 4-bit group shifts):

* **MLS_GEMM.** After two clocks that register the sizes, the checks in the emulator's
  order (``rows``, ``cols``, ``groups``, ``group_words`` non-zero: BAD_ARGUMENT with the
  field's index; ``K = groups * group_words * lanes <= MLS_K_MAX``: BAD_ARGUMENT
  ``groups``; ``exp_a`` / ``exp_b`` in ``MLS_TEXP_RANGE``; then the ``mls.a``, ``mls.b``,
  ``mls.ga``, ``mls.gb`` and ``out`` ranges: OUT_OF_RANGE, detail ``max(offset,
  depth)``). Then for every output ``(i, j)`` (row-major) and every group pair one word of
  ``mls.a`` and ``mls.b`` per clock (``lanes`` codes each) and the two group shifts go into
  an :class:`~hbfp_hw.gateware.mls_pe.MLSPE` (decode, significand products, element
  shifts, exact group-pair sum, alignment by ``2*gmax - ga - gb``, exact accumulation);
  each finished accumulator goes through an
  :class:`~hbfp_hw.gateware.fp32_convert.Fp32Convert` with ``flush_after_round=True`` and
  the scale ``exp_a + exp_b - 2*gmax - 2*M`` (exactly :func:`hbfp_hw.mls.round_to_fp32`)
  and is written to ``out``. Time: ``rows * cols * groups * group_words`` clocks plus
  about 20.
* **MLS_QUANTIZE.** Checks (``dst``, ``rows``, ``cols``, ``texp``, ``rounding``, the
  ``fp_in``, codes and shifts ranges), then a scan of the tensor (one element per clock):
  a NaN/Inf element is INVALID_DATA with its index, before anything is written. Then per
  group of ``MLS_QUANT_GROUP`` elements along a row (zero padded past ``cols``) the
  elements are read one per clock into a register file and given to an
  :class:`~hbfp_hw.gateware.mls_quantizer.MLSQuantizer` (``texp`` the tensor exponent,
  one xorshift32 generator per lane reseeded from ``seed`` at the start of the command);
  its codes are written ``lanes`` per word, then the group shift. Time: ``rows * cols``
  (scan) plus ``rows * groups * (MLS_QUANT_GROUP + MLS_QUANT_GROUP / lanes + 4)`` clocks.

With ``lanes = 0`` (``mls_lanes(config)``) the engine only answers UNSUPPORTED.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data

from hbfp_hw import protocol as P

from ..engine import EngineStatus, OptionalEngine, port_name, status_ok
from ..fp32 import FP32Layout
from ..fp32_convert import Fp32Convert
from ..mls_pe import MLSPE
from ..mls_quantizer import MLSQuantizer

__all__ = ["MLSEngine"]


class MLSEngine(OptionalEngine):
    """Engine for MLS_GEMM and MLS_QUANTIZE (see the module docstring)."""

    lanes_of = staticmethod(P.mls_lanes)

    def elaborate(self, platform):
        m = Module()
        fin = EngineStatus(m, self)
        pay = fin.pay
        L = self.lanes
        if not L:
            return fin.unsupported_only("mls")
        fmt = P.mls_format(self.config)
        lsh = L.bit_length() - 1
        Lq = P.MLS_QUANT_GROUP
        WPG = Lq // L                              # code words per quantized group
        eb = fmt.element_bits
        lo, hi = P.MLS_TEXP_RANGE
        sp = {s.name: s for s in self.specs}

        def ports(name):
            s = sp[name]
            return (getattr(self.bufs, f"{port_name(s)}_r"),
                    getattr(self.bufs, f"{port_name(s)}_w"), s)
        a_r, a_w, a_s = ports("mls.a")
        b_r, b_w, b_s = ports("mls.b")
        ga_r, ga_w, ga_s = ports("mls.ga")
        gb_r, gb_w, gb_s = ports("mls.gb")
        fp_r, _, fp_s = ports("fp_in")
        _, out_w, out_s = ports("out")
        g = self.cmd.payload.args.mls_gemm
        q = self.cmd.payload.args.mls_quantize
        lg = P.REQUESTS[P.Op.MLS_GEMM]
        lq = P.REQUESTS[P.Op.MLS_QUANTIZE]

        def oor(off, n, depth):
            return (off + n) > depth

        def detail(off, depth):
            return Mux(off > depth, off, depth)

        def bad_texp(v):
            s = v.as_signed()
            return (s < lo) | (s > hi)

        # ---------------- GEMM datapath: MLSPE -> Fp32Convert -> out
        m.submodules.pe = pe = MLSPE(fmt, lanes=L, group_len=P.MLS_K_MAX,
                                     k_max=P.MLS_K_MAX)
        m.submodules.conv = conv = Fp32Convert(acc_bits=pe.acc_bits, flush_after_round=True)
        rowlen = Signal(24)
        n_y, n_a, n_b, n_ga, n_gb = (Signal(40, name=n) for n in
                                     ("n_y", "n_a", "n_b", "n_ga", "n_gb"))
        scale = Signal(conv.scale.shape())
        i_c, j_c, kb, w_c = Signal(16), Signal(16), Signal(16), Signal(8)
        a_row, a_rd, b_row, b_rd = (Signal(32, name=n) for n in
                                    ("a_row", "a_rd", "b_row", "b_rd"))
        ga_row, gb_row = Signal(32), Signal(32)
        y_a, y_n = Signal(32), Signal(32)
        issue = Signal()
        f_firstk, f_lastk, f_first, f_last = (Signal(name=n) for n in
                                              ("f_firstk", "f_lastk", "f_first", "f_last"))
        m.d.comb += [a_r.addr.eq(a_rd), b_r.addr.eq(b_rd), ga_r.addr.eq(ga_row + kb),
                     gb_r.addr.eq(gb_row + kb),
                     f_firstk.eq(w_c == 0), f_lastk.eq(w_c == g.group_words - 1),
                     f_first.eq(kb == 0), f_last.eq(kb == g.groups - 1)]
        s1 = Signal(pe.ctrl.shape())
        m.d.sync += [s1.valid.eq(issue), s1.first_k.eq(f_firstk), s1.last_k.eq(f_lastk),
                     s1.first.eq(f_first), s1.last.eq(f_last)]
        for lane in range(L):
            m.d.comb += [pe.a[lane].eq(a_r.data[8 * lane: 8 * lane + eb]),
                         pe.b[lane].eq(b_r.data[8 * lane: 8 * lane + eb])]
        m.d.comb += [pe.ga.eq(ga_r.data[:fmt.group_bits]), pe.gb.eq(gb_r.data[:fmt.group_bits]),
                     pe.ctrl.eq(s1),
                     conv.i_valid.eq(pe.done), conv.acc.eq(pe.acc), conv.scale.eq(scale),
                     conv.nan.eq(0),
                     out_w.addr.eq(y_a), out_w.data.eq(conv.bits), out_w.en.eq(conv.o_valid)]
        with m.If(conv.o_valid):
            m.d.sync += [y_a.eq(y_a + 1), y_n.eq(y_n + 1)]

        # ---------------- QUANTIZE datapath: fp_in -> register file -> MLSQuantizer
        m.submodules.quant = qu = MLSQuantizer(fmt, Lq, stochastic=True)
        n_x, n_qg = Signal(40), Signal(40)
        gq_n = Signal(13)                          # groups per row
        x_a, e_c = Signal(32), Signal(32)          # fp_in address, element counter
        col = Signal(17)
        sv, sidx = Signal(), Signal(32)            # scan: data of element sidx arrives
        r_c, gq = Signal(16), Signal(13)
        ld_v, ld_pad, ld_e = Signal(), Signal(), Signal(range(Lq))
        xbuf = Signal(data.ArrayLayout(FP32Layout, Lq))
        codes = Signal(data.ArrayLayout(unsigned(eb), Lq))
        gval = Signal(fmt.group_bits)
        c_a, g_a = Signal(32), Signal(32)
        wi = Signal(range(WPG))
        reseed = Signal()
        m.d.comb += [fp_r.addr.eq(x_a), qu.i.payload.eq(xbuf),
                     qu.texp.eq(q.texp.as_signed()), qu.rounding.eq(q.rounding[0]),
                     qu.seed.eq(q.seed), qu.reseed.eq(reseed)]
        m.d.sync += ld_v.eq(0)
        with m.If(ld_v):
            for e in range(Lq):
                with m.If(ld_e == e):
                    m.d.sync += xbuf[e].eq(Mux(ld_pad, 0, fp_r.data))
        word = Signal(8 * L)
        with m.Switch(wi):
            for k in range(WPG):
                with m.Case(k):
                    m.d.comb += word.eq(Cat(*[Cat(codes[k * L + ln], Const(0, 8 - eb))
                                             for ln in range(L)]))
        wr_code, wr_g = Signal(), Signal()
        m.d.comb += [a_w.addr.eq(c_a), b_w.addr.eq(c_a), a_w.data.eq(word),
                     b_w.data.eq(word), ga_w.addr.eq(g_a), gb_w.addr.eq(g_a),
                     ga_w.data.eq(gval), gb_w.data.eq(gval),
                     a_w.en.eq(wr_code & (q.dst == 0)), b_w.en.eq(wr_code & (q.dst == 1)),
                     ga_w.en.eq(wr_g & (q.dst == 0)), gb_w.en.eq(wr_g & (q.dst == 1))]
        bad_elem = sv & fp_r.data[23:31].all()

        def scan_error():
            with m.If(bad_elem):
                fin.error(P.ErrorCode.INVALID_DATA, sidx)

        with m.FSM(name="mls"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    with m.If(self.cmd.payload.op == P.Op.MLS_GEMM):
                        m.d.sync += [rowlen.eq(g.groups * g.group_words),
                                     n_y.eq(g.rows * g.cols)]
                        m.next = "G_PRE"
                    with m.Else():
                        m.d.sync += [n_x.eq(q.rows * q.cols),
                                     gq_n.eq((q.cols + Lq - 1) >> (Lq.bit_length() - 1))]
                        m.next = "Q_PRE"
            # ---------------- MLS_GEMM
            with m.State("G_PRE"):
                m.d.sync += [n_a.eq(g.rows * rowlen), n_b.eq(g.cols * rowlen),
                             n_ga.eq(g.rows * g.groups), n_gb.eq(g.cols * g.groups),
                             scale.eq(g.exp_a.as_signed() + g.exp_b.as_signed()
                                      - (2 * fmt.gmax + 2 * fmt.man_bits))]
                m.next = "G_CHECK"
            with m.State("G_CHECK"):
                with m.If(g.rows == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("rows"))
                with m.Elif(g.cols == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("cols"))
                with m.Elif(g.groups == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("groups"))
                with m.Elif(g.group_words == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("group_words"))
                with m.Elif((rowlen << lsh) > P.MLS_K_MAX):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("groups"))
                with m.Elif(bad_texp(g.exp_a)):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("exp_a"))
                with m.Elif(bad_texp(g.exp_b)):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lg.index("exp_b"))
                with m.Elif(oor(g.a_offset, n_a, a_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.a_offset, a_s.depth))
                with m.Elif(oor(g.b_offset, n_b, b_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.b_offset, b_s.depth))
                with m.Elif(oor(g.ga_offset, n_ga, ga_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.ga_offset, ga_s.depth))
                with m.Elif(oor(g.gb_offset, n_gb, gb_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.gb_offset, gb_s.depth))
                with m.Elif(oor(g.y_offset, n_y, out_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(g.y_offset, out_s.depth))
                with m.Else():
                    m.d.sync += [i_c.eq(0), j_c.eq(0), kb.eq(0), w_c.eq(0),
                                 a_row.eq(g.a_offset), a_rd.eq(g.a_offset),
                                 b_row.eq(g.b_offset), b_rd.eq(g.b_offset),
                                 ga_row.eq(g.ga_offset), gb_row.eq(g.gb_offset),
                                 y_a.eq(g.y_offset), y_n.eq(0)]
                    m.next = "G_RUN"
            with m.State("G_RUN"):
                m.d.comb += issue.eq(1)
                m.d.sync += [w_c.eq(w_c + 1), a_rd.eq(a_rd + 1), b_rd.eq(b_rd + 1)]
                with m.If(f_lastk):
                    m.d.sync += [w_c.eq(0), kb.eq(kb + 1)]
                    with m.If(f_last):                      # output (i, j) issued
                        m.d.sync += [kb.eq(0), j_c.eq(j_c + 1), a_rd.eq(a_row),
                                     b_row.eq(b_row + rowlen), b_rd.eq(b_row + rowlen),
                                     gb_row.eq(gb_row + g.groups)]
                        with m.If(j_c == g.cols - 1):
                            m.d.sync += [j_c.eq(0), i_c.eq(i_c + 1),
                                         a_row.eq(a_row + rowlen), a_rd.eq(a_row + rowlen),
                                         ga_row.eq(ga_row + g.groups),
                                         b_row.eq(g.b_offset), b_rd.eq(g.b_offset),
                                         gb_row.eq(g.gb_offset)]
                            with m.If(i_c == g.rows - 1):
                                m.next = "G_DRAIN"
            with m.State("G_DRAIN"):
                with m.If(y_n == n_y):
                    fin.done(status_ok(m, pay, nfix=0))
            # ---------------- MLS_QUANTIZE
            with m.State("Q_PRE"):
                m.d.sync += n_qg.eq(q.rows * gq_n)
                m.next = "Q_CHECK"
            with m.State("Q_CHECK"):
                with m.If(q.dst > 1):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lq.index("dst"))
                with m.Elif(q.rows == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lq.index("rows"))
                with m.Elif(q.cols == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lq.index("cols"))
                with m.Elif(bad_texp(q.texp)):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lq.index("texp"))
                with m.Elif(q.rounding > 1):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lq.index("rounding"))
                with m.Elif(oor(q.src_offset, n_x, fp_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(q.src_offset, fp_s.depth))
                with m.Elif(oor(q.codes_offset, n_qg * WPG, a_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(q.codes_offset, a_s.depth))
                with m.Elif(oor(q.g_offset, n_qg, ga_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(q.g_offset, ga_s.depth))
                with m.Else():
                    m.d.sync += [x_a.eq(q.src_offset), e_c.eq(0)]
                    m.next = "Q_SCAN"
            with m.State("Q_SCAN"):
                # element e_c is read at x_a; it is checked a clock later
                m.d.sync += [sv.eq(1), sidx.eq(e_c), e_c.eq(e_c + 1), x_a.eq(x_a + 1)]
                with m.If(e_c == n_x - 1):
                    m.next = "Q_SCANW"
                scan_error()
            with m.State("Q_SCANW"):
                m.d.sync += [sv.eq(0), x_a.eq(q.src_offset), r_c.eq(0), gq.eq(0),
                             col.eq(0), e_c.eq(0), c_a.eq(q.codes_offset),
                             g_a.eq(q.g_offset)]
                m.d.comb += reseed.eq(1)
                m.next = "Q_READ"
                scan_error()
            with m.State("Q_READ"):
                pad = col >= q.cols
                m.d.sync += [ld_v.eq(1), ld_pad.eq(pad), ld_e.eq(e_c), e_c.eq(e_c + 1),
                             col.eq(col + 1)]
                with m.If(~pad):
                    m.d.sync += x_a.eq(x_a + 1)
                with m.If(e_c == Lq - 1):
                    m.d.sync += e_c.eq(0)
                    m.next = "Q_RWAIT"
            with m.State("Q_RWAIT"):
                m.next = "Q_FEED"
            with m.State("Q_FEED"):
                m.d.comb += qu.i.valid.eq(1)
                with m.If(qu.i.ready):
                    m.next = "Q_OUT"
            with m.State("Q_OUT"):
                m.d.comb += qu.o.ready.eq(1)
                with m.If(qu.o.valid):
                    m.d.sync += [codes.eq(qu.o.payload.codes), gval.eq(qu.o.payload.g),
                                 wi.eq(0)]
                    m.next = "Q_WRITE"
            with m.State("Q_WRITE"):
                m.d.comb += wr_code.eq(1)
                m.d.sync += [c_a.eq(c_a + 1), wi.eq(wi + 1)]
                with m.If(wi == WPG - 1):
                    m.next = "Q_WG"
            with m.State("Q_WG"):
                m.d.comb += wr_g.eq(1)
                m.d.sync += [g_a.eq(g_a + 1), gq.eq(gq + 1)]
                m.next = "Q_READ"
                with m.If(gq == gq_n - 1):
                    m.d.sync += [gq.eq(0), col.eq(0), r_c.eq(r_c + 1)]
                    with m.If(r_c == q.rows - 1):
                        fin.done(status_ok(m, pay, nfix=0))
            fin.done_state()
        return m
