"""Shared helpers for the MAC-array tests: operands, Amaranth-sim GEMM driver."""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Value
from amaranth.sim import Simulator

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.mac_array import (MacArray, assemble_output, gemm_beats,
                                        operand_layout, output_layout, output_beats_per_job,
                                        pack_struct, unpack_struct)
from hbfp_hw.quantize import quantize


def quantized(cfg: MacArrayConfig, x: np.ndarray, which: str = "a", nonfinite: str = "raise"):
    fmt = cfg.format_a() if which == "a" else cfg.format_b()
    return quantize(np.asarray(x, dtype=np.float32), fmt, nonfinite=nonfinite)


def random_operand(rng, shape, spread: int = 4) -> np.ndarray:
    """Random values with per-element magnitudes over 2**[-spread, spread]."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, size=shape))
    return x.astype(np.float32)


def run_gemm_amaranth(cfg: MacArrayConfig, sa, ta: bool, sb, tb: bool, rng,
                      stall: float = 0.3, vcd: str | None = None) -> np.ndarray:
    """Run ``A @ B`` through the Amaranth simulation of :class:`MacArray`, with random
    valid gaps on ``a``/``b`` and random ready back-pressure on ``o``."""
    dut = MacArray(cfg)
    a_beats, b_beats, jobs, shape = gemm_beats(cfg, sa, ta, sb, tb)
    la, lb = operand_layout(cfg, cfg.man_bits_a), operand_layout(cfg, cfg.man_bits_b)
    lo = output_layout(cfg)
    n_out = output_beats_per_job(cfg) * len(jobs)
    seeds = rng.integers(0, 2**31, size=3)
    got: list[list[int]] = []

    def producer(port, beats, layout, seed):
        r = np.random.default_rng(seed)

        async def tb(ctx):
            for beat in beats:
                while r.random() < stall:
                    await ctx.tick()
                ctx.set(port.valid, 1)
                ctx.set(Value.cast(port.payload), pack_struct(layout, **beat))
                await ctx.tick().until(port.ready)
                ctx.set(port.valid, 0)
        return tb

    async def consumer(ctx):
        r = np.random.default_rng(seeds[2])
        cycles = 0
        while len(got) < n_out:
            rdy = int(r.random() >= stall)
            ctx.set(dut.o.ready, rdy)
            await ctx.delay(0)  # settle combinational outputs
            if rdy and ctx.get(dut.o.valid):
                v = unpack_struct(lo, ctx.get(Value.cast(dut.o.payload)))
                got.append(v["data"])
                expect_last = len(got) % output_beats_per_job(cfg) == 0
                assert v["last"] == int(expect_last), f"last flag wrong at beat {len(got)}"
            await ctx.tick()
            cycles += 1
            assert cycles < 200_000, "timeout waiting for output beats"
        ctx.set(dut.o.ready, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer(dut.a, a_beats, la, seeds[0]), background=True)
    sim.add_testbench(producer(dut.b, b_beats, lb, seeds[1]), background=True)
    sim.add_testbench(consumer)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    return assemble_output(cfg, got, jobs, shape)
