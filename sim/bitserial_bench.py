"""Drive :class:`hbfp_hw.gateware.bitserial.BitSerialGemm` in Amaranth's simulator.

:func:`run_commands` loads plane words, sends GEMM commands with their activation rows
and collects the results and the clocks of each command (``cmd`` handshake to last
``o`` beat); ``p_valid`` / ``p_ready`` add random gaps on ``x`` and back-pressure on
``o``. Used by the unit tests and by ``benchmarks/bench_bitlayers.py`` (cycles per
inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from amaranth.sim import Simulator

from hbfp_hw.gateware.bitserial import BitSerialConfig, BitSerialGemm, pack_x

__all__ = ["Command", "run_commands"]


@dataclass
class Command:
    """One GEMM: ``x`` (batch, K) signed ints, weights at ``base`` (``rows`` rows of
    ``bits`` planes of ``chunks`` words), top ``layers`` planes."""

    base: int
    rows: int
    chunks: int
    bits: int
    layers: int
    x: np.ndarray
    results: list = field(default_factory=list)
    cycles: int = 0


def run_commands(cfg: BitSerialConfig, words: dict[int, int], cmds: list[Command], *,
                 seed: int = 0, p_valid: float = 1.0, p_ready: float = 1.0,
                 max_cycles: int = 2_000_000) -> list[Command]:
    """Write ``words`` (address -> plane word), then run ``cmds`` one after another
    (each waits for its last result). Fills ``results`` (batch*rows ints) and
    ``cycles`` of every command."""
    dut = BitSerialGemm(cfg)
    rng = np.random.default_rng(seed)
    sim = Simulator(dut)
    sim.add_clock(1e-8)

    async def bench(ctx):
        for a, w in words.items():
            ctx.set(dut.w_wr.payload, {"addr": a, "data": w})
            ctx.set(dut.w_wr.valid, 1)
            await ctx.tick()
        ctx.set(dut.w_wr.valid, 0)
        for cmd in cmds:
            x = np.asarray(cmd.x)
            beats = [b for row in x for b in pack_x(row, cmd.chunks, cfg.lanes,
                                                     cfg.act_bits)]
            need = x.shape[0] * cmd.rows
            ctx.set(dut.cmd.payload, {"base": cmd.base, "rows": cmd.rows,
                                      "chunks": cmd.chunks, "bits": cmd.bits,
                                      "layers": cmd.layers, "batch": x.shape[0]})
            ctx.set(dut.cmd.valid, 1)
            cyc, started, xi = 0, False, 0
            holding = False
            while len(cmd.results) < need:
                if cyc > max_cycles:
                    raise TimeoutError(f"command {cmd} did not finish in {max_cycles} clocks")
                if started and not holding and xi < len(beats) \
                        and rng.random() < p_valid:
                    holding = True
                    ctx.set(dut.x.payload, _unpack(beats[xi], cfg))
                ctx.set(dut.x.valid, int(holding))
                rdy = int(rng.random() < p_ready)
                ctx.set(dut.o.ready, rdy)
                cmd_ok = ctx.get(dut.cmd.valid) and ctx.get(dut.cmd.ready)
                x_ok = holding and ctx.get(dut.x.ready)
                o_ok = rdy and ctx.get(dut.o.valid)
                if o_ok:
                    cmd.results.append(int(ctx.get(dut.o.payload)))
                await ctx.tick()
                if started:
                    cyc += 1
                if cmd_ok:
                    started = True
                    cyc = 1
                    ctx.set(dut.cmd.valid, 0)
                if x_ok:
                    xi += 1
                    holding = False
            ctx.set(dut.x.valid, 0)
            ctx.set(dut.o.ready, 0)
            cmd.cycles = cyc

    sim.add_testbench(bench)
    sim.run()
    return cmds


def _unpack(word: int, cfg: BitSerialConfig) -> list[int]:
    a = cfg.act_bits
    out = []
    for lane in range(cfg.lanes):
        v = (word >> (lane * a)) & ((1 << a) - 1)
        out.append(v - (1 << a) if v >> (a - 1) else v)
    return out
