"""MLS quantizer and MLS MAC Verilog under cocotb (Verilator), bit-exact vs hbfp_hw.mls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hbfp_hw.gateware import mls_pe, mls_quantizer
from hbfp_hw.mls import MLS_E2M1, MLS_E2M4, MLSFormat
from hbfp_hw.sim.runner import quick_cxx, run_cocotb

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"
# the units that fail validation in test_unit_parameter_errors are never elaborated
pytestmark = pytest.mark.filterwarnings("ignore:.*created but never used")


def run_q(fmt: MLSFormat, lanes: int, tmp_path: Path, seed: int, *, n: int = 400,
          stochastic: bool = True, verilog: Path | None = None, testcase=None) -> None:
    vpath, mpath = mls_quantizer.generate(fmt.replace(group_size=lanes), lanes,
                                          tmp_path / "gen", stochastic=stochastic)
    with quick_cxx():
        run_cocotb(verilog_sources=[verilog or vpath], toplevel="mls_quantizer",
                   test_module="tb_mls", build_dir=tmp_path / "build", python_paths=[SIM_DIR],
                   extra_env={"HBFP_MLS_MANIFEST": str(mpath), "HBFP_MLS_SEED": str(seed),
                              "HBFP_MLS_N": str(n)}, testcase=testcase)


def run_pe(fmt: MLSFormat, lanes: int, L: int, k_max: int, tmp_path: Path, seed: int, *,
           n: int = 300) -> None:
    vpath, mpath = mls_pe.generate(fmt, tmp_path / "gen", lanes=lanes, group_len=L,
                                   k_max=k_max)
    with quick_cxx():
        run_cocotb(verilog_sources=[vpath], toplevel="mls_pe", test_module="tb_mls",
                   build_dir=tmp_path / "build", python_paths=[SIM_DIR],
                   extra_env={"HBFP_MLS_MANIFEST": str(mpath), "HBFP_MLS_SEED": str(seed),
                              "HBFP_MLS_N": str(n)})


def test_quantizer_e2m4_cocotb(tmp_path, seed):
    run_q(MLS_E2M4, 8, tmp_path, seed)


def test_pe_e2m4_cocotb(tmp_path, seed):
    man = json.loads(mls_pe.generate(MLS_E2M4, tmp_path / "w", lanes=4, group_len=16,
                                     k_max=256)[1].read_text())
    assert man["acc_bits"] == 53
    run_pe(MLS_E2M4, 4, 16, 256, tmp_path, seed)


@pytest.mark.sweep
def test_quantizer_e2m1_cocotb(tmp_path, seed):
    run_q(MLS_E2M1, 4, tmp_path, seed, n=2000)


@pytest.mark.sweep
def test_quantizer_e3m2_nearest_cocotb(tmp_path, seed):
    run_q(MLSFormat(exp_bits=3, man_bits=2, group_bits=3), 16, tmp_path, seed, n=2000,
          stochastic=False)


@pytest.mark.sweep
def test_pe_e2m1_cocotb(tmp_path, seed):
    run_pe(MLS_E2M1, 2, 8, 64, tmp_path, seed, n=1000)


@pytest.mark.sweep
def test_testbench_detects_wrong_dut(tmp_path, seed):
    """The checker fails on Verilog of another format (E2M1 driven as E2M4)."""
    wrong, _ = mls_quantizer.generate(MLS_E2M1.replace(group_size=4), 4, tmp_path / "wrong")
    with pytest.raises((AssertionError, SystemExit)):
        run_q(MLS_E2M4, 4, tmp_path, seed, n=20, verilog=wrong,
              testcase="test_quantizer_edges")


def test_unit_parameter_errors():
    with pytest.raises(ValueError, match=r"group_size=16 must equal lanes=8"):
        mls_quantizer.MLSQuantizer(MLS_E2M4, 8)
    with pytest.raises(ValueError, match=r"lanes=0 is out of range; accepted range is"):
        mls_pe.MLSPE(MLS_E2M4, lanes=0)
    with pytest.raises(ValueError, match=r"group_len=10 must be a positive multiple"):
        mls_pe.MLSPE(MLS_E2M4, lanes=4, group_len=10)


def test_verilator_lint(tmp_path):
    import shutil
    import subprocess

    from hbfp_hw.sim.runner import setup_verilator_env
    setup_verilator_env()
    units = [(mls_quantizer.generate(MLS_E2M1.replace(group_size=4), 4, tmp_path / "q")[0],
              "mls_quantizer"),
             (mls_pe.generate(MLS_E2M4, tmp_path / "pe")[0], "mls_pe")]
    for vpath, top in units:
        p = subprocess.run([shutil.which("verilator") or "verilator", "--lint-only",
                            "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC",
                            "--top-module", top, str(vpath)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "%Error" not in p.stderr, p.stderr
