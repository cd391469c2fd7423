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
