"""Synthesis row of the LUQ shift-add PE against the multiplier PE (ECP5-85F, out of context).

One PE with ``lanes`` MACs per cycle each, the same operand widths and K block:

* ``shift``: :class:`hbfp_hw.gateware.luq_shift_pe.LuqShiftPE` — a 4-bit LUQ code
  (sign + 3-bit shift) times a ``man``-bit BFP mantissa: each product is the mantissa
  shifted by 0..6 and negated (no multiplier);
* ``mult lut`` / ``mult dsp``: one :class:`hbfp_hw.gateware.pe.PE` of the MAC array
  (configured with ``rows = cols = tile``, so it has one accumulator, like the shift
  PE) with 4-bit x ``man``-bit integer mantissas, multipliers as LUT shift-add partial
  products or ECP5 MULT18X18D.

Both have the same pipeline after the products (lane adder tree, block sum, alignment
shift, accumulator); the shift PE also carries its stream handshake. Prints LUTs, FFs,
DSPs, Fmax and LUTs / DSPs per MAC.

* ``quantizer``: :class:`hbfp_hw.gateware.luq_quantizer.LuqQuantizer` (``luq4``,
  ``lanes`` FP32 values per beat, 16 random bits): one row (``a`` = fp32, ``b`` = the
  random bits), ``LUT/MAC`` and ``DSP/MAC`` are then per lane (per element per clock).

Run: ``.venv/bin/python benchmarks/bench_luq_synth.py [--lanes 8] [--man 4 8]
[--designs shift mult-lut mult-dsp quantizer]`` (one place-and-route per design point,
about a minute each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from amaranth.back import verilog

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.luq_quantizer import LuqQuantizer
from hbfp_hw.gateware.luq_shift_pe import LuqShiftPE
from hbfp_hw.gateware.pe import PE
from hbfp_hw.gateware.synth import SynthError, synth_ecp5
from hbfp_hw.luq import LUQ4

HEADER = (f"{'design':10} {'a':>6} {'b':>3} {'lanes':>5} {'tile':>4} {'LUT':>5} {'FF':>5} "
          f"{'DSP':>4} {'Fmax':>6} {'LUT/MAC':>7} {'DSP/MAC':>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=8)
    ap.add_argument("--tile", type=int, default=16)
    ap.add_argument("--man", type=int, nargs="+", default=[4, 8],
                    help="BFP mantissa widths of the other operand")
    ap.add_argument("--freq", type=float, default=125.0)
    ap.add_argument("--designs", nargs="+",
                    default=["shift", "mult-lut", "mult-dsp", "quantizer"],
                    choices=["shift", "mult-lut", "mult-dsp", "quantizer"],
                    help="design points to run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_luq_"))
    print(HEADER, flush=True)
    for man in a.man:
        designs = [("shift", "luq4", lambda: LuqShiftPE(LUQ4, man_bits=man, lanes=a.lanes,
                                                        cols=1, tile=a.tile, k_max=1024))]
        for mapping in ("lut", "dsp"):
            # rows = cols = tile: one accumulator per PE (windows = 1), as the shift PE
            cfg = MacArrayConfig(rows=a.tile, cols=a.tile, lanes=a.lanes, tile=a.tile,
                                 man_bits_a=4, man_bits_b=man, k_max=1024, mapping=mapping)
            designs.append((f"mult {mapping}", "int4",
                            lambda cfg=cfg: PE(cfg, primitives="ecp5")))
        for label, aname, make in designs:
            if label.replace(" ", "-") not in a.designs:
                continue
            dut = make()
            d = out / f"{label.replace(' ', '_')}_{man}"
            d.mkdir(parents=True, exist_ok=True)
            v = d / "top.v"
            v.write_text(verilog.convert(dut, name="top", emit_src=False))
            try:
                r = synth_ecp5(v, "top", workdir=d / "ecp5", freq_mhz=a.freq)
            except SynthError as e:
                print(f"{label:10} failed: {str(e).splitlines()[0]}", flush=True)
                continue
            print(f"{label:10} {aname:>6} {man:>3} {a.lanes:>5} {a.tile:>4} {r.core_luts:>5} "
                  f"{r.core_ffs:>5} {r.dsps:>4} {r.fmax_mhz:6.1f} {r.core_luts / a.lanes:7.1f} "
                  f"{r.dsps / a.lanes:7.2f}", flush=True)
    if "quantizer" in a.designs:
        fmt = LUQ4.replace(lanes=a.lanes)
        d = out / "quantizer"
        d.mkdir(parents=True, exist_ok=True)
        v = d / "top.v"
        v.write_text(verilog.convert(LuqQuantizer(fmt), name="top", emit_src=False))
        try:
            r = synth_ecp5(v, "top", workdir=d / "ecp5", freq_mhz=a.freq)
            print(f"{'quantizer':10} {'fp32':>6} {fmt.sr_bits:>3} {a.lanes:>5} {'-':>4} "
                  f"{r.core_luts:>5} {r.core_ffs:>5} {r.dsps:>4} {r.fmax_mhz:6.1f} "
                  f"{r.core_luts / a.lanes:7.1f} {r.dsps / a.lanes:7.2f}", flush=True)
        except SynthError as e:
            print(f"{'quantizer':10} failed: {str(e).splitlines()[0]}", flush=True)
    print(f"(work directory: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
