"""UART PHY in the Amaranth simulator: random bytes, back to back, framing errors."""

import numpy as np
import pytest
from amaranth import Module
from amaranth.sim import Simulator

from hbfp_hw.gateware.uart import UartRx, UartTx, uart_divisor

DIV = 7


def _line_bits(byte, stop=1):
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


def test_divisor():
    assert uart_divisor(50_000_000, 3_000_000) == 17
    with pytest.raises(ValueError, match="4 clocks"):
        uart_divisor(10_000_000, 3_000_000)
    with pytest.raises(ValueError, match="2.5 %"):
        uart_divisor(9_000_000, 2_000_000)


def test_tx_to_rx_random_back_to_back():
    rng = np.random.default_rng(1)
    data = [int(x) for x in rng.integers(0, 256, 40)]
    m = Module()
    m.submodules.tx = tx = UartTx(DIV)
    m.submodules.rx = rx = UartRx(DIV)
    m.d.comb += rx.rx.eq(tx.tx)
    got = []

    async def feed(ctx):
        for b in data:
            ctx.set(tx.i.valid, 1)
            ctx.set(tx.i.payload, b)
            await ctx.tick().until(tx.i.ready)
        ctx.set(tx.i.valid, 0)

    async def sink(ctx):
        ctx.set(rx.o.ready, 1)
        for _ in range(len(data) * 10 * DIV + 200):
            _, _, v, p, fe = await ctx.tick().sample(rx.o.valid, rx.o.payload, rx.frame_error)
            assert not fe
            if v:
                got.append(p)
            if len(got) == len(data):
                break

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(feed, background=True)
    sim.add_testbench(sink)
    sim.run()
    assert got == data


def test_rx_framing_error_dropped_and_recovers():
    rx = UartRx(DIV)
    bits = _line_bits(0x5A, stop=0) + [1] * 3 + _line_bits(0xC3) + [1] * 2
    got, errors = [], []

    async def bench(ctx):
        ctx.set(rx.o.ready, 1)
        for bit in bits:
            ctx.set(rx.rx, bit)
            for _ in range(DIV):
                _, _, v, p, fe = await ctx.tick().sample(rx.o.valid, rx.o.payload,
                                                          rx.frame_error)
                if v:
                    got.append(p)
                errors.append(fe)

    sim = Simulator(rx)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert sum(errors) == 1
    assert got == [0xC3]


def test_tx_line_format():
    tx = UartTx(DIV)
    line = []

    async def bench(ctx):
        ctx.set(tx.i.valid, 1)
        ctx.set(tx.i.payload, 0xA6)
        await ctx.tick()
        ctx.set(tx.i.valid, 0)
        for _ in range(11 * DIV):
            line.append(ctx.get(tx.tx))
            await ctx.tick()

    sim = Simulator(tx)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    sampled = [line[DIV // 2 + k * DIV] for k in range(10)]
    assert sampled == _line_bits(0xA6)
