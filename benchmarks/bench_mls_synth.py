"""Synthesis row of the MLS MAC: LUTs per MAC against the BFP PE at the same bit width.

Synthesises (ECP5-85F, yowasp yosys + nextpnr, out of context, one run per design point):

* the MLS PE (:class:`hbfp_hw.gateware.mls_pe.MLSPE`): ``lanes`` element pairs per cycle,
  group length 16, exact accumulator for K <= 256;
* the BFP PE (:class:`hbfp_hw.gateware.pe.PE`, LUT multipliers, one accumulator window,
  block length 16, K <= 256, 8 guard bits) with the same element width as the MLS code
  (7 bits for E2M4, 4 for E2M1), and with the same multiplier width (sign + ``M + 1``
  magnitude bits: 6 for E2M4, 3 for E2M1).

Prints LUTs, FFs, Fmax, accumulator width and LUTs per MAC (per multiplier lane). Every
point is mapped with yosys' classic ABC (ABC9 of the YoWASP yosys fails on the BFP PE, and
one mapper for all rows keeps them comparable); ``--abc9`` tries ABC9 first (falling back
to classic ABC where it fails, as ``synth_ecp5(abc9=None)`` does) and prints the mapper.

Run: ``.venv/bin/python benchmarks/bench_mls_synth.py [--quick] [--abc9] [--out DIR]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from amaranth.back import verilog

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.mls_pe import MLSPE
from hbfp_hw.gateware.pe import PE
from hbfp_hw.gateware.synth import SynthError, synth_ecp5
from hbfp_hw.mls import MLS_E2M1, MLS_E2M4

LANES, L, K_MAX = 4, 16, 256

HEADER = (f"{'design':34} {'elem bits':>9} {'acc bits':>8} {'LUTs':>6} {'FFs':>6} "
          f"{'Fmax MHz':>8} {'LUTs/MAC':>8}")


def bfp_pe(man_bits: int):
    cfg = MacArrayConfig(rows=L, cols=L, lanes=LANES, tile=L, man_bits_a=man_bits,
                         man_bits_b=man_bits, k_max=K_MAX, mapping="lut")
    return PE(cfg), cfg.acc_bits


def points(quick: bool):
    pts = []
    for fmt in ((MLS_E2M4,) if quick else (MLS_E2M4, MLS_E2M1)):
        pe = MLSPE(fmt, lanes=LANES, group_len=L, k_max=K_MAX)
        pts.append((f"MLS {fmt.name} PE", fmt.element_bits, pe, pe.acc_bits))
        b, acc = bfp_pe(fmt.element_bits)
        pts.append((f"BFP PE man_bits={fmt.element_bits} (same width)", fmt.element_bits,
                    b, acc))
        if not quick:
            mb = fmt.man_bits + 2
            b, acc = bfp_pe(mb)
            pts.append((f"BFP PE man_bits={mb} (same multiplier)", mb, b, acc))
    return pts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="E2M4 and its same-width BFP PE only")
    ap.add_argument("--out", default="", help="work directory (default: a temporary one)")
    ap.add_argument("--freq", type=float, default=100.0, help="target MHz (default 100)")
    ap.add_argument("--abc9", action="store_true",
                    help="ABC9 where it works (default: classic ABC for every point)")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench_mls_"))
    print(f"ECP5-85F, out of context, {LANES} lanes per PE, group/block length {L}, "
          f"K <= {K_MAX}")
    print(HEADER, flush=True)
    for i, (label, bits, dut, acc_bits) in enumerate(points(a.quick)):
        d = out / f"p{i}"
        d.mkdir(parents=True, exist_ok=True)
        v = d / "pe.v"
        v.write_text(verilog.convert(dut, name="pe", emit_src=False))
        try:
            res = synth_ecp5(v, "pe", workdir=d / "ecp5", freq_mhz=a.freq,
                             abc9=None if a.abc9 else False)
        except SynthError as e:
            print(f"{label:34} failed: {str(e).splitlines()[0]}", flush=True)
            continue
        print(f"{label:34} {bits:>9} {acc_bits:>8} {res.core_luts:>6} {res.core_ffs:>6} "
              f"{res.fmax_mhz:>8.1f} {res.core_luts / LANES:>8.1f}"
              + (f"  ({res.mapper})" if a.abc9 else ""), flush=True)
    print(f"(work directory: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
