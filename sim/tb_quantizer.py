"""cocotb 2.x testbench of the generated quantizer Verilog, checked against the golden model.

Run through :func:`hbfp_hw.sim.runner.run_cocotb` (see ``tests/test_quantizer_cocotb.py``).
Configuration comes from the manifest written next to the Verilog (``HBFP_MANIFEST``),
never from a second hand-written copy. Environment:

* ``HBFP_MANIFEST`` — path of ``quantizer.json`` (required);
* ``HBFP_Q_BLOCKS`` — random blocks per configuration (default 10000);
* ``HBFP_Q_SEED`` — seed of the stimulus (default 1; printed in the log);
* ``HBFP_Q_P_VALID`` / ``HBFP_Q_P_READY`` — probability of input valid / output ready per
  cycle in the stall tests (default: random per stream in [0.3, 1]).

Structure (as cocotb's ``matrix_multiplier`` example): :class:`StreamDriver` drives the
input stream with random gaps, :class:`StreamMonitor` takes output beats under random
back-pressure, :class:`GoldenModel` turns the driven blocks into expected beats with
:func:`hbfp_hw.quantize.quantize`, :class:`Checker` compares every beat bit for bit.
"""

from __future__ import annotations

import os
from collections import deque

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge

from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import ROUNDING_MODES
from hbfp_hw.manifest import read_manifest
from hbfp_hw.quantize import quantize
from hbfp_hw.sim.quantizer_vectors import edge_blocks, random_blocks
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor


def _load():
    man = read_manifest(os.environ["HBFP_MANIFEST"], kind="quantizer")
    return man, QuantizerConfig.from_dict(man["config"])


class BeatCodec:
    """Packs input beats and unpacks output beats using the manifest's port map."""

    def __init__(self, manifest: dict, cfg: QuantizerConfig):
        ports = manifest["ports"]
        self.lanes = ports["i_payload"]["lanes"]
        self.lane_w = ports["i_payload"]["lane_width"]
        self.o = ports["o_payload"]
        self.man_w = self.o["man"]["element_width"]

    def pack(self, beat) -> int:
        return sum(int(v) << (self.lane_w * k) for k, v in enumerate(beat))

    def field(self, word: int, name: str) -> int:
        f = self.o[name]
        return (word >> f["offset"]) & ((1 << f["width"]) - 1)

    def unpack(self, word: int) -> tuple:
        mw = self.man_w
        mw_mask = (1 << mw) - 1
        base = self.o["man"]["offset"]
        mans = []
        for k in range(self.lanes):
            v = (word >> (base + k * mw)) & mw_mask
            mans.append(v - (1 << mw) if v >> (mw - 1) else v)
        return (self.field(word, "exp"), self.field(word, "invalid"), tuple(mans),
                self.field(word, "first"), self.field(word, "last"))


class GoldenModel:
    """Expected output beats of a stream of blocks, from :func:`hbfp_hw.quantize`."""

    def __init__(self, cfg: QuantizerConfig):
        self.cfg = cfg

    def beats(self, bits: np.ndarray, rounding: str, seed: int) -> list[tuple]:
        cfg = self.cfg
        fmt = cfg.golden_format(rounding=rounding, seed=seed)
        x = np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32).reshape(-1)
        codes, mans = quantize(x, fmt, nonfinite="flag").stream()
        out = []
        bpb, lanes = cfg.beats_per_block, cfg.lanes
        for b in range(len(codes)):
            inv = int(codes[b] == cfg.format.exp_invalid_code)
            for k in range(bpb):
                out.append((int(codes[b]), inv,
                            tuple(int(v) for v in mans[b, k * lanes:(k + 1) * lanes]),
                            int(k == 0), int(k == bpb - 1)))
        return out


class Checker:
    """Compares received beats with the expected queue, naming the block and its class."""

    def __init__(self, cfg: QuantizerConfig, log):
        self.cfg, self.log = cfg, log
        self.expected: deque = deque()
        self.context: deque = deque()
        self.received = 0
        self.errors: list[str] = []

    def expect(self, beats: list[tuple], bits: np.ndarray, names: list[str], what: str):
        bpb = self.cfg.beats_per_block
        for i, beat in enumerate(beats):
            b = i // bpb
            self.expected.append(beat)
            self.context.append((what, b, names[b], bits[b]))

    def __call__(self, beat: tuple) -> None:
        self.received += 1
        if not self.expected:
            self.errors.append(f"unexpected extra output beat {beat}")
            return
        exp = self.expected.popleft()
        what, b, name, bits = self.context.popleft()
        if beat != exp and len(self.errors) < 5:
            self.errors.append(
                f"{what}: block {b} ({name}) beat mismatch\n"
                f"  input bits={[hex(int(v)) for v in bits]}"
                f"\n  expected (code, invalid, man, first, last)={exp}\n  got={beat}")
            self.log.error(self.errors[-1])
        elif beat != exp:
            self.errors.append("...")

    def done(self) -> bool:
        return not self.expected


