"""The GEMM engine's datapath: operand sequencer -> MAC array -> drain, accumulator buffer.

:class:`GemmStream` runs one checked GEMM job (:func:`job_layout`, registered by the
:class:`~hbfp_hw.gateware.engines.gemm.GemmEngine`): for every output tile ``(it, jt)``
it sends the MAC array one exponent header beat per K tile of A's row strip and B's
column strip (with ``EXT_EREF`` one more carrying the reference exponent), then the
``tile`` row beats of each K tile; it drains the FP32 outputs into ``out`` (``STORE``:
row ``g_off + i * N + j``, outputs outside ``M x N`` dropped) and their values onto
``sample``; and it keeps every output beat's accumulators in a buffer so the next GEMM
can ``ACCUMULATE`` onto them.

No multiplication sits on a GEMM address path: block indices and ``out`` row addresses
are registers stepped by constant or registered strides.

**CONV jobs** (``job.conv``) run the same loops -- output tile ``it``, output tile
``jt``, K-block ``kk``, tile row -- but each counter also steps as a three-digit
mixed-radix number (radices from the job), and the operand block of a beat comes from
the convolution's block-level im2col map of those digits, kept incrementally by
:class:`~hbfp_hw.gateware.engines.conv_address.ConvAddress` (no multiplier on the address
path either): the block index in the operand buffer, or a *padding block* (a tap outside
the input, or a dX tap no output position reads), sent as zero mantissas with the
exponent code of ``emin`` and never read. A CONV job starts
``ConvAddress.SETUP_CLOCKS`` clocks after ``start`` (the map's coefficients). Built only
with ``conv=True``.

**Array clock domain** (``array_domain``, e.g. ``"array"``; the accelerator builds it
when ``AcceleratorConfig.array_clock_hz`` is set): the MAC array and the accumulator
buffer run in that domain; the sequencer, the drain and the ports stay in ``sync``. The
operand beats cross in two ``AsyncFIFOBuffered`` (``sync`` -> array), the FP32 output
rows in a third (array -> ``sync``). No other signal crosses: the job fields the array
side needs travel in the operand beats -- the MAC array's own fields (header, transpose,
reference exponent, fraction bits) in every beat, and on stream A three more bits, a
``first`` flag on the job's first beat with the job's ``acc`` and ``fit`` flags, which
the array side latches there and which reset its accumulator read / write counters.
That beat is read only after the previous job's last output row has reached ``sync``
(``start`` follows ``done``), and each output row's accumulator write happens in the
carry stage, before its FP32 conversion enters the output FIFO; so ``done`` (the last
output row drained in ``sync``) implies that every accumulator write of the job has
landed, and the counters are never reset under a running job.
"""

from __future__ import annotations

from amaranth import Cat, DomainRenamer, Module, Mux, Signal, Value, signed
from amaranth.lib import data, fifo, memory, wiring
from amaranth.lib.wiring import In, Out

from ..engine import sample_signature
from ..mac_array import MacArray, carry_bits, ref_exponent_limit
from .conv_address import ConvAddress
from .quantize import cmul

__all__ = ["GemmStream", "job_layout"]


def job_layout(operand_buffers: int, *, dim_bits: int = 16, size_bits: int = 16,
               off_bits: int = 32) -> data.StructLayout:
    """A GEMM job: operand buffers, flags, shape, grid and output placement.

    ``dim_bits``: the tile counts ``mt``, ``nt``, ``nk``; ``size_bits``: ``M``, ``N``;
    ``off_bits``: the ``out`` row ``off`` (the engine's checks bound them).

    CONV jobs (``conv``) add the convolution's index map: ``cmode`` (0 forward, 1 dX,
    2 dW), the mixed radices of the output-row tile counter ``it`` (``ri2, ri1, ri0``),
    the output-column tile counter ``jt`` (``rj*``) and the K-block counter ``kk``
    (``rk*``), the input and output sizes, the channel block counts, the kernel, log2 of
    the strides, dilations and padding (:class:`GemmStream`)."""
    return data.StructLayout({
        "a": range(operand_buffers), "b": range(operand_buffers),
        "ta": 1, "tb": 1, "ext": 1, "acc": 1, "store": 1, "fit": 1, "rbank": 1,
        "frac_a": 5, "frac_b": 5,
        "mt": dim_bits, "nt": dim_bits, "nk": dim_bits, "M": size_bits, "N": size_bits,
        "off": off_bits,
        "conv": 1, "cmode": 2,
        **{f"r{c}{d}": 16 for c in "ijk" for d in range(3)},
        "H": 16, "W": 16, "Ho": 16, "Wo": 16, "gc": 16, "go": 16, "kh": 8, "kw": 8,
        "lsh": 2, "lsw": 2, "dh": 8, "dw": 8, "ph": 8, "pw": 8})


