"""No silent wrong result from the link: device resets at random requests, and tensors
that embed complete encoded frames sent over a link with byte errors.

* **Reset:** the device is reset at a random request inside ``Device.matmul`` (before
  the request reaches it, or after it executed with its answer lost). Every trial must
  end in :class:`~hbfp_hw.host.device.DeviceResetError` (the answers carry session token
  0, not the host's), never in a result; the next ``matmul`` is correct again.
* **Embedded frames:** WRITE data holding a complete, CRC-valid RESET frame, over a link
  that corrupts and drops bytes: the device never executes the embedded frame (byte
  stuffing: the delimiter never occurs inside a frame) and every ``matmul`` is correct or
  raises a link error.

Both on ``emulate://`` (300 trials each) and on the RTL (``sim://``: a few trials in the
default run, 300 resets in the sweep: ``pytest -m sweep tests/test_link_trust.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.host.device import (Device, DeviceResetError, LinkError, ProtocolError,
                                 gemm_clock_bound)
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.host.transport import FaultInjectingTransport, LoopbackTransport, Transport
from hbfp_hw.quantize import quantize

#: One format slot (HBFP8 on 8x8 tiles): the simulator is faster with fewer slots.
SIM_ONE = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], name="hbfp_sim_one")
#: The format ``Device.matmul`` uses by default: the device's slot 0.
FMT = SIM_ONE.formats[0]


class ResetAt(Transport):
    """Resets the device at write number ``at`` (counted from :meth:`arm`): ``before``
    the frame reaches it, or ``after`` it executed (its answer is lost)."""

    def __init__(self, inner: Transport, reset) -> None:
        self.inner, self._reset = inner, reset
        self.byte_rate = inner.byte_rate
        self.writes, self.at, self.mode, self.fired = 0, None, "before", False

    def arm(self, at: int | None, mode: str = "before") -> None:
        self.writes, self.at, self.mode, self.fired = 0, at, mode, False

    def write(self, data: bytes) -> None:
        hit = self.at is not None and self.writes == self.at and not self.fired
        self.writes += 1
        if hit and self.mode == "before":
            self._reset(self.inner)
            self.fired = True
        self.inner.write(data)
        if hit and self.mode == "after":
            self._reset(self.inner)
            self.fired = True

    def read(self, timeout: float) -> bytes:
        return self.inner.read(timeout)


def _emulator_reset(cfg):
    def reset(tr: LoopbackTransport) -> None:
        tr.device = Emulator(cfg)     # a power cycle: a new device, buffers cleared
        tr._rx.clear()
    return reset


def _operands(rng, M, K, N):
    a = (rng.standard_normal((M, K)) * 4).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    return a, b, bfp_matmul(quantize(a, FMT), quantize(b, FMT))


def _reset_trials(dev: Device, tr: ResetAt, rng, trials: int, shape) -> dict:
    """``trials`` resets at random requests of a matmul; returns the outcome counts."""
    a, b, ref = _operands(rng, *shape)
    tr.arm(None)
    assert np.array_equal(dev.matmul(a, b), ref)
    n_req = tr.writes
    assert n_req >= 3
    out = {"reset_detected": 0, "correct": 0, "silent_wrong": 0}
    for _ in range(trials):
        tr.arm(int(rng.integers(0, n_req)), str(rng.choice(["before", "after"])))
        try:
            y = dev.matmul(a, b)
        except DeviceResetError:
            out["reset_detected"] += 1
            tr.arm(None)
            assert np.array_equal(dev.matmul(a, b), ref), "no recovery after the reset"
            continue
        if np.array_equal(y, ref):
            out["correct"] += 1
        else:
            out["silent_wrong"] += 1
    return out


def test_device_reset_at_random_requests_emulate(rng):
    cfg = SIM_ONE
    tr = ResetAt(LoopbackTransport(Emulator(cfg)), _emulator_reset(cfg))
    dev = Device(tr, timeout=0.0, expected_config=cfg)
    out = _reset_trials(dev, tr, rng, 300, (20, 24, 18))
    print("emulate:// resets:", out, dict(dev.link))
    assert out["silent_wrong"] == 0
    assert out["reset_detected"] == 300      # every reset inside the matmul is seen
    assert dev.link["device_resets"] == 300


@pytest.fixture(scope="module")
def sim():
    """One simulated top for the module (elaborating it takes seconds)."""
    return SimTransport(SIM_ONE, idle_cycles=2000, progress=False)


@pytest.mark.parametrize("trials", [pytest.param(3, id="3"),
                                    pytest.param(300, id="300", marks=pytest.mark.sweep)])
def test_device_reset_at_random_requests_rtl(rng, trials, sim):
    tr = ResetAt(sim, lambda t: t.reset_device())
    dev = Device(tr, timeout=0.0, expected_config=SIM_ONE)
    out = _reset_trials(dev, tr, rng, trials, (12, 16, 9))
    print("sim:// resets:", out, dict(dev.link))
    assert out["silent_wrong"] == 0 and out["reset_detected"] == trials


def _frame_floats(rng, count: int) -> tuple[np.ndarray, list[bytes]]:
    """FP32 values whose bytes hold complete encoded RESET frames (finite values), and
    the frames."""
    vals, frames = [], []
    while len(vals) < count:
        fr = P.encode_frame(int(rng.integers(0, 256)), P.Op.RESET)
        v = np.frombuffer(fr + bytes((-len(fr)) % 4), dtype=np.float32)
        if np.all(np.isfinite(v)) and np.all(np.abs(v) < 1e30):
            vals.extend(v.tolist())
            frames.append(fr)
    return np.array(vals, dtype=np.float32), frames


def _embedded_trials(dev: Device, rng, trials: int, shape) -> dict:
    M, K, N = shape
    out = {"correct": 0, "link_error": 0, "silent_wrong": 0}
    for _ in range(trials):
        a, b, _ = _operands(rng, M, K, N)
        emb, frames = _frame_floats(rng, 12)
        a.reshape(-1)[: emb.size] = emb                 # the frames' bytes in WRITE data
        b.reshape(-1)[-emb.size:] = emb
        assert frames[0] in a.tobytes() and frames[-1] in b.tobytes()
        ref = bfp_matmul(quantize(a, FMT), quantize(b, FMT))
        try:
            y = dev.matmul(a, b)
        except LinkError:
            out["link_error"] += 1
            continue
        out["correct" if np.array_equal(y, ref) else "silent_wrong"] += 1
    return out


def test_embedded_frames_under_line_errors_emulate(rng, seed):
    cfg = SIM_ONE
    emu = Emulator(cfg)
    tr = FaultInjectingTransport(LoopbackTransport(emu), seed=seed, rate=0.0,
                                 weights={"corrupt": 2, "drop": 2, "duplicate": 1})
    dev = Device(tr, timeout=0.0, expected_config=cfg, retries=12)
    tr.rate = 2e-3             # after INFO (4 KiB answers): a bad link from here on
    out = _embedded_trials(dev, rng, 300, (16, 24, 16))
    print("emulate:// embedded frames:", out, dict(tr.counts), dict(dev.link))
    assert out["silent_wrong"] == 0
    assert emu.counters["RESET"] == 0          # no embedded frame was ever executed
    assert tr.total_faults > 100 and out["correct"] >= 250
    assert dev._frame_chunk < dev.chunk or dev.link["retries"] > 0


def test_embedded_frames_under_line_errors_rtl(rng, seed, sim):
    cfg = SIM_ONE
    tr = FaultInjectingTransport(sim, seed=seed, rate=0.0,
                                 weights={"corrupt": 2, "drop": 2, "duplicate": 1})
    dev = Device(tr, timeout=0.0, expected_config=cfg, retries=12)
    tr.rate = 3e-3
    out = _embedded_trials(dev, rng, 2, (12, 16, 9))
    print("sim:// embedded frames:", out, dict(tr.counts), dict(dev.link))
    assert out["silent_wrong"] == 0
    assert tr.total_faults > 0


class _Tap(LoopbackTransport):
    """A loopback whose answers can be doubled or joined by a foreign answer frame."""

    def __init__(self, device, *, double: bool = False) -> None:
        super().__init__(device)
        self.double, self.inject, self.writes = double, None, 0

    def write(self, data: bytes) -> None:
        before = len(self._rx)
        super().write(data)
        self.writes += 1
        if self.double:
            self._rx += self._rx[before:]
        if self.inject is not None and self.writes == self.inject[0]:
            self._rx += self.inject[1]


def test_foreign_answer_raises_protocol_error_and_duplicates_do_not(rng):
    cfg = SIM_ONE
    emu = Emulator(cfg)
    tap = _Tap(emu, double=True)
    dev = Device(tap, timeout=0.0, expected_config=cfg)
    a, b, ref = _operands(rng, 16, 16, 16)
    assert np.array_equal(dev.matmul(a, b), ref)         # every answer arrived twice
    assert dev.link["stale_frames"] > 0 and dev.link["unexpected_answers"] == 0
    tap.double = False
    foreign = P.encode_frame(77, P.Op.RESET | P.RESPONSE_FLAG,
                             emu.session.to_bytes(4, "little"))
    tap.inject = (tap.writes + 2, foreign)
    with pytest.raises(ProtocolError, match=r"never sent \(SEQ 77, opcode 0x87"):
        dev.matmul(a, b)
    assert dev.link["unexpected_answers"] == 1
    assert np.array_equal(dev.matmul(a, b), ref)         # resynchronised


class _Vanishing(LoopbackTransport):
    def __init__(self, device) -> None:
        super().__init__(device)
        self.gone = False

    def read(self, timeout: float) -> bytes:
        if self.gone:
            raise OSError(5, "Input/output error: the serial port vanished")
        return super().read(timeout)


def test_vanished_port_raises_link_error():
    tr = _Vanishing(Emulator(SIM_ONE))
    dev = Device(tr, timeout=0.0)
    tr.gone = True
    with pytest.raises(LinkError, match="the link failed: .*vanished"):
        dev.read_stats()


def test_answer_timeout_includes_compute_time():
    tr = LoopbackTransport(Emulator(SIM_ONE))
    dev = Device(tr, timeout=0.5)
    assert dev.answer_timeout(100, 10**9) == 0.5           # no byte rate: no bound
    tr.byte_rate = 300_000.0                                # a 3 Mbaud UART
    base = dev.answer_timeout(100)
    assert base > 0.5
    clocks = gemm_clock_bound(256, 4096, 256)
    assert dev.answer_timeout(100, clocks) == pytest.approx(base + clocks / SIM_ONE.clock_hz)
    assert clocks / SIM_ONE.clock_hz > 1.0                  # seconds of compute are waited
