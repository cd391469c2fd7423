"""The host <-> accelerator wire protocol, defined once.

The host codec (:mod:`hbfp_hw.host.codec`), the device emulator
(:mod:`hbfp_hw.host.emulator`) and the gateware command decoder
(:mod:`hbfp_hw.gateware.cmd_decoder`) all take opcodes, field layouts, limits, error
codes and the buffer map from this module; :func:`protocol_json` exports it for the
manifest.

Frame (all multi-byte integers little endian)::

    +------+--------------------------------------------------------------+
    | 0x7E | stuffed( LEN u16 | SEQ | OP | PAYLOAD (LEN B) | CRC u32 )    |
    +------+--------------------------------------------------------------+
     delimiter  length   tag  code  0..MAX_PAYLOAD       CRC-32

* **Delimiting data cannot forge.** :data:`DELIM` (0x7E) starts every frame and occurs
  nowhere else: after it every byte equal to :data:`DELIM` or :data:`ESC` (0x7D) is sent
  as :data:`ESC` followed by the byte XOR :data:`ESC_XOR` (0x20), the HDLC byte
  stuffing (:func:`stuff` / :func:`unstuff`). A receiver drops a partial frame when a
  delimiter arrives, so a complete, CRC-valid frame inside WRITE data is never parsed
  as a frame, whatever line errors hit the frame carrying it. Stuffing adds 2/256 of
  the bytes on random data, at most doubles them.
* ``LEN`` counts payload bytes only (unstuffed); a frame with ``LEN > MAX_PAYLOAD`` is
  rejected.
* ``SEQ`` is chosen by the host (incremented per new request, kept on retries); the
  response echoes it.
* ``OP`` is an :class:`Op` for requests, ``op | RESPONSE_FLAG`` for responses and
  :data:`ERROR_OPCODE` for error frames.
* ``CRC`` is CRC-32/ISO-HDLC (the Ethernet / zlib CRC: reflected polynomial
  0xEDB88320, init 0xFFFFFFFF, final XOR 0xFFFFFFFF) over ``LEN, SEQ, OP, PAYLOAD``
  (unstuffed). In hardware it is a 32-flop register updated one byte per clock by an
  XOR network (:func:`crc32_update`); 32 bits keep the chance of an undetected
  corrupted frame at 2**-32.

**Session token.** The payload of every response and error frame starts with the
device's session token (:data:`SESSION_BYTES`, u32), then the layout of
:data:`RESPONSES` / :data:`ERROR_LAYOUT`. The token is 0 after power-up and after any
hardware reset; ``SESSION`` sets it. The host sets a random non-zero token when it opens
the device and checks it in every answer: a device that was reset (and lost its buffers)
answers with another token, so the host never takes a result computed from lost
operands.

Reliability: the device remembers the last request (``SEQ`` and CRC) and its response;
a retransmitted request is answered from that record without executing it again, so
retries of non-idempotent commands (accumulating GEMMs, RESET) are safe. A partial
frame is dropped after the line has been idle (:data:`IDLE_TIMEOUT_BYTES` byte times).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .config.accelerator import AcceleratorConfig

__all__ = [
    "PROTOCOL_VERSION", "DELIM", "ESC", "ESC_XOR", "SESSION_BYTES", "HEADER_BYTES",
    "CRC_BYTES", "FRAME_OVERHEAD", "MAX_DATA", "stuff", "unstuff", "decode_frame",
    "split_answer",
    "MAX_PAYLOAD", "RESPONSE_FLAG", "ERROR_OPCODE", "IDLE_TIMEOUT_BYTES", "Op", "ErrorCode",
    "QuantizeFlag", "GemmFlag", "StatsFlag", "BitLayerFlag", "Field", "Layout", "REQUESTS",
    "RESPONSES",
    "ERROR_LAYOUT", "BufferKind", "BufferSpec", "buffer_map", "crc32", "crc32_update",
    "encode_frame", "device_description", "device_hash", "protocol_json", "manifest_extra",
    "info_description", "description_from_info",
    "NO_INDEX", "flag_mask", "BITLAYER_BITS_MAX", "BITLAYER_ACT_BITS",
    "BITLAYER_CHUNKS_MAX", "bitlayer_lanes", "bitlayer_k_max", "bitlayer_depth",
    "LuqGemmFlag", "LuqQuantizeFlag", "LUQ_BITS", "LUQ_SR_BITS", "LUQ_SAMPLES", "luq_lanes",
    "luq_depth", "luq_format", "luq_slots",
    "SparseFlag", "LANE_KINDS", "sparse_lanes", "sparse_nm", "sparse_slots", "sparse_depth",
    "CONV_MODES", "CONV_STRIDES", "conv_built", "conv_plan",
    "MLS_K_MAX", "MLS_QUANT_GROUP", "MLS_TEXP_RANGE", "mls_lanes", "mls_format",
    "mls_depth",
]

#: 2: QUANTIZE carries ``exp_code`` (``STATIC_EXP``), READ_STATS ``QUANTIZE_INPUT``.
#: 3: delimiter and byte stuffing instead of two sync bytes; the session token in every
#: answer; ``SESSION``.
PROTOCOL_VERSION = 3
#: Start-of-frame delimiter: occurs nowhere else on the wire.
DELIM = 0x7E
#: Escape byte of the stuffing: ``ESC, byte ^ ESC_XOR`` stands for ``DELIM`` or ``ESC``.
ESC = 0x7D
ESC_XOR = 0x20
#: Bytes of the session token that starts every answer's payload.
SESSION_BYTES = 4
#: Delimiter, LEN, SEQ, OP (before stuffing).
HEADER_BYTES = 5
CRC_BYTES = 4
FRAME_OVERHEAD = HEADER_BYTES + CRC_BYTES
#: Largest bulk data block in one frame (WRITE data, READ / QUANTIZE / INFO answers).
MAX_DATA = 4096
#: Largest payload: bulk data plus the largest command header.
MAX_PAYLOAD = MAX_DATA + 64
#: Set in the opcode of every response frame.
RESPONSE_FLAG = 0x80
#: Opcode of an error frame.
ERROR_OPCODE = 0xFF
#: The device drops a partial frame after this many byte times without a byte.
IDLE_TIMEOUT_BYTES = 1024
#: "No such index" value of 32-bit index fields.
NO_INDEX = 0xFFFFFFFF


class Op(IntEnum):
    """Request opcodes."""

    INFO = 0x01        #: read the device description (config + protocol) and its hash
    WRITE = 0x02       #: write elements into a buffer
    READ = 0x03        #: read elements from a buffer
    QUANTIZE = 0x04    #: FP32 from fp_in -> BFP into an operand buffer (optionally returned)
    GEMM = 0x05        #: BFP operand buffers -> accumulators (-> FP32 into out)
    READ_STATS = 0x06  #: online min/max of the stored GEMM outputs (or QUANTIZE inputs)
    RESET = 0x07       #: clear buffers, accumulators, statistics
    SESSION = 0x08     #: set the session token every answer carries (0 after a reset)
    BITLAYER = 0x09    #: bit-layer GEMM: weight bit-planes x integer activations -> ints
    LUQ_GEMM = 0x0A    #: shift-add GEMM: LUQ codes (luq.a) x BFP operand -> FP32 into out
    LUQ_QUANTIZE = 0x0B  #: FP32 from fp_in -> 4-bit LUQ codes into luq.a
    MLS_GEMM = 0x0C    #: exact MLS GEMM: element codes + group shifts -> FP32 into out
    MLS_QUANTIZE = 0x0D  #: FP32 from fp_in -> MLS element codes + group shifts
    SPARSE_GEMM = 0x0E  #: N:M sparse GEMM: compressed weight (sp.*) x BFP operand -> FP32 out
    CONV = 0x0F        #: HyperBlock convolution (forward, dX or dW) -> FP32 into out


class ErrorCode(IntEnum):
    """Codes carried by error frames (``detail`` is a 32-bit code-specific value)."""

    BAD_CRC = 1         #: frame CRC mismatch (detail: received LEN)
    UNKNOWN_OPCODE = 2  #: opcode not in :class:`Op` (detail: opcode)
    BAD_LENGTH = 3      #: payload length wrong for the opcode (detail: LEN)
    BAD_BUFFER = 4      #: buffer id unknown or of the wrong kind (detail: id)
    OUT_OF_RANGE = 5    #: address/length outside the buffer (detail: first bad element)
    BAD_ARGUMENT = 6    #: shape, format slot, flags or orientation invalid (detail: field #)
    INVALID_DATA = 7    #: an operand block is flagged invalid (detail: operand<<31 | block)
    DATA_RANGE = 8      #: a mantissa or exponent code is outside its format (detail: index)
    K_OVERFLOW = 9      #: accumulated reduction length exceeds k_max (detail: K total)
    BUSY = 10           #: the device cannot accept the command now
    UNSUPPORTED = 11    #: this build does not implement the command/option (detail: field #)


class QuantizeFlag(IntFlag):
    RETURN = 0x01      #: also return exponent codes and mantissas in the response
    #: every valid block takes the shared exponent ``exp_code - exp_bias`` of the slot
    #: format instead of its block maximum (elements at or above ``2**(E+1)``
    #: saturate; NaN/Inf blocks are still flagged); ``exp_code`` outside
    #: ``[emin + bias, emax + bias]`` is BAD_ARGUMENT (detail 8, the field's index).
    #: Without the flag ``exp_code`` is ignored.
    STATIC_EXP = 0x02


class GemmFlag(IntFlag):
    TRANS_A = 0x01        #: use operand A transposed (stored tensor is (K, M))
    TRANS_B = 0x02        #: use operand B transposed (stored tensor is (N, K))
    ACCUMULATE = 0x04     #: add to the accumulators instead of clearing them
    STORE = 0x08          #: convert accumulators to FP32 into ``out`` at out_offset
    EXT_EREF = 0x10       #: take reference exponents from the ``eref`` buffer
    ALLOW_INVALID = 0x20  #: compute with invalid blocks (their outputs are NaN)


class SparseFlag(IntFlag):
    #: ``dX = dY W`` (the stored tiles read column by column) instead of ``Y = X Wᵀ``
    TRANSPOSE = 0x01


class LuqGemmFlag(IntFlag):
    A_INVALID = 0x01   #: the LUQ operand is flagged invalid: every output is NaN


class LuqQuantizeFlag(IntFlag):
    MAX_ABS = 0x01     #: the scale comes from the ``max_abs`` field (in hindsight)
    CONTINUE = 0x02    #: continue the generators of the previous LUQ_QUANTIZE (no reseed)


class StatsFlag(IntFlag):
    CLEAR = 0x01           #: clear the statistics after reading them
    #: answer (and CLEAR) the statistics of the FP32 elements QUANTIZE read from
    #: ``fp_in`` (the ``rows x cols`` tensor elements, not the block padding) instead
    #: of those of the stored GEMM outputs
    QUANTIZE_INPUT = 0x02
    #: answer (and CLEAR) the statistics of the integer sums BITLAYER commands with
    #: ``BitLayerFlag.TRACK`` wrote into ``bl.y``: ``count`` of them, ``n_nonfinite``
    #: 0, ``min`` / ``max`` as int32 two's-complement words (the other sources answer
    #: binary32 bit patterns). With ``QUANTIZE_INPUT`` as well: BAD_ARGUMENT (detail 0).
    INT_OUTPUT = 0x04


class BitLayerFlag(IntFlag):
    #: add the result to the int32 words already in ``bl.y`` (wrapping) instead of
    #: overwriting them: the K chunks of one integer GEMM summed on the device
    ACCUMULATE = 0x01
    #: fold every word this command writes into ``bl.y`` into the integer-output
    #: statistics (``READ_STATS`` with ``StatsFlag.INT_OUTPUT``)
    TRACK = 0x02


def flag_mask(flags: type[IntFlag]) -> int:
    """Every bit a flags field of type ``flags`` may set (others are BAD_ARGUMENT)."""
    mask = 0
    for f in flags:
        mask |= int(f)
    return mask


# ---------------------------------------------------------------------------------------
# Payload layouts
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One fixed-size payload field: unsigned little-endian integer, f32 or raw bytes."""

    name: str
    size: int
    kind: str = "u"  # "u", "f32", "bytes"

    @property
    def struct_code(self) -> str:
        if self.kind == "f32":
            return "f"
        if self.kind == "bytes":
            return f"{self.size}s"
        return {1: "B", 2: "H", 4: "I"}[self.size]


