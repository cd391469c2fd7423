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
#: What :meth:`Device.read_stats` reads: GEMM outputs or QUANTIZE inputs.
STATS_SOURCES = ("gemm", "quantize")


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
        self.description, self.hash = self._read_info()
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

    def _read_info(self) -> tuple[dict, bytes]:
        blob, off, total, digest = b"", 0, None, b""
        while total is None or off < total:
            r = self._call(P.Op.INFO, offset=off)
            if r.fields["version"] != P.PROTOCOL_VERSION:
                raise ConfigMismatchError(f"device speaks protocol version "
                                          f"{r.fields['version']}, host {P.PROTOCOL_VERSION}")
            total, digest = r.fields["total"], r.fields["hash"]
            if not r.data and off < total:
                raise ConfigMismatchError("device INFO answer ended early")
            blob += r.data
            off += len(r.data)
        desc = json.loads(blob)
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
        return {**self.description, "hash": self.hash.hex()}

    def read_stats(self, *, clear: bool = False, source: str = "gemm") -> dict:
        """Online statistics since the last clear/reset: ``count`` (finite elements),
        ``n_nonfinite``, ``min``, ``max`` (0.0 while ``count`` is 0).

        ``source="gemm"`` (default): the GEMM outputs stored into ``out``;
        ``source="quantize"``: the FP32 tensor elements QUANTIZE read from ``fp_in``
        (every tile :meth:`quantize` sent, not the block padding). ``clear`` empties that
        record after reading it; the other is kept.
        """
        if source not in STATS_SOURCES:
            raise ValueError(f"source={source!r}; accepted values are "
                             f"{', '.join(map(repr, STATS_SOURCES))}")
        flags = ((int(P.StatsFlag.CLEAR) if clear else 0)
                 | (int(P.StatsFlag.QUANTIZE_INPUT) if source == "quantize" else 0))
        r = self._call(P.Op.READ_STATS, flags=flags)
        return dict(r.fields)

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
        """
        _check_nonfinite(nonfinite)
        x = _as_real(x, name)
        slot = self._quantize_slot(fmt, x.shape)
        exponent = self._check_exponent(exponent, slot)
        dfmt = self.config.formats[slot]
        fmt = fmt or dfmt
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
        FP32 out, BFP back, BFP out again)."""
        if quantize_on not in QUANTIZE_ON:
            raise ValueError(f"quantize_on={quantize_on!r}; accepted values are "
                             f"{', '.join(map(repr, QUANTIZE_ON))}")
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

    def bitlayer_matmul(self, x_int: Any, planes: Any, layers: int | None = None) \
            -> np.ndarray:
        """Bit-layer GEMM on the device (BITLAYER), any sizes: ``x_int`` (batch, K)
        integer activations in the int16 range, ``planes`` the
        :func:`hbfp_hw.bitlayers.decompose` of W (bits, N, K) with ``bits`` up to
        ``BITLAYER_BITS_MAX``; returns the int64 ``(batch, N)`` result of
        :func:`hbfp_hw.bitlayers.matmul` (``layers`` top planes, None: all), bit for bit.

        The GEMM is split into commands that fit the ``bl.w`` / ``bl.x`` / ``bl.y``
        buffers and ``K <= bitlayer_k_max``; partial sums over K are added on the host
        (exact integers). ``UNSUPPORTED`` devices (``bitlayer_lanes`` 0) raise
        :class:`DeviceError`.
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
                       w_offset=0, x_offset=0, y_offset=0)       # answers UNSUPPORTED
            raise ProtocolError("the device has no bit-layer buffers but accepted BITLAYER")
        dw, dx, dy = (self._specs[n].depth for n in ("bl.w", "bl.x", "bl.y"))
        kmax = min(P.bitlayer_k_max(self.config), dx)
        batch = x.shape[0]
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
                               compute_clocks=clocks)
                    part = self._read("bl.y", 0, (b1 - b0) * (r1 - r0))
                    y[b0:b1, r0:r1] += part.astype(np.int64).reshape(b1 - b0, r1 - r0)
        return y

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
