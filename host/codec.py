"""Sans-IO codec of the wire protocol: bytes in, events out; requests in, bytes out.

Nothing here reads a clock or a port. :class:`FrameParser` turns a byte stream into
frame events: it starts a frame at each delimiter, unstuffs, checks the length limit
and the CRC. :class:`HostCodec` adds the host's view: it numbers requests, splits the
session token off every answer, and classifies frames as the awaited response, a device
error, or a frame for another sequence tag. The device side
(:mod:`hbfp_hw.host.emulator`) uses :class:`FrameParser` directly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Union

from hbfp_hw import protocol as P

__all__ = ["Frame", "CrcError", "Oversize", "Garbage", "Truncated", "FrameParser",
           "Request", "Response", "DeviceErrorFrame", "SequenceMismatch", "Malformed",
           "HostCodec", "Event"]


# -- events -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """A frame whose CRC checked."""

    seq: int
    opcode: int
    payload: bytes


@dataclass(frozen=True)
class CrcError:
    """A frame-shaped byte run whose CRC did not match (header fields as received)."""

    seq: int
    opcode: int
    length: int


@dataclass(frozen=True)
class Oversize:
    """A sync followed by a length above ``MAX_PAYLOAD`` (a false or corrupted sync)."""

    length: int


@dataclass(frozen=True)
class Garbage:
    """Bytes skipped while looking for a sync."""

    count: int


@dataclass(frozen=True)
class Truncated:
    """A partial frame dropped because the line went idle."""

    count: int


@dataclass(frozen=True)
class Response:
    """The response to the pending request."""

    seq: int
    op: P.Op
    fields: dict[str, Any]
    data: bytes
    session: int = 0


@dataclass(frozen=True)
class DeviceErrorFrame:
    """An error frame for the pending request (or a BAD_CRC report, whatever its seq)."""

    seq: int
    code: int
    opcode: int
    detail: int
    session: int = 0

    @property
    def name(self) -> str:
        try:
            return P.ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"


@dataclass(frozen=True)
class SequenceMismatch:
    """A valid frame for another sequence tag (a late or duplicated response, or the
    answer to a request the host never sent)."""

    expected: int | None
    got: int
    opcode: int
    payload: bytes = b""


@dataclass(frozen=True)
class Malformed:
    """A frame with a good CRC that does not fit the pending request."""

    reason: str


Event = Union[Frame, CrcError, Oversize, Garbage, Truncated, Response, DeviceErrorFrame,
              SequenceMismatch, Malformed]


# -- framing ----------------------------------------------------------------------------
class FrameParser:
    """Byte stream -> :class:`Frame` / error events (see :mod:`hbfp_hw.protocol`).

    A frame starts at the delimiter; its bytes are unstuffed as they arrive. A delimiter
    inside a partial frame drops it (:class:`Truncated`) and starts the next; bytes
    outside a frame are counted as :class:`Garbage`. Delimiting does not depend on
    ``LEN``, so data cannot hide a frame and one line error loses at most the frames it
    hits.
    """

    def __init__(self, max_payload: int = P.MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._frame: bytearray | None = None    # unstuffed bytes of the current frame
        self._raw = 0                           # wire bytes of the current frame
        self._esc = False
        self._skip = False                      # rest of an oversize frame

    @property
    def pending(self) -> int:
        """Wire bytes held (a partial frame)."""
        return self._raw if self._frame is not None else 0

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        garbage = [0]
        data = bytes(data)
        pos = 0
        while pos < len(data):
            j = data.find(P.DELIM, pos)
            end = j if j >= 0 else len(data)
            if end > pos:
                self._take(data[pos:end], events, garbage)
            if j < 0:
                break
            if self._frame is not None and self._raw > 1 and not self._skip:
                events.append(Truncated(self._raw))
            self._frame, self._raw, self._esc, self._skip = bytearray(), 1, False, False
            pos = j + 1
        if garbage[0]:
            events.insert(0, Garbage(garbage[0]))
        return events

    def _take(self, seg: bytes, events: list, garbage: list) -> None:
        if self._frame is None or self._skip:
            garbage[0] += len(seg)
            return
        self._raw += len(seg)
        out, i = self._frame, 0
        if self._esc:
            out.append(seg[0] ^ P.ESC_XOR)
            i, self._esc = 1, False
        while True:
            k = seg.find(P.ESC, i)
            if k < 0:
                out += seg[i:]
                break
            out += seg[i:k]
            if k + 1 < len(seg):
                out.append(seg[k + 1] ^ P.ESC_XOR)
                i = k + 2
            else:
                self._esc = True
                break
        fr = self._frame
        if len(fr) < 4:
            return
        length, seq, op = struct.unpack_from("<HBB", fr, 0)
        if length > self.max_payload:
            events.append(Oversize(length))
            self._skip = True
            return
        total = 4 + length + P.CRC_BYTES
        if len(fr) < total:
            return
        body = bytes(fr[: 4 + length])
        (crc,) = struct.unpack_from("<I", fr, 4 + length)
        if P.crc32(body) != crc:
            events.append(CrcError(seq, op, length))
        else:
            events.append(Frame(seq, op, body[4:]))
        extra = len(fr) - total
        if extra:   # bytes after a complete frame, before the next delimiter
            garbage[0] += extra
        self._frame, self._raw, self._esc = None, 0, False

    def idle(self) -> list[Event]:
        """The line went idle: drop a partial frame (the hardware's idle timeout)."""
        ev: list[Event] = []
        if self._frame is not None and self._raw > 1 and not self._skip:
            ev.append(Truncated(self._raw))
        self.reset()
        return ev

    def reset(self) -> None:
        self._frame, self._raw, self._esc, self._skip = None, 0, False, False


# -- host view --------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A request: opcode, header fields and bulk data (see :data:`protocol.REQUESTS`)."""

    op: P.Op
    fields: dict[str, Any] = field(default_factory=dict)
    data: bytes = b""

    def payload(self) -> bytes:
        return P.REQUESTS[self.op].pack(self.data, **self.fields)


class HostCodec:
    """Host side of the protocol: numbers requests and classifies incoming frames.

    Parameters
    ----------
    seq
        Sequence tag of the first request minus one (mod 256).
    """

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq & 0xFF
        self.pending: P.Op | None = None
        self._parser = FrameParser()

    def encode(self, request: Request, *, retry: bool = False) -> bytes:
        """Frame a request. A new request takes the next tag; a retry keeps it."""
        if not isinstance(request, Request):
            raise TypeError(f"encode needs a Request, got {type(request).__name__}")
        if not retry:
            self.seq = (self.seq + 1) & 0xFF
        self.pending = P.Op(request.op)
        return P.encode_frame(self.seq, int(request.op), request.payload())

    def feed(self, data: bytes) -> list[Event]:
        return [self._classify(e) for e in self._parser.feed(data)]

    def idle(self) -> list[Event]:
        return [self._classify(e) for e in self._parser.idle()]

    def _classify(self, ev: Event) -> Event:
        if not isinstance(ev, Frame):
            return ev
        try:
            session, body = P.split_answer(ev.payload)
        except ValueError as e:
            return Malformed(f"frame 0x{ev.opcode:02x}: {e}")
        if ev.opcode == P.ERROR_OPCODE:
            try:
                f, _ = P.ERROR_LAYOUT.unpack(body)
            except ValueError as e:
                return Malformed(f"error frame: {e}")
            if ev.seq == self.seq or f["code"] == P.ErrorCode.BAD_CRC:
                return DeviceErrorFrame(ev.seq, f["code"], f["opcode"], f["detail"], session)
            return SequenceMismatch(self.seq, ev.seq, ev.opcode, ev.payload)
        if ev.seq != self.seq or self.pending is None:
            return SequenceMismatch(self.seq, ev.seq, ev.opcode, ev.payload)
        if ev.opcode != (self.pending | P.RESPONSE_FLAG):
            return Malformed(f"response opcode 0x{ev.opcode:02x} to a "
                             f"{self.pending.name} request")
        try:
            f, data = P.RESPONSES[self.pending].unpack(body)
        except ValueError as e:
            return Malformed(f"{self.pending.name} response: {e}")
        return Response(ev.seq, self.pending, f, data, session)
