"""GEMM: operand checks, reference exponents and K-split state, then the MAC array.

The request is checked in the emulator's order: flags, then per operand the slot
(unknown: ``BAD_ARGUMENT`` 3 / 4; a slot the array does not compute: ``UNSUPPORTED`` 3 /
4), buffer, shape and depth, and that operand's stored data (mantissas, then codes, one
element per clock, the first bad one reported) -- A's fields and data before B's; then
the invalid blocks of A and B unless ``ALLOW_INVALID``; then the GEMM shape, ``out`` range,
``ACCUMULATE`` meta, ``K_OVERFLOW`` and the ``eref`` range.

Two short phases compute the reference exponents: **G_OWN** reads every exponent code
of A and B and writes the row / column maxima over valid blocks into this GEMM's bank of
a small reference memory; **G_REF** takes the reference of each row / column block from
``eref`` (``EXT_EREF``, at least the own maximum: else ``BAD_ARGUMENT`` 6) or the own
maximum, and with ``ACCUMULATE`` checks that every ``e_ref[i, j]`` is unchanged. Then
:class:`~hbfp_hw.gateware.engines.gemm_stream.GemmStream` runs the job.

Format slots the array computes: :func:`gemm_slots` (square ``tile x tile`` blocks, the
array's exponent format, any mantissa width up to the array's; the MAC array's FP32
conversion takes each job's fraction bits).

**CONV** (built with ``config.conv``; otherwise answered ``UNSUPPORTED`` 0): six
``C_PRE*`` states register the sizes (block counts, output size, operand blocks, the
job's grid), ``C_CHECK`` checks the fields in the emulator's order, the GEMM scan phases
check both operands' data (invalid blocks allowed), and ``C_JOB`` hands
:class:`GemmStream` a job with ``conv`` set: its sequencer reads the operand blocks
through the block-level im2col map (``conv_address.ConvAddress``). CONV clears the
``ACCUMULATE`` state.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Shape, Signal, signed
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P

from ..engine import (EngineStatus, addr_bits, engine_signature, port_name, sample_signature,
                      status_ok)
from .gemm_stream import GemmStream
from .mx_stream import MxStream, mx_stream_signature

__all__ = ["GemmEngine", "NO_EXP"]

G = P.GemmFlag
#: The "no valid block" row/column maximum of the golden model (``hbfp_hw.gemm``).
NO_EXP = -(1 << 14)


class GemmEngine(wiring.Component):
    """Engine for GEMM.

    Parameters
    ----------
    config
        The :class:`~hbfp_hw.config.accelerator.AcceleratorConfig`.
    specs
        Its buffer map.
    mac
        The :class:`~hbfp_hw.config.mac_array.MacArrayConfig` of the array.
    slots
        Format slots the MAC array computes (``tile x tile`` blocks).
    mx_slots
        Format slots with 1-D blocks along the last axis computed by
        :class:`~hbfp_hw.gateware.engines.mx_stream.MxStream`.
    acc_capacity
        Outputs whose accumulators are kept for ``ACCUMULATE``.
    rom_depth
        Bytes in the INFO ROM (port shapes only).
    primitives, runtime_frac
        Passed to the MAC array.
    """

    def __init__(self, config, specs, *, mac, slots, mx_slots=(), acc_capacity: int,
                 rom_depth: int, primitives: str | None = None,
                 runtime_frac: bool = False) -> None:
        self.config, self.specs, self.mac = config, list(specs), mac
        self.tile_slots, self.mx_slots = list(slots), list(mx_slots)
        self.slots = sorted(self.tile_slots + self.mx_slots)
        self.acc_capacity = acc_capacity
        self.primitives, self.runtime_frac = primitives, runtime_frac
        super().__init__(engine_signature(self.specs, config.tile, rom_depth,
                                          sample=Out(sample_signature()), soft_reset=In(1)))

    def elaborate(self, platform):
        m = Module()
        cfg, specs, mc = self.config, self.specs, self.mac
        T = cfg.tile
        tsh = T.bit_length() - 1
        a = self.cmd.payload.args.gemm
        fin = EngineStatus(m, self)
        pay = fin.pay
        by_op = lambda kind: sorted((s for s in specs if s.kind == kind),  # noqa: E731
                                    key=lambda s: s.operand)
        man_specs = by_op(P.BufferKind.MANTISSA)
        exp_specs = by_op(P.BufferKind.EXPONENT)
        out_spec = next(s for s in specs if s.name == "out")
        eref_spec = next(s for s in specs if s.kind == P.BufferKind.EREF)
        mw, ew = 8 * man_specs[0].wire_bytes, 8 * exp_specs[0].wire_bytes
        ref_fmt = mc.format_a()
        nops = cfg.operand_buffers

        # ---- read ports: one address per kind, data selected per use -----------------
        man_r = [getattr(self.bufs, f"{port_name(s)}_r") for s in man_specs]
        exp_r = [getattr(self.bufs, f"{port_name(s)}_r") for s in exp_specs]
        eref_r = getattr(self.bufs, f"{port_name(eref_spec)}_r")
        rd_elem = Signal(max(len(p.addr) for p in exp_r + [eref_r]))
        rd_word = Signal(max(len(p.addr) for p in man_r))
        m.d.comb += [p.addr.eq(rd_word) for p in man_r]
        m.d.comb += [p.addr.eq(rd_elem) for p in exp_r] + [eref_r.addr.eq(rd_elem)]

        def operand_data(buf):
            mdat, edat = Signal(mw * T, name="man_sel"), Signal(ew, name="exp_sel")
            with m.Switch(buf):
                for k in range(nops):
                    with m.Case(k):
                        m.d.comb += [mdat.eq(man_r[k].data), edat.eq(exp_r[k].data)]
            return mdat, edat

        # ---- job registers ------------------------------------------------------------
        # widths from the configuration: a checked operand has at most ``exponent_depth``
        # blocks (NBW bits: its block count, the K / row / column block counts of a tile
        # GEMM); scan indices and counts fit SW bits (words and codes of an operand
        # buffer); ``out`` rows OB bits (OW: its addresses); K sums KB bits
        conv_b = P.conv_built(cfg)
        NBW = max(1, cfg.exponent_depth.bit_length())
        SW = max(1, max(cfg.operand_depth, cfg.exponent_depth).bit_length())
        OB = out_spec.depth.bit_length()
        OW = addr_bits(out_spec.depth)
        KB = max(1, cfg.k_max.bit_length())
        # block counts (mt, nt, nk) and sizes (M, N) of the job: as wide as the request's
        # dimension fields (DIM) when a CONV job or a 1-D (MX) slot can set them, else
        # bounded by ``exponent_depth``
        DIM = len(a.a_rows)
        narrow = not conv_b and not self.mx_slots
        MB = NBW if narrow else DIM
        gM, gN = Signal(MB + tsh if narrow else DIM), Signal(MB + tsh if narrow else DIM)
        mt, nt, nk = Signal(MB), Signal(MB), Signal(MB)
        if conv_b:      # registered: CONV sets them from its own fields
            g_flags = Signal(8)
            g_a, g_b = Signal(range(nops)), Signal(range(nops))
            g_off = Signal(OW)
        else:           # the request's fields (the command payload holds until its status)
            g_flags = a.flags
            nsel = Shape.cast(range(nops)).width       # the buffer selection's bits
            g_a, g_b = a.a[:nsel], a.b[:nsel]
            g_off = a.out_offset[:OW]
        ta, tb = g_flags[0], g_flags[1]
        store_f = (g_flags & int(G.STORE)) != 0
        acc_f = (g_flags & int(G.ACCUMULATE)) != 0
        ext_f = (g_flags & int(G.EXT_EREF)) != 0
        # per-slot mantissa width: fraction bits for the conversion, range for the scan
        fr = [max(f.man_bits - 2, 0) for f in cfg.formats]
        mmaxes = [f.mmax for f in cfg.formats]
        # per-slot values registered once the slot is known; a constant when every slot
        # the engine computes has the same (always the case with one slot)
        def slot_reg(vals, shape, name):
            vs = {int(v) for v in vals}
            return Const(vs.pop(), shape) if len(vs) == 1 else Signal(shape, name=name)

        def set_reg(reg, value):
            return [] if isinstance(reg, Const) else [reg.eq(value)]

        blocks = {k: cfg.block_2d(k) for k in self.slots}
        lg = {k: (bh.bit_length() - 1, bw_.bit_length() - 1) for k, (bh, bw_) in blocks.items()}
        sv = self.slots or [0]
        g_fa, g_fb = (slot_reg([fr[k] for k in sv], 5, f"g_f{n}") for n in "ab")
        # per operand: log2 block rows / cols, 1-D (MX) block, block columns
        lbh = [slot_reg([lg.get(k, (0, 0))[0] for k in sv], range(8), f"lbh_{n}") for n in "ab"]
        lbw = [slot_reg([lg.get(k, (0, 0))[1] for k in sv], range(8), f"lbw_{n}") for n in "ab"]
        is_mx = [slot_reg([k in self.mx_slots for k in sv], 1, f"mx_{n}") for n in "ab"]
        bw = [slot_reg([blocks.get(k, (1, 1))[1] for k in sv], range(65), f"bw_{n}")
              for n in "ab"]
        # log2 buffer words per block
        lwd = [slot_reg([max(sum(lg.get(k, (0, 0))) - tsh, 0) for k in sv], range(8),
                        f"lwd_{n}") for n in "ab"]
        g_mx = Signal()         # this GEMM runs on the MX datapath
        mm_a, mm_b = (slot_reg([mmaxes[k] for k in sv], range(max(mmaxes) + 1), f"mm_{n}")
                      for n in "ab")
        # accumulator state kept between GEMMs (ACCUMULATE / EXT_EREF); the emulator's
        # meta reduces to the output tile grid and the fraction bits of both operands
        acc_valid = Signal()
        acc_mt, acc_nt = Signal(MB), Signal(MB)
        acc_fa, acc_fb = Signal(5), Signal(5)
        k_tot, k_new = Signal(KB), Signal(KB)       # at most k_max once checked
        g_fit = Signal()        # this GEMM's accumulators fit the accumulator buffer
        with m.If(self.soft_reset):
            m.d.sync += [acc_valid.eq(0), k_tot.eq(0)]

        # reference exponents (unbiased) per row block of A and column block of B, two
        # banks: ``rbank`` holds the stored GEMM's, ``~rbank`` this GEMM's
        RW = 8 * eref_spec.wire_bytes + 2
        mg_bits = max(1, (max(1, cfg.operand_depth // (T * T)) - 1).bit_length())
        # no read uses data of an address written in the same clock (G_OWN writes this
        # GEMM's bank while nothing reads it; G_REF writes two entries behind its read;
        # the other bank is only read), so synthesis needs no read-during-write logic
        m.submodules.refm = refm = memory.Memory(shape=signed(RW), depth=4 << mg_bits,
                                                 init=[], attrs={"no_rw_check": 1})
        ref_w, ref_r1, ref_r2 = refm.write_port(), refm.read_port(), refm.read_port()
        rbank = Signal()

        def ref_addr(bank, which, idx):
            return Cat(idx[:mg_bits], which, bank)

        m.submodules.stream = gs = GemmStream(
            mc, operand_buffers=nops, man_width=mw, exp_width=ew, ref_width=RW,
            ref_addr_bits=mg_bits + 2, acc_capacity=self.acc_capacity,
            primitives=self.primitives, runtime_frac=self.runtime_frac,
            conv=conv_b, array_domain="array" if cfg.array_clock_hz else None,
            dim_bits=MB, size_bits=len(gM), out_bits=OW, blk_bits=NBW if narrow else 32)
        job = gs.job
        m.d.comb += [job.a.eq(g_a), job.b.eq(g_b), job.ta.eq(ta), job.tb.eq(tb),
                     job.ext.eq(ext_f), job.acc.eq(acc_f), job.store.eq(store_f),
                     job.fit.eq(g_fit), job.rbank.eq(rbank), job.frac_a.eq(g_fa),
                     job.frac_b.eq(g_fb), job.mt.eq(mt), job.nt.eq(nt), job.nk.eq(nk),
                     job.M.eq(gM), job.N.eq(gN), job.off.eq(g_off),
                     gs.ref_data.eq(ref_r1.data)]
        out_w = getattr(self.bufs, f"{port_name(out_spec)}_w")
        m.d.comb += [out_w.addr.eq(gs.out_addr), out_w.data.eq(gs.out_data),
                     out_w.en.eq(gs.out_en)]
        mx_specs = [cfg.formats[k] for k in self.mx_slots]
        lmax = max([f.block_size for f in mx_specs], default=1)
        mmax = max([f.mmax for f in mx_specs], default=1)
        if self.mx_slots:
            m.submodules.mx = mx = MxStream(
                tile=T, operand_buffers=nops, man_width=mw, exp_width=ew,
                man_bits=mc.man_bits_a, exp_bias=ref_fmt.exp_bias,
                exp_invalid_code=ref_fmt.exp_invalid_code, guard_bits=cfg.guard_bits,
                acc_bits=cfg.accumulator_bits,
                psum_bits=(lmax * mmax * mmax).bit_length() + 1)
        else:   # no 1-D slot: no MX hardware, its ports read 0 (MX_RUN is unreachable)
            mx = mx_stream_signature(tile=T, operand_buffers=nops, man_width=mw,
                                     exp_width=ew).create()
        mode = Signal(2)    # 0: scan / G_OWN / G_REF, 1: the tile stream, 2: the MX stream
        # one operand data selection for every reader: the streams (mode 1, 2), the scan
        # (``scan_buf``) and G_OWN's exponent codes (``p_v``, below)
        rd_sel, own_sel, scan_buf = (Signal(range(nops), name=n)
                                     for n in ("rd_sel", "own_sel", "scan_buf"))
        p_v = Signal()
        m.d.comb += rd_sel.eq(Mux(mode == 1, gs.rd_buf, Mux(mode == 2, mx.rd_buf,
                                                             Mux(p_v, own_sel, scan_buf))))
        s_man, s_exp = operand_data(rd_sel)
        m.d.comb += [gs.man_data.eq(s_man), gs.exp_data.eq(s_exp), mx.man_data.eq(s_man),
                     mx.exp_data.eq(s_exp)]
        with m.If(mode == 2):
            m.d.comb += [out_w.addr.eq(mx.out_addr), out_w.data.eq(mx.out_data),
                         out_w.en.eq(mx.out_en)]
        m.d.comb += [self.sample.valid.eq(gs.sample.valid | mx.sample.valid),
                     self.sample.payload.eq(Mux(mx.sample.valid, mx.sample.payload,
                                                gs.sample.payload))]

        # ---- scan machinery (operand checks) ------------------------------------------
        sc, sc_next = Signal(SW), Signal(SW)
        m.d.comb += sc_next.eq(sc)
        m.d.sync += sc.eq(sc_next)
        with m.Switch(mode):
            with m.Case(1):
                m.d.comb += [rd_elem.eq(gs.rd_elem), rd_word.eq(gs.rd_word)]
            with m.Case(2):
                m.d.comb += [rd_elem.eq(mx.rd_elem), rd_word.eq(mx.rd_word)]
            with m.Default():
                m.d.comb += [rd_elem.eq(sc_next), rd_word.eq(sc_next)]
        scan_kind = Signal(2)   # 0 mantissa range, 1 exponent range, 2 invalid flag
        scan_n = Signal(SW)
        scan_which = Signal()
        k_cnt = Signal(range(8))     # scan phase (0 .. 6)
        man_word, exp_code = s_man, s_exp
        man_bad = Signal(T)
        uniform = len({mmaxes[s] for s in self.slots}) <= 1
        for k in range(T):
            v = man_word[mw * k: mw * (k + 1)].as_signed()
            if uniform and ref_fmt.mmax >= 2 ** (mw - 1) - 1:   # only the most negative
                m.d.comb += man_bad[k].eq(v == -(2 ** (mw - 1)))
            elif uniform:
                m.d.comb += man_bad[k].eq((v > ref_fmt.mmax) | (v < -ref_fmt.mmax))
            else:
                mm = Mux(scan_which, mm_b, mm_a)
                m.d.comb += man_bad[k].eq((v > mm) | (v < -mm))
        man_bad_lane = Signal(range(T + 1))
        for k in reversed(range(T)):
            with m.If(man_bad[k]):
                m.d.comb += man_bad_lane.eq(k)
        exp_range_bad = (exp_code > ref_fmt.exp_invalid_code
                         if ref_fmt.exp_invalid_code < 2 ** ew - 1 else Const(0))
        exp_inv = exp_code == ref_fmt.exp_invalid_code
        chk_v, chk_bad = Signal(), Signal()     # registered check of one scanned element
        chk_sc = Signal(SW)
        chk_lane = Signal(range(T + 1))

        def slot_supported(slot):
            return Cat(*[slot == s for s in self.slots]).any() if self.slots else Const(0)

        # ---- G_OWN: row / column maxima of the exponent codes -------------------------
        # every code of A (row block major) then of B (column block major), one per
        # clock; the running maximum over valid blocks (NO_EXP if none) of each
        # row/column block goes to this GEMM's bank
        x_init, x_go, x_done = Signal(), Signal(), Signal()
        x_which, x_i, x_k = Signal(), Signal(MB), Signal(MB)
        p_which, p_i, p_first, p_last = Signal(), Signal(MB), Signal(), Signal()
        # x_blk: the code's block index, kept incrementally (x_bi: its value at k = 0)
        x_blk, x_bi = Signal(SW), Signal(SW)
        x_sk = Mux(x_which, Mux(tb, 1, nt), Mux(ta, mt, 1))   # stride of k
        x_si = Mux(x_which, Mux(tb, nk, 1), Mux(ta, 1, nk))   # stride of i
        m.d.sync += [p_v.eq(x_go), p_which.eq(x_which), p_i.eq(x_i), p_first.eq(x_k == 0),
                     p_last.eq(x_k == nk - 1)]
        with m.If(x_go):
            with m.If(x_k == nk - 1):
                m.d.sync += x_k.eq(0)
                with m.If(x_i == Mux(x_which, nt, mt) - 1):
                    m.d.sync += [x_i.eq(0), x_bi.eq(0), x_blk.eq(0)]
                    with m.If(x_which):
                        m.d.sync += x_done.eq(1)
                    with m.Else():
                        m.d.sync += x_which.eq(1)
                with m.Else():
                    m.d.sync += [x_i.eq(x_i + 1), x_bi.eq(x_bi + x_si),
                                 x_blk.eq(x_bi + x_si)]
            with m.Else():
                m.d.sync += [x_k.eq(x_k + 1), x_blk.eq(x_blk + x_sk)]
        m.d.comb += own_sel.eq(Mux(p_which, g_b, g_a))
        x_code = s_exp
        x_e, x_run, x_mx = (Signal(signed(RW), name=f"x_{n}") for n in ("e", "run", "mx"))
        x_base = Mux(p_first, NO_EXP, x_run)
        m.d.comb += [x_e.eq(x_code - ref_fmt.exp_bias),
                     x_mx.eq(Mux((x_code != ref_fmt.exp_invalid_code) & (x_e > x_base), x_e,
                                 x_base))]
        with m.If(p_v):
            m.d.sync += x_run.eq(x_mx)
        # ---- G_REF: this GEMM's references and the ACCUMULATE check -------------------
        # e_ref[i, j] = row[i] + col[j] must equal the stored one for all (i, j), i.e.
        # row[i] - row_old[i] == d and col[j] - col_old[j] == -d
        y_go, y_done = Signal(), Signal()
        y_which, y_i = Signal(), Signal(MB)
        q_v, q_which, q_i, q_first = Signal(), Signal(), Signal(MB), Signal()
        y_elem = Signal(SW)
        m.d.comb += y_elem.eq(Mux(y_which, mt + y_i, y_i))
        m.d.sync += [q_v.eq(y_go), q_which.eq(y_which), q_i.eq(y_i),
                     q_first.eq(~y_which & (y_i == 0))]
        with m.If(y_go):
            with m.If(y_i == Mux(y_which, nt, mt) - 1):
                m.d.sync += y_i.eq(0)
                with m.If(y_which):
                    m.d.sync += y_done.eq(1)
                with m.Else():
                    m.d.sync += y_which.eq(1)
            with m.Else():
                m.d.sync += y_i.eq(y_i + 1)
        with m.If(x_init):
            m.d.sync += [x_which.eq(0), x_i.eq(0), x_k.eq(0), x_done.eq(0), x_bi.eq(0),
                         x_blk.eq(0), y_which.eq(0), y_i.eq(0), y_done.eq(0)]
        # one register stage after the reads (u_*): the new reference, the own maximum
        # and the difference to the stored reference; the checks and the write use them
        y_own, y_new = Signal(signed(RW)), Signal(signed(RW))
        y_diff, y_d0 = Signal(signed(RW + 2)), Signal(signed(RW + 2))
        y_same = Signal()
        u_v, u_which, u_i, u_first = Signal(), Signal(), Signal(MB), Signal()
        u_own, u_new, u_diff = Signal(signed(RW)), Signal(signed(RW)), Signal(signed(RW + 2))
        m.d.comb += [ref_r2.addr.eq(ref_addr(rbank, y_which, y_i)),
                     ref_r1.addr.eq(Mux(mode == 1, gs.ref_addr,
                                        ref_addr(~rbank, y_which, y_i))),
                     y_own.eq(ref_r1.data),
                     y_new.eq(Mux(ext_f, eref_r.data - ref_fmt.exp_bias, y_own)),
                     y_diff.eq(y_new - ref_r2.data),
                     y_same.eq(u_first | (u_diff == Mux(u_which, -y_d0, y_d0)))]
        m.d.sync += [u_v.eq(q_v), u_which.eq(q_which), u_i.eq(q_i), u_first.eq(q_first),
                     u_own.eq(y_own), u_new.eq(y_new), u_diff.eq(y_diff)]
        with m.If(u_v & u_first):
            m.d.sync += y_d0.eq(u_diff)
        m.d.comb += [ref_w.en.eq((p_v & p_last) | u_v),
                     ref_w.addr.eq(Mux(p_v, ref_addr(~rbank, p_which, p_i),
                                       ref_addr(~rbank, u_which, u_i))),
                     ref_w.data.eq(Mux(p_v, x_mx, u_new))]

        # ---- command FSM ----------------------------------------------------------------
        done, error = fin.done, fin.error

        fl = a.flags
        nb_ab = [Signal(32, name=f"nb_{name}") for name in "ab"]
        if conv_b:      # CONV sets the scanned block counts itself
            nb_a, nb_b = Signal(SW, name="nb_ra"), Signal(SW, name="nb_rb")
        else:           # the block counts of the checked operands (at most exponent_depth)
            nb_a, nb_b = nb_ab[0][:SW], nb_ab[1][:SW]
        Ka = Mux(ta, a.a_rows, a.a_cols)
        Kb = Mux(tb, a.b_cols, a.b_rows)
        M = Mux(ta, a.a_cols, a.a_rows)
        N = Mux(tb, a.b_rows, a.b_cols)
        # M * N and the padded output, registered as their low bits (OB / AB: the bits of
        # ``out``'s depth and of the accumulator capacity) and "a bit above is set"
        AB = max(1, self.acc_capacity.bit_length())
        mn_lo, mn_hi, mnp_lo, mnp_hi = Signal(OB), Signal(), Signal(AB), Signal()
        mt_c, nt_c = Signal(DIM), Signal(DIM)
        ktot_c = Signal(max(KB, DIM) + 1)
        m.d.comb += [mt_c.eq((M + T - 1) >> tsh), nt_c.eq((N + T - 1) >> tsh),
                     ktot_c.eq(Mux(acc_f, k_tot, 0) + Ka)]
        # ---- CONV: sizes (registered over a few states), checks, then the job --------
        ca = self.cmd.payload.args.conv
        c_conv = Signal()
        cv = {n: Signal(64, name=f"cv_{n}") for n in (
            "gn", "gc", "go", "ho", "wo", "hw", "khkw", "gngc", "gogc", "gngo", "xb", "wb",
            "howo", "yb", "gnhowo", "khkwgc", "gnhw", "khkwgo", "ba", "bb", "mt", "nt",
            "nk", "mtnt")}
        c_lsh, c_lsw = Signal(2), Signal(2)
        c_sok = [Signal(name="cv_sok_h"), Signal(name="cv_sok_w")]
        c_span = [Signal(signed(40), name="cv_span_h"), Signal(signed(40), name="cv_span_w")]
        job_c = {n: Signal(16, name=f"jc_{n}") for n in (
            *(f"r{c}{d}" for c in "ijk" for d in range(3)), "H", "W", "Ho", "Wo", "gc", "go")}
        for n, v in job_c.items():
            m.d.comb += getattr(job, n).eq(v)
        m.d.comb += [job.conv.eq(c_conv), job.cmode.eq(ca.mode), job.kh.eq(ca.kh),
                     job.kw.eq(ca.kw), job.lsh.eq(c_lsh), job.lsw.eq(c_lsw),
                     job.dh.eq(ca.dil_h), job.dw.eq(ca.dil_w), job.ph.eq(ca.pad_h),
                     job.pw.eq(ca.pad_w)]
        conv_slots = [k for k in self.tile_slots]
        cidx = P.REQUESTS[P.Op.CONV].index
        with m.FSM(name="gemm"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += c_conv.eq(0)
                    if conv_b:
                        m.d.sync += g_flags.eq(fl)
                    with m.If(self.cmd.payload.op == P.Op.CONV):
                        if P.conv_built(cfg):
                            m.d.sync += c_conv.eq(1)
                            m.next = "C_PRE0"
                        else:
                            error(P.ErrorCode.UNSUPPORTED, 0)
                    with m.Else():
                        m.next = "G_PRE"
            # blocks of both operands, registered before the checks
            with m.State("G_PRE"):
                for which, name in enumerate("ab"):
                    rows, cols = getattr(a, f"{name}_rows"), getattr(a, f"{name}_cols")
                    with m.Switch(getattr(a, f"slot_{name}")):
                        for k in self.slots:
                            bh_k, bw_k = cfg.block_2d(k)
                            sh, sw = bh_k.bit_length() - 1, bw_k.bit_length() - 1
                            with m.Case(k):
                                m.d.sync += [nb_ab[which].eq(((rows + bh_k - 1) >> sh)
                                                             * ((cols + bw_k - 1) >> sw)),
                                             *set_reg(lbh[which], sh),
                                             *set_reg(lbw[which], sw),
                                             *set_reg(bw[which], bw_k),
                                             *set_reg(lwd[which], max(sh + sw - tsh, 0)),
                                             *set_reg(is_mx[which], k in self.mx_slots)]
                m.next = "G_CHECK_A"
            # the emulator's order: A's fields, A's data, B's fields, B's data, then the
            # invalid blocks of both (G_CHECK_B runs between the scan phases of A and B)
            b_checked = Signal()
            for which, (st, nxt_state) in enumerate((("G_CHECK_A", "G_SCAN_INIT"),
                                                      ("G_CHECK_B", "G_SCAN_SET"))):
                name = "ab"[which]
                slot = getattr(a, f"slot_{name}")
                buf = getattr(a, name)
                rows, cols = getattr(a, f"{name}_rows"), getattr(a, f"{name}_cols")
                nb = nb_ab[which]
                with m.State(st):
                    with m.If((which == 0) & ((fl & ~P.flag_mask(G) & 0xFF) != 0)):
                        error(P.ErrorCode.BAD_ARGUMENT, 2)
                    with m.Elif(slot >= len(cfg.formats)):
                        error(P.ErrorCode.BAD_ARGUMENT, 3 + which)
                    with m.Elif(~slot_supported(slot)):
                        error(P.ErrorCode.UNSUPPORTED, 3 + which)
                    with m.Elif(buf >= nops):
                        error(P.ErrorCode.BAD_BUFFER, buf)
                    with m.Elif((rows == 0) | (cols == 0)):
                        error(P.ErrorCode.BAD_ARGUMENT, 0)
                    with m.Elif((nb << (lbh[which] + lbw[which])) > cfg.operand_depth):
                        error(P.ErrorCode.OUT_OF_RANGE, nb << (lbh[which] + lbw[which]))
                    with m.Elif(nb > cfg.exponent_depth):
                        error(P.ErrorCode.OUT_OF_RANGE, nb)
                    with m.Else():
                        if conv_b:
                            m.d.sync += (nb_a if which == 0 else nb_b).eq(nb)
                        if which == 1:
                            m.d.sync += b_checked.eq(1)
                        with m.Switch(slot):
                            for k in self.slots:
                                with m.Case(k):
                                    m.d.sync += [*set_reg(g_fb if which else g_fa, fr[k]),
                                                 *set_reg(mm_b if which else mm_a, mmaxes[k])]
                        m.next = nxt_state
            with m.State("G_SCAN_INIT"):
                if conv_b:
                    m.d.sync += [g_a.eq(a.a), g_b.eq(a.b), g_off.eq(a.out_offset)]
                m.d.sync += [k_cnt.eq(0),
                             b_checked.eq(0)]
                m.d.comb += x_init.eq(1)
                m.next = "G_SCAN_SET"
            # scan phases: A mantissas, A codes, B mantissas, B codes, A invalid, B invalid
            with m.State("G_SCAN_SET"):
                m.d.comb += sc_next.eq(0)
                m.d.sync += chk_v.eq(0)
                with m.Switch(k_cnt):
                    for ph, (which, kind) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1),
                                                        (0, 2), (1, 2))):
                        with m.Case(ph):
                            nbx = nb_a if which == 0 else nb_b
                            m.d.sync += [scan_buf.eq(g_a if which == 0 else g_b),
                                         scan_kind.eq(kind), scan_which.eq(which),
                                         scan_n.eq(nbx << lwd[which]
                                                   if kind == 0 else nbx)]
                            if kind == 2:
                                with m.If(g_flags & int(G.ALLOW_INVALID)):
                                    m.d.sync += scan_n.eq(0)
                    with m.Default():
                        if P.conv_built(cfg):
                            with m.If(c_conv):
                                m.next = "C_JOB"
                            with m.Else():
                                m.next = "G_SHAPE0"
                        else:
                            m.next = "G_SHAPE0"
                with m.If((k_cnt == 2) & ~b_checked):
                    m.next = "G_CHECK_B"
                with m.Elif(k_cnt < 6):
                    m.next = "G_SCAN"
            # the check of element ``sc`` is registered (``chk_*``) and acted on in the
            # next cycle; elements are still checked in order (the first bad one is
            # reported); a phase ends one cycle after its last read
            with m.State("G_SCAN"):
                m.d.sync += [chk_v.eq(sc != scan_n), chk_sc.eq(sc), chk_lane.eq(man_bad_lane)]
                with m.Switch(scan_kind):
                    for kind, bad in enumerate((man_bad.any(), exp_range_bad, exp_inv)):
                        with m.Case(kind):
                            m.d.sync += chk_bad.eq(bad)
                with m.If(chk_v & chk_bad):
                    with m.Switch(scan_kind):
                        with m.Case(0):
                            error(P.ErrorCode.DATA_RANGE, (chk_sc << tsh) + chk_lane)
                        with m.Case(1):
                            error(P.ErrorCode.DATA_RANGE, chk_sc)
                        with m.Case(2):
                            error(P.ErrorCode.INVALID_DATA,
                                  Cat(chk_sc[:31], Const(0, max(0, 31 - SW)), scan_which))
                with m.Elif(sc == scan_n):
                    m.d.comb += sc_next.eq(sc)
                    with m.If(~chk_v):
                        m.d.sync += k_cnt.eq(k_cnt + 1)
                        m.d.comb += sc_next.eq(0)
                        m.next = "G_SCAN_SET"
                with m.Else():
                    m.d.comb += sc_next.eq(sc + 1)
            with m.State("G_SHAPE0"):
                mn, mnp = Signal(32), Signal(32 + 2 * tsh)
                m.d.comb += [mn.eq(M * N), mnp.eq((mt_c * nt_c) << (2 * tsh))]
                m.d.sync += [mn_lo.eq(mn[:OB]), mn_hi.eq(mn[OB:] != 0),
                             mnp_lo.eq(mnp[:AB]), mnp_hi.eq(mnp[AB:] != 0)]
                m.next = "G_SHAPE"
            # K block lengths: T for tile slots; for 1-D slots the block along K (A as
            # stored, B transposed) or 1 (A transposed, B as stored)
            La = Mux(is_mx[0], Mux(ta, 1, bw[0]), T)
            Lb = Mux(is_mx[1], Mux(tb, bw[1], 1), T)
            with m.State("G_SHAPE"):
                m.d.sync += g_mx.eq(is_mx[0])
                with m.If((Ka != Kb) | (La != Lb)):
                    error(P.ErrorCode.BAD_ARGUMENT, 5)
                # out_offset + M * N > depth: high bits (either operand) or an OB-bit sum
                off, off_hi = a.out_offset, a.out_offset[OB:] != 0
                with m.Elif(store_f & (off_hi | mn_hi
                                       | (off[:OB] + mn_lo > out_spec.depth))):
                    error(P.ErrorCode.OUT_OF_RANGE,
                          Mux(off_hi | (off[:OB] > out_spec.depth), off, out_spec.depth))
                with m.Elif(is_mx[0] != is_mx[1]):
                    error(P.ErrorCode.UNSUPPORTED, 4)
                with m.Elif(is_mx[0] & (acc_f | ext_f)):
                    error(P.ErrorCode.UNSUPPORTED, 2)
                with m.Elif(is_mx[0] & (ktot_c > cfg.k_max)):
                    error(P.ErrorCode.K_OVERFLOW, ktot_c)
                with m.Elif(is_mx[0]):
                    m.d.sync += [gM.eq(M), gN.eq(N), k_new.eq(ktot_c), nk.eq(Ka)]
                    m.next = "MX_PREP"
                with m.Elif(acc_f & (~acc_valid | (acc_mt != mt_c) | (acc_nt != nt_c)
                                     | (acc_fa != g_fa) | (acc_fb != g_fb))):
                    error(P.ErrorCode.BAD_ARGUMENT, 2)
                with m.Elif(ktot_c > cfg.k_max):
                    error(P.ErrorCode.K_OVERFLOW, ktot_c)
                with m.Elif(ext_f & (mt_c + nt_c > eref_spec.depth)):
                    error(P.ErrorCode.OUT_OF_RANGE, mt_c + nt_c)
                with m.Else():
                    m.d.sync += [gM.eq(M), gN.eq(N), k_new.eq(ktot_c),
                                 mt.eq(mt_c), nt.eq(nt_c), nk.eq((Ka + T - 1) >> tsh),
                                 g_fit.eq(~mnp_hi & (mnp_lo <= self.acc_capacity))]
                    m.next = "G_OWN"
            # the MX job's strides (see mx_stream.mx_job_layout)
            mj = mx.job
            nkb = Signal(17)
            gmn = [Signal(17, name="mx_gm"), Signal(17, name="mx_gn")]
            with m.State("MX_PREP"):
                m.d.sync += [nkb.eq(Mux(ta, nk, (nk + bw[0] - 1) >> lbw[0])),
                             gmn[0].eq((gM + bw[0] - 1) >> lbw[0]),
                             gmn[1].eq((gN + bw[1] - 1) >> lbw[1])]
                m.next = "MX_JOB"
            with m.State("MX_JOB"):
                m.d.sync += [mj.a.eq(g_a), mj.b.eq(g_b), mj.store.eq(store_f),
                             mj.wide.eq(~ta & tb), mj.frac_a.eq(g_fa), mj.frac_b.eq(g_fb),
                             mj.M.eq(gM), mj.N.eq(gN), mj.nkb.eq(nkb),
                             mj.L.eq(Mux(ta, 1, bw[0])), mj.off.eq(g_off)]
                for x, t, stored_t in ((0, ta, 0), (1, tb, 1)):
                    n = "ab"[x]
                    kp = nkb << lbw[x]                     # K padded to whole blocks
                    mp = gmn[x] << lbw[x]                  # M (N) padded to whole blocks
                    along_k = t if stored_t else ~t        # stored rows are K blocks
                    with m.If(along_k):
                        m.d.sync += [getattr(mj, f"{n}_estep").eq(1),
                                     getattr(mj, f"{n}_ebase_step").eq(nkb),
                                     getattr(mj, f"{n}_ewrap").eq(1),
                                     getattr(mj, f"{n}_mstep").eq(1),
                                     getattr(mj, f"{n}_mbase_step").eq(kp)]
                    with m.Else():
                        m.d.sync += [getattr(mj, f"{n}_estep").eq(gmn[x]),
                                     getattr(mj, f"{n}_ebase_step").eq(1),
                                     getattr(mj, f"{n}_ewrap").eq(bw[x]),
                                     getattr(mj, f"{n}_mstep").eq(mp),
                                     getattr(mj, f"{n}_mbase_step").eq(1)]
                m.next = "MX_GO"
            with m.State("MX_GO"):
                m.d.comb += mx.start.eq(1)
                m.next = "MX_RUN"
            with m.State("MX_RUN"):
                m.d.comb += mode.eq(2)
                with m.If(mx.done):
                    m.next = "G_DONE"
            with m.State("G_OWN"):
                m.d.comb += [sc_next.eq(x_blk), x_go.eq(~x_done)]
                with m.If(x_done & ~p_v):
                    m.next = "G_REF"
            with m.State("G_REF"):
                m.d.comb += [sc_next.eq(y_elem), y_go.eq(~y_done)]
                with m.If(y_done & ~q_v & ~u_v):
                    m.next = "G_GO"
                with m.If(u_v & ext_f & (u_new < u_own)):
                    error(P.ErrorCode.BAD_ARGUMENT, 6)
                with m.Elif(u_v & acc_f & ~y_same):
                    error(P.ErrorCode.BAD_ARGUMENT, 6)
            with m.State("G_GO"):
                with m.If(acc_f & ~g_fit):
                    error(P.ErrorCode.UNSUPPORTED, 2)
                with m.Elif(store_f | g_fit):
                    # the stream addresses the buffers from this clock on
                    m.d.comb += [gs.start.eq(1), mode.eq(1)]
                    m.next = "G_RUN"
                with m.Else():
                    m.next = "G_DONE"
            with m.State("G_RUN"):
                m.d.comb += mode.eq(1)
                with m.If(gs.done):
                    m.next = "G_DONE"
            with m.State("G_DONE"):
                done(status_ok(m, pay, fix=k_new, nfix=P.RESPONSES[P.Op.GEMM].header_size))
                m.d.sync += [acc_valid.eq(~g_mx), acc_mt.eq(mt), acc_nt.eq(nt), acc_fa.eq(g_fa),
                             acc_fb.eq(g_fb), k_tot.eq(k_new)]
                with m.If(~acc_f):
                    m.d.sync += rbank.eq(~rbank)
            if P.conv_built(cfg):     # the CONV states (the conv address generator)
                # CONV sizes: block counts, output size, operand blocks and the job's grid
                with m.State("C_PRE0"):
                    for x, (st, lsv) in enumerate(((ca.stride_h, c_lsh), (ca.stride_w, c_lsw))):
                        m.d.sync += [c_sok[x].eq(Cat(*[st == v for v in P.CONV_STRIDES]).any()),
                                     lsv.eq(Mux(st == 8, 3, Mux(st == 4, 2, Mux(st == 2, 1, 0))))]
                    m.d.sync += [cv["gn"].eq((ca.n + T - 1) >> tsh),
                                 cv["gc"].eq((ca.c + T - 1) >> tsh),
                                 cv["go"].eq((ca.o + T - 1) >> tsh), cv["hw"].eq(ca.h * ca.w),
                                 cv["khkw"].eq(ca.kh * ca.kw),
                                 c_span[0].eq(ca.h + 2 * ca.pad_h - ca.dil_h * (ca.kh - 1) - 1),
                                 c_span[1].eq(ca.w + 2 * ca.pad_w - ca.dil_w * (ca.kw - 1) - 1)]
                    m.next = "C_PRE1"
                with m.State("C_PRE1"):
                    m.d.sync += [cv["ho"].eq((c_span[0] >> c_lsh) + 1),
                                 cv["wo"].eq((c_span[1] >> c_lsw) + 1),
                                 cv["gngc"].eq(cv["gn"][:16] * cv["gc"][:16]),
                                 cv["gogc"].eq(cv["go"][:16] * cv["gc"][:16]),
                                 cv["gngo"].eq(cv["gn"][:16] * cv["go"][:16])]
                    m.next = "C_PRE2"
                with m.State("C_PRE2"):
                    m.d.sync += [cv["xb"].eq(cv["gngc"][:32] * cv["hw"][:32]),
                                 cv["wb"].eq(cv["gogc"][:32] * cv["khkw"][:16]),
                                 cv["howo"].eq(cv["ho"][:17] * cv["wo"][:17]),
                                 cv["khkwgc"].eq(cv["khkw"][:16] * cv["gc"][:16]),
                                 cv["gnhw"].eq(cv["gn"][:16] * cv["hw"][:32]),
                                 cv["khkwgo"].eq(cv["khkw"][:16] * cv["go"][:16])]
                    m.next = "C_PRE3"
                with m.State("C_PRE3"):
                    m.d.sync += [cv["yb"].eq(cv["gngo"][:32] * cv["howo"][:34]),
                                 cv["gnhowo"].eq(cv["gn"][:16] * cv["howo"][:34])]
                    m.next = "C_PRE4"
                with m.State("C_PRE4"):
                    with m.Switch(ca.mode):
                        for cm_v, (ba, bb, mt_v, nt_v, nk_v) in enumerate((
                                ("xb", "wb", "gnhowo", "go", "khkwgc"),
                                ("yb", "wb", "gnhw", "gc", "khkwgo"),
                                ("yb", "xb", "go", "khkwgc", "gnhowo"))):
                            with m.Case(cm_v):
                                m.d.sync += [cv["ba"].eq(cv[ba]), cv["bb"].eq(cv[bb]),
                                             cv["mt"].eq(cv[mt_v]), cv["nt"].eq(cv[nt_v]),
                                             cv["nk"].eq(cv[nk_v])]
                    m.next = "C_PRE5"
                with m.State("C_PRE5"):
                    m.d.sync += cv["mtnt"].eq(cv["mt"][:32] * cv["nt"][:32])
                    m.next = "C_CHECK"
                with m.State("C_CHECK"):
                    el_a, el_b = cv["ba"] << (2 * tsh), cv["bb"] << (2 * tsh)
                    k_c, n_out = cv["nk"] << tsh, cv["mtnt"] << (2 * tsh)
                    chain = [(ca.mode > 2, P.ErrorCode.BAD_ARGUMENT, cidx("mode"))]
                    for name in ("slot_a", "slot_b"):
                        sl = getattr(ca, name)
                        ok = Cat(*[sl == k for k in conv_slots]).any() if conv_slots else Const(0)
                        chain += [(sl >= len(cfg.formats), P.ErrorCode.BAD_ARGUMENT, cidx(name)),
                                  (~ok, P.ErrorCode.UNSUPPORTED, cidx(name))]
                    chain += [(ca.a >= nops, P.ErrorCode.BAD_BUFFER, ca.a),
                              (ca.b >= nops, P.ErrorCode.BAD_BUFFER, ca.b)]
                    chain += [(getattr(ca, n) == 0, P.ErrorCode.BAD_ARGUMENT, cidx(n))
                              for n in ("n", "c", "h", "w", "o", "kh", "kw")]
                    chain += [(~c_sok[0], P.ErrorCode.BAD_ARGUMENT, cidx("stride_h")),
                              (~c_sok[1], P.ErrorCode.BAD_ARGUMENT, cidx("stride_w")),
                              (ca.dil_h == 0, P.ErrorCode.BAD_ARGUMENT, cidx("dil_h")),
                              (ca.dil_w == 0, P.ErrorCode.BAD_ARGUMENT, cidx("dil_w")),
                              (c_span[0] < 0, P.ErrorCode.BAD_ARGUMENT, cidx("kh")),
                              (c_span[1] < 0, P.ErrorCode.BAD_ARGUMENT, cidx("kw")),
                              (el_a > cfg.operand_depth, P.ErrorCode.OUT_OF_RANGE, el_a[:32]),
                              (el_b > cfg.operand_depth, P.ErrorCode.OUT_OF_RANGE, el_b[:32]),
                              (k_c > cfg.k_max, P.ErrorCode.K_OVERFLOW, k_c[:32]),
                              (ca.out_offset + n_out > out_spec.depth, P.ErrorCode.OUT_OF_RANGE,
                               Mux(ca.out_offset > out_spec.depth, ca.out_offset,
                                   out_spec.depth))]
                    with m.If(chain[0][0]):
                        error(chain[0][1], chain[0][2])
                    for cond, code, detail in chain[1:]:
                        with m.Elif(cond):
                            error(code, detail)
                    with m.Else():
                        m.next = "C_SCAN_INIT"
                with m.State("C_SCAN_INIT"):
                    flags = Mux(ca.mode == 0, int(G.TRANS_B), Mux(ca.mode == 2, int(G.TRANS_A), 0))
                    m.d.sync += [g_a.eq(ca.a), g_b.eq(ca.b), k_cnt.eq(0), g_off.eq(ca.out_offset),
                                 b_checked.eq(1), nb_a.eq(cv["ba"]), nb_b.eq(cv["bb"]),
                                 *set_reg(lwd[0], tsh), *set_reg(lwd[1], tsh),
                                 *set_reg(is_mx[0], 0), *set_reg(is_mx[1], 0),
                                 g_flags.eq(flags | int(G.ALLOW_INVALID) | int(G.STORE))]
                    for which, name in enumerate(("slot_a", "slot_b")):
                        with m.Switch(getattr(ca, name)):
                            for k in conv_slots:
                                with m.Case(k):
                                    m.d.sync += [*set_reg(g_fb if which else g_fa, fr[k]),
                                                 *set_reg(mm_b if which else mm_a, mmaxes[k])]
                    m.next = "G_SCAN_SET"
                with m.State("C_JOB"):
                    gn, gc, go = (cv[n][:16] for n in ("gn", "gc", "go"))
                    ho, wo = cv["ho"][:16], cv["wo"][:16]
                    kh, kw = ca.kh, ca.kw
                    one = Const(1, 16)
                    m.d.sync += [mt.eq(cv["mt"]), nt.eq(cv["nt"]), nk.eq(cv["nk"]),
                                 gM.eq(cv["mt"] << tsh), gN.eq(cv["nt"] << tsh), g_fit.eq(0),
                                 job_c["H"].eq(ca.h), job_c["W"].eq(ca.w), job_c["Ho"].eq(ho),
                                 job_c["Wo"].eq(wo), job_c["gc"].eq(gc), job_c["go"].eq(go)]
                    with m.Switch(ca.mode):
                        for cm_v, radices in enumerate((
                                ((wo, ho, gn), (go, one, one), (gc, kw, kh)),
                                ((ca.w, ca.h, gn), (gc, one, one), (go, kw, kh)),
                                ((go, one, one), (kw, kh, gc), (wo, ho, gn)))):
                            with m.Case(cm_v):
                                for c, rs in zip("ijk", radices):
                                    m.d.sync += [job_c[f"r{c}{d}"].eq(v) for d, v in enumerate(rs)]
                    m.next = "C_GO"
                with m.State("C_GO"):
                    m.d.comb += [gs.start.eq(1), mode.eq(1)]
                    m.next = "C_RUN"
                with m.State("C_RUN"):
                    m.d.comb += mode.eq(1)
                    with m.If(gs.done):
                        m.next = "C_DONE"
                with m.State("C_DONE"):
                    done(status_ok(m, pay, nfix=0))
                    m.d.sync += [acc_valid.eq(0), k_tot.eq(0)]
            fin.done_state()
        return m
