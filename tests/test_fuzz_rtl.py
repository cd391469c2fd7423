# amaranth: UnusedElaboratable=no
"""Protocol fuzzing of the accelerator top (RTL) against the emulator (``hbfp_hw.sim.fuzz``).

Bursts of mutated and hostile frames and garbage go to the top; the reference answers
are those of a shadow :class:`Emulator` fed the events of the gateware's framer
(:func:`~hbfp_hw.sim.fuzz.hw_framing`). The answers must be byte-identical, and every
buffer and both statistics records are read back from the top and compared with the
shadow's.

* default run: the Amaranth simulator on ``SIM_CONFIG`` with its first format slot only,
  a small batch through ``sim://``'s :class:`SimTransport` (one byte per clock) and one
  through a testbench driving the top's byte ports with random valid gaps on ``i`` and
  random ``ready`` on ``o``;
* ``-m sweep``: at least 500 frames on the full ``SIM_CONFIG`` under cocotb/Verilator
  (``sim/tb_fuzz.py``), same stalls;
* the differences the fuzzer found, as minimal regression tests.

``HBFP_SEED=N`` replays a run; ``HBFP_FUZZ_RTL_FRAMES`` sets the sweep's frame count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.gateware.top import Accelerator
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.sim.fuzz import Fuzzer, Profile, Shadow, answer_frames, hw_bursts, mismatch

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"
#: SIM_CONFIG with its first slot only (HBFP8 on 8x8 tiles): the simulator's speed falls
#: with the design's size
CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], name="hbfp_sim_one")
#: partial-frame timeout of the simulated tops, in clocks (random input gaps stay far
#: below it)
IDLE = 48


def plan(cfg, seed: int, n_frames: int, *, max_dim: int, max_data: int,
         long_garbage: tuple[int, int]):
    """``(fuzzer, shadow, [(burst, expected answer bytes)])``."""
    rng = np.random.default_rng(seed)
    fz = Fuzzer(cfg, rng, Profile.for_rtl(cfg, max_dim=max_dim, max_data=max_data),
                long_garbage=long_garbage)
    shadow = Shadow(cfg)
    return fz, shadow, list(hw_bursts(fz, shadow, n_frames))


def compare(ctx: str, got: bytes, want: bytes, burst=None) -> None:
    msg = mismatch(ctx, got, want, burst)
    assert msg is None, msg


# ---------------------------------------------------------------------------------------
# Amaranth simulator: sim:// (SimTransport) and a testbench with stalls
# ---------------------------------------------------------------------------------------
def test_fuzz_rtl_sim_transport(seed):
    """A small batch through ``sim://``'s transport (one byte per clock, no stalls)."""
    fz, shadow, bursts = plan(CFG, seed, 16, max_dim=16, max_data=256,
                              long_garbage=(200, 600))
    sim = SimTransport(CFG, idle_cycles=IDLE, progress=False)
    for k, (burst, want) in enumerate(bursts):
        got = b""
        for piece in burst.pieces:
            sim.write(piece)
            got += sim.read(0.0)
            got += sim.read(0.0)          # nothing pending: the line idles (timeout)
        compare(f"HBFP_SEED={seed} burst {k}", got, want, burst)
    for (seq, op, _), fr in fz.probes():
        sim.write(fr)
        compare(f"HBFP_SEED={seed} probe seq {seq}", sim.read(0.0), shadow.request(fr))
    assert fz.stats.frames >= 16
    print(f"sim:// {fz.stats.summary()}; {sim.cycles} cycles")


