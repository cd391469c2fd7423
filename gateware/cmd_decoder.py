"""Byte-stream frame parser and CRC checker for the wire protocol (Amaranth 0.5).

Everything comes from :mod:`hbfp_hw.protocol`: the delimiter and the byte stuffing, the
header layout, the payload limit and the CRC (the byte-wide CRC-32 update is derived as
a GF(2) matrix from :func:`hbfp_hw.protocol.crc32_update`, not written by hand).

Ports
-----
``i``: ``In(stream.Signature(8))``
    Received bytes (from the UART PHY or the simulation byte port).
``o``: ``Out(stream.Signature(8))``
    Payload bytes of the current frame, in order. The CRC is known only after the last
    one, so the consumer stages them and commits on ``frame_ok``.
``frame_ok`` / ``frame_bad``: ``Out(1)``
    One-cycle strobes after the CRC: good frame / CRC mismatch. ``oversize`` strobes
    on a header whose length exceeds ``MAX_PAYLOAD``, ``abort`` when a partial frame
    is abandoned after the idle timeout: the consumer drops what it staged.
``seq``, ``opcode``, ``length``: ``Out``
    Header of the current frame, valid from the payload on and at the strobe.
``fcs``: ``Out(32)``
    The frame's received CRC (its four bytes, little endian), valid at ``frame_ok`` /
    ``frame_bad``. The header and ``fcs`` hold while ``stall`` is high from the strobe
    on (no byte is taken outside a payload then).
``stall``: ``In(1)``
    Take no byte outside a payload (the executor is running a command). Bytes offered
    meanwhile do not count towards the idle timeout.

A frame starts at the delimiter; escaped bytes are unstuffed on the fly (the escape
byte is consumed without output). A delimiter inside a partial frame abandons it
(``abort``) and starts the next one; so does ``idle_cycles`` clocks in which no byte is
offered on ``i`` (the protocol's line-idle timeout; a byte waiting while ``o`` is stalled
does not count as idle). Bytes outside a frame are skipped.
"""


from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P

__all__ = ["FrameDecoder", "crc32_byte_matrix"]


def crc32_byte_matrix() -> list[tuple[int, int]]:
    """For each of the 32 next-state bits: (mask over state bits, mask over byte bits).

    ``crc32_update`` is linear over GF(2) in (state, byte), so bit ``j`` of the next
    state is the parity of ``state & smask[j]`` and ``byte & bmask[j]``.
    """
    s_img = [P.crc32_update(1 << i, 0) for i in range(32)]
    b_img = [P.crc32_update(0, 1 << i) for i in range(8)]
    out = []
    for j in range(32):
        sm = sum(1 << i for i in range(32) if s_img[i] >> j & 1)
        bm = sum(1 << i for i in range(8) if b_img[i] >> j & 1)
        out.append((sm, bm))
    return out


