"""Synthesis of the sparse MAC engine against dense datapaths (ECP5-85F, one run).

Rows, all synthesised and placed-and-routed in the same run (yowasp yosys + nextpnr,
out of context, :func:`hbfp_hw.gateware.synth.synth_ecp5`):

* ``sparse 2:4``: :class:`hbfp_hw.gateware.sparse_pe.SparseEngine`, 8-bit mantissas,
  one 4x4 tile per cycle from its 8 kept mantissas + indices (8 multipliers), both
  orientations (``W`` / ``Wᵀ``) selectable per beat;
* ``dense 4x4``: the same engine with ``dense=True`` (16 mantissas, 16 multipliers);
* ``mac array``: the project's dense MAC array, 8-bit, 4x4 PEs x 4 lanes, DSP mapping
  (the ``8b dsp`` row of ``bench_mac_array_synth.py``).

LUTs are mapped with classic ABC in every row (``--abc9``: ABC9). Effective GMAC/s
counts dense-equivalent MACs (a 2:4 tile of 16 weights, 8 of them kept, counts 16)
times Fmax; per DSP and per LUT are that rate over the resources.

Run: ``.venv/bin/python benchmarks/bench_sparse_synth.py [--out DIR] [--freq MHZ]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.mac_array import generate as generate_array
from hbfp_hw.gateware.sparse_pe import SparseEngineConfig, generate
from hbfp_hw.gateware.synth import SynthError, synth_ecp5

HEADER = (f"{'design':14} {'man':>3} {'mults':>5} {'map':>4} {'LUT':>6} {'FF':>6} {'DSP':>4} "
          f"{'Fmax':>6} {'effMAC/c':>8} {'GMAC/s':>7} {'GMAC/s/DSP':>10} "
          f"{'MMAC/s/LUT':>10}")


def row(label, man, mults, res, macs) -> str:
    g = macs * res.fmax_mhz / 1000
    per_dsp = f"{g / res.dsps:10.3f}" if res.dsps else f"{'-':>10}"
    per_lut = 1000 * g / max(1, res.core_luts)
    return (f"{label:14} {man:>3} {mults:>5} {res.mapper:>4} {res.core_luts:>6} {res.core_ffs:>6} "
            f"{res.dsps:>4} {res.fmax_mhz:6.1f} {macs:>8} {g:7.2f} {per_dsp} {per_lut:10.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--freq", type=float, default=125.0, help="P&R target MHz")
    ap.add_argument("--abc9", action="store_true", help="map LUTs with ABC9 (default: "
                    "classic ABC for every row, so that all rows use the same mapper; "
                    "ABC9 fails on some of these designs in YoWASP yosys 0.70)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_sparse_"))
    designs = [
        ("sparse 2:4", SparseEngineConfig(n=2, m=4, k_max=1024)),
        ("dense 4x4", SparseEngineConfig(n=2, m=4, k_max=1024, dense=True)),
    ]
    print(HEADER, flush=True)
    for label, cfg in designs:
        d = out / label.replace(" ", "_").replace(":", "")
        v = generate(cfg, d, name="sparse_pe")
        try:
            res = synth_ecp5(v, "sparse_pe", workdir=d / "ecp5", freq_mhz=args.freq,
                             abc9=args.abc9)
        except SynthError as e:
            print(f"{label:14} failed: {str(e).splitlines()[0]}", flush=True)
            continue
        print(row(label, cfg.man_bits_w, cfg.slots, res, cfg.effective_macs), flush=True)
    acfg = MacArrayConfig(rows=4, cols=4, lanes=4, tile=8, man_bits_a=8, man_bits_b=8,
                          k_max=1024, mapping="dsp")
    d = out / "mac_array"
    v, _ = generate_array(acfg, d, name="mac_array", primitives="ecp5")
    try:
        res = synth_ecp5(v, "mac_array", workdir=d / "ecp5", freq_mhz=args.freq,
                         abc9=args.abc9)
        print(row("mac array", 8, acfg.rows * acfg.cols * acfg.lanes, res,
                  acfg.macs_per_cycle), flush=True)
    except SynthError as e:
        print(f"{'mac array':14} failed: {str(e).splitlines()[0]}", flush=True)
    print(f"(work directory: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
