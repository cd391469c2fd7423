"""``sim://``: the accelerator top in Amaranth's simulator as a host transport.

:data:`SIM_CONFIG` is the small configuration ``sim://`` opens by default (the Python
simulator runs a few thousand clocks per second); :class:`SimTransport` clocks the
:class:`~hbfp_hw.gateware.top.Accelerator` byte port from the host driver's
``write`` / ``read`` calls.
"""

from __future__ import annotations

import time

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import BFPFormat
from hbfp_hw.host.transport import Transport

from .top import Accelerator

__all__ = ["SIM_CONFIG", "SimTransport", "sim_transport"]

#: A small configuration for ``sim://`` (the Amaranth simulator is slow).
SIM_CONFIG = AcceleratorConfig(
    formats=(BFPFormat(man_bits=8, exp_bits=8, block_shape=(8, 8), block_axes=(-2, -1),
                       name="HBFP8T8"),),
    array_rows=2, array_cols=2, tile=8, operand_buffers=3, operand_depth=1024,
    input_depth=256, output_depth=1024, k_max=256, name="hbfp_sim")


class SimTransport(Transport):
    """The accelerator top running in Amaranth's simulator, in process.

    ``write`` queues bytes; ``read`` clocks the design (one byte per clock on the byte
    port, no back-pressure on the output) until the input is consumed and the device has
    been idle for a few clocks, then returns what it sent. When nothing is pending,
    ``read`` clocks the partial-frame timeout (the line is idle).

    ``cycles`` counts simulated clocks; ``sim_seconds`` the wall time spent simulating.
    """

    byte_rate = None

    def __init__(self, config: AcceleratorConfig | None = None, *,
                 idle_cycles: int = 2048, runtime_rounding: bool = True) -> None:
        from amaranth.sim import Simulator
        self.config = config or SIM_CONFIG
        self.dut = Accelerator(self.config, idle_cycles=idle_cycles,
                               runtime_rounding=runtime_rounding)
        self.idle_cycles = idle_cycles
        self._tx = bytearray()
        self._rx = bytearray()
        self.cycles = 0
        self.sim_seconds = 0.0
        self._quiet = 0
        self._target = 0
        self._sim = Simulator(self.dut)
        self._sim.add_clock(1.0 / self.config.clock_hz)
        self._sim.add_testbench(self._bench, background=True)
        self._period = 1.0 / self.config.clock_hz

    async def _bench(self, ctx) -> None:
        dut = self.dut
        ctx.set(dut.o.ready, 1)
        while True:
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

    def _run(self, max_cycles: int, quiet: int) -> None:
        t0 = time.perf_counter()
        start = self.cycles
        while self.cycles - start < max_cycles:
            self._sim.advance()
            if self._quiet >= quiet and not self._tx:
                break
        self.sim_seconds += time.perf_counter() - t0

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


def sim_transport(config: AcceleratorConfig | None = None) -> SimTransport:
    """``sim://``: a :class:`SimTransport` for ``config`` (default :data:`SIM_CONFIG`)."""
    return SimTransport(config)
