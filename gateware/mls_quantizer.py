"""Streaming FP32 -> MLS quantizer unit (group shift + element codes).

:class:`MLSQuantizer` takes one group per beat: ``lanes`` IEEE-754 binary32 values (the
group length ``L`` of the format equals ``lanes``) and the tensor exponent ``t`` as a
static input ``texp`` (the tensor-level scale ``2**t`` is fixed per tensor, by a first
pass over the tensor or in hindsight; :func:`hbfp_hw.mls.MLSFormat.quantize_array` with
``tensor_exp=t`` is the golden model). It emits per beat the group shift ``g`` and the
``lanes`` element codes, exactly as the golden model.

Pipeline (whole pipeline advances on ``adv = ~o.valid | o.ready``; ``i.ready = adv``)::

    i ─► s1: input register ─► max exponent field over the lanes, g, per lane
         k = floor(log2 |x|) + g - t, shift, round (nearest even or stochastic),
         encode ─► s2: output register ─► o

Element rules (``docs/mls.md``): FP32 subnormals are zero; ``k >= 2**E - 1`` saturates
to the largest code; else the 24-bit significand is shifted right by
``rs = 23 - M - min(k, 0)`` (rounded) to ``n`` and encoded with exponent code
``max(k, 0) + 1`` (``k < 0``: ``n >> M``), a carry to ``2**(M+1)`` moving one binade up.
NaN/Inf inputs are not detected (they saturate); the golden model rejects them.

Stochastic rounding uses one :class:`XorshiftLanes` generator per lane (the golden
model's ``sr_lanes = lanes``), stepped once per beat, reseeded with ``reseed``.
"""

from __future__ import annotations

import json
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw.mls import MLSFormat

from .fp32 import FP32Layout
from .prng import XorshiftLanes

__all__ = ["MLSQuantizer", "mls_beat_layout", "generate", "TEXP_BITS"]

#: width of the signed tensor-exponent input
TEXP_BITS = 10


def mls_beat_layout(fmt: MLSFormat, lanes: int) -> data.StructLayout:
    """Output payload: the element codes of one group, lane 0 lowest, then ``g``."""
    return data.StructLayout({
        "codes": data.ArrayLayout(unsigned(fmt.element_bits), lanes),
        "g": unsigned(fmt.group_bits),
    })


def _max(values):
    while len(values) > 1:
        nxt = [Mux(values[i] > values[i + 1], values[i], values[i + 1])
               for i in range(0, len(values) - 1, 2)]
        if len(values) % 2:
            nxt.append(values[-1])
        values = nxt
    return values[0]


