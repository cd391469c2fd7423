# amaranth: UnusedElaboratable=no
"""The engine structure of the accelerator top.

* Every opcode of the protocol has an engine in ``ENGINES`` and a handler in the emulator,
  and every engine the top builds is used.
* The executor, buffer manager and response encoder with a stub *echo* engine (answers
  every command with its own header bytes and a command counter, RESET with an error,
  INFO with ROM bytes), driven with random input gaps and random output back-pressure:
  every answer frame is what the stub said, replays are answered from the record without
  re-executing, and the executor's own checks (unknown opcode, bad length, bad CRC) answer
  without reaching the engine.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from amaranth import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hbfp_hw import protocol as P
from hbfp_hw.gateware.buffers import BufferManager
from hbfp_hw.gateware.engine import (FIX_BYTES, engine_signature, rom_id, status_error,
                                     status_ok, status_register)
from hbfp_hw.gateware.executor import Executor
from hbfp_hw.gateware.response import ResponseEncoder
from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.gateware.top import ENGINES, Accelerator
from hbfp_hw.host.codec import Frame, FrameParser
from hbfp_hw.host.emulator import Emulator

SPECS = P.buffer_map(SIM_CONFIG)
ROM = bytes(range(40, 80))
#: The session token the harness gives the encoder (answers carry it).
TOKEN_VALUE = 0x7E7D_2A5A
TOKEN = TOKEN_VALUE.to_bytes(4, "little")


def test_every_opcode_has_an_engine_and_an_emulator_handler():
    assert set(ENGINES) == set(P.Op)
    for op in P.Op:
        assert callable(getattr(Emulator, f"_op_{op.name.lower()}", None)), op
    built = Accelerator(SIM_CONFIG).engines()
    assert set(ENGINES.values()) == set(built)


def test_executor_rejects_an_incomplete_engine_table():
    with pytest.raises(ValueError, match="no engine for opcodes"):
        Executor(ops={P.Op.INFO: 0}, engines=1, specs=SPECS, idle_cycles=100)
    with pytest.raises(ValueError, match=r"engine index out of range \[0, 0\]"):
        Executor(ops={op: 1 for op in P.Op}, engines=1, specs=SPECS, idle_cycles=100)


def _nfix(op: P.Op) -> int:
    return min(P.REQUESTS[op].header_size, FIX_BYTES - 1)


class EchoEngine(wiring.Component):
    """Answers ``counter, header bytes`` after ``length % 5`` clocks; RESET: an error
    (BAD_ARGUMENT, detail 0x1234_5678); INFO: plus 3 ROM bytes from ``offset``."""

    def __init__(self):
        super().__init__(engine_signature(SPECS, SIM_CONFIG.tile, len(ROM)))

    def elaborate(self, platform):
        m = Module()
        pay, st_v = status_register(m, self)
        cnt = Signal(8)
        wait = Signal(3)
        c = self.cmd.payload
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [wait.eq(c.length % 5), cnt.eq(cnt + 1)]
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.sync += wait.eq(wait - 1)
                with m.If(wait == 0):
                    with m.Switch(c.op):
                        for op in P.Op:
                            with m.Case(op):
                                fix = Cat(cnt, c.args.as_value()[:8 * _nfix(op)])
                                if op == P.Op.RESET:
                                    m.d.sync += status_error(pay, P.ErrorCode.BAD_ARGUMENT,
                                                             0x1234_5678)
                                elif op == P.Op.INFO:
                                    m.d.sync += status_ok(
                                        m, pay, fix=fix, nfix=1 + _nfix(op),
                                        seg1=(rom_id(SPECS), c.args.info.offset[:5], 3))
                                else:
                                    m.d.sync += status_ok(m, pay, fix=fix, nfix=1 + _nfix(op))
                    m.d.sync += st_v.eq(1)
                    m.next = "DONE"
            with m.State("DONE"):
                with m.If(self.status.ready):
                    m.next = "IDLE"
        return m


class Harness(wiring.Component):
    def __init__(self):
        super().__init__({"i": In(stream.Signature(8)), "o": Out(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.ex = ex = Executor(ops={op: 0 for op in P.Op}, engines=1, specs=SPECS,
                                        idle_cycles=400)
        m.submodules.bm = bm = BufferManager(SPECS, tile=SIM_CONFIG.tile, info=ROM,
                                             clients=2)
        m.submodules.enc = enc = ResponseEncoder(SPECS, tile=SIM_CONFIG.tile,
                                                 rom_depth=len(ROM))
        m.submodules.eng = eng = EchoEngine()
        wiring.connect(m, ex.e0_cmd, eng.cmd)
        wiring.connect(m, eng.status, ex.e0_status)
        wiring.connect(m, eng.bufs, bm.c0)
        wiring.connect(m, enc.bufs, bm.c1)
        wiring.connect(m, ex.desc, enc.desc)
        wiring.connect(m, ex.stage_w, bm.stage_w)
        m.d.comb += [bm.owner.eq(ex.owner), enc.token.eq(TOKEN_VALUE)]
        wiring.connect(m, wiring.flipped(self.i), ex.i)
        wiring.connect(m, enc.o, wiring.flipped(self.o))
        return m


def _requests(rng):
    """(frame, expected answer payload or ('error', code, detail), executes?)"""
    out = []
    count = 0
    for seq in range(24):
        op = list(P.Op)[int(rng.integers(0, len(P.Op)))]
        lay = P.REQUESTS[op]
        hdr = rng.integers(0, 256, lay.header_size, dtype=np.uint8).tobytes()
        if op == P.Op.INFO:
            hdr = struct.pack("<I", int(rng.integers(0, 30)))
        data = rng.integers(0, 256, int(rng.integers(0, 9)), dtype=np.uint8).tobytes() \
            if lay.data else b""
        frame = P.encode_frame(seq, op, hdr + data)
        count += 1
        if op == P.Op.RESET:
            want = (P.ERROR_OPCODE, TOKEN + struct.pack("<BBI", P.ErrorCode.BAD_ARGUMENT, op,
                                                        0x1234_5678))
        else:
            body = bytes([count % 256]) + hdr[:_nfix(op)]
            if op == P.Op.INFO:
                off = struct.unpack("<I", hdr)[0]
                body += ROM[off: off + 3]
            want = (op | P.RESPONSE_FLAG, TOKEN + body)
        out.append((seq, frame, want))
        if rng.random() < 0.3:                        # a retry: answered from the record
            out.append((seq, frame, want))
    # the executor's own checks: never reach the engine
    out.append((100, P.encode_frame(100, 0x42, b"x"),
                (P.ERROR_OPCODE, TOKEN + struct.pack("<BBI", P.ErrorCode.UNKNOWN_OPCODE, 0x42,
                                                     0x42))))
    out.append((101, P.encode_frame(101, P.Op.READ, b"\0"),
                (P.ERROR_OPCODE, TOKEN + struct.pack("<BBI", P.ErrorCode.BAD_LENGTH,
                                                     P.Op.READ, 1))))
    bad = bytearray(P.encode_frame(102, P.Op.READ_STATS, b"\0"))
    bad[-1] ^= 1
    out.append((102, bytes(bad),
                (P.ERROR_OPCODE, TOKEN + struct.pack("<BBHH", P.ErrorCode.BAD_CRC,
                                                     P.Op.READ_STATS, 1, 0))))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_executor_with_echo_engine_under_stalls(seed):
    rng = np.random.default_rng(seed)
    reqs = _requests(rng)
    dut = Harness()
    got = []

    async def tb(ctx):
        parser = FrameParser()
        for seq, frame, want in reqs:
            for byte in frame:
                while rng.random() < 0.3:             # input gaps
                    ctx.set(dut.i.valid, 0)
                    await ctx.tick()
                ctx.set(dut.i.valid, 1)
                ctx.set(dut.i.payload, byte)
                await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            frames = []
            for _ in range(5000):
                ready = int(rng.random() < 0.6)       # output back-pressure
                ctx.set(dut.o.ready, ready)
                _, _, v, d = await ctx.tick().sample(dut.o.valid, dut.o.payload)
                if v and ready:
                    frames += [e for e in parser.feed(bytes([d])) if isinstance(e, Frame)]
                    if frames:
                        break
            assert frames, f"seed {seed}: no answer to request seq {seq}"
            got.append((frames[0].seq, frames[0].opcode, frames[0].payload))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for (seq, _, (op, body)), (gseq, gop, gbody) in zip(reqs, got):
        assert (gseq, gop, bytes(gbody)) == (seq, op, body), f"seed {seed}, seq {seq}"
    assert len(got) == len(reqs)
