"""Each engine of the accelerator top on its own in Amaranth's simulator, against the
golden device model (``sim/engine_bench.py``, ``sim/engine_scripts.py``).

The engine's memories are a Python model with the timing of Amaranth memory ports; the
command stream gets random gaps and the status stream random back-pressure. Every
answer equals the emulator's byte for byte, every buffer equals the emulator's at each
check, and the engine's sample outputs fold to the emulator's statistics.
"""

from __future__ import annotations

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.gateware.top import ENGINES
from hbfp_hw.sim.engine_bench import (BufferModel, check_answers, fold, fold_ints,
                                      run_amaranth, standalone)
from hbfp_hw.sim.engine_scripts import SCRIPTS


def _run(name: str, seed: int, cfg=SIM_CONFIG, **kw):
    rng = np.random.default_rng(seed)
    eng, info, specs = standalone(cfg, name)
    script = SCRIPTS[name](cfg, info, rng, **kw)
    model = BufferModel(specs, cfg.tile, info)
    res = run_amaranth(eng, model, script, rng, p_valid=float(rng.uniform(0.3, 1)),
                       p_ready=float(rng.uniform(0.3, 1)))
    check_answers(script, res["answers"], res["checks"])
    return script, res


def test_every_engine_has_a_script():
    assert set(SCRIPTS) == set(ENGINES.values())


def test_buffer_io_engine(seed):
    script, res = _run("buffer_io", seed)
    n_reset = sum(1 for st in script.steps if st[0] == "cmd" and st[1].name == "RESET")
    assert n_reset == 1 and res["pulses"]["soft_reset"] >= 1
    assert res["token"] == script.emu.session != 0     # RESET keeps the session token


def test_stats_engine(seed):
    _run("stats", seed)


def test_quantize_engine(seed):
    script, res = _run("quantize", seed)
    assert fold(res["samples"]["sample"]) == script.emu._qstats


def test_gemm_engine(seed):
    script, res = _run("gemm", seed)
    assert fold(res["samples"]["sample"]) == script.emu._stats
    ok = [a for a in script.answers if a[1] == P.Op.GEMM | P.RESPONSE_FLAG]
    assert len(ok) >= 6, "too few GEMMs were computed to compare"


def test_bitlayer_engine(seed):
    script, res = _run("bitlayer", seed)
    assert fold_ints(res["samples"]["sample"]) == script.emu._istats
    assert script.emu._istats[0] > 0, "no BITLAYER command with TRACK wrote a result"
    ok = [a for a in script.answers if a[1] == P.Op.BITLAYER | P.RESPONSE_FLAG]
    assert len(ok) >= 6, "too few BITLAYER commands were computed to compare"