class GemmStream(wiring.Component):
    """Sequencer, MAC array and drain of one GEMM job.

    Ports
    -----
    ``job``, ``start`` (strobe), ``done`` (idle): the job.
    ``rd_buf`` / ``rd_word`` / ``rd_elem``: operand buffer and the mantissa word / exponent
    element to read; ``man_data`` / ``exp_data``: that buffer's read data (a clock later).
    ``ref_addr`` / ``ref_data``: this GEMM's reference exponents (the engine's memory).
    ``out_addr`` / ``out_data`` / ``out_en``: writes into ``out``.
    ``sample``: every stored output, for the statistics engine.

    ``array_domain``: run the MAC array and the accumulator buffer in that clock domain,
    behind asynchronous FIFOs (module docstring); ``None`` (default): all in ``sync``.

    Widths the engine's checks bound: ``dim_bits`` / ``size_bits`` / ``out_bits`` (job
    fields and counters: tile counts, ``M`` / ``N``, ``out`` rows, see
    :func:`job_layout`), ``blk_bits`` (operand block indices).
    """

    def __init__(self, mc, *, operand_buffers: int, man_width: int, exp_width: int,
                 ref_width: int, ref_addr_bits: int, acc_capacity: int,
                 primitives: str | None = None, runtime_frac: bool = False,
                 conv: bool = False, array_domain: str | None = None,
                 dim_bits: int = 16, size_bits: int = 16, out_bits: int = 32,
                 blk_bits: int = 32) -> None:
        self.mc, self.nops, self.conv = mc, operand_buffers, bool(conv)
        self.dim_bits, self.size_bits = dim_bits, size_bits
        self.out_bits, self.blk_bits = out_bits, blk_bits
        #: clock domain of the MAC array and the accumulator buffer (None: ``sync``)
        self.array_domain = array_domain
        self.mw, self.ew, self.acc_capacity = man_width, exp_width, acc_capacity
        self.primitives, self.runtime_frac = primitives, runtime_frac
        super().__init__({
            "job": In(job_layout(operand_buffers, dim_bits=dim_bits, size_bits=size_bits,
                                 off_bits=out_bits)), "start": In(1), "done": Out(1),
            "rd_buf": Out(range(operand_buffers)), "rd_word": Out(32), "rd_elem": Out(32),
            "man_data": In(man_width * mc.tile), "exp_data": In(exp_width),
            "ref_addr": Out(ref_addr_bits), "ref_data": In(signed(ref_width)),
            "out_addr": Out(32), "out_data": Out(32), "out_en": Out(1),
            "sample": Out(sample_signature())})

    def ref_index(self, bank, which, idx):
        """Reference memory address of row block ``idx`` of A (``which`` 0) or column
        block of B (1) in ``bank``."""
        mg = len(self.ref_addr) - 2
        return Cat(idx[:mg], which, bank)

    def elaborate(self, platform):
        m = Module()
        mc, j = self.mc, self.job
        T = mc.tile
        tsh = T.bit_length() - 1
        mw = self.mw
        kw = {"runtime_frac": True} if self.runtime_frac else {}
        mac = MacArray(mc, primitives=self.primitives, ext_eref=True, carry=True, **kw)
        ad = self.array_domain
        adom = ad or "sync"       # the domain of the MAC array and the accumulators
        m.submodules.mac = DomainRenamer({"sync": ad})(mac) if ad else mac
        mt, nt, nk = j.mt, j.nt, j.nk

        # ---- sequencer: operand beats to the MAC array -------------------------------
        # One beat per clock: the buffers are addressed from the *next* state, so the
        # data of the current state's beat is there when it is issued (``primed`` from
        # the clock after ``start``); a stalled beat keeps its address and its data.
        # The next state is a choice among registers (the incremented values are kept
        # registered, ``*_1`` / ``*_k`` / ``*_i``), so no adder sits on the address path.
        DB, BB, OB = self.dim_bits, self.blk_bits, self.out_bits
        it, jt, kk = Signal(DB), Signal(DB), Signal(DB)
        rr = Signal(range(T + 1))
        sph = Signal(2)  # 0 A headers, 1 B headers, 2 A rows, 3 B rows
        running, primed = Signal(), Signal()
        # block indices Mux(ta, kk * mt + it, it * nk + kk) / Mux(tb, jt * nk + kk,
        # kk * nt + jt), kept incrementally (a_bs / b_bs: their values at kk = 0)
        blk_a, blk_b, a_bs, b_bs = (Signal(BB, name=n) for n in ("blk_a", "blk_b", "a_bs",
                                                                 "b_bs"))
        regs = [it, jt, kk, rr, sph, running, blk_a, blk_b, a_bs, b_bs]
        nxt = [Signal.like(r, name=f"n_{r.name}") for r in regs]
        n_it, n_jt, n_kk, n_rr, n_sph, n_running, n_blk_a, n_blk_b, n_a_bs, n_b_bs = nxt
        m.d.comb += [n.eq(r) for n, r in zip(nxt, regs)]
        m.d.sync += [r.eq(n) for n, r in zip(nxt, regs)]
        ska, skb = Mux(j.ta, mt, 1), Mux(j.tb, 1, nt)   # strides of kk
        sia, sjb = Mux(j.ta, 1, nk), Mux(j.tb, nk, 1)   # strides of it / jt
        blk_a_k, blk_b_k, a_bs_i, b_bs_j = (Signal(BB, name=n) for n in (
            "blk_a_k", "blk_b_k", "a_bs_i", "b_bs_j"))
        it_1, jt_1, kk_1 = Signal(DB), Signal(DB), Signal(DB)
        rr_1 = Signal.like(rr)
        m.d.sync += [blk_a_k.eq(n_blk_a + ska), blk_b_k.eq(n_blk_b + skb),
                     a_bs_i.eq(n_a_bs + sia), b_bs_j.eq(n_b_bs + sjb),
                     it_1.eq(n_it + 1), jt_1.eq(n_jt + 1), kk_1.eq(n_kk + 1),
                     rr_1.eq(n_rr + 1)]
        # the job's loop limits, registered at start
        nk_m1, hdr_l, mt_m1, nt_m1 = (Signal(DB, name=n) for n in ("nk_m1", "hdr_l", "mt_m1",
                                                                   "nt_m1"))
        with m.If(self.start):
            m.d.sync += [nk_m1.eq(nk - 1), hdr_l.eq(Mux(j.ext, nk, nk - 1)),
                         mt_m1.eq(mt - 1), nt_m1.eq(nt - 1)]
        is_b = sph[0]
        n_is_b = n_sph[0]
        n_blk = Mux(n_is_b, n_blk_b, n_blk_a)
        # ---- CONV: the digits of it, jt, kk and the block-level im2col map -------------
        # (built only with ``conv``; job.conv is 0 otherwise)
        dig, ndig, dinc = {}, {}, {}
        for c in ("ijk" if self.conv else ""):
            dig[c] = [Signal(16, name=f"d{c}{d}") for d in range(3)]
            ndig[c] = [Signal(16, name=f"n_d{c}{d}") for d in range(3)]
            dinc[c] = [Signal(16, name=f"inc_d{c}{d}") for d in range(3)]
            m.d.comb += [n.eq(r) for n, r in zip(ndig[c], dig[c])]
            m.d.sync += [r.eq(n) for n, r in zip(ndig[c], dig[c])]
            r = [getattr(j, f"r{c}{d}") for d in range(3)]
            d0, d1, d2 = dig[c]
            top0, top1 = d0 == r[0] - 1, d1 == r[1] - 1
            m.d.comb += [dinc[c][0].eq(Mux(top0, 0, d0 + 1)),
                         dinc[c][1].eq(Mux(top0, Mux(top1, 0, d1 + 1), d1)),
                         dinc[c][2].eq(Mux(top0 & top1, d2 + 1, d2))]

        cva = ConvAddress(m, j, ndig, self.start) if self.conv else None
        go = cva.go if self.conv else self.start     # the sequencer's start

        def d_inc(c):
            return ([n.eq(v) for n, v in zip(ndig[c], dinc[c])] + cva.inc(c)
                    if self.conv else [])

        def d_zero(c):
            return [n.eq(0) for n in ndig[c]] + cva.zero(c) if self.conv else []

        zero = Signal()           # the current beat's block is a padding block
        zcode = mc.format_a().emin + mc.format_a().exp_bias
        if self.conv:
            c_a, c_b, z_a, z_b = cva.blk_a, cva.blk_b, cva.pad_a, cva.pad_b
            m.d.sync += zero.eq(j.conv & Mux(n_is_b, z_b, z_a))
            n_blk = Mux(j.conv, Mux(n_is_b, c_b, c_a), n_blk)
        m.d.comb += [self.rd_elem.eq(n_blk),
                     self.rd_word.eq(Cat(n_rr[:tsh], n_blk) if tsh else n_blk),
                     self.rd_buf.eq(Mux(is_b, j.b, j.a)),
                     self.ref_addr.eq(self.ref_index(~j.rbank, n_is_b,
                                                     Mux(n_is_b, n_jt, n_it)))]
        # the job's reference exponent, clamped to the largest value that matters
        r_lim = ref_exponent_limit(mc)
        ref_val = Mux(self.ref_data > r_lim, r_lim, self.ref_data)
        m.d.sync += primed.eq(go | (primed & n_running))
        kk_inc = [n_kk.eq(kk_1), n_blk_a.eq(blk_a_k), n_blk_b.eq(blk_b_k), *d_inc("k")]
        kk_zero = [n_kk.eq(0), n_blk_a.eq(a_bs), n_blk_b.eq(b_bs), *d_zero("k")]
        # a small FIFO per operand stream between the sequencer (buffer reads, reference
        # clamp) and the MAC array's front end: the sequencer's accept comes from the
        # FIFO's registered level, not from the array (two entries: a beat per clock while
        # the array takes one; with an array domain: asynchronous FIFOs into it, module
        # docstring)
        fifo_ready = []
        job_first = Signal()    # the next beat on stream A is the job's first
        a_extra = a_take = None

        # a FIFO word: the operand beat with ``eref`` in the bits of ``data`` (a header
        # beat's data and a row beat's reference exponent are ignored by the array)
        def beat_fields(lay):
            return sorted(((f.offset, n, f.width) for n, f in lay), key=lambda t: t[0])

        def pack(p):
            lay = data.Layout.cast(p.shape())
            names = {n for _, n, _ in beat_fields(lay)}
            if "eref" not in names or lay["eref"].width > lay["data"].width:
                return p.as_value()
            parts = [Mux(p.header, Value.cast(p.eref).as_unsigned(), Value.cast(p.data))]
            parts += [Value.cast(getattr(p, n)) for _, n, _ in beat_fields(lay)
                      if n not in ("data", "eref")]
            return Cat(*parts)

        def unpack(word, lay):
            lay = data.Layout.cast(lay)
            names = {n for _, n, _ in beat_fields(lay)}
            if "eref" not in names or lay["eref"].width > lay["data"].width:
                return word
            pos, at = lay["data"].width, {"data": 0, "eref": 0}
            for _, n, w in beat_fields(lay):
                if n not in at:
                    at[n], pos = pos, pos + w
            return Cat(*[word[at[n]: at[n] + w] for _, n, w in beat_fields(lay)])

        for port, which in ((mac.a, 0), (mac.b, 1)):
            p = Signal(port.payload.shape(), name=f"seq_{'ab'[which]}")
            m.d.comb += [p.exp.eq(Mux(zero, zcode, self.exp_data)),
                         p.transpose.eq(j.tb if which else j.ta),
                         p.header.eq(~sph[1]), p.last.eq(kk == nk_m1),
                         p.ref.eq(j.ext & ~sph[1] & (kk == nk)), p.eref.eq(ref_val)]
            if self.runtime_frac:
                m.d.comb += p.frac.eq(j.frac_b if which else j.frac_a)
            for k in range(T):
                m.d.comb += p.data[k].eq(Mux(zero, 0,
                                             self.man_data[mw * k: mw * k + mc.man_bits_a]))
            pk = pack(p)
            pw = len(pk)
            if ad is None:
                q = fifo.SyncFIFO(width=pw, depth=2)
                m.d.comb += q.w_data.eq(pk)
            else:       # A carries (first, acc, fit) above the MAC array's payload
                q = fifo.AsyncFIFOBuffered(width=pw + 3 * (1 - which), depth=9,
                                           w_domain="sync", r_domain=ad)
                m.d.comb += q.w_data.eq(Cat(pk, job_first, j.acc, j.fit)
                                        if which == 0 else pk)
                if which == 0:
                    a_extra = q.r_data[pw:]
                    a_take = q.r_rdy & port.ready
            m.submodules[f"seq_fifo_{'ab'[which]}"] = q
            m.d.comb += [q.w_en.eq(running & primed & (is_b == which)),
                         port.valid.eq(q.r_rdy),
                         port.payload.eq(unpack(q.r_data[:pw], port.payload.shape())),
                         q.r_en.eq(port.ready)]
            fifo_ready.append(q.w_rdy)
        accepted = Mux(is_b, fifo_ready[1], fifo_ready[0]) & primed & running
        with m.If(self.start):
            m.d.sync += job_first.eq(1)
        with m.Elif(accepted & ~is_b):
            m.d.sync += job_first.eq(0)
        with m.If(accepted):
            with m.If(~sph[1]):  # header beats
                with m.If(kk == hdr_l):   # EXT_EREF: one reference header beat more
                    m.d.comb += [*kk_zero, n_sph.eq(sph + 1)]
                with m.Else():
                    m.d.comb += kk_inc
            with m.Else():
                with m.If(rr == T - 1):
                    m.d.comb += n_rr.eq(0)
                    with m.If(sph == 2):
                        m.d.comb += n_sph.eq(3)
                    with m.Elif(kk != nk_m1):
                        m.d.comb += [n_sph.eq(2), *kk_inc]
                    with m.Else():
                        m.d.comb += [n_sph.eq(0), *kk_zero]
                        with m.If(jt == nt_m1):
                            m.d.comb += [n_jt.eq(0), n_b_bs.eq(0), n_blk_b.eq(0),
                                         *d_zero("j")]
                            with m.If(it == mt_m1):
                                m.d.comb += n_running.eq(0)
                            with m.Else():
                                m.d.comb += [n_it.eq(it_1), n_a_bs.eq(a_bs_i),
                                             n_blk_a.eq(a_bs_i), *d_inc("i")]
                        with m.Else():
                            m.d.comb += [n_jt.eq(jt_1), n_b_bs.eq(b_bs_j),
                                         n_blk_b.eq(b_bs_j), *d_inc("j")]
                with m.Else():
                    m.d.comb += n_rr.eq(rr_1)
        with m.If(go):
            m.d.comb += [n_it.eq(0), n_jt.eq(0), n_kk.eq(0), n_rr.eq(0), n_sph.eq(0),
                         n_running.eq(1), n_blk_a.eq(0), n_blk_b.eq(0), n_a_bs.eq(0),
                         n_b_bs.eq(0), *d_zero("i"), *d_zero("j"), *d_zero("k"),
                         *(cva.begin() if self.conv else [])]

        # ---- drain: MAC results -> out + statistics ---------------------------------
        R, C = mc.rows, mc.cols
        if ad is None:
            res = mac.o
        else:       # the output rows cross into sync
            olen = len(mac.o.payload.as_value())
            q = fifo.AsyncFIFOBuffered(width=olen, depth=5, w_domain=ad, r_domain="sync")
            m.submodules.res_fifo = q
            res = mac.o.signature.create(path=("res",))   # valid / payload / ready
            m.d.comb += [q.w_data.eq(mac.o.payload.as_value()), q.w_en.eq(mac.o.valid),
                         mac.o.ready.eq(q.w_rdy), res.valid.eq(q.r_rdy),
                         res.payload.eq(q.r_data), q.r_en.eq(res.ready)]
        d_it, d_jt = Signal(DB), Signal(DB)
        d_rg = Signal(range(T // R + 1))
        d_cg = Signal(range(T // C + 1))
        d_r = Signal(range(R + 1))
        d_c = Signal(range(C + 1))
        d_run = Signal()
        # out row address g_off + di * N, kept incrementally: d_ra of the row
        # (it, rg, r), d_rb of (it, rg, 0), d_ib of (it, 0, 0)
        d_ra, d_rb, d_ib = Signal(OB), Signal(OB), Signal(OB)
        with m.If(self.start):
            m.d.sync += [d_it.eq(0), d_jt.eq(0), d_rg.eq(0), d_cg.eq(0), d_r.eq(0),
                         d_c.eq(0), d_run.eq(1), d_ra.eq(j.off), d_rb.eq(j.off),
                         d_ib.eq(j.off)]
        m.d.comb += self.done.eq(~running & ~d_run)
        di, dj = Signal(self.size_bits), Signal(self.size_bits)
        gNR = cmul(j.N, R)        # row address steps of rg and it
        gNT = j.N << tsh
        m.d.comb += [di.eq((d_it << tsh) + d_rg * R + d_r),
                     dj.eq((d_jt << tsh) + d_cg * C + d_c)]
        val = Signal(32)
        with m.Switch(d_c):
            for k in range(C):
                with m.Case(k):
                    m.d.comb += val.eq(res.payload.data[k])
        in_range = (di < j.M) & (dj < j.N) & j.store   # out and statistics: STORE only
        m.d.comb += [self.out_addr.eq(d_ra + dj), self.out_data.eq(val)]
        # registered into the statistics (READ_STATS comes frames later)
        m.d.sync += [self.sample.valid.eq(d_run & res.valid & in_range),
                     self.sample.payload.eq(val)]
        with m.If(d_run & res.valid):
            with m.If(in_range):
                m.d.comb += self.out_en.eq(1)
            with m.If(d_c == C - 1):
                m.d.comb += res.ready.eq(1)
                m.d.sync += d_c.eq(0)
                with m.If(d_r == R - 1):
                    m.d.sync += [d_r.eq(0), d_ra.eq(d_rb)]
                    with m.If(d_cg == T // C - 1):
                        m.d.sync += d_cg.eq(0)
                        with m.If(d_rg == T // R - 1):
                            m.d.sync += [d_rg.eq(0), d_ra.eq(d_ib), d_rb.eq(d_ib)]
                            with m.If(d_jt == nt - 1):
                                m.d.sync += d_jt.eq(0)
                                with m.If(d_it == mt - 1):
                                    m.d.sync += d_run.eq(0)
                                with m.Else():
                                    m.d.sync += [d_it.eq(d_it + 1), d_ra.eq(d_ib + gNT),
                                                 d_rb.eq(d_ib + gNT), d_ib.eq(d_ib + gNT)]
                            with m.Else():
                                m.d.sync += d_jt.eq(d_jt + 1)
                        with m.Else():
                            m.d.sync += [d_rg.eq(d_rg + 1), d_ra.eq(d_rb + gNR),
                                         d_rb.eq(d_rb + gNR)]
                    with m.Else():
                        m.d.sync += d_cg.eq(d_cg + 1)
                with m.Else():
                    m.d.sync += [d_r.eq(d_r + 1), d_ra.eq(d_ra + j.N)]
            with m.Else():
                m.d.sync += d_c.eq(d_c + 1)

        # ---- accumulators kept between GEMMs: read back (ACCUMULATE), written per beat
        CB = carry_bits(mc)
        m.submodules.accm = accm = memory.Memory(
            shape=mc.cols * CB + 1, depth=max(1, -(-self.acc_capacity // mc.cols)), init=[])
        acc_w, acc_r = accm.write_port(domain=adom), accm.read_port(domain=adom)
        ac_rd, ac_wr = Signal(len(acc_r.addr)), Signal(len(acc_w.addr))
        if ad is None:
            ac_reset, acc_f, fit_f = self.start, j.acc, j.fit
        else:       # latched from the job's first beat (module docstring)
            ac_reset = a_take & a_extra[0]
            acc_f, fit_f = Signal(), Signal()
            with m.If(ac_reset):
                m.d[ad] += [acc_f.eq(a_extra[1]), fit_f.eq(a_extra[2])]
        with m.If(ac_reset):
            m.d[adom] += [ac_rd.eq(0), ac_wr.eq(0)]
        with m.Else():
            with m.If(mac.cin_take):
                m.d[adom] += ac_rd.eq(ac_rd + 1)
            with m.If(mac.acc_o_valid):
                m.d[adom] += ac_wr.eq(ac_wr + 1)
        m.d.comb += [acc_r.addr.eq(ac_rd), acc_w.addr.eq(ac_wr),
                     acc_w.en.eq(mac.acc_o_valid & fit_f),
                     acc_w.data.eq(Cat(*[mac.acc_o[c] for c in range(C)], mac.acc_o_nan)),
                     mac.cin_nan.eq(acc_f & acc_r.data[-1])]
        for c in range(C):
            m.d.comb += mac.cin[c].eq(Mux(acc_f, acc_r.data[c * CB:(c + 1) * CB].as_signed(),
                                          0))
        return m
