"""The engine interface of the accelerator top: command in, status out, buffer ports.

Every command the top executes runs in an *engine*, a ``wiring.Component`` with

``cmd``: ``In(stream.Signature(cmd_layout()))``
    One beat per command: ``op``, ``length`` (payload bytes) and ``args``, the request
    header decoded through :func:`args_layout` (``cmd.args.gemm.a_rows`` ...). The
    layouts come from :data:`hbfp_hw.protocol.REQUESTS`; field order and little-endian
    packing make the payload's first bytes decode for free.
``status``: ``Out(stream.Signature(status_layout()))``
    One beat when the command is done: ``code`` 0 (OK) or a
    :class:`~hbfp_hw.protocol.ErrorCode` with its ``detail``, and for OK the answer: the
    ``nfix`` fixed-field bytes in ``fix`` (little endian), then ``seg0.count`` elements of
    buffer ``seg0.buf`` from ``seg0.offset``, then ``seg1`` likewise. Buffer ids are those
    of :func:`hbfp_hw.protocol.buffer_map`; id ``len(buffer_map)`` is the INFO ROM.
``bufs``: ``Out(buffer_ports(specs, tile))``
    One read and one write port (:class:`amaranth.lib.memory.ReadPort` /
    :class:`~amaranth.lib.memory.WritePort` signatures) per buffer, plus the INFO ROM and
    the request staging RAM. The :class:`~hbfp_hw.gateware.buffers.BufferManager` owns
    the memories and connects the ports of the engine that executes the current command
    (and of the response encoder while it sends the answer).

Mantissa buffers are words of ``tile`` mantissas (one tile row; write enable per lane),
every other buffer one element per word. See ``docs/accelerator.md``, "Adding an engine".
"""

from __future__ import annotations

from amaranth import Signal, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P

__all__ = ["sample_signature", "args_layout", "cmd_layout", "seg_layout", "status_layout",
           "FIX_BYTES",
           "buffer_geometry", "buffer_ports", "port_name", "engine_signature",
           "status_ok", "status_error", "status_register", "EngineStatus", "OptionalEngine",
           "rom_id"]

#: Fixed-field bytes an engine answers with (INFO's fixed fields come from its ROM).
FIX_BYTES = max(max(L.header_size for op, L in P.RESPONSES.items() if op != P.Op.INFO),
                P.ERROR_LAYOUT.header_size)


def sample_signature() -> stream.Signature:
    """A sample port: FP32 bit patterns for the statistics engine, at most one per clock,
    without back-pressure (``always_ready``: the statistics engine takes every beat)."""
    return stream.Signature(32, always_ready=True)


def args_layout(op: P.Op) -> data.StructLayout:
    """The request header of ``op`` as a struct (fields in wire order, little endian)."""
    return data.StructLayout({f.name: unsigned(8 * f.size) for f in P.REQUESTS[op].fields})


def cmd_layout() -> data.StructLayout:
    """A command beat: opcode, payload length and the decoded request header."""
    return data.StructLayout({
        "op": 8, "length": 16,
        "args": data.UnionLayout({op.name.lower(): args_layout(op) for op in P.Op})})


def seg_layout() -> data.StructLayout:
    """A data segment of an answer: ``count`` elements of buffer ``buf`` from ``offset``."""
    return data.StructLayout({"buf": 8, "offset": 32, "count": 16})


def status_layout() -> data.StructLayout:
    """A status beat: ``code`` (0 = OK) and ``detail``, or the answer's description."""
    return data.StructLayout({
        "code": 8, "detail": 32, "fix": unsigned(8 * FIX_BYTES),
        "nfix": range(FIX_BYTES + 1), "seg0": seg_layout(), "seg1": seg_layout()})


def port_name(spec: P.BufferSpec) -> str:
    """Port-group name of a buffer (``op0.man`` -> ``op0_man``)."""
    return spec.name.replace(".", "_")


def buffer_geometry(spec: P.BufferSpec, tile: int) -> tuple[int, int, int | None]:
    """``(word bits, depth in words, write granularity)`` of a buffer's memory."""
    w = 8 * spec.wire_bytes
    if spec.kind in P.LANE_KINDS:
        return w * tile, spec.depth // tile, w
    return w, spec.depth, None


def addr_bits(depth: int) -> int:
    """Address bits of a memory (or index bits of a selection) of ``depth`` entries (at
    least 1)."""
    return max(1, (depth - 1).bit_length())


def rom_id(specs) -> int:
    """The buffer id answers use for the INFO ROM."""
    return len(specs)


