"""The device model: protocol behaviour, error frames and bounds safety under fuzzing."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, MXINT8
from hbfp_hw.host.codec import Frame, FrameParser
from hbfp_hw.host.emulator import Emulator

SMALL = AcceleratorConfig(formats=(HBFP4, MXINT8), operand_depth=256, input_depth=128,
                          output_depth=128, k_max=512)


def _ask(emu: Emulator, seq: int, op: int, payload: bytes) -> list[Frame]:
    """The answer frames, their payloads without the session token (checked: the
    emulator's)."""
    return _answers(emu, emu.feed(P.encode_frame(seq, op, payload)))


def _answers(emu: Emulator, out: bytes) -> list[Frame]:
    frames = []
    for e in FrameParser().feed(out):
        if isinstance(e, Frame):
            token, rest = P.split_answer(e.payload)
            assert token == emu.session
            frames.append(Frame(e.seq, e.opcode, rest))
    return frames


def _err(fr: Frame) -> tuple[int, int]:
    assert fr.opcode == P.ERROR_OPCODE
    f, _ = P.ERROR_LAYOUT.unpack(fr.payload)
    return f["code"], f["detail"]


def _id(name: str) -> int:
    return next(b.id for b in P.buffer_map(SMALL) if b.name == name)


def test_write_read_round_trip_and_bounds():
    emu = Emulator(SMALL)
    data = bytes(range(1, 41))
    (r,) = _ask(emu, 1, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(data, buffer=_id("op1.man"),
                                                                    offset=216))
    assert r.opcode == P.Op.WRITE | P.RESPONSE_FLAG
    (r,) = _ask(emu, 2, P.Op.READ, P.REQUESTS[P.Op.READ].pack(buffer=_id("op1.man"),
                                                                  offset=216, count=40))
    assert r.payload == data
    # one element past the end: rejected, nothing written
    (r,) = _ask(emu, 3, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(data, buffer=_id("op1.man"),
                                                                    offset=217))
    assert _err(r)[0] == P.ErrorCode.OUT_OF_RANGE
    assert emu.buffers[_id("op1.man")][255] == 40
    (r,) = _ask(emu, 4, P.Op.READ, P.REQUESTS[P.Op.READ].pack(buffer=_id("op1.man"),
                                                                  offset=250, count=7))
    assert _err(r)[0] == P.ErrorCode.OUT_OF_RANGE
    (r,) = _ask(emu, 5, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(b"abc", buffer=_id("fp_in"),
                                                                    offset=0))
    assert _err(r)[0] == P.ErrorCode.BAD_LENGTH       # not a whole FP32 word
    (r,) = _ask(emu, 6, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(b"abcd", buffer=_id("out"),
                                                                    offset=0))
    assert _err(r)[0] == P.ErrorCode.BAD_BUFFER       # results are read-only
    (r,) = _ask(emu, 7, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(b"a", buffer=200, offset=0))
    assert _err(r) == (P.ErrorCode.BAD_BUFFER, 200)
    assert emu.guards_intact()


def test_error_frames():
    emu = Emulator(SMALL)
    (r,) = _ask(emu, 1, 0x42, b"")
    assert _err(r) == (P.ErrorCode.UNKNOWN_OPCODE, 0x42)
    (r,) = _ask(emu, 2, P.Op.READ, b"\x00")
    assert _err(r) == (P.ErrorCode.BAD_LENGTH, 1)
    bad = bytearray(P.encode_frame(3, P.Op.RESET, b""))
    bad[-1] ^= 1
    (r,) = _answers(emu, emu.feed(bytes(bad)))
    assert r.seq == 3 and _err(r)[0] == P.ErrorCode.BAD_CRC
    # GEMM with a K block mismatch (HBFP4 16x16 tiles against MXINT8 1x32 rows)
    g = P.REQUESTS[P.Op.GEMM].pack(a=0, b=1, flags=int(P.GemmFlag.STORE | P.GemmFlag.TRANS_B),
                                   slot_a=0, slot_b=1, a_rows=4, a_cols=16, b_rows=4,
                                   b_cols=16, out_offset=0)
    (r,) = _ask(emu, 4, P.Op.GEMM, g)
    assert _err(r)[0] == P.ErrorCode.BAD_ARGUMENT
    g = P.REQUESTS[P.Op.GEMM].pack(a=0, b=1, flags=0x80, slot_a=0, slot_b=0,
                                   a_rows=4, a_cols=16, b_rows=16, b_cols=4, out_offset=0)
    (r,) = _ask(emu, 5, P.Op.GEMM, g)
    assert _err(r)[0] == P.ErrorCode.BAD_ARGUMENT     # unknown flag bit
    q = P.REQUESTS[P.Op.QUANTIZE].pack(slot=0, dst=0, flags=0, rows=16, cols=16,
                                       src_offset=0, rounding=0, seed=0, exp_code=0)
    (r,) = _ask(emu, 6, P.Op.QUANTIZE, q)
    assert _err(r)[0] == P.ErrorCode.OUT_OF_RANGE     # 256 FP32 inputs > fp_in depth 128


def test_mantissa_out_of_format_range_rejected():
    emu = Emulator(SMALL)
    # HBFP4 mantissas are within +-7; write 8
    _ask(emu, 1, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(b"\x08", buffer=_id("op0.man"),
                                                           offset=3))
    g = P.REQUESTS[P.Op.GEMM].pack(a=0, b=1, flags=int(P.GemmFlag.STORE), slot_a=0, slot_b=0,
                                   a_rows=4, a_cols=16, b_rows=16, b_cols=4, out_offset=0)
    (r,) = _ask(emu, 2, P.Op.GEMM, g)
    assert _err(r) == (P.ErrorCode.DATA_RANGE, 3)


def test_repeated_request_replayed_not_reexecuted():
    emu = Emulator(SMALL)
    frame = P.encode_frame(9, P.Op.RESET, b"")
    a = emu.feed(frame)
    b = emu.feed(frame)
    assert a == b and emu.counters["replayed"] == 1 and emu.counters["RESET"] == 1
    emu.feed(P.encode_frame(10, P.Op.RESET, b""))
    assert emu.counters["RESET"] == 2


def test_info_is_the_device_description():
    emu = Emulator(SMALL)
    blob, off = b"", 0
    while True:
        (r,) = _ask(emu, off & 0xFF, P.Op.INFO, P.REQUESTS[P.Op.INFO].pack(offset=off))
        f, data = P.RESPONSES[P.Op.INFO].unpack(r.payload)
        blob += data
        off += len(data)
        if off >= f["total"]:
            break
    assert f["hash"] == P.device_hash(SMALL)
    assert blob == P.canonical_json(P.device_description(SMALL))


def _random_request(rng: np.random.Generator) -> tuple[int, bytes]:
    """A CRC-valid frame: mostly well-formed commands with hostile field values."""
    kind = rng.random()
    if kind < 0.1:
        return int(rng.integers(0, 256)), rng.bytes(int(rng.integers(0, 64)))
    op = P.Op(int(rng.integers(1, 8)))
    lay = P.REQUESTS[op]
    vals = {}
    for f in lay.fields:
        top = (1 << (8 * f.size)) - 1
        vals[f.name] = int(rng.choice([0, 1, 2, 3, 15, 16, 17, 100, 127, 128, 255, top,
                                       top - 1, int(rng.integers(0, top + 1))])) & top
    data = rng.bytes(int(rng.choice([0, 1, 3, 4, 16, 64, 300]))) if lay.data else b""
    payload = lay.pack(data, **vals)
    if rng.random() < 0.1:
        payload = payload[: int(rng.integers(0, len(payload) + 1))] + rng.bytes(2)
    return int(op), payload


def test_fuzz_bounds_safety(seed):
    rng = np.random.default_rng(seed)
    emu = Emulator(SMALL)
    shapes = [b.shape for b in emu.buffers]
    n_frames = 0
    for i in range(3000):
        op, payload = _random_request(rng)
        if rng.random() < 0.05:      # garbage and broken frames in between
            emu.feed(rng.bytes(int(rng.integers(1, 40))))
        out = emu.feed(P.encode_frame(i & 0xFF, op, payload))
        got = [e for e in FrameParser().feed(out) if isinstance(e, Frame)]
        n_frames += len(got)
        if i % 50 == 0:
            emu.idle()
    assert n_frames >= 2900   # (almost) every request answered exactly once
    assert emu.guards_intact()
    assert [b.shape for b in emu.buffers] == shapes
    assert sum(v for k, v in emu.counters.items() if k.startswith("error_")) > 100
    assert emu.counters["GEMM"] + emu.counters["QUANTIZE"] + emu.counters["WRITE"] > 0


@pytest.mark.parametrize("cut", [3, 10, 50])
def test_partial_frame_dropped_on_idle(cut):
    emu = Emulator(SMALL)
    f = P.encode_frame(1, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(bytes(80), buffer=1, offset=0))
    assert emu.feed(f[:cut]) == b""
    emu.idle()
    out = emu.feed(P.encode_frame(2, P.Op.RESET, b""))
    (r,) = _answers(emu, out)
    assert r.seq == 2 and r.opcode == P.Op.RESET | P.RESPONSE_FLAG


def test_stats_order_is_the_range_trackers_key():
    """READ_STATS min/max use the range tracker's total order on binary32 patterns
    (-0.0 < +0.0), so device and model agree whatever order the outputs come in."""
    from hbfp_hw.gateware.range_tracker import float_key
    from hbfp_hw.host.emulator import _f32_keys, _key_f32
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 1 << 32, 2000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([bits, np.array([0, 0x80000000, 1, 0x80000001], np.uint32)])
    y = bits.view(np.float32)
    y = y[np.isfinite(y)]
    keys = _f32_keys(y)
    assert [int(k) for k in keys] == [float_key(int(b)) for b in y.view(np.uint32)]
    for k, v in zip(keys[-4:], y[-4:]):
        assert np.float32(_key_f32(int(k))).view(np.uint32) == v.view(np.uint32)
    lo = _key_f32(int(keys.min()))
    assert lo == float(y.min()) and np.signbit(lo) == (float(y.min()) < 0)
    pair = _f32_keys(np.array([0.0, -0.0], np.float32))
    assert np.signbit(_key_f32(int(pair.min()))) and not np.signbit(_key_f32(int(pair.max())))


def test_quantize_static_exp_field():
    """STATIC_EXP: exp_code is the slot format's biased code; codes outside
    [emin + bias, emax + bias] are BAD_ARGUMENT 8 (after the flags check, before the
    shape); without the flag the field is ignored; the stored BFP is the golden
    model's with exponent=E."""
    from hbfp_hw.quantize import quantize
    emu = Emulator(SMALL)
    fmt = SMALL.formats[1]                               # MXINT8: codes 0..254 valid
    x = np.linspace(-300, 300, 64, dtype=np.float32).reshape(2, 32)
    _ask(emu, 1, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(x.tobytes(), buffer=_id("fp_in"),
                                                         offset=0))
    Q = P.QuantizeFlag

    def q(seq, flags, code, **kw):
        f = dict(slot=1, dst=0, flags=int(flags), rows=2, cols=32, src_offset=0,
                 rounding=0, seed=0, exp_code=code)
        f.update(kw)
        (r,) = _ask(emu, seq, P.Op.QUANTIZE, P.REQUESTS[P.Op.QUANTIZE].pack(**f))
        return r

    assert fmt.emin + fmt.exp_bias == 0 and fmt.emax + fmt.exp_bias == 254
    for seq, code in ((2, 255), (3, 1000), (4, 0xFFFF)):
        assert _err(q(seq, Q.STATIC_EXP, code)) == (P.ErrorCode.BAD_ARGUMENT, 8)
    assert _err(q(5, Q.STATIC_EXP | 0x04, 255)) == (P.ErrorCode.BAD_ARGUMENT, 2)  # flags 1st
    assert _err(q(6, Q.STATIC_EXP, 255, rows=0)) == (P.ErrorCode.BAD_ARGUMENT, 8)
    assert _err(q(7, Q.STATIC_EXP, 3, rows=0)) == (P.ErrorCode.BAD_ARGUMENT, 0)
    for seq, code in ((8, 0), (9, 127 + 5), (10, 254), (11, 127 + 8)):
        r = q(seq, Q.STATIC_EXP | Q.RETURN, code)
        assert r.opcode == P.Op.QUANTIZE | P.RESPONSE_FLAG
        ref = quantize(x, fmt, exponent=code - fmt.exp_bias)
        codes, man = ref.stream()
        _, data = P.RESPONSES[P.Op.QUANTIZE].unpack(r.payload)
        assert data == codes.astype(np.uint8).tobytes() + man.astype(np.int8).tobytes()
    # flag clear: exp_code ignored (any value), block maxima as before
    r = q(12, Q.RETURN, 0xFFFF)
    codes, man = quantize(x, fmt).stream()
    assert P.RESPONSES[P.Op.QUANTIZE].unpack(r.payload)[1] == (
        codes.astype(np.uint8).tobytes() + man.astype(np.int8).tobytes())
