"""The CONV address generator of the GEMM sequencer (``conv=1``): the block-level im2col
map of ``docs/conv.md`` kept incrementally, with no multiplier on the operand address path.

A CONV job runs the GEMM loops -- output tile ``it``, output tile ``jt``, K-block ``kk`` --
and each counter also steps as a three-digit mixed-radix number (radices from the job).
The operand block of a beat is a function of those digits (the table below; ``hh = p * s +
i * d - pad``, and for dX ``p = (y + pad - i * d) / s``)::

    mode        it digits     jt digits     kk digits     a (block)          b (block)
    0 forward   (q, p, nb)    (ob)          (cb, j, i)    X[nb, cb, hh, ww]  W[ob, cb, i, j]
    1 dX        (x, y, nb)    (cb)          (ob, j, i)    dY[nb, ob, p, q]   W[ob, cb, i, j]
    2 dW        (ob)          (j, i, cb)    (q, p, nb)    dY[nb, ob, p, q]   X[nb, cb, hh, ww]

(digit 0 first). Operand A depends on ``it`` and ``kk`` only, B on ``jt`` and ``kk`` only.
Every quantity the map needs is a *linear form* of the digits, ``C + sum(c_d * digit_d)``
(:func:`coefficients`): the block index of each operand, the input row / column a tap
reads (``hh``, ``ww``: the padding test), and for dX the output row times ``Wo`` and the
output column before the division by the stride (``(yh * Wo) >> log2(s)`` is ``p * Wo``
whenever the tap is valid, i.e. ``yh`` a multiple of ``s``). So the block is::

    forward / dW      blk = L                     padding unless 0 <= hh < H, 0 <= ww < W
    dX (operand A)    blk = L + (L1 >> lsh) + (yw >> lsw)
                      padding unless 0 <= yh < Ho << lsh, yh a multiple of s (likewise yw)

Each form is kept as the GEMM block indices are: its value ``F``, the value after the next
K-block step ``F_k``, its value at ``kk = 0`` (``F_b``) and that after the next step of its
outer counter (``F_bo``), all registers. A digit step adds ``t0 = c0``; a carry into digit
1 adds ``t1 = c1 - (r0 - 1) * c0``, into digit 2 ``t2 = c2 - (r1 - 1) * c1 - (r0 - 1) * c0``.
The next state's value of a form is a choice among registers, so the read address is one
or (dX) three additions away from the sequencer's state instead of a chain of
multipliers.

The coefficients and steps are computed once per job, before the sequencer starts, by a
short program on one shared multiplier (:data:`BASE_PRODUCTS`, then the ``(r - 1) * c``
products of every form): :attr:`ConvAddress.SETUP_CLOCKS` clocks per CONV job. The job's
fields must stay constant from ``start`` to the end of the job (the GEMM engine holds them
for the whole command).
"""

from __future__ import annotations

from amaranth import Const, Mux, Signal, signed

__all__ = ["ConvAddress", "coefficients", "FORMS", "BASE_PRODUCTS"]

#: the linear forms: operand A's block, dX's ``yh * Wo``, A's row / column position;
#: operand B's block, row / column position
FORMS = ("ablk", "al1", "ah", "aw", "bblk", "bh", "bw")
#: width of the forms and of every setup value (two's complement)
WIDTH = 34
#: the size products the coefficients use: (name, factor, factor), computed in this order
#: (a later product may use an earlier one)
BASE_PRODUCTS = (("HW", "H", "W"), ("khkw", "kh", "kw"), ("HoWo", "Ho", "Wo"),
                 ("dhW", "dh", "W"), ("phW", "ph", "W"), ("dhWo", "dh", "Wo"),
                 ("phWo", "ph", "Wo"), ("gcHW", "gc", "HW"), ("gckk", "gc", "khkw"),
                 ("goHoWo", "go", "HoWo"))


def coefficients(j, R):
    """The three modes' tables ``{form: (C, (outer c0, c1, c2), (kk c0, c1, c2))}``.

    ``j``: the job (its fields), ``R``: the size products (:data:`BASE_PRODUCTS`) by name.
    The outer counter is ``it`` for the A forms and ``jt`` for the B forms. Forms a mode
    does not use are zero (their padding test then always passes)."""
    sw, sh = Const(1, 1) << j.lsw, Const(1, 1) << j.lsh
    wsh = j.W << j.lsh                # p's step in X's block index
    z = (0, 0, 0)
    unused = (0, z, z)
    x_blk = (-(R["phW"] + j.pw), (sw, wsh, R["gcHW"]), (R["HW"], j.dw, R["dhW"]))
    forward = {"ablk": x_blk, "al1": unused,
               "ah": (-j.ph, (0, sh, 0), (0, 0, j.dh)),
               "aw": (-j.pw, (sw, 0, 0), (0, j.dw, 0)),
               "bblk": (0, (R["gckk"], 0, 0), (R["khkw"], 1, j.kw)),
               "bh": unused, "bw": unused}
    dx = {"ablk": (0, (0, 0, R["goHoWo"]), (R["HoWo"], 0, 0)),
          "al1": (R["phWo"], (0, j.Wo, 0), (0, 0, -R["dhWo"])),
          "ah": (j.ph, (0, 1, 0), (0, 0, -j.dh)),
          "aw": (j.pw, (1, 0, 0), (0, -j.dw, 0)),
          "bblk": (0, (R["khkw"], 0, 0), (R["gckk"], 1, j.kw)),
          "bh": unused, "bw": unused}
    dw = {"ablk": (0, (R["HoWo"], 0, 0), (1, j.Wo, R["goHoWo"])),
          "al1": unused, "ah": unused, "aw": unused,
          "bblk": (x_blk[0], (j.dw, R["dhW"], R["HW"]), (sw, wsh, R["gcHW"])),
          "bh": (-j.ph, (0, j.dh, 0), (0, sh, 0)),
          "bw": (-j.pw, (j.dw, 0, 0), (sw, 0, 0))}
    return forward, dx, dw


