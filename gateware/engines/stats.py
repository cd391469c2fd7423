"""READ_STATS: online range statistics of the stored GEMM outputs, of QUANTIZE inputs and
of the integer GEMM sums.

Three :class:`~hbfp_hw.gateware.range_tracker.RangeTracker` units watch the sample
streams the other engines give (``gemm_sample``: every FP32 output a GEMM stores;
``quant_sample``: every FP32 tensor element QUANTIZE reads from ``fp_in``, not the block
padding; ``int_sample``: every int32 word a BITLAYER command with ``TRACK`` writes into
``bl.y``). READ_STATS answers count, non-finite count, min and max of one of them (flag
``QUANTIZE_INPUT`` or ``INT_OUTPUT`` selects; both: BAD_ARGUMENT 0), and with ``CLEAR``
clears that one; ``soft_reset`` (RESET) clears all three. The FP32 trackers answer
binary32 bit patterns, the integer one int32 words.
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
    """Engine for READ_STATS, holding the two range trackers.

    ``built=False`` (``AcceleratorConfig.stats`` 0) builds no trackers: READ_STATS
    answers UNSUPPORTED (detail 0) and the sample ports are ignored.
    """

    def __init__(self, specs, *, tile: int, rom_depth: int, built: bool = True) -> None:
        self.built = bool(built)
        super().__init__(engine_signature(
            specs, tile, rom_depth, gemm_sample=In(sample_signature()),
            quant_sample=In(sample_signature()), int_sample=In(sample_signature()),
            soft_reset=In(1)))

    def elaborate(self, platform):
        m = Module()
        if not self.built:
            return EngineStatus(m, self).unsupported_only("stats")
        m.submodules.stats = stats = RangeTracker(width=32, lanes=1, fp32=True, count_bits=32)
        m.submodules.qstats = qstats = RangeTracker(width=32, lanes=1, fp32=True,
                                                    count_bits=32)
        m.submodules.istats = istats = RangeTracker(width=32, lanes=1, fp32=False,
                                                    count_bits=32)
        for tr, src in ((stats, self.gemm_sample), (qstats, self.quant_sample),
                        (istats, self.int_sample)):
            m.d.comb += [tr.i.valid.eq(src.valid), tr.i.payload[0].eq(src.payload),
                         tr.o.ready.eq(1)]
        # the clears are registered: the command decode then ends in flops instead of
        # in the trackers' counters; no sample arrives while READ_STATS or RESET runs
        st_clear, qst_clear, ist_clear = Signal(), Signal(), Signal()
        st_clear_r, qst_clear_r, ist_clear_r = Signal(), Signal(), Signal()
        m.d.sync += [st_clear_r.eq(st_clear | self.soft_reset),
                     qst_clear_r.eq(qst_clear | self.soft_reset),
                     ist_clear_r.eq(ist_clear | self.soft_reset)]
        m.d.comb += [stats.clear.eq(st_clear_r), qstats.clear.eq(qst_clear_r),
                     istats.clear.eq(ist_clear_r)]

        fin = EngineStatus(m, self)
        pay = fin.pay
        fl = self.cmd.payload.args.read_stats.flags
        s_q = (fl & int(P.StatsFlag.QUANTIZE_INPUT)).any()
        s_i = (fl & int(P.StatsFlag.INT_OUTPUT)).any()
        s_clr = (fl & int(P.StatsFlag.CLEAR)).any()

        def answer(tr):
            return Cat(tr.count, tr.n_nonfinite, tr.min, tr.max)
        with m.FSM(name="stats"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    with m.If(((fl & (0xFF & ~P.flag_mask(P.StatsFlag))) != 0)
                              | (s_q & s_i)):
                        m.d.sync += status_error(pay, P.ErrorCode.BAD_ARGUMENT, 0)
                    with m.Else():
                        m.d.sync += status_ok(
                            m, pay, nfix=P.RESPONSES[P.Op.READ_STATS].header_size,
                            fix=Mux(s_q, answer(qstats),
                                    Mux(s_i, answer(istats), answer(stats))))
                        m.d.comb += [st_clear.eq(s_clr & ~s_q & ~s_i),
                                     qst_clear.eq(s_clr & s_q), ist_clear.eq(s_clr & s_i)]
                    m.d.sync += fin.valid.eq(1)
                    m.next = "DONE"
            fin.done_state()
        return m
