"""BITLAYER: the bit-serial bit-layer GEMM engine (PrecisionBatching).

``y = x @ W.T`` over the top ``layers`` of W's ``bits`` weight bit-planes, bit-exact
with :func:`hbfp_hw.bitlayers.matmul` (the emulator's ``_op_bitlayer``):

* **Checks**, in the emulator's order: ``bits`` in ``[1, BITLAYER_BITS_MAX]``
  (BAD_ARGUMENT 0), ``layers`` in ``[1, bits]`` (1), ``rows`` (2), ``cols`` in ``[1,
  k_max]`` (3), ``batch`` (4), ``flags`` (undefined bits: BAD_ARGUMENT 8), then the
  ``bl.w`` / ``bl.x`` / ``bl.y`` ranges (OUT_OF_RANGE, detail ``max(offset, depth)``).
  The sizes ``rows * bits * chunks``, ``batch * cols`` and ``batch * rows`` are
  registered in two states before the checks.
* **Per activation row**: ``cols`` elements of ``bl.x`` are read, one per clock, into a
  small LUT memory of ``chunks_max`` words of ``lanes`` activations; then for every
  output row, every kept plane (sign plane first) and every chunk one ``bl.w`` word is
  read: the weight bits (lanes past ``cols`` masked) select their activations, a
  balanced adder tree sums them (registered), and the accumulator applies Horner's rule
  (``2*acc + c_i * partial`` at the first chunk of a plane, the sign plane subtracted).
  The row's result, shifted left by ``bits - layers``, is written to ``bl.y`` — with
  ``ACCUMULATE`` added (int32, wrapping) to the word there, read one clock before the
  write (``bl.y`` read address = the write address of the next result).
* **Statistics**: with ``TRACK`` every word written is a beat on ``sample`` (int32),
  which the statistics engine's integer range tracker folds in (READ_STATS
  ``INT_OUTPUT``).
* **Time**: ``batch * (cols + 1 + rows * layers * chunks)`` clocks plus a few for the
  checks and the pipeline drain: proportional to ``layers``, a field of every command.

With ``lanes = 0`` (``bitlayer_lanes(config)``) the engine only answers UNSUPPORTED.
"""

from __future__ import annotations

import math

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import Out

from hbfp_hw import protocol as P

from ..bitserial import _tree
from ..engine import (EngineStatus, OptionalEngine, engine_signature, port_name,
                      sample_signature, status_ok)

__all__ = ["BitLayerEngine"]


