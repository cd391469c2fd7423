"""``sim://``: the accelerator top in Amaranth's simulator as a host transport.

:data:`SIM_CONFIG` is the small configuration ``sim://`` opens by default (the Python
simulator runs a few thousand clocks per second at best); :class:`SimTransport` clocks the
:class:`~hbfp_hw.gateware.top.Accelerator` byte port from the host driver's
``write`` / ``read`` calls and, on long calls, prints the simulated clocks and the
simulation rate on stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from amaranth import ClockDomain, Elaboratable, Module

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, MXINT8, BFPFormat
from hbfp_hw.host.transport import Transport

from .top import Accelerator

__all__ = ["SIM_CONFIG", "SimTransport", "sim_transport", "PROGRESS_ENV", "progress_default"]

#: A small configuration for ``sim://`` (the Amaranth simulator is slow): a 2x2 MAC
#: array on 8x8 tiles, 1 Ki-element operand buffers and three format slots --
#: ``[0]`` HBFP8 on 8x8 HyperBlock tiles (``HBFP8T8``, the MAC array's format),
#: ``[1]`` HBFP4 on 8x8 HyperBlock tiles (``HBFP4T8``), ``[2]`` OCP MXINT8 (1-D blocks
#: of 32 along the last axis).
SIM_CONFIG = AcceleratorConfig(
    formats=(BFPFormat(man_bits=8, exp_bits=8, block_shape=(8, 8), block_axes=(-2, -1),
                       name="HBFP8T8"),
             HBFP4.replace(block_shape=(8, 8), name="HBFP4T8"),
             MXINT8),
    array_rows=2, array_cols=2, tile=8, operand_buffers=3, operand_depth=1024,
    input_depth=256, output_depth=1024, k_max=256, name="hbfp_sim")

#: Environment variable that switches ``sim://`` progress lines on (``1``) or off
#: (``0``) when ``progress`` is not given.
PROGRESS_ENV = "HBFP_SIM_PROGRESS"


def progress_default(stream: TextIO | None = None) -> bool:
    """Whether :class:`SimTransport` reports progress when ``progress=None``:
    :data:`PROGRESS_ENV` if it is set (``0``/``false``/``no``/``off`` or empty: off,
    anything else: on), else whether ``stream`` (default stderr) is a terminal."""
    env = os.environ.get(PROGRESS_ENV)
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no", "off")
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class SimTransport(Transport):
    """The accelerator top running in Amaranth's simulator, in process.

    ``write`` queues bytes; ``read`` clocks the design (one byte per clock on the byte
    port, no back-pressure on the output) until the input is consumed and the device has
    been idle for a few clocks, then returns what it sent. When nothing is pending,
    ``read`` clocks the partial-frame timeout (the line is idle).

    ``cycles`` counts simulated clocks; ``sim_seconds`` the wall time spent simulating.

    Parameters
    ----------
    config
        The accelerator to simulate (default :data:`SIM_CONFIG`).
    idle_cycles
        The top's partial-frame timeout in clocks.
    runtime_rounding
        Build every rounding mode into each quantizer (see :class:`Accelerator`).
    progress
        Report progress on ``progress_stream`` while one ``write`` / ``read`` call
        simulates for longer than ``progress_interval`` seconds: a line with the clocks
        simulated in this call, the total, and the rate in cycles/s, repeated every
        ``progress_interval`` seconds (on a terminal the line is rewritten in place with
        ``\\r``, and ended when the call returns). ``None`` (default): on when the
        :data:`PROGRESS_ENV` environment variable says so, otherwise when stderr is a
        terminal (:func:`progress_default`).
    progress_interval
        Seconds between progress lines (and before the first), ``>= 0``.
    progress_stream
        Where progress goes (default: ``sys.stderr`` at the time of the report).
    vcd
        Path of a VCD waveform file: every signal of the design, written as the
        simulation runs and completed by :meth:`close` (``sim://?vcd=PATH``). The file
        grows by roughly a kilobyte per simulated clock of a busy design.
    """

    byte_rate = None

    def __init__(self, config: AcceleratorConfig | None = None, *,
                 idle_cycles: int = 2048, runtime_rounding: bool = True,
                 progress: bool | None = None, progress_interval: float = 2.0,
                 progress_stream: TextIO | None = None,
                 vcd: str | os.PathLike | None = None) -> None:
        from amaranth.sim import Simulator
        if vcd is not None and not Path(vcd).parent.is_dir():
            raise ValueError(f"vcd={str(vcd)!r}: the folder {Path(vcd).parent} does not exist")
        if not isinstance(progress_interval, (int, float)) or not progress_interval >= 0:
            raise ValueError(f"progress_interval={progress_interval!r} is out of range; "
                             f"accepted range is [0, inf) seconds")
        self.config = config or SIM_CONFIG
        self.dut = Accelerator(self.config, idle_cycles=idle_cycles,
                               runtime_rounding=runtime_rounding)
        self.idle_cycles = idle_cycles
        self.progress = progress_default(progress_stream) if progress is None else bool(progress)
        self.progress_interval = float(progress_interval)
        self.progress_stream = progress_stream
        self._tx = bytearray()
        self._rx = bytearray()
        self.cycles = 0
        self.sim_seconds = 0.0
        self._quiet = 0
        self._target = 0
        self._top = _WithReset(self.dut)
        self._reset_cycles = 0
        self._sim = Simulator(self._top)
        self._sim.add_clock(1.0 / self.config.clock_hz)
        if self.config.array_clock_hz:      # the MAC array's own clock domain
            self._sim.add_clock(1.0 / self.config.array_clock_hz, domain="array")
        self._sim.add_testbench(self._bench, background=True)
        self._period = 1.0 / self.config.clock_hz
        self._vcd = None
        if vcd is not None:
            self._vcd = self._sim.write_vcd(str(vcd))
            self._vcd.__enter__()

    def reset_device(self, cycles: int = 4) -> None:
        """Pulse the design's reset for ``cycles`` clocks, as a reset button or a
        watchdog would: every register returns to its reset value (the session token to
        0, the executor's replay record, the accumulators and statistics); block RAM
        keeps its contents. Bytes queued for the device and answers not yet read are
        lost."""
        self._tx.clear()
        self._rx.clear()
        self._reset_cycles = int(cycles)
        self._quiet = 0
        self._run(cycles + 4, cycles + 2)

    async def _bench(self, ctx) -> None:
        dut = self.dut
        ctx.set(dut.o.ready, 1)
        while True:
            ctx.set(self._top.cd.rst, int(self._reset_cycles > 0))
            if self._reset_cycles:
                self._reset_cycles -= 1
            if self._tx:
                ctx.set(dut.i.valid, 1)
                ctx.set(dut.i.payload, self._tx[0])
            else:
                ctx.set(dut.i.valid, 0)
            _, _, iv, ir, ov, od, busy = await ctx.tick().sample(
                dut.i.valid, dut.i.ready, dut.o.valid, dut.o.payload, dut.busy)
            self.cycles += 1
            if iv and ir:
                del self._tx[0]
            if ov:
                self._rx.append(od)
            self._quiet = 0 if (busy or ov or self._tx) else self._quiet + 1

    def _stream(self) -> tuple[TextIO, bool]:
        stream = self.progress_stream or sys.stderr
        try:
            return stream, bool(stream.isatty())
        except (AttributeError, ValueError):
            return stream, False

    def _report(self, start: int, t0: float, now: float) -> None:
        """One progress line: clocks in this call, total clocks, cycles/s in this call."""
        stream, tty = self._stream()
        n = self.cycles - start
        rate = n / (now - t0) if now > t0 else 0.0
        text = (f"sim://: {n} cycles simulated in this call ({self.cycles} in total), "
                f"{rate:.0f} cycles/s")
        stream.write(("\r" + text) if tty else text + "\n")
        stream.flush()

    def _report_end(self) -> None:
        stream, tty = self._stream()
        if tty:   # end the line rewritten in place
            stream.write("\n")
            stream.flush()

    def _run(self, max_cycles: int, quiet: int) -> None:
        t0 = time.perf_counter()
        start = self.cycles
        report = self.progress
        next_report = t0 + self.progress_interval
        reported = False
        try:
            while self.cycles - start < max_cycles:
                self._sim.advance()
                if self._quiet >= quiet and not self._tx:
                    break
                if report and self.cycles > start:
                    now = time.perf_counter()
                    if now >= next_report:
                        self._report(start, t0, now)
                        reported = True
                        next_report = now + self.progress_interval
        finally:
            self.sim_seconds += time.perf_counter() - t0
            if reported:
                self._report_end()

    def write(self, data: bytes) -> None:
        self._tx += bytes(data)
        self._quiet = 0
        self._run(1 << 40, 8)

    def read(self, timeout: float) -> bytes:
        if not self._rx:
            # the line is idle: let a partial frame time out
            self._quiet = 0
            self._run(self.idle_cycles + 16, self.idle_cycles + 8)
        data = bytes(self._rx)
        self._rx.clear()
        return data

    def close(self) -> None:
        self._tx.clear()
        if self._vcd is not None:
            vcd, self._vcd = self._vcd, None
            vcd.__exit__(None, None, None)


class _WithReset(Elaboratable):
    """The top with its ``sync`` domain defined here, so the simulation can pulse its
    reset."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.cd = ClockDomain("sync")

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = self.cd
        m.submodules.top = self.inner
        return m


def sim_transport(config: AcceleratorConfig | None = None, *,
                  progress: bool | None = None,
                  vcd: str | os.PathLike | None = None) -> SimTransport:
    """``sim://``: a :class:`SimTransport` for ``config`` (default :data:`SIM_CONFIG`);
    ``progress`` and ``vcd`` as in :class:`SimTransport` (``progress=None``: environment /
    terminal)."""
    return SimTransport(config, progress=progress, vcd=vcd)
