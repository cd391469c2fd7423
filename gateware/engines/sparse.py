"""SPARSE_GEMM: the transposable N:M sparse GEMM engine (around :class:`SparseEngine`).

``Y = X Wᵀ`` (forward) or ``dX = dY W`` (``SparseFlag.TRANSPOSE``) from one compressed
weight stored once in ``sp.man`` / ``sp.idx`` / ``sp.exp``, bit-exact with
:func:`hbfp_hw.sparsity.sparse_matmul` / :func:`~hbfp_hw.sparsity.sparse_matmul_t` (the
emulator's ``_op_sparse_gemm``):

* **Checks**, in the emulator's order: flags (BAD_ARGUMENT 0), operand buffer ``x``
  (BAD_BUFFER), ``slot_x`` / ``slot_w`` (a format slot with ``tile x tile`` blocks),
  ``batch`` / ``w_rows`` / ``w_cols`` non-zero, the reduction length ``<= k_max``, the
  operand size, the ``sp.man`` tiles, the ``sp.exp`` codes and the ``out`` range
  (OUT_OF_RANGE). Sizes are registered in three states before the checks. With
  ``TRANSPOSE`` every tile's indices are checked first (one tile per ``max(1, N*M /
  tile)`` clocks): each column named ``N`` times, ``N`` distinct columns per row, else
  DATA_RANGE with the tile's number.
* **Per pair (row block of X, output block)**: the exponent codes of the X row block and
  of the weight's block row (forward) or block column (``TRANSPOSE``) are read, one pair
  per clock; their maxima over valid blocks give ``e_ref`` (any invalid block: the
  outputs are NaN) and ``e_x + e_w`` of every K-block goes into a small memory.
* **Per job** (one activation row against one ``M x M`` tile row, forward, or tile
  column, transposed: ``M`` outputs): two clocks of address set-up, then one beat per
  weight tile along K: the tile's ``N*M`` kept mantissas and indices (one ``sp.man`` /
  ``sp.idx`` word when ``N*M <= tile``, else ``N*M / tile`` words) and the ``M``
  activation lanes of the X word of that K-block. :class:`SparseEngine` multiplies the
  kept mantissas only (``N*M`` multipliers for an ``M x M`` tile: pruned products are
  never computed), sums the K-block, aligns it by ``e_ref - e_x - e_w`` and accumulates.
* **Drain**: the ``M`` accumulators of a job go one per clock through
  :class:`Fp32Convert` (``acc * 2**(e_ref - G - f_x - f_w)``, NaN for invalid blocks) into
  ``out`` (row-major ``batch x N``), columns past ``N`` skipped.

With ``sparse_lanes`` 0 the engine only answers UNSUPPORTED.
"""

from __future__ import annotations

from amaranth import Array, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import fifo
from amaranth.lib.memory import Memory

from hbfp_hw import protocol as P

from ..fp32_convert import Fp32Convert
from ..sparse_pe import SparseEngine, SparseEngineConfig, beat_layout
from ..engine import EngineStatus, OptionalEngine, port_name, status_ok

__all__ = ["SparseGemmEngine", "sparse_engine_config"]

#: signed exponent width inside the engine (codes of up to 10 bits, sums of two)
EBITS = 18
LO = -(1 << 14)                  # maximum over no valid block (as hbfp_hw.gemm)


def sparse_engine_config(config, specs) -> SparseEngineConfig:
    """The :class:`SparseEngineConfig` of an accelerator's sparse engine: ``N:M`` from
    ``sparse_lanes``, mantissas one bit wider than the buffers' wire width (any stored
    value, ``-2**(w-1)`` included, is multiplied exactly), K-blocks of ``tile``."""
    n, m = P.sparse_nm(config)
    sp = {s.name: s for s in specs}
    xw = 8 * next(s for s in specs if s.kind == P.BufferKind.MANTISSA).wire_bytes
    mw = 8 * sp["sp.man"].wire_bytes
    return SparseEngineConfig(n=n, m=m, man_bits_w=min(16, mw + 1),
                              man_bits_x=min(16, xw + 1), block_len=config.tile,
                              k_max=max(config.k_max, config.tile),
                              guard_bits=config.guard_bits)


def _log2(v: int) -> int:
    return v.bit_length() - 1


