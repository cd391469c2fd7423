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
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host.device import Device
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.host.transport import FaultInjectingTransport, LoopbackTransport
from hbfp_hw.quantize import quantize

#: SIM_CONFIG with its first slot only (HBFP8 on 8x8 tiles): the simulator's speed falls
#: with the design's size; GEMMs on every slot are in test_accelerator_slots.py
CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], name="hbfp_sim_one")
FMT = CFG.formats[0]
B = {s.name: s for s in P.buffer_map(CFG)}


@pytest.fixture(scope="module")
def pair():
    return Emulator(CFG), SimTransport(CFG)


def _both(pair, frame: bytes) -> tuple[bytes, bytes]:
    emu, sim = pair
    sim.write(frame)
    return emu.feed(frame), sim.read(0.0)


def _op(frame: bytes) -> int:
    """The opcode of one encoded frame."""
    return P.decode_frame(frame)[1]


def _body(frame: bytes) -> bytes:
    """An answer frame's payload after the session token."""
    return P.split_answer(P.decode_frame(frame)[2])[1]


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
        _req(P.Op.READ_STATS, 13, flags=4),
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
    count = struct.unpack_from("<I", _body(st[1]), 0)[0]
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


def _put(pair, seq, i, q):
    """Store a quantized tensor in operand buffer ``i`` of both devices."""
    codes, man = q.stream()
    for k, (name, data) in enumerate(((f"op{i}.man", man.reshape(-1).astype(np.int8)),
                                      (f"op{i}.exp", codes.astype(np.uint8)))):
        e, s = _both(pair, _req(P.Op.WRITE, seq + k, data.tobytes(), buffer=B[name].id,
                                offset=0))
        assert s == e


def _write_eref(pair, seq, rows, cols):
    codes = np.concatenate([rows, cols]).astype(np.uint16)
    e, s = _both(pair, _req(P.Op.WRITE, seq, codes.tobytes(), buffer=B["eref"].id, offset=0))
    assert s == e


def _ksplit_gemm(seq, flags, a=0, b=1, M=16, K=24, N=16, ta=False):
    f = dict(a=a, b=b, flags=int(flags) | (int(P.GemmFlag.TRANS_A) if ta else 0),
             slot_a=0, slot_b=0, a_rows=K if ta else M, a_cols=M if ta else K,
             b_rows=K, b_cols=N, out_offset=0)
    return _req(P.Op.GEMM, seq, **f)


def _reply(frame: bytes) -> tuple[int, int, int]:
    """(opcode, first 32-bit field, error detail or 0) of a response frame."""
    op = _op(frame)
    if op == P.ERROR_OPCODE:
        code, _, detail = struct.unpack_from("<BBI", _body(frame), 0)
        return op, code, detail
    return op, struct.unpack_from("<I", _body(frame), 0)[0], 0


def _read_out(pair, seq, n):
    e, s = _both(pair, _req(P.Op.READ, seq, buffer=B["out"].id, offset=0, count=n))
    assert s == e
    return np.frombuffer(_body(s)[P.RESPONSES[P.Op.READ].header_size:][:4 * n],
                         dtype=np.float32)


def _xs(rng, shape, spread=8):
    return (rng.standard_normal(shape)
            * np.exp2(rng.integers(-spread, spread, (shape[0], 1)))).astype(np.float32)


