"""INFO, WRITE, READ, RESET and SESSION: the commands that move buffer contents, and the
session token.

Checks follow the emulator (:class:`hbfp_hw.host.emulator.Emulator`) in its order, so
error frames carry its code and detail:

* INFO: ``offset`` past the description: ``OUT_OF_RANGE``; answer: the ROM's fixed fields
  (segment 0), then up to ``MAX_DATA`` description bytes from ``offset`` (segment 1).
* WRITE: unknown or read-only buffer: ``BAD_BUFFER``; data not whole elements or over
  ``MAX_DATA``: ``BAD_LENGTH``; past the buffer: ``OUT_OF_RANGE``. Copies the staged
  payload into the buffer, one byte per clock.
* READ: unknown buffer, size over ``MAX_DATA``, past the buffer; answer: the elements.
* RESET: clears every buffer (one word per clock, the deepest buffer's depth) and pulses
  ``soft_reset`` (statistics and the GEMM accumulators forget their state).
* SESSION: sets the ``token`` register (0 after a hardware reset, kept by RESET) that the
  response encoder puts in every answer.
"""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from hbfp_hw import protocol as P

from ..engine import (EngineStatus, addr_bits, buffer_geometry, engine_signature, port_name,
                      rom_id, status_ok)

__all__ = ["BufferIOEngine", "by_id"]


def by_id(m, idx, values: list[int], name: str) -> Signal:
    """A constant per buffer id, selected by the run-time id ``idx`` (0 elsewhere)."""
    out = Signal(range(max(values) + 1), name=name)
    with m.Switch(idx):
        for k, v in enumerate(values):
            with m.Case(k):
                m.d.comb += out.eq(v)
    return out


