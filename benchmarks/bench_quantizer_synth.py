"""Synthesise and place-and-route the quantizer for ECP5-85F; print a utilisation table.

Usage::

    .venv/bin/python benchmarks/bench_quantizer_synth.py [--freq 150] [--quick] \
        [-o build/bench_quantizer]

Each configuration is generated with :func:`hbfp_hw.gateware.quantizer.generate` and
measured out of context (:func:`hbfp_hw.gateware.synth.synth_ecp5`): registered core,
no IO pins, so Fmax is the core's register-to-register Fmax. elements/s = lanes x Fmax
(one beat per cycle).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import BFPFormat
from hbfp_hw.gateware.quantizer import generate
from hbfp_hw.gateware.synth import synth_ecp5

#: (lanes, block, man_bits, rounding, runtime_rounding)
CONFIGS = [
    (1, 32, 8, "nearest_even", False),
    (4, 32, 8, "nearest_even", False),
    (8, 32, 8, "nearest_even", False),
    (8, 32, 4, "nearest_even", False),
    (8, 32, 8, "stochastic", False),
    (8, 32, 8, "nearest_even", True),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freq", type=float, default=150.0, help="target MHz (default 150)")
    ap.add_argument("--quick", action="store_true", help="only 8 lanes / block 32 / 8 bits")
    ap.add_argument("-o", "--output", default="build/bench_quantizer")
    a = ap.parse_args(argv)
    configs = [c for c in CONFIGS if c[:3] == (8, 32, 8) and c[3] == "nearest_even"
               and not c[4]] if a.quick else CONFIGS
    rows = []
    hdr = (f"{'lanes':>5} {'block':>5} {'man':>3} {'rounding':<13} {'LUTs':>6} {'FFs':>6} "
           f"{'DSPs':>4} {'BRAMs':>5} {'Fmax MHz':>8} {'Melem/s':>8} {'P&R s':>6}")
    print(f"quantizer on ECP5-85F (LFE5U-85F CABGA381), out of context, target {a.freq:g} MHz")
    print(hdr)
    print("-" * len(hdr))
    for lanes, block, mb, rnd, rt in configs:
        cfg = QuantizerConfig(format=BFPFormat(man_bits=mb, block_shape=(block,),
                                               rounding=rnd), lanes=lanes,
                              runtime_rounding=rt)
        tag = f"q_l{lanes}_b{block}_m{mb}_{rnd}{'_rt' if rt else ''}"
        out = Path(a.output) / tag
        t0 = time.monotonic()
        vpath, _ = generate(cfg, out, name="quantizer")
        r = synth_ecp5(vpath, "quantizer", workdir=out / "synth", freq_mhz=a.freq)
        label = "runtime(all)" if rt else rnd
        row = (f"{lanes:>5} {block:>5} {mb:>3} {label:<13} {r.luts:>6} {r.ffs:>6} {r.dsps:>4} "
               f"{r.brams:>5} {r.fmax_mhz:>8.1f} {lanes * r.fmax_mhz:>8.0f} "
               f"{time.monotonic() - t0:>6.0f}")
        print(row, flush=True)
        rows.append(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
