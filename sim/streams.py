"""cocotb drivers for amaranth ``lib.stream`` ports, shared by the testbenches.

Ports are found by amaranth's flattened names: ``<name>__valid``, ``<name>__ready`` and
``<name>__payload``. Both classes act on the falling clock edge and sample on
``ReadOnly``, so a beat transfers when valid and ready are both high at a rising edge.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

__all__ = ["StreamDriver", "StreamMonitor", "start_byte_top"]


class StreamDriver:
    """Drives words on stream ``name`` with random valid gaps (probability ``p_valid``
    per cycle of offering the next word) and holds a word until it is accepted (the
    stream rules). ``accept_cycles`` records the cycle of every transfer."""

    def __init__(self, dut, name: str, rng: np.random.Generator, p_valid: float = 1.0):
        self.dut, self.rng, self.p_valid = dut, rng, p_valid
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.accept_cycles: list[int] = []
        self.cycle = 0

    @property
    def accepted(self) -> int:
        return len(self.accept_cycles)

    async def send(self, words: list[int]) -> None:
        idx, holding = 0, False
        while idx < len(words):
            await FallingEdge(self.dut.clk)
            self.cycle += 1
            if not holding:
                holding = bool(self.rng.random() < self.p_valid)
                if holding:
                    self.payload.value = words[idx]
            self.valid.value = int(holding)
            await ReadOnly()
            if holding and int(self.ready.value):
                idx += 1
                holding = False
                self.accept_cycles.append(self.cycle)
        await FallingEdge(self.dut.clk)
        self.valid.value = 0


class StreamMonitor:
    """Takes words from stream ``name`` under random back-pressure (ready with
    probability ``p_ready`` per cycle) and passes each payload, as an unsigned integer,
    to ``on_word``. ``cycles`` records the cycle of every transfer."""

    def __init__(self, dut, name: str, rng: np.random.Generator,
                 on_word: Callable[[int], None], p_ready: float = 1.0):
        self.dut, self.rng, self.on_word, self.p_ready = dut, rng, on_word, p_ready
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.cycles: list[int] = []
        self.cycle = 0

    async def run(self) -> None:
        while True:
            await FallingEdge(self.dut.clk)
            self.cycle += 1
            ready = bool(self.rng.random() < self.p_ready)
            self.ready.value = int(ready)
            await ReadOnly()
            if ready and int(self.valid.value):
                self.cycles.append(self.cycle)
                self.on_word(self.payload.value.to_unsigned())


async def start_byte_top(dut, monitor: StreamMonitor) -> None:
    """Clock and reset a top with byte streams ``i`` / ``o`` (both idle during reset),
    then start ``monitor`` on ``o``."""
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.i__valid.value = 0
    dut.i__payload.value = 0
    dut.o__ready.value = 0
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    cocotb.start_soon(monitor.run())
    await ClockCycles(dut.clk, 2)
