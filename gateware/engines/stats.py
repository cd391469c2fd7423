"""READ_STATS: online range statistics of the stored GEMM outputs and of QUANTIZE inputs.

Two :class:`~hbfp_hw.gateware.range_tracker.RangeTracker` units watch the sample streams
the other engines give (``gemm_sample``: every FP32 output a GEMM stores; ``quant_sample``:
every FP32 tensor element QUANTIZE reads from ``fp_in``, not the block padding). READ_STATS
answers count, non-finite count, min and max of one of them (flag ``QUANTIZE_INPUT``
selects), and with ``CLEAR`` clears that one; ``soft_reset`` (RESET) clears both.
"""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In

from hbfp_hw import protocol as P

from ..engine import EngineStatus, engine_signature, sample_signature, status_error, status_ok
from ..range_tracker import RangeTracker

__all__ = ["StatsEngine"]


class StatsEngine(wiring.Component):
    """Engine for READ_STATS, holding the two range trackers."""

    def __init__(self, specs, *, tile: int, rom_depth: int) -> None:
        super().__init__(engine_signature(
            specs, tile, rom_depth, gemm_sample=In(sample_signature()),
            quant_sample=In(sample_signature()), soft_reset=In(1)))

    def elaborate(self, platform):
        m = Module()
        m.submodules.stats = stats = RangeTracker(width=32, lanes=1, fp32=True, count_bits=32)
        m.submodules.qstats = qstats = RangeTracker(width=32, lanes=1, fp32=True,
                                                    count_bits=32)
        for tr, src in ((stats, self.gemm_sample), (qstats, self.quant_sample)):
            m.d.comb += [tr.i.valid.eq(src.valid), tr.i.payload[0].eq(src.payload),
                         tr.o.ready.eq(1)]
        # the clears are registered: the command decode then ends in two flops instead
        # of in the trackers' counters; no sample arrives while READ_STATS or RESET runs
        st_clear, qst_clear = Signal(), Signal()
        st_clear_r, qst_clear_r = Signal(), Signal()
        m.d.sync += [st_clear_r.eq(st_clear | self.soft_reset),
                     qst_clear_r.eq(qst_clear | self.soft_reset)]
        m.d.comb += [stats.clear.eq(st_clear_r), qstats.clear.eq(qst_clear_r)]

        fin = EngineStatus(m, self)
        pay = fin.pay
        fl = self.cmd.payload.args.read_stats.flags
        s_q = (fl & int(P.StatsFlag.QUANTIZE_INPUT)).any()
        s_clr = (fl & int(P.StatsFlag.CLEAR)).any()
        with m.FSM(name="stats"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    with m.If((fl & (0xFF & ~P.flag_mask(P.StatsFlag))) != 0):
                        m.d.sync += status_error(pay, P.ErrorCode.BAD_ARGUMENT, 0)
                    with m.Else():
                        m.d.sync += status_ok(
                            m, pay, nfix=P.RESPONSES[P.Op.READ_STATS].header_size,
                            fix=Mux(s_q, Cat(qstats.count, qstats.n_nonfinite, qstats.min,
                                             qstats.max),
                                    Cat(stats.count, stats.n_nonfinite, stats.min,
                                        stats.max)))
                        m.d.comb += [st_clear.eq(s_clr & ~s_q), qst_clear.eq(s_clr & s_q)]
                    m.d.sync += fin.valid.eq(1)
                    m.next = "DONE"
            fin.done_state()
        return m
