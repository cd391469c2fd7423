"""Byte pipes between the host codec and a device.

:class:`Transport` is the abstract pipe (``write`` bytes, ``read`` what has arrived
within a timeout). Implementations:

* :class:`SerialTransport` -- a UART through pyserial (``serial:///dev/ttyUSB0?baud=...``);
* :class:`LoopbackTransport` -- in process, wired to a device model's ``feed``/``idle``
  (the emulator, ``emulate://``);
* :class:`FaultInjectingTransport` -- wraps another transport and, seeded, corrupts,
  drops, duplicates and delays bytes in both directions, counting every fault.

The RTL in Amaranth's simulator (``sim://``) is
:class:`hbfp_hw.gateware.sim_device.SimTransport`, kept with the gateware.
"""

from __future__ import annotations

import abc
import random
import time
from collections import Counter
from typing import Protocol

__all__ = ["Transport", "TransportError", "DeviceModel", "LoopbackTransport",
           "SerialTransport", "FaultInjectingTransport"]


class TransportError(OSError):
    """The pipe cannot be opened or has failed."""


class Transport(abc.ABC):
    """An abstract byte pipe."""

    #: Raw line rate in bytes per second, if the transport has one (for bounds).
    byte_rate: float | None = None

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Send bytes (may block until they are handed to the line)."""

    @abc.abstractmethod
    def read(self, timeout: float) -> bytes:
        """Bytes that arrived, waiting up to ``timeout`` s for the first; ``b""`` if none."""

    def close(self) -> None:
        """Release the pipe."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceModel(Protocol):
    """What :class:`LoopbackTransport` needs from a device model."""

    def feed(self, data: bytes) -> bytes: ...

    def idle(self) -> bytes: ...


class LoopbackTransport(Transport):
    """In-process pipe to a device model; the device answers synchronously.

    ``read`` never sleeps: when nothing is pending, the line is idle, so the device is
    told (``idle()``, its partial-frame timeout) and ``b""`` is returned at once --
    a timeout costs no wall-clock time.
    """

    def __init__(self, device: DeviceModel) -> None:
        self.device = device
        self._rx = bytearray()
        self.bytes_to_device = 0
        self.bytes_from_device = 0

    def write(self, data: bytes) -> None:
        self.bytes_to_device += len(data)
        out = self.device.feed(bytes(data))
        self.bytes_from_device += len(out)
        self._rx += out

    def read(self, timeout: float) -> bytes:
        if not self._rx:
            out = self.device.idle()
            self.bytes_from_device += len(out)
            self._rx += out
        data = bytes(self._rx)
        self._rx.clear()
        return data


class SerialTransport(Transport):
    """A UART through pyserial.

    Parameters
    ----------
    port
        Device path (``/dev/ttyUSB0``) or any pyserial URL.
    baud
        Line rate in bit/s.
    """

    def __init__(self, port: str, baud: int = 3_000_000) -> None:
        try:
            import serial
        except ImportError as e:  # pragma: no cover - pyserial is a dependency
            raise TransportError("serial:// needs pyserial (pip install pyserial)") from e
        if not isinstance(baud, int) or baud <= 0:
            raise ValueError(f"baud={baud!r} must be a positive integer")
        self.port = port
        self.baud = baud
        self.byte_rate = baud / 10.0
        try:
            self._ser = serial.serial_for_url(port, baudrate=baud, timeout=0,
                                              write_timeout=None)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError(f"cannot open serial port {port!r} at {baud} baud: {e}") \
                from e

    def write(self, data: bytes) -> None:
        self._ser.write(data)

    def read(self, timeout: float) -> bytes:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            n = self._ser.in_waiting
            if n:
                return self._ser.read(n)
            if time.monotonic() >= deadline:
                return b""
            time.sleep(min(0.0005, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self._ser.close()


class FaultInjectingTransport(Transport):
    """Wraps a transport and injects byte faults, reproducibly.

    Every byte written or read is, with the given probabilities, corrupted (XOR with
    a non-zero random byte), dropped, duplicated, or delayed (held back and released
    after a later ``read`` call, i.e. after the receiver may have timed out). Faults
    stop once ``max_faults`` have been injected.

    Attributes
    ----------
    counts : collections.Counter
        Injected faults by kind (``corrupt``, ``drop``, ``duplicate``, ``delay``).
    """

    KINDS = ("corrupt", "drop", "duplicate", "delay")

    def __init__(self, inner: Transport, *, seed: int, rate: float = 1e-3,
                 weights: dict[str, float] | None = None, max_faults: int | None = None,
                 max_delay_reads: int = 3) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate={rate} is out of range; accepted range is [0, 1]")
        self.inner = inner
        self.byte_rate = inner.byte_rate
        self.rate = rate
        w = {k: 1.0 for k in self.KINDS} if weights is None else dict(weights)
        unknown = set(w) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; accepted are "
                             f"{', '.join(self.KINDS)}")
        self._kinds = [k for k in self.KINDS if w.get(k, 0) > 0]
        self._weights = [w[k] for k in self._kinds]
        self.max_faults = max_faults
        self.max_delay_reads = max_delay_reads
        self._rng = random.Random(seed)
        self.counts: Counter = Counter()
        self._held: list[tuple[int, str, bytes]] = []  # (reads left, direction, bytes)
        self._rx = bytearray()

    @property
    def total_faults(self) -> int:
        return sum(self.counts.values())

    def _mangle(self, data: bytes, direction: str) -> bytes:
        if self.rate == 0 or not self._kinds:
            return data
        out = bytearray()
        rng = self._rng
        i, n = 0, len(data)
        while i < n:
            # geometric skip to the next faulty byte keeps this fast on long writes
            if self.max_faults is not None and self.total_faults >= self.max_faults:
                out += data[i:]
                break
            gap = int(rng.expovariate(self.rate)) if self.rate < 1 else 0
            if i + gap >= n:
                out += data[i:]
                break
            out += data[i: i + gap]
            i += gap
            b = data[i]
            kind = rng.choices(self._kinds, self._weights)[0]
            self.counts[kind] += 1
            if kind == "corrupt":
                out.append(b ^ rng.randrange(1, 256))
            elif kind == "duplicate":
                out += bytes((b, b))
            elif kind == "delay":
                run = data[i: i + rng.randrange(1, 9)]
                self._held.append((rng.randrange(1, self.max_delay_reads + 1), direction,
                                   bytes(run)))
                i += len(run)
                continue
            # drop: emit nothing
            i += 1
        return bytes(out)

    def _release(self) -> None:
        keep = []
        for left, direction, run in self._held:
            if left <= 1:
                if direction == "tx":
                    self.inner.write(run)
                else:
                    self._rx += run
            else:
                keep.append((left - 1, direction, run))
        self._held = keep

    def write(self, data: bytes) -> None:
        self.inner.write(self._mangle(data, "tx"))

    def read(self, timeout: float) -> bytes:
        self._release()
        data = self.inner.read(timeout)
        out = bytes(self._rx) + self._mangle(data, "rx")
        self._rx.clear()
        return out

    def close(self) -> None:
        self.inner.close()
