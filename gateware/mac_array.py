"""The BFP MAC array: ``rows x cols`` PEs, ``lanes`` MACs each per cycle.

Computes ``C = A @ B`` for HyperBlock operands (one exponent per ``tile x tile`` tile)
bit-exactly as :func:`hbfp_hw.bfp_matmul`. See ``docs/mac_array.md``.

Streams
-------
``a``, ``b`` (in): operand beats, payload :func:`operand_layout`::

    data[tile]   one stored row of a tile (signed mantissas)
    exp          biased exponent code (all ones: invalid block)
    transpose    the stored tile is the transpose of the operand tile
    header       1: exponent header beat (``data`` ignored)
    last         row beat of the job's final K tile (all its rows)

A *job* computes one ``tile x tile`` output tile ``(it, jt)``. Per job each operand
stream carries first one header beat per K tile (the exponents of A's row strip /
B's column strip, so ``e_ref = rowmax + colmax`` is known before any product), then
``tile`` row beats per K tile, K tiles in order, ``last`` on the rows of the final
K tile.

``o`` (out): payload :func:`output_layout` (``data[cols]`` FP32 bit patterns, ``last``):
for each output window ``(rg, cg)`` (``rg`` major) and each row ``r`` of the window,
one beat with ``C[it*T + rg*rows + r, jt*T + cg*cols + c]`` for ``c < cols``.

Two build options serve the accelerator top's K-split GEMMs (``GemmFlag.EXT_EREF`` /
``ACCUMULATE``); both default off, leaving the ports above unchanged:

``ext_eref=True`` adds the operand fields ``ref`` and ``eref``: a header beat with
``ref=1`` carries a reference exponent (unbiased, signed, clamped by the sender to
``[-exp_bias, ref_exponent_limit(cfg)]``) that enters the job's maximum as a valid
exponent, exactly like the golden model's all-zero reference K block.

``carry=True`` adds a carry stage before the FP32 converters: the accumulators of each
drain beat are added to ``cin`` (``carry_bits(cfg)`` wide; NaN flags OR-ed with
``cin_nan``), and the sums leave on ``acc_o`` (``acc_o_valid``, in output-beat order)
while their FP32 conversion goes to ``o``. ``cin_take`` is high in the cycle a drain beat
is issued; ``cin``/``cin_nan`` must hold that beat's carry in the next cycle (a memory
read port addressed by a counter advanced on ``cin_take``).

``runtime_frac=True`` adds the operand field ``frac`` (unsigned, wide enough for
``cfg.frac_a`` / ``cfg.frac_b``): the fraction bits ``man_bits - 2`` of the job's
operand format, on every exponent header beat of the job (the ``frac`` of a reference
beat, ``ref=1``, is ignored). The array then serves formats
narrower than its ports (mantissas sign-extended to the port width, e.g. HBFP4 in an
8-bit array): the integer datapath is the same, only the FP32 scale of the job becomes
``e_ref - G - frac_a - frac_b`` with the job's values. :func:`operand_frac` gives the
value for a format.
"""

from __future__ import annotations


from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from ..config.mac_array import DUAL_MAN_BITS, MacArrayConfig
from ..formats import fraction_bits
from .fp32_convert import SCALE_BITS, Fp32Convert
from .pe import PE, PRIMITIVES, ctrl_layout, pack_operand, pack_pair
from .tile_buffer import TileBuffer

__all__ = ["MacArray", "operand_layout", "output_layout", "gemm_beats", "assemble_output",
           "generate", "register_cli", "pack_struct", "unpack_struct",
           "ref_exponent_limit", "ref_bits", "carry_bits", "frac_width", "operand_frac"]

EXP_SUM_BITS = 13


