"""Synthesis benchmark of the BFP MAC array (ECP5-85F, and iCE40UP5K where it fits).

Prints, per configuration: rows, cols, lanes, tile, mantissa bits, multiplier mapping,
LUT/FF/DSP/BRAM use, Fmax, peak GMAC/s (= MACs per cycle x Fmax), LUTs per MAC and
MACs per DSP (DSP mappings with ``primitives="ecp5"``: MULT18X18D with its input,
pipeline and output registers), next to a naive baseline measured in the same run (an 8x8 array of
registered 4x4 MACs, ``acc += a*b``, one MAC per PE per cycle).

A ``dual_precision`` array is synthesised once and printed in two rows, one per mode
(``mode8``: 8-bit jobs, ``mode4``: jobs whose operands both have at most 4 mantissa bits,
two products per multiplier): same resources and Fmax, different MACs per cycle.

Run: ``.venv/bin/python benchmarks/bench_mac_array_synth.py [--quick] [--out DIR]``
(each place-and-route takes one to several minutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.mac_array import generate
from hbfp_hw.gateware.pe import lut_multiply
from hbfp_hw.gateware.synth import SynthError, synth_ecp5, synth_ice40


class NaiveArray(wiring.Component):
    """Baseline: rows x cols registered ``acc += a*b`` MACs on bits-bit operands."""

    def __init__(self, rows=8, cols=8, bits=4, acc_bits=16, lut=False):
        self.rows, self.cols, self.bits, self.acc_bits, self.lut = rows, cols, bits, acc_bits, lut
        super().__init__({
            "a": In(data.ArrayLayout(signed(bits), rows)),
            "b": In(data.ArrayLayout(signed(bits), cols)),
            "acc": Out(data.ArrayLayout(signed(acc_bits), rows * cols)),
        })

    def elaborate(self, platform):
        m = Module()
        for r in range(self.rows):
            for c in range(self.cols):
                a, b = Signal(signed(self.bits)), Signal(signed(self.bits))
                m.d.sync += [a.eq(self.a[r]), b.eq(self.b[c])]
                prod = Signal(signed(2 * self.bits))
                m.d.sync += prod.eq(lut_multiply(a, b, self.bits, self.bits) if self.lut
                                    else a * b)
                acc = self.acc[r * self.cols + c]
                m.d.sync += acc.eq(acc + prod)
        return m


ECP5_CONFIGS = [
    # (label, config)
    ("4b dsp-packed", MacArrayConfig(rows=4, cols=4, lanes=4, tile=8, man_bits_a=4,
                                     man_bits_b=4, k_max=1024, mapping="dsp-packed")),
    ("8b dsp", MacArrayConfig(rows=4, cols=4, lanes=4, tile=8, man_bits_a=8, man_bits_b=8,
                              k_max=1024, mapping="dsp")),
    ("4b lut 8x8x8", MacArrayConfig(rows=8, cols=8, lanes=8, tile=8, man_bits_a=4,
                                    man_bits_b=4, k_max=1024, mapping="lut")),
    # 2x2 products per MULT18X18D: 512 MACs/cycle on 128 DSPs
    ("4b dsp-packed 8x8x8", MacArrayConfig(rows=8, cols=8, lanes=8, tile=8, man_bits_a=4,
                                           man_bits_b=4, k_max=1024, mapping="dsp-packed")),
    # the 8-bit array with the narrow mode: 4-bit jobs at 2 products per MULT18X18D
    ("dual dsp", MacArrayConfig(rows=4, cols=4, lanes=4, tile=8, man_bits_a=8, man_bits_b=8,
                                k_max=1024, mapping="dsp", dual_precision=True)),
    # the same with 16-wide tiles: T**2 >= 2 rows cols lanes, the 4-bit mode's peak is
    # also its sustained rate (with T = 8 both modes are load-bound at 64 MACs/cycle)
    ("dual dsp t16", MacArrayConfig(rows=4, cols=4, lanes=4, tile=16, man_bits_a=8,
                                    man_bits_b=8, k_max=1024, mapping="dsp",
                                    dual_precision=True)),
]
ICE40_CONFIGS = [
    ("4b dsp 2x2x2", MacArrayConfig(rows=2, cols=2, lanes=2, tile=4, man_bits_a=4,
                                    man_bits_b=4, k_max=256, mapping="dsp")),
]

HEADER = (f"{'device':8} {'design':16} {'rows':>4} {'cols':>4} {'lanes':>5} {'tile':>4} "
          f"{'man':>3} {'mapping':10} {'LUT':>6} {'FF':>6} {'DSP':>4} {'BRAM':>4} "
          f"{'Fmax':>6} {'MAC/c':>5} {'GMAC/s':>7} {'LUT/MAC':>7} {'MAC/DSP':>7}")


def row(device, label, rows, cols, lanes, tile, man, mapping, res, macs):
    gmacs = macs * res.fmax_mhz / 1000
    lpm = res.core_luts / macs
    mpd = f"{macs / res.dsps:7.2f}" if res.dsps else f"{'-':>7}"
    return (f"{device:8} {label:16} {rows:>4} {cols:>4} {lanes:>5} {tile:>4} {man:>3} "
            f"{mapping:10} {res.core_luts:>6} {res.core_ffs:>6} {res.dsps:>4} {res.brams:>4} "
            f"{res.fmax_mhz:6.1f} {macs:>5} {gmacs:7.2f} {lpm:7.1f} {mpd}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="only the naive DSP baseline and "
                    "the smallest array")
    ap.add_argument("--freq", type=float, default=125.0, help="P&R target MHz")
    ap.add_argument("--only", action="append", default=None, metavar="LABEL",
                    help="run only the designs whose label contains LABEL (repeatable)")
    args = ap.parse_args(argv)

    def keep(label: str) -> bool:
        return args.only is None or any(o in label for o in args.only)

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_mac_array_"))
    print(HEADER, flush=True)
    configs = ECP5_CONFIGS[1:2] if args.quick else ECP5_CONFIGS
    for label, cfg in [c for c in configs if keep(c[0])]:
        d = out / label.replace(" ", "_")
        v, _ = generate(cfg, d, name="mac_array", primitives="ecp5")
        try:
            res = synth_ecp5(v, "mac_array", workdir=d / "ecp5", freq_mhz=args.freq)
        except SynthError as e:
            print(f"ecp5-85  {label:16} failed: {str(e).splitlines()[0]}", flush=True)
            continue
        modes = ([(" mode8", cfg.man_bits_a, cfg.macs_per_cycle),
                  (" mode4", 4, cfg.macs_per_cycle_narrow)] if cfg.dual_precision
                 else [("", cfg.man_bits_a, cfg.macs_per_cycle)])
        for suffix, man, macs in modes:
            print(row("ecp5-85", label + suffix, cfg.rows, cfg.cols, cfg.lanes, cfg.tile,
                      f"{man}", cfg.mapping, res, macs), flush=True)
    for label, cfg in [c for c in ([] if args.quick else ICE40_CONFIGS) if keep(c[0])]:
        d = out / ("ice40_" + label.replace(" ", "_"))
        v, _ = generate(cfg, d, name="mac_array")
        try:
            res = synth_ice40(v, "mac_array", workdir=d / "ice40", freq_mhz=24)
        except SynthError as e:
            print(f"up5k     {label:16} does not fit / failed: {e}", flush=True)
            continue
        print(row("up5k", label, cfg.rows, cfg.cols, cfg.lanes, cfg.tile,
                  f"{cfg.man_bits_a}", cfg.mapping, res, cfg.macs_per_cycle), flush=True)
    base = [("naive dsp", False), ("naive lut", True)]
    if args.quick:
        base = base[:1]
    for label, lut in [b for b in base if keep(b[0])]:
        d = out / label.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        v = d / "naive.v"
        v.write_text(verilog.convert(NaiveArray(lut=lut), name="naive", emit_src=False))
        try:
            res = synth_ecp5(v, "naive", workdir=d / "ecp5", freq_mhz=args.freq)
        except SynthError as e:
            print(f"ecp5-85  {label:16} failed: {str(e).splitlines()[0]}", flush=True)
            continue
        print(row("ecp5-85", label, 8, 8, 1, "-", 4, "lut" if lut else "dsp", res, 64),
              flush=True)
    print(f"(work directory: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