def test_ksplit_gemm_identical_and_equal_to_unsplit(pair):
    """EXT_EREF + ACCUMULATE over three K chunks (two without STORE, one transposed,
    one retransmitted): every response byte-identical to the emulator, the result
    bit-identical to the unsplit golden GEMM; ACCUMULATE without EXT_EREF onto the same
    own maxima doubles it."""
    G = P.GemmFlag
    rng = np.random.default_rng(21)
    M, N, Ks = 16, 16, (24, 16, 8)
    xa = [_xs(rng, (M, k)) for k in Ks]
    xb = [_xs(rng, (k, N)) for k in Ks]
    qa = [quantize(x, FMT) for x in xa]
    qb = [quantize(x, FMT) for x in xb]
    full = bfp_matmul(quantize(np.hstack(xa), FMT), quantize(np.vstack(xb), FMT))
    # the host's reference exponents: row / column maxima over the whole K
    qa_full, qb_full = quantize(np.hstack(xa), FMT), quantize(np.vstack(xb), FMT)
    rows = qa_full.exponents.max(axis=1).astype(np.int64) + FMT.exp_bias
    cols = qb_full.exponents.max(axis=0).astype(np.int64) + FMT.exp_bias
    _both(pair, _req(P.Op.RESET, 100))
    _write_eref(pair, 101, rows, cols)
    k_done = 0
    for i, (a, b, K) in enumerate(zip(qa, qb, Ks)):
        ta = i == 1      # the second chunk's A is stored transposed
        _put(pair, 110 + 4 * i, 0, quantize(np.ascontiguousarray(xa[i].T), FMT) if ta else a)
        _put(pair, 112 + 4 * i, 1, b)
        flags = G.EXT_EREF | (G.ACCUMULATE if i else 0) | (G.STORE if i == 2 else 0)
        fr = _ksplit_gemm(130 + i, flags, M=M, K=K, N=N, ta=ta)
        e, s = _both(pair, fr)
        assert s == e, f"chunk {i}: sim {s.hex()} != emulator {e.hex()}"
        k_done += K
        assert _reply(s) == (P.Op.GEMM | P.RESPONSE_FLAG, k_done, 0)
        if i == 1:   # a retransmitted ACCUMULATE: answered from the record, not re-added
            assert _both(pair, fr) == (e, s)
    y = _read_out(pair, 140, M * N).reshape(M, N)
    assert np.array_equal(y.view(np.uint32), full.view(np.uint32))
    e, s = _both(pair, _req(P.Op.READ_STATS, 141, flags=1))
    assert s == e
    # ACCUMULATE without EXT_EREF: the same A and B again give e_ref = own maxima; equal
    # to the stored one only where those are the whole-K maxima -> compare with emulator
    _put(pair, 150, 0, qa_full)
    _put(pair, 152, 1, qb_full)
    _both(pair, _ksplit_gemm(154, 0, M=M, K=sum(Ks), N=N))
    e, s = _both(pair, _ksplit_gemm(155, G.ACCUMULATE | G.STORE, M=M, K=sum(Ks), N=N))
    assert s == e and _reply(s) == (P.Op.GEMM | P.RESPONSE_FLAG, 2 * sum(Ks), 0)
    y2 = _read_out(pair, 156, M * N).reshape(M, N)
    assert np.array_equal(y2.view(np.uint32), (2 * full).view(np.uint32))


