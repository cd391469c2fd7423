"""Pin and timing constraints for the generated Verilog, for users' own flows.

Two kinds of top level:

* the **board top** (``hbfp-hw generate accelerator --board B``): the UART accelerator
  with the board's clock input, PLL (ECP5), reset synchroniser and two LEDs, ports named
  by the amaranth-boards platform (``clk25_0__io``, ``uart_0__rx__io`` ...). Its pin file
  is the platform's own (ECP5 ``.lpf`` for nextpnr/Diamond, iCE40 ``.pcf`` for
  nextpnr/iCEcube2), and :func:`board_constraints` adds an ``.sdc`` with the board clock
  and the design clock;
* the **plain UART top** (``hbfp-hw generate accelerator --uart``): ports ``clk``,
  ``rst``, ``rx``, ``tx``, ``busy``, one clock at ``config.clock_hz``. It has no vendor
  primitives, so it goes into any flow; :func:`uart_top_constraints` writes an ``.sdc``
  (Quartus, Diamond, Radiant) and an ``.xdc`` (Vivado) with its clock and the
  asynchronous ports, and pin placeholders to fill in.

The UART pins are asynchronous to the design clock (the receiver synchronises ``rx``),
so they are false paths; ``rst`` is synchronised inside the board top (and must be by the
user's logic for the plain top).
"""

from __future__ import annotations

import re
from pathlib import Path

from hbfp_hw.config.accelerator import AcceleratorConfig

__all__ = ["uart_top_constraints", "board_constraints", "write_constraints"]

_UART_PORTS = {"clk": "in", "rst": "in", "rx": "in", "tx": "out", "busy": "out"}


def _timing(clock_ports: dict[str, float], async_in: list[str], async_out: list[str],
            generated: tuple[str, float] | None = None,
            array: tuple[str, float] | None = None) -> str:
    lines = []
    for port, hz in clock_ports.items():
        lines.append(f"create_clock -name {port} -period {1e9 / hz:.3f} [get_ports {{{port}}}]")
    if generated is not None:
        net, hz = generated
        lines.append(f"# the design clock, from the PLL ({hz / 1e6:.3f} MHz)")
        lines.append(f"create_clock -name design_clk -period {1e9 / hz:.3f} "
                     f"[get_nets {{{net}}}]")
    if array is not None:
        net, hz = array
        lines.append(f"# the MAC array's clock, PLL CLKOS ({hz / 1e6:.3f} MHz): crosses to the "
                     f"design clock in asynchronous FIFOs only")
        lines.append(f"create_clock -name array_clk -period {1e9 / hz:.3f} "
                     f"[get_nets {{{net}}}]")
        lines.append("set_clock_groups -asynchronous -group {design_clk} -group {array_clk}")
    if async_in:
        lines.append("# asynchronous inputs (the UART receiver synchronises rx)")
        lines.append(f"set_false_path -from [get_ports {{{' '.join(async_in)}}}]")
    if async_out:
        lines.append("# asynchronous outputs (UART transmitter, status LEDs)")
        lines.append(f"set_false_path -to [get_ports {{{' '.join(async_out)}}}]")
    return "\n".join(lines) + "\n"


def uart_top_constraints(config: AcceleratorConfig, name: str) -> dict[str, str]:
    """``{name}.sdc`` and ``{name}.xdc`` for the plain UART top of ``config``."""
    head = (f"# {name}: the hbfp-hw UART accelerator, design clock "
            f"{config.clock_hz / 1e6:g} MHz, UART {config.baud_rate} baud\n")
    clocks, ins, ports = {"clk": config.clock_hz}, ["rx", "rst"], dict(_UART_PORTS)
    if config.array_clock_hz:       # the MAC array's domain: ports array_clk / array_rst
        clocks["array_clk"] = config.array_clock_hz
        ins.append("array_rst")
        ports.update(array_clk="in", array_rst="in")
    timing = _timing(clocks, ins, ["tx", "busy"])
    if config.array_clock_hz:
        timing += ("# the MAC array's clock crosses to clk in asynchronous FIFOs only\n"
                   "set_clock_groups -asynchronous -group {clk} -group {array_clk}\n")
    pins = "".join(
        f"# set_property -dict {{PACKAGE_PIN <pin> IOSTANDARD LVCMOS33}} [get_ports {p}]\n"
        for p in ports)
    xdc = (head + timing + "# pins: fill in your board's, e.g.\n" + pins)
    sdc_pins = "".join(f"# set_location_assignment PIN_<pin> -to {p}\n" for p in ports)
    sdc = head + timing + "# pins (Quartus .qsf syntax; other tools: their own)\n" + sdc_pins
    return {f"{name}.sdc": sdc, f"{name}.xdc": xdc}


