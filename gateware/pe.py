"""Processing element: exact block dot product + aligned fixed-point accumulation.

A PE group serves ``n`` adjacent array columns (``n = config.pack``; 1 unless the
multipliers are ``dsp-packed``). Every cycle it takes ``lanes`` row mantissas ``a`` and,
per column, ``lanes`` column mantissas (already packed into one operand per lane for
``dsp-packed``, see :func:`pack_operand`), and runs the datapath of
:func:`hbfp_hw.bfp_matmul`:

====  ==========================================================================
s0    input registers (operands and control)
s1    ``lanes`` multipliers (LUT shift-add, DSP ``*``, or packed DSP ``*``), registered;
      ``config.mult_stages`` registers (3 for the DSP mappings: pipeline, product,
      and a fabric landing register)
s1b   (``dual_precision`` only, ``config.unpack_stages``) the lane term, registered:
      the full product, or in the narrow mode (``ctrl.mode4``) the middle field of
      ``(a0 + a1 2**s)(b1 + b0 2**s)``, i.e. ``a0 b0 + a1 b1`` (see :func:`pack_pair`)
s2    unpack the packed fields, adder tree over lanes -> partial sum, registered
      (``config.sum_stages`` registers: above 4 lanes the first level of pairs too)
s3    block dot product ``P = sum over the tile / lanes steps`` (exact integer)
s4    ``(P << G) >>> shift`` (alignment), registered
s5    ``acc[win] = (first_tile ? 0 : acc[win]) + aligned``
====  ==========================================================================

``config.pe_latency`` (``4 + mult_stages + sum_stages``) cycles from the inputs to the accumulator
update. With ``primitives="ecp5"`` the DSP mappings instantiate MULT18X18D directly,
its input, pipeline and output registers being s0 (operands) and the first two s1
registers, the third a fabric register:
yosys maps ``*`` to a combinational MULT18X18D with fabric registers around it, which
caps the 8-bit array at about 90 MHz. Without ``primitives`` (simulation, other
FPGAs) the same registers are fabric registers: same cycle behaviour either way.
"""

from __future__ import annotations

from amaranth.hdl import (Cat, ClockSignal, Const, Instance, Module, Mux, ResetSignal,
                          Signal, signed)
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..config.mac_array import DUAL_FIELD, DUAL_MAN_BITS, MacArrayConfig

__all__ = ["PE", "ctrl_layout", "pack_operand", "pack_pair", "packed_bits", "packed_bits_a",
           "lut_multiply", "PRIMITIVES", "ecp5_mult18x18d"]

#: Vendor primitives the PE can instantiate: ``None`` (portable, simulatable) or ``"ecp5"``.
PRIMITIVES = (None, "ecp5")
ECP5_DSP_WIDTH = 18


def ctrl_layout(cfg: MacArrayConfig) -> data.StructLayout:
    """Control travelling with the operands through the PE pipeline."""
    fields = {
        "valid": 1, "first_k": 1, "last_k": 1, "first_tile": 1,
        "win": range(cfg.windows), "shift": cfg.shift_bits,
    }
    if cfg.dual_precision:
        fields["mode4"] = 1
    return data.StructLayout(fields)


def packed_bits(cfg: MacArrayConfig, n: int) -> int:
    """Width of a packed column operand holding ``n`` fields."""
    return (n - 1) * cfg.prod_bits + cfg.mult_bits_b


def packed_bits_a(cfg: MacArrayConfig, r: int) -> int:
    """Width of a packed row operand holding ``r`` fields ``pack * prod_bits`` apart."""
    return (r - 1) * cfg.pack * cfg.prod_bits + cfg.mult_bits_a