@pytest.mark.filterwarnings("ignore:overflow encountered in ldexp:RuntimeWarning")
def test_ksplit_gemm_error_frames_identical(pair):
    """ACCUMULATE / EXT_EREF errors: no accumulators (after RESET), mismatched meta,
    reference below the operand's maximum, changed e_ref, K over k_max; NaN carried
    over chunks; reference codes far above the exponent range (-Inf / +0 outputs)."""
    G = P.GemmFlag
    E = P.ErrorCode
    rng = np.random.default_rng(22)
    xa0 = _xs(rng, (16, 24))
    qa, qb = quantize(xa0, FMT), quantize(_xs(rng, (24, 16)), FMT)
    rows = qa.exponents.max(axis=1).astype(np.int64) + FMT.exp_bias
    cols = qb.exponents.max(axis=0).astype(np.int64) + FMT.exp_bias + 2
    steps = [  # (frame or callable, expected (opcode/code, detail) or None for success)
        ("reset", None),
        (_ksplit_gemm(201, G.ACCUMULATE | G.STORE), (E.BAD_ARGUMENT, 2)),
        ("put", None),
        (_ksplit_gemm(202, G.STORE), None),
        (_ksplit_gemm(203, G.ACCUMULATE, M=8), (E.BAD_ARGUMENT, 2)),      # other M tiles
        (_ksplit_gemm(204, G.ACCUMULATE, N=24), (E.BAD_ARGUMENT, 2)),     # other N tiles
        (("eref", rows, cols), None),
        (_ksplit_gemm(205, G.EXT_EREF | G.ACCUMULATE), (E.BAD_ARGUMENT, 6)),  # e_ref moved
        (_ksplit_gemm(206, G.EXT_EREF), None),
        (_ksplit_gemm(207, G.ACCUMULATE), (E.BAD_ARGUMENT, 6)),     # own maxima: e_ref moved
        (("eref", rows + 2, cols - 2), None),                        # same sums, other split
        (_ksplit_gemm(208, G.EXT_EREF | G.ACCUMULATE | G.STORE), None),
        (("eref", rows - 1, cols), None),
        (_ksplit_gemm(209, G.EXT_EREF | G.ACCUMULATE), (E.BAD_ARGUMENT, 6)),  # below own
        (("eref", rows, cols - 3), None),
        (_ksplit_gemm(210, G.EXT_EREF), (E.BAD_ARGUMENT, 6)),                 # below own
    ]
    # K total over k_max: 24 per GEMM, k_max 256 -> the 11th accumulation overflows
    steps += [(("eref", rows, cols), None), (_ksplit_gemm(211, G.EXT_EREF), None)]
    k = 24
    while k + 24 <= CFG.k_max:
        steps.append((_ksplit_gemm(212, G.EXT_EREF | G.ACCUMULATE), None))
        k += 24
    steps.append((_ksplit_gemm(213, G.EXT_EREF | G.ACCUMULATE), (E.K_OVERFLOW, k + 24)))
    seq = 220
    for what, want in steps:
        if what == "reset":
            _both(pair, _req(P.Op.RESET, 200))
            continue
        if what == "put":
            _put(pair, 199, 0, qa)
            _put(pair, 197, 1, qb)
            continue
        if isinstance(what, tuple):
            seq += 1
            _write_eref(pair, seq, what[1], what[2])
            continue
        seq += 1
        fr = P.encode_frame(seq, P.Op.GEMM, P.decode_frame(what)[2])
        e, s = _both(pair, fr)
        assert s == e, f"{fr.hex()}: sim {s.hex()} != emulator {e.hex()}"
        op, code, detail = _reply(s)
        if want is None:
            assert op == P.Op.GEMM | P.RESPONSE_FLAG, (fr.hex(), s.hex())
        else:
            assert op == P.ERROR_OPCODE and (code, detail) == want, (fr.hex(), s.hex())
    # an invalid block in the first chunk makes its rows NaN after the accumulation
    xa = xa0.copy()
    xa[3, 20] = np.inf
    _write_eref(pair, 239, rows + 1, cols)
    _put(pair, 240, 0, quantize(xa, FMT, nonfinite="flag"))
    e, s = _both(pair, _ksplit_gemm(242, G.ALLOW_INVALID | G.EXT_EREF))
    assert s == e
    _put(pair, 243, 0, qa)
    e, s = _both(pair, _ksplit_gemm(245, G.ALLOW_INVALID | G.EXT_EREF | G.ACCUMULATE
                                    | G.STORE))
    assert s == e and _reply(s)[0] == P.Op.GEMM | P.RESPONSE_FLAG
    y = _read_out(pair, 246, 256).reshape(16, 16)
    assert np.isnan(y[:8]).all() and np.isfinite(y[8:]).all()
    # reference codes far above the exponent range: every shift saturates -> -Inf / +0
    for seq, code in ((250, 300), (252, 40000)):
        _write_eref(pair, seq, np.full_like(rows, code), cols)
        e, s = _both(pair, _ksplit_gemm(seq + 1, G.EXT_EREF | G.STORE))
        assert s == e
        y = _read_out(pair, seq + 2, 256)
        assert set(np.unique(y).tolist()) == {-np.inf, 0.0}


def test_accumulate_beyond_capacity_unsupported(pair):
    """A GEMM whose padded output exceeds the accumulator buffer keeps no accumulators:
    ACCUMULATE onto it is UNSUPPORTED (detail 2) on the RTL, after the emulator's checks;
    INFO no longer lists ACCUMULATE / EXT_EREF."""
    from hbfp_hw.gateware.top import accumulator_capacity, unsupported
    G = P.GemmFlag
    rng = np.random.default_rng(23)
    M, K, N = 40, 8, 32               # 5 x 4 output tiles of 64 > 1024 outputs
    assert M * N > accumulator_capacity(CFG)
    _put(pair, 60, 0, quantize(_xs(rng, (M, K)), FMT))
    _put(pair, 62, 1, quantize(_xs(rng, (K, N)), FMT))
    e, s = _both(pair, _ksplit_gemm(64, 0, M=M, K=K, N=N))
    assert s == e and _reply(s)[0] == P.Op.GEMM | P.RESPONSE_FLAG
    e, s = _both(pair, _ksplit_gemm(65, G.ACCUMULATE, M=M, K=K, N=N))
    assert _reply(e) == (P.Op.GEMM | P.RESPONSE_FLAG, 2 * K, 0)
    assert _reply(s) == (P.ERROR_OPCODE, P.ErrorCode.UNSUPPORTED, 2)
    e, s = _both(pair, _ksplit_gemm(66, G.ACCUMULATE, M=8, K=K, N=N))   # meta first
    assert s == e and _reply(s) == (P.ERROR_OPCODE, P.ErrorCode.BAD_ARGUMENT, 2)
    assert unsupported(CFG)["gemm_flags"] == []