@dataclass(frozen=True)
class Layout:
    """A payload: fixed fields, optionally followed by variable-length bulk data."""

    fields: tuple[Field, ...]
    data: bool = False

    @property
    def header_size(self) -> int:
        return sum(f.size for f in self.fields)

    @property
    def _struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(f.struct_code for f in self.fields))

    def index(self, name: str) -> int:
        """Position of field ``name`` (the detail of a BAD_ARGUMENT naming it)."""
        return [f.name for f in self.fields].index(name)

    def offsets(self) -> dict[str, int]:
        """Byte offset of every field (the gateware decoder's field map)."""
        out, pos = {}, 0
        for f in self.fields:
            out[f.name] = pos
            pos += f.size
        return out

    def pack(self, data: bytes = b"", **values: Any) -> bytes:
        names = [f.name for f in self.fields]
        missing = set(names) - set(values)
        extra = set(values) - set(names)
        if missing or extra:
            raise ValueError(f"fields {sorted(missing)} missing / {sorted(extra)} unknown; "
                             f"layout has {names}")
        if data and not self.data:
            raise ValueError("this layout carries no bulk data")
        for f in self.fields:
            v = values[f.name]
            if f.kind == "u" and not 0 <= int(v) < 1 << (8 * f.size):
                raise ValueError(f"field {f.name}={v} is out of range; accepted range is "
                                 f"[0, {(1 << (8 * f.size)) - 1}]")
        return self._struct.pack(*(values[n] for n in names)) + bytes(data)

    def unpack(self, payload: bytes) -> tuple[dict[str, Any], bytes]:
        """``(fields, data)``; raises ``ValueError`` on a wrong length."""
        n = self.header_size
        if len(payload) < n or (not self.data and len(payload) != n):
            raise ValueError(f"payload of {len(payload)} bytes; layout needs "
                             f"{n}{'+' if self.data else ''}")
        vals = self._struct.unpack_from(payload, 0)
        return dict(zip((f.name for f in self.fields), vals)), bytes(payload[n:])

    def to_json(self) -> dict:
        return {"fields": [{"name": f.name, "size": f.size, "kind": f.kind,
                            "offset": o} for f, o in zip(self.fields, self.offsets().values())],
                "data": self.data}


