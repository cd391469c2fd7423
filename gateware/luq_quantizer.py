"""Streaming FP32 -> LUQ code quantizer (logarithmic unbiased gradients).

Bit-exact with :func:`hbfp_hw.luq.luq_quantize` for one SMP sample: ``lanes`` FP32
values per beat in, ``lanes`` ``bits``-bit codes per beat out, one beat per cycle. The
scale ``alpha`` is an input (FP32 bits, held while a stream runs): the host computes it
from ``max|x|`` (per-tensor, a first pass) or from the previous step's maximum
(in-hindsight), which this unit measures itself on ``amax`` while it quantizes.

Per element (``x = M_g 2**(e_g)``, ``alpha = M_a 2**(e_a)``, 24-bit significands)::

    k  = (e_g - e_a) - [M_g < M_a]                = floor(log2(|x| / alpha))
    k < 0            underflow:  lo = 0,            j = 0, b = 0
    0 <= k < top     binade:     lo = alpha 2**k,   j = k, b = 1
    k >= top         saturate to the top code (no draw)
    up  <=>  M_g 2**(r + d)  >  (b 2**r + u) * M_a,   d = e_g - e_a - j

(for ``d < 0`` the right side is shifted left by ``-d`` instead). ``b 2**r + u`` is a
concatenation, so the only arithmetic is one ``(r+1) x 24``-bit multiply, a shift and a
comparison per lane. Zero and subnormal inputs, and ``alpha`` with a zero exponent
field, give code 0.

Pipeline (advances when the output register is empty or taken, so back-pressure stalls
it without loss): S1 input register; S2 decode and the multiply (the lane's random bits
``u`` are consumed here); S3 the comparison and the code, into the output register.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw.luq import LUQFormat

from .fp32 import FP32_EXP_SPECIAL
from .prng import XorshiftLanes

__all__ = ["LuqQuantizer", "luq_code_layout", "generate"]


def luq_code_layout(lanes: int, bits: int) -> data.ArrayLayout:
    """Output payload: ``lanes`` codes (``sign << (bits-1) | c``), lane 0 lowest."""
    return data.ArrayLayout(bits, lanes)


class LuqQuantizer(wiring.Component):
    """Streaming FP32 -> LUQ codes.

    Parameters
    ----------
    fmt : LUQFormat
        ``bits``, ``sr_bits``, ``lanes`` (and ``seed``, the sequence after reset) are
        used; ``samples > 1`` is run as that many streams with the sample seeds.

    Ports
    -----
    i : In(stream(ArrayLayout(32, lanes)))   FP32 bit patterns
    o : Out(stream(ArrayLayout(bits, lanes))) codes, one beat per input beat
    alpha : In(32)    FP32 bits of the scale: 0 or a positive normal value
    seed, reseed : In(32), In(1)   restart the generators (and clear ``amax`` and
                      ``invalid``) while ``reseed`` is high; only while idle
    amax : Out(32)    bits of the largest ``|x|`` accepted since the last reseed
                      (subnormals count as 0): the next step's in-hindsight maximum
    invalid : Out(1)  a NaN or Inf was accepted since the last reseed (the stream's
                      codes are then not meaningful: the golden model flags the tensor)
    """

    def __init__(self, fmt: LUQFormat):
        if not isinstance(fmt, LUQFormat):
            raise TypeError(f"fmt must be a LUQFormat, got {type(fmt).__name__}")
        self.fmt = fmt
        self.lanes = fmt.lanes
        #: cycles from an accepted beat to its output beat (no stalls)
        self.latency = 3
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(32, fmt.lanes))),
            "o": Out(stream.Signature(luq_code_layout(fmt.lanes, fmt.bits))),
            "alpha": In(32),
            "seed": In(32, init=fmt.seed),
            "reseed": In(1),
            "amax": Out(32),
            "invalid": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        fmt, L = self.fmt, self.lanes
        r, top, sb = fmt.sr_bits, fmt.max_shift, fmt.sign_bit
        nd_max = 24 + r                  # beyond this left shift the right side wins

        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        accept = self.i.valid & adv

        m.submodules.prng = prng = XorshiftLanes(lanes=L, bits=r, reset_seed=fmt.seed)

        # alpha decode (static during a stream)
        a_exp = self.alpha[23:31]
        a_man = Cat(self.alpha[:23], Const(1, 1))
        a_zero = a_exp == 0

        # S1: input register
        x1 = Signal(data.ArrayLayout(32, L))
        v1 = Signal()
        with m.If(adv):
            m.d.sync += [x1.eq(self.i.payload), v1.eq(self.i.valid)]
        m.d.comb += [prng.seed.eq(self.seed), prng.reseed.eq(self.reseed),
                     prng.step.eq(adv & v1)]

        # running max of |x| and the NaN/Inf flag
        absv = []
        bad = []
        for lane in range(L):
            w = self.i.payload[lane]
            ex = w[23:31]
            absv.append(Mux(ex == 0, 0, w[:31]))
            bad.append(ex == FP32_EXP_SPECIAL)
        mx = absv[0]
        for a in absv[1:]:
            mx = Mux(a > mx, a, mx)
        with m.If(self.reseed):
            m.d.sync += [self.amax.eq(0), self.invalid.eq(0)]
        with m.Elif(accept):
            with m.If(~Cat(*bad).any() & (mx > self.amax)):
                m.d.sync += self.amax.eq(mx)
            with m.If(Cat(*bad).any()):
                m.d.sync += self.invalid.eq(1)

        # S2: decode + multiply; S3: compare + code
        v2 = Signal()
        with m.If(adv):
            m.d.sync += v2.eq(v1)
        with m.If(adv):
            m.d.sync += self.o.valid.eq(v2)
        for lane in range(L):
            x = x1[lane]
            eg = x[23:31]
            mg = Cat(x[:23], Const(1, 1))
            sign = x[31]
            diff = Signal(signed(10), name=f"diff{lane}")     # e_g - e_a
            m.d.comb += diff.eq(eg - a_exp)
            k = Signal(signed(10), name=f"k{lane}")
            m.d.comb += k.eq(diff - (mg < a_man))
            under = k < 0
            sat = k >= top
            j = Mux(under, 0, k[:4])
            d = Signal(signed(10), name=f"d{lane}")
            m.d.comb += d.eq(diff - j)
            u = prng.u[lane * r:(lane + 1) * r]
            wmul = Cat(u, ~under) * a_man                     # (b 2**r + u) * M_a
            # registers of S2
            s_zero = Signal(name=f"s_zero{lane}")
            s_sat = Signal(name=f"s_sat{lane}")
            s_under = Signal(name=f"s_under{lane}")
            s_sign = Signal(name=f"s_sign{lane}")
            s_k = Signal(range(top + 1), name=f"s_k{lane}")
            s_dpos = Signal(name=f"s_dpos{lane}")
            s_nd = Signal(range(nd_max + 1), name=f"s_nd{lane}")
            s_mg = Signal(24, name=f"s_mg{lane}")
            s_w = Signal(r + 25, name=f"s_w{lane}")
            with m.If(adv):
                m.d.sync += [
                    s_zero.eq((eg == 0) | (eg == FP32_EXP_SPECIAL) | a_zero),
                    s_sat.eq(sat), s_under.eq(under), s_sign.eq(sign),
                    s_k.eq(Mux(under | sat, 0, k[:len(s_k)])),
                    s_dpos.eq(d > 0),
                    s_nd.eq(Mux(d >= 0, 0, Mux(-d > nd_max, nd_max, (-d)[:len(s_nd)]))),
                    s_mg.eq(mg), s_w.eq(wmul)]
            lhs = Signal(24 + r + 1, name=f"lhs{lane}")
            m.d.comb += lhs.eq(Mux(s_dpos, s_mg << (r + 1), s_mg << r))
            rhs = Signal(r + 25 + nd_max, name=f"rhs{lane}")
            m.d.comb += rhs.eq(s_w << s_nd)
            up = lhs > rhs
            mag = Signal(fmt.bits - 1, name=f"mag{lane}")
            m.d.comb += mag.eq(Mux(s_zero, 0,
                                   Mux(s_sat, top + 1,
                                       Mux(s_under, up, s_k + 1 + up))))
            code = Cat(mag, s_sign & (mag != 0))
            with m.If(adv):
                m.d.sync += self.o.payload[lane].eq(code)
            assert sb == len(mag)
        return m


def generate(fmt: LUQFormat, out_dir, *, name: str = "luq_quantizer"):
    """Write ``<name>.v`` and its manifest (kind ``luq_quantizer``)."""
    from pathlib import Path

    from amaranth.back import verilog

    from hbfp_hw.manifest import check_verilog_identifier, write_manifest
    check_verilog_identifier(name, "name")
    q = LuqQuantizer(fmt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vpath = out / f"{name}.v"
    vpath.write_text(verilog.convert(q, name=name, emit_src=False))
    mpath = write_manifest(out / f"{name}.json", kind="luq_quantizer", top=name,
                           config=fmt.to_dict(), ports={}, verilog=vpath,
                           latency_cycles=q.latency)
    return vpath, mpath