# ---------------------------------------------------------------------------------------
# QUANTIZE
# ---------------------------------------------------------------------------------------
def _edge_images() -> list[np.ndarray]:
    """Two 16x16 FP32 tensors (four 8x8 blocks each) of edge cases for HBFP8T8.

    Image 0: an all-zero block; a block of subnormals next to the smallest normals
    (they must be flushed, else they would round to non-zero mantissas); a block with
    a NaN; a block of ties at the block scale (E=0: steps of 2**-6) of both parities
    and signs. Image 1: a block whose largest values round up past the mantissa range
    (saturation); a block with +Inf; a block with -Inf; a block mixing FLT_MAX-scale
    and tiny values (everything but the large ones rounds to 0).
    """
    rng = np.random.default_rng(42)
    blocks0 = [np.zeros((8, 8), np.float32)]
    sub = np.float32(2.0**-126) * rng.choice([0.0, 0.3, 0.75, 1.0, 1.5, 1.99], (8, 8))
    sub[0, :4] = np.frombuffer(np.array([1, 0x7FFFFF, 0x400000, 0x80400000], np.uint32)
                               .tobytes(), np.float32)    # subnormals of both signs
    blocks0.append(sub.astype(np.float32))
    nan = rng.standard_normal((8, 8)).astype(np.float32)
    nan[3, 5] = np.nan
    blocks0.append(nan)
    k = rng.integers(-63, 63, (8, 8))
    ties = ((k + 0.5) / 64.0).astype(np.float32)
    ties[0, 0] = 1.0                                       # E = 0
    blocks0.append(ties)
    sat = rng.uniform(-1.999, 1.999, (8, 8)).astype(np.float32)
    sat[0, :4] = [1.999, -1.999, 1.9921875, -1.99609375]   # y = 127.9, 127.5, 127.75
    inf = rng.standard_normal((8, 8)).astype(np.float32)
    inf[7, 7] = np.inf
    ninf = rng.standard_normal((8, 8)).astype(np.float32)
    ninf[0, 1] = -np.inf
    big = (rng.standard_normal((8, 8)) * 1e-30).astype(np.float32)
    big[2, 2], big[4, 4] = np.float32(3.0e38), np.float32(-1.7e38)
    out = []
    for b4 in (blocks0, [sat, inf, ninf, big]):
        out.append(np.block([[b4[0], b4[1]], [b4[2], b4[3]]]).astype(np.float32))
    return out


def _quantize_req(seq, **kw):
    f = dict(slot=0, dst=0, flags=int(P.QuantizeFlag.RETURN), rows=8, cols=8, src_offset=0,
             rounding=0, seed=0, exp_code=0)
    f.update(kw)
    return _req(P.Op.QUANTIZE, seq, **f)


def _read_all(pair, seq, dst, n_man, n_exp):
    for name, n in ((f"op{dst}.man", n_man), (f"op{dst}.exp", n_exp)):
        e, s = _both(pair, _req(P.Op.READ, seq, buffer=B[name].id, offset=0, count=n))
        assert s == e, f"{name} after QUANTIZE: sim {s.hex()} != emulator {e.hex()}"


def test_quantize_edge_values_identical(pair):
    """Every rounding mode on the edge-value tensors: responses and stored BFP match."""
    seq = 60
    for img in _edge_images():
        _both(pair, _req(P.Op.WRITE, seq, img.tobytes(), buffer=B["fp_in"].id, offset=0))
        for rnd in range(4):
            ret = (1, 0) if rnd % 2 else (0, 1)   # the stored copy is READ back below
            for rows, cols, src, flags in ((13, 11, 37, ret[0]), (16, 16, 0, ret[1])):
                seq = (seq + 1) & 0xFF
                fr = _quantize_req(seq, rows=rows, cols=cols, src_offset=src, flags=flags,
                                   rounding=rnd, seed=1000 + seq, dst=rnd % 3)
                e, s = _both(pair, fr)
                assert s == e, f"{fr.hex()}: sim {s.hex()} != emulator {e.hex()}"
                assert _op(e) == P.Op.QUANTIZE | P.RESPONSE_FLAG
            _read_all(pair, seq, rnd % 3, 256, 4)
    # the NaN / Inf blocks were reported: image 1 (last written) has 2 invalid blocks
    n_inv, first = struct.unpack_from("<II", _body(e), 0)
    assert (n_inv, first) == (2, 1)


