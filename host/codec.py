"""Sans-IO codec of the wire protocol: bytes in, events out; requests in, bytes out.

Nothing here reads a clock or a port. :class:`FrameParser` turns a byte stream into
frame events and resynchronises after garbage (it looks for the sync bytes, checks
the length limit and the CRC, and after a bad frame rescans from the byte after the
false sync, so a real frame hidden inside a corrupted one is still found).
:class:`HostCodec` adds the host's view: it numbers requests, and classifies frames as
the awaited response, a device error, or a stale/mismatched frame. The device side
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


@dataclass(frozen=True)
class DeviceErrorFrame:
    """An error frame for the pending request (or a BAD_CRC report, whatever its seq)."""

    seq: int
    code: int
    opcode: int
    detail: int

    @property
    def name(self) -> str:
        try:
            return P.ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"


@dataclass(frozen=True)
class SequenceMismatch:
    """A valid frame for another sequence tag (a late or duplicated response)."""

    expected: int | None
    got: int
    opcode: int


@dataclass(frozen=True)
class Malformed:
    """A frame with a good CRC that does not fit the pending request."""

    reason: str


Event = Union[Frame, CrcError, Oversize, Garbage, Truncated, Response, DeviceErrorFrame,
              SequenceMismatch, Malformed]


# -- framing ----------------------------------------------------------------------------
class FrameParser:
    """Byte stream -> :class:`Frame` / error events. Resynchronises after garbage."""

    def __init__(self, max_payload: int = P.MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held (a partial frame or an incomplete sync)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf
        buf += data
        events: list[Event] = []
        skipped = 0
        while buf:
            i = buf.find(P.SYNC)
            if i < 0:
                keep = 1 if buf[-1] == P.SYNC[0] else 0
                skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                break
            if i:
                skipped += i
                del buf[:i]
            if len(buf) < P.HEADER_BYTES:
                break
            length, seq, op = struct.unpack_from("<HBB", buf, 2)
            if length > self.max_payload:
                events.append(Oversize(length))
                del buf[:1]
                continue
            total = P.HEADER_BYTES + length + P.CRC_BYTES
            if len(buf) < total:
                break
            body = bytes(buf[2: P.HEADER_BYTES + length])
            (crc,) = struct.unpack_from("<I", buf, P.HEADER_BYTES + length)
            if P.crc32(body) != crc:
                events.append(CrcError(seq, op, length))
                del buf[:1]
                continue
            events.append(Frame(seq, op, body[4:]))
            del buf[:total]
        if skipped:
            events.insert(0, Garbage(skipped))
        return events

    def idle(self) -> list[Event]:
        """The line went idle: drop a partial frame (the hardware's idle timeout).

        The held bytes are rescanned from the byte after their sync first, so complete
        frames inside a stalled false frame are still delivered.
        """
        if not self._buf:
            return []
        events: list[Event] = [Truncated(len(self._buf))]
        while self._buf:  # each pass drops at least one byte
            held = bytes(self._buf)
            self._buf.clear()
            events += self.feed(held[1:])
        return events

    def reset(self) -> None:
        self._buf.clear()


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
        if ev.opcode == P.ERROR_OPCODE:
            try:
                f, _ = P.ERROR_LAYOUT.unpack(ev.payload)
            except ValueError as e:
                return Malformed(f"error frame: {e}")
            if ev.seq == self.seq or f["code"] == P.ErrorCode.BAD_CRC:
                return DeviceErrorFrame(ev.seq, f["code"], f["opcode"], f["detail"])
            return SequenceMismatch(self.seq, ev.seq, ev.opcode)
        if ev.seq != self.seq or self.pending is None:
            return SequenceMismatch(self.seq, ev.seq, ev.opcode)
        if ev.opcode != (self.pending | P.RESPONSE_FLAG):
            return Malformed(f"response opcode 0x{ev.opcode:02x} to a "
                             f"{self.pending.name} request")
        try:
            f, data = P.RESPONSES[self.pending].unpack(ev.payload)
        except ValueError as e:
            return Malformed(f"{self.pending.name} response: {e}")
        return Response(ev.seq, self.pending, f, data)