class MLSQuantizer(wiring.Component):
    """FP32 groups in, MLS group shift + element codes out.

    Parameters
    ----------
    fmt : MLSFormat — element and group widths (``group_size`` must equal ``lanes``)
    lanes : int — elements per beat = group length, in ``[1, 64]``
    stochastic : bool — build the stochastic-rounding path (run-time ``rounding`` input:
        0 nearest even, 1 stochastic); else nearest even only.

    Ports
    -----
    i : In(stream of ArrayLayout(FP32Layout, lanes))
    o : Out(stream of :func:`mls_beat_layout`)
    texp : In(signed(10)) — tensor exponent ``t`` (hold it stable during a tensor)
    rounding, seed, reseed : only with ``stochastic=True``
    """

    def __init__(self, fmt: MLSFormat, lanes: int, *, stochastic: bool = True):
        if not isinstance(fmt, MLSFormat):
            raise TypeError(f"fmt must be an MLSFormat, got {type(fmt).__name__}")
        if not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise ValueError(f"lanes={lanes!r} is out of range; accepted range is [1, 64]")
        if fmt.group_size != lanes:
            raise ValueError(f"the format's group_size={fmt.group_size} must equal lanes="
                             f"{lanes} (one group per beat)")
        self.fmt, self.lanes, self.stochastic = fmt, lanes, bool(stochastic)
        ports = {
            "i": In(stream.Signature(data.ArrayLayout(FP32Layout, lanes))),
            "o": Out(stream.Signature(mls_beat_layout(fmt, lanes))),
            "texp": In(signed(TEXP_BITS)),
        }
        if self.stochastic:
            ports.update(rounding=In(1), seed=In(32), reseed=In(1))
        super().__init__(ports)

    #: clocks from an accepted input beat to its output beat (no stalls)
    latency = 2

    def elaborate(self, platform):
        m = Module()
        fmt, L = self.fmt, self.lanes
        M, E = fmt.man_bits, fmt.exp_bits
        r = fmt.sr_bits
        top = fmt.top_exp
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]

        # s1: input register
        x1 = Signal(data.ArrayLayout(FP32Layout, L))
        v1 = Signal()
        with m.If(adv):
            m.d.sync += [x1.eq(self.i.payload), v1.eq(self.i.valid)]

        u_lanes = None
        if self.stochastic:
            m.submodules.prng = prng = XorshiftLanes(lanes=L, bits=r)
            m.d.comb += [prng.seed.eq(self.seed), prng.reseed.eq(self.reseed),
                         prng.step.eq(adv & v1 & self.rounding)]
            u_lanes = [prng.u[l * r:(l + 1) * r] for l in range(L)]

        # group shift g = clamp(T - G, 0, gmax), T = t + top, G = max exponent field - 127
        gf = _max([x1[l].exp for l in range(L)])
        T = Signal(signed(TEXP_BITS + 2))
        m.d.comb += T.eq(self.texp + top)
        gdiff = Signal(signed(TEXP_BITS + 4))
        m.d.comb += gdiff.eq(T - (gf - 127))
        g = Signal(unsigned(fmt.group_bits))
        with m.If(gf == 0):
            m.d.comb += g.eq(fmt.gmax)
        with m.Elif(gdiff < 0):
            m.d.comb += g.eq(0)
        with m.Elif(gdiff > fmt.gmax):
            m.d.comb += g.eq(fmt.gmax)
        with m.Else():
            m.d.comb += g.eq(gdiff)

        rs_max = 24 + r + 2
        codes = []
        for l in range(L):
            f = x1[l].exp
            nz = f != 0
            sig = Signal(24, name=f"sig{l}")
            m.d.comb += sig.eq(Const(1 << 23, 24) | x1[l].frac)
            k = Signal(signed(TEXP_BITS + 5), name=f"k{l}")
            m.d.comb += k.eq(f - 127 + g - self.texp)
            sat = k >= top + 1
            # right shift rs = 23 - M - min(k, 0), clamped (beyond: everything is 0)
            rs = Signal(range(rs_max + 1), name=f"rs{l}")
            with m.If(k >= 0):
                m.d.comb += rs.eq(23 - M)
            with m.Elif(k < -(rs_max - (23 - M))):
                m.d.comb += rs.eq(rs_max)
            with m.Else():
                m.d.comb += rs.eq(23 - M - k)
            # nearest even
            n0 = Signal(M + 2, name=f"n0_{l}")
            m.d.comb += n0.eq(sig >> rs)
            wide = 24 + rs_max
            rem = Signal(wide, name=f"rem{l}")
            m.d.comb += rem.eq(sig - (n0 << rs)[:wide])
            half = Signal(wide, name=f"half{l}")
            m.d.comb += half.eq((Const(1, wide + 1) << rs) >> 1)
            up = (rem > half) | ((rem == half) & n0[0])
            n = Signal(M + 2, name=f"n{l}")
            m.d.comb += n.eq(n0 + up)
            if self.stochastic:
                a = Signal(r + M + 2, name=f"a{l}")
                m.d.comb += a.eq((sig << r) >> rs)
                ns = Signal(M + 2, name=f"ns{l}")
                m.d.comb += ns.eq((a + u_lanes[l]) >> r)
                with m.If(self.rounding):
                    m.d.comb += n.eq(ns)
            # encode
            ec = Signal(E + 1, name=f"ec{l}")
            mm = Signal(max(M, 1), name=f"m{l}")
            code = Signal(fmt.element_bits, name=f"code{l}")
            mag = Signal(E + M, name=f"mag{l}")
            with m.If(k >= 0):
                with m.If(n[M + 1]):                       # carry: one binade up
                    m.d.comb += [ec.eq(k + 2), mm.eq(0)]
                with m.Else():
                    m.d.comb += [ec.eq(k + 1), mm.eq(n[:M] if M else 0)]
            with m.Else():
                m.d.comb += [ec.eq(n[M]), mm.eq(n[:M] if M else 0)]
            all_ones = (1 << (E + M)) - 1
            with m.If(~nz):
                m.d.comb += mag.eq(0)
            with m.Elif(sat | (ec > 2**E - 1)):
                m.d.comb += mag.eq(all_ones)
            with m.Else():
                m.d.comb += mag.eq(((ec[:E] << M) | mm[:M]) if M else ec[:E])
            m.d.comb += code.eq(mag | ((x1[l].sign & (mag != 0)) << (E + M)))
            codes.append(code)

        # s2: output register
        with m.If(adv):
            m.d.sync += self.o.valid.eq(v1)
            m.d.sync += self.o.payload.g.eq(g)
            for l in range(L):
                m.d.sync += self.o.payload.codes[l].eq(codes[l])
        return m


def generate(fmt: MLSFormat, lanes: int, out_dir, *, stochastic: bool = True,
             name: str = "mls_quantizer") -> tuple[Path, Path]:
    """Write ``<name>.v`` and ``<name>.json`` (configuration and payload layout)."""
    q = MLSQuantizer(fmt, lanes, stochastic=stochastic)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vpath = out / f"{name}.v"
    vpath.write_text(verilog.convert(q, name=name, emit_src=False))
    mpath = out / f"{name}.json"
    mpath.write_text(json.dumps({
        "kind": "mls_quantizer", "top": name, "verilog": vpath.name,
        "format": fmt.to_dict(), "lanes": lanes, "stochastic": bool(stochastic),
        "latency_cycles": MLSQuantizer.latency,
        "o_payload": {"codes": {"offset": 0, "element_width": fmt.element_bits},
                      "g": {"offset": lanes * fmt.element_bits, "width": fmt.group_bits}},
    }, indent=2))
    return vpath, mpath
