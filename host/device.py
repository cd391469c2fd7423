"""The ``Device`` API: quantize and multiply on an accelerator through any transport.

``Device`` sits on a :class:`~hbfp_hw.host.codec.HostCodec` and a
:class:`~hbfp_hw.host.transport.Transport`; it retries on CRC errors and timeouts,
checks the device's INFO against the expected build, tiles operands larger than the
on-chip buffers and reassembles results bit-identical to the golden model::

    import numpy as np
    import hbfp_hw.host as host
    with host.open("emulate://") as dev:
        y = dev.matmul(np.ones((40, 70), np.float32), np.ones((70, 30), np.float32))
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import BFPFormat
from hbfp_hw.gemm import k_block_length
from hbfp_hw.quantize import (BFPTensor, NonFiniteBlockError, block_layout, check_exponent,
                             quantize)

from .codec import (CrcError, DeviceErrorFrame, HostCodec, Malformed, Oversize, Request,
                    Response, SequenceMismatch, Truncated)
from .transport import LoopbackTransport, SerialTransport, Transport

__all__ = ["Device", "DeviceError", "LinkError", "DeviceResetError", "ProtocolError",
           "ConfigMismatchError", "FormatMismatchError", "open", "URL_SCHEMES",
           "gemm_clock_bound"]

URL_SCHEMES = ("emulate", "sim", "serial")
_U16 = 0xFFFF


def gemm_clock_bound(M: int, K: int, N: int) -> int:
    """Clocks a GEMM of ``M x K @ K x N`` takes on the device at most, whatever the slot:
    the operand scans (a few clocks per element) plus the slowest datapath (the MX
    reference datapath, about six clocks per product). Added to the answer timeout."""
    return 6 * M * N * K + 8 * (M * K + K * N + M * N) + 4096


class DeviceError(RuntimeError):
    """The device answered with an error frame."""

    def __init__(self, code: int, opcode: int, detail: int) -> None:
        try:
            name = P.ErrorCode(code).name
        except ValueError:
            name = f"error code {code}"
        try:
            opname = P.Op(opcode).name
        except ValueError:
            opname = f"opcode 0x{opcode:02x}"
        super().__init__(f"device rejected {opname}: {name} (detail {detail})")
        self.code, self.opcode, self.detail = code, opcode, detail


class LinkError(TimeoutError):
    """No valid answer after all retries (timeouts or corrupted frames), or the link
    itself failed (a serial port that vanished)."""


class DeviceResetError(LinkError):
    """The device was reset (power cycle, reconfiguration) since the session began: its
    answer carries another session token, so operands it held are gone. The host has
    dropped what it cached on the device and opened a new session; the operation that
    saw the reset did not complete and may be run again."""


class ProtocolError(LinkError):
    """A valid answer to a request this host never sent (another host on the link, or
    a frame the device parsed out of corrupted bytes). The host resynchronised and
    dropped what it cached on the device; the operation did not complete."""


class ConfigMismatchError(ValueError):
    """The device's INFO does not match the expected manifest / configuration."""


class FormatMismatchError(ValueError):
    """A format asked for is not one the device implements."""


