"""The response encoder: a response descriptor in, one answer frame out.

Sends the delimiter, ``LEN``, ``SEQ``, ``OP``, the session token (``token``), the
descriptor's fixed bytes, ``seg0.count`` elements of buffer ``seg0.buf`` from
``seg0.offset``, then ``seg1`` likewise (each element as its buffer's wire bytes, little
endian; mantissa buffers lane by lane), and the CRC-32, every byte after the delimiter
stuffed (:func:`hbfp_hw.protocol.stuff`: a byte equal to the delimiter or the escape
goes out as the escape and the byte XOR 0x20, one more clock) in a registered output
stage. The descriptor's
``length`` counts the answer without the token. It reads the buffers as a
buffer-manager client; it takes the descriptor (``desc.ready``) after the frame's last
byte.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P

from .engine import FIX_BYTES, addr_bits, buffer_ports, port_name
from .executor import crc_next, response_layout

__all__ = ["ResponseEncoder"]


class ResponseEncoder(wiring.Component):
    """Answer frames from response descriptors.

    Parameters
    ----------
    specs
        The buffer map; id ``len(specs)`` is the INFO ROM.
    tile
        Mantissas per mantissa-buffer word.
    rom_depth
        Bytes in the INFO ROM.
    """

    def __init__(self, specs, *, tile: int, rom_depth: int) -> None:
        self.specs, self.tile, self.rom_depth = list(specs), tile, rom_depth
        super().__init__({"desc": In(stream.Signature(response_layout())),
                          "token": In(8 * P.SESSION_BYTES),
                          "o": Out(stream.Signature(8)),
                          "bufs": Out(buffer_ports(self.specs, tile, rom_depth))})

    def elaborate(self, platform):
        m = Module()
        specs, T, d = self.specs, self.tile, self.desc.payload
        tsh = T.bit_length() - 1
        # element being read (data of the address presented last): as wide as the largest
        # buffer's (or the ROM's) element addresses (segments lie inside their buffer)
        ea_bits = addr_bits(max([s.depth for s in specs] + [self.rom_depth]))
        ea = Signal(ea_bits)
        ea_next = Signal(ea_bits)
        m.d.comb += ea_next.eq(ea)
        m.d.sync += ea.eq(ea_next)
        lane = Signal(max(tsh, 1))
        m.d.sync += lane.eq(ea_next)
        bufs = self.bufs
        for s in specs:
            rp = getattr(bufs, f"{port_name(s)}_r")
            mant = s.kind in P.LANE_KINDS
            m.d.comb += rp.addr.eq(ea_next >> tsh if mant else ea_next)
        m.d.comb += bufs.rom_r.addr.eq(ea_next)

        crc, byte = Signal(32), Signal(8)
        crc_n = crc_next(m, crc, byte)
        n_hdr = P.HEADER_BYTES + P.SESSION_BYTES
        idx = Signal(range(max(n_hdr, FIX_BYTES + 1, P.CRC_BYTES)))
        bi = Signal(2)
        rem = Signal(17)
        seg = Signal()
        src_wb = Signal(3)
        src_byte = Signal(8)
        with m.Switch(Mux(seg, d.seg1.buf, d.seg0.buf)):
            for i, s in enumerate(specs):
                with m.Case(i):
                    data = getattr(bufs, f"{port_name(s)}_r").data
                    w = 8 * s.wire_bytes
                    if s.kind in P.LANE_KINDS:
                        el = Signal(w, name=f"lane_{i}")
                        m.d.comb += el.eq(data.word_select(lane[:tsh] if tsh else 0, w))
                        data = el
                    m.d.comb += [src_wb.eq(s.wire_bytes),
                                 src_byte.eq(data.word_select(bi, 8) if s.wire_bytes > 1
                                             else data)]
            with m.Case(len(specs)):
                m.d.comb += [src_wb.eq(1), src_byte.eq(bufs.rom_r.data)]
        # byte stuffing in a registered output stage: ``take`` (the stage can load the
        # FSM's ``byte``) depends on the stage's state and ``o.ready`` only, never on the
        # byte read from a buffer, so no path runs from block RAM data to its address
        f_valid = Signal()      # the FSM offers ``byte``
        is_delim = Signal()     # ``byte`` is the frame's delimiter: sent as it is
        full = Signal()         # the stage holds a byte
        esc_first = Signal()    # ... and sends the escape before it
        held = Signal(8)
        need = ((byte == P.DELIM) | (byte == P.ESC)) & ~is_delim
        take = Signal()
        m.d.comb += [self.o.valid.eq(full),
                     self.o.payload.eq(Mux(esc_first, P.ESC, held)),
                     take.eq(~full | (self.o.ready & ~esc_first))]
        with m.If(self.o.valid & self.o.ready):
            with m.If(esc_first):
                m.d.sync += esc_first.eq(0)
            with m.Else():
                m.d.sync += full.eq(0)
        with m.If(f_valid & take):
            m.d.sync += [full.eq(1), esc_first.eq(need),
                         held.eq(Mux(need, byte ^ P.ESC_XOR, byte))]
        hdr_bytes = Cat(Const(P.DELIM, 8), (d.length + P.SESSION_BYTES)[:16], d.seq, d.op,
                        self.token)
        with m.FSM(name="enc"):
            with m.State("IDLE"):
                with m.If(self.desc.valid):
                    m.d.comb += ea_next.eq(Mux(d.seg0.count != 0, d.seg0.offset,
                                               d.seg1.offset))
                    m.d.sync += idx.eq(0)
                    m.next = "E_HDR"
            with m.State("E_HDR"):
                m.d.comb += [byte.eq(hdr_bytes.word_select(idx[:addr_bits(n_hdr)], 8)),
                             f_valid.eq(1), is_delim.eq(idx == 0)]
                with m.If(take):
                    with m.If(idx >= 1):
                        m.d.sync += crc.eq(crc_n)
                    with m.Else():
                        m.d.sync += crc.eq(0xFFFFFFFF)
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx == n_hdr - 1):
                        m.d.sync += [idx.eq(0), seg.eq(d.seg0.count == 0), bi.eq(0),
                                     rem.eq(Mux(d.seg0.count != 0, d.seg0.count,
                                                d.seg1.count))]
                        m.next = "E_FIX"
            with m.State("E_FIX"):
                m.d.comb += byte.eq(d.fix.word_select(idx[:addr_bits(FIX_BYTES)], 8))
                with m.If(idx == d.nfix):
                    m.d.sync += idx.eq(0)
                    m.next = "E_DATA"
                with m.Else():
                    m.d.comb += f_valid.eq(1)
                    with m.If(take):
                        m.d.sync += [crc.eq(crc_n), idx.eq(idx + 1)]
            with m.State("E_DATA"):
                m.d.comb += byte.eq(src_byte)
                with m.If(rem == 0):
                    with m.If(~seg):
                        m.d.sync += [seg.eq(1), rem.eq(d.seg1.count)]
                        m.d.comb += ea_next.eq(d.seg1.offset)
                    with m.Else():
                        m.next = "E_CRC"
                with m.Else():
                    m.d.comb += f_valid.eq(1)
                    with m.If(take):
                        m.d.sync += crc.eq(crc_n)
                        with m.If(bi == src_wb - 1):
                            m.d.sync += [bi.eq(0), rem.eq(rem - 1)]
                            m.d.comb += ea_next.eq(ea + 1)
                        with m.Else():
                            m.d.sync += bi.eq(bi + 1)
            with m.State("E_CRC"):
                final = crc ^ 0xFFFFFFFF
                m.d.comb += [f_valid.eq(1),
                             byte.eq(final.word_select(idx[:addr_bits(P.CRC_BYTES)], 8))]
                with m.If(take):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx == P.CRC_BYTES - 1):
                        m.d.sync += idx.eq(0)
                        m.d.comb += self.desc.ready.eq(1)
                        m.next = "IDLE"
        return m