class SparseGemmEngine(OptionalEngine):
    """Engine for SPARSE_GEMM (see the module docstring)."""

    BEAT_FIFO = 4
    META_FIFO = 16

    lanes_of = staticmethod(P.sparse_lanes)

    def elaborate(self, platform):
        m = Module()
        fin = EngineStatus(m, self)
        pay = fin.pay
        if not self.lanes:
            return fin.unsupported_only("sparse")

        cfg, specs = self.config, self.specs
        T = cfg.tile
        n, M = P.sparse_nm(cfg)
        S = n * M
        q = T // M                                  # tiles per block edge
        tsh, ssh, msh, qsh = _log2(T), _log2(S), _log2(M), _log2(q)
        wpb = max(1, S // T)                        # words per tile
        tpw = max(1, T // S)                        # tiles per word
        ecfg = sparse_engine_config(cfg, specs)
        lay = P.REQUESTS[P.Op.SPARSE_GEMM]
        a = self.cmd.payload.args.sparse_gemm
        sp = {s.name: s for s in specs}
        man_s, idx_s, exp_s, out_s = sp["sp.man"], sp["sp.idx"], sp["sp.exp"], sp["out"]
        by_op = lambda kind: sorted((s for s in specs if s.kind == kind),  # noqa: E731
                                    key=lambda s: s.operand)
        xman_specs, xexp_specs = by_op(P.BufferKind.MANTISSA), by_op(P.BufferKind.EXPONENT)
        nops = cfg.operand_buffers
        mw, xw = 8 * man_s.wire_bytes, 8 * xman_specs[0].wire_bytes
        bufs = self.bufs
        man_r = getattr(bufs, f"{port_name(man_s)}_r")
        idx_r = getattr(bufs, f"{port_name(idx_s)}_r")
        exp_r = getattr(bufs, f"{port_name(exp_s)}_r")
        out_w = getattr(bufs, f"{port_name(out_s)}_w")
        xman_r = [getattr(bufs, f"{port_name(s)}_r") for s in xman_specs]
        xexp_r = [getattr(bufs, f"{port_name(s)}_r") for s in xexp_specs]
        slim = man_s.depth // S                     # sp tiles

        # ---- per-slot constants
        fmts = cfg.formats
        sq = [int(cfg.block_2d(i) == (T, T)) for i in range(len(fmts))]

        def slot_const(slot, vals, shape, name):
            sig = Signal(shape, name=name)
            with m.Switch(slot):
                for i, v in enumerate(vals):
                    with m.Case(i):
                        m.d.comb += sig.eq(v)
            return sig
        ok_x = slot_const(a.slot_x, sq, 1, "ok_x")
        ok_w = slot_const(a.slot_w, sq, 1, "ok_w")
        bias_x, bias_w, inv_x, inv_w, frac_x, frac_w = (
            Signal(signed(EBITS), name=nm) for nm in
            ("bias_x", "bias_w", "inv_x", "inv_w", "frac_x", "frac_w"))
        c_bias_x = slot_const(a.slot_x, [f.exp_bias for f in fmts], signed(EBITS), "c_bx")
        c_bias_w = slot_const(a.slot_w, [f.exp_bias for f in fmts], signed(EBITS), "c_bw")
        c_inv_x = slot_const(a.slot_x, [f.exp_invalid_code for f in fmts], signed(EBITS),
                             "c_ix")
        c_inv_w = slot_const(a.slot_w, [f.exp_invalid_code for f in fmts], signed(EBITS),
                             "c_iw")
        c_frac = slot_const(a.slot_x, [f.frac_bits for f in fmts], signed(EBITS), "c_fx")
        c_frac_w = slot_const(a.slot_w, [f.frac_bits for f in fmts], signed(EBITS), "c_fw")

        # ---- sizes
        trans = Signal()
        K, N = Signal(16), Signal(16)
        gb, gk, go, gi, gn = (Signal(16, name=nm) for nm in ("gb", "gk", "go", "gi", "gn"))
        tc_n = Signal(20)                           # Tc: tiles per weight row
        n_x, n_t, n_e, n_o = (Signal(40, name=nm) for nm in ("n_x", "n_t", "n_e", "n_o"))
        gbk = Signal(32)

        # ---- loop state
        xb, ob, jt, bi, kb, j, wsub = (Signal(16, name=nm) for nm in
                                       ("xb", "ob", "jt", "bi", "kb", "j", "wsub"))
        brow = Signal(16)                           # xb * T + bi
        xe_base = Signal(32)                        # xb * gk: X exponent index of (xb, 0)
        ob_gi = Signal(32)                          # ob * gi
        wel = Signal(48)                            # sp element address of the tile
        wstep = Signal(40)                          # S (forward) or Tc * S (transposed)
        xwa = Signal(32)                            # X word address of (brow, kb)
        ecnt = Signal(16)                           # exponent reads issued
        we_a = Signal(40)                           # sp.exp address
        tno = Signal(40)                            # tile number (index check)
        tout = Signal(20)                           # output tile along N: ob * q + jt
        o_addr = Signal(40)
        o_lanes = Signal(range(M + 1))
        flush = Signal(4)

        # ---- exponent scan (per pair)
        mx, mwx = Signal(signed(EBITS)), Signal(signed(EBITS))
        badx, badw = Signal(), Signal()
        e_ref = Signal(signed(EBITS))
        bad = Signal()
        scale = Signal(signed(16))
        nkb = -(-max(cfg.k_max, T) // T)
        m.submodules.esum = esum = Memory(shape=signed(EBITS), depth=nkb, init=[])
        es_w = esum.write_port()
        es_r = esum.read_port()
        pv, pk = Signal(), Signal(16)               # exponent data of K-block pk arrives
        m.d.sync += pv.eq(0)
        xsel = Signal(range(max(2, nops)))
        xcode = Signal(16)
        with m.Switch(xsel):
            for i, r in enumerate(xexp_r):
                with m.Case(i):
                    m.d.comb += xcode.eq(r.data)
        ex = Signal(signed(EBITS))
        ew = Signal(signed(EBITS))
        vx, vw = Signal(), Signal()
        m.d.comb += [ex.eq(xcode - bias_x), ew.eq(exp_r.data - bias_w),
                     vx.eq(xcode != inv_x), vw.eq(exp_r.data != inv_w),
                     es_w.addr.eq(pk), es_w.data.eq(ex + ew), es_w.en.eq(pv)]
        with m.If(pv):
            with m.If(vx & (ex > mx)):
                m.d.sync += mx.eq(ex)
            with m.If(vw & (ew > mwx)):
                m.d.sync += mwx.eq(ew)
            m.d.sync += [badx.eq(badx | ~vx), badw.eq(badw | ~vw)]

        # ---- tile reads: issue -> data a clock later (stage D)
        issue = Signal()
        i_last = Signal()                           # last word of the tile
        i_chk = Signal()                            # index check (no beat)
        d_v, d_last, d_chk = Signal(), Signal(), Signal()
        d_slice = Signal(max(1, _log2(tpw)))
        d_wsub = Signal(range(max(2, wpb)))
        d_j = Signal(16)
        d_first, d_lastk, d_lastj = Signal(), Signal(), Signal()
        d_tno = Signal(40)
        m.d.comb += [man_r.addr.eq((wel >> tsh) + wsub), idx_r.addr.eq((wel >> tsh) + wsub),
                     es_r.addr.eq(kb)]
        for r in xman_r:
            m.d.comb += r.addr.eq(xwa)
        i_first = Signal()
        i_lastk = Signal()
        i_lastj = Signal()
        m.d.comb += [i_first.eq((kb == 0) & (j == 0)), i_lastk.eq(j == q - 1),
                     i_lastj.eq(i_lastk & (kb == gk - 1)), i_last.eq(wsub == wpb - 1)]
        m.d.sync += [d_v.eq(issue), d_last.eq(i_last), d_chk.eq(i_chk),
                     d_slice.eq((wel >> ssh)[:len(d_slice)] if tpw > 1 else 0),
                     d_wsub.eq(wsub), d_j.eq(j), d_first.eq(i_first), d_lastk.eq(i_lastk),
                     d_lastj.eq(i_lastj), d_tno.eq(tno)]
        # gather the tile's slots
        t_man = [Signal(signed(mw), name=f"t_man{k}") for k in range(S)]
        t_idx = [Signal(unsigned(max(1, msh)), name=f"t_idx{k}") for k in range(S)]
        tile_v = Signal()
        m.d.comb += tile_v.eq(d_v & d_last)
        if wpb > 1:
            g_man = [Signal(T * mw, name=f"g_man{w}") for w in range(wpb - 1)]
            g_idx = [Signal(T * 8, name=f"g_idx{w}") for w in range(wpb - 1)]
            with m.If(d_v & ~d_last):
                with m.Switch(d_wsub):
                    for w in range(wpb - 1):
                        with m.Case(w):
                            m.d.sync += [g_man[w].eq(man_r.data), g_idx[w].eq(idx_r.data)]
            wm = Cat(*g_man, man_r.data)
            wi = Cat(*g_idx, idx_r.data)
        else:
            wm = man_r.data.word_select(d_slice, S * mw) if tpw > 1 else man_r.data
            wi = idx_r.data.word_select(d_slice, S * 8) if tpw > 1 else idx_r.data
        for k in range(S):
            m.d.comb += [t_man[k].eq(wm[k * mw:(k + 1) * mw]),
                         t_idx[k].eq(wi[k * 8:k * 8 + max(1, msh)])]
        # index check of a tile (TRANSPOSE): N per column, N distinct columns per row
        tbad = Signal()
        conds = []
        for c in range(M):
            cnt = sum((t_idx[k] == c).as_unsigned() for k in range(S))
            conds.append(cnt != n)
        for r in range(M):
            for s1 in range(n):
                for s2 in range(s1 + 1, n):
                    conds.append(t_idx[r * n + s1] == t_idx[r * n + s2])
        m.d.comb += tbad.eq(Cat(*conds).any())

        # X lanes of the beat
        xword = Signal(T * xw)
        with m.Switch(xsel):
            for i, r in enumerate(xman_r):
                with m.Case(i):
                    m.d.comb += xword.eq(r.data)
        xl = xword.word_select(d_j[:max(1, qsh)] if q > 1 else 0, M * xw)

        # ---- beat FIFO -> SparseEngine
        m.submodules.pe = pe = SparseEngine(ecfg)
        blay = beat_layout(ecfg)
        m.submodules.bq = bq = fifo.SyncFIFOBuffered(width=blay.size, depth=self.BEAT_FIFO)
        beat = Signal(blay)
        sh = Signal(signed(EBITS + 1))
        m.d.comb += sh.eq(e_ref - es_r.data)
        for k in range(S):
            m.d.comb += [beat.w_man[k].eq(t_man[k]), beat.w_idx[k].eq(t_idx[k])]
        for k in range(M):
            m.d.comb += beat.x[k].eq(xl[k * xw:(k + 1) * xw].as_signed())
        m.d.comb += [beat.mode.eq(trans), beat.first.eq(d_first), beat.last_k.eq(d_lastk),
                     beat.last.eq(d_lastj),
                     beat.shift.eq(Mux(sh < 0, 0, Mux(sh > 1023, 1023, sh[:10]))),
                     bq.w_data.eq(beat.as_value()), bq.w_en.eq(tile_v & ~d_chk),
                     pe.i.payload.eq(bq.r_data), pe.i.valid.eq(bq.r_rdy),
                     bq.r_en.eq(pe.i.ready)]
        room = Signal()
        m.d.comb += room.eq(bq.level <= self.BEAT_FIFO - 2)

        # ---- job metadata FIFO: out address, lanes, scale, NaN
        mlay_bits = 40 + len(o_lanes) + 16 + 1
        m.submodules.mq = mq = fifo.SyncFIFOBuffered(width=mlay_bits, depth=self.META_FIFO)
        m.d.comb += mq.w_data.eq(Cat(o_addr, o_lanes, scale, bad))
        q_addr = mq.r_data[:40]
        q_lanes = mq.r_data[40:40 + len(o_lanes)]
        q_scale = mq.r_data[40 + len(o_lanes):40 + len(o_lanes) + 16].as_signed()
        q_nan = mq.r_data[-1]

        # ---- drain: M lanes per job through the FP32 converter into out
        # a job's accumulators and metadata are latched (the engine runs on) and sent
        # one lane per clock; the next job is taken at the last lane
        m.submodules.cvt = cvt = Fp32Convert(acc_bits=ecfg.acc_bits)
        dl = Signal(range(M))
        busy = Signal()                              # the latch holds a job
        l_acc = [Signal(signed(ecfg.acc_bits), name=f"l_acc{k}") for k in range(M)]
        l_addr, l_lanes = Signal(40), Signal(range(M + 1))
        l_scale, l_nan = Signal(signed(16)), Signal()
        accs = Array(l_acc)
        take = Signal()
        m.d.comb += take.eq(pe.o.valid & mq.r_rdy & (~busy | (dl == M - 1)))
        m.d.comb += [cvt.i_valid.eq(busy & (dl < l_lanes)), cvt.acc.eq(accs[dl]),
                     cvt.scale.eq(l_scale), cvt.nan.eq(l_nan),
                     pe.o.ready.eq(take), mq.r_en.eq(take)]
        with m.If(busy):
            m.d.sync += dl.eq(dl + 1)
            with m.If(dl == M - 1):
                m.d.sync += [dl.eq(0), busy.eq(0)]
        with m.If(take):
            m.d.sync += [busy.eq(1), l_addr.eq(q_addr), l_lanes.eq(q_lanes),
                         l_scale.eq(q_scale), l_nan.eq(q_nan)]
            m.d.sync += [l_acc[k].eq(pe.o.payload.acc[k]) for k in range(M)]
        adr = [Signal(40, name=f"adr{i}") for i in range(Fp32Convert.LATENCY)]
        m.d.sync += adr[0].eq(l_addr + dl)
        for i in range(1, Fp32Convert.LATENCY):
            m.d.sync += adr[i].eq(adr[i - 1])
        m.d.comb += [out_w.addr.eq(adr[-1]), out_w.data.eq(cvt.bits), out_w.en.eq(cvt.o_valid)]

        # ---- command FSM
        def oor(off, cnt, depth):
            return (off + cnt) > depth

        def detail(off, depth):
            return Mux(off > depth, off, depth)

        with m.FSM(name="sparse"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    t = a.flags[0]
                    kk = Mux(t, a.w_rows, a.w_cols)
                    nn = Mux(t, a.w_cols, a.w_rows)
                    m.d.sync += [trans.eq(t), K.eq(kk), N.eq(nn),
                                 gb.eq((a.batch + T - 1) >> tsh),
                                 gk.eq((kk + T - 1) >> tsh),
                                 go.eq((a.w_rows + T - 1) >> tsh),
                                 gi.eq((a.w_cols + T - 1) >> tsh),
                                 gn.eq((nn + T - 1) >> tsh),
                                 xsel.eq(a.x),
                                 bias_x.eq(c_bias_x), bias_w.eq(c_bias_w), inv_x.eq(c_inv_x),
                                 inv_w.eq(c_inv_w), frac_x.eq(c_frac), frac_w.eq(c_frac_w)]
                    m.next = "SIZE1"
            with m.State("SIZE1"):
                m.d.sync += [gbk.eq(gb * gk), n_e.eq(go * gi), n_o.eq(a.batch * N),
                             tc_n.eq(gi << qsh)]
                m.next = "SIZE2"
            with m.State("SIZE2"):
                m.d.sync += [n_x.eq(gbk << (2 * tsh)), n_t.eq(n_e << (2 * qsh)),
                             wstep.eq(Mux(trans, tc_n << ssh, S))]
                m.next = "CHECK"
            with m.State("CHECK"):
                with m.If(a.flags & (0xFF & ~P.flag_mask(P.SparseFlag))):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("flags"))
                with m.Elif(a.x >= nops):
                    fin.error(P.ErrorCode.BAD_BUFFER, a.x)
                with m.Elif((a.slot_x >= len(fmts)) | ~ok_x):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("slot_x"))
                with m.Elif((a.slot_w >= len(fmts)) | ~ok_w):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("slot_w"))
                with m.Elif(a.batch == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("batch"))
                with m.Elif(a.w_rows == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("w_rows"))
                with m.Elif(a.w_cols == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("w_cols"))
                with m.Elif(K > cfg.k_max):
                    fin.error(P.ErrorCode.BAD_ARGUMENT,
                              Mux(trans, lay.index("w_rows"), lay.index("w_cols")))
                with m.Elif(n_x > cfg.operand_depth):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, n_x)
                with m.Elif(oor(a.w_offset, n_t, slim)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(a.w_offset, slim))
                with m.Elif(oor(a.e_offset, n_e, exp_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(a.e_offset, exp_s.depth))
                with m.Elif(oor(a.out_offset, n_o, out_s.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(a.out_offset, out_s.depth))
                with m.Else():
                    m.d.sync += [xb.eq(0), ob.eq(0), xe_base.eq(0), ob_gi.eq(0), tno.eq(0),
                                 wsub.eq(0), kb.eq(0), j.eq(0),
                                 wel.eq(a.w_offset << ssh)]
                    with m.If(trans):
                        m.next = "TCHK"
                    with m.Else():
                        m.next = "EXPS0"
            with m.State("TCHK"):
                # one tile per wpb clocks through the gatherer, checked at stage D
                with m.If(tile_v & tbad):
                    fin.error(P.ErrorCode.DATA_RANGE, d_tno)
                with m.Elif(tno < n_t):
                    m.d.comb += [issue.eq(1), i_chk.eq(1)]
                    m.d.sync += wsub.eq(wsub + 1)
                    with m.If(i_last):
                        m.d.sync += [wsub.eq(0), tno.eq(tno + 1), wel.eq(wel + S)]
                with m.Elif(~d_v):
                    m.next = "EXPS0"
            with m.State("EXPS0"):
                # start of a (row block, output block) pair
                m.d.sync += [ecnt.eq(0), mx.eq(LO), mwx.eq(LO), badx.eq(0), badw.eq(0),
                             we_a.eq(a.e_offset + Mux(trans, ob, ob_gi))]
                m.next = "EXPS"
            with m.State("EXPS"):
                for r in xexp_r:
                    m.d.comb += r.addr.eq(xe_base + ecnt)
                m.d.comb += exp_r.addr.eq(we_a)
                with m.If(ecnt < gk):
                    m.d.sync += [pv.eq(1), pk.eq(ecnt), ecnt.eq(ecnt + 1),
                                 we_a.eq(we_a + Mux(trans, gi, 1))]
                with m.Elif(~pv):
                    m.next = "EREF"
            with m.State("EREF"):
                m.d.sync += [e_ref.eq(mx + mwx), bad.eq(badx | badw),
                             jt.eq(0), bi.eq(0), brow.eq(xb << tsh), tout.eq(ob << qsh)]
                m.next = "EREF2"
            with m.State("EREF2"):
                m.d.sync += scale.eq(e_ref - cfg.guard_bits - frac_x - frac_w)
                m.next = "JOB0"
            with m.State("JOB0"):
                m.d.sync += [
                    o_addr.eq(a.out_offset + brow * N + (tout << msh)),
                    o_lanes.eq(Mux(N - (tout << msh) >= M, M, N - (tout << msh))),
                    xwa.eq((xe_base << tsh) + bi),
                    wel.eq((a.w_offset + Mux(trans, tout, tout * tc_n)) << ssh),
                    kb.eq(0), j.eq(0), wsub.eq(0)]
                m.next = "JOB1"
            with m.State("JOB1"):
                with m.If(mq.w_rdy):
                    m.d.comb += mq.w_en.eq(1)
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(room):
                    m.d.comb += issue.eq(1)
                    m.d.sync += wsub.eq(wsub + 1)
                    with m.If(i_last):
                        m.d.sync += [wsub.eq(0), j.eq(j + 1), wel.eq(wel + wstep)]
                        with m.If(i_lastk):
                            m.d.sync += [j.eq(0), kb.eq(kb + 1), xwa.eq(xwa + T)]
                        with m.If(i_lastj):
                            # next job: row, then tile along N, then output block,
                            # then row block
                            with m.If((bi < T - 1) & (brow + 1 < a.batch)):
                                m.d.sync += [bi.eq(bi + 1), brow.eq(brow + 1)]
                                m.next = "JOB0"
                            with m.Elif((jt < q - 1) & (((tout + 1) << msh) < N)):
                                m.d.sync += [jt.eq(jt + 1), tout.eq(tout + 1), bi.eq(0),
                                             brow.eq(xb << tsh)]
                                m.next = "JOB0"
                            with m.Elif(ob + 1 < gn):
                                m.d.sync += [ob.eq(ob + 1), ob_gi.eq(ob_gi + gi)]
                                m.next = "EXPS0"
                            with m.Elif(xb + 1 < gb):
                                m.d.sync += [xb.eq(xb + 1), ob.eq(0), ob_gi.eq(0),
                                             xe_base.eq(xe_base + gk)]
                                m.next = "EXPS0"
                            with m.Else():
                                m.d.sync += flush.eq(0)
                                m.next = "FLUSH"
            with m.State("FLUSH"):
                # every job drained (metadata FIFO empty), then the converter pipeline
                with m.If(mq.r_rdy | d_v | bq.r_rdy | busy):
                    m.d.sync += flush.eq(0)
                with m.Else():
                    m.d.sync += flush.eq(flush + 1)
                    with m.If(flush == Fp32Convert.LATENCY + 2):
                        fin.done(status_ok(m, pay, nfix=0))
            fin.done_state()
        return m