class FrameDecoder(wiring.Component):
    """Frame parser: delimiter, unstuffing, header, payload pass-through, CRC-32 check."""

    i: In(stream.Signature(8))
    o: Out(stream.Signature(8))
    frame_ok: Out(1)
    frame_bad: Out(1)
    oversize: Out(1)
    abort: Out(1)
    seq: Out(8)
    opcode: Out(8)
    length: Out(16)
    fcs: Out(32)
    stall: In(1)

    def __init__(self, *, idle_cycles: int = 1 << 16) -> None:
        if not isinstance(idle_cycles, int) or not 1 <= idle_cycles <= 1 << 30:
            raise ValueError(f"idle_cycles={idle_cycles!r} is out of range; accepted range "
                             f"is [1, {1 << 30}]")
        self.idle_cycles = idle_cycles
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        crc = Signal(32, init=0xFFFFFFFF)
        crc_next = Signal(32)
        byte = Signal(8)        # the received byte, unstuffed
        for j, (sm, bm) in enumerate(crc32_byte_matrix()):
            terms = [crc[i] for i in range(32) if sm >> i & 1]
            terms += [byte[i] for i in range(8) if bm >> i & 1]
            acc = Const(0, 1)
            for t in terms:
                acc = acc ^ t
            m.d.comb += crc_next[j].eq(acc)

        count = Signal(range(P.MAX_PAYLOAD + 1))     # payload bytes (length checked)
        rx_crc = self.fcs
        idle = Signal(range(self.idle_cycles + 1))
        take = Signal()  # a data byte (unstuffed) is consumed this cycle
        esc = Signal()   # the previous byte was the escape

        raw = self.i.payload
        is_delim = raw == P.DELIM
        is_esc = (raw == P.ESC) & ~esc
        m.d.comb += byte.eq(Mux(esc, raw ^ P.ESC_XOR, raw))
        got = self.i.valid & self.i.ready
        m.d.comb += take.eq(got & ~is_delim & ~is_esc)
        m.d.sync += [self.frame_ok.eq(0), self.frame_bad.eq(0), self.oversize.eq(0),
                     self.abort.eq(0)]
        with m.If(got):
            m.d.sync += esc.eq(is_esc)
        # the line is idle only while no byte is offered: a byte waiting for a busy
        # consumer (``o`` stalled, the executor running a command) is not idleness
        with m.If(self.i.valid):
            m.d.sync += idle.eq(0)
        with m.Elif(idle != self.idle_cycles):
            m.d.sync += idle.eq(idle + 1)

        def restart(mid_frame: bool):
            """A delimiter: a new frame starts (a partial one is abandoned)."""
            m.d.sync += [crc.eq(0xFFFFFFFF), esc.eq(0)]
            if mid_frame:
                m.d.sync += self.abort.eq(1)
            m.next = "LEN0"

        with m.FSM() as fsm:
            with m.State("HUNT"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(got & is_delim):
                    restart(False)
            for state, nxt, target in (("LEN0", "LEN1", None), ("LEN1", "SEQ", None),
                                       ("SEQ", "OP", self.seq), ("OP", "PAYLOAD", self.opcode)):
                with m.State(state):
                    m.d.comb += self.i.ready.eq(1)
                    with m.If(got & is_delim):
                        restart(state != "LEN0")
                    with m.Elif(take):
                        m.d.sync += crc.eq(crc_next)
                        if state == "LEN0":
                            m.d.sync += self.length[:8].eq(byte)
                        elif state == "LEN1":
                            m.d.sync += self.length[8:].eq(byte)
                        else:
                            m.d.sync += target.eq(byte)
                        m.next = nxt
                        if state == "LEN1":
                            with m.If(Cat(self.length[:8], byte) > P.MAX_PAYLOAD):
                                m.d.sync += self.oversize.eq(1)
                                m.next = "HUNT"
                        if state == "OP":
                            m.d.sync += count.eq(0)
                            with m.If(self.length == 0):
                                m.next = "CRC"
                    with m.Elif(~self.i.valid & (idle == self.idle_cycles)):
                        m.d.sync += [self.abort.eq(1), esc.eq(0)]
                        m.next = "HUNT"
            with m.State("PAYLOAD"):
                # escapes and delimiters are taken without waiting for the consumer
                data_byte = ~is_delim & ~is_esc
                m.d.comb += [self.o.payload.eq(byte),
                             self.o.valid.eq(self.i.valid & data_byte),
                             self.i.ready.eq(Mux(data_byte, self.o.ready, 1))]
                with m.If(got & is_delim):
                    restart(True)
                with m.Elif(take):
                    m.d.sync += [crc.eq(crc_next), count.eq(count + 1)]
                    with m.If(count + 1 == self.length):
                        m.d.sync += count.eq(0)
                        m.next = "CRC"
                with m.Elif(~self.i.valid & (idle == self.idle_cycles)):
                    m.d.sync += [self.abort.eq(1), esc.eq(0)]
                    m.next = "HUNT"
            with m.State("CRC"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(got & is_delim):
                    restart(True)
                with m.Elif(take):
                    m.d.sync += [rx_crc.eq(Cat(rx_crc[8:], byte)), count.eq(count + 1)]
                    with m.If(count == P.CRC_BYTES - 1):
                        m.next = "CHECK"
                with m.Elif(~self.i.valid & (idle == self.idle_cycles)):
                    m.d.sync += [self.abort.eq(1), esc.eq(0)]
                    m.next = "HUNT"
            with m.State("CHECK"):
                with m.If(rx_crc == (crc ^ 0xFFFFFFFF)):
                    m.d.sync += self.frame_ok.eq(1)
                with m.Else():
                    m.d.sync += self.frame_bad.eq(1)
                m.next = "HUNT"
        # the consumer is busy (between frames): take nothing, time nothing out. A payload
        # already streaming is not stopped, so ``o`` keeps the stream rules whatever
        # ``stall`` does
        with m.If(self.stall & ~fsm.ongoing("PAYLOAD")):
            m.d.comb += self.i.ready.eq(0)
        return m
