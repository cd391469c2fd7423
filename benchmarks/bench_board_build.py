"""Board build benchmark: the board's default accelerator on a ULX3S, bitstream, Fmax, utilisation.

Runs the same flow as ``hbfp-hw build`` (:func:`hbfp_hw.gateware.build.build_board`) and
prints Fmax against the design clock, LUT/FF/DSP/BRAM use and their share of the device,
and the wall time of the build. Builds run one after the other (each takes many minutes
on a 2-core machine: yosys and nextpnr are single-threaded WebAssembly builds).

Run: ``.venv/bin/python benchmarks/bench_board_build.py [--variant 85F ...]
[--clock-mhz 60] [--config JSON] [--router router2] [--out DIR]``; ``--json FILE`` also
writes the results. Without ``--config`` the board's default configuration is built
(ulx3s: ``hbfp_hw.gateware.board.ULX3S_CONFIG``, a 4x4 array).
``--manifest M.json ...`` prints the table of earlier builds from their manifests (the
build results are stored there) without building again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware.build import ROUTER, ROUTERS, BuildError, build_board
from hbfp_hw.manifest import read_manifest


def _row(r: dict) -> tuple:
    """A table row from :meth:`BuildResult.to_dict` (also stored in the manifest)."""
    u = r["utilisation"]
    return (f"{r['board']} {r['variant']}", f"{r['clock_hz'] / 1e6:.3f}",
            f"{r['fmax_mhz']:.2f}", "yes" if r["timing_met"] else "NO",
            f"{r['luts']} ({u['LUT']:.1f}%)", f"{r['ffs']} ({u['FF']:.1f}%)",
            f"{r['dsps']} ({u['DSP']:.1f}%)", f"{r['brams']} ({u['BRAM']:.1f}%)",
            f"{r['seconds']:.0f}")


def _table(rows: list[tuple]) -> None:
    head = ("board", "clock MHz", "Fmax MHz", "met", "LUT4", "FF", "MULT18X18D", "DP16KD",
            "build s")
    w = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    print()
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
    print("|" + "|".join("-" * (n + 2) for n in w) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board", default="ulx3s")
    ap.add_argument("--variant", nargs="+", default=["85F"])
    ap.add_argument("--clock-mhz", type=float, default=None,
                    help="design clock; default: the board's (ulx3s: 45 MHz)")
    ap.add_argument("--config", default=None, help="AcceleratorConfig JSON file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--router", default=ROUTER, choices=ROUTERS)
    ap.add_argument("--out", default="build/bench_board")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--manifest", nargs="+", default=None,
                    help="print the table of earlier builds from their manifests")
    a = ap.parse_args(argv)
    if a.manifest:
        rows = [_row(read_manifest(m, kind="board")["build"]) for m in a.manifest]
        _table(rows)
        return 0
    cfg = None
    if a.config:
        d = json.loads(Path(a.config).read_text())
        cfg = AcceleratorConfig.from_dict(d.get("config", d))
    clock = None if a.clock_mhz is None else round(a.clock_mhz * 1e6)
    rows, results = [], []
    for v in a.variant:
        print(f"== {a.board} {v}", flush=True)
        try:
            r = build_board(a.board, v, cfg, Path(a.out) / f"{a.board}_{v}", clock_hz=clock,
                            seed=a.seed, router=a.router,
                            progress=lambda s: print(s, flush=True))
        except (BuildError, ValueError) as e:
            print(f"{a.board} {v}: FAILED: {str(e).splitlines()[0]}", flush=True)
            rows.append((f"{a.board} {v}", "-", "-", "failed", "", "", "", "", ""))
            continue
        results.append(r.to_dict())
        rows.append(_row(r.to_dict()))
    _table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
