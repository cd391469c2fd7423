"""The constraint files of constraints/ (pins, clocks, asynchronous ports) agree with the
boards' platforms and the configurations; regenerating them gives the same files."""

import re
from pathlib import Path

import pytest

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware import board as BD
from hbfp_hw.gateware.constraints import (_pins_from_platform_file, repository_sets,
                                          uart_top_constraints)

ROOT = Path(__file__).resolve().parents[1] / "constraints"


@pytest.mark.parametrize("board", sorted(BD.BOARDS))
def test_board_files_match_the_platform(board):
    b = BD.BOARDS[board]
    folder = ROOT / f"{board}-{b.default_variant}"
    ext = ".lpf" if b.family == "ecp5" else ".pcf"
    pin_file, = folder.glob(f"*{ext}")
    pins, clocks = _pins_from_platform_file(pin_file.read_text(), b.family)
    want = BD.board_pins(board, b.default_variant)
    assert sorted(pins.values()) == sorted(p for k in ("clk", "rx", "tx", "led_busy",
                                                        "led_locked") for p in want[k])
    (clk_port, hz), = clocks.items()
    assert pins[clk_port] == want["clk"][0]
    assert hz == BD.board_platform(board).default_clk_frequency
    sdc = pin_file.with_suffix(".sdc").read_text()
    assert f"-period {1e9 / hz:.3f} [get_ports {{{clk_port}}}]" in sdc
    cfg, pll = BD.board_config(board)
    if pll is not None:
        assert f"create_clock -name design_clk -period {1e9 / cfg.clock_hz:.3f}" in sdc
    rx = [p for p, pin in pins.items() if pin in want["rx"]]
    assert f"set_false_path -from [get_ports {{{rx[0]}}}]" in sdc


def test_uart_top_files():
    cfg = AcceleratorConfig.default()
    files = uart_top_constraints(cfg, "hbfp_accel")
    for name, text in files.items():
        assert (ROOT / "uart" / name).read_text() == text
    xdc = files["hbfp_accel.xdc"]
    assert f"create_clock -name clk -period {1e9 / cfg.clock_hz:.3f} [get_ports {{clk}}]" in xdc
    assert "set_false_path -from [get_ports {rx rst}]" in xdc
    # every port of the generated UART top is named
    for port in ("clk", "rst", "rx", "tx", "busy"):
        assert re.search(rf"\[get_ports {port}\]", xdc), port


@pytest.mark.sweep
def test_regenerated_files_equal_the_repository():
    for folder, files in repository_sets().items():
        for name, text in files.items():
            assert (ROOT / folder / name).read_text() == text, f"{folder}/{name}"


def test_generate_accelerator_board_writes_top_and_constraints(tmp_path, capsys):
    from hbfp_hw.cli import main
    from hbfp_hw.manifest import read_manifest
    assert main(["generate", "accelerator", "--board", "ulx3s", "--sim", "-o",
                 str(tmp_path)]) == 0
    assert "elaborating the ulx3s board top" in capsys.readouterr().out
    v = (tmp_path / "hbfp_sim_ulx3s.v").read_text()
    lpf = (tmp_path / "hbfp_sim_ulx3s.lpf").read_text()
    pins, clocks = _pins_from_platform_file(lpf, "ecp5")
    head = re.search(r"^module hbfp_sim_ulx3s\(([^)]*)\);", v, re.M)
    assert head and set(p.strip() for p in head.group(1).split(",")) == set(pins)
    assert "EHXPLLL" in v                      # the PLL makes the design clock
    sdc = (tmp_path / "hbfp_sim_ulx3s.sdc").read_text()
    assert "create_clock -name design_clk -period 20.000" in sdc    # 50 MHz
    m = read_manifest(tmp_path / "hbfp_sim_ulx3s.json", kind="board")
    assert m["board"]["board"] == "ulx3s" and m["ports"]["rx"]["pins"] == ["M1"]


def test_generate_accelerator_uart_writes_sdc_and_xdc(tmp_path, capsys):
    from hbfp_hw.cli import main
    from hbfp_hw.gateware.sim_device import SIM_CONFIG
    assert main(["generate", "accelerator", "--uart", "--sim", "-o", str(tmp_path)]) == 0
    want = uart_top_constraints(SIM_CONFIG, "hbfp_sim_accel")
    for name, text in want.items():
        assert (tmp_path / name).read_text() == text
    v = (tmp_path / "hbfp_sim_accel.v").read_text()
    head = re.search(r"^module hbfp_sim_accel\(([^)]*)\);", v, re.M)
    assert set(p.strip() for p in head.group(1).split(",")) == {"clk", "rst", "rx", "tx",
                                                                "busy"}
    assert main(["generate", "accelerator", "--variant", "85F", "-o", str(tmp_path)]) == 2
    assert "--variant needs --board" in capsys.readouterr().err