def pack_pair(m: Module, lo, hi, *, name: str = "pp") -> Signal:
    """``lo + hi * 2**DUAL_FIELD`` for narrow mantissas ``|lo|, |hi| <= 7`` held
    sign-extended in wider signals: a concatenation of ``lo``'s low ``DUAL_FIELD`` bits
    with ``hi - sign(lo)`` (the borrow of a negative low field), no wide adder.

    A row operand ``a0 + a1 2**s`` times a column operand ``b1 + b0 2**s`` is
    ``a0 b1 + (a0 b0 + a1 b1) 2**s + a1 b0 2**(2s)``; with ``|a0 b1| <= 49`` and
    ``|a0 b0 + a1 b1| <= 98`` both below ``2**(s-1)``, the middle field is recovered
    exactly as ``sext(P[s:2s] + P[s-1])``."""
    s, w = DUAL_FIELD, DUAL_MAN_BITS
    lo_s = Signal(signed(max(s, len(lo))), name=f"{name}_lo")   # sign-extended
    hi_b = Signal(signed(w + 1), name=f"{name}_hi")
    m.d.comb += [lo_s.eq(lo), hi_b.eq(hi - lo_s[-1])]
    out = Signal(signed(s + w), name=name)
    m.d.comb += out.eq(Cat(lo_s[:s], hi_b[:w]))
    return out


def pack_operand(m: Module, cfg: MacArrayConfig, bs: list, *, side: str = "b") -> Signal:
    """``sum_i bs[i] * 2**(i*s)`` as a signed value, ``s = prod_bits`` for column
    operands (``side="b"``) and ``pack * prod_bits`` for row operands (``side="a"``):
    a concatenation with ``n - 1`` small decrements, no wide adder."""
    s = cfg.prod_bits if side == "b" else cfg.pack * cfg.prod_bits
    w = cfg.man_bits_b if side == "b" else cfg.man_bits_a
    n = len(bs)
    out = Signal(signed((n - 1) * s + w))
    if n == 1:
        m.d.comb += out.eq(bs[0])
        return out
    fields = []
    borrow = Const(0, 1)
    for i, b in enumerate(bs):
        f = Signal(signed(w + 1), name=f"pk{side}{i}")
        m.d.comb += f.eq(b - borrow)
        if i < n - 1:
            ext = Cat(f, *([f[-1]] * max(0, s - len(f))))
            fields.append(ext[:s])
            borrow = f[-1]
        else:
            fields.append(f[:w])
    m.d.comb += out.eq(Cat(*fields))
    return out


def lut_multiply(a, b, a_bits: int, b_bits: int):
    """Signed ``a * b`` as explicit shift-add partial products (never a ``$mul``)."""
    w = a_bits + b_bits
    terms = []
    for i in range(b_bits):
        t = Mux(b[i], a.as_signed(), 0)
        terms.append((t << i) if i < b_bits - 1 else -(t << i))
    acc = terms[0]
    for t in terms[1:]:
        acc = acc + t
    return acc.as_signed()[:w].as_signed()


def ecp5_mult18x18d(m: Module, a, b, p: Signal, *, name: str = "mult") -> None:
    """``p <= a * b`` (signed, ``len(a), len(b) <= 18``) through one ECP5 MULT18X18D with
    its input, pipeline and output registers on ``sync``: three cycles from ``a, b`` to
    ``p``, synchronous reset to 0 by the ``sync`` reset."""
    a18, b18 = Signal(signed(ECP5_DSP_WIDTH)), Signal(signed(ECP5_DSP_WIDTH))
    p36 = Signal(2 * ECP5_DSP_WIDTH)
    m.d.comb += [a18.eq(a), b18.eq(b), p.eq(p36[:len(p)])]
    ports = {f"i_A{i}": a18[i] for i in range(ECP5_DSP_WIDTH)}
    ports.update({f"i_B{i}": b18[i] for i in range(ECP5_DSP_WIDTH)})
    ports.update({f"i_C{i}": Const(0, 1) for i in range(ECP5_DSP_WIDTH)})
    ports.update({f"o_P{i}": p36[i] for i in range(2 * ECP5_DSP_WIDTH)})
    regs = {}
    for r in ("INPUTA", "INPUTB", "PIPELINE", "OUTPUT"):
        regs.update({f"p_REG_{r}_CLK": "CLK0", f"p_REG_{r}_CE": "CE0",
                     f"p_REG_{r}_RST": "RST0"})
    m.submodules[name] = Instance(
        "MULT18X18D", **regs, p_GSR="DISABLED", p_RESETMODE="SYNC",
        i_SIGNEDA=Const(1, 1), i_SIGNEDB=Const(1, 1), i_SOURCEA=Const(0, 1),
        i_SOURCEB=Const(0, 1), i_CLK0=ClockSignal("sync"), i_CE0=Const(1, 1),
        i_RST0=ResetSignal("sync"), **ports)