def _L(*fields: tuple, data: bool = False) -> Layout:
    return Layout(tuple(Field(*f) for f in fields), data)


#: Request payload layouts.
REQUESTS: dict[Op, Layout] = {
    Op.INFO: _L(("offset", 4)),
    Op.WRITE: _L(("buffer", 1), ("offset", 4), data=True),
    Op.READ: _L(("buffer", 1), ("offset", 4), ("count", 2)),
    Op.QUANTIZE: _L(("slot", 1), ("dst", 1), ("flags", 1), ("rows", 2), ("cols", 2),
                    ("src_offset", 4), ("rounding", 1), ("seed", 4), ("exp_code", 2)),
    Op.GEMM: _L(("a", 1), ("b", 1), ("flags", 1), ("slot_a", 1), ("slot_b", 1),
                ("a_rows", 2), ("a_cols", 2), ("b_rows", 2), ("b_cols", 2),
                ("out_offset", 4)),
    Op.READ_STATS: _L(("flags", 1)),
    Op.RESET: _L(),
    Op.SESSION: _L(("token", 4)),
    Op.BITLAYER: _L(("bits", 1), ("layers", 1), ("rows", 2), ("cols", 2), ("batch", 2),
                    ("w_offset", 4), ("x_offset", 4), ("y_offset", 4), ("flags", 1)),
    Op.LUQ_GEMM: _L(("flags", 1), ("b", 1), ("slot_b", 1), ("samples", 1), ("rows", 2),
                    ("k", 2), ("cols", 2), ("alpha", 4), ("a_offset", 4), ("out_offset", 4)),
    Op.LUQ_QUANTIZE: _L(("flags", 1), ("count", 4), ("src_offset", 4), ("dst_offset", 4),
                        ("seed", 4), ("max_abs", 4)),
    Op.SPARSE_GEMM: _L(("flags", 1), ("x", 1), ("slot_x", 1), ("slot_w", 1), ("batch", 2),
                       ("w_rows", 2), ("w_cols", 2), ("w_offset", 4), ("e_offset", 4),
                       ("out_offset", 4)),
    Op.CONV: _L(("mode", 1), ("a", 1), ("b", 1), ("slot_a", 1), ("slot_b", 1), ("n", 2),
                ("c", 2), ("h", 2), ("w", 2), ("o", 2), ("kh", 1), ("kw", 1),
                ("stride_h", 1), ("stride_w", 1), ("pad_h", 1), ("pad_w", 1),
                ("dil_h", 1), ("dil_w", 1), ("out_offset", 4)),
    Op.MLS_GEMM: _L(("rows", 2), ("cols", 2), ("groups", 2), ("group_words", 1),
                    ("exp_a", 2), ("exp_b", 2), ("a_offset", 4), ("b_offset", 4),
                    ("ga_offset", 4), ("gb_offset", 4), ("y_offset", 4)),
    Op.MLS_QUANTIZE: _L(("dst", 1), ("rows", 2), ("cols", 2), ("src_offset", 4),
                        ("texp", 2), ("rounding", 1), ("seed", 4), ("codes_offset", 4),
                        ("g_offset", 4)),
}