def test_quantize_random_tensors_identical(pair, rng):
    seq = 120
    for _ in range(4):
        rows, cols = (int(v) for v in rng.integers(1, 20, 2))
        src = int(rng.integers(0, CFG.input_depth - rows * cols + 1))
        x = (rng.standard_normal(CFG.input_depth)
             * np.exp2(rng.integers(-40, 40, CFG.input_depth))).astype(np.float32)
        _both(pair, _req(P.Op.WRITE, seq, x.tobytes(), buffer=B["fp_in"].id, offset=0))
        rnd = int(rng.integers(0, 4))
        seq += 1
        fr = _quantize_req(seq, rows=rows, cols=cols, src_offset=src, rounding=rnd,
                           seed=int(rng.integers(0, 2**32)), dst=int(rng.integers(0, 3)))
        e, s = _both(pair, fr)
        assert s == e, f"{fr.hex()}: sim {s.hex()} != emulator {e.hex()}"
        seq += 1


def test_quantize_error_frames_and_replay_identical(pair):
    D = CFG.input_depth
    cases = [dict(slot=len(CFG.formats)), dict(rounding=4), dict(dst=3), dict(flags=4),
             dict(rows=0),
             dict(cols=0), dict(rows=40, cols=40),           # 25 blocks > operand depth
             dict(rows=16, cols=16, src_offset=1),           # past the end of fp_in
             dict(rows=1, cols=1, src_offset=D),
             dict(rows=1, cols=1, src_offset=0xFFFFFFFF),
             dict(rows=65535, cols=65535),                    # 2**32 elements (detail 0)
             dict(rows=32, cols=32)]
    E = P.ErrorCode
    expected = [(E.BAD_ARGUMENT, 0), (E.BAD_ARGUMENT, 7), (E.BAD_BUFFER, 3),
                (E.BAD_ARGUMENT, 2), (E.BAD_ARGUMENT, 0), (E.BAD_ARGUMENT, 0),
                (E.OUT_OF_RANGE, 25 * 64), (E.OUT_OF_RANGE, D), (E.OUT_OF_RANGE, D),
                (E.OUT_OF_RANGE, 0xFFFFFFFF), (E.OUT_OF_RANGE, 0), (E.OUT_OF_RANGE, D)]
    for k, (kw, want) in enumerate(zip(cases, expected)):
        e, s = _both(pair, _quantize_req(70 + k, **kw))
        assert s == e, f"{kw}: sim {s.hex()} != emulator {e.hex()}"
        assert _op(e) == P.ERROR_OPCODE
        assert struct.unpack_from("<BBI", _body(s), 0) == (want[0], P.Op.QUANTIZE,
                                                                 want[1]), kw
    # a retransmitted QUANTIZE is answered from the record (same bytes, stochastic too)
    fr = _quantize_req(90, rows=9, cols=7, rounding=3, seed=5)
    first = _both(pair, fr)
    assert first[0] == first[1] and _both(pair, fr) == first


