"""QUANTIZE: FP32 from ``fp_in`` through a format slot's quantizer into an operand buffer.

The request is checked field by field in the emulator's order (slot, rounding, dst,
flags, ``exp_code`` with ``STATIC_EXP``, empty shape, operand/exponent depth, ``fp_in``
range, RETURN size, then rounding modes this build lacks: ``UNSUPPORTED`` 7). An address
generator walks the tensor in block-stream order (blocks row-major over the grid,
elements row-major inside a block, padding read as +0.0) one FP32 word per clock; a
gatherer packs ``lanes`` words per beat into the slot's
:class:`~hbfp_hw.gateware.quantizer.Quantizer`; its output is serialised back to one
mantissa per clock into ``opN.man`` and, at each block's last element, the exponent
code into ``opN.exp``, counting invalid blocks. Every tensor element read (not the
padding) leaves on ``sample`` for the statistics engine.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from hbfp_hw import protocol as P
from hbfp_hw.formats import ROUNDING_MODES

from ..engine import EngineStatus, engine_signature, sample_signature, port_name, status_ok
from ..quantizer import Quantizer

__all__ = ["QuantizeEngine", "cmul", "in_range"]


def cmul(x, c: int):
    """``x * c`` for a constant ``c >= 0`` as a sum of shifts (no multiplier cell)."""
    terms = [x << i for i in range(c.bit_length()) if (c >> i) & 1]
    if not terms:
        return Const(0, 1)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def in_range(x, lo: int, hi: int):
    """``lo <= x <= hi`` for an unsigned ``x`` (no constant-true compare for lo = 0)."""
    return (x <= hi) if lo <= 0 else ((x >= lo) & (x <= hi))


def _cdiv(x, d: int):
    if d & (d - 1) == 0:
        return (x + d - 1) >> (d.bit_length() - 1)
    return (x + d - 1) // d


class QuantizeEngine(wiring.Component):
    """Engine for QUANTIZE.

    Parameters
    ----------
    config
        The :class:`~hbfp_hw.config.accelerator.AcceleratorConfig`.
    specs
        Its buffer map.
    quant
        One :class:`~hbfp_hw.config.quantizer.QuantizerConfig` per format slot.
    rounding
        Per slot, the rounding-mode indices its quantizer implements.
    rom_depth
        Bytes in the INFO ROM (port shapes only).

    With ``config.quantize`` 0 no quantizer is built: QUANTIZE answers UNSUPPORTED
    (detail 0) and nothing leaves on ``sample``.
    """

    def __init__(self, config, specs, *, quant, rounding, rom_depth: int) -> None:
        self.config, self.specs = config, list(specs)
        self.quant, self.rounding = list(quant), list(rounding)
        super().__init__(engine_signature(self.specs, config.tile, rom_depth,
                                          sample=Out(sample_signature())))

    def elaborate(self, platform):
        m = Module()
        cfg, specs, T = self.config, self.specs, self.config.tile
        if not cfg.quantize:    # no QUANTIZE engine: UNSUPPORTED, no samples
            return EngineStatus(m, self).unsupported_only("quantize")
        tsh = T.bit_length() - 1
        a = self.cmd.payload.args.quantize
        fin = EngineStatus(m, self)
        pay = fin.pay
        man_specs = sorted((s for s in specs if s.kind == P.BufferKind.MANTISSA),
                           key=lambda s: s.operand)
        exp_specs = sorted((s for s in specs if s.kind == P.BufferKind.EXPONENT),
                           key=lambda s: s.operand)
        mw, ew = 8 * man_specs[0].wire_bytes, 8 * exp_specs[0].wire_bytes
        fp_spec = next(s for s in specs if s.name == "fp_in")
        fp_r = getattr(self.bufs, f"{port_name(fp_spec)}_r")
        fp_depth = fp_spec.depth

        q_slot, q_rnd, q_seed = Signal(8), Signal(2), Signal(32)
        q_dst = Signal(8)
        q_rok = Signal()          # the rounding mode is built for the slot
        q_sen = Signal()          # STATIC_EXP: static shared exponent code q_scode
        q_scode = Signal(len(a.exp_code))
        q_cok = Signal()          # q_scode lies in the slot format's code range
        q_bh, q_bw = Signal(16), Signal(16)
        q_gr, q_gc = Signal(17), Signal(17)     # block grid
        q_nb, q_n = Signal(34), Signal(64)      # blocks, elements
        q_init, q_run = Signal(), Signal()
        q_r0, q_c0, q_r, q_c = (Signal(17, name=f"q_{n}") for n in ("r0", "c0", "r", "c"))
        n_r0, n_c0, n_r, n_c = (Signal(17, name=f"qn_{n}") for n in ("r0", "c0", "r", "c"))
        q_fdone = Signal()
        f_ready, f_valid, f_cap = Signal(), Signal(), Signal()
        f_data = Signal(32)
        q_rows, q_cols = a.rows, a.cols
        pad = Signal()
        m.d.comb += [pad.eq(((q_r0 + q_r) >= q_rows) | ((q_c0 + q_c) >= q_cols)),
                     f_valid.eq(q_run & ~q_fdone),
                     f_data.eq(Mux(pad, 0, fp_r.data)),
                     f_cap.eq(f_valid & f_ready),
                     n_r0.eq(q_r0), n_c0.eq(q_c0), n_r.eq(q_r), n_c.eq(q_c)]
        m.d.sync += [self.sample.valid.eq(f_cap & ~pad), self.sample.payload.eq(fp_r.data)]
        m.d.sync += [q_r0.eq(n_r0), q_c0.eq(n_c0), q_r.eq(n_r), q_c.eq(n_c)]
        # fp_in address src_offset + (r0 + r) * cols + c0 + c, kept incrementally (no
        # multiply on the read-address path): q_a of the element (r0 + r, c0 + c), q_ln of
        # (r0 + r, c0), q_bk of (r0, c0), q_sp of (r0, 0); q_bhc = bh * cols.
        q_a, q_ln, q_bk, q_sp = (Signal(32, name=f"q_{n}") for n in ("a", "ln", "bk", "sp"))
        q_bhc = Signal(32)
        n_a, n_ln, n_bk, n_sp = (Signal(32, name=f"qn_{n}") for n in ("a", "ln", "bk", "sp"))
        m.d.comb += [n_a.eq(q_a), n_ln.eq(q_ln), n_bk.eq(q_bk), n_sp.eq(q_sp),
                     fp_r.addr.eq(n_a)]
        m.d.sync += [q_a.eq(n_a), q_ln.eq(n_ln), q_bk.eq(n_bk), q_sp.eq(n_sp)]
        with m.If(q_init):
            m.d.comb += [n_r0.eq(0), n_c0.eq(0), n_r.eq(0), n_c.eq(0)]
            m.d.comb += [n_a.eq(a.src_offset), n_ln.eq(a.src_offset),
                         n_bk.eq(a.src_offset), n_sp.eq(a.src_offset)]
            m.d.sync += q_fdone.eq(0)
        with m.Elif(f_cap):
            with m.If(q_c == q_bw - 1):
                m.d.comb += n_c.eq(0)
                with m.If(q_r == q_bh - 1):
                    m.d.comb += n_r.eq(0)
                    with m.If(q_c0 + q_bw >= q_cols):
                        m.d.comb += n_c0.eq(0)
                        with m.If(q_r0 + q_bh >= q_rows):
                            m.d.sync += q_fdone.eq(1)
                            m.d.comb += [n_a.eq(q_sp), n_ln.eq(q_sp), n_bk.eq(q_sp)]
                        with m.Else():
                            m.d.comb += n_r0.eq(q_r0 + q_bh)
                            m.d.comb += [n_a.eq(q_sp + q_bhc), n_ln.eq(q_sp + q_bhc),
                                         n_bk.eq(q_sp + q_bhc), n_sp.eq(q_sp + q_bhc)]
                    with m.Else():
                        m.d.comb += n_c0.eq(q_c0 + q_bw)
                        m.d.comb += [n_a.eq(q_bk + q_bw), n_ln.eq(q_bk + q_bw),
                                     n_bk.eq(q_bk + q_bw)]
                with m.Else():
                    m.d.comb += n_r.eq(q_r + 1)
                    m.d.comb += [n_a.eq(q_ln + q_cols), n_ln.eq(q_ln + q_cols)]
            with m.Else():
                m.d.comb += n_c.eq(q_c + 1)
                m.d.comb += n_a.eq(q_a + 1)

        # drain: one element per clock from the selected quantizer's output serialiser
        d_valid, d_inv, d_blast = Signal(), Signal(), Signal()
        d_man = Signal(signed(mw))
        d_exp = Signal(ew)
        q_on, q_ob = Signal(34), Signal(34)
        q_ninv, q_finv = Signal(32), Signal(32)
        q_men, q_een = Signal(), Signal()
        for k, (ms, es) in enumerate(zip(man_specs, exp_specs)):
            mwp = getattr(self.bufs, f"{port_name(ms)}_w")
            ewp = getattr(self.bufs, f"{port_name(es)}_w")
            m.d.comb += [mwp.addr.eq(q_on >> tsh), mwp.data.eq(d_man.replicate(T)),
                         ewp.addr.eq(q_ob), ewp.data.eq(d_exp)]
            with m.If(q_dst == k):
                m.d.comb += [mwp.en.eq(Mux(q_men, 1 << q_on[:tsh] if tsh else 1, 0)),
                             ewp.en.eq(q_een)]
        with m.If(q_init):
            m.d.sync += [q_on.eq(0), q_ob.eq(0), q_ninv.eq(0), q_finv.eq(P.NO_INDEX)]
        with m.Elif(q_run & d_valid):
            m.d.comb += q_men.eq(1)
            m.d.sync += q_on.eq(q_on + 1)
            with m.If(d_blast):
                m.d.comb += q_een.eq(1)
                m.d.sync += q_ob.eq(q_ob + 1)
                with m.If(d_inv):
                    m.d.sync += q_ninv.eq(q_ninv + 1)
                    with m.If(q_ninv == 0):
                        m.d.sync += q_finv.eq(q_ob)

        done, error = fin.done, fin.error

        nb, n = Signal(34), Signal(64)
        q_rc = Signal(32)
        src_end = Signal(34)
        ret_bytes = Signal(64)
        exp_field = P.REQUESTS[P.Op.QUANTIZE].index("exp_code")
        flags = a.flags
        ret_f = (flags & int(P.QuantizeFlag.RETURN)).any()
        with m.FSM(name="quantize"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.next = "Q_CHECK"
            with m.State("Q_CHECK"):   # per-slot constants and grid (slot checked later)
                rnd = a.rounding
                with m.Switch(a.slot):
                    for k, f in enumerate(cfg.formats):
                        bh, bw = cfg.block_2d(k)
                        ok = self.rounding[k]
                        with m.Case(k):
                            m.d.sync += [q_bh.eq(bh), q_bw.eq(bw),
                                         q_gr.eq(_cdiv(q_rows, bh)), q_gc.eq(_cdiv(q_cols, bw)),
                                         q_bhc.eq(cmul(q_cols, bh)),
                                         q_rok.eq(Cat(*[rnd == r for r in ok]).any()
                                                  if ok else 0),
                                         q_cok.eq(in_range(a.exp_code, f.emin + f.exp_bias,
                                                           f.emax + f.exp_bias))]
                m.d.sync += [q_slot.eq(a.slot), q_rnd.eq(rnd[:2]), q_seed.eq(a.seed),
                             q_dst.eq(a.dst), q_scode.eq(a.exp_code),
                             q_sen.eq((flags & int(P.QuantizeFlag.STATIC_EXP)).any())]
                m.next = "Q_SIZE1"
            # sizes, one registered step each (no wide multiply in the check path)
            with m.State("Q_SIZE1"):
                m.d.sync += [nb.eq(q_gr * q_gc), q_rc.eq(q_rows * q_cols)]
                m.next = "Q_SIZE2"
            with m.State("Q_SIZE2"):
                with m.Switch(q_slot):
                    for k, f in enumerate(cfg.formats):
                        with m.Case(k):
                            m.d.sync += n.eq(cmul(nb, f.block_size))
                m.d.sync += src_end.eq(a.src_offset + q_rc)
                m.next = "Q_SIZE3"
            with m.State("Q_SIZE3"):
                m.d.sync += ret_bytes.eq(cmul(n, man_specs[0].wire_bytes)
                                         + cmul(nb, exp_specs[0].wire_bytes))
                m.next = "Q_CHECK2"
            with m.State("Q_CHECK2"):   # the emulator's checks, in its order
                src = a.src_offset
                with m.If(a.slot >= len(cfg.formats)):
                    error(P.ErrorCode.BAD_ARGUMENT, 0)
                with m.Elif(a.rounding >= len(ROUNDING_MODES)):
                    error(P.ErrorCode.BAD_ARGUMENT, 7)
                with m.Elif(a.dst >= cfg.operand_buffers):
                    error(P.ErrorCode.BAD_BUFFER, a.dst)
                with m.Elif((flags & (0xFF & ~P.flag_mask(P.QuantizeFlag))) != 0):
                    error(P.ErrorCode.BAD_ARGUMENT, 2)
                with m.Elif(q_sen & ~q_cok):
                    error(P.ErrorCode.BAD_ARGUMENT, exp_field)
                with m.Elif((q_rows == 0) | (q_cols == 0)):
                    error(P.ErrorCode.BAD_ARGUMENT, 0)
                with m.Elif(n > cfg.operand_depth):
                    error(P.ErrorCode.OUT_OF_RANGE, n[:32])
                with m.Elif(nb > cfg.exponent_depth):
                    error(P.ErrorCode.OUT_OF_RANGE, nb[:32])
                with m.Elif(src_end > fp_depth):
                    error(P.ErrorCode.OUT_OF_RANGE, Mux(src > fp_depth, src, fp_depth))
                with m.Elif(ret_f & (ret_bytes > P.MAX_DATA)):
                    error(P.ErrorCode.BAD_LENGTH, n[:32])
                with m.Elif(~q_rok):
                    error(P.ErrorCode.UNSUPPORTED, 7)
                with m.Else():
                    m.d.sync += [q_nb.eq(nb), q_n.eq(n)]
                    m.next = "Q_INIT"
            with m.State("Q_INIT"):
                m.d.comb += q_init.eq(1)
                m.next = "Q_RUN"
            with m.State("Q_RUN"):
                m.d.comb += q_run.eq(1)
                with m.If(q_ob == q_nb):
                    m.next = "Q_DONE"
            with m.State("Q_DONE"):
                fix = Cat(q_ninv, q_finv)
                nfix = P.RESPONSES[P.Op.QUANTIZE].header_size
                with m.If(ret_f):
                    with m.Switch(q_dst):
                        for k, (ms, es) in enumerate(zip(man_specs, exp_specs)):
                            with m.Case(k):
                                done(status_ok(m, pay, fix=fix, nfix=nfix,
                                               seg0=(es.id, 0, q_nb[:16]),
                                               seg1=(ms.id, 0, q_n[:16])))
                with m.Else():
                    done(status_ok(m, pay, fix=fix, nfix=nfix))
            fin.done_state()

        # ---- slot quantizers: element stream <-> lanes-wide beats -------------------
        for k, qcfg in enumerate(self.quant):
            qz = Quantizer(qcfg)
            m.submodules[f"quant{k}"] = qz
            L = qcfg.lanes
            sel = q_slot == k
            beat = Signal(32 * L, name=f"q{k}_beat")
            full = Signal(name=f"q{k}_full")
            li = Signal(range(max(L, 2)), name=f"q{k}_li")
            ol = Signal(range(max(L, 2)), name=f"q{k}_ol")
            m.d.comb += [qz.i.payload.eq(beat), qz.i.valid.eq(full)]
            with m.If(full & qz.i.ready):
                m.d.sync += full.eq(0)
            with m.If(sel):
                m.d.comb += f_ready.eq(~full | qz.i.ready)
            with m.If(sel & f_cap):
                if L == 1:
                    m.d.sync += [beat.eq(f_data), full.eq(1)]
                else:
                    m.d.sync += beat.word_select(li, 32).eq(f_data)
                    with m.If(li == L - 1):
                        m.d.sync += [li.eq(0), full.eq(1)]
                    with m.Else():
                        m.d.sync += li.eq(li + 1)
            if qcfg.runtime_rounding:
                m.d.comb += qz.rounding.eq(q_rnd)
            if qcfg.has_stochastic:
                m.d.comb += [qz.seed.eq(q_seed), qz.reseed.eq(q_init & sel)]
            if qcfg.static_exponent:
                m.d.comb += [qz.static_en.eq(q_sen),
                             qz.static_code.eq(q_scode[:qcfg.exp_bits])]
            po = qz.o.payload
            lane_last = (ol == L - 1) if L > 1 else Const(1)
            m.d.comb += qz.o.ready.eq(lane_last)
            with m.If(qz.o.valid):
                if L > 1:
                    m.d.sync += ol.eq(Mux(lane_last, 0, ol + 1))
            with m.If(sel):
                m.d.comb += [d_valid.eq(qz.o.valid), d_exp.eq(po.exp), d_inv.eq(po.invalid),
                             d_blast.eq(po.last & lane_last)]
                with m.Switch(ol if L > 1 else Const(0)):
                    for j in range(L):
                        with m.Case(j):
                            m.d.comb += d_man.eq(po.man[j])
        return m