#: Response payload layouts (opcode ``op | RESPONSE_FLAG``).
RESPONSES: dict[Op, Layout] = {
    Op.INFO: _L(("version", 2), ("hash", 32, "bytes"), ("total", 4), data=True),
    Op.WRITE: _L(("count", 4)),
    Op.READ: _L(data=True),
    Op.QUANTIZE: _L(("n_invalid", 4), ("first_invalid", 4), data=True),
    Op.GEMM: _L(("k_total", 4)),
    # min / max: raw 32-bit words, binary32 bit patterns (GEMM outputs, QUANTIZE inputs)
    # or int32 (StatsFlag.INT_OUTPUT); Device.read_stats decodes them
    Op.READ_STATS: _L(("count", 4), ("n_nonfinite", 4), ("min", 4), ("max", 4)),
    Op.RESET: _L(),
    Op.SESSION: _L(),
    Op.BITLAYER: _L(),
    Op.LUQ_GEMM: _L(),
    Op.LUQ_QUANTIZE: _L(("alpha", 4), ("max_abs", 4), ("saturated", 4)),
    Op.SPARSE_GEMM: _L(),
    Op.CONV: _L(),
    Op.MLS_GEMM: _L(),
    Op.MLS_QUANTIZE: _L(),
}

#: Error frame payload layout (opcode :data:`ERROR_OPCODE`).
ERROR_LAYOUT = _L(("code", 1), ("opcode", 1), ("detail", 4))


# ---------------------------------------------------------------------------------------
# CRC and frames
# ---------------------------------------------------------------------------------------
CRC32_POLY_REFLECTED = 0xEDB88320


def crc32(data: bytes, crc: int = 0) -> int:
    """CRC-32/ISO-HDLC of ``data`` (same as :func:`zlib.crc32`)."""
    return zlib.crc32(data, crc) & 0xFFFFFFFF


def crc32_update(state: int, byte: int) -> int:
    """One byte of the CRC register as hardware computes it (pre-inverted state).

    Start from ``0xFFFFFFFF``; the CRC is ``state ^ 0xFFFFFFFF`` after the last byte.
    """
    state ^= byte & 0xFF
    for _ in range(8):
        state = (state >> 1) ^ (CRC32_POLY_REFLECTED if state & 1 else 0)
    return state


def stuff(data: bytes) -> bytes:
    """Byte stuffing: every :data:`DELIM` / :data:`ESC` becomes ``ESC, byte ^ ESC_XOR``."""
    if DELIM not in data and ESC not in data:
        return bytes(data)
    out = bytearray()
    for b in data:
        if b == DELIM or b == ESC:
            out += bytes((ESC, b ^ ESC_XOR))
        else:
            out.append(b)
    return bytes(out)