def test_quantize_static_exp_identical(pair, rng):
    """STATIC_EXP on the edge-value tensors (zero / subnormal / NaN / Inf / tie /
    saturating / FLT_MAX blocks) and partial blocks, every rounding mode, E at both ends
    of the range, far below and above the data and random: responses and stored BFP
    byte-identical to the emulator, which is golden quantize(..., exponent=E); codes out
    of the slot range (BAD_ARGUMENT 8), after the flags check, before the shape check;
    exp_code ignored without the flag."""
    Q, E = P.QuantizeFlag, P.ErrorCode
    seq = 150
    bias = FMT.exp_bias
    for img_i, img in enumerate(_edge_images()):
        _both(pair, _req(P.Op.WRITE, seq, img.tobytes(), buffer=B["fp_in"].id, offset=0))
        codes = [FMT.emin + bias, FMT.emax + bias, bias - 30, bias + 2, bias + 40,
                 int(rng.integers(0, 2 * bias + 1))]
        for k, code in enumerate(codes):
            rnd = (k + img_i) % 4
            ret = k % 2 == 0
            rows, cols, src = ((13, 11, 37), (16, 16, 0))[k % 2]
            seq = (seq + 1) & 0xFF
            fr = _quantize_req(seq, rows=rows, cols=cols, src_offset=src,
                               flags=int(Q.STATIC_EXP | (Q.RETURN if ret else 0)),
                               rounding=rnd, seed=7 * seq, dst=k % 3, exp_code=code)
            e, s = _both(pair, fr)
            assert s == e, f"code {code}: sim {s.hex()} != emulator {e.hex()}"
            assert _op(e) == P.Op.QUANTIZE | P.RESPONSE_FLAG
            if not ret:
                _read_all(pair, seq, k % 3, 256, 4)
            # the answer is golden quantize(..., exponent=E) of the tensor
            x = np.frombuffer(img.tobytes(), np.float32)[src: src + rows * cols]
            q = quantize(x.reshape(rows, cols), FMT.replace(
                rounding=("nearest_even", "nearest_away", "toward_zero",
                          "stochastic")[rnd], seed=7 * seq),
                nonfinite="flag", exponent=code - bias)
            n_inv = struct.unpack_from("<I", _body(e), 0)[0]
            assert n_inv == q.invalid.sum() and (img_i == 0 or n_inv == 2 or rows == 13)
            if ret:
                gc, gm = q.stream()
                body = _body(e)[8:]
                assert body == gc.astype(np.uint8).tobytes() + gm.astype(np.int8).tobytes()
    cases = [(dict(flags=int(Q.STATIC_EXP), exp_code=2 * bias + 1), (E.BAD_ARGUMENT, 8)),
             (dict(flags=int(Q.STATIC_EXP), exp_code=0xFFFF), (E.BAD_ARGUMENT, 8)),
             (dict(flags=int(Q.STATIC_EXP), exp_code=300, rows=0), (E.BAD_ARGUMENT, 8)),
             (dict(flags=int(Q.STATIC_EXP) | 4, exp_code=300), (E.BAD_ARGUMENT, 2)),
             (dict(flags=int(Q.STATIC_EXP), exp_code=300, dst=5), (E.BAD_BUFFER, 5)),
             (dict(flags=int(Q.STATIC_EXP), exp_code=3, rows=0), (E.BAD_ARGUMENT, 0)),
             (dict(flags=int(Q.RETURN), exp_code=0xFFFF), None),     # ignored: no flag
             (dict(flags=int(Q.RETURN | Q.STATIC_EXP), exp_code=2 * bias), None)]
    for kw, want in cases:
        seq = (seq + 1) & 0xFF
        e, s = _both(pair, _quantize_req(seq, **{"rows": 16, "cols": 16, **kw}))
        assert s == e, f"{kw}: sim {s.hex()} != emulator {e.hex()}"
        if want is None:
            assert _op(e) == P.Op.QUANTIZE | P.RESPONSE_FLAG
        else:
            assert struct.unpack_from("<BBI", _body(s), 0) == (
                want[0], P.Op.QUANTIZE, want[1]), kw


def _stats(frame: bytes) -> tuple:
    assert _op(frame) == P.Op.READ_STATS | P.RESPONSE_FLAG, frame.hex()
    return struct.unpack_from("<IIff", _body(frame), 0)


