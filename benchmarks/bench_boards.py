"""Boards x presets: the table of board builds, and an array-size sweep on the ECP5-85F.

**Table.** For every board of ``hbfp_hw.gateware.board.BOARDS`` (its default variant)
and every named configuration of it (``default`` and the board's presets, e.g. ulx3s
``fast``), reads ``report.json`` of the build in ``BUILDS/<board>-<variant>-<preset>/``
(what ``hbfp-hw build --board B --preset P -o that folder`` writes) and prints one row:
array, clock and Fmax per clock domain, LUT4 / flip-flops / DSPs / block RAMs, peak
GMAC/s. With ``--build`` a missing build is run first (place and route of the whole
board top with yowasp yosys + nextpnr: **7-25 min per build** on a 2-core machine,
one after the other; ``--only ulx3s-default`` limits it; the routing of ``ulx3s-fast``
did not finish within an hour here).

**Sweep** (``--sweep``): peak GMAC/s against LUT4s of the MAC array alone (not the
accelerator top), placed and routed out of context on the ECP5-85F (LFE5U-85F, nextpnr
``--freq 125``, ``hbfp_hw.gateware.synth.synth_ecp5``): 4-bit mantissas, 8 lanes,
8x8 tiles, products packed four per MULT18X18D (``mapping="dsp-packed"``,
``primitives="ecp5"``), as the ``fast`` preset builds it, for the array sizes of
:data:`SWEEP` (rows x cols). Peak GMAC/s = MACs per clock x the routed Fmax. The full
board builds of the table are drawn as a second series (whole top, peak at the array's
clock). Each point takes **1-6 min**; results are kept in ``SWEEP_DIR/<label>/
result.json`` and reused. ``--png`` writes the plot.

**Array domain** (``--array-domain PRESET``): the logic a board preset's ``array`` clock
domain holds, placed and routed out of context on the ECP5-85F (nextpnr ``--freq``
``--array-freq``, seed 1): the MAC array as the GEMM engine builds it (``ext_eref``,
``carry``, the configuration's ``runtime_frac``, ``primitives="ecp5"``: tile buffers,
PEs, carry stage, FP32 converters, output FIFO; not the accumulator memory and the
clock-crossing FIFOs of ``GemmStream``), and first one FP32 converter alone at the
carry width. Prints LUT4 / FF / DSP / Fmax and nextpnr's critical path of each; always
rebuilt (5-15 min on a loaded 2-core machine), kept in ``--array-dir``.

Run: ``.venv/bin/python benchmarks/bench_boards.py [--builds DIR] [--build [--only
BOARD-PRESET]] [--sweep] [--sweep-dir DIR] [--png FILE] [--array-domain PRESET
[--array-freq MHZ] [--array-dir DIR]]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.board import BOARDS, board_preset

#: the swept arrays (rows, cols): 4-bit, 8 lanes, tile 8, dsp-packed
SWEEP = ((2, 2), (4, 4), (4, 8), (8, 8))


def _presets(board: str) -> list[str]:
    return ["default", *BOARDS[board].presets]


def build_dir(builds: Path, board: str, preset: str) -> Path:
    return builds / f"{board}-{BOARDS[board].default_variant}-{preset}"


def _report(builds: Path, board: str, preset: str, build: bool) -> dict | None:
    """The build's ``report.json`` (run first with ``build`` when missing), or None."""
    d = build_dir(builds, board, preset)
    rep = d / "report.json"
    if not rep.exists() and build:
        from hbfp_hw.gateware.build import build_board
        print(f"building {board} {preset} into {d} (7-25 min)", flush=True)
        build_board(board, BOARDS[board].default_variant, board_preset(board, preset), d)
    return json.loads(rep.read_text()) if rep.exists() else None


def _array(board: str, preset: str) -> str:
    from hbfp_hw.gateware.top import mac_config
    mc = mac_config(board_preset(board, preset))
    return f"{mc.rows}x{mc.cols}x{mc.lanes} {mc.man_bits_a}b {mc.mapping}"