class Env:
    """Clock, reset, and the driver/monitor/model/checker of one test."""

    def __init__(self, dut):
        self.dut = dut
        self.manifest, self.cfg = _load()
        self.seed = int(os.environ.get("HBFP_Q_SEED", "1"))
        self.rng = np.random.default_rng(self.seed)
        self.codec = BeatCodec(self.manifest, self.cfg)
        self.model = GoldenModel(self.cfg)
        self.checker = Checker(self.cfg, dut._log)
        self.driver = StreamDriver(dut, "i", self.rng, 1.0)
        self.monitor = StreamMonitor(dut, "o", self.rng,
                                     lambda w: self.checker(self.codec.unpack(w)))
        dut._log.info(f"quantizer test: {self.cfg.format.describe()}, {self.cfg.lanes} lanes, "
                      f"modes {self.cfg.rounding_modes}, HBFP_Q_SEED={self.seed}")

    async def start(self) -> None:
        dut = self.dut
        cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
        dut.rst.value = 1
        dut.i__valid.value = 0
        dut.o__ready.value = 0
        if self.cfg.runtime_rounding:
            dut.rounding.value = self.cfg.format.rounding_code
        if self.cfg.has_stochastic:
            dut.reseed.value = 0
            dut.seed.value = 0
        await ClockCycles(dut.clk, 3)
        await FallingEdge(dut.clk)
        dut.rst.value = 0
        cocotb.start_soon(self.monitor.run())

    async def stream(self, bits: np.ndarray, names: list[str], *, rounding: str,
                     seed: int, p_valid: float, p_ready: float, what: str) -> None:
        """Quantize ``bits`` as one stream (new mode / seed while idle), wait for all."""
        dut, cfg = self.dut, self.cfg
        await FallingEdge(dut.clk)
        if cfg.runtime_rounding:
            dut.rounding.value = ROUNDING_MODES.index(rounding)
        if cfg.has_stochastic:
            dut.seed.value = seed
            dut.reseed.value = 1
            await FallingEdge(dut.clk)
            dut.reseed.value = 0
        self.checker.expect(self.model.beats(bits, rounding, seed), bits, names, what)
        self.driver.p_valid = p_valid
        self.monitor.p_ready = p_ready
        words = [self.codec.pack(b) for b in bits.reshape(-1, cfg.lanes)]
        await self.driver.send(words)
        limit = 100 + int(len(words) * 4 / max(p_ready, 0.05))
        for _ in range(limit):
            if self.checker.done() or len(self.checker.errors) >= 5:
                break
            await FallingEdge(dut.clk)
        assert not self.checker.errors, "\n".join(self.checker.errors[:5])
        assert self.checker.done(), (f"{what}: {len(self.checker.expected)} beats missing "
                                     f"after {limit} cycles")

    def probs(self) -> tuple[float, float]:
        pv = os.environ.get("HBFP_Q_P_VALID")
        pr = os.environ.get("HBFP_Q_P_READY")
        return (float(pv) if pv else float(self.rng.uniform(0.3, 1.0)),
                float(pr) if pr else float(self.rng.uniform(0.3, 1.0)))


@cocotb.test()
async def test_edge_classes(dut):
    """Every named edge class, every built rounding mode, with stalls."""
    env = Env(dut)
    await env.start()
    for mode in env.cfg.rounding_modes:
        bits, names = edge_blocks(env.cfg.format, env.cfg.block_size, env.rng)
        pv, pr = env.probs()
        await env.stream(bits, names, rounding=mode, seed=int(env.rng.integers(0, 2**32)),
                         p_valid=pv, p_ready=pr, what=f"edge/{mode}")
    dut._log.info(f"edge classes passed: {len(bits)} blocks x {len(env.cfg.rounding_modes)} "
                  f"modes")


@cocotb.test()
async def test_random_blocks(dut):
    """HBFP_Q_BLOCKS random blocks (split over the built modes), random gaps/back-pressure."""
    env = Env(dut)
    await env.start()
    total = int(os.environ.get("HBFP_Q_BLOCKS", "10000"))
    modes = env.cfg.rounding_modes
    chunks = max(len(modes), 4)
    per = -(-total // chunks)
    done = 0
    for c in range(chunks):
        n = min(per, total - done)
        if n <= 0:
            break
        mode = modes[c % len(modes)]
        bits = random_blocks(n, env.cfg.block_size, env.rng)
        pv, pr = env.probs()
        await env.stream(bits, ["random"] * n, rounding=mode,
                         seed=int(env.rng.integers(0, 2**32)), p_valid=pv, p_ready=pr,
                         what=f"random[{c}]/{mode} p_valid={pv:.2f} p_ready={pr:.2f}")
        done += n
    dut._log.info(f"{done} random blocks passed")


@cocotb.test()
async def test_full_throughput(dut):
    """Input always valid, output always ready: one beat per cycle in and out."""
    env = Env(dut)
    await env.start()
    n = 64
    bits = random_blocks(n, env.cfg.block_size, env.rng)
    await env.stream(bits, ["random"] * n, rounding=env.cfg.rounding_modes[0],
                     seed=env.cfg.format.seed, p_valid=1.0, p_ready=1.0, what="throughput")
    acc = env.driver.accept_cycles
    outc = env.monitor.cycles
    nbeats = n * env.cfg.beats_per_block
    assert acc[-1] - acc[0] == nbeats - 1, f"input bubbles: {nbeats} beats took " \
        f"{acc[-1] - acc[0] + 1} cycles"
    assert outc[-1] - outc[-nbeats] == nbeats - 1, "output bubbles"