def _tree(values: list):
    while len(values) > 1:
        nxt = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
        if len(values) % 2:
            nxt.append(values[-1])
        values = nxt
    return values[0]


class PE(wiring.Component):
    """A group of ``r x n`` PEs (``r`` adjacent array rows, ``n`` adjacent columns)
    sharing one multiplier per lane.

    Ports
    -----
    a : In(ArrayLayout(signed(packed_bits_a(r)), lanes)) — the packed row operands
    b : In(ArrayLayout(signed(packed_bits(n)), lanes)) — the packed column operands
    ctrl : In(ctrl_layout)
    rd_win : In(range(windows)) — selects the accumulator shown on ``acc``
    acc : Out(ArrayLayout(signed(acc_bits), r * n)) — PE ``(i, j)`` at ``i * n + j``
    """

    def __init__(self, cfg: MacArrayConfig, *, n: int = 1, r: int = 1,
                 primitives: str | None = None):
        if not isinstance(cfg, MacArrayConfig):
            raise TypeError(f"cfg must be a MacArrayConfig, got {type(cfg).__name__}")
        if not isinstance(n, int) or not 1 <= n <= max(1, cfg.pack):
            raise ValueError(f"n={n!r} is out of range; accepted range is [1, {cfg.pack}]")
        if not isinstance(r, int) or not 1 <= r <= max(1, cfg.pack_rows):
            raise ValueError(f"r={r!r} is out of range; accepted range is "
                             f"[1, {cfg.pack_rows}]")
        if primitives not in PRIMITIVES:
            raise ValueError(f"primitives={primitives!r}; accepted values are "
                             f"{', '.join(map(repr, PRIMITIVES))}")
        self.cfg, self.n, self.r, self.primitives = cfg, n, r, primitives
        super().__init__({
            "a": In(data.ArrayLayout(signed(packed_bits_a(cfg, r)), cfg.lanes)),
            "b": In(data.ArrayLayout(signed(packed_bits(cfg, n)), cfg.lanes)),
            "ctrl": In(ctrl_layout(cfg)),
            "rd_win": In(range(cfg.windows)),
            "acc": Out(data.ArrayLayout(signed(cfg.acc_bits), r * n)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, n, L = self.cfg, self.n, self.cfg.lanes
        cl = ctrl_layout(cfg)
        pa, pb = packed_bits_a(cfg, self.r), packed_bits(cfg, n)
        # s0: input registers; s1: multipliers (cfg.mult_stages registers)
        c0 = Signal(cl)
        m.d.sync += c0.eq(self.ctrl)
        pw = pa + pb
        if cfg.dual_precision:     # bits that carry a term: the product or the 2s fields
            pw = max(cfg.prod_bits, 2 * DUAL_FIELD)
        prods = [Signal(signed(pw), name=f"prod{l}") for l in range(L)]
        use_dsp = (self.primitives == "ecp5" and cfg.mapping != "lut"
                   and max(pa, pb) <= ECP5_DSP_WIDTH)
        if use_dsp:
            assert cfg.mult_stages == 3
            for l in range(L):
                p_dsp = Signal(signed(pw), name=f"mult{l}_p")
                ecp5_mult18x18d(m, self.a[l], self.b[l], p_dsp, name=f"mult{l}")
                m.d.sync += prods[l].eq(p_dsp)          # landing register in the fabric
        else:
            a0 = Signal(data.ArrayLayout(signed(pa), L))
            b0 = Signal(data.ArrayLayout(signed(pb), L))
            m.d.sync += [a0.eq(self.a), b0.eq(self.b)]
            for l in range(L):
                if cfg.mapping == "lut":
                    prod = lut_multiply(a0[l], b0[l], pa, pb)
                else:
                    prod = a0[l] * b0[l]
                for st in range(cfg.mult_stages - 1):
                    pipe = Signal(signed(pw), name=f"mult{l}_p{st}")
                    m.d.sync += pipe.eq(prod)
                    prod = pipe
                m.d.sync += prods[l].eq(prod)
        c1 = c0
        for st in range(cfg.mult_stages):
            nxt = Signal(cl, name=f"c1_{st}")
            m.d.sync += nxt.eq(c1)
            c1 = nxt
        lane_terms = prods
        if cfg.dual_precision:
            # s1b: the lane term, registered: the product, or (narrow mode) the middle
            # field a0 b0 + a1 b1 with the low field's borrow added back
            s = DUAL_FIELD
            tw = max(cfg.prod_bits, s)
            lane_terms = []
            for l in range(L):
                mid = (prods[l][s:2 * s] + prods[l][s - 1])[:s].as_signed()
                t = Signal(signed(tw), name=f"term{l}")
                m.d.sync += t.eq(Mux(c1.mode4, mid, prods[l][:cfg.prod_bits].as_signed()))
                lane_terms.append(t)
            nxt = Signal(cl, name="c1_unpack")
            m.d.sync += nxt.eq(c1)
            c1 = nxt
        # s2: unpack fields, sum over lanes. Product (i, j) sits in the prod_bits field
        # starting at (i * pack + j) * prod_bits; the fields below it form a signed
        # number that borrows its sign bit, added back here.
        p = cfg.prod_bits
        F = self.r * n
        starts = [(i * cfg.pack + j) * p for i in range(self.r) for j in range(n)]
        sums = [Signal(signed(cfg.psum_bits), name=f"psum{k}") for k in range(F)]
        c2 = Signal(cl)
        for k, lo in enumerate(starts):
            terms = []
            for l in range(L):
                if F == 1:
                    terms.append(lane_terms[l])
                else:
                    hi = pw if k == F - 1 else lo + p
                    f = prods[l][lo:hi]
                    if lo > 0:
                        f = (f + prods[l][lo - 1])[:hi - lo]
                    terms.append(f.as_signed())
            if cfg.sum_stages == 2:       # register the first level of pairwise sums
                pairs = []
                for i in range(0, len(terms), 2):
                    t = terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                    r = Signal(signed(len(t)), name=f"pair{k}_{i // 2}")
                    m.d.sync += r.eq(t)
                    pairs.append(r)
                terms = pairs
            m.d.sync += sums[k].eq(_tree(terms))
        if cfg.sum_stages == 2:
            c1b = Signal(cl)
            m.d.sync += c1b.eq(c1)
            c1 = c1b
        m.d.sync += c2.eq(c1)
        # s3: block dot product over k steps
        pr = [Signal(signed(cfg.psum_bits), name=f"P{j}") for j in range(F)]
        c3 = Signal(cl)
        for j in range(F):
            with m.If(c2.valid):
                m.d.sync += pr[j].eq(Mux(c2.first_k, sums[j], pr[j] + sums[j]))
        m.d.sync += c3.eq(c2)
        # s4: align (registered); s5: accumulate
        c4 = Signal(cl)
        m.d.sync += c4.eq(c3)
        for j in range(F):
            aligned = Signal(signed(cfg.acc_bits), name=f"aligned{j}")
            m.d.sync += aligned.eq((pr[j] << cfg.guard_bits) >> c3.shift)
            update = c4.valid & c4.last_k
            if cfg.windows == 1:
                acc = Signal(signed(cfg.acc_bits), name=f"acc{j}")
                with m.If(update):
                    m.d.sync += acc.eq(Mux(c4.first_tile, 0, acc) + aligned)
                m.d.comb += self.acc[j].eq(acc)
                continue
            # One accumulator per window in a small memory (LUT RAM on FPGAs) rather
            # than windows x acc_bits flip-flops behind a windows:1 multiplexer: the
            # update reads and writes the same window in one cycle (asynchronous read),
            # the drain reads through a second asynchronous port.
            accs = Memory(shape=signed(cfg.acc_bits), depth=cfg.windows, init=[])
            m.submodules[f"acc{j}"] = accs
            rd, wr, out = accs.read_port(domain="comb"), accs.write_port(), \
                accs.read_port(domain="comb")
            m.d.comb += [rd.addr.eq(c4.win), wr.addr.eq(c4.win), wr.en.eq(update),
                         wr.data.eq(Mux(c4.first_tile, 0, rd.data) + aligned),
                         out.addr.eq(self.rd_win), self.acc[j].eq(out.data)]
        return m