def table(builds: Path, build: bool, only: list[str] | None = None) -> list[tuple]:
    head = ("board", "preset", "array (rows x cols x lanes)", "clocks MHz (Fmax)", "met",
            "LUT4", "FF", "DSP", "BRAM", "MACs/clk", "peak GMAC/s")
    rows, points = [], []
    for board in sorted(BOARDS):
        for preset in _presets(board):
            r = _report(builds, board, preset,
                        build and (not only or f"{board}-{preset}" in only))
            arr = _array(board, preset)
            if r is None:
                rows.append((f"{board} {BOARDS[board].default_variant}", preset, arr,
                             "not built", "", "", "", "", "", "", ""))
                continue
            clocks = r.get("clocks") or {"sync": {"clock_mhz": r["clock_hz"] / 1e6,
                                                   "fmax_mhz": r["fmax_mhz"]}}
            clk = ", ".join(f"{d} {c['clock_mhz']:.1f} ({c['fmax_mhz']:.1f})"
                            for d, c in clocks.items())
            u = r["utilisation"]
            rows.append((f"{r['board']} {r['variant']}", preset, arr, clk,
                         "yes" if r["timing_met"] else "NO",
                         f"{r['luts']} ({u['LUT']:.0f}%)", f"{r['ffs']} ({u['FF']:.0f}%)",
                         f"{r['dsps']} ({u['DSP']:.0f}%)", f"{r['brams']} ({u['BRAM']:.0f}%)",
                         str(r["macs_per_clock"]), f"{r['peak_gmacs']:.2f}"))
            points.append((f"{board} {preset}", r["luts"], r["peak_gmacs"]))
    w = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
    print("|" + "|".join("-" * (n + 2) for n in w) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) + " |")
    return points


def sweep(sweep_dir: Path) -> list[dict]:
    from hbfp_hw.gateware.mac_array import generate
    from hbfp_hw.gateware.synth import SynthError, synth_ecp5
    out = []
    print(f"\n{'array':8} {'LUT4':>6} {'FF':>6} {'DSP':>4} {'Fmax':>6} {'MACs/clk':>8} "
          f"{'GMAC/s':>7}")
    for r, c in SWEEP:
        label = f"{r}x{c}x8"
        d = sweep_dir / label
        res_path = d / "result.json"
        if not res_path.exists():
            cfg = MacArrayConfig(rows=r, cols=c, lanes=8, tile=8, man_bits_a=4, man_bits_b=4,
                                 k_max=4096, mapping="dsp-packed")
            v, _ = generate(cfg, d, name="mac_array", primitives="ecp5")
            try:
                res = synth_ecp5(v, "mac_array", workdir=d / "ecp5", freq_mhz=125.0)
            except SynthError as e:
                print(f"{label:8} failed: {str(e).splitlines()[0]}", flush=True)
                continue
            res_path.write_text(json.dumps({
                "label": label, "rows": r, "cols": c, "lanes": 8, "luts": res.luts,
                "ffs": res.ffs, "dsps": res.dsps, "fmax_mhz": res.fmax_mhz,
                "macs": cfg.macs_per_cycle}, indent=2) + "\n")
        p = json.loads(res_path.read_text())
        p["gmacs"] = p["macs"] * p["fmax_mhz"] / 1e3
        out.append(p)
        print(f"{label:8} {p['luts']:>6} {p['ffs']:>6} {p['dsps']:>4} {p['fmax_mhz']:6.1f} "
              f"{p['macs']:>8} {p['gmacs']:7.2f}", flush=True)
    return out


def critical_path(report: dict) -> str:
    """One line on the first critical path of a nextpnr ``--report`` JSON: its source
    and end cells, the number of logic cells on it and its delay split (logic / routing)."""
    cps = report.get("critical_paths") or []
    if not cps:
        return "no critical path in the report"
    cp = cps[0]
    steps = cp.get("path", [])
    logic = [s for s in steps if s.get("type") == "logic"]
    d_logic = sum(s.get("delay", 0.0) for s in steps if s.get("type") != "routing")
    d_route = sum(s.get("delay", 0.0) for s in steps if s.get("type") == "routing")
    src = steps[0].get("from", {}).get("cell", "?") if steps else "?"
    dst = steps[-1].get("to", {}).get("cell", "?") if steps else "?"
    return (f"{cp.get('from', '?')} -> {cp.get('to', '?')}: {len(logic)} logic cells, "
            f"{d_logic:.2f} ns logic + {d_route:.2f} ns routing; {src} -> {dst}")


