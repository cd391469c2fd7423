# amaranth: UnusedElaboratable=no
"""Gateware frame decoder in the Amaranth simulator, fed by the host codec's frames."""

from __future__ import annotations

import pytest
from amaranth.sim import Simulator

from hbfp_hw import protocol as P
from hbfp_hw.gateware.cmd_decoder import FrameDecoder, crc32_byte_matrix
from hbfp_hw.host.codec import HostCodec, Request


def test_crc_matrix_matches_reference(rng):
    mat = crc32_byte_matrix()
    for _ in range(200):
        s, b = int(rng.integers(0, 1 << 32)), int(rng.integers(0, 256))
        nxt = 0
        for j, (sm, bm) in enumerate(mat):
            nxt |= ((bin(s & sm).count("1") + bin(b & bm).count("1")) & 1) << j
        assert nxt == P.crc32_update(s, b)


def _run(stream: bytes, rng, idle_cycles=1 << 16, gaps=True, pause_at=None, pause=0):
    dut = FrameDecoder(idle_cycles=idle_cycles)
    events = []

    async def tb(ctx):
        cur = bytearray()
        i = 0
        cycles = 0
        hold = pause
        while i < len(stream) or cycles < 12:
            valid = i < len(stream) and (not gaps or rng.random() < 0.7)
            if i == pause_at and hold > 0:
                valid = False
                hold -= 1
            ctx.set(dut.i.valid, int(valid))
            if valid:
                ctx.set(dut.i.payload, stream[i])
            ctx.set(dut.o.ready, int(not gaps or rng.random() < 0.8))
            await ctx.delay(1e-8)   # settle combinational ready/valid
            took = valid and ctx.get(dut.i.ready)
            if ctx.get(dut.o.valid) and ctx.get(dut.o.ready):
                cur.append(ctx.get(dut.o.payload))
            await ctx.tick()
            if took:
                i += 1
            if i >= len(stream):
                cycles += 1
            if ctx.get(dut.frame_ok):
                events.append(("ok", ctx.get(dut.seq), ctx.get(dut.opcode), bytes(cur)))
                cur = bytearray()
            if ctx.get(dut.frame_bad):
                events.append(("bad",))
                cur = bytearray()
            if ctx.get(dut.abort):
                events.append(("abort",))
                cur = bytearray()
            if ctx.get(dut.oversize):
                events.append(("oversize",))
                cur = bytearray()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return events


def test_frames_from_host_codec(rng):
    codec = HostCodec(seq=40)
    reqs = [Request(P.Op.RESET),
            Request(P.Op.WRITE, {"buffer": 1, "offset": 7}, bytes(rng.bytes(37))),
            Request(P.Op.READ, {"buffer": 2, "offset": 0, "count": 9})]
    frames = [codec.encode(r) for r in reqs]
    bad = bytearray(codec.encode(Request(P.Op.INFO, {"offset": 0})))
    bad[7] ^= 0x10
    oversize = bytes([P.DELIM]) + P.stuff((P.MAX_PAYLOAD + 1).to_bytes(2, "little"))
    stream = b"\x00\x13" + frames[0] + frames[1] + bytes(bad) + oversize + frames[2] + b"\x7e"
    ev = _run(stream, rng)
    oks = [e for e in ev if e[0] == "ok"]
    assert oks == [("ok", 41, P.Op.RESET, b""),
                   ("ok", 42, P.Op.WRITE, reqs[1].payload()),
                   ("ok", 43, P.Op.READ, reqs[2].payload())]
    assert ("bad",) in ev and ("oversize",) in ev


def test_idle_timeout_abandons_partial_frame(rng):
    cut = P.encode_frame(5, P.Op.WRITE, bytes(20))[:9]
    good = P.encode_frame(6, P.Op.RESET, b"")
    # pause longer than the timeout between the partial frame and a good one
    ev = _run(cut + good, rng, idle_cycles=4, gaps=False, pause_at=len(cut), pause=10)
    assert ev == [("abort",), ("ok", 6, P.Op.RESET, b"")]
    # without the pause the good frame's delimiter abandons the partial one
    ev = _run(cut + good, rng, idle_cycles=4, gaps=False)
    assert ev == [("abort",), ("ok", 6, P.Op.RESET, b"")]
    with pytest.raises(ValueError, match="idle_cycles=0 is out of range"):
        FrameDecoder(idle_cycles=0)


def test_stuffed_bytes_and_an_embedded_frame(rng):
    """Payload bytes equal to the delimiter and the escape arrive unstuffed; a complete
    frame inside WRITE data is never executed, even when the carrying frame loses a
    byte (its delimiter, a length byte, an escape)."""
    inner = P.encode_frame(9, P.Op.RESET)
    data = bytes([0x7E, 0x7D, 0x5E, 0x5D]) + inner + bytes([0x7D, 0x7E])
    carrier = P.encode_frame(7, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
        data, buffer=0, offset=0))
    ev = _run(carrier, rng)
    assert [e for e in ev if e[0] == "ok"] == [
        ("ok", 7, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(data, buffer=0, offset=0))]
    for cut in (0, 1, 2, 6, int(rng.integers(7, len(carrier)))):
        ev = _run(carrier[:cut] + carrier[cut + 1:], rng, gaps=False)
        assert not [e for e in ev if e[0] == "ok" and e[2] == P.Op.RESET], cut