class BufferIOEngine(wiring.Component):
    """Engine for INFO, WRITE, READ, RESET and SESSION.

    Parameters
    ----------
    specs
        The buffer map.
    tile
        Mantissas per mantissa-buffer word.
    info
        The INFO ROM contents (fixed fields, then the description).
    """

    def __init__(self, specs, *, tile: int, info: bytes) -> None:
        self.specs, self.tile, self.info = list(specs), tile, bytes(info)
        super().__init__(engine_signature(self.specs, tile, len(self.info),
                                          soft_reset=Out(1),
                                          token=Out(8 * P.SESSION_BYTES)))

    def elaborate(self, platform):
        m = Module()
        specs, T = self.specs, self.tile
        tsh = T.bit_length() - 1
        nbuf = len(specs)
        a = self.cmd.payload.args
        length = self.cmd.payload.length
        fin = EngineStatus(m, self)
        pay = fin.pay
        fixed = P.RESPONSES[P.Op.INFO].header_size
        hs_w = P.REQUESTS[P.Op.WRITE].header_size
        assert (P.REQUESTS[P.Op.READ].offsets()["buffer"]
                == P.REQUESTS[P.Op.WRITE].offsets()["buffer"])
        assert (P.REQUESTS[P.Op.READ].offsets()["offset"]
                == P.REQUESTS[P.Op.WRITE].offsets()["offset"])

        # READ / WRITE buffer id and its constants, registered before the checks
        b_id = Signal(8)
        # (``b_maxn``: the most elements a READ may answer, MAX_DATA >> log2 wire bytes)
        vals = {"b_wb": [s.wire_bytes for s in specs], "b_depth": [s.depth for s in specs],
                "b_writable": [int(s.writable) for s in specs],
                "b_wsh": [s.wire_bytes.bit_length() - 1 for s in specs],
                "b_maxn": [P.MAX_DATA >> (s.wire_bytes.bit_length() - 1) for s in specs]}
        b_wb, b_depth, b_writable, b_wsh, b_maxn = (Signal(range(max(v) + 1), name=k)
                                                    for k, v in vals.items())
        c_nobuf, c_off_gt, c_wlen_bad, c_oob, c_rlen_bad = (
            Signal(name=f"c_{k}") for k in ("nobuf", "off_gt", "wlen_bad", "oob", "rlen_bad"))
        c_dlen = Signal.like(length, name="c_dlen")
        c_n = Signal.like(length, name="c_n")
        max_depth = max(s.depth for s in specs)
        # an offset is checked as "bits from DB on non-zero" (past every buffer) plus a
        # DB-bit compare; element addresses are AW bits (every buffer's depth fits)
        DB = max_depth.bit_length()
        AW = addr_bits(max_depth)
        w_off = Signal(AW)
        w_n, w_e = Signal(16), Signal(16)
        w_acc = Signal(24)
        w_bi = Signal(2)
        clr = Signal(range(max_depth))

        # write ports: the WRITE element or the RESET clear
        wr_en, clearing = Signal(), Signal()
        wr_addr, wr_data = Signal(AW), Signal(32)
        for i, s in enumerate(specs):
            wp = getattr(self.bufs, f"{port_name(s)}_w")
            _, depth, _ = buffer_geometry(s, T)
            w = 8 * s.wire_bytes
            mant = s.kind in P.LANE_KINDS
            m.d.comb += [wp.addr.eq(Mux(clearing, clr, wr_addr >> tsh if mant else wr_addr)),
                         wp.data.eq(Mux(clearing, 0,
                                        wr_data[:w].replicate(T) if mant else wr_data[:w]))]
            lanes = (1 << T) - 1 if mant else 1
            one = (1 << wr_addr[:tsh] if tsh else 1) if mant else 1
            with m.If(clearing):
                m.d.comb += wp.en.eq(Mux(clr < depth, lanes, 0))
            with m.Elif(wr_en & (b_id == i)):
                m.d.comb += wp.en.eq(one)

        done, error = fin.done, fin.error

        m.d.comb += self.cmd.ready.eq(0)
        with m.FSM(name="bufio"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                b_hdr = a.write.buffer
                with m.If(self.cmd.valid):
                    m.d.sync += [b_id.eq(b_hdr)] + [
                        reg.eq(by_id(m, b_hdr, vals[reg.name], f"{reg.name}_c"))
                        for reg in (b_wb, b_depth, b_writable, b_wsh, b_maxn)]
                    m.next = "CHECK"
            with m.State("CHECK"):
                off = a.write.offset
                dlen = Signal.like(length, name="dlen")
                n_w = Signal.like(length, name="n_w")
                m.d.comb += [dlen.eq(length - hs_w), n_w.eq(dlen >> b_wsh)]
                n_r = a.read.count
                # one range check: WRITE's element count or READ's
                off_hi = off[DB:] != 0
                n_x = Mux(self.cmd.payload.op == P.Op.READ, n_r, n_w)
                m.d.sync += [c_nobuf.eq(b_id >= nbuf), c_off_gt.eq(off_hi | (off[:DB] > b_depth)),
                             c_dlen.eq(dlen), c_n.eq(n_w),
                             c_wlen_bad.eq(((dlen & (b_wb - 1)) != 0) | (dlen > P.MAX_DATA)),
                             c_oob.eq(off_hi | (off[:DB] + n_x > b_depth)),
                             c_rlen_bad.eq(n_r > b_maxn)]
                m.next = "EXEC"
            with m.State("EXEC"):
                with m.Switch(self.cmd.payload.op):
                    with m.Case(P.Op.INFO):
                        off = a.info.offset
                        total = len(self.info) - fixed
                        tb = total.bit_length()     # offsets up to ``total`` fit
                        rest = Signal(tb)
                        m.d.comb += rest.eq(total - off[:tb])
                        with m.If((off[tb:] != 0) | (off[:tb] > total)):
                            error(P.ErrorCode.OUT_OF_RANGE, off)
                        with m.Else():
                            done(status_ok(m, pay, seg0=(rom_id(specs), 0, fixed),
                                           seg1=(rom_id(specs), off[:tb] + fixed,
                                                 Mux(rest > P.MAX_DATA, P.MAX_DATA, rest))))
                    with m.Case(P.Op.WRITE):
                        with m.If(c_nobuf | ~b_writable):
                            error(P.ErrorCode.BAD_BUFFER, b_id)
                        with m.Elif(c_wlen_bad):
                            error(P.ErrorCode.BAD_LENGTH, c_dlen)
                        with m.Elif(c_oob):
                            error(P.ErrorCode.OUT_OF_RANGE, Mux(c_off_gt, a.write.offset,
                                                                b_depth))
                        with m.Else():
                            m.d.sync += [w_off.eq(a.write.offset[:AW]), w_n.eq(c_n), w_e.eq(0),
                                         w_bi.eq(0), w_acc.eq(0)]
                            m.d.comb += self.bufs.stage_r.addr.eq(hs_w)
                            m.next = "WCOPY"
                    with m.Case(P.Op.READ):
                        with m.If(c_nobuf):
                            error(P.ErrorCode.BAD_BUFFER, b_id)
                        with m.Elif(c_rlen_bad):
                            error(P.ErrorCode.BAD_LENGTH, a.read.count)
                        with m.Elif(c_oob):
                            error(P.ErrorCode.OUT_OF_RANGE, Mux(c_off_gt, a.read.offset,
                                                                b_depth))
                        with m.Else():
                            done(status_ok(m, pay, seg1=(b_id, a.read.offset[:DB],
                                                         a.read.count)))
                    with m.Case(P.Op.RESET):
                        m.d.sync += clr.eq(0)
                        m.next = "CLEAR"
                    with m.Case(P.Op.SESSION):
                        m.d.sync += self.token.eq(a.session.token)
                        done(status_ok(m, pay))
            # WRITE: staged payload -> buffer (the staging RAM answers a clock later)
            with m.State("WCOPY"):
                byte = self.bufs.stage_r.data
                nxt = Signal(16)
                m.d.comb += [nxt.eq(hs_w + (w_e << b_wsh) + w_bi + 1),
                             self.bufs.stage_r.addr.eq(nxt)]
                full = Signal(32)
                m.d.comb += full.eq(Mux(b_wb == 1, byte,
                                        Mux(b_wb == 2, Cat(w_acc[:8], byte),
                                            Cat(w_acc[:24], byte))))
                with m.If(w_e == w_n):
                    done(status_ok(m, pay, fix=w_n,
                                   nfix=P.RESPONSES[P.Op.WRITE].header_size))
                with m.Else():
                    for k in range(3):
                        with m.If(w_bi == k):
                            m.d.sync += w_acc[8 * k: 8 * k + 8].eq(byte)
                    with m.If(w_bi == b_wb - 1):
                        m.d.comb += [wr_en.eq(1), wr_addr.eq(w_off + w_e), wr_data.eq(full)]
                        m.d.sync += [w_e.eq(w_e + 1), w_bi.eq(0)]
                    with m.Else():
                        m.d.sync += w_bi.eq(w_bi + 1)
            # RESET: clear every buffer, then the other engines' state
            with m.State("CLEAR"):
                m.d.comb += clearing.eq(1)
                m.d.sync += clr.eq(clr + 1)
                with m.If(clr == max_depth - 1):
                    m.d.comb += self.soft_reset.eq(1)
                    done(status_ok(m, pay))
            fin.done_state()
        return m