def array_domain(preset: str, out_dir: Path, freq_mhz: float = 100.0,
                 board: str = "ulx3s") -> list[dict]:
    """Place and route out of context (seed 1) one FP32 converter at the carry width,
    then the MAC array as the GEMM engine builds it for ``board``/``preset`` (module
    docstring); print and return one row each."""
    from amaranth.back import verilog

    from hbfp_hw.gateware.fp32_convert import Fp32Convert
    from hbfp_hw.gateware.mac_array import MacArray, carry_bits
    from hbfp_hw.gateware.synth import SynthError, synth_ecp5
    from hbfp_hw.gateware.top import mac_config, runtime_frac
    cfg = board_preset(board, preset)
    mc = mac_config(cfg)
    cw = carry_bits(mc)
    units = (
        (f"fp32_convert_w{cw}", f"Fp32Convert(acc_bits={cw})",
         lambda: Fp32Convert(acc_bits=cw)),
        (f"array_{preset}", f"MacArray {mc.rows}x{mc.cols}x{mc.lanes} {mc.man_bits_a}b "
                            f"{mc.mapping}, ext_eref, carry",
         lambda: MacArray(mc, primitives="ecp5", ext_eref=True, carry=True,
                          runtime_frac=runtime_frac(cfg))),
    )
    print(f"\narray domain of {board} {preset} (Fp32Convert.LATENCY "
          f"{Fp32Convert.LATENCY}), nextpnr --freq {freq_mhz:g} --seed 1", flush=True)
    out = []
    for name, what, make in units:
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        v = d / f"{name}.v"
        v.write_text(verilog.convert(make(), name=name, emit_src=False))
        try:
            res = synth_ecp5(v, name, workdir=d / "ecp5", freq_mhz=freq_mhz, seed=1)
        except SynthError as e:
            print(f"{what}: failed: {str(e).splitlines()[0]}", flush=True)
            continue
        cp = critical_path(json.loads((d / "ecp5" / "report.json").read_text()))
        row = {"unit": what, "latency": Fp32Convert.LATENCY, "luts": res.luts,
               "ffs": res.ffs, "dsps": res.dsps, "brams": res.brams,
               "fmax_mhz": res.fmax_mhz, "mapper": res.mapper,
               "seconds": round(res.seconds), "critical_path": cp}
        (d / "result.json").write_text(json.dumps(row, indent=2) + "\n")
        out.append(row)
        print(f"{what}: LUT4 {res.luts}, FF {res.ffs}, DSP {res.dsps}, DP16KD {res.brams}, "
              f"Fmax {res.fmax_mhz:.2f} MHz ({res.mapper}, {res.seconds:.0f} s)\n"
              f"  critical path: {cp}", flush=True)
    return out


def plot(points: list[dict], tops: list[tuple], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if points:
        ax.plot([p["luts"] for p in points], [p["gmacs"] for p in points], "o-",
                label="MAC array alone (4-bit, 8 lanes, packed DSP), routed")
        for p in points:
            ax.annotate(f"{p['rows']}x{p['cols']} ({p['fmax_mhz']:.0f} MHz)",
                        (p["luts"], p["gmacs"]), textcoords="offset points", xytext=(5, -10),
                        fontsize=8)
    if tops:
        ax.plot([t[1] for t in tops], [t[2] for t in tops], "s", color="C3",
                label="whole board top (UART accelerator), routed")
        for name, lut, g in tops:
            ax.annotate(name, (lut, g), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("LUT4 (nextpnr TRELLIS_COMB)")
    ax.set_ylabel("peak GMAC/s (MACs per clock x clock)")
    ax.set_title("ECP5-85F (LFE5U-85F): peak throughput against LUTs")
    xs = [p["luts"] for p in points] + [t[1] for t in tops]
    ax.set_xlim(0, 1.2 * max(xs) if xs else None)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Boards x presets table from board builds (building the missing ones "
                    "with --build: 7-25 min each) and an ECP5-85F array-size sweep "
                    "(--sweep: the MAC array alone, placed and routed, 1-6 min per point).")
    ap.add_argument("--builds", default="build/boards",
                    help="folder of the builds, one per <board>-<variant>-<preset>")
    ap.add_argument("--build", action="store_true",
                    help="run the missing board builds (7-25 min each)")
    ap.add_argument("--only", action="append", default=None, metavar="BOARD-PRESET",
                    help="with --build, build only these (e.g. ulx3s-default; repeatable); "
                         "the routing of ulx3s-fast did not finish within an hour here")
    ap.add_argument("--sweep", action="store_true",
                    help=f"place and route the MAC arrays {', '.join(f'{r}x{c}' for r, c in SWEEP)}"
                         f" alone (1-6 min each; kept in --sweep-dir)")
    ap.add_argument("--sweep-dir", default="build/sweep_ecp5")
    ap.add_argument("--png", default=None, help="write the plot of the sweep (and the builds)")
    ap.add_argument("--array-domain", default=None, metavar="PRESET",
                    help="place and route the ulx3s PRESET's array-domain logic alone (the "
                         "MAC array as the GEMM engine builds it, FP32 converters included) "
                         "and one FP32 converter; prints Fmax and critical paths (5-15 min)")
    ap.add_argument("--array-freq", type=float, default=100.0,
                    help="nextpnr --freq of --array-domain (MHz)")
    ap.add_argument("--array-dir", default="build/array_domain")
    args = ap.parse_args(argv)
    if args.array_domain:
        array_domain(args.array_domain, Path(args.array_dir), args.array_freq)
        return 0
    tops = table(Path(args.builds), args.build, args.only)
    pts = sweep(Path(args.sweep_dir)) if args.sweep else []
    if args.png:
        plot(pts, tops, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
