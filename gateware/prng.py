"""Stochastic-rounding random bits in gateware: one xorshift32 per lane.

Implements exactly the generator of :mod:`hbfp_hw.prng` (the golden model's): lane
``l`` starts from ``lane_seed(seed, l)``, steps once per element it serves, and each
element uses the top ``bits`` bits of the state *after* the step.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw.prng import LANE_SEED_MULT, ZERO_SEED_REPLACEMENT, lane_seed, xorshift32

__all__ = ["xorshift32_step", "XorshiftLanes"]

MASK32 = 0xFFFFFFFF


def xorshift32_step(s):
    """One xorshift32 step on a 32-bit Amaranth value (pure wiring: XORs only)."""
    s = (s ^ (s << 13))[:32]
    s = s ^ (s >> 17)
    s = (s ^ (s << 5))[:32]
    return s


class XorshiftLanes(wiring.Component):
    """``lanes`` parallel xorshift32 generators with a run-time seed.

    The register of each lane always holds the state the *next* element will use
    (``s_{t+1}``), so the random bits come straight from flip-flops.

    Ports
    -----
    seed : In(32)
        Seed value, loaded into every lane while ``reseed`` is high.
    reseed : In(1)
        Restart all lanes from ``seed`` (takes priority over ``step``).
    step : In(1)
        Consume one element per lane: every lane advances by one step.
    u : Out(bits * lanes)
        Lane ``l``'s ``bits`` random bits at ``u[l*bits:(l+1)*bits]``.

    After reset the lanes hold the sequence of ``reset_seed``.
    """

    def __init__(self, *, lanes: int, bits: int, reset_seed: int = 0):
        if not 1 <= lanes <= 256:
            raise ValueError(f"lanes={lanes} is out of range; accepted range is [1, 256]")
        if not 1 <= bits <= 32:
            raise ValueError(f"bits={bits} is out of range; accepted range is [1, 32]")
        if not 0 <= reset_seed <= MASK32:
            raise ValueError(f"reset_seed={reset_seed} is out of range; accepted range is "
                             f"[0, {MASK32}]")
        self.lanes = lanes
        self.bits = bits
        self.reset_seed = reset_seed
        super().__init__({"seed": In(32), "reseed": In(1), "step": In(1),
                          "u": Out(bits * lanes)})

    def elaborate(self, platform):
        m = Module()
        for lane in range(self.lanes):
            init = xorshift32(lane_seed(self.reset_seed, lane))
            st = Signal(32, name=f"state{lane}", init=init)
            s0 = Signal(32, name=f"seed{lane}")
            m.d.comb += s0.eq(self.seed ^ Const(((lane + 1) * LANE_SEED_MULT) & MASK32, 32))
            s0nz = Mux(s0 == 0, Const(ZERO_SEED_REPLACEMENT, 32), s0)
            with m.If(self.reseed):
                m.d.sync += st.eq(xorshift32_step(s0nz))
            with m.Elif(self.step):
                m.d.sync += st.eq(xorshift32_step(st))
            m.d.comb += self.u[lane * self.bits:(lane + 1) * self.bits].eq(
                st[32 - self.bits:])
        return m
