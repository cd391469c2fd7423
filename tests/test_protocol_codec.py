"""Wire protocol definition and the sans-IO codec: CRC, framing, resync, layouts."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, MXINT8
from hbfp_hw.host.codec import (CrcError, DeviceErrorFrame, Frame, FrameParser, Garbage,
                                HostCodec, Malformed, Oversize, Request, Response,
                                SequenceMismatch, Truncated)

payloads = st.binary(min_size=0, max_size=300)
frames = st.tuples(st.integers(0, 255), st.integers(0, 255), payloads)


def _frames_of(events):
    return [(e.seq, e.opcode, e.payload) for e in events if isinstance(e, Frame)]


def test_crc_is_crc32_iso_hdlc():
    # The catalogued check value of CRC-32/ISO-HDLC over b"123456789".
    assert P.crc32(b"123456789") == 0xCBF43926


@given(st.binary(max_size=64))
def test_bitwise_crc_register_matches(data):
    state = 0xFFFFFFFF
    for byte in data:
        state = P.crc32_update(state, byte)
    assert state ^ 0xFFFFFFFF == zlib.crc32(data)


def test_frame_layout_by_hand():
    f = P.encode_frame(7, P.Op.READ, b"\x01\x02")
    body = (2).to_bytes(2, "little") + bytes([7, P.Op.READ]) + b"\x01\x02"
    assert f[0] == 0x7E
    assert f[1:7] == body
    assert f[7:] == P.stuff(zlib.crc32(body).to_bytes(4, "little"))
    assert len(P.unstuff(f[1:])) + 1 == P.FRAME_OVERHEAD + 2


def test_stuffing_hides_the_delimiter():
    payload = bytes([0x7E, 0x7D, 0x00, 0x7E, 0x5E, 0x5D, 0x7D])
    f = P.encode_frame(0x7E, 0x7D, payload)
    assert f[0] == P.DELIM and P.DELIM not in f[1:]
    assert f[1:7] == bytes([7, 0, 0x7D, 0x5E, 0x7D, 0x5D])   # LEN, SEQ 0x7e, OP 0x7d
    assert f[7:11] == bytes([0x7D, 0x5E, 0x7D, 0x5D])
    assert P.decode_frame(f) == (0x7E, 0x7D, payload)
    assert P.unstuff(P.stuff(bytes(range(256)))) == bytes(range(256))
    with pytest.raises(ValueError, match="escape"):
        P.unstuff(b"ab\x7d")
    with pytest.raises(ValueError, match="CRC"):
        P.decode_frame(f[:-1] + bytes([f[-1] ^ 1]))


def test_a_frame_inside_data_is_never_parsed_as_a_frame():
    """WRITE data that holds a complete encoded RESET frame: whatever single byte of the
    carrying frame is destroyed, the parser never delivers the embedded frame."""
    inner = P.encode_frame(3, P.Op.RESET)
    outer = P.encode_frame(4, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
        b"\x00" * 5 + inner + b"\x11" * 7, buffer=0, offset=0))
    assert inner not in outer
    for i in range(len(outer)):
        for bad in (outer[:i] + outer[i + 1:], outer[:i] + b"\x00" + outer[i + 1:]):
            p = FrameParser()
            ev = p.feed(bad) + p.idle()
            assert all(e.opcode != P.Op.RESET for e in ev if isinstance(e, Frame)), i


@settings(max_examples=60, deadline=None)
@given(st.lists(frames, min_size=1, max_size=6), st.lists(st.integers(1, 50), max_size=20),
       st.binary(max_size=40))
def test_round_trip_any_chunking_after_garbage(fs, cuts, garbage):
    garbage = garbage.replace(b"\x7e", b"\x00")  # garbage that holds no delimiter
    stream = garbage + b"".join(P.encode_frame(*f) for f in fs)
    p = FrameParser()
    events, pos = [], 0
    for c in cuts:
        events += p.feed(stream[pos: pos + c])
        pos += c
    events += p.feed(stream[pos:])
    assert _frames_of(events) == [tuple(f) for f in fs]
    assert p.pending == 0
    if garbage:
        assert sum(e.count for e in events if isinstance(e, Garbage)) == len(garbage)


@settings(max_examples=60, deadline=None)
@given(frames, frames, st.data())
def test_corruption_detected_and_next_frame_recovered(f1, f2, data):
    a, b = P.encode_frame(*f1), P.encode_frame(*f2)
    i = data.draw(st.integers(1, len(a) - 1))          # a byte after the delimiter
    x = data.draw(st.integers(1, 255))
    bad = a[:i] + bytes([a[i] ^ x]) + a[i + 1:]
    p = FrameParser()
    events = p.feed(bad + b)
    events += p.idle()
    # the corrupted frame is never delivered; the following one always is
    assert _frames_of(events) == [tuple(f2)]
    assert any(isinstance(e, (CrcError, Truncated, Oversize)) for e in events)


def test_truncated_frame_dropped_at_the_next_delimiter_and_on_idle():
    a, b = P.encode_frame(1, 2, b"x" * 100), P.encode_frame(2, 3, b"yz")
    p = FrameParser()
    ev = p.feed(a[:50] + b)   # a cut short: b's delimiter ends it, b is delivered
    assert isinstance(ev[0], Truncated) and ev[0].count == 50
    assert _frames_of(ev) == [(2, 3, b"yz")]
    ev = p.feed(a[:30])
    assert ev == [] and p.pending == 30
    ev = p.idle()
    assert ev == [Truncated(30)] and p.pending == 0


def test_oversize_length_rejected():
    bogus = bytes([P.DELIM]) + P.stuff((P.MAX_PAYLOAD + 1).to_bytes(2, "little")) + b"\0\0"
    p = FrameParser()
    ev = p.feed(bogus + b"\x01" * 50 + P.encode_frame(9, 1, b""))
    assert isinstance(ev[0], Oversize) and ev[0].length == P.MAX_PAYLOAD + 1
    assert _frames_of(ev) == [(9, 1, b"")]


def test_encode_limits():
    with pytest.raises(ValueError, match=r"payload of .* accepted range is \[0, 4160\]"):
        P.encode_frame(0, 1, bytes(P.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="seq=256"):
        P.encode_frame(256, 1)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(list(P.Op)), st.data())
def test_layout_round_trip(op, data):
    lay = P.REQUESTS[op]
    vals = {f.name: data.draw(st.integers(0, (1 << (8 * f.size)) - 1)) for f in lay.fields}
    blob = data.draw(st.binary(max_size=50)) if lay.data else b""
    got, rest = lay.unpack(lay.pack(blob, **vals))
    assert got == vals and rest == blob
    assert sum(f.size for f in lay.fields) == lay.header_size


def test_layout_rejects_bad_values():
    with pytest.raises(ValueError, match=r"field buffer=256 is out of range"):
        P.REQUESTS[P.Op.READ].pack(buffer=256, offset=0, count=1)
    with pytest.raises(ValueError, match="missing"):
        P.REQUESTS[P.Op.READ].pack(buffer=1)
    with pytest.raises(ValueError, match="payload of 3 bytes"):
        P.REQUESTS[P.Op.READ].unpack(b"abc")


def test_host_codec_classifies():
    c = HostCodec(seq=10)
    req = Request(P.Op.READ, {"buffer": 0, "offset": 0, "count": 2})
    frame = c.encode(req)
    assert P.decode_frame(frame)[0] == 11
    assert P.decode_frame(c.encode(req, retry=True))[0] == 11
    tok = (0x1234_5678).to_bytes(4, "little")
    good = P.encode_frame(11, P.Op.READ | P.RESPONSE_FLAG, tok + b"abcdefgh")
    stale = P.encode_frame(10, P.Op.READ | P.RESPONSE_FLAG, tok + b"zz")
    wrong_op = P.encode_frame(11, P.Op.WRITE | P.RESPONSE_FLAG,
                              tok + P.RESPONSES[P.Op.WRITE].pack(count=1))
    err = P.encode_frame(11, P.ERROR_OPCODE,
                         tok + P.ERROR_LAYOUT.pack(code=5, opcode=3, detail=9))
    crc_err = P.encode_frame(99, P.ERROR_OPCODE,
                             tok + P.ERROR_LAYOUT.pack(code=1, opcode=3, detail=0))
    no_token = P.encode_frame(11, P.Op.READ | P.RESPONSE_FLAG, b"ab")
    ev = c.feed(stale + wrong_op + err + crc_err + no_token + good)
    assert isinstance(ev[0], SequenceMismatch) and ev[0].got == 10
    assert isinstance(ev[1], Malformed)
    assert isinstance(ev[2], DeviceErrorFrame) and ev[2].name == "OUT_OF_RANGE"
    assert ev[2].session == 0x1234_5678
    assert isinstance(ev[3], DeviceErrorFrame) and ev[3].code == P.ErrorCode.BAD_CRC
    assert isinstance(ev[4], Malformed) and "session token" in ev[4].reason
    assert isinstance(ev[5], Response) and ev[5].data == b"abcdefgh"
    assert ev[5].session == 0x1234_5678


def test_sequence_wraps():
    c = HostCodec(seq=255)
    assert P.decode_frame(c.encode(Request(P.Op.RESET)))[0] == 0


# -- configuration and buffer map ----------------------------------------------------------
def test_config_round_trip_and_validation():
    cfg = AcceleratorConfig(formats=(HBFP4, MXINT8), operand_depth=4096, k_max=1024)
    assert AcceleratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"array_rows=65 is out of range; accepted range is "
                                         r"\[1, 64\]"):
        AcceleratorConfig(array_rows=65)
    with pytest.raises(ValueError, match=r"tile=12 must be a multiple of array_rows=8"):
        AcceleratorConfig(tile=12)
    with pytest.raises(ValueError, match=r"k_max=2097152 is out of range"):
        AcceleratorConfig(k_max=1 << 21)
    with pytest.raises(ValueError, match=r"axis 2 is outside a 2-D tensor"):
        AcceleratorConfig(formats=(MXINT8.replace(block_axes=(2,)),))
    with pytest.raises(ValueError, match=r"operand_depth=8 is out of range; accepted range "
                                         r"is \[16, 4194304\]"):
        AcceleratorConfig(operand_depth=8)


def test_accumulator_width_covers_k_max():
    cfg = AcceleratorConfig(k_max=4096)
    # |acc| <= K * 127 * 127 * 2**8 for HBFP8 with 8 guard bits, plus a sign bit.
    bound = 4096 * 127 * 127 * 2**8
    assert cfg.accumulator_bits >= bound.bit_length() + 1


@pytest.mark.parametrize("cfg", [AcceleratorConfig.default(),
                                 AcceleratorConfig(formats=(HBFP4, MXINT8), operand_buffers=4,
                                                   operand_depth=3000, input_depth=100)])
def test_buffer_map_consistent(cfg):
    bm = P.buffer_map(cfg)
    assert [b.id for b in bm] == list(range(len(bm)))
    names = [b.name for b in bm]
    for i in range(cfg.operand_buffers):
        assert f"op{i}.man" in names and f"op{i}.exp" in names
    spans = sorted((b.base, b.base + b.size_bytes) for b in bm)
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 <= s1
    for b in bm:
        assert b.base % (1 << max(0, (b.size_bytes - 1).bit_length())) == 0
        assert b.wire_bytes * 8 >= b.elem_bits
    man = next(b for b in bm if b.name == "op0.man")
    assert man.depth == cfg.operand_depth and man.signed
    assert man.elem_bits == max(f.man_bits for f in cfg.formats)
    exp = next(b for b in bm if b.name == "op0.exp")
    assert exp.depth * min(f.block_size for f in cfg.formats) >= cfg.operand_depth


def test_protocol_json_and_hash():
    cfg = AcceleratorConfig.default()
    js = json.loads(json.dumps(P.protocol_json()))
    assert js["opcodes"]["GEMM"] == P.Op.GEMM
    assert js["requests"]["WRITE"]["data"] is True
    assert P.device_hash(cfg) == P.device_hash(AcceleratorConfig.default())
    assert P.device_hash(cfg) != P.device_hash(cfg.replace(k_max=2048))
    extra = P.manifest_extra(cfg)
    assert extra["device_hash"] == P.device_hash(cfg).hex()
    assert extra["device"]["config"]["k_max"] == 4096