class _Bench:
    """Drives the top's byte ports: random valid gaps on ``i`` (at most ``max_gap``
    clocks, far below the idle timeout), random ``ready`` on ``o``."""

    def __init__(self, dut, rng, max_gap: int = 6):
        self.dut, self.rng, self.max_gap = dut, rng, max_gap
        self.cycles = 0

    async def _tick(self, ctx, rx: bytearray, p_ready: float):
        ready = bool(self.rng.random() < p_ready)
        ctx.set(self.dut.o.ready, ready)
        _, _, ir, ov, od, busy = await ctx.tick().sample(
            self.dut.i.ready, self.dut.o.valid, self.dut.o.payload, self.dut.busy)
        self.cycles += 1
        if ov and ready:
            rx.append(od)
        return ir, ov, busy

    async def send(self, ctx, data: bytes, rx: bytearray, p_valid: float, p_ready: float):
        dut, r = self.dut, self.rng
        i, gap, holding = 0, 0, False
        while i < len(data):
            if not holding:
                holding = bool(gap >= self.max_gap or r.random() < p_valid)
                gap = 0 if holding else gap + 1
            ctx.set(dut.i.valid, holding)
            if holding:
                ctx.set(dut.i.payload, data[i])
            ir, _, _ = await self._tick(ctx, rx, p_ready)
            if holding and ir:
                i += 1
                holding = False
        ctx.set(dut.i.valid, 0)

    async def quiet(self, ctx, rx: bytearray, p_ready: float, cycles: int):
        """Clock until nothing was sent and the top was idle for ``cycles`` clocks."""
        q = 0
        while q < cycles:
            _, ov, busy = await self._tick(ctx, rx, p_ready)
            q = 0 if (busy or ov) else q + 1


def run_amaranth(cfg, bursts, probes, rng) -> tuple[list[bytes], list[bytes], int]:
    """Answers of the top to each burst (line idle after each piece) and to each probe
    (no stalls), and the clocks simulated."""
    dut = Accelerator(cfg, idle_cycles=IDLE)
    bench = _Bench(dut, rng)
    got, got_probes = [], []

    async def tb(ctx):
        for burst, _ in bursts:
            pv, pr = (1.0, 1.0) if rng.random() < 0.15 else map(float, rng.uniform(0.3, 1, 2))
            rx = bytearray()
            for piece in burst.pieces:
                await bench.send(ctx, piece, rx, pv, pr)
                await bench.quiet(ctx, rx, pr, IDLE + 16)
            got.append(bytes(rx))
        for _, fr in probes:
            rx = bytearray()
            await bench.send(ctx, fr, rx, 1.0, 1.0)
            await bench.quiet(ctx, rx, 1.0, 8)
            got_probes.append(bytes(rx))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return got, got_probes, bench.cycles