def unstuff(data: bytes) -> bytes:
    """Inverse of :func:`stuff` (``data`` holds no delimiter; a trailing lone
    :data:`ESC` raises ``ValueError``)."""
    if ESC not in data:
        return bytes(data)
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESC:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("stuffed data ends with an escape byte")
            out.append(nxt ^ ESC_XOR)
        else:
            out.append(b)
    return bytes(out)


def encode_frame(seq: int, opcode: int, payload: bytes = b"") -> bytes:
    """A complete frame: the delimiter, then header, payload and CRC, stuffed."""
    if not 0 <= seq <= 0xFF:
        raise ValueError(f"seq={seq} is out of range; accepted range is [0, 255]")
    if not 0 <= opcode <= 0xFF:
        raise ValueError(f"opcode={opcode} is out of range; accepted range is [0, 255]")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes; accepted range is "
                         f"[0, {MAX_PAYLOAD}]")
    body = struct.pack("<HBB", len(payload), seq, opcode) + bytes(payload)
    return bytes((DELIM,)) + stuff(body + struct.pack("<I", crc32(body)))


def decode_frame(raw: bytes) -> tuple[int, int, bytes]:
    """``(seq, opcode, payload)`` of exactly one encoded frame (``ValueError`` if ``raw``
    is not one complete frame with a good CRC)."""
    if len(raw) < 1 or raw[0] != DELIM or DELIM in raw[1:]:
        raise ValueError("not one frame: it must start with the delimiter 0x7e and hold "
                         "no other")
    body = unstuff(raw[1:])
    if len(body) < HEADER_BYTES - 1 + CRC_BYTES:
        raise ValueError(f"frame of {len(body)} unstuffed bytes is too short")
    length, seq, op = struct.unpack_from("<HBB", body, 0)
    if len(body) != 4 + length + CRC_BYTES:
        raise ValueError(f"LEN={length} does not match the frame's {len(body)} bytes")
    if crc32(body[:-CRC_BYTES]) != struct.unpack_from("<I", body, len(body) - CRC_BYTES)[0]:
        raise ValueError("CRC mismatch")
    return seq, op, bytes(body[4:-CRC_BYTES])


def split_answer(payload: bytes) -> tuple[int, bytes]:
    """``(session token, rest)`` of a response or error frame's payload."""
    if len(payload) < SESSION_BYTES:
        raise ValueError(f"answer payload of {len(payload)} bytes has no session token")
    return (int.from_bytes(payload[:SESSION_BYTES], "little"),
            bytes(payload[SESSION_BYTES:]))


# ---------------------------------------------------------------------------------------
# Buffer map
# ---------------------------------------------------------------------------------------
class BufferKind(IntEnum):
    FP32 = 0      #: IEEE binary32 words
    MANTISSA = 1  #: signed two's-complement mantissas, block-stream order
    EXPONENT = 2  #: biased exponent codes, one per block, block-stream order
    EREF = 3      #: external reference exponent codes: rows then columns
    PLANES = 4    #: weight bit-plane words of the bit-layer GEMM (bit l = lane l)
    INT = 5       #: signed integers (bit-layer GEMM activations and results)
    #: LUQ codes, one per element (u8, bits 3..0 used: sign << 3 | magnitude code)
    LUQ_CODES = 6
    #: MLS element codes, ``mls_lanes`` 8-bit codes per word (lane l in bits 8l..8l+7)
    MLS_CODES = 7
    #: MLS group shifts, one per group (u8)
    MLS_SHIFTS = 8
    #: compressed N:M weight slots (``sp.man`` kept mantissas, ``sp.idx`` in-tile column
    #: indices), ``tile`` slots per word like the operand mantissas
    SPARSE = 9
    #: biased exponent codes of the compressed weight's BFP blocks (``sp.exp``)
    SPARSE_EXP = 10


@dataclass(frozen=True)
class BufferSpec:
    """One on-chip buffer.

    ``id`` is what WRITE/READ/QUANTIZE/GEMM name; ``base`` is a byte address in a flat
    map (each buffer aligned to a power of two) for documentation and debug access.
    ``operand`` groups the mantissa and exponent halves of operand buffer ``opN``.
    """

    id: int
    name: str
    kind: BufferKind
    depth: int
    elem_bits: int
    wire_bytes: int
    signed: bool
    base: int
    operand: int | None = None
    writable: bool = True

    @property
    def size_bytes(self) -> int:
        return self.depth * self.wire_bytes

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind.name.lower(),
                "depth": self.depth, "elem_bits": self.elem_bits,
                "wire_bytes": self.wire_bytes, "signed": self.signed, "base": self.base,
                "operand": self.operand, "writable": self.writable}


def _wire_bytes(bits: int) -> int:
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


