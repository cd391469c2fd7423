"""The MAC array in its own clock domain (``AcceleratorConfig.array_clock_hz``).

The GEMM engine of the simulated top, built with the array domain, runs the engine
bench's GEMM script (every computed slot pair, random shapes and orientations,
``ACCUMULATE`` repeats, error cases) with the ``sync`` clock at 1 us and the ``array``
clock at an unrelated period, random command gaps and random back-pressure on the
status stream; every answer, every buffer and the statistics samples must equal the
golden device model's (``sim/engine_bench.py``). The default run uses one array period
(7.3 ns against 10 ns, scaled); ``-m sweep`` adds a slower array clock, more GEMMs and
the ULX3S ``fast`` preset's array (8x8 PEs of 8 lanes, packed 4-bit products).
"""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.sim.engine_bench import (BufferModel, check_answers, fold, run_amaranth,
                                      standalone)
from hbfp_hw.sim.engine_scripts import SCRIPTS


def _gemm(cfg: AcceleratorConfig, seed: int, period: float, n: int):
    rng = np.random.default_rng(seed)
    eng, info, specs = standalone(cfg, "gemm")
    script = SCRIPTS["gemm"](cfg, info, rng, n=n)
    model = BufferModel(specs, cfg.tile, info)
    res = run_amaranth(eng, model, script, rng, p_valid=float(rng.uniform(0.3, 1)),
                       p_ready=float(rng.uniform(0.3, 1)), array_period=period)
    check_answers(script, res["answers"], res["checks"])
    assert fold(res["samples"]["sample"]) == script.emu._stats
    ok = [a for a in script.answers if a[1] == P.Op.GEMM | P.RESPONSE_FLAG]
    assert len(ok) >= n, "too few GEMMs were computed to compare"
    return res


def test_config_validation():
    assert SIM_CONFIG.replace(array_clock_hz=100_000_000).array_clock_hz == 100_000_000
    for bad in (-1, 999_999, 2_000_000_000, 1.5e8, True):
        with pytest.raises(ValueError, match=r"array_clock_hz=.*accepted values are 0"):
            SIM_CONFIG.replace(array_clock_hz=bad)
    with pytest.raises(ValueError, match=r"array_lanes=8; accepted values for tile=4"):
        AcceleratorConfig(tile=4, array_rows=4, array_cols=4, array_lanes=8)
    # listed only when set: single-clock descriptions are unchanged
    assert "array_clock_hz" not in SIM_CONFIG.to_dict()
    d = SIM_CONFIG.replace(array_clock_hz=90_000_000).to_dict()
    assert AcceleratorConfig.from_dict(d).array_clock_hz == 90_000_000


def test_gemm_engine_fast_array_clock(seed):
    """sync 1 us, array 0.73 us (10 ns against 7.3 ns, scaled)."""
    _gemm(SIM_CONFIG.replace(array_clock_hz=137_000_000), seed, 0.73e-6, n=3)


@pytest.mark.sweep
@pytest.mark.parametrize("period", [0.73e-6, 2.3e-6, 1e-6])
def test_gemm_engine_array_clock_sweep(seed, period):
    _gemm(SIM_CONFIG.replace(array_clock_hz=100_000_000), seed, period, n=9)


@pytest.mark.sweep
def test_gemm_engine_fast_preset_array(seed):
    """The ULX3S fast preset's array (8x8 PEs, 8 lanes, 8x8 HBFP4 tiles, products packed
    four per multiplier) with small buffers, sync 1 us, array 0.53 us."""
    from hbfp_hw.gateware.board import board_preset
    cfg = board_preset("ulx3s", "fast").replace(operand_depth=1024, input_depth=512,
                                               output_depth=512)
    _gemm(cfg, seed, 0.53e-6, n=3)