def test_fuzz_rtl_amaranth_stalls(seed):
    """40 fuzz frames into the top with random input gaps and output back-pressure."""
    t0 = time.perf_counter()
    fz, shadow, bursts = plan(CFG, seed, 40, max_dim=16, max_data=256,
                              long_garbage=(300, 1200))
    probes = fz.probes()
    want_probes = [shadow.request(fr) for _, fr in probes]
    rng = np.random.default_rng(seed + 1)
    got, got_probes, cycles = run_amaranth(CFG, bursts, probes, rng)
    for k, ((burst, want), g) in enumerate(zip(bursts, got)):
        compare(f"HBFP_SEED={seed} burst {k}", g, want, burst)
    for ((seq, op, _), _), g, w in zip(probes, got_probes, want_probes):
        compare(f"HBFP_SEED={seed} probe seq {seq} op {op}", g, w)
        (a,) = answer_frames(g)
        assert (a.seq, a.opcode) == (seq, op | P.RESPONSE_FLAG)
    assert fz.stats.frames >= 40
    print(f"{fz.stats.summary()}; {cycles} clocks, {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------------------
# cocotb / Verilator
# ---------------------------------------------------------------------------------------
@pytest.mark.sweep
def test_fuzz_rtl_verilator(tmp_path, seed):
    """At least 500 fuzz frames on SIM_CONFIG (three slots) under cocotb/Verilator."""
    from amaranth.back import verilog

    from hbfp_hw.manifest import write_manifest
    from hbfp_hw.sim.runner import available_simulators, quick_cxx, run_cocotb
    assert "verilator" in available_simulators(), "Verilator not found"
    cfg = SIM_CONFIG
    idle = 256
    name = f"{cfg.name}_fuzz"
    gen = tmp_path / "gen"
    gen.mkdir()
    vpath = gen / f"{name}.v"
    vpath.write_text(verilog.convert(Accelerator(cfg, idle_cycles=idle), name=name,
                                     emit_src=False))
    mpath = write_manifest(gen / f"{name}.json", kind="accelerator", top=name,
                           config=cfg.to_dict(),
                           ports={"i": {"dir": "in", "stream": 8},
                                  "o": {"dir": "out", "stream": 8},
                                  "busy": {"dir": "out", "width": 1}},
                           extra=P.manifest_extra(cfg))
    frames = os.environ.get("HBFP_FUZZ_RTL_FRAMES", "600")
    env = {"HBFP_MANIFEST": str(mpath), "HBFP_FUZZ_SEED": str(seed),
           "HBFP_FUZZ_FRAMES": frames, "HBFP_FUZZ_IDLE": str(idle)}
    try:
        with quick_cxx():
            run_cocotb(verilog_sources=[vpath], toplevel=name, test_module="tb_fuzz",
                       build_dir=tmp_path / "build", simulator="verilator",
                       python_paths=[SIM_DIR], extra_env=env, seed=seed)
    except (AssertionError, SystemExit) as e:
        raise AssertionError(f"{e}; replay with HBFP_SEED={seed} HBFP_FUZZ_RTL_FRAMES="
                             f"{frames}") from None


# ---------------------------------------------------------------------------------------
# Differences found by the fuzzer (minimal reproducers)
# ---------------------------------------------------------------------------------------
def _both(sim: SimTransport, emu: Emulator, data: bytes) -> tuple[bytes, bytes]:
    sim.write(data)
    return sim.read(0.0) + sim.read(0.0), emu.feed(data) + emu.idle()


def test_gemm_checks_a_data_before_b_fields():
    """Operand A holds a mantissa outside its format (-128 for HBFP8), operand B names a
    buffer that does not exist: both answer DATA_RANGE (detail 0, A's first element), as
    the emulator checks A's fields and data before B's (the fuzzer found the top
    answering BAD_BUFFER here once)."""
    man0 = next(s for s in P.buffer_map(CFG) if s.name == "op0.man")
    emu = Emulator(CFG)
    sim = SimTransport(CFG, idle_cycles=IDLE, progress=False)
    for fr in (P.encode_frame(1, P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
                   b"\x80", buffer=man0.id, offset=0)),
               P.encode_frame(2, P.Op.GEMM, P.REQUESTS[P.Op.GEMM].pack(
                   a=0, b=7, flags=0, slot_a=0, slot_b=0, a_rows=8, a_cols=8, b_rows=8,
                   b_cols=8, out_offset=0))):
        compare(f"request {fr.hex()}", *_both(sim, emu, fr))


def test_frame_right_after_a_long_command():
    """A READ whose answer (256 bytes) outlasts the idle timeout (48 clocks here), and
    right behind it on the line a READ_STATS: both are answered (bytes waiting while the
    top is busy do not count as an idle line; the fuzzer found the second frame dropped
    once)."""
    emu = Emulator(CFG)
    sim = SimTransport(CFG, idle_cycles=IDLE, progress=False)
    rd = P.encode_frame(1, P.Op.READ, P.REQUESTS[P.Op.READ].pack(buffer=0, offset=0,
                                                                  count=64))
    st = P.encode_frame(2, P.Op.READ_STATS, P.REQUESTS[P.Op.READ_STATS].pack(flags=0))
    compare("READ (long answer) then READ_STATS, back to back", *_both(sim, emu, rd + st))