def _pins_from_platform_file(text: str, family: str) -> tuple[dict, dict]:
    """``(port -> pin, clock port -> Hz)`` from the platform's .lpf / .pcf text."""
    if family == "ecp5":
        pins = dict(re.findall(r'LOCATE COMP "([^"]+)" SITE "([^"]+)";', text))
        clocks = {p: float(f) for p, f in re.findall(r'FREQUENCY PORT "([^"]+)" ([0-9.e+]+) HZ',
                                                     text)}
    else:
        pins = dict(re.findall(r"^\s*set_io (\S+) (\S+)", text, re.M))
        clocks = {p: float(f) * 1e6 for p, f in re.findall(r"^\s*set_frequency (\S+) (\S+)",
                                                          text, re.M) if p in pins}
    return pins, clocks


def board_constraints(board: str = "ulx3s", variant: str | None = None,
                      config: AcceleratorConfig | None = None, *, name: str | None = None,
                      plan=None) -> dict[str, str]:
    """The pin file (``.lpf`` / ``.pcf``, the platform's) and an ``.sdc`` of the board
    top; ``plan`` (from :func:`~hbfp_hw.gateware.build.build_plan`) avoids elaborating
    again."""
    from .board import BOARDS
    from .build import build_plan
    b = BOARDS[board]
    if plan is None:
        plan, _, top, cfg = build_plan(board, variant, config, name=name)
    name = plan.script[len("build_"):]
    ext = ".lpf" if b.family == "ecp5" else ".pcf"
    pin_text = plan.files[f"{name}{ext}"].rstrip("\n") + "\n"
    pins, clocks = _pins_from_platform_file(pin_text, b.family)
    if not clocks:
        raise ValueError(f"the {board} pin file names no clock port")
    net, cfg_hz = _design_clock(plan, b.family)
    board_hz = next(iter(clocks.values()))
    gen = None if cfg_hz is None or abs(cfg_hz - board_hz) < 1 else (net, cfg_hz)
    array = _array_clock(plan, b.family)
    ins = sorted(p for p in pins if "rx" in p)
    outs = sorted(p for p in pins if p not in clocks and p not in ins)
    head = (f"# {name}: the hbfp-hw board top for {board} {variant or b.default_variant}; "
            f"ports and pins as in {name}{ext}\n")
    sdc = head + _timing(clocks, ins, outs, gen, array)
    return {f"{name}{ext}": pin_text, f"{name}.sdc": sdc}


def _design_clock(plan, family: str) -> tuple[str | None, float | None]:
    """The net and frequency (Hz) of the design clock the platform constrained."""
    name = plan.script[len("build_"):]
    ext = ".lpf" if family == "ecp5" else ".pcf"
    text = plan.files[f"{name}{ext}"]
    if family == "ecp5":
        nets = [(n, float(f)) for n, f in re.findall(r'FREQUENCY NET "([^"]+)" ([0-9.e+]+) HZ',
                                                     text) if not n.startswith("array_clk")]
        return nets[0] if nets else (None, None)
    pins = dict(re.findall(r"^\s*set_io (\S+) (\S+)", text, re.M))
    for net, mhz in re.findall(r"^\s*set_frequency (\S+) (\S+)", text, re.M):
        if net not in pins:
            return net, float(mhz) * 1e6
    return None, None


def _array_clock(plan, family: str) -> tuple[str, float] | None:
    """The net and frequency (Hz) of the MAC array's clock (``array_clock_hz``: the board
    top's ``array_clk``, the PLL's second output), or ``None``."""
    if family != "ecp5":
        return None
    name = plan.script[len("build_"):]
    for net, hz in re.findall(r'FREQUENCY NET "([^"]+)" ([0-9.e+]+) HZ',
                              plan.files[f"{name}.lpf"]):
        if net.startswith("array_clk"):
            return net, float(hz)
    return None


def write_constraints(files: dict[str, str], outdir: str | Path) -> list[Path]:
    """Write ``files`` (name -> text) into ``outdir``; returns the paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = []
    for fname, text in files.items():
        p = outdir / fname
        p.write_text(text if text.endswith("\n") else text + "\n")
        out.append(p)
    return out


def repository_sets(boards=None) -> dict[str, dict[str, str]]:
    """The sets kept in the repository's ``constraints/`` folder: each board's default
    build (``<board>-<variant>/``), its presets (``<board>-<variant>-<preset>/``) and the
    plain UART top of the default accelerator (``uart/``)."""
    from .board import BOARDS, board_preset
    sets = {"uart": uart_top_constraints(AcceleratorConfig.default(), "hbfp_accel")}
    for board in sorted(boards or BOARDS):
        b = BOARDS[board]
        sets[f"{board}-{b.default_variant}"] = board_constraints(board, b.default_variant)
        for preset in b.presets:
            sets[f"{board}-{b.default_variant}-{preset}"] = board_constraints(
                board, b.default_variant, board_preset(board, preset))
    return sets


if __name__ == "__main__":  # pragma: no cover - regenerates constraints/
    import sys
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "constraints")
    for folder, files in repository_sets().items():
        for p in write_constraints(files, root / folder):
            print(p)