def test_read_stats_quantize_input_identical(pair, rng):
    """READ_STATS QUANTIZE_INPUT after QUANTIZEs of partial-block tensors holding NaN,
    Inf, -0.0, +0.0 and subnormals: identical to the emulator and to numpy over the
    rows x cols elements (padding excluded), with and without CLEAR, the GEMM record
    untouched, and both records empty after RESET."""
    S = P.StatsFlag
    seq = 10
    x = (rng.standard_normal(CFG.input_depth) * 3).astype(np.float32)
    x[40:44] = [-0.0, 0.0, np.float32(-1e-40), np.float32(2e-45)]
    x[50], x[51] = np.nan, -np.inf
    x[100:140] = 0.0
    _both(pair, _req(P.Op.RESET, seq))
    _both(pair, _req(P.Op.WRITE, seq + 1, x.tobytes(), buffer=B["fp_in"].id, offset=0))
    seen = []
    for k, (rows, cols, src, flags) in enumerate(((13, 11, 37, 0), (3, 5, 98, 2),
                                                   (9, 2, 40, 2), (1, 1, 41, 0))):
        seq += 2
        e, s = _both(pair, _quantize_req(seq, rows=rows, cols=cols, src_offset=src,
                                         flags=flags, exp_code=FMT.exp_bias))
        assert s == e and _op(e) == P.Op.QUANTIZE | P.RESPONSE_FLAG
        seen.append(x[src: src + rows * cols])
        e, s = _both(pair, _req(P.Op.READ_STATS, seq + 1, flags=int(S.QUANTIZE_INPUT)))
        assert s == e, f"after QUANTIZE {k}: sim {s.hex()} != emulator {e.hex()}"
        allx = np.concatenate(seen)
        fin = allx[np.isfinite(allx)]
        count, nonfin, lo, hi = _stats(s)
        assert (count, nonfin) == (fin.size, allx.size - fin.size)
        assert lo == fin.min() and hi == fin.max()
    # the smallest finite element is negative; -0.0 and the subnormals are in range
    e, s = _both(pair, _req(P.Op.READ_STATS, 30, flags=0))       # GEMM record: empty
    assert s == e and _stats(s)[0] == 0
    e, s = _both(pair, _req(P.Op.READ_STATS, 31, flags=int(S.QUANTIZE_INPUT | S.CLEAR)))
    assert s == e and _stats(s)[0] == sum(np.isfinite(v).sum() for v in seen)
    e, s = _both(pair, _req(P.Op.READ_STATS, 32, flags=int(S.QUANTIZE_INPUT)))
    assert s == e and _stats(s) == (0, 0, 0.0, 0.0)
    # only -0.0 and +0.0 (order: -0.0 < +0.0) and a negative subnormal
    e, s = _both(pair, _quantize_req(33, rows=1, cols=3, src_offset=40, flags=0))
    assert s == e
    e, s = _both(pair, _req(P.Op.READ_STATS, 34, flags=int(S.QUANTIZE_INPUT)))
    assert s == e
    count, nonfin, lo, hi = _stats(s)
    assert (count, nonfin) == (3, 0) and lo == np.float32(-1e-40)
    assert hi == 0.0 and not np.signbit(hi)
    raw = struct.unpack_from("<II", _body(s), 8)
    assert raw == (int(np.float32(-1e-40).view(np.uint32)), 0)
    e, s = _both(pair, _quantize_req(35, rows=1, cols=1, src_offset=40, flags=0))
    e, s = _both(pair, _req(P.Op.READ_STATS, 36, flags=int(S.QUANTIZE_INPUT | S.CLEAR)))
    assert s == e and _stats(s)[0] == 4
    e, s = _both(pair, _quantize_req(37, rows=1, cols=1, src_offset=40, flags=0))
    e, s = _both(pair, _req(P.Op.READ_STATS, 38, flags=int(S.QUANTIZE_INPUT)))
    assert s == e and struct.unpack_from("<IIII", _body(s), 0) == (
        1, 0, 0x80000000, 0x80000000)                                   # -0.0 alone
    # unknown stats flag bits: BAD_ARGUMENT 0 on both
    e, s = _both(pair, _req(P.Op.READ_STATS, 39, flags=6))
    assert s == e and struct.unpack_from("<BBI", _body(s), 0) == (
        P.ErrorCode.BAD_ARGUMENT, P.Op.READ_STATS, 0)
    # a GEMM's outputs go to the GEMM record only; RESET clears both
    _put(pair, 40, 0, quantize(np.eye(8, dtype=np.float32), FMT))
    e, s = _both(pair, _req(P.Op.GEMM, 42, a=0, b=0, flags=int(P.GemmFlag.STORE),
                            slot_a=0, slot_b=0, a_rows=8, a_cols=8, b_rows=8, b_cols=8,
                            out_offset=0))
    assert s == e
    e, s = _both(pair, _req(P.Op.READ_STATS, 43, flags=int(S.QUANTIZE_INPUT)))
    assert s == e and _stats(s)[0] == 1
    e, s = _both(pair, _req(P.Op.READ_STATS, 44, flags=0))
    assert s == e and _stats(s)[0] == 64
    _both(pair, _req(P.Op.RESET, 45))
    for seq, fl in ((46, 0), (47, int(S.QUANTIZE_INPUT))):
        e, s = _both(pair, _req(P.Op.READ_STATS, seq, flags=fl))
        assert s == e and _stats(s) == (0, 0, 0.0, 0.0)


