"""The buffer manager: owns every memory of the accelerator top.

It holds one :class:`amaranth.lib.memory.Memory` per entry of
:func:`hbfp_hw.protocol.buffer_map` (mantissa buffers as words of ``tile`` mantissas with
a write enable per lane), the INFO ROM and the request staging RAM. Each *client* (an
engine or the response encoder) has the same set of ports (:func:`~hbfp_hw.gateware.
engine.buffer_ports`); ``owner`` selects the client whose ports reach the memories. The
executor sets it per command, so ownership is static for a command's lifetime and no
arbiter sits on a memory path. Read data go to every client.

Ports
-----
``c0`` ... ``c<n-1>``: ``In(buffer_ports(...))``, one per client.
``owner``: ``In(range(n))``.
``stage_w``: ``Out(WritePort.Signature)``: the executor stages request payload bytes.

Read-during-write: no engine reads a buffer it writes in the same command when the buffer
map holds only the kinds of the buffer I/O, QUANTIZE, statistics and GEMM / CONV engines
(FP32, mantissa, exponent, reference exponent): the owner's other read ports are not
used, and a new owner presents an address before it uses read data. Those memories (and
the staging RAM, written only while no command runs) carry ``no_rw_check``, so synthesis
needs no logic to give a read in a write's clock the old data (block RAMs such as the
iCE40's leave that case undefined); simulation is unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth import ClockSignal, Instance, Module, Mux, Signal, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P

from .engine import buffer_geometry, buffer_ports, port_name

__all__ = ["BufferManager"]


class BufferManager(wiring.Component):
    """Memories of the buffer map, the INFO ROM and the staging RAM, shared by clients.

    Parameters
    ----------
    specs
        :func:`hbfp_hw.protocol.buffer_map` of the configuration.
    tile
        Mantissas per mantissa-buffer word.
    info
        The INFO ROM contents.
    clients
        Number of client port groups.
    stage_single_port
        Give the staging RAM one address for writes and reads (``AcceleratorConfig.
        stage_ram`` ``"single"``): an ``SB_SPRAM256KA`` when elaborated for an iCE40UP
        platform, elsewhere (simulation, plain Verilog) a memory that behaves the same
        (no read in a write clock, the read data hold).
    """

    def __init__(self, specs, *, tile: int, info: bytes, clients: int,
                 stage_single_port: bool = False) -> None:
        if clients < 1:
            raise ValueError(f"clients={clients} is out of range; accepted range is [1, 64]")
        self.specs, self.tile, self.info, self.clients = list(specs), tile, bytes(info), clients
        self.stage_single_port = bool(stage_single_port)
        sig = buffer_ports(self.specs, tile, len(self.info))
        members = {f"c{k}": In(sig) for k in range(clients)}
        members["owner"] = In(range(clients))
        members["stage_w"] = Out(memory.WritePort.Signature(
            addr_width=max(1, (P.MAX_PAYLOAD - 1).bit_length()), shape=8))
        super().__init__(members)

    def client(self, k: int):
        return getattr(self, f"c{k}")

    def _share(self, m, rp, wp, name):
        """Connect memory ports ``rp`` / ``wp`` to member ``name`` of the owner's ports."""
        cl = [self.client(k) for k in range(self.clients)]
        for c in cl:
            m.d.comb += getattr(c, f"{name}_r").data.eq(rp.data)
        with m.Switch(self.owner):
            for k, c in enumerate(cl):
                with m.Case(k):
                    m.d.comb += rp.addr.eq(getattr(c, f"{name}_r").addr)
                    if wp is not None:
                        w = getattr(c, f"{name}_w")
                        m.d.comb += [wp.addr.eq(w.addr), wp.data.eq(w.data), wp.en.eq(w.en)]

    #: buffer kinds no engine reads while it writes them (module docstring)
    NO_RW_KINDS = (P.BufferKind.FP32, P.BufferKind.MANTISSA, P.BufferKind.EXPONENT,
                   P.BufferKind.EREF)

    def elaborate(self, platform):
        m = Module()
        no_rw = all(s.kind in self.NO_RW_KINDS for s in self.specs)
        attrs = {"no_rw_check": 1} if no_rw else None
        for s in self.specs:
            w, depth, gran = buffer_geometry(s, self.tile)
            mem = memory.Memory(shape=unsigned(w), depth=depth, init=[], attrs=attrs)
            m.submodules[f"buf_{port_name(s)}"] = mem
            self._share(m, mem.read_port(), mem.write_port(granularity=gran), port_name(s))
        m.submodules.info_rom = rom = memory.Memory(shape=8, depth=len(self.info),
                                                    init=list(self.info))
        self._share(m, rom.read_port(), None, "rom")
        if not self.stage_single_port:
            m.submodules.stage = stage = memory.Memory(shape=8, depth=P.MAX_PAYLOAD, init=[],
                                                       attrs={"no_rw_check": 1})
            wiring.connect(m, wiring.flipped(self.stage_w), stage.write_port())
            self._share(m, stage.read_port(), None, "stage")
            return m
        # one address for both ports: the executor stages only while no command runs and
        # the engines read only while one runs; no read in a write clock (the read data
        # holds, as an iCE40 SPRAM's output does)
        aw = max(1, (P.MAX_PAYLOAD - 1).bit_length())
        owner_r = SimpleNamespace(addr=Signal(aw, name="stage_r_addr"),
                                  data=Signal(8, name="stage_r_data"))
        self._share(m, owner_r, None, "stage")
        addr = Signal(aw, name="stage_addr")
        w = self.stage_w
        m.d.comb += addr.eq(Mux(w.en, w.addr, owner_r.addr))
        if getattr(platform, "family", None) == "iCE40" and \
                str(getattr(platform, "device", "")).startswith("iCE40UP"):
            # an SB_SPRAM256KA (16 Ki x 16; yosys would not infer it: Amaranth gives every
            # memory an initial value, which an SPRAM cannot have)
            dout = Signal(16)
            m.submodules.stage = Instance(
                "SB_SPRAM256KA", i_ADDRESS=addr, i_DATAIN=w.data, i_MASKWREN=0b0011,
                i_WREN=w.en, i_CHIPSELECT=1, i_CLOCK=ClockSignal(), i_STANDBY=0, i_SLEEP=0,
                i_POWEROFF=1, o_DATAOUT=dout)
            m.d.comb += owner_r.data.eq(dout[:8])
            return m
        m.submodules.stage = stage = memory.Memory(shape=8, depth=P.MAX_PAYLOAD, init=[])
        wp, rp = stage.write_port(), stage.read_port()
        m.d.comb += [wp.addr.eq(addr), rp.addr.eq(addr), wp.data.eq(w.data), wp.en.eq(w.en),
                     rp.en.eq(~w.en), owner_r.data.eq(rp.data)]
        return m
