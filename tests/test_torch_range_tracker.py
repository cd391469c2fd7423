# amaranth: UnusedElaboratable=no
"""RangeTracker gateware (Amaranth simulator) against a NumPy reference of the stream."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from hbfp_hw.gateware.range_tracker import RangeTracker, float_key


def _reference(windows, fp32: bool):
    """READ_STATS of every window from the transferred elements:
    (min, max, count of finite, n_nonfinite); min = max = 0 with no finite element."""
    out = []
    for elems in windows:
        arr = np.array(elems, dtype=np.int64)
        if fp32:
            vals = arr.astype(np.uint32).view(np.float32)
            good = vals[np.isfinite(vals)]
            nbad = int(vals.size - good.size)
        else:
            good, nbad = arr, 0
        if good.size == 0:
            out.append((0, 0, 0, nbad))
        else:
            out.append((good.min().item(), good.max().item(), int(good.size), nbad))
    return out


def _run(dut: RangeTracker, beats: np.ndarray, clear_after: set[int], rng,
         clear_prob: float = 0.5):
    """Stream ``beats`` with random valid gaps and ready back-pressure; clear after the
    listed beat indices (in the same cycle as the next transfer, or on an idle cycle).
    Returns the stats read just before each clear and at the end, and the windows."""
    results, windows = [], [[]]
    passed = []

    def read(ctx):
        mn, mx = ctx.get(dut.min), ctx.get(dut.max)
        if dut.fp32:
            mn = float(np.uint32(mn).view(np.float32))
            mx = float(np.uint32(mx).view(np.float32))
        assert bool(ctx.get(dut.seen)) == (ctx.get(dut.count) > 0)
        return (mn, mx, ctx.get(dut.count), ctx.get(dut.n_nonfinite))

    async def tb(ctx):
        n = 0
        pending_clear = False
        while n < len(beats):
            valid = rng.random() < 0.7
            ready = rng.random() < 0.7
            clear = pending_clear and rng.random() < clear_prob
            ctx.set(dut.i.valid, int(valid))
            ctx.set(dut.o.ready, int(ready))
            ctx.set(dut.clear, int(clear))
            ctx.set(dut.i.payload, [int(v) for v in beats[n]])
            if clear:
                results.append(read(ctx))
                windows.append([])
                pending_clear = False
            # pass-through is combinational
            assert ctx.get(dut.o.valid) == int(valid)
            assert ctx.get(dut.i.ready) == int(ready)
            assert list(ctx.get(dut.o.payload)) == list(ctx.get(dut.i.payload))
            if valid and ready:
                windows[-1].extend(int(v) for v in beats[n])
                passed.append(n)
                if n in clear_after:
                    pending_clear = True
                n += 1
            await ctx.tick()
        ctx.set(dut.i.valid, 0)
        ctx.set(dut.clear, 0)
        await ctx.tick()
        results.append(read(ctx))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return results, windows


def _check(results, windows, fp32):
    ref = _reference(windows, fp32)
    assert results == ref


@pytest.mark.parametrize("lanes", [1, 3, 4])
def test_int_stream_matches_numpy(lanes, rng):
    dut = RangeTracker(width=20, lanes=lanes)
    beats = rng.integers(-(1 << 19), 1 << 19, size=(60, lanes))
    beats[5] = (1 << 19) - 1          # extreme codes of the element width
    beats[6] = -(1 << 19)
    res, win = _run(dut, beats, {20, 21, 45}, rng)
    _check(res, win, fp32=False)


@pytest.mark.parametrize("lanes", [1, 4])
def test_fp32_stream_matches_numpy(lanes, rng):
    dut = RangeTracker(width=32, lanes=lanes, fp32=True)
    vals = (rng.standard_normal((80, lanes)) * np.exp2(rng.integers(-30, 30, (80, lanes))))
    vals = vals.astype(np.float32)
    vals[3] = 0.0
    vals[4] = -0.0
    vals[10, 0] = np.inf
    vals[11, -1] = -np.inf
    vals[30, 0] = np.nan
    vals[50] = np.nan                  # a beat of NaNs only
    beats = vals.view(np.uint32)
    res, win = _run(dut, beats, {15, 40, 55}, rng)
    _check(res, win, fp32=True)


def test_all_negative_and_only_nonfinite_window(rng):
    dut = RangeTracker(width=32, lanes=2, fp32=True)
    vals = np.array([[-3.5, -1e-30], [-2.0, -7.0], [np.nan, np.inf]], np.float32)
    res, win = _run(dut, vals.view(np.uint32), {1}, rng, clear_prob=1.0)
    # first window: four negative elements; second: NaN and Inf only
    assert res[0] == (-7.0, np.float32(-1e-30).item(), 4, 0)
    assert res[1] == (0, 0, 0, 2)


def test_float_key_orders_floats():
    vals = np.array([-np.inf, -2.0, -1e-38, -0.0, 0.0, 1e-38, 3.0, np.inf], np.float32)
    keys = [float_key(int(b)) for b in vals.view(np.uint32)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_saturating_counter(rng):
    dut = RangeTracker(width=8, lanes=1, count_bits=2)
    beats = np.arange(6).reshape(6, 1)
    res, _ = _run(dut, beats, set(), rng)
    assert res[-1] == (0, 5, 3, 0)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kw,msg", [
    (dict(width=1), "width=1 is out of range"),
    (dict(lanes=0), "lanes=0 is out of range"),
    (dict(width=16, fp32=True), "binary32 elements are 32 bits"),
    (dict(count_bits=60), "count_bits=60 is out of range"),
])
def test_parameter_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RangeTracker(**kw)