def buffer_map(config: "AcceleratorConfig") -> tuple[BufferSpec, ...]:
    """The on-chip buffers of ``config``, in id order.

    ``fp_in`` (FP32 quantizer input), ``opN.man`` / ``opN.exp`` for each operand
    buffer, ``out`` (FP32 results) and ``eref`` (external reference exponents, rows
    first then columns, for GEMMs split along K).
    """
    specs: list[tuple] = [("fp_in", BufferKind.FP32, config.input_depth, 32, False, None,
                           True)]
    for i in range(config.operand_buffers):
        specs.append((f"op{i}.man", BufferKind.MANTISSA, config.operand_depth,
                      config.man_bits_max, True, i, True))
        specs.append((f"op{i}.exp", BufferKind.EXPONENT, config.exponent_depth,
                      config.exp_bits_max, False, i, True))
    specs.append(("out", BufferKind.FP32, config.output_depth, 32, False, None, False))
    specs.append(("eref", BufferKind.EREF, eref_depth(config), 16, False, None, True))
    lanes = bitlayer_lanes(config)
    if lanes:
        specs.append(("bl.w", BufferKind.PLANES, bitlayer_depth(config, "w"), lanes, False,
                      None, True))
        specs.append(("bl.x", BufferKind.INT, bitlayer_depth(config, "x"), BITLAYER_ACT_BITS,
                      True, None, True))
        specs.append(("bl.y", BufferKind.INT, bitlayer_depth(config, "y"), 32, True, None,
                      False))
    if luq_lanes(config):
        specs.append(("luq.a", BufferKind.LUQ_CODES, luq_depth(config), LUQ_BITS, False, None,
                      True))
    if sparse_lanes(config):
        specs.append(("sp.man", BufferKind.SPARSE, sparse_depth(config, "slots"),
                      config.man_bits_max, True, None, True))
        specs.append(("sp.idx", BufferKind.SPARSE, sparse_depth(config, "slots"), 8, False,
                      None, True))
        specs.append(("sp.exp", BufferKind.SPARSE_EXP, sparse_depth(config, "exp"),
                      config.exp_bits_max, False, None, True))
    mlanes = mls_lanes(config)
    if mlanes:
        for side in ("a", "b"):
            specs.append((f"mls.{side}", BufferKind.MLS_CODES, mls_depth(config, "codes"),
                          8 * mlanes, False, None, True))
        for side in ("a", "b"):
            specs.append((f"mls.g{side}", BufferKind.MLS_SHIFTS, mls_depth(config, "shifts"),
                          8, False, None, True))
    out, base = [], 0
    for i, (name, kind, depth, bits, signed, operand, writable) in enumerate(specs):
        wb = _wire_bytes(bits)
        size = depth * wb
        align = 1 << max(0, (size - 1).bit_length())
        base = -(-base // align) * align
        out.append(BufferSpec(i, name, kind, depth, bits, wb, signed, base, operand, writable))
        base += size
    return tuple(out)


#: Weight bit-planes per row a BITLAYER command may use (``bits`` field: 1 .. this).
BITLAYER_BITS_MAX = 8
#: Width of the ``bl.x`` activations (signed).
BITLAYER_ACT_BITS = 16
#: Plane words per row and plane a BITLAYER command may use: ``cols <= lanes * this``.
BITLAYER_CHUNKS_MAX = 8


def bitlayer_lanes(config: "AcceleratorConfig") -> int:
    """Weight bits per ``bl.w`` word (the bit-serial engine's lanes; 0: no engine)."""
    return config.bitlayer_lanes            # validated by AcceleratorConfig


def bitlayer_k_max(config: "AcceleratorConfig") -> int:
    """Largest ``cols`` (K) of a BITLAYER command."""
    return bitlayer_lanes(config) * BITLAYER_CHUNKS_MAX


def bitlayer_depth(config: "AcceleratorConfig", which: str) -> int:
    """Elements of ``bl.w`` (an eighth of ``operand_depth``), ``bl.x`` (an eighth of
    ``input_depth``) and ``bl.y`` (an eighth of ``output_depth``), at least 64."""
    base = {"w": config.operand_depth, "x": config.input_depth,
            "y": config.output_depth}[which]
    return max(64, base // 8)


#: Largest K (``groups * group_words * mls_lanes``) of an MLS_GEMM command: sizes the
#: exact accumulator (57 bits for the E2M4 elements and 4-bit group shifts).
MLS_K_MAX = 4096
#: Group length of MLS_QUANTIZE (elements per group along a row: the quantizer's lanes).
MLS_QUANT_GROUP = 16
#: Accepted tensor exponents (``exp_a``, ``exp_b``, ``texp``: int16 two's complement).
MLS_TEXP_RANGE = (-200, 200)


def mls_lanes(config: "AcceleratorConfig") -> int:
    """Element codes per ``mls.a`` / ``mls.b`` word and multipliers of the MLS engine
    (0: no engine)."""
    return config.mls_lanes                 # validated by AcceleratorConfig


def mls_format(config: "AcceleratorConfig"):
    """The MLS element format of the device's MLS engine: E2M4 elements, 4-bit group
    shifts, groups of :data:`MLS_QUANT_GROUP` along rows, stochastic rounding with
    ``sr_lanes = MLS_QUANT_GROUP`` (the :data:`hbfp_hw.mls.MLS_E2M4` preset's widths)."""
    from .mls import MLS_E2M4
    return MLS_E2M4.replace(group_size=MLS_QUANT_GROUP, sr_lanes=MLS_QUANT_GROUP)


def mls_depth(config: "AcceleratorConfig", which: str) -> int:
    """Words of ``mls.a`` / ``mls.b`` (``which="codes"``) and entries of ``mls.ga`` /
    ``mls.gb`` (``"shifts"``): an eighth of ``operand_depth``, at least 64."""
    if which not in ("codes", "shifts"):
        raise ValueError(f"which={which!r}; accepted values are 'codes', 'shifts'")
    return max(64, config.operand_depth // 8)


#: CONV ``mode`` values: 0 forward ``Y = conv(X, W)``, 1 input gradient ``dX`` (from dY and
#: W), 2 weight gradient ``dW`` (from dY and X) -- ``hbfp_hw.conv`` ``bfp_conv2d``,
#: ``bfp_conv2d_input_grad``, ``bfp_conv2d_weight_grad``.
CONV_MODES = ("forward", "input_grad", "weight_grad")
#: Accepted CONV strides (per axis): powers of two, so the dX index map is a shift.
CONV_STRIDES = (1, 2, 4, 8)


def conv_built(config: "AcceleratorConfig") -> bool:
    """Whether the GEMM engine has the CONV address generator (``config.conv``)."""
    return bool(config.conv)                # validated by AcceleratorConfig


def conv_plan(mode: int, n: int, c: int, h: int, w: int, o: int, kh: int, kw: int,
              stride: tuple[int, int], pad: tuple[int, int], dil: tuple[int, int],
              tile: int) -> dict:
    """Block counts of a CONV command (``tile x tile`` blocks; fields already checked).

    ``gn, gc, go``: sample / channel / output-channel blocks; ``ho, wo``: output size;
    ``blocks_a`` / ``blocks_b``: blocks of the operands in ``a`` / ``b`` (forward X, W;
    dX dY, W; dW dY, X); ``mt x nt`` output tiles of ``nk`` K-blocks each. The answer in
    ``out`` is the ``(mt * tile) x (nt * tile)`` row-major matrix of output tiles
    (padding rows and columns included): forward rows ``((nb * ho + p) * wo + q) * tile
    + n``, columns ``o``; dX rows ``((nb * h + y) * w + x) * tile + n``, columns ``c``; dW
    rows ``o``, columns ``((cb * kh + i) * kw + j) * tile + c``.
    """
    T = tile
    gn, gc, go = -(-n // T), -(-c // T), -(-o // T)
    ho = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    xb, wb, yb = gn * gc * h * w, go * gc * kh * kw, gn * go * ho * wo
    mt, nt, nk = ((gn * ho * wo, go, kh * kw * gc), (gn * h * w, gc, kh * kw * go),
                  (go, gc * kh * kw, gn * ho * wo))[mode]
    ba, bb = ((xb, wb), (yb, wb), (yb, xb))[mode]
    return {"gn": gn, "gc": gc, "go": go, "ho": ho, "wo": wo, "blocks_a": ba,
            "blocks_b": bb, "mt": mt, "nt": nt, "nk": nk}


#: Buffer kinds stored as words of ``tile`` elements (one write enable per lane); every
#: other buffer is one element per word.
LANE_KINDS = frozenset({BufferKind.MANTISSA, BufferKind.SPARSE})


def sparse_lanes(config: "AcceleratorConfig") -> int:
    """``M`` of the sparse engine's ``N:M`` pattern (its output lanes; 0: no engine)."""
    return config.sparse_lanes              # validated by AcceleratorConfig


def sparse_nm(config: "AcceleratorConfig") -> tuple[int, int]:
    """``(N, M)`` of the sparse engine: ``N = M / 2`` (2:4 or 4:8)."""
    m = sparse_lanes(config)
    return m // 2, m


def sparse_slots(config: "AcceleratorConfig") -> int:
    """Kept slots per ``M x M`` weight tile (``N * M``): ``sp.man`` / ``sp.idx``
    elements per tile."""
    n, m = sparse_nm(config)
    return n * m


def sparse_depth(config: "AcceleratorConfig", which: str) -> int:
    """Elements of ``sp.man`` / ``sp.idx`` (``which="slots"``: half of
    ``operand_depth``, the kept half of a dense operand) and of ``sp.exp`` (``"exp"``:
    half of ``exponent_depth``, at least 64)."""
    if which == "slots":
        return max(config.tile, sparse_slots(config),
                   config.operand_depth // 2 // config.tile * config.tile)
    if which == "exp":
        return max(64, config.exponent_depth // 2)
    raise ValueError(f"which={which!r}; accepted values are 'slots', 'exp'")


#: Code width of the device's LUQ format (sign + 3-bit magnitude code: ``luq4``).
LUQ_BITS = 4
#: Random bits per element of the device's LUQ quantizer.
LUQ_SR_BITS = 16
#: Accepted SMP sample counts of LUQ_GEMM (``samples`` field).
LUQ_SAMPLES = (1, 2, 4, 8, 16)


def luq_lanes(config: "AcceleratorConfig") -> int:
    """Generator lanes of the LUQ quantizer (``LUQFormat.lanes`` it draws with; 0: no
    LUQ engine)."""
    return config.luq_lanes                 # validated by AcceleratorConfig


def luq_depth(config: "AcceleratorConfig") -> int:
    """Codes in ``luq.a``: ``input_depth``, at least 1024."""
    return max(1024, config.input_depth)


def luq_format(config: "AcceleratorConfig", *, samples: int = 1, seed: int = 0):
    """The :class:`~hbfp_hw.luq.LUQFormat` the device computes with: 4-bit codes,
    :data:`LUQ_SR_BITS` random bits, ``lanes = luq_lanes(config)``."""
    from .luq import LUQFormat
    return LUQFormat(bits=LUQ_BITS, sr_bits=LUQ_SR_BITS, lanes=max(1, luq_lanes(config)),
                     samples=samples, seed=seed)


def luq_slots(config: "AcceleratorConfig") -> list[int]:
    """Format slots LUQ_GEMM takes its BFP operand from: square ``tile x tile`` blocks
    (one K block of ``tile`` rows per exponent, ``tile`` columns per buffer word)."""
    T = config.tile
    return [i for i in range(len(config.formats)) if config.block_2d(i) == (T, T)]


def eref_depth(config: "AcceleratorConfig") -> int:
    """Entries of the ``eref`` buffer: row blocks then column blocks of an output tile.

    ``2 * output_depth / tile`` covers any output tile of at least ``tile`` rows and
    columns; the host shrinks tiles that would need more.
    """
    return max(64, 2 * config.output_depth // config.tile)


def buffers_by_name(config: "AcceleratorConfig") -> dict[str, BufferSpec]:
    return {b.name: b for b in buffer_map(config)}


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------
def protocol_json() -> dict:
    """The configuration-independent protocol definition."""
    return {
        "version": PROTOCOL_VERSION,
        "framing": {"delimiter": DELIM, "escape": ESC, "escape_xor": ESC_XOR,
                    "stuffed": "LEN SEQ OP PAYLOAD CRC"},
        "session_bytes": SESSION_BYTES,
        "header_bytes": HEADER_BYTES,
        "crc": {"name": "CRC-32/ISO-HDLC", "poly_reflected": CRC32_POLY_REFLECTED,
                "init": 0xFFFFFFFF, "xorout": 0xFFFFFFFF, "bytes": CRC_BYTES,
                "covers": "LEN SEQ OP PAYLOAD"},
        "max_data": MAX_DATA,
        "max_payload": MAX_PAYLOAD,
        "response_flag": RESPONSE_FLAG,
        "error_opcode": ERROR_OPCODE,
        "idle_timeout_bytes": IDLE_TIMEOUT_BYTES,
        "opcodes": {op.name: int(op) for op in Op},
        "errors": {e.name: int(e) for e in ErrorCode},
        "flags": {"quantize": {f.name: int(f) for f in QuantizeFlag},
                  "gemm": {f.name: int(f) for f in GemmFlag},
                  "luq_gemm": {f.name: int(f) for f in LuqGemmFlag},
                  "luq_quantize": {f.name: int(f) for f in LuqQuantizeFlag},
                  "sparse_gemm": {f.name: int(f) for f in SparseFlag},
                  "stats": {f.name: int(f) for f in StatsFlag},
                  "bitlayer": {f.name: int(f) for f in BitLayerFlag}},
        "requests": {op.name: REQUESTS[op].to_json() for op in Op},
        "responses": {op.name: RESPONSES[op].to_json() for op in Op},
        "error_payload": ERROR_LAYOUT.to_json(),
    }


def device_description(config: "AcceleratorConfig") -> dict:
    """What INFO returns (as canonical JSON): protocol, config and buffer map."""
    return {"protocol": protocol_json(), "config": config.to_dict(),
            "buffers": [b.to_json() for b in buffer_map(config)]}


def info_description(config: "AcceleratorConfig") -> dict:
    """The JSON object INFO answers with: the whole :func:`device_description`, or with
    ``config.info_rom == "config"`` its ``"config"`` entry only (a smaller ROM). INFO's
    hash is :func:`device_hash` either way; :func:`description_from_info` restores the
    whole description on the host."""
    desc = device_description(config)
    if getattr(config, "info_rom", "full") == "config":
        return {"config": desc["config"]}
    return desc


def description_from_info(info: dict) -> dict:
    """The device description from an INFO JSON object: as it is when it carries the
    protocol and the buffer map, else derived from its ``"config"`` (an ``info_rom
    "config"`` build). Check the result against INFO's hash (:func:`device_hash`)."""
    if "protocol" in info and "buffers" in info:
        return info
    from .config.accelerator import AcceleratorConfig
    return device_description(AcceleratorConfig.from_dict(info["config"]))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def device_hash(config: "AcceleratorConfig") -> bytes:
    """SHA-256 of the canonical device description (INFO's ``hash`` field)."""
    return hashlib.sha256(canonical_json(device_description(config))).digest()


def manifest_extra(config: "AcceleratorConfig") -> dict:
    """Keys the accelerator top adds to its manifest (``write_manifest(extra=...)``)."""
    return {"device": device_description(config), "device_hash": device_hash(config).hex()}