def ref_exponent_limit(cfg: MacArrayConfig) -> int:
    """Largest reference exponent (one operand, unbiased) that changes any result.

    With ``e_ref >= E_hi = max(2*emax + shift_max, 128 + G + fa + fb)`` every valid
    tile's alignment shift saturates (each term is 0 or -1) and every non-zero
    accumulator converts to +-Inf, so all such ``e_ref`` give the same bits. The other
    operand's reference is at least ``-exp_bias`` (code 0), hence the limit
    ``E_hi + exp_bias``: a reference clamped to it leaves every output unchanged.

    With ``runtime_frac`` a job's fraction bits are at most ``cfg.frac_a`` /
    ``cfg.frac_b``, so its scale ``e_ref - G - fa - fb`` is at least that of the
    widest format: ``E_hi`` computed with the widest fractions still makes every
    non-zero accumulator convert to +-Inf, and the limit stays valid for narrower
    formats.
    """
    emax = cfg.exp_invalid_code - 1 - cfg.exp_bias
    e_hi = max(2 * emax + cfg.shift_max, 128 + cfg.guard_bits + cfg.frac_a + cfg.frac_b)
    return e_hi + cfg.exp_bias


def ref_bits(cfg: MacArrayConfig) -> int:
    """Signed width of a clamped reference exponent (``ref_exponent_limit`` and the
    front end's ``-2**exp_bits`` "no valid block" value)."""
    return max(ref_exponent_limit(cfg).bit_length(), cfg.exp_bits) + 1


def carry_bits(cfg: MacArrayConfig) -> int:
    """Signed width of an accumulator carried over several GEMMs (``carry=True``).

    One GEMM's accumulator fits ``acc_bits`` (at most ``ceil(k_max / T)`` K tiles).
    Over GEMMs whose K add up to at most ``k_max``, each GEMM pads its K to whole tiles,
    so up to ``k_max`` tiles (one per K element) can contribute:
    ``|acc| <= k_max * T * mmax_a * mmax_b * 2**G``.
    """
    bound = cfg.k_max * cfg.tile * cfg.mmax_a * cfg.mmax_b << cfg.guard_bits
    return max(cfg.acc_bits, bound.bit_length() + 1)


def frac_width(man_bits: int) -> int:
    """Width of the unsigned ``frac`` field for ports of ``man_bits``-bit mantissas:
    holds every fraction-bit count ``0 .. man_bits - 2``."""
    return max(1, fraction_bits(man_bits).bit_length())


def operand_frac(cfg: MacArrayConfig, man_bits: int, operand: str = "a") -> int:
    """The ``frac`` header field (``man_bits - 2``) of an operand of ``man_bits``-bit
    mantissas on port ``operand`` (``"a"`` or ``"b"``) of a ``runtime_frac`` array.

    ``man_bits`` must be in ``[2, port width]``: narrower mantissas travel
    sign-extended in the port's width."""
    if operand not in ("a", "b"):
        raise ValueError(f"operand={operand!r}; accepted values are 'a', 'b'")
    hi = cfg.man_bits_a if operand == "a" else cfg.man_bits_b
    if not isinstance(man_bits, int) or not 2 <= man_bits <= hi:
        raise ValueError(f"man_bits={man_bits!r} of operand {operand} is out of range; "
                         f"accepted range is [2, {hi}] (the port's man_bits_{operand})")
    return fraction_bits(man_bits)


def operand_layout(cfg: MacArrayConfig, man_bits: int, ext_eref: bool = False,
                   runtime_frac: bool = False) -> data.StructLayout:
    fields = {
        "data": data.ArrayLayout(signed(man_bits), cfg.tile),
        "exp": cfg.exp_bits, "transpose": 1, "header": 1, "last": 1,
    }
    if ext_eref:
        fields.update({"ref": 1, "eref": signed(ref_bits(cfg))})
    if runtime_frac:
        fields["frac"] = frac_width(man_bits)
    return data.StructLayout(fields)


def output_layout(cfg: MacArrayConfig) -> data.StructLayout:
    return data.StructLayout({"data": data.ArrayLayout(32, cfg.cols), "last": 1})


def _emax_bits(cfg: MacArrayConfig, ext_eref: bool) -> int:
    return ref_bits(cfg) if ext_eref else cfg.exp_bits + 1


def _esum_bits(cfg: MacArrayConfig, ext_eref: bool) -> int:
    return max(EXP_SUM_BITS, _emax_bits(cfg, ext_eref) + 2)