def test_quantize_mixed_slots_identical():
    """Narrow mantissas/exponents in wider buffers, 1-D and column blocks, non-power-of-two
    blocks and several SR lanes (quantizer lanes = ``sr_lanes``), every rounding mode."""
    from hbfp_hw.formats import BFPFormat
    cfg = CFG.replace(formats=CFG.formats[:1] + (
        BFPFormat(man_bits=4, exp_bits=6, block_shape=(12,), block_axes=(-1,), sr_lanes=4,
                  sr_bits=6),
        BFPFormat(man_bits=6, exp_bits=8, block_shape=(3,), block_axes=(0,), sr_lanes=3)),
        operand_depth=8192, input_depth=512)
    bm = {s.name: s for s in P.buffer_map(cfg)}
    pair2 = Emulator(cfg), SimTransport(cfg)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(cfg.input_depth)
         * np.exp2(rng.integers(-30, 30, cfg.input_depth))).astype(np.float32)
    x[40], x[3], x[4] = np.inf, 1e-40, -1e-41
    _both(pair2, _req(P.Op.WRITE, 1, x.tobytes(), buffer=bm["fp_in"].id, offset=0))
    seq = 2
    for slot in (1, 2):
        for rnd in range(4):
            rows, cols, src = ((7, 13, 0), (4, 12, 30), (9, 5, 2))[(slot + rnd) % 3]
            seq += 1
            fr = _quantize_req(seq, slot=slot, dst=rnd % 3, rows=rows, cols=cols,
                               src_offset=src, rounding=rnd, seed=77 * seq)
            e, s = _both(pair2, fr)
            assert s == e, f"slot {slot} rounding {rnd}: sim {s.hex()} != emulator {e.hex()}"
    # STATIC_EXP per slot: each slot's own code range (slot 1: 6-bit codes 0..62)
    Q = P.QuantizeFlag
    for slot, code, ok in ((1, 62, True), (1, 63, False), (1, 0, True), (2, 140, True),
                           (2, 255, False), (0, 63, True)):
        for rnd in ((0, 3) if ok else (0,)):
            seq += 1
            fr = _quantize_req(seq, slot=slot, dst=seq % 3, rows=9, cols=12, src_offset=5,
                               rounding=rnd, seed=5 * seq, exp_code=code,
                               flags=int(Q.STATIC_EXP | Q.RETURN))
            e, s = _both(pair2, fr)
            assert s == e, f"slot {slot} code {code}: sim {s.hex()} != emulator {e.hex()}"
            assert (_op(e) == P.Op.QUANTIZE | P.RESPONSE_FLAG) == ok
    # 64 blocks of 64 mantissas + 64 codes do not fit one answer: BAD_LENGTH (detail n)
    e, s = _both(pair2, _quantize_req(20, rows=1, cols=512))
    assert s == e and struct.unpack_from("<BI", _body(s), 1) == (
        P.Op.QUANTIZE, 4096) and _body(s)[0] == P.ErrorCode.BAD_LENGTH


def test_quantize_fixed_rounding_build():
    """Built without run-time rounding: the slot's own mode works, others are
    UNSUPPORTED (detail 7), and INFO lists them."""
    import json
    emu, sim = Emulator(CFG), SimTransport(CFG, runtime_rounding=False)
    x = np.linspace(-3, 3, 64, dtype=np.float32)
    _both((emu, sim), _req(P.Op.WRITE, 1, x.tobytes(), buffer=B["fp_in"].id, offset=0))
    e, s = _both((emu, sim), _quantize_req(2, rounding=FMT.rounding_code))
    assert s == e
    other = (FMT.rounding_code + 1) % 4
    sim.write(_quantize_req(3, rounding=other))
    out = sim.read(0.0)
    assert _op(out) == P.ERROR_OPCODE
    assert struct.unpack_from("<BBI", _body(out), 0) == (P.ErrorCode.UNSUPPORTED,
                                                               P.Op.QUANTIZE, 7)
    js = json.loads(sim.dut.info[P.RESPONSES[P.Op.INFO].header_size:])
    assert len(js["gateware"]["unsupported"]["quantize_rounding"]["0"]) == 3


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
