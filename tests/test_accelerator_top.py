"""The accelerator top (RTL in the Amaranth simulator) against the golden device model.

The same request frames go to :class:`Emulator` and to the simulated top; the response
bytes must be identical (where the gateware implements the feature), and the Device API
over ``sim://`` must give the same bits as over ``emulate://``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.gateware.top import SIM_CONFIG, SimTransport
from hbfp_hw.host.device import Device
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.host.transport import FaultInjectingTransport, LoopbackTransport
from hbfp_hw.quantize import quantize

CFG = SIM_CONFIG
FMT = CFG.formats[0]
B = {s.name: s for s in P.buffer_map(CFG)}


@pytest.fixture(scope="module")
def pair():
    return Emulator(CFG), SimTransport(CFG)


def _both(pair, frame: bytes) -> tuple[bytes, bytes]:
    emu, sim = pair
    sim.write(frame)
    return emu.feed(frame), sim.read(0.0)


def _req(op, seq=1, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def test_write_read_and_errors_identical(pair):
    rng = np.random.default_rng(11)
    frames = []
    for name in ("fp_in", "op0.man", "op1.exp", "eref", "op2.man"):
        s = B[name]
        n = int(rng.integers(1, 40))
        off = int(rng.integers(0, s.depth - n))
        data = rng.integers(0, 256, size=n * s.wire_bytes, dtype=np.uint8).tobytes()
        frames.append(_req(P.Op.WRITE, 3, data, buffer=s.id, offset=off))
        frames.append(_req(P.Op.READ, 4, buffer=s.id, offset=max(0, off - 3), count=n + 6))
    frames += [
        _req(P.Op.WRITE, 5, b"\1\2\3\4", buffer=B["out"].id, offset=0),      # not writable
        _req(P.Op.WRITE, 6, b"\1\2\3", buffer=B["fp_in"].id, offset=0),      # bad length
        _req(P.Op.WRITE, 7, b"\1\2", buffer=B["op0.man"].id, offset=CFG.operand_depth - 1),
        _req(P.Op.READ, 8, buffer=99, offset=0, count=1),
        _req(P.Op.READ, 9, buffer=B["fp_in"].id, offset=0, count=2000),      # > MAX_DATA
        _req(P.Op.READ, 10, buffer=B["out"].id, offset=CFG.output_depth, count=1),
        P.encode_frame(11, 0x42, b"abc"),                                    # unknown op
        P.encode_frame(12, P.Op.READ, b"\0\0"),                              # bad length
        _req(P.Op.READ_STATS, 13, flags=2),
        _req(P.Op.INFO, 14, offset=1 << 20),
        _req(P.Op.READ, 15, buffer=B["op1.exp"].id, offset=0, count=64),
    ]
    bad = bytearray(_req(P.Op.READ, 16, buffer=0, offset=0, count=1))
    bad[-1] ^= 0x40
    frames.append(bytes(bad))
    for fr in frames:
        e, s = _both(pair, fr)
        assert s == e, f"request {fr[:12].hex()}: sim {s[:40].hex()} != emulator {e[:40].hex()}"
        assert e  # every request above gets an answer


def test_replay_is_not_reexecuted(pair):
    emu, sim = pair
    qa = quantize(np.eye(8, dtype=np.float32), FMT)
    codes, man = qa.stream()
    for fr in (_req(P.Op.WRITE, 20, man.astype(np.int8).tobytes(), buffer=B["op0.man"].id,
                    offset=0),
               _req(P.Op.WRITE, 21, codes.astype(np.uint8).tobytes(), buffer=B["op0.exp"].id,
                    offset=0),
               _req(P.Op.READ_STATS, 22, flags=1)):
        assert _both(pair, fr)[0] == _both(pair, fr)[1]
    g = _req(P.Op.GEMM, 23, a=0, b=0, flags=int(P.GemmFlag.STORE), slot_a=0, slot_b=0,
             a_rows=8, a_cols=8, b_rows=8, b_cols=8, out_offset=0)
    first = _both(pair, g)
    again = _both(pair, g)   # retransmission: answered from the record
    assert first[0] == first[1] and again == first
    st = _both(pair, _req(P.Op.READ_STATS, 24, flags=0))
    assert st[0] == st[1]
    count = struct.unpack_from("<I", st[1], P.HEADER_BYTES)[0]
    assert count == 64  # the replayed GEMM did not add its outputs twice


def test_gemm_error_frames_identical(pair):
    G = P.GemmFlag

    def g(seq, **kw):
        f = dict(a=0, b=1, flags=int(G.STORE), slot_a=0, slot_b=0, a_rows=8, a_cols=8,
                 b_rows=8, b_cols=8, out_offset=0)
        f.update(kw)
        return _req(P.Op.GEMM, seq, **f)

    # an invalid block in op1 (exponent code all ones), a -128 mantissa in op2
    for fr in (_req(P.Op.WRITE, 30, bytes([255, 0]), buffer=B["op1.exp"].id, offset=0),
               _req(P.Op.WRITE, 31, bytes([0x80]), buffer=B["op2.man"].id, offset=70)):
        _both(pair, fr)
    cases = [g(32, flags=0x40), g(33, slot_a=5), g(34, a=7), g(35, a_rows=0),
             g(36, a_rows=200, a_cols=200), g(37, b_rows=16),
             g(38, out_offset=CFG.output_depth - 10), g(39, a_cols=300, b_rows=300),
             g(40), g(41, b=2, b_rows=16, b_cols=8), g(42, flags=int(G.STORE | G.ALLOW_INVALID)),
             g(43, flags=0)]
    for fr in cases:
        e, s = _both(pair, fr)
        assert s == e, f"{fr.hex()}: sim {s.hex()} != emulator {e.hex()}"


def test_unsupported_features_answer_error_frames(pair):
    emu, sim = pair
    G = P.GemmFlag
    for fr in (_req(P.Op.QUANTIZE, 50, slot=0, dst=0, flags=0, rows=8, cols=8, src_offset=0,
                    rounding=0, seed=0),
               _req(P.Op.GEMM, 51, a=0, b=1, flags=int(G.STORE | G.ACCUMULATE), slot_a=0,
                    slot_b=0, a_rows=8, a_cols=8, b_rows=8, b_cols=8, out_offset=0)):
        sim.write(fr)
        out = sim.read(0.0)
        assert out[5] == P.ERROR_OPCODE
        assert out[P.HEADER_BYTES] == P.ErrorCode.UNSUPPORTED


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_device_gemm_sim_equals_emulate(ta, tb):
    rng = np.random.default_rng(100 + 2 * ta + tb)
    M, K, N = 13, 20, 11
    a = (rng.standard_normal((M, K)) * np.exp2(rng.integers(-8, 8, (M, 1)))).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    qa = quantize(np.ascontiguousarray(a.T), FMT).T if ta else quantize(a, FMT)
    qb = quantize(np.ascontiguousarray(b.T), FMT).T if tb else quantize(b, FMT)
    ref = bfp_matmul(qa, qb)
    sim = Device(SimTransport(CFG), timeout=0.0)
    emu = Device(LoopbackTransport(Emulator(CFG)), timeout=0.0)
    ys = sim.matmul_q(qa, qb)
    ye = emu.matmul_q(qa, qb)
    assert np.array_equal(ys.view(np.uint32), ye.view(np.uint32))
    assert np.array_equal(ys.view(np.uint32), ref.view(np.uint32))
    assert sim.read_stats() == emu.read_stats()
    sim.reset()
    assert not sim._read("op0.man", 0, 64).any()
    assert sim.read_stats()["count"] == 0


def test_fault_injection_over_sim():
    """Corrupted, dropped and delayed bytes over sim://: retried to the right bits."""
    rng = np.random.default_rng(5)
    sim = SimTransport(CFG)
    dev = Device(sim, timeout=0.0, retries=30)
    faulty = FaultInjectingTransport(sim, seed=3, rate=0.002)
    dev.transport = faulty
    a = rng.standard_normal((16, 16)).astype(np.float32)
    qa = quantize(a, FMT)
    y = dev.matmul_q(qa, qa.T)
    assert np.array_equal(y.view(np.uint32), bfp_matmul(qa, qa.T).view(np.uint32))
    assert faulty.total_faults > 0