def buffer_ports(specs, tile: int, rom_depth: int) -> wiring.Signature:
    """Ports of every buffer as seen by an engine (``Out`` member of the engine).

    Members ``<name>_r`` / ``<name>_w`` per buffer (:func:`port_name`), ``rom_r`` (the INFO
    ROM, bytes) and ``stage_r`` (the request payload staging RAM, bytes).
    """
    members = {}
    for s in specs:
        w, depth, gran = buffer_geometry(s, tile)
        n = port_name(s)
        members[f"{n}_r"] = In(memory.ReadPort.Signature(addr_width=addr_bits(depth),
                                                         shape=unsigned(w)))
        members[f"{n}_w"] = In(memory.WritePort.Signature(addr_width=addr_bits(depth),
                                                          shape=unsigned(w), granularity=gran))
    members["rom_r"] = In(memory.ReadPort.Signature(addr_width=addr_bits(rom_depth), shape=8))
    members["stage_r"] = In(memory.ReadPort.Signature(addr_width=addr_bits(P.MAX_PAYLOAD), shape=8))
    return wiring.Signature(members)


def engine_signature(specs, tile: int, rom_depth: int, **extra) -> dict:
    """Members of an engine component: ``cmd``, ``status``, ``bufs`` and ``extra``."""
    return {"cmd": In(stream.Signature(cmd_layout())),
            "status": Out(stream.Signature(status_layout())),
            "bufs": Out(buffer_ports(specs, tile, rom_depth)), **extra}


def status_ok(m, status_payload, *, fix=None, nfix: int = 0, seg0=None, seg1=None):
    """Statements setting an OK answer on a (registered) status payload.

    ``seg0`` / ``seg1``: ``(buf, offset, count)`` or ``None``.
    """
    st = status_payload
    stmts = [st.code.eq(0), st.detail.eq(0), st.nfix.eq(nfix),
             st.fix.eq(fix if fix is not None else 0)]
    for seg, val in ((st.seg0, seg0), (st.seg1, seg1)):
        if val is None:
            stmts += [seg.buf.eq(0), seg.offset.eq(0), seg.count.eq(0)]
        else:
            stmts += [seg.buf.eq(val[0]), seg.offset.eq(val[1]), seg.count.eq(val[2])]
    return stmts


def status_error(status_payload, code: P.ErrorCode, detail):
    """Statements setting an error status (``detail`` truncated to 32 bits)."""
    st = status_payload
    return [st.code.eq(int(code)), st.detail.eq(detail), st.nfix.eq(0), st.fix.eq(0),
            st.seg0.count.eq(0), st.seg1.count.eq(0)]


def status_register(m, eng) -> tuple[Signal, Signal]:
    """A registered status beat for ``eng``: returns ``(payload, valid)`` signals that
    drive ``eng.status`` (``valid`` clears on the handshake)."""
    pay = Signal(status_layout(), name="st_pay")
    v = Signal(name="st_valid")
    m.d.comb += [eng.status.payload.eq(pay), eng.status.valid.eq(v)]
    with m.If(eng.status.valid & eng.status.ready):
        m.d.sync += v.eq(0)
    return pay, v


class EngineStatus:
    """The status register of an engine and the end of its command FSM.

    ``done(stmts)`` (inside an FSM state) sets the registered status beat with ``stmts``
    and goes to ``DONE``; ``error(code, detail)`` does so with an error status;
    :meth:`done_state` adds the ``DONE`` state, which returns to ``IDLE`` on the status
    handshake.
    """

    def __init__(self, m, eng) -> None:
        self.m, self.eng = m, eng
        self.pay, self.valid = status_register(m, eng)

    def done(self, stmts) -> None:
        self.m.d.sync += list(stmts) + [self.valid.eq(1)]
        self.m.next = "DONE"

    def error(self, code: P.ErrorCode, detail) -> None:
        self.done(status_error(self.pay, code, detail))

    def done_state(self) -> None:
        with self.m.State("DONE"):
            with self.m.If(self.eng.status.ready):
                self.m.next = "IDLE"

    def unsupported_only(self, name: str):
        """The whole FSM of an engine that is not built (its config field is 0): every
        command answers ``UNSUPPORTED`` detail 0. Returns the module."""
        with self.m.FSM(name=name):
            with self.m.State("IDLE"):
                self.m.d.comb += self.eng.cmd.ready.eq(1)
                with self.m.If(self.eng.cmd.valid):
                    self.error(P.ErrorCode.UNSUPPORTED, 0)
            self.done_state()
        return self.m


class OptionalEngine(wiring.Component):
    """Base of an engine built only when its config field is non-zero.

    A subclass sets ``lanes_of`` to the protocol function giving that field
    (e.g. ``staticmethod(P.luq_lanes)``); ``self.lanes`` is its value, and the
    subclass's ``elaborate`` returns ``EngineStatus(...).unsupported_only(name)``
    when it is 0.
    """

    lanes_of = None

    def __init__(self, config, specs, *, rom_depth: int) -> None:
        self.config, self.specs = config, list(specs)
        self.lanes = type(self).lanes_of(config)
        super().__init__(engine_signature(self.specs, config.tile, rom_depth))