def _meta_layout(cfg: MacArrayConfig, ext_eref: bool = False,
                 runtime_frac: bool = False) -> data.StructLayout:
    fields = {"exp": cfg.exp_bits, "emax": signed(_emax_bits(cfg, ext_eref)),
              "inv": 1, "first": 1, "last": 1}
    if runtime_frac:
        fields["frac"] = max(frac_width(cfg.man_bits_a), frac_width(cfg.man_bits_b))
    if cfg.dual_precision:     # the operand's format has at most DUAL_MAN_BITS bits
        fields["narrow"] = 1
    return data.StructLayout(fields)


class _OperandFrontEnd(wiring.Component):
    """Consumes header beats (running max of valid exponents, invalid flag) and
    forwards row beats to a tile buffer with the job's header in ``meta`` (with
    ``runtime_frac`` also the job's ``frac``, taken from its header beats)."""

    def __init__(self, cfg: MacArrayConfig, man_bits: int, ext_eref: bool = False,
                 runtime_frac: bool = False):
        self.cfg, self.ext_eref, self.runtime_frac = cfg, ext_eref, runtime_frac
        from .tile_buffer import row_layout
        super().__init__({
            "i": In(stream.Signature(operand_layout(cfg, man_bits, ext_eref, runtime_frac))),
            "o": Out(stream.Signature(row_layout(cfg.tile, man_bits,
                                                 _meta_layout(cfg, ext_eref, runtime_frac)))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        lo = -(2 ** cfg.exp_bits)
        eb = _emax_bits(cfg, self.ext_eref)
        emax = Signal(signed(eb), init=lo)
        inv = Signal()
        after_hdr = Signal()
        p = self.i.payload
        e = Signal(signed(eb))
        is_inv = Signal()
        if self.runtime_frac:
            frac = Signal(len(p.frac))
        if cfg.dual_precision:
            narrow = Signal()
        m.d.comb += [e.eq(p.exp - cfg.exp_bias), is_inv.eq(p.exp == cfg.exp_invalid_code)]
        if self.ext_eref:   # a reference exponent: valid, enters the maximum
            with m.If(p.ref):
                m.d.comb += [e.eq(p.eref), is_inv.eq(0)]
        with m.If(p.header):
            m.d.comb += self.i.ready.eq(1)
            with m.If(self.i.valid):
                base_max = Mux(after_hdr, emax, lo)
                base_inv = Mux(after_hdr, inv, 0)
                m.d.sync += [emax.eq(Mux(~is_inv & (e > base_max), e, base_max)),
                             inv.eq(base_inv | is_inv), after_hdr.eq(1)]
                if self.runtime_frac:
                    # from the exponent headers; a reference beat's frac is ignored
                    with m.If(~p.ref if self.ext_eref else 1):
                        m.d.sync += frac.eq(p.frac)
                        if cfg.dual_precision:
                            m.d.sync += narrow.eq(p.frac <= fraction_bits(DUAL_MAN_BITS))
        with m.Else():
            m.d.comb += [self.o.valid.eq(self.i.valid), self.i.ready.eq(self.o.ready),
                         self.o.payload.data.eq(p.data),
                         self.o.payload.transpose.eq(p.transpose),
                         self.o.payload.meta.exp.eq(p.exp),
                         self.o.payload.meta.emax.eq(emax),
                         self.o.payload.meta.inv.eq(inv),
                         self.o.payload.meta.first.eq(after_hdr),
                         self.o.payload.meta.last.eq(p.last)]
            if self.runtime_frac:
                m.d.comb += self.o.payload.meta.frac.eq(frac)
            if cfg.dual_precision:
                m.d.comb += self.o.payload.meta.narrow.eq(narrow)
            with m.If(self.i.valid & self.o.ready):
                m.d.sync += after_hdr.eq(0)
        return m


class MacArray(wiring.Component):
    """The MAC array with its two tile buffers, controller and FP32 output stage.

    Peak throughput ``rows * cols * lanes`` MACs per cycle.
    """

    def __init__(self, cfg: MacArrayConfig, *, primitives: str | None = None,
                 ext_eref: bool = False, carry: bool = False,
                 runtime_frac: bool | None = None):
        if not isinstance(cfg, MacArrayConfig):
            raise TypeError(f"cfg must be a MacArrayConfig, got {type(cfg).__name__}")
        if runtime_frac is None:
            runtime_frac = cfg.dual_precision
        if cfg.dual_precision and not runtime_frac:
            raise ValueError("a dual_precision array selects its mode from the jobs' frac "
                             "fields: runtime_frac must be True (or None)")
        if primitives not in PRIMITIVES:
            raise ValueError(f"primitives={primitives!r}; accepted values are "
                             f"{', '.join(map(repr, PRIMITIVES))}")
        self.cfg, self.primitives = cfg, primitives
        self.ext_eref, self.carry = bool(ext_eref), bool(carry)
        self.runtime_frac = bool(runtime_frac)
        ports = {
            "a": In(stream.Signature(operand_layout(cfg, cfg.man_bits_a, self.ext_eref,
                                                    self.runtime_frac))),
            "b": In(stream.Signature(operand_layout(cfg, cfg.man_bits_b, self.ext_eref,
                                                    self.runtime_frac))),
            "o": Out(stream.Signature(output_layout(cfg))),
        }
        if self.carry:
            cw = carry_bits(cfg)
            ports.update({"cin": In(data.ArrayLayout(signed(cw), cfg.cols)), "cin_nan": In(1),
                          "cin_take": Out(1),
                          "acc_o": Out(data.ArrayLayout(signed(cw), cfg.cols)),
                          "acc_o_nan": Out(1), "acc_o_valid": Out(1)})
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        T, R, C, L = cfg.tile, cfg.rows, cfg.cols, cfg.lanes
        rf = self.runtime_frac
        meta = _meta_layout(cfg, self.ext_eref, rf)
        ES = _esum_bits(cfg, self.ext_eref)
        m.submodules.fe_a = fe_a = _OperandFrontEnd(cfg, cfg.man_bits_a, self.ext_eref, rf)
        m.submodules.fe_b = fe_b = _OperandFrontEnd(cfg, cfg.man_bits_b, self.ext_eref, rf)
        dual = cfg.dual_precision
        BL = 2 * L if dual else L     # lanes read per cycle: two per multiplier if dual
        m.submodules.buf_a = buf_a = TileBuffer(tile=T, lanes=BL, nvec=R, width=cfg.man_bits_a,
                                                meta_layout=meta, col_major=False)
        m.submodules.buf_b = buf_b = TileBuffer(tile=T, lanes=BL, nvec=C, width=cfg.man_bits_b,
                                                meta_layout=meta, col_major=True)
        wiring.connect(m, wiring.flipped(self.a), fe_a.i)
        wiring.connect(m, wiring.flipped(self.b), fe_b.i)
        wiring.connect(m, fe_a.o, buf_a.i)
        wiring.connect(m, fe_b.o, buf_b.i)

        # ---- issue controller ------------------------------------------------
        cl = ctrl_layout(cfg)
        nwc = T // C
        win = Signal(range(cfg.windows))
        ks = Signal(range(cfg.k_steps))
        busy_drain = Signal()            # waiting for / draining the accumulators
        issue = Signal(cl)
        ea_i, eb_i = Signal(cfg.exp_bits), Signal(cfg.exp_bits)
        esum_i, inv_i, first_i = Signal(signed(ES)), Signal(), Signal()
        go = ~busy_drain & buf_a.rd_valid & buf_b.rd_valid
        if dual:
            # ks counts 2L-lane K slices (the tile-buffer read address), h the half of
            # the slice a wide-mode step uses. Narrow mode (both operands' formats
            # narrow): one step per slice, T / 2L steps; wide mode: two, T / L steps.
            # The mode only enters the counters' next state, not the read address.
            mode4, last_k, h = Signal(), Signal(), Signal()
            half1 = Signal()             # h, aligned with the registered read
            m.d.comb += [mode4.eq(buf_a.rd_meta.narrow & buf_b.rd_meta.narrow),
                         last_k.eq((ks == cfg.k_steps_narrow - 1) & (h | mode4)),
                         issue.mode4.eq(mode4)]
            m.d.sync += half1.eq(h)
            first_k = (ks == 0) & ~h

            def is_last_k():
                return last_k
        else:
            first_k = ks == 0

            def is_last_k():
                return ks == cfg.k_steps - 1
        m.d.comb += [buf_a.rd_pos.eq(win // nwc), buf_b.rd_pos.eq(win % nwc),
                     buf_a.rd_k.eq(ks), buf_b.rd_k.eq(ks),
                     issue.valid.eq(go), issue.first_k.eq(first_k),
                     issue.last_k.eq(is_last_k()), issue.win.eq(win),
                     issue.first_tile.eq(buf_a.rd_meta.first),
                     ea_i.eq(buf_a.rd_meta.exp), eb_i.eq(buf_b.rd_meta.exp),
                     esum_i.eq(buf_a.rd_meta.emax + buf_b.rd_meta.emax),
                     inv_i.eq(buf_a.rd_meta.inv | buf_b.rd_meta.inv),
                     first_i.eq(buf_a.rd_meta.first)]
        tile_done = go & is_last_k() & (win == cfg.windows - 1)
        start_drain = Signal()
        with m.If(go):
            with m.If(is_last_k()):
                m.d.sync += ks.eq(0)
                if dual:
                    m.d.sync += h.eq(0)
                with m.If(win == cfg.windows - 1):
                    m.d.sync += win.eq(0)
                with m.Else():
                    m.d.sync += win.eq(win + 1)
            with m.Else():
                if dual:
                    with m.If(mode4 | h):
                        m.d.sync += [ks.eq(ks + 1), h.eq(0)]
                    with m.Else():
                        m.d.sync += h.eq(1)
                else:
                    m.d.sync += ks.eq(ks + 1)
        m.d.comb += [buf_a.release.eq(tile_done), buf_b.release.eq(tile_done),
                     start_drain.eq(tile_done & buf_a.rd_meta.last)]

        # ---- stage d1: aligned with the registered tile-buffer read ---------------
        c1 = Signal(cl)
        te1, tinv1 = Signal(signed(ES)), Signal()     # tile exponent Ea + Eb
        esum1, inv1, first1 = Signal(signed(ES)), Signal(), Signal()
        m.d.sync += [c1.eq(issue), esum1.eq(esum_i), inv1.eq(inv_i), first1.eq(first_i),
                     te1.eq(ea_i + eb_i - 2 * cfg.exp_bias),
                     tinv1.eq((ea_i == cfg.exp_invalid_code) | (eb_i == cfg.exp_invalid_code))]
        job_eref = Signal(signed(ES))
        job_nan = Signal()
        with m.If(c1.valid & first1):
            m.d.sync += [job_eref.eq(esum1), job_nan.eq(inv1)]
        # runtime_frac: the job's fraction bits fa + fb travel in the tiles' meta and are
        # taken with job_eref, so a drain converts with its own job's scale while the
        # next job's tiles load
        if rf:
            fsum1 = Signal(range(cfg.frac_a + cfg.frac_b + 1))
            job_fsum = Signal.like(fsum1)
            m.d.sync += fsum1.eq(buf_a.rd_meta.frac + buf_b.rd_meta.frac)
            with m.If(c1.valid & first1):
                m.d.sync += job_fsum.eq(fsum1)
        eref = Mux(first1, esum1, job_eref)
        diff = Signal(signed(ES + 1))
        m.d.comb += diff.eq(eref - te1)
        shift = Signal(cfg.shift_bits)
        m.d.comb += shift.eq(Mux(tinv1 | (diff >= cfg.shift_max), cfg.shift_max,
                                 Mux(diff < 0, 0, diff)))
        # stage d2: register the shift (it fans out to every PE) and the operands
        ctrl_pe = Signal(cl)
        m.d.sync += [ctrl_pe.eq(c1), ctrl_pe.shift.eq(shift)]

        # ---- PE array ----------------------------------------------------------
        n, nr = cfg.pack, cfg.pack_rows
        groups = [(g0, min(n, C - g0)) for g0 in range(0, C, n)]
        row_groups = [(r0, min(nr, R - r0)) for r0 in range(0, R, nr)]
        rd_win = Signal(range(cfg.windows))
        accs = [[None] * C for _ in range(R)]
        packed = {}
        a_reg = {}
        if dual:
            # one PE per multiplier (packing (1, 1)); lane l multiplies K elements l
            # (wide mode: l + L in the odd k steps) or, narrow mode, the pair (l, l + L):
            # (a_l + a_{l+L} 2**s)(b_{l+L} + b_l 2**s) has a_l b_l + a_{l+L} b_{l+L} in
            # its middle field (pe.pack_pair)
            for side, buf, nv, store, wb in (("a", buf_a, R, a_reg, cfg.mult_bits_a),
                                             ("b", buf_b, C, packed, cfg.mult_bits_b)):
                for v in range(nv):
                    for lane in range(L):
                        x, y = buf.rd_data[v][lane], buf.rd_data[v][lane + L]
                        wide = Mux(half1, y, x)
                        nar = (pack_pair(m, x, y, name=f"pp{side}_{v}_{lane}") if side == "a"
                               else pack_pair(m, y, x, name=f"pp{side}_{v}_{lane}"))
                        reg = Signal(signed(wb), name=f"{side}reg_{v}_{lane}")
                        m.d.sync += reg.eq(Mux(c1.mode4, nar, wide))
                        store[v, lane] = reg
        else:
            for g0, gn in groups:
                for lane in range(L):
                    pk = pack_operand(m, cfg, [buf_b.rd_data[g0 + j][lane] for j in range(gn)])
                    packed[g0, lane] = Signal.like(pk, name=f"bpk_{g0}_{lane}")
                    m.d.sync += packed[g0, lane].eq(pk)
            for r0, rn in row_groups:
                for lane in range(L):
                    pk = pack_operand(m, cfg, [buf_a.rd_data[r0 + i][lane] for i in range(rn)],
                                      side="a")
                    a_reg[r0, lane] = Signal.like(pk, name=f"areg_{r0}_{lane}")
                    m.d.sync += a_reg[r0, lane].eq(pk)
        for r0, rn in row_groups:
            for g0, gn in groups:
                pe = PE(cfg, n=gn, r=rn, primitives=self.primitives)
                m.submodules[f"pe_{r0}_{g0}"] = pe
                m.d.comb += [pe.ctrl.eq(ctrl_pe), pe.rd_win.eq(rd_win)]
                for lane in range(L):
                    m.d.comb += [pe.a[lane].eq(a_reg[r0, lane]),
                                 pe.b[lane].eq(packed[g0, lane])]
                for i in range(rn):
                    for j in range(gn):
                        accs[r0 + i][g0 + j] = pe.acc[i * gn + j]

        # ---- drain: accumulators -> FP32 -> output FIFO ------------------------------
        wait_cycles = cfg.pe_latency + 3
        wait = Signal(range(wait_cycles + 1), init=wait_cycles)
        d_active = Signal()
        d_win = Signal(range(cfg.windows))
        d_row = Signal(range(R))
        olay = output_layout(cfg)
        depth = Fp32Convert.LATENCY + 4 + int(self.carry)
        m.submodules.ofifo = ofifo = fifo.SyncFIFOBuffered(width=olay.size, depth=depth)
        inflight = Signal(range(depth + 1))
        can_issue = (ofifo.level + inflight) < depth - 1
        d_issue = Signal()
        d_last = Signal()
        m.d.comb += rd_win.eq(d_win)
        # the wait counter is reloaded in every idle cycle rather than by start_drain,
        # which keeps the issue logic (tile buffers -> go -> start_drain) off its input
        with m.If(start_drain):
            m.d.sync += busy_drain.eq(1)
        with m.If(~busy_drain):
            m.d.sync += wait.eq(wait_cycles)
        with m.If(busy_drain & ~d_active):
            with m.If(wait == 0):
                m.d.sync += [d_active.eq(1), d_win.eq(0), d_row.eq(0)]
            with m.Else():
                m.d.sync += wait.eq(wait - 1)
        with m.If(d_active & can_issue):
            m.d.comb += [d_issue.eq(1),
                         d_last.eq((d_win == cfg.windows - 1) & (d_row == R - 1))]
            with m.If(d_row == R - 1):
                m.d.sync += d_row.eq(0)
                with m.If(d_win == cfg.windows - 1):
                    m.d.sync += [d_active.eq(0), busy_drain.eq(0)]
                with m.Else():
                    m.d.sync += d_win.eq(d_win + 1)
            with m.Else():
                m.d.sync += d_row.eq(d_row + 1)
        # row select register, (carry stage,) then converters
        sel = [Signal(signed(cfg.acc_bits), name=f"sel{c}") for c in range(C)]
        s_valid, s_last = Signal(), Signal()
        for c in range(C):
            with m.Switch(d_row):
                for r in range(R):
                    with m.Case(r):
                        m.d.sync += sel[c].eq(accs[r][c])
        m.d.sync += [s_valid.eq(d_issue), s_last.eq(d_last)]
        scale = Signal(signed(SCALE_BITS))
        if rf:
            m.d.comb += scale.eq(job_eref - cfg.guard_bits - job_fsum)
        else:
            m.d.comb += scale.eq(job_eref - cfg.guard_bits - cfg.frac_a - cfg.frac_b)
        conv_acc, conv_valid_i, conv_last, conv_scale, conv_nan = (
            sel, s_valid, s_last, scale, job_nan)
        conv_bits = cfg.acc_bits
        if self.carry:
            # carry stage: sum = acc + cin (registered with the scale and NaN flag)
            conv_bits = carry_bits(cfg)
            csum = [Signal(signed(conv_bits), name=f"csum{c}") for c in range(C)]
            c_valid, c_last, c_nan = Signal(), Signal(), Signal()
            c_scale = Signal(signed(SCALE_BITS))
            m.d.sync += [csum[c].eq(sel[c] + self.cin[c]) for c in range(C)]
            m.d.sync += [c_valid.eq(s_valid), c_last.eq(s_last), c_scale.eq(scale),
                         c_nan.eq(job_nan | self.cin_nan)]
            m.d.comb += [self.cin_take.eq(d_issue), self.acc_o_valid.eq(c_valid),
                         self.acc_o_nan.eq(c_nan)]
            m.d.comb += [self.acc_o[c].eq(csum[c]) for c in range(C)]
            conv_acc, conv_valid_i, conv_last, conv_scale, conv_nan = (
                csum, c_valid, c_last, c_scale, c_nan)
        last_pipe = [Signal(name=f"last_p{i}") for i in range(Fp32Convert.LATENCY)]
        m.d.sync += [last_pipe[0].eq(conv_last)] + [last_pipe[i].eq(last_pipe[i - 1])
                                                    for i in range(1, len(last_pipe))]
        out_bits = []
        conv_valid = None
        for c in range(C):
            cv = Fp32Convert(acc_bits=conv_bits)
            m.submodules[f"fp32_{c}"] = cv
            m.d.comb += [cv.i_valid.eq(conv_valid_i), cv.acc.eq(conv_acc[c]),
                         cv.scale.eq(conv_scale), cv.nan.eq(conv_nan)]
            out_bits.append(cv.bits)
            conv_valid = cv.o_valid
        word = Signal(olay)
        for c in range(C):
            m.d.comb += word.data[c].eq(out_bits[c])
        m.d.comb += [word.last.eq(last_pipe[-1]),
                     ofifo.w_data.eq(word.as_value()), ofifo.w_en.eq(conv_valid)]
        m.d.sync += inflight.eq(inflight + d_issue - conv_valid)
        m.d.comb += [self.o.valid.eq(ofifo.r_rdy), self.o.payload.eq(ofifo.r_data),
                     ofifo.r_en.eq(self.o.ready)]
        return m


# ---- host side: beats and reassembly (gateware/mac_array_beats.py) ---------------------
from .mac_array_beats import (assemble_output, gemm_beats,  # noqa: E402, F401
                              output_beats_per_job, pack_struct, unpack_struct)

# ---- generation / CLI (gateware/mac_array_gen.py) --------------------------------------
from .mac_array_gen import generate, port_map, register_cli  # noqa: E402, F401
