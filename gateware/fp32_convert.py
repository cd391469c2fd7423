"""Fixed-point accumulator -> IEEE-754 binary32, exactly as :func:`hbfp_hw.bfp_matmul`.

``v = acc * 2**scale``; ``|v| < 2**-126`` (including ``acc == 0``) gives ``+0.0``;
otherwise the magnitude is rounded to a 24-bit significand, nearest-even, and becomes
``+-Inf`` if it reaches ``2**128``; ``nan`` gives the quiet NaN ``0x7FC00000``.
Five pipeline stages (no stall: the caller reserves output space before issuing).
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

    LATENCY = 5

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
        # stage 1: sign / magnitude
        v1, s1, mag1 = Signal(), Signal(), Signal(W)
        sc1, nan1 = Signal(signed(SCALE_BITS)), Signal()
        m.d.sync += [v1.eq(self.i_valid), s1.eq(self.acc[-1]),
                     mag1.eq(Mux(self.acc[-1], -self.acc, self.acc)[:W]),
                     sc1.eq(self.scale), nan1.eq(self.nan)]
        # stage 2a: leading-one position
        pos = Signal(range(W))
        lz = Signal(range(W))          # W - 1 - pos
        for i in range(W):
            with m.If(mag1[i]):
                m.d.comb += [pos.eq(i), lz.eq(W - 1 - i)]
        va, sa, nana, zeroa = Signal(), Signal(), Signal(), Signal()
        maga, lza = Signal(W), Signal(range(W))
        ea = Signal(signed(SCALE_BITS + 1))
        m.d.sync += [va.eq(v1), sa.eq(s1), nana.eq(nan1), zeroa.eq(mag1 == 0), maga.eq(mag1),
                     lza.eq(lz), ea.eq(sc1 + pos)]
        # stage 2b: normalise so the leading one is bit W-1
        v2, s2, nan2, zero2 = Signal(), Signal(), Signal(), Signal()
        norm2 = Signal(W)
        e2 = Signal(signed(SCALE_BITS + 1))
        m.d.sync += [v2.eq(va), s2.eq(sa), nan2.eq(nana), zero2.eq(zeroa),
                     norm2.eq((maga << lza)[:W]), e2.eq(ea)]
        # stage 3: round to 24 bits (RNE)
        wn = max(W, 26)
        n = Signal(wn)
        m.d.comb += n.eq(norm2 << (wn - W))
        sig = n[wn - 24:]
        guard = n[wn - 25]
        sticky = n[:wn - 25].any()
        up = guard & (sticky | sig[0])
        v3, s3, nan3, flush3 = Signal(), Signal(), Signal(), Signal()
        sig3 = Signal(25)
        e3 = Signal(signed(SCALE_BITS + 1))
        early = zero2 if self.flush_after_round else (zero2 | (e2 < -126))
        m.d.sync += [v3.eq(v2), s3.eq(s2), nan3.eq(nan2), flush3.eq(early),
                     sig3.eq(sig + up), e3.eq(e2)]
        # stage 4: carry into the exponent, overflow, pack
        e_r = Signal(signed(SCALE_BITS + 2))
        m.d.comb += e_r.eq(e3 + sig3[24])
        frac = Mux(sig3[24], 0, sig3[:23])
        bits = Signal(32)
        with m.If(nan3):
            m.d.comb += bits.eq(FP32_NAN)
        with m.Elif(flush3):
            m.d.comb += bits.eq(0)
        if self.flush_after_round:
            with m.Elif(e_r < -126):
                m.d.comb += bits.eq(Cat(Const(0, 31), s3))
        with m.Elif(e_r >= FP32_EXP_SPECIAL - FP32_EXP_BIAS):   # 2**128 and above
            m.d.comb += bits.eq(Cat(Const(0, FP32_FRAC_BITS),
                                    Const(FP32_EXP_SPECIAL, FP32_EXP_BITS), s3))
        with m.Else():
            m.d.comb += bits.eq(Cat(frac, (e_r + FP32_EXP_BIAS)[:FP32_EXP_BITS], s3))
        m.d.sync += [self.o_valid.eq(v3), self.bits.eq(bits)]
        return m
