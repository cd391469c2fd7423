"""Fixed-point accumulator -> IEEE-754 binary32, exactly as :func:`hbfp_hw.bfp_matmul`.

``v = acc * 2**scale``; ``|v| < 2**-126`` (including ``acc == 0``) gives ``+0.0``;
otherwise the magnitude is rounded to a 24-bit significand, nearest-even, and becomes
``+-Inf`` if it reaches ``2**128``; ``nan`` gives the quiet NaN ``0x7FC00000``.
Six pipeline stages (no stall: the caller reserves output space before issuing), each
with a few LUT levels or one carry chain:

1. sign and magnitude;
2. leading-one detection per 8-bit group of the magnitude: which groups are non-zero,
   the first of them (the coarse shift ``8 * k``) and each group's own leading zeros;
3. coarse normalisation ``<< 8 * k``, the fine shift ``f`` = the leading zeros of group
   ``k``, the exponent before the fine shift;
4. fine normalisation ``<< f`` (leading one at the top), the exponent;
5. rounding decision (guard, sticky, last bit), early flush, and the exponent's
   comparisons and biased fields for both outcomes of the rounding carry;
6. the 24-bit rounding increment, the result selected by its carry, packed.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .fp32 import FP32_EXP_BIAS, FP32_EXP_BITS, FP32_EXP_SPECIAL, FP32_FRAC_BITS

__all__ = ["Fp32Convert", "FP32_NAN"]

FP32_NAN = 0x7FC00000
SCALE_BITS = 16


class Fp32Convert(wiring.Component):
    """Pipelined ``acc * 2**scale -> float32`` (latency :attr:`LATENCY`).

    Parameters
    ----------
    acc_bits : int
        Signed width of ``acc`` (2..64).
    flush_after_round : bool
        ``False`` (default, :func:`hbfp_hw.gemm.acc_to_fp32`): values below ``2**-126``
        before rounding give ``+0.0``. ``True`` (:func:`hbfp_hw.mls.round_to_fp32`): the
        24-bit rounding comes first, results below ``2**-126`` after it flush to a zero
        with the sign of ``acc``.
    """

    LATENCY = 6

    def __init__(self, *, acc_bits: int, flush_after_round: bool = False):
        if not isinstance(acc_bits, int) or not 2 <= acc_bits <= 64:
            raise ValueError(f"acc_bits={acc_bits!r} is out of range; accepted range is [2, 64]")
        self.acc_bits = acc_bits
        self.flush_after_round = bool(flush_after_round)
        super().__init__({
            "i_valid": In(1), "acc": In(signed(acc_bits)), "scale": In(signed(SCALE_BITS)),
            "nan": In(1),
            "o_valid": Out(1), "bits": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.acc_bits
        EB = SCALE_BITS + 2                  # signed width of the exponents below
        # stage 1: sign / magnitude
        v1, s1, mag1 = Signal(), Signal(), Signal(W)
        sc1, nan1 = Signal(signed(SCALE_BITS)), Signal()
        m.d.sync += [v1.eq(self.i_valid), s1.eq(self.acc[-1]),
                     mag1.eq(Mux(self.acc[-1], -self.acc, self.acc)[:W]),
                     sc1.eq(self.scale), nan1.eq(self.nan)]
        # the magnitude at the top of WP = 8 * NG bits, in groups of B = 8 from the top
        B = 8
        NG = -(-W // B)
        WP = NG * B
        p1 = Cat(Const(0, WP - W), mag1)

        def group(x, g):                     # group g (0: the most significant)
            return x[WP - B * (g + 1): WP - B * g]

        # stage 2: leading-one detection per group, the first non-zero group k
        k1 = Signal(range(NG))
        for g in reversed(range(NG)):        # the last assignment wins: the first group
            with m.If(group(p1, g).any()):
                m.d.comb += k1.eq(g)
        v2, s2, nan2, zero2 = Signal(), Signal(), Signal(), Signal()
        p2, k2 = Signal(WP), Signal(range(NG))
        sc2 = Signal(signed(SCALE_BITS))
        loc2 = [Signal(range(B), name=f"loc2_{g}") for g in range(NG)]
        for g in range(NG):
            lz = Signal(range(B), name=f"lz_{g}")    # leading zeros of the group
            for j in range(B):
                with m.If(group(p1, g)[j]):
                    m.d.comb += lz.eq(B - 1 - j)
            m.d.sync += loc2[g].eq(lz)
        m.d.sync += [v2.eq(v1), s2.eq(s1), nan2.eq(nan1), zero2.eq(mag1 == 0), p2.eq(p1),
                     k2.eq(k1), sc2.eq(sc1)]
        # stage 3: coarse shift << 8k, fine shift f = leading zeros of group k
        v3, s3, nan3, zero3 = Signal(), Signal(), Signal(), Signal()
        q3, f3 = Signal(WP), Signal(range(B))
        ea3 = Signal(signed(EB))             # scale + W - 1 - 8k
        with m.Switch(k2):
            for g in range(NG):
                with m.Case(g):
                    m.d.sync += [q3.eq((p2 << (B * g))[:WP]), f3.eq(loc2[g])]
        m.d.sync += [v3.eq(v2), s3.eq(s2), nan3.eq(nan2), zero3.eq(zero2),
                     ea3.eq(sc2 + (W - 1) - (k2 << (B.bit_length() - 1)))]
        # stage 4: fine shift: the leading one at bit WP - 1; e = scale + its position
        v4, s4, nan4, zero4 = Signal(), Signal(), Signal(), Signal()
        norm4 = Signal(WP)
        e4 = Signal(signed(EB))
        m.d.sync += [v4.eq(v3), s4.eq(s3), nan4.eq(nan3), zero4.eq(zero3),
                     norm4.eq((q3 << f3)[:WP]), e4.eq(ea3 - f3)]
        # stage 5: round to 24 bits (RNE): the decision; the exponent's tests and
        # biased fields for both values of the rounding carry c (e + c)
        wn = max(WP, 26)
        n = Signal(wn)
        m.d.comb += n.eq(norm4 << (wn - WP))
        sig = n[wn - 24:]
        guard = n[wn - 25]
        sticky = n[:wn - 25].any()
        v5, s5, nan5, flush5, up5, ones5 = (Signal(name=x) for x in
                                            ("v5", "s5", "nan5", "flush5", "up5", "ones5"))
        sig5 = Signal(24)
        ovf0, ovf1 = Signal(), Signal()      # e + c >= 128 with c = 0 / c = 1
        unf0, unf1 = Signal(), Signal()      # e + c < -126 (flush_after_round)
        eb0, eb1 = Signal(FP32_EXP_BITS), Signal(FP32_EXP_BITS)
        emax = FP32_EXP_SPECIAL - FP32_EXP_BIAS                 # 128
        early = zero4 if self.flush_after_round else (zero4 | (e4 < -126))
        m.d.sync += [v5.eq(v4), s5.eq(s4), nan5.eq(nan4), flush5.eq(early),
                     sig5.eq(sig), up5.eq(guard & (sticky | sig[0])), ones5.eq(sig.all()),
                     ovf0.eq(e4 >= emax), ovf1.eq(e4 >= emax - 1),
                     unf0.eq(e4 < -126), unf1.eq(e4 < -127),
                     eb0.eq((e4 + FP32_EXP_BIAS)[:FP32_EXP_BITS]),
                     eb1.eq((e4 + FP32_EXP_BIAS + 1)[:FP32_EXP_BITS])]
        # stage 6: increment, carry into the exponent, overflow, pack
        rnd = Signal(25)
        m.d.comb += rnd.eq(sig5 + up5)
        c = up5 & ones5                      # rnd == 2**24: the fraction bits are 0
        frac = rnd[:FP32_FRAC_BITS]
        bits = Signal(32)
        with m.If(nan5):
            m.d.comb += bits.eq(FP32_NAN)
        with m.Elif(flush5):
            m.d.comb += bits.eq(0)
        if self.flush_after_round:
            with m.Elif(Mux(c, unf1, unf0)):
                m.d.comb += bits.eq(Cat(Const(0, 31), s5))
        with m.Elif(Mux(c, ovf1, ovf0)):     # 2**128 and above
            m.d.comb += bits.eq(Cat(Const(0, FP32_FRAC_BITS),
                                    Const(FP32_EXP_SPECIAL, FP32_EXP_BITS), s5))
        with m.Else():
            m.d.comb += bits.eq(Cat(frac, Mux(c, eb1, eb0), s5))
        m.d.sync += [self.o_valid.eq(v5), self.bits.eq(bits)]
        return m
