"""The command executor: frames in, one engine per command, response descriptors out.

The executor parses frames (:class:`~hbfp_hw.gateware.cmd_decoder.FrameDecoder`), stages
the payload in the buffer manager's staging RAM, applies the checks every command shares
(replayed request, ``UNKNOWN_OPCODE``, ``BAD_LENGTH``: the emulator's order), hands the
command to the engine that owns its opcode and turns the engine's status into a response
descriptor for the :class:`~hbfp_hw.gateware.response.ResponseEncoder`. It knows opcodes
and field layouts only through :mod:`hbfp_hw.protocol`; which engine runs an opcode is
the ``ops`` table it is built with.

Ports
-----
``i``: ``In(stream.Signature(8))``: host bytes.
``e<k>_cmd`` / ``e<k>_status``: command and status streams of engine ``k``. The command
payload is broadcast and holds from the command's handshake to its status handshake;
``valid`` goes to the selected engine only.
``desc``: ``Out(stream.Signature(response_layout()))``: the answer to send; the encoder
takes it (``ready``) once the frame is out.
``owner``: ``Out``: the buffer client to connect (the selected engine, or the encoder,
client ``engines``, while an answer is sent).
``stage_w``: ``In(WritePort.Signature)``: request payload bytes into the staging RAM.
``busy``: high from a frame's end to its answer's last byte.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P

from .cmd_decoder import FrameDecoder, crc32_byte_matrix
from .engine import FIX_BYTES, cmd_layout, seg_layout, status_layout

__all__ = ["Executor", "response_layout", "crc_next"]


def response_layout() -> data.StructLayout:
    """A response descriptor: header fields, fixed bytes, two data segments, length."""
    return data.StructLayout({
        "seq": 8, "op": 8, "fix": 8 * FIX_BYTES, "nfix": range(FIX_BYTES + 1),
        "seg0": seg_layout(), "seg1": seg_layout(), "length": 16})


def crc_next(m: Module, crc, byte) -> Signal:
    """The CRC-32 register after ``byte`` (a parity network per bit)."""
    out = Signal(32)
    for j, (sm, bm) in enumerate(crc32_byte_matrix()):
        acc = Const(0, 1)
        for i in range(32):
            if sm >> i & 1:
                acc = acc ^ crc[i]
        for i in range(8):
            if bm >> i & 1:
                acc = acc ^ byte[i]
        m.d.comb += out[j].eq(acc)
    return out


class Executor(wiring.Component):
    """Frame decoding, shared checks, dispatch to engines, replay record.

    Parameters
    ----------
    ops
        ``{P.Op: engine index}`` for every opcode of the protocol.
    engines
        Number of engines.
    specs
        The buffer map (answer lengths: elements x wire bytes per buffer).
    idle_cycles
        Partial-frame timeout in clocks.
    """

    def __init__(self, *, ops: dict, engines: int, specs, idle_cycles: int) -> None:
        missing = set(P.Op) - set(ops)
        if missing:
            raise ValueError(f"no engine for opcodes {sorted(o.name for o in missing)}")
        bad = {o: k for o, k in ops.items() if not 0 <= k < engines}
        if bad:
            raise ValueError(f"engine index out of range [0, {engines - 1}]: {bad}")
        self.ops, self.engines, self.specs = dict(ops), engines, list(specs)
        self.idle_cycles = idle_cycles
        members = {"i": In(stream.Signature(8)),
                   "desc": Out(stream.Signature(response_layout())),
                   "owner": Out(range(engines + 1)),
                   "stage_w": In(memory.WritePort.Signature(
                       addr_width=max(1, (P.MAX_PAYLOAD - 1).bit_length()), shape=8)),
                   "busy": Out(1)}
        for k in range(engines):
            members[f"e{k}_cmd"] = Out(stream.Signature(cmd_layout()))
            members[f"e{k}_status"] = In(stream.Signature(status_layout()))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        E = self.engines
        m.submodules.dec = dec = FrameDecoder(idle_cycles=self.idle_cycles)
        idle = Signal()
        m.d.comb += [dec.i.payload.eq(self.i.payload), dec.i.valid.eq(self.i.valid),
                     dec.stall.eq(~idle), self.i.ready.eq(dec.i.ready), dec.o.ready.eq(1)]

        # ---- payload staging and the request header -------------------------------
        HDR = max(L.header_size for L in P.REQUESTS.values())
        hdr = Signal(8 * HDR)
        pcount = Signal(range(P.MAX_PAYLOAD + 1))
        # staged only while no command runs (the decoder is stalled then; the gate keeps
        # the header and the staging RAM unchanged under any decoder state)
        take = Signal()
        m.d.comb += [take.eq(dec.o.valid & idle),
                     self.stage_w.addr.eq(pcount), self.stage_w.data.eq(dec.o.payload),
                     self.stage_w.en.eq(take)]
        with m.If(take):
            m.d.sync += pcount.eq(pcount + 1)
            for k in range(HDR):
                with m.If(pcount == k):
                    m.d.sync += hdr[8 * k: 8 * k + 8].eq(dec.o.payload)
        with m.If(dec.frame_ok | dec.frame_bad | dec.abort | dec.oversize):
            m.d.sync += pcount.eq(0)
        # the frame's header and received CRC: the decoder holds them from its strobe
        # until the executor is idle again (it takes no byte outside a payload while
        # stalled). A request repeats the last one when seq, opcode, length and the frame
        # CRC are equal: for equal header bytes and length, equal frame CRCs mean equal
        # payload CRCs (the CRC is affine in the payload bits)
        seq, opc, length, fcrc = dec.seq, dec.opcode, dec.length, dec.fcs

        # ---- dispatch ----------------------------------------------------------------
        sel = Signal(range(max(E, 2)))
        sel_c = Signal.like(sel)
        op_valid, len_ok = Signal(), Signal()
        with m.Switch(opc):
            for op in P.Op:
                with m.Case(int(op)):
                    lay = P.REQUESTS[op]
                    m.d.comb += [op_valid.eq(1), sel_c.eq(self.ops[op]),
                                 len_ok.eq((length >= lay.header_size) if lay.data
                                           else (length == lay.header_size))]
        cmd = Signal(cmd_layout())
        m.d.comb += [cmd.op.eq(opc), cmd.length.eq(length), cmd.args.eq(hdr)]
        cmd_valid = Signal()
        cmd_ready, st_valid = Signal(), Signal()
        st = Signal(status_layout())
        for k in range(E):
            c, s = getattr(self, f"e{k}_cmd"), getattr(self, f"e{k}_status")
            m.d.comb += [c.payload.eq(cmd), c.valid.eq(cmd_valid & (sel == k))]
            with m.If(sel == k):
                m.d.comb += [cmd_ready.eq(c.ready), st_valid.eq(s.valid), st.eq(s.payload)]
        st_ready = Signal()
        for k in range(E):
            m.d.comb += getattr(self, f"e{k}_status").ready.eq(st_ready & (sel == k))

        # ---- response descriptor and the replay record --------------------------------
        # ``desc`` holds the last answer sent by SEND: a replayed request is answered from
        # it as it is (its key equals the last one: seq and opcode are the frame's, only
        # ``desc_err``, an engine's error answer, is kept of them). The executor's own
        # errors are not written into it: ``x_err`` (kept for a replay: UNKNOWN_OPCODE,
        # detail the opcode, or BAD_LENGTH, detail the length) and ``bad`` (a bad CRC,
        # not recorded) select an error descriptor built from the frame's header (its
        # fields beyond the six bytes sent left as they are). An error answer's segments
        # are only emptied (count 0).
        desc = Signal(response_layout())
        desc_err, bad = Signal(), Signal()
        x_err = Signal(2)     # 0: desc, 1: UNKNOWN_OPCODE, 2: BAD_LENGTH
        last_valid = Signal()
        last_key = Signal(8 + 8 + 16 + 32)
        m.d.comb += [self.desc.payload.eq(desc), self.desc.payload.seq.eq(seq),
                     self.desc.payload.op.eq(Mux(desc_err | bad | (x_err != 0),
                                                 P.ERROR_OPCODE, opc | P.RESPONSE_FLAG))]
        with m.If(bad | (x_err != 0)):
            code = Signal(8, name="x_code")
            detail = Signal(32, name="x_detail")
            m.d.comb += [code.eq(Mux(bad, int(P.ErrorCode.BAD_CRC),
                                     Mux(x_err[1], int(P.ErrorCode.BAD_LENGTH),
                                         int(P.ErrorCode.UNKNOWN_OPCODE)))),
                         detail.eq(Mux(bad | x_err[1], length, opc))]
            err_fix = Cat(code, opc, detail)
            m.d.comb += [self.desc.payload.fix[:len(err_fix)].eq(err_fix),
                         self.desc.payload.nfix.eq(P.ERROR_LAYOUT.header_size),
                         self.desc.payload.length.eq(P.ERROR_LAYOUT.header_size),
                         self.desc.payload.seg0.count.eq(0),
                         self.desc.payload.seg1.count.eq(0)]
        wsh = [s.wire_bytes.bit_length() - 1 for s in self.specs] + [0]  # + INFO ROM

        def seg_bytes(seg):
            out = Signal(32, name="seg_bytes")
            with m.Switch(seg.buf):
                for k, sh in enumerate(wsh):
                    with m.Case(k):
                        m.d.comb += out.eq(seg.count << sh)
            return out

        def error(code, detail):
            """An engine's error answer, registered now and sent after one clock in
            ERROR."""
            m.d.sync += [desc_err.eq(1), x_err.eq(0),
                         desc.fix.eq(Cat(code, opc, detail)),
                         desc.nfix.eq(P.ERROR_LAYOUT.header_size),
                         desc.length.eq(P.ERROR_LAYOUT.header_size),
                         desc.seg0.count.eq(0), desc.seg1.count.eq(0)]
            m.next = "ERROR"

        with m.FSM(name="exec"):
            with m.State("IDLE"):
                m.d.comb += idle.eq(1)
                with m.If(dec.frame_ok):
                    m.d.sync += bad.eq(0)
                    m.next = "DECODE"
                with m.Elif(dec.frame_bad):
                    m.d.sync += bad.eq(1)
                    m.next = "SEND"
            with m.State("DECODE"):
                key = Cat(seq, opc, length, fcrc)
                m.d.sync += sel.eq(sel_c)
                with m.If(last_valid & (key == last_key)):
                    m.next = "SEND"
                with m.Else():
                    m.d.sync += [last_valid.eq(1), last_key.eq(key)]
                    with m.If(~op_valid):
                        m.d.sync += x_err.eq(1)
                        m.next = "ERROR"
                    with m.Elif(~len_ok):
                        m.d.sync += x_err.eq(2)
                        m.next = "ERROR"
                    with m.Else():
                        m.next = "DISPATCH"
            with m.State("DISPATCH"):
                m.d.comb += [cmd_valid.eq(1), self.owner.eq(sel)]
                with m.If(cmd_ready):
                    m.next = "WAIT"
            with m.State("WAIT"):
                m.d.comb += [self.owner.eq(sel), st_ready.eq(1)]
                with m.If(st_valid):
                    with m.If(st.code != 0):
                        error(st.code, st.detail)
                    with m.Else():
                        m.d.sync += [desc_err.eq(0), x_err.eq(0),
                                     desc.fix.eq(st.fix), desc.nfix.eq(st.nfix),
                                     desc.seg0.eq(st.seg0), desc.seg1.eq(st.seg1)]
                        m.next = "LENGTH"
            with m.State("LENGTH"):
                m.d.sync += desc.length.eq(desc.nfix + seg_bytes(desc.seg0)
                                           + seg_bytes(desc.seg1))
                m.next = "SEND"
            # an error answer is registered (``desc`` / ``x_err``) and sent a clock later
            with m.State("ERROR"):
                m.next = "SEND"
            # a new answer, a replay (``desc`` as it is) or a bad CRC's answer (``bad``)
            with m.State("SEND"):
                m.d.comb += [self.desc.valid.eq(1), self.owner.eq(E)]
                with m.If(self.desc.ready):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~idle)
        return m
