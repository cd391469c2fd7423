"""cocotb testbench of the bit-serial GEMM unit's Verilog against
:func:`hbfp_hw.bitlayers.matmul`.

Run through :func:`hbfp_hw.sim.runner.run_cocotb` (``tests/test_bitlayers_cocotb.py``).
The configuration comes from the manifest next to the Verilog (``HBFP_MANIFEST``).
Environment: ``HBFP_BS_SEED`` (stimulus seed, default 1), ``HBFP_BS_CMDS`` (random
commands of ``test_random_stalls``, default 60).

Every command writes its weights' planes at a random base, drives the activation rows
on ``x`` with random gaps and takes ``o`` under random back-pressure
(:mod:`hbfp_hw.sim.streams`); the results must equal the golden GEMM over the
command's ``layers`` bit for bit.
"""

from __future__ import annotations

import os

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from hbfp_hw import bitlayers as bl
from hbfp_hw.gateware.bitserial import BitSerialConfig, command_cycles, pack_planes, pack_x
from hbfp_hw.manifest import read_manifest
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor


class Env:
    def __init__(self, dut):
        self.dut = dut
        self.man = read_manifest(os.environ["HBFP_MANIFEST"], kind="bitserial")
        self.cfg = BitSerialConfig.from_dict(self.man["config"])
        self.seed = int(os.environ.get("HBFP_BS_SEED", "1"))
        self.rng = np.random.default_rng(self.seed)
        self.got: list[int] = []
        ow = self.man["ports"]["o_payload"]["width"]
        self.monitor = StreamMonitor(
            dut, "o", self.rng,
            lambda w: self.got.append(w - (1 << ow) if w >> (ow - 1) else w))
        self.xdrv = StreamDriver(dut, "x", self.rng)
        dut._log.info(f"bit-serial test: {self.cfg}, HBFP_BS_SEED={self.seed}")

    async def start(self):
        dut = self.dut
        cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
        dut.rst.value = 1
        for s in ("x__valid", "cmd__valid", "w_wr__valid", "o__ready"):
            getattr(dut, s).value = 0
        await ClockCycles(dut.clk, 3)
        await FallingEdge(dut.clk)
        dut.rst.value = 0
        cocotb.start_soon(self.monitor.run())

    async def write_words(self, base: int, words: list[int]):
        dut, ab = self.dut, self.cfg.addr_bits
        for i, w in enumerate(words):
            await FallingEdge(dut.clk)
            dut.w_wr__payload.value = (base + i) | (w << ab)
            dut.w_wr__valid.value = 1
        await FallingEdge(dut.clk)
        dut.w_wr__valid.value = 0

    def pack_cmd(self, **f) -> int:
        lay = self.man["ports"]["cmd_payload"]
        return sum(int(f[n]) << lay[n]["offset"] for n in lay)

    async def gemm(self, w_int, bits: int, layers: int, x, *, base: int | None = None,
                   p_valid: float = 1.0, p_ready: float = 1.0, what: str = "") -> int:
        """One command; checks the results; returns its clocks (cmd to last o)."""
        dut, cfg = self.dut, self.cfg
        rows, k = w_int.shape
        chunks = -(-k // cfg.lanes)
        planes = bl.decompose(w_int, bits)
        words = pack_planes(planes, chunks, cfg.lanes)
        if base is None:
            base = int(self.rng.integers(0, cfg.w_depth - len(words) + 1))
        await self.write_words(base, words)
        expected = bl.matmul(x, planes, layers).reshape(-1).tolist()
        beats = [b for row in x for b in pack_x(row, chunks, cfg.lanes, cfg.act_bits)]
        self.got.clear()
        self.xdrv.p_valid = p_valid
        self.monitor.p_ready = p_ready
        # x offered from the command's clock on (ready only once the unit takes it)
        cocotb.start_soon(self.xdrv.send(beats))
        await FallingEdge(dut.clk)
        dut.cmd__payload.value = self.pack_cmd(base=base, rows=rows, chunks=chunks, bits=bits,
                                               layers=layers, batch=x.shape[0])
        dut.cmd__valid.value = 1
        while True:
            await ReadOnly()
            if int(dut.cmd__ready.value):
                break
            await FallingEdge(dut.clk)
        cmd_cycle = self.monitor.cycle        # the monitor's count of this clock
        await FallingEdge(dut.clk)
        dut.cmd__valid.value = 0
        cyc = 1
        limit = 50 + 8 * command_cycles(cfg, rows=rows, chunks=chunks, layers=layers,
                                        batch=x.shape[0]) / min(p_valid, p_ready)
        while len(self.got) < len(expected):
            await FallingEdge(dut.clk)
            cyc += 1
            assert cyc < limit, f"{what}: {len(self.got)} of {len(expected)} results " \
                f"after {cyc} clocks"
        cycles = self.monitor.cycles[-1] - cmd_cycle + 1
        for _ in range(3):
            await FallingEdge(dut.clk)
        assert len(self.got) == len(expected), f"{what}: extra results {self.got[-3:]}"
        bad = [i for i, (g, e) in enumerate(zip(self.got, expected)) if g != e]
        assert not bad, (f"{what}: {len(bad)} of {len(expected)} results differ; first "
                         f"y[{bad[0] // rows}, {bad[0] % rows}] = {self.got[bad[0]]}, "
                         f"expected {expected[bad[0]]} (bits={bits}, layers={layers}, "
                         f"K={k}, rows={rows}, base={base})")
        return cycles


def _rand_x(rng, batch, k, a):
    return rng.integers(-(1 << (a - 1)), 1 << (a - 1), size=(batch, k))


@cocotb.test()
async def test_edge_cases(dut):
    """All-ones planes, most negative weight, extreme activations, layers 1 and bits."""
    env = Env(dut)
    await env.start()
    cfg, rng = env.cfg, env.rng
    a, B = cfg.act_bits, cfg.bits_max
    kmax = cfg.k_max
    amax, amin = (1 << (a - 1)) - 1, -(1 << (a - 1))
    xs = np.array([[amax] * kmax, [amin] * kmax, [amin, amax] * (kmax // 2),
                   [0] * kmax])
    wmin, wmax = -(1 << (B - 1)), (1 << (B - 1)) - 1
    w = np.array([[wmin] * kmax, [-1] * kmax, [wmax] * kmax, [0] * kmax,
                  list(rng.integers(wmin, wmax + 1, kmax))])
    for layers in (1, B):
        for pv, pr in ((1.0, 1.0), (0.4, 0.3)):
            await env.gemm(w, B, layers, xs, base=0, p_valid=pv, p_ready=pr,
                           what=f"edge layers={layers} pv={pv}")
            await env.gemm(w, B, layers, xs, base=cfg.w_depth - w.shape[0] * B * cfg.chunks_max,
                           p_valid=pv, p_ready=pr, what=f"edge top base layers={layers}")
    # narrower weights (fewer planes than built) and every layer count; K = 1
    for bits in sorted({1, 2, max(1, B // 2)}):
        wb = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(3, 5))
        wb[0, 0] = -(1 << (bits - 1))
        for layers in range(1, bits + 1):
            await env.gemm(wb, bits, layers, _rand_x(rng, 2, 5, a), p_valid=0.7, p_ready=0.7,
                           what=f"bits={bits} layers={layers}")
    await env.gemm(np.array([[wmin]]), B, B, np.array([[amin]]), what="1x1x1")
    dut._log.info("edge cases passed")


@cocotb.test()
async def test_random_stalls(dut):
    """Random shapes, widths, layer counts and batches with random gaps and back-pressure."""
    env = Env(dut)
    await env.start()
    cfg, rng = env.cfg, env.rng
    n = int(os.environ.get("HBFP_BS_CMDS", "60"))
    for i in range(n):
        bits = int(rng.integers(1, cfg.bits_max + 1))
        layers = int(rng.integers(1, bits + 1))
        k = int(rng.integers(1, cfg.k_max + 1))
        rows = int(rng.integers(1, 12))
        batch = int(rng.integers(1, 4))
        w = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(rows, k))
        x = _rand_x(rng, batch, k, cfg.act_bits)
        pv, pr = float(rng.uniform(0.2, 1.0)), float(rng.uniform(0.2, 1.0))
        await env.gemm(w, bits, layers, x, p_valid=pv, p_ready=pr,
                       what=f"random[{i}] pv={pv:.2f} pr={pr:.2f}")
    dut._log.info(f"{n} random commands passed")


@cocotb.test()
async def test_cycle_formula(dut):
    """Without gaps or back-pressure a command takes exactly ``command_cycles`` clocks,
    proportional to the layer count."""
    env = Env(dut)
    await env.start()
    cfg, rng = env.cfg, env.rng
    B = cfg.bits_max
    for rows, k, batch in ((16, cfg.k_max, 1), (3, cfg.lanes + 1, 2), (20, 1, 1)):
        w = rng.integers(-(1 << (B - 1)), 1 << (B - 1), size=(rows, k))
        x = _rand_x(rng, batch, k, cfg.act_bits)
        for layers in sorted({1, 2, B}):
            cyc = await env.gemm(w, B, layers, x, what=f"cycles rows={rows} k={k}")
            want = command_cycles(cfg, rows=rows, chunks=-(-k // cfg.lanes), layers=layers,
                                  batch=batch)
            assert cyc == want, f"rows={rows} k={k} batch={batch} layers={layers}: " \
                f"{cyc} clocks, command_cycles says {want}"
