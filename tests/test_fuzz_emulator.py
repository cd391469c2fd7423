"""Protocol fuzzing of the device model (:class:`Emulator`) against the shadow model.

Bursts of mutated and hostile frames and garbage (``hbfp_hw.sim.fuzz``) go to an
emulator in random chunks, the line idle after each piece; a second emulator, the
shadow, gets only what the framer delivered intact. After every burst: the answers are
the shadow's byte for byte, they are valid frames, the clean request that ended the
burst (after garbage) was answered, and every buffer and both statistics records read
back equal to the shadow's. ``HBFP_SEED=N`` replays a run; ``HBFP_FUZZ_FRAMES`` sets
the number of mutated + hostile frames (default 20000).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, MXINT8
from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.host.codec import CrcError, Frame, Oversize
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.sim.fuzz import (Fuzzer, Shadow, answer_frames, check_delivered, count_events,
                              hw_events, parser_events, schedule)

#: A second configuration: 16x16 HyperBlock and 1-D MX blocks, small buffers.
SMALL = AcceleratorConfig(formats=(HBFP4, MXINT8), operand_depth=256, input_depth=128,
                          output_depth=128, k_max=512, name="fuzz_small")


def _fuzz(cfg: AcceleratorConfig, seed: int, target: int) -> tuple[Fuzzer, Emulator]:
    rng = np.random.default_rng(seed)
    fz = Fuzzer(cfg, rng)
    dut, shadow = Emulator(cfg), Shadow(cfg)
    st = fz.stats
    n = 0
    while st.mutated + st.hostile < target:
        n += 1
        burst = fz.burst(int(rng.integers(1, 13)))
        sched = schedule(burst.pieces, rng)
        ctx = f"HBFP_SEED={seed}, burst {n} ({dict(burst.kinds)})"
        out = bytearray()
        for chunk in sched:                    # no exception may escape feed / idle
            out += dut.idle() if chunk is None else dut.feed(chunk)
        events = parser_events(sched)
        count_events(st, events)
        check_delivered(events, burst)
        want = shadow.answer(events)
        assert bytes(out) == want, (f"{ctx}: answers differ from the shadow's\n"
                                    f"  device {bytes(out)[:96].hex()}\n  shadow {want[:96].hex()}")
        frames = answer_frames(bytes(out))
        seq, op, _ = burst.resync
        assert frames and (frames[-1].seq, frames[-1].opcode) == (seq, op | P.RESPONSE_FLAG), (
            f"{ctx}: the clean request after the burst was not answered last: {frames[-3:]}")
        for (seq, op, _), fr in fz.probes():
            got, exp = dut.feed(fr), shadow.request(fr)
            assert got == exp, f"{ctx}: state differs from the shadow's (probe {op:#x} {seq})"
            (a,) = answer_frames(got)
            assert (a.seq, a.opcode) == (seq, op | P.RESPONSE_FLAG), f"{ctx}: probe {a}"
        for i, (x, y) in enumerate(zip(dut.buffers, shadow.emu.buffers)):
            assert np.array_equal(x, y), f"{ctx}: buffer {dut.specs[i].name} differs"
        assert dut.guards_intact(), f"{ctx}: a write outside a buffer"
    return fz, dut


def _report(cfg, fz: Fuzzer, dut: Emulator, seconds: float) -> None:
    done = {k: v for k, v in dut.counters.items() if not k.startswith("error_")}
    errs = {k[6:]: v for k, v in dut.counters.items() if k.startswith("error_")}
    print(f"{cfg.name}: {fz.stats.summary()}")
    print(f"  executed {done}; error frames {errs}; {seconds:.1f} s")


def test_fuzz_emulator_against_shadow(seed):
    target = int(os.environ.get("HBFP_FUZZ_FRAMES", "20000"))
    t0 = time.perf_counter()
    fz, dut = _fuzz(SIM_CONFIG, seed, target)
    _report(SIM_CONFIG, fz, dut, time.perf_counter() - t0)
    st = fz.stats
    assert st.mutated + st.hostile >= target
    assert st.mutated >= target // 2
    # the run reached the interesting paths: commands that change state executed,
    # CRC failures, replays, every error kind the fields can provoke
    c = dut.counters
    assert min(c["WRITE"], c["QUANTIZE"], c["GEMM"]) > 100, dict(c)
    assert c["bad_crc"] > 1000 and c["replayed"] > 50, dict(c)
    for code in ("UNKNOWN_OPCODE", "BAD_LENGTH", "BAD_BUFFER", "OUT_OF_RANGE",
                 "BAD_ARGUMENT", "DATA_RANGE", "INVALID_DATA", "K_OVERFLOW"):
        assert c[f"error_{code}"] > 0, (code, dict(c))
    for ev in ("Frame", "CrcError", "Oversize", "Truncated", "Garbage"):
        assert st.events[ev] > 0, (ev, dict(st.events))


@pytest.mark.parametrize("cfg", [SMALL], ids=lambda c: c.name)
def test_fuzz_emulator_other_config(cfg, seed):
    t0 = time.perf_counter()
    fz, dut = _fuzz(cfg, seed, 1500)
    _report(cfg, fz, dut, time.perf_counter() - t0)
    assert dut.counters["GEMM"] > 10 and dut.counters["QUANTIZE"] > 10


def test_hw_framing_is_the_parser(seed):
    """The gateware's framer as the RTL tests model it (a parser restarted after every
    event, :func:`hw_framing`) reports the frames, CRC failures and oversize lengths the
    parser reports: with the delimited framing, no framer looks back at consumed bytes."""
    rng = np.random.default_rng(seed)
    fz = Fuzzer(SIM_CONFIG, rng, long_garbage=(300, 2000))
    keep = (Frame, CrcError, Oversize)
    for _ in range(150):
        burst = fz.burst(int(rng.integers(1, 8)))
        hw = [e for e in hw_events(burst.pieces) if isinstance(e, keep)]
        sw = [e for e in parser_events(schedule(burst.pieces, rng)) if isinstance(e, keep)]
        assert hw == sw, f"HBFP_SEED={seed}: {burst.pieces}"