class BitLayerEngine(OptionalEngine):
    """Engine for BITLAYER (see the module docstring)."""

    lanes_of = staticmethod(P.bitlayer_lanes)

    def __init__(self, config, specs, *, rom_depth: int) -> None:
        self.config, self.specs = config, list(specs)
        self.lanes = P.bitlayer_lanes(config)
        wiring.Component.__init__(self, engine_signature(
            self.specs, config.tile, rom_depth, sample=Out(sample_signature())))

    def elaborate(self, platform):
        m = Module()
        fin = EngineStatus(m, self)
        pay = fin.pay
        L = self.lanes
        if not L:
            return fin.unsupported_only("bitlayer")
        A = P.BITLAYER_ACT_BITS
        CM = P.BITLAYER_CHUNKS_MAX
        BM = P.BITLAYER_BITS_MAX
        kmax = P.bitlayer_k_max(self.config)
        lsh = L.bit_length() - 1
        acc_bits = A + BM + math.ceil(math.log2(kmax)) + 1
        sp = {s.name: s for s in self.specs}
        ws, xs, ys = sp["bl.w"], sp["bl.x"], sp["bl.y"]
        w_r = getattr(self.bufs, f"{port_name(ws)}_r")
        x_r = getattr(self.bufs, f"{port_name(xs)}_r")
        y_w = getattr(self.bufs, f"{port_name(ys)}_w")
        y_r = getattr(self.bufs, f"{port_name(ys)}_r")
        a = self.cmd.payload.args.bitlayer
        lay = P.REQUESTS[P.Op.BITLAYER]

        # ---- sizes (registered before the checks)
        chunks = Signal(range(CM + 1))
        bc = Signal(8)                          # bits * chunks: words per output row
        n_w, n_x, n_y = Signal(24), Signal(32), Signal(32)
        shift = Signal(range(BM + 1))
        lastmask = Signal(L)

        # ---- counters
        b_i, o_i = Signal(16), Signal(16)
        q_i, c_i = Signal(range(BM + 1)), Signal(range(CM + 1))
        k_i = Signal(16)                        # activation element of the row
        w_row, w_rd = Signal(32), Signal(32)
        x_a, y_a = Signal(32), Signal(32)
        drain = Signal(3)

        # ---- activation memory: chunks_max words of lanes activations
        m.submodules.xmem = xmem = Memory(shape=unsigned(L * A), depth=CM, init=[])
        xwp = xmem.write_port(granularity=A)
        xrp = xmem.read_port()
        ld_v, ld_k = Signal(), Signal(16)       # bl.x data of element ld_k arrives
        m.d.sync += ld_v.eq(0)
        m.d.comb += [xwp.addr.eq(ld_k >> lsh),
                     xwp.data.eq(Mux(ld_v, x_r.data, 0).replicate(L)),
                     x_r.addr.eq(x_a)]
        with m.If(ld_v):
            m.d.comb += xwp.en.eq(1 << ld_k[:lsh])

        # ---- compute issue
        issue = Signal()
        first, newplane, sign, last, lastc = (Signal(name=n) for n in
                                              ("first", "newplane", "sign", "last", "lastc"))
        m.d.comb += [w_r.addr.eq(w_rd), xrp.addr.eq(c_i),
                     first.eq((q_i == 0) & (c_i == 0)), newplane.eq(c_i == 0),
                     sign.eq(q_i == 0), lastc.eq(c_i == chunks - 1),
                     last.eq((q_i == a.layers - 1) & (c_i == chunks - 1))]

        with m.FSM(name="bitlayer"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [chunks.eq((a.cols + L - 1) >> lsh),
                                 shift.eq(a.bits - a.layers)]
                    m.next = "PRE1"
            with m.State("PRE1"):
                rem = a.cols[:lsh]
                m.d.sync += [bc.eq(a.bits[:4] * chunks),
                             lastmask.eq(Mux(rem == 0, (1 << L) - 1,
                                             (Const(1, L + 1) << rem) - 1)),
                             n_x.eq(a.batch * a.cols), n_y.eq(a.batch * a.rows)]
                m.next = "PRE2"
            with m.State("PRE2"):
                m.d.sync += n_w.eq(a.rows * bc)
                m.next = "CHECK"
            with m.State("CHECK"):
                def oor(off, n, depth):
                    return (off + n) > depth

                def detail(off, depth):
                    return Mux(off > depth, off, depth)
                with m.If((a.bits == 0) | (a.bits > BM)):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("bits"))
                with m.Elif((a.layers == 0) | (a.layers > a.bits)):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("layers"))
                with m.Elif(a.rows == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("rows"))
                with m.Elif((a.cols == 0) | (a.cols > kmax)):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("cols"))
                with m.Elif(a.batch == 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("batch"))
                with m.Elif((a.flags & (0xFF & ~P.flag_mask(P.BitLayerFlag))) != 0):
                    fin.error(P.ErrorCode.BAD_ARGUMENT, lay.index("flags"))
                with m.Elif(oor(a.w_offset, n_w, ws.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(a.w_offset, ws.depth))
                with m.Elif(oor(a.x_offset, n_x, xs.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(a.x_offset, xs.depth))
                with m.Elif(oor(a.y_offset, n_y, ys.depth)):
                    fin.error(P.ErrorCode.OUT_OF_RANGE, detail(a.y_offset, ys.depth))
                with m.Else():
                    m.d.sync += [b_i.eq(0), o_i.eq(0), q_i.eq(0), c_i.eq(0), k_i.eq(0),
                                 w_row.eq(a.w_offset), w_rd.eq(a.w_offset),
                                 x_a.eq(a.x_offset), y_a.eq(a.y_offset)]
                    m.next = "LOADX"
            with m.State("LOADX"):
                # bl.x element k_i is read at x_a; it is written a clock later
                m.d.sync += [ld_v.eq(1), ld_k.eq(k_i), k_i.eq(k_i + 1), x_a.eq(x_a + 1)]
                with m.If(k_i == a.cols - 1):
                    m.d.sync += k_i.eq(0)
                    m.next = "XWAIT"
            with m.State("XWAIT"):
                m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += issue.eq(1)
                m.d.sync += [w_rd.eq(w_rd + 1), c_i.eq(c_i + 1)]
                with m.If(lastc):
                    m.d.sync += [c_i.eq(0), q_i.eq(q_i + 1)]
                with m.If(last):
                    m.d.sync += [q_i.eq(0), o_i.eq(o_i + 1), w_row.eq(w_row + bc),
                                 w_rd.eq(w_row + bc)]
                    with m.If(o_i == a.rows - 1):
                        m.d.sync += [o_i.eq(0), b_i.eq(b_i + 1), w_row.eq(a.w_offset),
                                     w_rd.eq(a.w_offset)]
                        with m.If(b_i == a.batch - 1):
                            m.d.sync += drain.eq(0)
                            m.next = "DRAIN"
                        with m.Else():
                            m.next = "LOADX"
            with m.State("DRAIN"):
                m.d.sync += drain.eq(drain + 1)
                with m.If(drain == 4):
                    fin.done(status_ok(m, pay, nfix=0))
            fin.done_state()

        # ---- pipeline: read -> AND + tree (registered) -> Horner -> bl.y write
        s1v, s1f, s1n, s1s, s1l, s1c = (Signal(name=f"s1_{n}") for n in
                                        ("v", "first", "newplane", "sign", "last", "lastc"))
        m.d.sync += [s1v.eq(issue), s1f.eq(first), s1n.eq(newplane), s1s.eq(sign),
                     s1l.eq(last), s1c.eq(lastc)]
        wbits = Signal(L)
        m.d.comb += wbits.eq(w_r.data[:L] & Mux(s1c, lastmask, (1 << L) - 1))
        terms = []
        for lane in range(L):
            xv = xrp.data[lane * A:(lane + 1) * A].as_signed()
            terms.append(Mux(wbits[lane], xv, Const(0, signed(A))))
        psum = Signal(signed(A + L.bit_length()))
        s2v, s2f, s2n, s2s, s2l = (Signal(name=f"s2_{n}") for n in
                                   ("v", "first", "newplane", "sign", "last"))
        m.d.sync += [psum.eq(_tree(m, terms, None, "bl_tree")), s2v.eq(s1v), s2f.eq(s1f),
                     s2n.eq(s1n), s2s.eq(s1s), s2l.eq(s1l)]
        acc = Signal(signed(acc_bits))
        v = Mux(s2s, -psum, psum)
        acc_next = Signal(signed(acc_bits))
        m.d.comb += acc_next.eq(Mux(s2f, v, Mux(s2n, (acc << 1) + v, acc + v)))
        with m.If(s2v):
            m.d.sync += acc.eq(acc_next)
        s3v = Signal()
        s3acc = Signal(signed(acc_bits))
        m.d.sync += [s3v.eq(s2v & s2l), s3acc.eq(acc_next)]
        yv = Signal(signed(acc_bits))
        # ACCUMULATE: the word at the write address, read a clock before (when the
        # result is in stage 2, the next write address is y_a, plus one if stage 3
        # writes now)
        accum = (a.flags & int(P.BitLayerFlag.ACCUMULATE)).any()
        track = (a.flags & int(P.BitLayerFlag.TRACK)).any()
        ysum = Signal(32)
        m.d.comb += [yv.eq(s3acc << shift), y_r.addr.eq(y_a + s3v),
                     ysum.eq(yv[:32] + Mux(accum, y_r.data[:32], 0)),
                     y_w.addr.eq(y_a), y_w.data.eq(ysum), y_w.en.eq(s3v),
                     self.sample.valid.eq(s3v & track), self.sample.payload.eq(ysum)]
        with m.If(s3v):
            m.d.sync += y_a.eq(y_a + 1)
        return m