def _as_real(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real floating-point (or integer) array, got dtype "
                        f"{a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    if a.dtype != np.float32:
        with np.errstate(over="ignore"):
            a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def _block2(t: BFPTensor) -> tuple[int, int]:
    b = t.layout.block
    return int(b[0]), int(b[1])


def _slice_q(t: BFPTensor, r0: int, r1: int, c0: int, c1: int) -> BFPTensor:
    """Sub-tensor ``t[r0:r1, c0:c1]`` cut at block boundaries (no re-quantization)."""
    br, bc = _block2(t)
    gr0, gc0 = r0 // br, c0 // bc
    gr1, gc1 = -(-r1 // br), -(-c1 // bc)
    man = t.mantissas[gr0 * br: gr1 * br, gc0 * bc: gc1 * bc]
    return BFPTensor(t.fmt, (r1 - r0, c1 - c0), man, t.exponents[gr0:gr1, gc0:gc1],
                     t.invalid[gr0:gr1, gc0:gc1])


def _check_nonfinite(nonfinite: object) -> None:
    if nonfinite not in ("raise", "flag"):
        raise ValueError(f"nonfinite={nonfinite!r}; accepted values are 'raise', 'flag'")


def _nonfinite_error(name: str, grid: tuple[int, ...], flat: int, block: tuple[int, ...],
                     shape: tuple[int, ...]) -> NonFiniteBlockError:
    idx = tuple(int(i) for i in np.unravel_index(flat, grid))
    span = ", ".join(f"{i * b}:{min((i + 1) * b, s)}" for i, b, s in zip(idx, block, shape))
    nb = int(np.prod(grid))
    return NonFiniteBlockError(
        f"tensor {name!r} holds NaN or Inf in block {idx} (block {flat} of {nb} in stream "
        f"order; elements [{span}]); pass nonfinite='flag' to mark such blocks invalid "
        f"instead", idx, flat, name)


#: Where :meth:`Device.matmul` and :meth:`Device.train_step` quantize FP32 operands.
QUANTIZE_ON = ("auto", "device", "host")
#: What :meth:`Device.read_stats` reads: GEMM outputs, QUANTIZE inputs or the integer
#: sums of tracked BITLAYER commands.
STATS_SOURCES = ("gemm", "quantize", "int")


class Device:
    """An accelerator behind a transport.

    Parameters
    ----------
    transport
        The byte pipe.
    expected_hash
        SHA-256 of the device description the host expects (from the manifest); a
        device answering another hash raises :class:`ConfigMismatchError`.
    expected_config
        The configuration the host expects (used for the hash and for a readable diff).
    timeout
        Seconds to wait for an answer before retrying (a per-frame transfer allowance at
        the transport's byte rate is added).
    retries
        Retransmissions per request before :class:`LinkError`.
    progress
        Show a tqdm bar on transfers over 1 MiB (``None``: only on a terminal).
    """

    def __init__(self, transport: Transport, *, expected_hash: bytes | None = None,
                 expected_config: AcceleratorConfig | None = None, timeout: float = 1.0,
                 retries: int = 8, progress: bool | None = None, seq: int = 0,
                 chunk: int = P.MAX_DATA) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(f"transport must be a Transport, got {type(transport).__name__}")
        self.transport = transport
        if not isinstance(chunk, int) or not 4 <= chunk <= P.MAX_DATA:
            raise ValueError(f"chunk={chunk!r} is out of range; accepted range is "
                             f"[4, {P.MAX_DATA}] bytes")
        self.chunk = chunk
        self._frame_chunk = chunk        # shrinks on a bad link, grows back
        self._ok_streak = 0
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.progress = progress
        self.link = Counter()
        self._codec = HostCodec(seq)
        self._bar = None
        self._resident: dict[int, tuple] = {}
        self._closed = False
        self._clock_hz = 0.0             # known after INFO: bounds compute time
        self._benign: set[tuple[int, int]] = set()   # (seq, opcode) of old answers
        self.session = 0
        self._new_session()
        if expected_config is not None and expected_hash is None:
            expected_hash = P.device_hash(expected_config)
        known = expected_config
        if known is None and expected_hash is None:
            # a transport that builds the device (sim://) knows its configuration; INFO's
            # hash is still checked against it before it is used
            known = getattr(transport, "config", None)
            known = known if isinstance(known, AcceleratorConfig) else None
        self.description, self.hash = self._read_info(known)
        self.config = AcceleratorConfig.from_dict(self.description["config"])
        if expected_hash is not None and bytes(expected_hash) != self.hash:
            diff = ""
            if expected_config is not None:
                exp, got = expected_config.to_dict(), self.description["config"]
                keys = sorted(k for k in set(exp) | set(got) if exp.get(k) != got.get(k))
                diff = "; differing keys: " + ", ".join(
                    f"{k} (expected {exp.get(k)!r}, device {got.get(k)!r})" for k in keys)
            raise ConfigMismatchError(
                f"device description hash {self.hash.hex()[:16]}... does not match the "
                f"expected {bytes(expected_hash).hex()[:16]}...{diff}")
        self._clock_hz = float(self.config.clock_hz)
        self._specs = {s.name: s for s in P.buffer_map(self.config)}
        if [s.to_json() for s in self._specs.values()] != self.description["buffers"]:
            raise ConfigMismatchError("device buffer map differs from the one derived from "
                                      "its configuration (protocol version skew?)")

    # -- link layer --------------------------------------------------------------------
    #: Smallest bulk chunk the link falls back to on errors (bytes).
    MIN_CHUNK = 256

    def _new_session(self) -> None:
        """A fresh random non-zero session token, set on the device (``SESSION``)."""
        import secrets
        self.session = secrets.randbits(32) or 1
        self._call(P.Op.SESSION, token=self.session)

    def _device_reset(self, got: int) -> None:
        self.link["device_resets"] += 1
        self._resident.clear()
        expected = self.session
        self._new_session()
        raise DeviceResetError(
            f"the device was reset: its answer carries session token 0x{got:08x}, this "
            f"host set 0x{expected:08x}; the operands it held are lost, the operation did "
            f"not complete (a new session is open, run it again)")

    def _after_answer(self, rest: list) -> None:
        """Frames that came with the answer, in the same read: duplicates of it are
        counted, an answer to a request this host never sent raises."""
        for ev in rest:
            if isinstance(ev, (Response, DeviceErrorFrame)):
                self.link["stale_frames"] += 1            # a second copy of the answer
            elif isinstance(ev, SequenceMismatch):
                if (ev.got, ev.opcode) in self._benign:
                    self.link["stale_frames"] += 1
                else:
                    self._unexpected(ev)

    def _unexpected(self, ev: SequenceMismatch) -> None:
        self.link["unexpected_answers"] += 1
        self._resident.clear()
        self._resync()
        raise ProtocolError(
            f"the device answered a request this host never sent (SEQ {ev.got}, opcode "
            f"0x{ev.opcode:02x}; awaited SEQ {ev.expected}); its buffers are no longer "
            f"trusted and were dropped from the host's cache")

    def _resync(self) -> None:
        """Drain the line until it is quiet, then forget any partial frame."""
        quiet = max(0.05, 64 / self.transport.byte_rate) if self.transport.byte_rate \
            else 0.05
        for _ in range(64):
            if not self._io(self.transport.read, quiet):
                break
        self._codec._parser.reset()

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:       # a vanished serial port, a closed pipe
            raise LinkError(f"the link failed: {e}") from e

    def _link_trouble(self) -> None:
        self._ok_streak = 0
        self._frame_chunk = max(min(self.MIN_CHUNK, self.chunk), self._frame_chunk // 2)

    def _link_ok(self) -> None:
        self._ok_streak += 1
        if self._ok_streak >= 32 and self._frame_chunk < self.chunk:
            self._frame_chunk = min(self.chunk, self._frame_chunk * 2)
            self._ok_streak = 0

    def answer_timeout(self, frame_bytes: int, compute_clocks: int = 0) -> float:
        """Seconds to wait for an answer: ``timeout``, plus on a transport with a byte
        rate the transfer of the request and of the largest answer (stuffed: up to twice
        the bytes), plus ``compute_clocks`` at the device's clock."""
        rate = self.transport.byte_rate
        t = self.timeout
        if rate:
            t += 2 * (frame_bytes + 2 * P.MAX_PAYLOAD) / rate
            if compute_clocks and self._clock_hz:
                t += compute_clocks / self._clock_hz
        return t

    def _call(self, op: P.Op, data: bytes = b"", *, compute_clocks: int = 0,
              **fields: Any) -> Response:
        if self._closed:
            raise RuntimeError("device is closed")
        req = Request(op, fields, data)
        frame = self._codec.encode(req)
        timeout = self.answer_timeout(len(frame), compute_clocks)
        last = "no answer"
        for attempt in range(self.retries + 1):
            if attempt:
                self.link["retries"] += 1
                frame = self._codec.encode(req, retry=True)
            self._io(self.transport.write, frame)
            self.link["bytes_tx"] += len(frame)
            self.link["frames_tx"] += 1
            deadline = time.monotonic() + timeout
            retry = False
            while not retry:
                chunk = self._io(self.transport.read, max(0.0, deadline - time.monotonic()))
                self.link["bytes_rx"] += len(chunk)
                if chunk:
                    events = self._codec.feed(chunk)
                else:
                    self.link["timeouts"] += 1
                    last = "timeout"
                    events = self._codec.idle()
                    retry = True
                for i, ev in enumerate(events):
                    if isinstance(ev, (Response, DeviceErrorFrame)) and \
                            ev.session != self.session:
                        self._benign.add((ev.seq, P.ERROR_OPCODE))
                        self._benign.add((ev.seq, int(op) | P.RESPONSE_FLAG))
                        self._device_reset(ev.session)
                    if isinstance(ev, Response):
                        if self._bar is not None:
                            self._bar.update(len(frame) + len(ev.data))
                        self._benign = {(ev.seq, int(op) | P.RESPONSE_FLAG),
                                        (ev.seq, P.ERROR_OPCODE)}
                        if attempt == 0:
                            self._link_ok()
                        self._after_answer(events[i + 1:])
                        return ev
                    if isinstance(ev, DeviceErrorFrame):
                        if ev.code == P.ErrorCode.BAD_CRC:
                            self.link["device_crc_errors"] += 1
                            last = "device saw a bad CRC"
                            retry = True
                            self._link_trouble()
                        else:
                            self._benign = {(ev.seq, int(op) | P.RESPONSE_FLAG),
                                            (ev.seq, P.ERROR_OPCODE)}
                            self._after_answer(events[i + 1:])
                            raise DeviceError(ev.code, ev.opcode, ev.detail)
                    elif isinstance(ev, (CrcError, Oversize, Malformed, Truncated)):
                        self.link[type(ev).__name__] += 1
                        last = type(ev).__name__
                        retry = True
                        self._link_trouble()
                    elif isinstance(ev, SequenceMismatch):
                        if (ev.got, ev.opcode) in self._benign:
                            self.link["stale_frames"] += 1   # a duplicate of an old answer
                        else:
                            self._unexpected(ev)
            if last == "timeout":
                self._link_trouble()
        # an answer to this request may still come: it is not a foreign request's
        self._benign |= {(self._codec.seq, int(op) | P.RESPONSE_FLAG),
                         (self._codec.seq, P.ERROR_OPCODE)}
        raise LinkError(f"{op.name}: no valid answer after {self.retries} retries "
                        f"(last problem: {last})")

    @contextmanager
    def _progress(self, nbytes: int, desc: str) -> Iterator[None]:
        show = self.progress
        if show is None:
            import sys
            show = nbytes > (1 << 20) and sys.stderr.isatty()
        if not show or self._bar is not None:
            yield
            return
        from tqdm import tqdm
        self._bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc=desc, leave=False)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def _read_info(self, expected_config: AcceleratorConfig | None = None
                   ) -> tuple[dict, bytes]:
        """INFO: the description and its hash. When the first answer's hash is that of
        ``expected_config`` the description is that config's (the hash covers it) and
        the rest of the blob is read only when :meth:`info` asks for it (a slow link,
        e.g. ``sim://``, then opens in one INFO exchange)."""
        self._info_partial = False
        r = self._call(P.Op.INFO, offset=0)
        if (expected_config is not None and r.fields["version"] == P.PROTOCOL_VERSION
                and r.fields["hash"] == P.device_hash(expected_config)):
            self._info_partial = True
            return P.device_description(expected_config), r.fields["hash"]
        return self._read_info_blob(r)

    def _read_info_blob(self, first=None) -> tuple[dict, bytes]:
        """The whole INFO blob (``first``: the answer at offset 0, if already read)."""
        blob, off, total, digest = b"", 0, None, b""
        while total is None or off < total:
            r = first if first is not None else self._call(P.Op.INFO, offset=off)
            first = None
            if r.fields["version"] != P.PROTOCOL_VERSION:
                raise ConfigMismatchError(f"device speaks protocol version "
                                          f"{r.fields['version']}, host {P.PROTOCOL_VERSION}")
            total, digest = r.fields["total"], r.fields["hash"]
            if not r.data and off < total:
                raise ConfigMismatchError("device INFO answer ended early")
            blob += r.data
            off += len(r.data)
        desc = P.description_from_info(json.loads(blob))   # info_rom "config": derived
        if P.device_hash(AcceleratorConfig.from_dict(desc["config"])) != digest:
            raise ConfigMismatchError("device INFO hash does not match its own description")
        return desc, digest

    def _write(self, name: str, offset: int, values: np.ndarray) -> None:
        s = self._specs[name]
        dt = {1: "i1" if s.signed else "u1", 2: "<i2" if s.signed else "<u2",
              4: "<i4" if s.signed and s.kind != P.BufferKind.FP32 else "<u4"}
        raw = np.ascontiguousarray(values).reshape(-1)
        if s.kind == P.BufferKind.FP32:
            raw = raw.astype(np.float32).view("<u4")
        raw = raw.astype(dt[s.wire_bytes]).tobytes()
        i = 0
        while i < len(raw):   # the chunk adapts to the link between frames
            step = max(s.wire_bytes, self._frame_chunk // s.wire_bytes * s.wire_bytes)
            self._call(P.Op.WRITE, raw[i: i + step], buffer=s.id,
                       offset=offset + i // s.wire_bytes)
            self.link["payload_tx"] += len(raw[i: i + step])
            i += step

    def _read(self, name: str, offset: int, count: int) -> np.ndarray:
        s = self._specs[name]
        parts = []
        i = 0
        while i < count:
            n = min(max(1, self._frame_chunk // s.wire_bytes), count - i)
            r = self._call(P.Op.READ, buffer=s.id, offset=offset + i, count=n)
            if len(r.data) != n * s.wire_bytes:
                raise LinkError(f"READ of {n} elements returned {len(r.data)} bytes")
            parts.append(r.data)
            self.link["payload_rx"] += len(r.data)
            i += n
        raw = b"".join(parts)
        if s.kind == P.BufferKind.FP32:
            return np.frombuffer(raw, "<f4").astype(np.float32)
        dt = {1: "i1" if s.signed else "u1", 2: "<i2" if s.signed else "<u2",
              4: "<i4" if s.signed else "<u4"}[s.wire_bytes]
        return np.frombuffer(raw, dt)

    # -- public: device ------------------------------------------------------------------
    def info(self) -> dict:
        """The device description (protocol, config, buffer map) and its hash."""
        if self._info_partial:
            desc, digest = self._read_info_blob()
            if digest != self.hash:
                raise ConfigMismatchError("device INFO hash changed since the device was "
                                          "opened")
            self.description, self._info_partial = desc, False
        return {**self.description, "hash": self.hash.hex()}

    def read_stats(self, *, clear: bool = False, source: str = "gemm") -> dict:
        """Online statistics since the last clear/reset: ``count`` (finite elements),
        ``n_nonfinite``, ``min``, ``max`` (0.0 while ``count`` is 0).

        ``source="gemm"`` (default): the GEMM outputs stored into ``out``;
        ``source="quantize"``: the FP32 tensor elements QUANTIZE read from ``fp_in``
        (every tile :meth:`quantize` sent, not the block padding); ``source="int"``: the
        int32 sums BITLAYER commands with ``TRACK`` wrote (:meth:`bitlayer_matmul` with
        ``track=True``), ``min`` / ``max`` as Python ints (0 while ``count`` is 0).
        ``clear`` empties that record after reading it; the others are kept.
        """
        if source not in STATS_SOURCES:
            raise ValueError(f"source={source!r}; accepted values are "
                             f"{', '.join(map(repr, STATS_SOURCES))}")
        flags = ((int(P.StatsFlag.CLEAR) if clear else 0)
                 | (int(P.StatsFlag.QUANTIZE_INPUT) if source == "quantize" else 0)
                 | (int(P.StatsFlag.INT_OUTPUT) if source == "int" else 0))
        r = self._call(P.Op.READ_STATS, flags=flags)
        out = dict(r.fields)
        for k in ("min", "max"):                 # raw 32-bit words
            w = np.array([out[k]], dtype=np.uint32)
            out[k] = int(w.view(np.int32)[0]) if source == "int" else float(
                w.view(np.float32)[0])
        return out

    def reset(self) -> None:
        """Clear the device's buffers, accumulators and statistics."""
        self._call(P.Op.RESET)
        self._resident.clear()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.close()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- formats ---------------------------------------------------------------------
    def _quantize_slot(self, fmt: BFPFormat | None, shape: tuple[int, int]) -> int:
        if fmt is None:
            return 0
        if not isinstance(fmt, BFPFormat):
            raise TypeError(f"fmt must be a BFPFormat, got {type(fmt).__name__}")

        def key(f: BFPFormat) -> tuple:
            k = (f.man_bits, f.exp_bits, block_layout(shape, f).block)
            # rounding mode and seed are run-time QUANTIZE fields; sr widths are not
            return k + ((f.sr_bits, f.sr_lanes) if fmt.rounding == "stochastic" else ())

        for i, f in enumerate(self.config.formats):
            if key(f) == key(fmt):
                return i
        raise FormatMismatchError(
            f"the device does not implement format {fmt.describe()}; its format slots are: "
            + "; ".join(f"[{i}] {f.describe()}" for i, f in enumerate(self.config.formats)))

    def _operand_slot(self, t: BFPTensor, name: str) -> tuple[int, bool]:
        block = _block2(t)
        for trans in (False, True):
            want = (t.fmt.man_bits, t.fmt.exp_bits, block[::-1] if trans else block)
            for i, f in enumerate(self.config.formats):
                if (f.man_bits, f.exp_bits, self.config.block_2d(i)) == want:
                    return i, trans
        raise FormatMismatchError(
            f"operand {name!r} ({t.fmt.man_bits}-bit mantissas, {t.fmt.exp_bits}-bit "
            f"exponents, blocks {block}) matches no device format slot: "
            + "; ".join(f"[{i}] {f.describe()}" for i, f in enumerate(self.config.formats)))

    # -- quantize --------------------------------------------------------------------
    def _fits_onchip(self, shape: tuple[int, int], slot: int) -> bool:
        cfg = self.config
        lay = block_layout(shape, cfg.formats[slot])
        return (shape[0] * shape[1] <= cfg.input_depth and shape[0] <= _U16
                and shape[1] <= _U16 and lay.num_blocks * lay.block_size <= cfg.operand_depth
                and lay.num_blocks <= cfg.exponent_depth)

    def _quantize_tile(self, x: np.ndarray, slot: int, dst: int, fmt: BFPFormat | None, *,
                       ret: bool, exponent: int | None = None):
        """FP32 tile -> fp_in -> QUANTIZE into operand ``dst``; returns the response.
        ``exponent``: a static shared exponent (``STATIC_EXP``), already validated."""
        fmt = fmt or self.config.formats[slot]
        self._resident.pop(dst, None)
        self._write("fp_in", 0, x)
        Q = P.QuantizeFlag
        flags = (Q.RETURN if ret else 0) | (Q.STATIC_EXP if exponent is not None else 0)
        code = 0 if exponent is None else exponent + self.config.formats[slot].exp_bias
        return self._call(P.Op.QUANTIZE, slot=slot, dst=dst, flags=int(flags),
                          rows=x.shape[0], cols=x.shape[1], src_offset=0,
                          rounding=fmt.rounding_code, seed=fmt.seed, exp_code=code,
                          compute_clocks=8 * x.size + 4096)

    def _check_exponent(self, exponent: Any, slot: int) -> int | None:
        """``exponent`` as an int in the slot format's ``[emin, emax]`` (or None)."""
        if exponent is None:
            return None
        return check_exponent(exponent, self.config.formats[slot], f"format slot {slot}")

    def quantize_tiles(self, shape: tuple[int, int], fmt: BFPFormat | None = None,
                       ) -> list[tuple[int, int, int, int]]:
        """The ``(r0, r1, c0, c1)`` tiles of whole blocks :meth:`quantize` sends as
        separate QUANTIZE commands for a tensor of ``shape`` (one when it fits)."""
        slot = self._quantize_slot(fmt, tuple(shape))
        br, bc = block_layout(tuple(shape), self.config.formats[slot]).block
        R, C = shape
        cap = min(self.config.input_depth, self.config.operand_depth)
        Ct = min(-(-C // bc) * bc, _U16 // bc * bc, cap // br // bc * bc)
        if Ct == 0:
            raise ValueError(f"one block ({br}x{bc}) does not fit the device buffers")
        Rt = min(-(-R // br) * br, _U16 // br * br, cap // Ct // br * br)
        return [(r0, min(R, r0 + Rt), c0, min(C, c0 + Ct))
                for r0 in range(0, R, Rt) for c0 in range(0, C, Ct)]

    def quantize(self, x: Any, fmt: BFPFormat | None = None, *, nonfinite: str = "raise",
                 name: str = "x", exponent: int | None = None) -> BFPTensor:
        """Quantize ``x`` on the device; bit-identical to :func:`hbfp_hw.quantize`.

        Tensors larger than the device's ``fp_in`` buffer are quantized in tiles of
        whole blocks (stochastic rounding restarts its random stream per QUANTIZE, so a
        stochastic format needs the tensor to fit in one tile).

        ``exponent``: a static shared exponent ``E`` for every valid block (QUANTIZE
        ``STATIC_EXP``, the same ``E`` for every tile), in the slot format's
        ``[emin, emax]``; bit-identical to ``quantize(x, fmt, exponent=E)``.

        A device built without the QUANTIZE engine (``config.quantize`` 0) answers it with
        UNSUPPORTED; there the golden model quantizes on the host (the same bits, no
        tiling, nothing sent), after the same format and exponent checks.
        """
        _check_nonfinite(nonfinite)
        x = _as_real(x, name)
        slot = self._quantize_slot(fmt, x.shape)
        exponent = self._check_exponent(exponent, slot)
        dfmt = self.config.formats[slot]
        fmt = fmt or dfmt
        if not self.config.quantize:
            return quantize(x, fmt, nonfinite=nonfinite, name=name, exponent=exponent)
        lay = block_layout(x.shape, dfmt)
        br, bc = lay.block
        cap = min(self.config.input_depth, self.config.operand_depth)
        tiles = self.quantize_tiles(x.shape, fmt)
        if fmt.rounding == "stochastic" and len(tiles) > 1:
            raise ValueError(
                f"tensor {name!r} of shape {x.shape} needs {len(tiles)} QUANTIZE tiles; "
                f"stochastic rounding restarts its random stream per QUANTIZE, so a "
                f"stochastic format needs at most {cap} elements")
        man = np.zeros(lay.padded, dtype=np.int8 if dfmt.man_bits <= 8 else np.int16)
        codes = np.zeros(lay.grid, dtype=np.int64)
        first_bad = None
        mwb, ewb = self._specs["op0.man"].wire_bytes, self._specs["op0.exp"].wire_bytes
        with self._progress(5 * x.size, f"quantize {name}"):
            for r0, r1, c0, c1 in tiles:
                tile = x[r0:r1, c0:c1]
                tl = block_layout(tile.shape, dfmt)
                n, nb = tl.num_blocks * tl.block_size, tl.num_blocks
                ret = n * mwb + nb * ewb <= self.chunk
                r = self._quantize_tile(tile, slot, 0, fmt, ret=ret, exponent=exponent)
                if ret:
                    tc = np.frombuffer(r.data[: nb * ewb], "u1" if ewb == 1 else "<u2")
                    tm = np.frombuffer(r.data[nb * ewb:], "i1" if mwb == 1 else "<i2")
                    self.link["payload_rx"] += len(r.data)
                else:
                    tc = self._read("op0.exp", 0, nb)
                    tm = self._read("op0.man", 0, n)
                tq = BFPTensor.from_stream(dfmt, tile.shape, tc, tm.reshape(nb, -1))
                gr, gc = r0 // br, c0 // bc
                man[r0: r0 + tl.padded[0], c0: c0 + tl.padded[1]] = tq.mantissas
                codes[gr: gr + tl.grid[0], gc: gc + tl.grid[1]] = tc.reshape(tl.grid)
                if r.fields["n_invalid"]:
                    li = np.unravel_index(r.fields["first_invalid"], tl.grid)
                    flat = int(np.ravel_multi_index((gr + li[0], gc + li[1]), lay.grid))
                    first_bad = flat if first_bad is None else min(first_bad, flat)
        if first_bad is not None and nonfinite == "raise":
            raise _nonfinite_error(name, lay.grid, first_bad, lay.block, x.shape)
        invalid = codes == dfmt.exp_invalid_code
        exps = np.where(invalid, dfmt.emin, codes - dfmt.exp_bias).astype(np.int16)
        return BFPTensor(fmt, tuple(x.shape), man, exps, invalid)

    # -- GEMM ------------------------------------------------------------------------
    def _load_operand(self, buf: int, t: BFPTensor, trans: bool, key: tuple) -> tuple:
        """Write tile ``t`` (stored transposed if ``trans``) into operand ``buf``."""
        stored = t.T if trans else t
        if self._resident.get(buf) != key:
            codes, man = stored.stream()
            self._resident.pop(buf, None)
            self._write(f"op{buf}.exp", 0, codes)
            self._write(f"op{buf}.man", 0, man)
            self._resident[buf] = key
        return stored.shape

    def _gemm(self, a: int, a_shape, ta: bool, slot_a: int, b: int, b_shape, tb: bool,
              slot_b: int, flags: int) -> int:
        G = P.GemmFlag
        flags |= (G.TRANS_A if ta else 0) | (G.TRANS_B if tb else 0)
        M, K = (a_shape[1], a_shape[0]) if ta else a_shape
        N = b_shape[0] if tb else b_shape[1]
        r = self._call(P.Op.GEMM, a=a, b=b, flags=int(flags), slot_a=slot_a, slot_b=slot_b,
                       a_rows=a_shape[0], a_cols=a_shape[1], b_rows=b_shape[0],
                       b_cols=b_shape[1], out_offset=0,
                       compute_clocks=gemm_clock_bound(M, K, N))
        return r.fields["k_total"]

    def _check_operands(self, a_q: BFPTensor, b_q: BFPTensor, allow_invalid: bool,
                        names=("a", "b")) -> None:
        for t, n in ((a_q, names[0]), (b_q, names[1])):
            if not isinstance(t, BFPTensor):
                raise TypeError(f"{n} must be a BFPTensor (use matmul() for float arrays), "
                                f"got {type(t).__name__}")
            if t.ndim != 2:
                raise ValueError(f"{n} must be 2-D, got shape {t.shape}")
        if a_q.shape[1] != b_q.shape[0]:
            raise ValueError(f"shape mismatch: {names[0]} is {a_q.shape}, {names[1]} is "
                             f"{b_q.shape}; inner dimensions must be equal")
        k_block_length(a_q, b_q)
        if a_q.shape[1] > self.config.k_max:
            raise ValueError(f"K={a_q.shape[1]} exceeds the device's k_max="
                             f"{self.config.k_max}; accepted range is [1, {self.config.k_max}]")
        if not allow_invalid:
            for t, n in ((a_q, names[0]), (b_q, names[1])):
                bad = np.flatnonzero(t.invalid.reshape(-1))
                if len(bad):
                    raise _nonfinite_error(n, t.layout.grid, int(bad[0]), t.layout.block,
                                           t.shape)

    def matmul_q(self, a_q: BFPTensor, b_q: BFPTensor, *, allow_invalid: bool = False,
                 names: tuple[str, str] = ("a", "b")) -> np.ndarray:
        """``a_q @ b_q`` on the device, bit-identical to :func:`hbfp_hw.gemm.bfp_matmul`.

        Operands of any size are tiled over the operand and output buffers; a reduction
        longer than a buffer holds is split along K with the reference exponents of the
        whole K passed through ``eref``, so the result is still bit-identical.
        """
        self._check_operands(a_q, b_q, allow_invalid, names)
        sa, ta = self._operand_slot(a_q, names[0])
        sb, tb = self._operand_slot(b_q, names[1])
        cfg = self.config
        M, K = a_q.shape
        N = b_q.shape[1]
        bm, L = _block2(a_q)
        bn = _block2(b_q)[1]
        Mp, Kp, Np = -(-M // bm) * bm, -(-K // L) * L, -(-N // bn) * bn
        D, O = cfg.operand_depth, cfg.output_depth
        eref_n = self._specs["eref"].depth
        kcap = min(D // bm, D // bn, _U16) // L * L
        if kcap == 0 or bm * bn > O:
            raise ValueError(f"blocks {bm}x{L} / {L}x{bn} do not fit the device buffers")
        Kt = Kp if Kp <= kcap else kcap
        Nt = min(Np, D // Kt, O // bm, _U16) // bn * bn
        Mt = min(Mp, D // Kt, O // Nt, _U16) // bm * bm
        nK = -(-K // Kt)
        while nK > 1 and Mt // bm + Nt // bn > eref_n:
            if Nt > bn:
                Nt -= bn
            else:
                Mt -= bm
        y = np.empty((M, N), dtype=np.float32)
        G = P.GemmFlag
        base = G.STORE | (G.ALLOW_INVALID if allow_invalid else 0)
        lo = -(1 << 14)
        if nK > 1:
            row = np.where(a_q.invalid, lo, a_q.exponents.astype(np.int64)).max(axis=1)
            col = np.where(b_q.invalid, lo, b_q.exponents.astype(np.int64)).max(axis=0)
            row = np.maximum(row, a_q.fmt.emin) + a_q.fmt.exp_bias
            col = np.maximum(col, b_q.fmt.emin) + b_q.fmt.exp_bias
        nbytes = (M * K * (nK > 1 and 1 or -(-N // Nt)) + K * N * (
            -(-M // Mt) if nK > 1 else 1) + 4 * M * N)
        with self._progress(nbytes, "matmul"):
            for n0 in range(0, N, Nt):
                n1 = min(N, n0 + Nt)
                for m0 in range(0, M, Mt):
                    m1 = min(M, m0 + Mt)
                    if nK > 1:
                        self._write("eref", 0, np.concatenate(
                            [row[m0 // bm: -(-m1 // bm)], col[n0 // bn: -(-n1 // bn)]]))
                    for ik, k0 in enumerate(range(0, K, Kt)):
                        k1 = min(K, k0 + Kt)
                        at = _slice_q(a_q, m0, m1, k0, k1)
                        bt = _slice_q(b_q, k0, k1, n0, n1)
                        ash = self._load_operand(0, at, ta, (id(a_q), a_q, m0, m1, k0, k1, ta))
                        bsh = self._load_operand(1, bt, tb, (id(b_q), b_q, k0, k1, n0, n1, tb))
                        flags = G.ACCUMULATE if ik else 0
                        if nK > 1:
                            flags |= G.EXT_EREF
                        if k1 == K:
                            flags |= base
                        else:
                            flags |= base & ~G.STORE
                        k_total = self._gemm(0, ash, ta, sa, 1, bsh, tb, sb, flags)
                        if k_total != k1:
                            raise LinkError(f"device accumulated K={k_total}, expected {k1}")
                    y[m0:m1, n0:n1] = self._read("out", 0, (m1 - m0) * (n1 - n0)).reshape(
                        m1 - m0, n1 - n0)
        return y

    def _onchip_ok(self, shapes_slots, out_shapes, ks) -> bool:
        cfg = self.config
        return (all(self._fits_onchip(s, slot) for s, slot in shapes_slots)
                and all(m * n <= cfg.output_depth for m, n in out_shapes)
                and max(ks) <= cfg.k_max and len(shapes_slots) <= cfg.operand_buffers)

    def _quantize_into(self, x: np.ndarray, slot: int, dst: int, fmt: BFPFormat | None,
                       name: str, nonfinite: str) -> None:
        r = self._quantize_tile(x, slot, dst, fmt, ret=False)
        if r.fields["n_invalid"] and nonfinite == "raise":
            lay = block_layout(x.shape, self.config.formats[slot])
            raise _nonfinite_error(name, lay.grid, r.fields["first_invalid"], lay.block,
                                   x.shape)
        self._resident[dst] = ("onchip", name, x.shape, slot)

    def _gemm_onchip(self, a: int, a_shape, ta: bool, slot_a: int, b: int, b_shape, tb: bool,
                     slot_b: int, out_shape, allow_invalid: bool) -> np.ndarray:
        G = P.GemmFlag
        self._gemm(a, a_shape, ta, slot_a, b, b_shape, tb, slot_b,
                   G.STORE | (G.ALLOW_INVALID if allow_invalid else 0))
        return self._read("out", 0, out_shape[0] * out_shape[1]).reshape(out_shape)

    def _where_quantize(self, quantize_on: str, onchip: bool) -> str:
        """Resolve ``quantize_on``: ``"auto"`` quantizes on the device when the operands
        fit on chip (FP32 crosses the link once and the BFP result stays there) and on
        the host otherwise (the device path would return the BFP tensor and send it back:
        FP32 out, BFP back, BFP out again). A device built without the QUANTIZE engine
        (``config.quantize`` 0) always quantizes on the host."""
        if quantize_on not in QUANTIZE_ON:
            raise ValueError(f"quantize_on={quantize_on!r}; accepted values are "
                             f"{', '.join(map(repr, QUANTIZE_ON))}")
        if not self.config.quantize:     # no QUANTIZE engine: the golden model on the host
            if quantize_on == "device":
                raise ValueError("quantize_on='device': this device has no QUANTIZE engine "
                                 "(quantize=0); accepted values are 'auto', 'host'")
            return "host"
        if quantize_on == "auto":
            return "device" if onchip else "host"
        return quantize_on

    def _host_quantize(self, x: np.ndarray, fmt: BFPFormat | None, slot: int,
                       nonfinite: str, name: str) -> BFPTensor:
        """The golden model's quantization in the format of ``slot`` (what the device's
        quantizer computes bit for bit, without sending FP32 over the link)."""
        return quantize(x, fmt or self.config.formats[slot], nonfinite=nonfinite, name=name)

    def matmul(self, a: Any, b: Any, fmt_a: BFPFormat | None = None,
               fmt_b: BFPFormat | None = None, *, nonfinite: str = "raise",
               quantize_on: str = "auto") -> np.ndarray:
        """Quantize ``a`` and ``b`` and multiply them on the device, any sizes.

        Bit-identical to ``bfp_matmul(quantize(a, fmt_a), quantize(b, fmt_b))`` (format
        slot 0 when a format is not given). Each operand is blocked along K, as MX
        defines: an operand whose format blocks only the axis that is not K (MXINT8's
        1-D blocks along the last axis, for ``b``) is quantized transposed, i.e.
        ``quantize(b.T, fmt_b).T`` (and ``quantize(a.T, fmt_a).T`` for ``a``).
        ``nonfinite="flag"`` lets NaN/Inf blocks through as NaN outputs instead of
        raising. ``quantize_on``: ``"device"`` sends
        FP32 and quantizes with the device's quantizer; ``"host"`` quantizes with the
        golden model and sends BFP (about 4x fewer operand bytes; a stochastic format is
        then one random stream over the whole tensor, with no size limit); ``"auto"``
        (default) is ``"device"`` when both operands fit on chip, else ``"host"``.
        """
        a = _as_real(a, "a")
        b = _as_real(b, "b")
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"shape mismatch: a is {a.shape}, b is {b.shape}; inner "
                             f"dimensions must be equal")
        if a.shape[1] > self.config.k_max:  # before any transfer, not after quantizing
            raise ValueError(f"K={a.shape[1]} exceeds the device's k_max="
                             f"{self.config.k_max}; accepted range is [1, {self.config.k_max}]")
        sa = self._quantize_slot(fmt_a, a.shape)
        sb = self._quantize_slot(fmt_b, b.shape)
        fa, fb = self.config.formats[sa], self.config.formats[sb]
        # block both operands along K: a stored as (K, M) / b as (N, K) where their
        # format blocks only the other axis (1-D formats such as MXINT8)
        ta = (block_layout(a.shape, fa).block[1] == 1
              and block_layout(a.shape[::-1], fa).block[0] > 1)
        tb = (block_layout(b.shape, fb).block[0] == 1
              and block_layout(b.shape[::-1], fb).block[1] > 1)
        a_s = np.ascontiguousarray(a.T) if ta else a      # the tensors as stored
        b_s = np.ascontiguousarray(b.T) if tb else b
        ka = block_layout(a_s.shape, fa).block[0 if ta else 1]
        kb = block_layout(b_s.shape, fb).block[1 if tb else 0]
        if ka != kb:
            raise ValueError(f"a's block length along K ({ka}, format {fa.name}) differs "
                             f"from b's ({kb}, format {fb.name}); use formats with the same "
                             f"block length along K")
        _check_nonfinite(nonfinite)
        allow = nonfinite == "flag"
        onchip = self._onchip_ok([(a_s.shape, sa), (b_s.shape, sb)],
                                 [(a.shape[0], b.shape[1])], [a.shape[1]])
        where = self._where_quantize(quantize_on, onchip)

        def used(q, t):
            return q.T if t else q
        if where == "host":
            a_q = used(self._host_quantize(a_s, fmt_a, sa, nonfinite, "a"), ta)
            b_q = used(self._host_quantize(b_s, fmt_b, sb, nonfinite, "b"), tb)
        elif onchip:
            self._quantize_into(a_s, sa, 0, fmt_a, "a", nonfinite)
            self._quantize_into(b_s, sb, 1, fmt_b, "b", nonfinite)
            return self._gemm_onchip(0, a_s.shape, ta, sa, 1, b_s.shape, tb, sb,
                                     (a.shape[0], b.shape[1]), allow)
        else:
            a_q = used(self.quantize(a_s, fmt_a, nonfinite=nonfinite, name="a"), ta)
            b_q = used(self.quantize(b_s, fmt_b, nonfinite=nonfinite, name="b"), tb)
        return self.matmul_q(a_q, b_q, allow_invalid=allow)

    def bitlayer_matmul(self, x_int: Any, planes: Any, layers: int | None = None, *,
                        track: bool = False) -> np.ndarray:
        """Bit-layer GEMM on the device (BITLAYER), any sizes: ``x_int`` (batch, K)
        integer activations in the int16 range, ``planes`` the
        :func:`hbfp_hw.bitlayers.decompose` of W (bits, N, K) with ``bits`` up to
        ``BITLAYER_BITS_MAX``; returns the int64 ``(batch, N)`` result of
        :func:`hbfp_hw.bitlayers.matmul` (``layers`` top planes, None: all), bit for bit.

        The GEMM is split into commands that fit the ``bl.w`` / ``bl.x`` / ``bl.y``
        buffers and ``K <= bitlayer_k_max``; partial sums over K are added on the host
        (exact integers). ``UNSUPPORTED`` devices (``bitlayer_lanes`` 0) raise
        :class:`DeviceError`.

        ``track=True``: the K chunks of each output block are summed on the device
        (``BitLayerFlag.ACCUMULATE`` into the int32 ``bl.y``) and the command of the last
        chunk sets ``TRACK``, so the device's integer-output statistics
        (:meth:`read_stats` with ``source="int"``) fold in every final sum exactly once.
        Every partial sum must then fit int32: ``ValueError`` if the sum over the K
        columns of ``max|x|`` times ``2**(bits-1)`` exceeds ``2**31 - 1``.
        """
        from hbfp_hw.bitlayers import _check_layers, _check_planes, _int_array
        p = _check_planes(planes)
        if p.ndim != 3:
            raise ValueError(f"planes must have shape (bits, out, in), got {p.shape}")
        bits, n_out, k = p.shape
        if bits > P.BITLAYER_BITS_MAX:
            raise ValueError(f"planes hold {bits} bit-layers; accepted range is "
                             f"[1, {P.BITLAYER_BITS_MAX}]")
        layers = _check_layers(layers, bits)
        x = _int_array("x_int", x_int)
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"x_int must have shape (batch, {k}), got {x.shape}")
        lim = 1 << (P.BITLAYER_ACT_BITS - 1)
        if x.size and (x.min() < -lim or x.max() >= lim):
            bad = x[(x < -lim) | (x >= lim)].flat[0]
            raise ValueError(f"x_int value {int(bad)} is outside the int16 range "
                             f"[{-lim}, {lim - 1}]")
        lanes = P.bitlayer_lanes(self.config)
        if not lanes:
            self._call(P.Op.BITLAYER, bits=bits, layers=layers, rows=1, cols=1, batch=1,
                       w_offset=0, x_offset=0, y_offset=0, flags=0)  # answers UNSUPPORTED
            raise ProtocolError("the device has no bit-layer buffers but accepted BITLAYER")
        dw, dx, dy = (self._specs[n].depth for n in ("bl.w", "bl.x", "bl.y"))
        kmax = min(P.bitlayer_k_max(self.config), dx)
        batch = x.shape[0]
        if track:
            return self._bitlayer_tracked(x, p, layers, lanes, kmax, (dw, dx, dy))
        y = np.zeros((batch, n_out), dtype=np.int64)
        weights = 1 << np.arange(lanes, dtype=np.int64)
        for k0 in range(0, k, kmax):
            kc = min(kmax, k - k0)
            chunks = -(-kc // lanes)
            pk = np.zeros((bits, n_out, chunks * lanes), dtype=np.int64)
            pk[:, :, :kc] = p[:, :, k0:k0 + kc]
            # per row: planes sign plane first, chunks of `lanes` bits
            words = (pk[::-1].reshape(bits, n_out, chunks, lanes) * weights).sum(-1)
            words = words.transpose(1, 0, 2)                    # (rows, q, chunks)
            rg = max(1, min(n_out, dw // (bits * chunks), dy, _U16))
            bg = max(1, min(batch, dx // kc, _U16))
            for r0 in range(0, n_out, rg):
                r1 = min(n_out, r0 + rg)
                self._write("bl.w", 0, words[r0:r1].reshape(-1))
                bgr = max(1, min(bg, dy // (r1 - r0)))
                for b0 in range(0, batch, bgr):
                    b1 = min(batch, b0 + bgr)
                    self._write("bl.x", 0, x[b0:b1, k0:k0 + kc].reshape(-1))
                    clocks = (b1 - b0) * (kc + 2 + (r1 - r0) * layers * chunks) + 64
                    self._call(P.Op.BITLAYER, bits=bits, layers=layers, rows=r1 - r0,
                               cols=kc, batch=b1 - b0, w_offset=0, x_offset=0, y_offset=0,
                               flags=0, compute_clocks=clocks)
                    part = self._read("bl.y", 0, (b1 - b0) * (r1 - r0))
                    y[b0:b1, r0:r1] += part.astype(np.int64).reshape(b1 - b0, r1 - r0)
        return y

    def _bitlayer_tracked(self, x: np.ndarray, p: np.ndarray, layers: int, lanes: int,
                          kmax: int, depths: tuple) -> np.ndarray:
        """:meth:`bitlayer_matmul` with ``track=True``: per block of outputs, the K
        chunks accumulate in ``bl.y`` and the last one is tracked."""
        bits, n_out, k = p.shape
        dw, dx, dy = depths
        batch = x.shape[0]
        bound = int(np.abs(x).max(axis=0).sum()) << (bits - 1) if x.size else 0
        if bound > 2**31 - 1:
            raise ValueError(f"a tracked BITLAYER GEMM sums in int32 on the device: the sum "
                             f"over K={k} of max|x| per column times 2**{bits - 1} is "
                             f"{bound}, above 2**31 - 1")
        kmax -= kmax % lanes                     # chunks start on a plane word
        chunks_max = kmax // lanes
        weights = 1 << np.arange(lanes, dtype=np.int64)
        kp = -(-k // kmax) * kmax
        pk = np.zeros((bits, n_out, kp), dtype=np.int64)
        pk[:, :, :k] = p
        # words[r, q, c]: row r, plane q (sign plane first), chunk c of `lanes` columns
        words = (pk[::-1].reshape(bits, n_out, kp // lanes, lanes) * weights).sum(-1)
        words = words.transpose(1, 0, 2)
        rg = max(1, min(n_out, dw // (bits * chunks_max), dy, _U16))
        bg = max(1, min(batch, dx // kmax, _U16))
        y = np.zeros((batch, n_out), dtype=np.int64)
        F = P.BitLayerFlag
        for r0 in range(0, n_out, rg):
            r1 = min(n_out, r0 + rg)
            bgr = max(1, min(bg, dy // (r1 - r0)))
            for b0 in range(0, batch, bgr):
                b1 = min(batch, b0 + bgr)
                for k0 in range(0, k, kmax):
                    kc = min(kmax, k - k0)
                    chunks = -(-kc // lanes)
                    c0 = k0 // lanes
                    self._write("bl.w", 0, words[r0:r1, :, c0:c0 + chunks].reshape(-1))
                    self._write("bl.x", 0, x[b0:b1, k0:k0 + kc].reshape(-1))
                    flags = (F.ACCUMULATE if k0 else 0) | (F.TRACK if k0 + kc >= k else 0)
                    clocks = (b1 - b0) * (kc + 2 + (r1 - r0) * layers * chunks) + 64
                    self._call(P.Op.BITLAYER, bits=bits, layers=layers, rows=r1 - r0,
                               cols=kc, batch=b1 - b0, w_offset=0, x_offset=0, y_offset=0,
                               flags=int(flags), compute_clocks=clocks)
                part = self._read("bl.y", 0, (b1 - b0) * (r1 - r0))
                y[b0:b1, r0:r1] = part.astype(np.int64).reshape(b1 - b0, r1 - r0)
        return y

    def _luq_engine(self, op: P.Op) -> int:
        """``luq_lanes`` of the device; a device without the LUQ engine answers the
        command with UNSUPPORTED (raised as :class:`DeviceError`)."""
        lanes = P.luq_lanes(self.config)
        if not lanes:
            self._call(op, **{f.name: 0 for f in P.REQUESTS[op].fields})
            raise ProtocolError(f"the device has no LUQ buffers but accepted {op.name}")
        return lanes

    def luq_matmul(self, a_luq: Any, b_bfp: BFPTensor) -> np.ndarray:
        """Shift-add GEMM on the device (LUQ_GEMM): ``a_luq`` (M, K) a
        :class:`~hbfp_hw.luq.LUQTensor` with 4-bit codes (any SMP sample count), ``b_bfp``
        (K, N) a :class:`BFPTensor` in a format slot with ``tile x tile`` blocks; returns
        the float32 ``(M, N)`` result of :func:`hbfp_hw.luq.luq_matmul` (guard bits of the
        device), bit for bit.

        Any M and N: the GEMM is split into commands over column blocks of ``b`` (as many
        as fit an operand buffer) and rows of ``a`` (as many as fit ``luq.a`` and
        ``out``). K is not split (the reference exponent of a column spans every K
        block): ``K <= k_max``, a column block of ``b`` must fit an operand buffer
        (``ceil(K / tile) * tile**2 <= operand_depth``) and ``samples * K`` codes
        ``luq.a``; larger K raises ``ValueError`` naming the limit.
        """
        from hbfp_hw.luq import LUQTensor, _check_gemm
        _check_gemm(a_luq, b_bfp, "luq_matmul")
        if not isinstance(a_luq, LUQTensor):
            raise TypeError("a_luq must be a LUQTensor")
        if a_luq.fmt.bits != P.LUQ_BITS:
            raise ValueError(f"a_luq has {a_luq.fmt.bits}-bit codes; the device computes "
                             f"{P.LUQ_BITS}-bit LUQ codes")
        self._luq_engine(P.Op.LUQ_GEMM)
        cfg, T = self.config, self.config.tile
        def enc(f: BFPFormat) -> tuple:
            return f.man_bits, f.exp_bits, f.exp_bias, f.exp_invalid_code
        slot = next((i for i in P.luq_slots(cfg)
                     if enc(cfg.formats[i]) == enc(b_bfp.fmt) and _block2(b_bfp) == (T, T)),
                    None)
        if slot is None:
            raise FormatMismatchError(
                f"b_bfp ({b_bfp.fmt.man_bits}-bit mantissas, {b_bfp.fmt.exp_bits}-bit "
                f"exponents, blocks {_block2(b_bfp)}) matches no format slot with {T}x{T} "
                f"blocks: " + "; ".join(f"[{i}] {cfg.formats[i].describe()}"
                                         for i in P.luq_slots(cfg)))
        M, K = a_luq.shape
        N = b_bfp.shape[1]
        S = a_luq.fmt.samples
        nkb = -(-K // T)
        a_depth = self._specs["luq.a"].depth
        out_depth = self._specs["out"].depth
        if K > cfg.k_max or nkb * T * T > cfg.operand_depth or S * K > a_depth:
            raise ValueError(
                f"K={K} is too long for one LUQ_GEMM of this device: K <= k_max={cfg.k_max}, "
                f"ceil(K/{T})*{T * T} <= operand_depth={cfg.operand_depth} and "
                f"samples*K <= {a_depth} (luq.a)")
        gn = -(-N // T)
        nc = max(1, min(gn, cfg.operand_depth // (nkb * T * T), out_depth // T))
        ab = int(np.array([a_luq.alpha], np.float32).view(np.uint32)[0])
        flags = int(P.LuqGemmFlag.A_INVALID) if a_luq.invalid else 0
        y = np.empty((M, N), np.float32)
        codes = a_luq.codes
        for c0 in range(0, N, nc * T):
            c1 = min(N, c0 + nc * T)
            bq = _slice_q(b_bfp, 0, K, c0, c1)
            bcodes, bman = bq.stream()
            self._resident.pop(0, None)
            self._write("op0.exp", 0, bcodes)
            self._write("op0.man", 0, bman)
            nr = max(1, min(M, a_depth // (S * K), out_depth // (c1 - c0), _U16))
            for r0 in range(0, M, nr):
                r1 = min(M, r0 + nr)
                self._write("luq.a", 0, codes[:, r0:r1, :].reshape(-1))
                ncb = -(-(c1 - c0) // T)
                clocks = (nkb * ncb * (T * T + 1) + ncb * (nkb + (r1 - r0) * nkb * S * T + 32)
                          + 64)
                self._call(P.Op.LUQ_GEMM, flags=flags, b=0, slot_b=slot, samples=S,
                           rows=r1 - r0, k=K, cols=c1 - c0, alpha=ab, a_offset=0,
                           out_offset=0, compute_clocks=clocks)
                y[r0:r1, c0:c1] = self._read("out", 0, (r1 - r0) * (c1 - c0)).reshape(
                    r1 - r0, c1 - c0)
        return y

    def luq_quantize(self, x: Any, fmt: Any = None, *, max_abs: float | None = None,
                     nonfinite: str = "raise", name: str | None = None) -> Any:
        """LUQ quantization on the device (LUQ_QUANTIZE): returns the
        :class:`~hbfp_hw.luq.LUQTensor` of :func:`hbfp_hw.luq.luq_quantize` ``(x, fmt,
        max_abs=max_abs)``, bit for bit (codes, ``alpha``, ``max_abs``, ``saturated``).

        ``fmt`` (default :func:`hbfp_hw.protocol.luq_format` of the device) must have 4-bit
        codes, ``sr_bits = LUQ_SR_BITS`` and ``lanes = luq_lanes`` (the device's
        generators); any ``samples`` and ``seed``. The scale: ``max_abs`` given (in
        hindsight) is sent in the command (``MAX_ABS``); otherwise the device computes
        ``max|x|`` itself when the tensor fits one command (``fp_in`` and ``luq.a``), and the
        host takes it (the same rule) for longer tensors, which are streamed in chunks of
        whole generator beats with ``CONTINUE``. SMP sample ``s`` is a stream of its own
        with the seed :func:`hbfp_hw.luq.sample_seed`. A tensor with NaN/Inf is not sent
        (the device would answer INVALID_DATA): the host raises or returns the flagged
        tensor as the golden model does (``nonfinite``).
        """
        from hbfp_hw.luq import _FLT_MAX, _MIN_NORMAL, LUQFormat, LUQTensor, _as_float32
        from hbfp_hw.luq import luq_quantize as golden_luq_quantize
        from hbfp_hw.luq import sample_seed
        L = self._luq_engine(P.Op.LUQ_QUANTIZE)
        fmt = P.luq_format(self.config) if fmt is None else fmt
        if not isinstance(fmt, LUQFormat):
            raise TypeError(f"fmt must be a LUQFormat, got {type(fmt).__name__}")
        for field, want in (("bits", P.LUQ_BITS), ("sr_bits", P.LUQ_SR_BITS), ("lanes", L)):
            if getattr(fmt, field) != want:
                raise ValueError(f"fmt.{field}={getattr(fmt, field)}; the device's LUQ "
                                 f"quantizer computes {field}={want}")
        if nonfinite not in ("raise", "flag"):
            raise ValueError(f"nonfinite={nonfinite!r}; accepted values are 'raise', 'flag'")
        x32 = _as_float32(x)
        shape = tuple(x32.shape)
        flat = np.ascontiguousarray(x32).reshape(-1)
        n, S = flat.size, fmt.samples
        if n == 0 or not np.isfinite(flat).all():
            return golden_luq_quantize(x32, fmt, max_abs=max_abs, nonfinite=nonfinite,
                                       name=name)
        chunk = min(self._specs["fp_in"].depth, self._specs["luq.a"].depth) // L * L
        m = None
        if max_abs is not None:
            m = float(max_abs)
            if not (np.isfinite(m) and 0 <= m <= _FLT_MAX):
                raise ValueError(f"max_abs={max_abs!r} is out of range; accepted range is "
                                 f"[0, {_FLT_MAX:.8g}] (a finite float32)")
        elif n > chunk:
            ax = np.abs(flat)
            m = float(np.where(ax < _MIN_NORMAL, np.float32(0), ax).max())
        mbits = 0 if not m else int(np.array([m], np.float32).view(np.uint32)[0])
        codes = np.empty((S, n), np.uint8)
        alpha, mx, saturated = 0.0, 0.0, 0
        Q = P.LuqQuantizeFlag
        for s in range(S):
            for t0 in range(0, n, chunk):
                t1 = min(n, t0 + chunk)
                if s == 0 or n > chunk:
                    self._write("fp_in", 0, flat[t0:t1])
                flags = (Q.MAX_ABS if m is not None else 0) | (Q.CONTINUE if t0 else 0)
                r = self._call(P.Op.LUQ_QUANTIZE, flags=int(flags), count=t1 - t0,
                               src_offset=0, dst_offset=0, seed=sample_seed(fmt.seed, s),
                               max_abs=mbits, compute_clocks=(t1 - t0) * 4 + 64)
                f32 = np.array([r.fields["alpha"], r.fields["max_abs"]],
                               np.uint32).view(np.float32)
                alpha, mx = float(f32[0]), max(mx, float(f32[1]))
                if s == 0:
                    saturated += r.fields["saturated"]
                codes[s, t0:t1] = self._read("luq.a", 0, t1 - t0)
        return LUQTensor(fmt, shape, codes.reshape((S, *shape)), alpha, mx, saturated)

    def _mls_engine(self, op: P.Op) -> int:
        """``mls_lanes`` of the device; a device without the MLS engine answers the
        command with UNSUPPORTED (raised as :class:`DeviceError`)."""
        lanes = P.mls_lanes(self.config)
        if not lanes:
            self._call(op, **{f.name: 0 for f in P.REQUESTS[op].fields})
            raise ProtocolError(f"the device has no MLS buffers but accepted {op.name}")
        return lanes

    def mls_matmul(self, a: Any, b: Any) -> np.ndarray:
        """Exact MLS GEMM on the device (MLS_GEMM): ``a (M, K)`` and ``b (K, N)``
        :class:`~hbfp_hw.mls.MLSTensor` operands grouped along K (as
        :func:`hbfp_hw.mls.mls_matmul` takes them); returns its float32 ``(M, N)``
        result bit for bit.

        Operands whose element / group widths are at most the device's
        (:func:`hbfp_hw.protocol.mls_format`: E2M4, 4-bit group shifts) are re-encoded
        into them exactly (same values, the same tensor exponent); groups are padded with
        zero codes to whole words of ``mls_lanes`` codes. K (padded) must be at most
        ``MLS_K_MAX`` (one FP32 rounding per output, so K is never split); M and N are
        split into commands that fit the ``mls.*`` buffers and ``out``.
        """
        from hbfp_hw.mls import MLSTensor, _check_gemm, decode, encode
        L = _check_gemm(a, b, "mls_matmul")
        lanes = self._mls_engine(P.Op.MLS_GEMM)
        dev = P.mls_format(self.config)
        for name, t in (("a", a), ("b", b)):
            for fld in ("exp_bits", "man_bits", "group_bits"):
                if getattr(t.fmt, fld) > getattr(dev, fld):
                    raise ValueError(f"{name}.fmt.{fld}={getattr(t.fmt, fld)} exceeds the "
                                     f"device's {fld}={getattr(dev, fld)}; accepted range is "
                                     f"[1, {getattr(dev, fld)}]")
            lo, hi = P.MLS_TEXP_RANGE
            if not lo <= t.tensor_exp <= hi:
                raise ValueError(f"{name}.tensor_exp={t.tensor_exp} is out of range; "
                                 f"accepted range is [{lo}, {hi}]")
        M, K = a.shape
        N = b.shape[1]
        gw = -(-L // lanes)
        groups = -(-K // L)
        if groups * gw * lanes > P.MLS_K_MAX:
            raise ValueError(f"K={K} (groups of {L} padded to {gw * lanes}) exceeds the "
                             f"device's MLS_K_MAX={P.MLS_K_MAX}; accepted range is "
                             f"[1, {P.MLS_K_MAX // (gw * lanes) * L}]")

        def device_rows(t: MLSTensor, rows: int) -> tuple[np.ndarray, np.ndarray]:
            """(code words (rows, groups*gw), shifts (rows, groups)) of a row-grouped
            tensor in the device's element format."""
            s, sig, sh = decode(t.codes, t.fmt)
            v = (sig << sh) << (dev.man_bits - t.fmt.man_bits)
            c = encode(s, v, dev).astype(np.int64)[:rows]
            c = c.reshape(rows, groups, L)
            c = np.concatenate([c, np.zeros((rows, groups, gw * lanes - L), np.int64)], 2)
            w = (c.reshape(rows, groups * gw, lanes) << (8 * np.arange(lanes))).sum(-1)
            return w, t.group_shift.astype(np.int64)[:rows]
        wa, sa = device_rows(a, M)
        wb, sb = device_rows(b.T, N)
        rowlen = groups * gw
        dc, dg = self._specs["mls.a"].depth, self._specs["mls.ga"].depth
        dy = self._specs["out"].depth
        rg = max(1, min(M, dc // rowlen, dg // groups, dy, _U16))
        cg = max(1, min(N, dc // rowlen, dg // groups, max(1, dy // rg), _U16))
        if rowlen > dc or groups > dg:
            raise ValueError(f"K={K} needs {rowlen} words per row; the device's mls "
                             f"buffers hold {dc}")
        y = np.zeros((M, N), dtype=np.float32)
        for c0 in range(0, N, cg):
            c1 = min(N, c0 + cg)
            self._write("mls.b", 0, wb[c0:c1])
            self._write("mls.gb", 0, sb[c0:c1])
            for r0 in range(0, M, rg):
                r1 = min(M, r0 + rg)
                self._write("mls.a", 0, wa[r0:r1])
                self._write("mls.ga", 0, sa[r0:r1])
                self._call(P.Op.MLS_GEMM, rows=r1 - r0, cols=c1 - c0, groups=groups,
                           group_words=gw, exp_a=a.tensor_exp & _U16,
                           exp_b=b.tensor_exp & _U16, a_offset=0, b_offset=0, ga_offset=0,
                           gb_offset=0, y_offset=0,
                           compute_clocks=(r1 - r0) * (c1 - c0) * rowlen + 64)
                part = self._read("out", 0, (r1 - r0) * (c1 - c0))
                y[r0:r1, c0:c1] = part.reshape(r1 - r0, c1 - c0)
        return y

    def mls_quantize(self, x: Any, fmt: Any = None, *, tensor_exp: int | None = None) -> Any:
        """MLS quantization on the device (MLS_QUANTIZE): ``x`` 2-D, ``fmt`` the device's
        format (:func:`hbfp_hw.protocol.mls_format`, the default) or that format with
        ``rounding``, ``seed`` and ``group_axis`` changed; returns the
        :class:`~hbfp_hw.mls.MLSTensor` of ``hbfp_hw.quantize(x, fmt)`` bit for bit.

        The tensor exponent is computed on the host exactly as the golden model does
        (``t = max floor(log2|x|) - (2**E - 2)`` over the non-zero, non-subnormal
        elements, from the FP32 exponent fields; 0 for an all-zero tensor) unless
        ``tensor_exp`` fixes it, and sent as the command's ``texp``. Groups along rows
        (``group_axis`` -1 / 1) are quantized as stored; groups along columns
        (``group_axis`` 0 / -2) quantize ``x.T`` and return the transpose, which equals
        the golden result for round-to-nearest only (stochastic rounding draws its
        numbers in the stream order of the groups). Nearest-even tensors are split into
        commands of whole groups that fit ``fp_in`` and the ``mls.*`` buffers; a
        stochastic tensor must fit one command (the generator restarts from ``seed`` at
        every command). NaN/Inf raise ``ValueError`` as the golden model does.
        """
        from hbfp_hw.mls import MLSFormat, MLSTensor
        lanes = self._mls_engine(P.Op.MLS_QUANTIZE)
        dev = P.mls_format(self.config)
        fmt = dev if fmt is None else fmt
        if not isinstance(fmt, MLSFormat):
            raise TypeError(f"fmt must be an MLSFormat, got {type(fmt).__name__}")
        same = ["exp_bits", "man_bits", "group_bits", "group_size"]
        if fmt.rounding == "stochastic":
            same += ["sr_bits", "sr_lanes"]
        for fld in same:
            if getattr(fmt, fld) != getattr(dev, fld):
                raise ValueError(f"fmt.{fld}={getattr(fmt, fld)}; the device quantizes "
                                 f"{fld}={getattr(dev, fld)} only")
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"x must be a real array, got dtype {a.dtype}")
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"x must be a non-empty 2-D array, got shape {a.shape}")
        if fmt.group_axis in (0, -2):
            if fmt.rounding == "stochastic":
                raise ValueError("stochastic MLS quantization with groups along columns "
                                 "(group_axis 0) is not bit-identical on the device (its "
                                 "random numbers follow the row-group order); quantize "
                                 "x.T with group_axis=-1")
            return self.mls_quantize(a.T, fmt.transposed(), tensor_exp=tensor_exp).T
        with np.errstate(over="ignore"):
            x32 = np.ascontiguousarray(a, dtype=np.float32)
        bad = ~np.isfinite(x32)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"tensor holds {float(x32[pos])!r} at index {pos}; MLS "
                             f"quantizes finite FP32 values only")
        if tensor_exp is None:
            field = (x32.view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF)
            nz = field > 0
            t = int(field[nz].max()) - 127 - fmt.top_exp if nz.any() else 0
        else:
            t = int(tensor_exp)
        lo, hi = P.MLS_TEXP_RANGE
        if not lo <= t <= hi:
            raise ValueError(f"tensor_exp={t} is out of range; accepted range is [{lo}, {hi}]")
        Lq = P.MLS_QUANT_GROUP
        wpg = Lq // lanes
        rows, cols = x32.shape
        groups = -(-cols // Lq)
        din = self._specs["fp_in"].depth
        dc, dg = self._specs["mls.a"].depth, self._specs["mls.ga"].depth
        gc = max(1, min(groups, din // Lq, dc // wpg, dg))     # groups per command row
        cc = gc * Lq
        codes = np.zeros((rows, groups * Lq), dtype=np.uint16)
        shifts = np.zeros((rows, groups), dtype=np.uint8)
        rnd = 1 if fmt.rounding == "stochastic" else 0
        tiles = []
        for c0 in range(0, cols, cc):
            c1 = min(cols, c0 + cc)
            ng = -(-(c1 - c0) // Lq)
            rg = max(1, min(rows, din // (c1 - c0), dc // (ng * wpg), dg // ng, _U16))
            tiles += [(r0, min(rows, r0 + rg), c0, c1, ng) for r0 in range(0, rows, rg)]
        if rnd and len(tiles) > 1:
            raise ValueError(f"a stochastic MLS_QUANTIZE takes the whole tensor in one "
                             f"command; {x32.shape} needs {len(tiles)} (fp_in holds {din} "
                             f"elements)")
        for r0, r1, c0, c1, ng in tiles:
            self._write("fp_in", 0, x32[r0:r1, c0:c1])
            self._call(P.Op.MLS_QUANTIZE, dst=0, rows=r1 - r0, cols=c1 - c0, src_offset=0,
                       texp=t & _U16, rounding=rnd, seed=fmt.seed, codes_offset=0,
                       g_offset=0, compute_clocks=(r1 - r0) * ng * (2 * Lq + 8) + 64)
            w = self._read("mls.a", 0, (r1 - r0) * ng * wpg).astype(np.int64)
            c = ((w[:, None] >> (8 * np.arange(lanes))) & 0xFF).reshape(r1 - r0, ng * Lq)
            codes[r0:r1, c0:c0 + ng * Lq] = c
            shifts[r0:r1, c0 // Lq: c0 // Lq + ng] = \
                self._read("mls.ga", 0, (r1 - r0) * ng).reshape(r1 - r0, ng)
        return MLSTensor(fmt, (rows, cols), t, shifts, codes)

    def _sparse_slot(self, fmt: BFPFormat, block: tuple[int, int], name: str) -> int:
        T = self.config.tile
        for i, f in enumerate(self.config.formats):
            if ((f.man_bits, f.exp_bits, f.exp_bias, f.frac_bits)
                    == (fmt.man_bits, fmt.exp_bits, fmt.exp_bias, fmt.frac_bits)
                    and self.config.block_2d(i) == (T, T) == tuple(block)):
                return i
        raise FormatMismatchError(
            f"{name} ({fmt.describe()}, blocks {tuple(block)}) matches no device format slot "
            f"with {T}x{T} blocks: "
            + "; ".join(f"[{i}] {f.describe()}" for i, f in enumerate(self.config.formats)))

    def sparse_k_max(self) -> int:
        """Longest reduction one SPARSE_GEMM command computes on this device (``k_max``,
        the operand buffers and ``sp.*`` for one row block and one output block, in whole
        blocks of ``tile``); 0 without a sparse engine."""
        cfg = self.config
        if not P.sparse_lanes(cfg):
            return 0
        T, S = cfg.tile, P.sparse_slots(cfg)
        q = T // P.sparse_lanes(cfg)
        return min(cfg.k_max, cfg.operand_depth // (T * T) * T,
                   self._specs["sp.man"].depth // S // (q * q) * T,
                   self._specs["sp.exp"].depth * T)

    def sparse_matmul(self, xq: BFPTensor, sw: Any, transpose: bool = False) -> np.ndarray:
        """N:M sparse GEMM on the device (SPARSE_GEMM), any batch and output size:
        ``Y = X Wᵀ`` (``transpose=False``, ``xq`` of shape (batch, in)) or ``dX = dY W``
        (``transpose=True``, ``xq`` = dY of shape (batch, out)) from the compressed weight
        ``sw`` (:func:`hbfp_hw.sparsity.compress`); bit-identical to
        :func:`hbfp_hw.sparsity.sparse_matmul` / ``sparse_matmul_t``.

        ``sw`` is written once per call (into ``sp.man`` / ``sp.idx`` / ``sp.exp``; split
        into whole blocks along the output axis when it does not fit), then every piece
        of ``xq`` (whole row blocks) runs against it; both orientations read the same
        stored tiles. The weight must be the engine's ``N:M`` (``sparse_lanes`` M, N =
        M / 2), both tensors in a format slot with ``tile x tile`` blocks, the reduction
        length at most ``k_max``. ``sparse_lanes`` 0 devices raise :class:`DeviceError`
        (UNSUPPORTED).
        """
        from hbfp_hw.sparsity import SparseBFPWeight
        if not isinstance(xq, BFPTensor) or not isinstance(sw, SparseBFPWeight):
            raise TypeError("sparse_matmul(xq, sw) takes a BFPTensor and a SparseBFPWeight")
        cfg = self.config
        T = cfg.tile
        O, I = sw.shape
        K, N = (O, I) if transpose else (I, O)
        if xq.ndim != 2 or xq.shape[1] != K:
            raise ValueError(f"{'dy' if transpose else 'x'} has shape {xq.shape}; the weight "
                             f"is [out, in] = {sw.shape}, so it must be (batch, {K})")
        slot_x = self._sparse_slot(xq.fmt, xq.layout.block, "dy" if transpose else "x")
        slot_w = self._sparse_slot(sw.fmt, block_layout(sw.shape, sw.fmt).block, "sw")
        flags = int(P.SparseFlag.TRANSPOSE) if transpose else 0
        if not P.sparse_lanes(cfg):
            self._call(P.Op.SPARSE_GEMM, flags=flags, x=0, slot_x=slot_x, slot_w=slot_w,
                       batch=1, w_rows=1, w_cols=1, w_offset=0, e_offset=0,
                       out_offset=0)                                  # answers UNSUPPORTED
            raise ProtocolError("the device has no sparse engine but accepted SPARSE_GEMM")
        n, m = P.sparse_nm(cfg)
        if (sw.n, sw.m) != (n, m):
            raise ValueError(f"the weight is {sw.n}:{sw.m} sparse; the device's engine runs "
                             f"{n}:{m} (sparse_lanes={m})")
        if transpose and sw.kind != "transposable":
            raise ValueError(f"dY W needs a transposable weight; this one is {sw.kind!r}")
        S, q = n * m, T // m
        sp_tiles = self._specs["sp.man"].depth // S
        kcap = self.sparse_k_max()
        if K > kcap:
            raise ValueError(f"the reduction length {K} is outside what one SPARSE_GEMM "
                             f"reduces on this device; accepted range is [1, {kcap}] "
                             f"(k_max, operand and sp.* buffer depths)")
        go, gi = -(-O // T), -(-I // T)
        gk, gn = (go, gi) if transpose else (gi, go)
        tiles_per_block = q * (gk * q)                # tiles of one output block
        nb = min(gn, sp_tiles // tiles_per_block, self._specs["sp.exp"].depth // gk,
                 cfg.output_depth // (T * T))
        rb = min(-(-xq.shape[0] // T), cfg.operand_depth // (gk * T * T))
        B = xq.shape[0]
        y = np.empty((B, N), np.float32)
        codes_w = np.where(sw.invalid, sw.fmt.exp_invalid_code,
                           sw.exponents.astype(np.int64) + sw.fmt.exp_bias)
        wpb = max(1, S // T)
        for b0 in range(0, gn, nb):
            b1 = min(gn, b0 + nb)
            n0, n1 = b0 * T, min(N, b1 * T)
            if transpose:
                mans, idx = (a[:, b0 * q:b1 * q] for a in (sw.mantissas, sw.indices))
                codes, shape = codes_w[:, b0:b1], (O, n1 - n0)
            else:
                mans, idx = (a[b0 * q:b1 * q] for a in (sw.mantissas, sw.indices))
                codes, shape = codes_w[b0:b1], (n1 - n0, I)
            self._write("sp.man", 0, np.ascontiguousarray(mans))
            self._write("sp.idx", 0, np.ascontiguousarray(idx))
            self._write("sp.exp", 0, np.ascontiguousarray(codes))
            np_ = n1 - n0
            rows_max = max(1, min(rb * T, cfg.output_depth // np_, _U16) // T) * T
            for r0 in range(0, B, rows_max):
                r1 = min(B, r0 + rows_max)
                g0, g1 = r0 // T, -(-r1 // T)
                part = BFPTensor(xq.fmt, (r1 - r0, K), xq.mantissas[g0 * T:g1 * T],
                                 xq.exponents[g0:g1], xq.invalid[g0:g1])
                pc, pm = part.stream()
                self._resident.pop(0, None)
                self._write("op0.exp", 0, pc)
                self._write("op0.man", 0, pm)
                jobs = (r1 - r0) * -(-np_ // m)
                clocks = jobs * (gk * q * wpb + m + 4) + (g1 - g0) * (b1 - b0) * (gk + 4) \
                    + (len(sw.mantissas.reshape(-1)) // S * wpb if transpose else 0) + 256
                self._call(P.Op.SPARSE_GEMM, flags=flags, x=0, slot_x=slot_x, slot_w=slot_w,
                           batch=r1 - r0, w_rows=shape[0], w_cols=shape[1], w_offset=0,
                           e_offset=0, out_offset=0, compute_clocks=clocks)
                y[r0:r1, n0:n1] = self._read("out", 0, (r1 - r0) * np_).reshape(r1 - r0, np_)
        return y

    # -- CONV ------------------------------------------------------------------------
    def _conv_slot(self, t: BFPTensor, name: str) -> int:
        from hbfp_hw.conv import conv_operand_blocks
        T = self.config.tile
        blk = conv_operand_blocks(t, name)
        if blk != (T, T):
            raise ValueError(f"{name}'s blocks {blk} are not the device's {T} x {T} conv "
                             f"blocks (conv_format(fmt, {T}, {T}))")
        for i, f in enumerate(self.config.formats):
            if ((f.man_bits, f.exp_bits, self.config.block_2d(i))
                    == (t.fmt.man_bits, t.fmt.exp_bits, (T, T))):
                return i
        raise FormatMismatchError(
            f"conv operand {name!r} ({t.fmt.man_bits}-bit mantissas, {t.fmt.exp_bits}-bit "
            f"exponents, {T} x {T} blocks) matches no device format slot: "
            + "; ".join(f"[{i}] {f.describe()}" for i, f in enumerate(self.config.formats)))

    def _conv_geometry(self, geometry, stride, padding, dilation, kernel):
        from hbfp_hw.conv import ConvGeometry
        geo = geometry if geometry is not None else ConvGeometry.of(stride, padding, dilation)
        if not isinstance(geo, ConvGeometry):
            raise TypeError(f"geometry must be a ConvGeometry, got {geo!r}")
        for s in geo.stride:
            if s not in P.CONV_STRIDES:
                raise ValueError(f"stride={geo.stride} is not supported by CONV; accepted "
                                 f"values are {', '.join(map(str, P.CONV_STRIDES))}")
        for n, v in (("padding", geo.padding), ("dilation", geo.dilation),
                     ("kernel size", kernel)):
            if max(v) > 0xFF:
                raise ValueError(f"{n}={tuple(v)} is out of range for CONV; accepted range "
                                 f"is [0, 255] per axis")
        return geo

    @staticmethod
    def _conv_blocks(t: BFPTensor, axis: int, b0: int, b1: int) -> tuple:
        """Exponent codes and mantissas (block-stream order) of the blocks of ``t`` whose
        grid index along axis ``axis`` (0 or 1) is in ``[b0, b1)``; no re-quantization."""
        codes, man = t.stream()
        g = t.layout.grid
        codes, man = codes.reshape(g), man.reshape(*g, -1)
        sl = (slice(None),) * axis + (slice(b0, b1),)
        return codes[sl].reshape(-1), man[sl].reshape(-1)

    def _conv_cmd(self, mode: int, a, b, slots, dims: dict, geo) -> np.ndarray:
        """One CONV on blocks ``a`` / ``b`` written into op0 / op1: the padded output
        matrix ``(mt * tile, nt * tile)`` of :func:`hbfp_hw.protocol.conv_plan`."""
        T = self.config.tile
        for buf, (codes, man) in enumerate((a, b)):
            self._resident.pop(buf, None)
            self._write(f"op{buf}.exp", 0, codes)
            self._write(f"op{buf}.man", 0, man)
        pl = P.conv_plan(mode, dims["n"], dims["c"], dims["h"], dims["w"], dims["o"],
                         dims["kh"], dims["kw"], geo.stride, geo.padding, geo.dilation, T)
        clocks = (pl["mt"] * pl["nt"] * pl["nk"] * (2 * T + 2) * 2
                  + (pl["blocks_a"] + pl["blocks_b"]) * (T + 1) * 2 + 256)
        self._call(P.Op.CONV, mode=mode, a=0, b=1, slot_a=slots[0], slot_b=slots[1],
                   **dims, stride_h=geo.stride[0], stride_w=geo.stride[1],
                   pad_h=geo.padding[0], pad_w=geo.padding[1], dil_h=geo.dilation[0],
                   dil_w=geo.dilation[1], out_offset=0, compute_clocks=clocks)
        rows, cols = pl["mt"] * T, pl["nt"] * T
        return self._read("out", 0, rows * cols).reshape(rows, cols)

    def _conv_chunks(self, what: str, fixed_a: int, per_a: int, fixed_b: int, per_b: int,
                     out_per: int, ga: int, gb: int, k: int) -> tuple[int, int]:
        """How many blocks of the split axes of ``a`` (``ga`` in all) and ``b`` one command
        takes: ``per_a`` / ``per_b`` operand blocks and ``out_per`` outputs per split block."""
        cfg = self.config
        T = cfg.tile
        dblk = cfg.operand_depth // (T * T)
        if k > cfg.k_max:
            raise ValueError(f"{what}: the reduction of {k} elements exceeds the device's "
                             f"k_max={cfg.k_max} (a CONV is not split along its reduction)")
        if per_a > dblk or per_b > dblk or out_per > cfg.output_depth:
            raise ValueError(
                f"{what}: one block row needs {per_a} / {per_b} operand blocks and "
                f"{out_per} outputs; the device holds {dblk} blocks per operand buffer and "
                f"{cfg.output_depth} outputs (a CONV is not split along positions or its "
                f"reduction)")
        nb_b = max(1, min(gb, dblk // per_b, cfg.output_depth // out_per, _U16 // T))
        nb_a = max(1, min(ga, dblk // per_a, cfg.output_depth // (out_per * nb_b), _U16 // T))
        return nb_a, nb_b

    def _conv_unsupported(self) -> None:
        if not P.conv_built(self.config):
            self._call(P.Op.CONV, mode=0, a=0, b=1, slot_a=0, slot_b=0, n=1, c=1, h=1, w=1,
                       o=1, kh=1, kw=1, stride_h=1, stride_w=1, pad_h=0, pad_w=0, dil_h=1,
                       dil_w=1, out_offset=0)                    # answers UNSUPPORTED
            raise ProtocolError("the device has no CONV address generator but accepted CONV")

    def conv2d(self, xq: BFPTensor, wq: BFPTensor, *, stride=1, padding=0, dilation=1,
               geometry=None) -> np.ndarray:
        """HyperBlock convolution ``Y = conv(X, W)`` on the device (CONV, mode 0),
        bit-identical to :func:`hbfp_hw.conv.bfp_conv2d` with the device's
        ``guard_bits``: ``xq`` ``(N, C, H, W)`` and ``wq`` ``(O, C, kh, kw)`` quantized
        with ``conv_format(fmt, tile, tile)`` of a device slot; returns float32
        ``(N, O, H', W')``. The quantized blocks are written as they are (none is copied
        or quantized again); commands are split over sample blocks and output-channel
        blocks to fit the buffers (strides 1, 2, 4, 8)."""
        self._conv_unsupported()
        sa, sb = self._conv_slot(xq, "x"), self._conv_slot(wq, "w")
        N, C, H, W = xq.shape
        O, Cw, KH, KW = wq.shape
        if C != Cw:
            raise ValueError(f"input channels differ: x is {xq.shape}, w is {wq.shape}")
        geo = self._conv_geometry(geometry, stride, padding, dilation, (KH, KW))
        T = self.config.tile
        Ho, Wo = geo.output_size((H, W), (KH, KW))
        gn, gc, go = xq.layout.grid[0], xq.layout.grid[1], wq.layout.grid[0]
        sn, so = self._conv_chunks("conv2d", gc * H * W, gc * H * W, gc * KH * KW,
                                   gc * KH * KW, Ho * Wo * T * T, gn, go, KH * KW * gc * T)
        y = np.empty((N, O, Ho, Wo), np.float32)
        for o0 in range(0, go, so):
            o1 = min(go, o0 + so)
            wb = self._conv_blocks(wq, 0, o0, o1)
            for n0 in range(0, gn, sn):
                n1 = min(gn, n0 + sn)
                dims = dict(n=min(N, n1 * T) - n0 * T, c=C, h=H, w=W,
                            o=min(O, o1 * T) - o0 * T, kh=KH, kw=KW)
                r = self._conv_cmd(0, self._conv_blocks(xq, 0, n0, n1), wb, (sa, sb), dims,
                                   geo)
                r = r.reshape(n1 - n0, Ho, Wo, T, -1).transpose(0, 3, 4, 1, 2)
                r = r.reshape((n1 - n0) * T, -1, Ho, Wo)
                y[n0 * T: n1 * T, o0 * T: o1 * T] = r[: dims["n"], : dims["o"]]
        return y

    def conv2d_input_grad(self, dyq: BFPTensor, wq: BFPTensor, input_size, *, stride=1,
                          padding=0, dilation=1, geometry=None) -> np.ndarray:
        """Input gradient ``dX`` on the device (CONV, mode 1), bit-identical to
        :func:`hbfp_hw.conv.bfp_conv2d_input_grad`: ``dyq`` ``(N, O, H', W')``, ``wq``
        ``(O, C, kh, kw)``, ``input_size = (H, W)``; returns float32 ``(N, C, H, W)``,
        rounded once (no col2im). Split over sample blocks and channel blocks."""
        self._conv_unsupported()
        sa, sb = self._conv_slot(dyq, "dy"), self._conv_slot(wq, "w")
        N, O, Ho, Wo = dyq.shape
        Ow, C, KH, KW = wq.shape
        H, W = (int(v) for v in input_size)
        if O != Ow:
            raise ValueError(f"output channels differ: dy is {dyq.shape}, w is {wq.shape}")
        geo = self._conv_geometry(geometry, stride, padding, dilation, (KH, KW))
        if geo.output_size((H, W), (KH, KW)) != (Ho, Wo):
            raise ValueError(f"dy's spatial size {(Ho, Wo)} is not the output size "
                             f"{geo.output_size((H, W), (KH, KW))} of an input {(H, W)}")
        T = self.config.tile
        gn, go, gc = dyq.layout.grid[0], dyq.layout.grid[1], wq.layout.grid[1]
        sn, sc = self._conv_chunks("conv2d_input_grad", go * Ho * Wo, go * Ho * Wo,
                                   go * KH * KW, go * KH * KW, H * W * T * T, gn, gc,
                                   KH * KW * go * T)
        dx = np.empty((N, C, H, W), np.float32)
        for c0 in range(0, gc, sc):
            c1 = min(gc, c0 + sc)
            wb = self._conv_blocks(wq, 1, c0, c1)
            for n0 in range(0, gn, sn):
                n1 = min(gn, n0 + sn)
                dims = dict(n=min(N, n1 * T) - n0 * T, c=min(C, c1 * T) - c0 * T, h=H, w=W,
                            o=O, kh=KH, kw=KW)
                r = self._conv_cmd(1, self._conv_blocks(dyq, 0, n0, n1), wb, (sa, sb), dims,
                                   geo)
                r = r.reshape(n1 - n0, H, W, T, -1).transpose(0, 3, 4, 1, 2)
                r = r.reshape((n1 - n0) * T, -1, H, W)
                dx[n0 * T: n1 * T, c0 * T: c1 * T] = r[: dims["n"], : dims["c"]]
        return dx

    def conv2d_weight_grad(self, dyq: BFPTensor, xq: BFPTensor, kernel_size, *, stride=1,
                           padding=0, dilation=1, geometry=None) -> np.ndarray:
        """Weight gradient ``dW`` on the device (CONV, mode 2), bit-identical to
        :func:`hbfp_hw.conv.bfp_conv2d_weight_grad`: ``dyq`` ``(N, O, H', W')``, ``xq``
        ``(N, C, H, W)`` (the forward pass's), ``kernel_size = (kh, kw)``; returns float32
        ``(O, C, kh, kw)``. Split over output-channel blocks and channel blocks; the
        reduction (all samples and positions, ``N' * H' * W'``) must fit ``k_max`` and one
        operand buffer."""
        self._conv_unsupported()
        sa, sb = self._conv_slot(dyq, "dy"), self._conv_slot(xq, "x")
        N, O, Ho, Wo = dyq.shape
        Nx, C, H, W = xq.shape
        KH, KW = (int(v) for v in kernel_size)
        if N != Nx:
            raise ValueError(f"batch sizes differ: dy is {dyq.shape}, x is {xq.shape}")
        geo = self._conv_geometry(geometry, stride, padding, dilation, (KH, KW))
        if geo.output_size((H, W), (KH, KW)) != (Ho, Wo):
            raise ValueError(f"dy's spatial size {(Ho, Wo)} is not the output size "
                             f"{geo.output_size((H, W), (KH, KW))} of an input {(H, W)}")
        T = self.config.tile
        gn, go, gc = dyq.layout.grid[0], dyq.layout.grid[1], xq.layout.grid[1]
        so, sc = self._conv_chunks("conv2d_weight_grad", gn * Ho * Wo, gn * Ho * Wo,
                                   gn * H * W, gn * H * W, T * KH * KW * T, go, gc,
                                   gn * Ho * Wo * T)
        dw = np.empty((O, C, KH, KW), np.float32)
        for c0 in range(0, gc, sc):
            c1 = min(gc, c0 + sc)
            xb = self._conv_blocks(xq, 1, c0, c1)
            for o0 in range(0, go, so):
                o1 = min(go, o0 + so)
                dims = dict(n=N, c=min(C, c1 * T) - c0 * T, h=H, w=W,
                            o=min(O, o1 * T) - o0 * T, kh=KH, kw=KW)
                r = self._conv_cmd(2, self._conv_blocks(dyq, 1, o0, o1), xb, (sa, sb), dims,
                                   geo)
                r = r.reshape((o1 - o0) * T, c1 - c0, KH, KW, T).transpose(0, 1, 4, 2, 3)
                r = r.reshape((o1 - o0) * T, -1, KH, KW)
                dw[o0 * T: o1 * T, c0 * T: c1 * T] = r[: dims["o"], : dims["c"]]
        return dw

    def train_step(self, x: Any, w: Any, dy: Any, fmt: BFPFormat | None = None, *,
                   nonfinite: str = "raise", quantize_on: str = "auto",
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The HyperBlock trio of a linear layer ``Y = X Wᵀ``: ``(Y, dX, dW)``.

        X ``(B, I)``, W ``(O, I)`` and dY ``(B, O)`` are each quantized once (2-D tiles)
        and feed every GEMM they take part in: ``Y = X·Wᵀ``, ``dX = dY·W``,
        ``dW = dYᵀ·X``. Bit-identical to the golden model on ``quantize(x)``,
        ``quantize(w)``, ``quantize(dy)`` and their transposes. ``quantize_on`` as in
        :meth:`matmul`.
        """
        x = _as_real(x, "x")
        w = _as_real(w, "w")
        dy = _as_real(dy, "dy")
        B, In = x.shape
        if w.shape[1] != In or dy.shape != (B, w.shape[0]):
            raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, dy {dy.shape}; "
                             f"expected w (O, {In}) and dy ({B}, O)")
        Out = w.shape[0]
        slots = [self._quantize_slot(fmt, t.shape) for t in (x, w, dy)]
        f = self.config.formats[slots[0]]
        br, bc = self.config.block_2d(slots[0])
        if br != bc:
            raise ValueError(f"train_step needs square 2-D tiles so every tensor serves both "
                             f"orientations; format {f.describe()} has blocks {br}x{bc}")
        _check_nonfinite(nonfinite)
        allow = nonfinite == "flag"
        s = slots[0]
        onchip = self._onchip_ok([(x.shape, s), (w.shape, s), (dy.shape, s)],
                                 [(B, Out), (B, In), (Out, In)], [In, Out, B])
        where = self._where_quantize(quantize_on, onchip)
        if where == "device" and onchip:
            self._quantize_into(x, s, 0, fmt, "x", nonfinite)
            self._quantize_into(w, s, 1, fmt, "w", nonfinite)
            self._quantize_into(dy, s, 2, fmt, "dy", nonfinite)
            y = self._gemm_onchip(0, x.shape, False, s, 1, w.shape, True, s, (B, Out), allow)
            dx = self._gemm_onchip(2, dy.shape, False, s, 1, w.shape, False, s, (B, In), allow)
            dw = self._gemm_onchip(2, dy.shape, True, s, 0, x.shape, False, s, (Out, In), allow)
            return y, dx, dw
        if where == "device":
            xq, wq, dyq = (self.quantize(t, fmt, nonfinite=nonfinite, name=n)
                           for t, n in ((x, "x"), (w, "w"), (dy, "dy")))
        else:
            xq, wq, dyq = (self._host_quantize(t, fmt, s, nonfinite, n)
                           for t, n in ((x, "x"), (w, "w"), (dy, "dy")))
        y = self.matmul_q(xq, wq.T, allow_invalid=allow, names=("x", "w.T"))
        dx = self.matmul_q(dyq, wq, allow_invalid=allow, names=("dy", "w"))
        dw = self.matmul_q(dyq.T, xq, allow_invalid=allow, names=("dy.T", "x"))
        return y, dx, dw


# -- URLs ----------------------------------------------------------------------------------
def _load_manifest(manifest: str | Path | dict) -> dict:
    if isinstance(manifest, dict):
        return manifest
    data = json.loads(Path(manifest).read_text())
    if "device_hash" not in data:
        raise ConfigMismatchError(f"{manifest}: manifest has no device_hash (not an "
                                  f"accelerator manifest?)")
    return data


def open(url: str, *, config: AcceleratorConfig | None = None,
         manifest: str | Path | dict | None = None, timeout: float | None = None,
         retries: int = 8, progress: bool | None = None) -> Device:
    """Open a device by URL.

    * ``emulate://`` -- the golden-model device (:class:`~hbfp_hw.host.emulator.Emulator`)
      over an in-process loopback: the whole codec path runs;
    * ``serial:///dev/ttyUSB0?baud=3000000`` -- a board through pyserial;
    * ``sim://`` -- the generated accelerator RTL in Amaranth's simulator, in process
      (:func:`hbfp_hw.gateware.sim_device.sim_transport`). The simulator runs a few
      thousand clocks per second at best, so ``sim://`` builds the small
      :data:`~hbfp_hw.gateware.sim_device.SIM_CONFIG` (2x2 MAC array; format slots
      HBFP8 and HBFP4 on 8x8 tiles, MXINT8) unless ``config`` or ``manifest`` names
      another build. ``sim://?vcd=waves.vcd`` writes every signal to a VCD file,
      completed when the device is closed.

    ``config`` / ``manifest`` give the expected build: INFO must match it. For
    ``emulate://`` and ``sim://`` they also configure the device (otherwise
    ``emulate://`` builds :meth:`AcceleratorConfig.default`, ``sim://``
    ``SIM_CONFIG``).

    ``progress``: a tqdm bar on transfers over 1 MiB; on ``sim://`` also a line on
    stderr every ~2 s of a long simulation, with the simulated clocks and the rate in
    cycles/s. ``None`` (default): only when stderr is a terminal (for ``sim://``, the
    environment variable ``HBFP_SIM_PROGRESS=1`` / ``0`` switches the simulator's lines
    on / off as well); ``True`` / ``False`` force them.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, got {type(url).__name__}")
    u = urllib.parse.urlsplit(url)
    q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
    man = _load_manifest(manifest) if manifest is not None else None
    expected_hash = bytes.fromhex(man["device_hash"]) if man else None
    man_config = None
    if man is not None and "config" in man:
        try:
            man_config = AcceleratorConfig.from_dict(man["config"])
        except (TypeError, ValueError):
            man_config = None
    config_for_model = config if config is not None else man_config
    kw = dict(expected_hash=expected_hash,
              expected_config=man_config if man is not None else config, retries=retries,
              progress=progress)
    if u.scheme == "emulate":
        from .emulator import Emulator
        transport = LoopbackTransport(Emulator(config_for_model))
        return Device(transport, timeout=0.0 if timeout is None else timeout, **kw)
    if u.scheme == "serial":
        port = (u.netloc + u.path) or q.get("port", "")
        if not port:
            raise ValueError(f"{url!r}: no port; expected serial:///dev/ttyUSB0?baud=3000000")
        try:
            baud = int(q.get("baud", 3_000_000))
        except ValueError:
            raise ValueError(f"{url!r}: baud={q['baud']!r} is not an integer") from None
        tmo = float(q.get("timeout", 1.0)) if timeout is None else timeout
        transport = SerialTransport(port, baud)
        try:
            return Device(transport, timeout=tmo, **kw)
        except BaseException:
            transport.close()
            raise
    if u.scheme == "sim":
        try:
            import importlib
            simdev = importlib.import_module("hbfp_hw.gateware.sim_device")
        except ModuleNotFoundError as e:
            if e.name not in ("hbfp_hw.gateware.sim_device",):
                raise
            raise RuntimeError(
                "sim:// needs the accelerator simulation (hbfp_hw.gateware.sim_device), "
                "which is not available in this build; use emulate:// for the golden "
                "device model") from None
        factory = getattr(simdev, "sim_transport", None)
        if factory is None:
            raise RuntimeError("sim:// needs hbfp_hw.gateware.sim_device.sim_transport(config) "
                               "returning a Transport to the simulated RTL; this build does "
                               "not provide it yet")
        cfg = config_for_model if config_for_model is not None else simdev.SIM_CONFIG
        unknown = sorted(set(q) - {"vcd"})
        if unknown:
            raise ValueError(f"{url!r}: unknown option {unknown[0]!r}; sim:// accepts vcd=PATH")
        transport = (factory(cfg, progress=progress, vcd=q["vcd"]) if "vcd" in q
                     else factory(cfg, progress=progress))
        try:
            return Device(transport, timeout=10.0 if timeout is None else timeout, **kw)
        except BaseException:
            transport.close()
            raise
    raise ValueError(f"unsupported device URL {url!r}; accepted schemes are "
                     + ", ".join(f"{s}://" for s in URL_SCHEMES))