class ConvAddress:
    """Builds the generator into the sequencer's module ``m``.

    ``j``: the job; ``ndig``: the next state's digits ``{"i"|"j"|"k": [d0, d1, d2]}``;
    ``start``: the job's start strobe. The sequencer starts on :attr:`go` (``start`` for
    GEMM jobs, ``SETUP_CLOCKS`` later for CONV jobs) and adds :meth:`inc` / :meth:`zero` /
    :meth:`begin` to its next-state statements where it steps, clears or starts the
    counters. :attr:`blk_a`, :attr:`blk_b`, :attr:`pad_a`, :attr:`pad_b`: the next state's
    operand blocks and whether they are padding blocks.
    """

    #: one size product per clock, then the two ``(r - 1) * c`` products of every
    #: form and counter, then the pipeline (operand, product, write-back) drains
    SETUP_CLOCKS = len(BASE_PRODUCTS) + 3 + 4 * len(FORMS) + 3

    def __init__(self, m, j, ndig, start):
        self.m, self.j = m, j
        fwd, dxm, dwm = j.cmode == 0, j.cmode == 1, j.cmode == 2

        def sig(name):
            return Signal(signed(WIDTH), name=f"ca_{name}")

        # ---- setup: the size products, the coefficients, the carry steps -----------
        R = {name: sig(name) for name, _, _ in BASE_PRODUCTS}
        tables = coefficients(j, R)

        def by_mode(vals):
            v = [Const(x, signed(WIDTH)) if isinstance(x, int) else x for x in vals]
            return Mux(fwd, v[0], Mux(dxm, v[1], v[2]))

        outer = {f: ("i" if f[0] == "a" else "j") for f in FORMS}
        coef, const = {}, {}
        for f in FORMS:
            const[f] = by_mode([t[f][0] for t in tables])
            for ci, c in ((1, outer[f]), (2, "k")):
                for d in range(3):
                    coef[f, c, d] = by_mode([t[f][ci][d] for t in tables])
        # steps: t0 = c0 (registered), t1, t2 written by the setup program
        t0, t1, t2, cst = {}, {}, {}, {}
        for f in FORMS:
            cst[f] = sig(f"C_{f}")
            m.d.sync += cst[f].eq(const[f])
            for c in (outer[f], "k"):
                t0[f, c], t1[f, c], t2[f, c] = (sig(f"t{n}_{f}_{c}") for n in range(3))
                m.d.sync += t0[f, c].eq(coef[f, c, 0])
        # the program: (x, y, writes) with writes (register, base or None): reg = base - x*y
        # (base None: reg = x*y; base "self": reg = reg - x*y)
        prog = [(getattr(j, a), R[b] if b in R else getattr(j, b), [(R[n], None)])
                for n, a, b in BASE_PRODUCTS]
        prog += [(0, 0, [])] * 3        # the last products land before the coefficients
        for f in FORMS:
            for c in (outer[f], "k"):
                r0, r1 = (getattr(j, f"r{c}{d}") for d in range(2))
                prog += [(r0 - 1, coef[f, c, 0], [(t1[f, c], coef[f, c, 1]),
                                                  (t2[f, c], coef[f, c, 2])]),
                         (r1 - 1, coef[f, c, 1], [(t2[f, c], "self")])]
        assert len(prog) + 3 == self.SETUP_CLOCKS
        busy = Signal(name="ca_busy")
        cnt = Signal(range(self.SETUP_CLOCKS + 1), name="ca_cnt")
        mx, my, pr = Signal(signed(18), name="ca_mx"), sig("my"), sig("pr")
        v1, v2 = Signal(name="ca_v1"), Signal(name="ca_v2")
        op1, op2 = (Signal(range(len(prog)), name=f"ca_op{n}") for n in (1, 2))
        last = self.SETUP_CLOCKS - 1
        with m.If(start & j.conv):
            m.d.sync += [busy.eq(1), cnt.eq(0)]
        with m.Elif(busy):
            m.d.sync += cnt.eq(cnt + 1)
            with m.If(cnt == last):
                m.d.sync += busy.eq(0)
        self.go = Signal(name="ca_go")
        m.d.comb += self.go.eq(Mux(j.conv, busy & (cnt == last), start))
        m.d.sync += [v1.eq(busy & (cnt < len(prog))), op1.eq(cnt), v2.eq(v1), op2.eq(op1),
                     pr.eq(mx * my)]
        with m.Switch(cnt):
            for i, (x, y, _) in enumerate(prog):
                with m.Case(i):
                    m.d.sync += [mx.eq(x), my.eq(y)]
        with m.If(v2):
            with m.Switch(op2):
                for i, (_, _, writes) in enumerate(prog):
                    with m.Case(i):
                        for reg, base in writes:
                            if base is None:
                                m.d.sync += reg.eq(pr)
                            else:
                                m.d.sync += reg.eq((reg if isinstance(base, str) else base) - pr)

        # ---- the forms, stepped with the sequencer's counters ------------------------
        top = {}
        for c in "ijk":
            r = [getattr(j, f"r{c}{d}") for d in range(2)]
            top[c] = (ndig[c][0] == r[0] - 1, ndig[c][1] == r[1] - 1)
        self.F, self._stmts = {}, {}
        nF = {}
        for f in FORMS:
            F, Fk, Fb, Fbo = (sig(f"{n}_{f}") for n in ("F", "Fk", "Fb", "Fbo"))
            nF[f], nFb = sig(f"nF_{f}"), sig(f"nFb_{f}")
            m.d.comb += [nF[f].eq(F), nFb.eq(Fb)]
            m.d.sync += [F.eq(nF[f]), Fb.eq(nFb)]
            for reg, base, c in ((Fk, nF[f], "k"), (Fbo, nFb, outer[f])):
                step = Mux(top[c][0], Mux(top[c][1], t2[f, c], t1[f, c]), t0[f, c])
                m.d.sync += reg.eq(base + step)
            self._stmts[f] = {"k_inc": [nF[f].eq(Fk)], "k_zero": [nF[f].eq(Fb)],
                              "o_inc": [nFb.eq(Fbo), nF[f].eq(Fbo)],
                              "o_zero": [nFb.eq(cst[f]), nF[f].eq(cst[f])]}
        self.outer = outer

        # ---- the blocks and the padding tests of the next state --------------------
        # widths from the job layout: a size shifted by the largest log2 stride
        smax = (1 << len(j.lsh)) - 1
        lim = {n: Signal(len(j.Ho) + smax, name=f"ca_lim_{n}") for n in ("ah", "aw", "bh", "bw")}
        msk = {n: Signal(smax, name=f"ca_msk_{n}") for n in ("ah", "aw")}
        m.d.sync += [lim["ah"].eq(Mux(fwd, j.H, Mux(dxm, j.Ho << j.lsh, 1))),
                     lim["aw"].eq(Mux(fwd, j.W, Mux(dxm, j.Wo << j.lsw, 1))),
                     lim["bh"].eq(Mux(dwm, j.H, 1)), lim["bw"].eq(Mux(dwm, j.W, 1)),
                     msk["ah"].eq(Mux(dxm, (Const(1, smax + 1) << j.lsh) - 1, 0)),
                     msk["aw"].eq(Mux(dxm, (Const(1, smax + 1) << j.lsw) - 1, 0))]

        def inside(n):
            v = nF[n]
            ok = (v >= 0) & (v < lim[n])
            return ok & ((v[:smax] & msk[n]) == 0) if n in msk else ok

        self.blk_a = Signal(32, name="ca_blk_a")
        self.blk_b = Signal(32, name="ca_blk_b")
        self.pad_a, self.pad_b = Signal(name="ca_pad_a"), Signal(name="ca_pad_b")
        m.d.comb += [
            self.blk_a.eq(nF["ablk"] + Mux(dxm, (nF["al1"] >> j.lsh) + (nF["aw"] >> j.lsw),
                                           0)),
            self.blk_b.eq(nF["bblk"]),
            self.pad_a.eq(~(inside("ah") & inside("aw"))),
            self.pad_b.eq(~(inside("bh") & inside("bw")))]

    def _forms(self, counter):
        return [f for f in FORMS if counter == "k" or self.outer[f] == counter]

    def inc(self, counter):
        """Statements for a step of ``counter`` (``"i"``, ``"j"`` or ``"k"``)."""
        key = "k_inc" if counter == "k" else "o_inc"
        return [s for f in self._forms(counter) for s in self._stmts[f][key]]

    def zero(self, counter):
        """Statements for clearing ``counter`` (the forms return to ``kk = 0`` or to
        their constant)."""
        key = "k_zero" if counter == "k" else "o_zero"
        return [s for f in self._forms(counter) for s in self._stmts[f][key]]

    def begin(self):
        """Statements for the job's start: every form at its constant."""
        return [s for f in FORMS for s in self._stmts[f]["o_zero"]]
