"""cocotb 2.x testbench: protocol fuzzing of the accelerator top against the emulator.

Run through :func:`hbfp_hw.sim.runner.run_cocotb` (see ``tests/test_fuzz_rtl.py``). The
configuration comes from the manifest next to the Verilog. Environment:

* ``HBFP_MANIFEST`` -- path of the accelerator manifest (required);
* ``HBFP_FUZZ_SEED`` -- seed of the bursts and of the stalls (default 1);
* ``HBFP_FUZZ_FRAMES`` -- fuzz frames to send (default 500);
* ``HBFP_FUZZ_IDLE`` -- the top's partial-frame timeout in clocks (required: the Verilog
  must be generated with it);
* ``HBFP_FUZZ_PROBE_EVERY`` -- read back the whole state every this many bursts
  (default 10, and at the end).

Bursts of mutated and hostile frames and garbage (:mod:`hbfp_hw.sim.fuzz`) are driven
into ``i`` with random valid gaps (:class:`StreamDriver`, probability of offering a byte
drawn per burst in [0.3, 1]) while :class:`StreamMonitor` takes the answers from ``o``
under random back-pressure (the bytes of frames queued behind a busy top wait on
``i``); after every piece of a burst the line stays idle until the top has been quiet
for the timeout (a partial frame is dropped).
The answers of a burst must be the shadow emulator's (fed the events of the gateware's
framer, :func:`~hbfp_hw.sim.fuzz.hw_framing`) byte for byte; every buffer and both
statistics records read back equal to the shadow's.
"""

from __future__ import annotations

import os

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.manifest import read_manifest
from hbfp_hw.sim.fuzz import Fuzzer, Profile, Shadow, answer_frames, hw_bursts, mismatch
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor, start_byte_top


class Env:
    def __init__(self, dut):
        self.dut = dut
        man = read_manifest(os.environ["HBFP_MANIFEST"], kind="accelerator")
        self.cfg = AcceleratorConfig.from_dict(man["config"])
        assert P.device_hash(self.cfg).hex() == man["device_hash"], "manifest round trip"
        self.seed = int(os.environ.get("HBFP_FUZZ_SEED", "1"))
        self.frames = int(os.environ.get("HBFP_FUZZ_FRAMES", "500"))
        self.idle = int(os.environ["HBFP_FUZZ_IDLE"])
        self.probe_every = int(os.environ.get("HBFP_FUZZ_PROBE_EVERY", "10"))
        self.rng = np.random.default_rng(self.seed + 1)
        self.rx = bytearray()
        self.driver = StreamDriver(dut, "i", self.rng, 1.0)
        self.monitor = StreamMonitor(dut, "o", self.rng, self.rx.append, 1.0)
        self.fz = Fuzzer(self.cfg, np.random.default_rng(self.seed),
                         Profile.for_rtl(self.cfg, max_dim=32, max_data=1024),
                         long_garbage=(2000, 12000))
        self.shadow = Shadow(self.cfg)
        self.probed = 0

    async def start(self) -> None:
        await start_byte_top(self.dut, self.monitor)

    async def quiet(self, cycles: int) -> None:
        """Wait until nothing came out and the top was idle for ``cycles`` clocks."""
        q = 0
        while q < cycles:
            await FallingEdge(self.dut.clk)
            await ReadOnly()
            busy = int(self.dut.busy.value) or int(self.dut.o__valid.value)
            q = 0 if busy else q + 1

    async def send(self, data: bytes) -> None:
        """One piece, then the line idle past the timeout."""
        await self.driver.send(list(data))
        await self.quiet(self.idle + 16)

    async def probe(self, what: str) -> None:
        """Read every buffer and both statistics records from the top and the shadow."""
        self.driver.p_valid, self.monitor.p_ready = 1.0, 1.0
        for (seq, op, _), fr in self.fz.probes():
            self.rx.clear()
            await self.driver.send(list(fr))
            await self.quiet(8)
            got, want = bytes(self.rx), self.shadow.request(fr)
            msg = mismatch(f"HBFP_FUZZ_SEED={self.seed} {what}: probe seq {seq} op {op}",
                           got, want)
            assert msg is None, msg
            (a,) = answer_frames(got)
            assert (a.seq, a.opcode) == (seq, op | P.RESPONSE_FLAG), a
        self.rx.clear()
        self.probed += 1


@cocotb.test()
async def test_fuzz_against_emulator(dut):
    """Mutated and hostile frames with random stalls: answers and state as the shadow's."""
    env = Env(dut)
    await env.start()
    dut._log.info(f"fuzzing {env.cfg.name} ({[f.name for f in env.cfg.formats]}), "
                  f"{env.frames} frames, HBFP_FUZZ_SEED={env.seed}")
    st = env.fz.stats
    cycles0 = env.monitor.cycle
    for k, (burst, want) in enumerate(hw_bursts(env.fz, env.shadow, env.frames)):
        r = env.rng
        pv, pr = (1.0, 1.0) if r.random() < 0.15 else map(float, r.uniform(0.3, 1.0, 2))
        env.driver.p_valid, env.monitor.p_ready = pv, pr
        env.rx.clear()
        for piece in burst.pieces:
            await env.send(piece)
        msg = mismatch(f"HBFP_FUZZ_SEED={env.seed} burst {k} (p_valid={pv:.2f} "
                       f"p_ready={pr:.2f}, {dict(burst.kinds)})", bytes(env.rx), want, burst)
        assert msg is None, msg
        if (k + 1) % env.probe_every == 0:
            await env.probe(f"after burst {k}")
    await env.probe("at the end")
    assert env.shadow.emu.guards_intact()
    dut._log.info(f"{st.summary()}; state read back {env.probed} times; "
                  f"{env.monitor.cycle - cycles0} clocks")
    assert st.frames >= env.frames
