"""Sparse MAC engine for transposable ``n:m`` weights (one ``m x m`` tile per beat).

The engine stores, per beat, only what :class:`hbfp_hw.sparsity.SparseBFPWeight` keeps
of one tile: the ``m·n`` kept mantissas (slot ``r·n + s`` = row ``r``, ``s``-th kept
column) and their column indices. It has ``m·n`` multipliers; a dense ``m x m`` tile
needs ``m²``: at 2:4 each multiplier does the work of two dense MACs.

* ``mode = 0`` (``W``, forward ``Y = X Wᵀ``): output lane ``r`` is
  ``Σ_s man[r, s] · x[idx[r, s]]``: the activation lanes are selected by index.
* ``mode = 1`` (``Wᵀ``, input gradient ``dX = dY W``): output lane ``c`` is
  ``Σ_j man[ρ(c, j), σ(c, j)] · x[ρ(c, j)]`` where ``ρ(c, j)`` is the ``j``-th row (in
  ascending order) whose indices name column ``c`` and ``σ`` the slot that names it:
  the same compressed tile, read column-wise by decoding its indices (a transposable
  tile names every column exactly ``n`` times).

Beats of one output job (``m`` outputs: a tile row of ``W`` against one activation row,
or a tile column against one ``dY`` row) run over the reduction axis; ``last_k`` closes a
BFP K-block, ``first`` opens the job, ``last`` ends it. The datapath is that of
:func:`hbfp_hw.bfp_matmul` (and :func:`hbfp_hw.sparsity.sparse_matmul`):

====  =============================================================================
s0    input register
s1    operand selection (index decode, lane muxes), registered
s2    ``m·n`` multipliers, registered
s3    per output lane, the sum of its ``n`` products (the tile's partial dot product)
s4    block dot product ``P`` over the K-block's tiles; at ``last_k``:
      ``(P << G) >>> shift`` (``shift = e_ref - e``, the driver's exponent difference)
s5    ``acc = (first ? 0 : acc) + aligned``; at ``last`` the accumulators go to ``o``
====  =============================================================================

The whole pipeline advances when the output register is free or being read
(``i.ready = ~o.valid | o.ready``). ``dense=True`` builds the dense baseline with the
same structure: ``m²`` mantissas, ``m²`` multipliers, no indices, one mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..gemm import DEFAULT_GUARD_BITS, accumulator_bits
from ..formats import mantissa_max
from ..validate import check_int

__all__ = ["SparseEngineConfig", "SparseEngine", "beat_layout", "out_layout", "pack_beat",
           "unpack_out", "generate"]

SHIFT_BITS = 10     # exponent differences of 8-bit exponents (< 2**10), saturated inside


@dataclass(frozen=True)
class SparseEngineConfig:
    """Parameters of a :class:`SparseEngine` (validated; errors name value and range)."""

    n: int = 2
    m: int = 4
    man_bits_w: int = 8
    man_bits_x: int = 8
    block_len: int = 16          # BFP block length along the reduction axis (elements)
    k_max: int = 1024            # largest reduction length the accumulator is sized for
    guard_bits: int = DEFAULT_GUARD_BITS
    dense: bool = False

    def __post_init__(self):
        check_int("m", self.m, 2, 16)
        check_int("n", self.n, 1, self.m)
        check_int("man_bits_w", self.man_bits_w, 2, 16)
        check_int("man_bits_x", self.man_bits_x, 2, 16)
        check_int("block_len", self.block_len, self.m, 4096)
        if self.block_len % self.m:
            raise ValueError(f"block_len={self.block_len} must be a multiple of m={self.m}")
        check_int("k_max", self.k_max, self.block_len, 2**20)
        check_int("guard_bits", self.guard_bits, 0, 24)
        if not isinstance(self.dense, bool):
            raise ValueError(f"dense must be a bool, got {self.dense!r}")

    @property
    def slots(self) -> int:
        """Stored mantissas (= multipliers) per tile."""
        return self.m * self.m if self.dense else self.m * self.n

    @property
    def idx_bits(self) -> int:
        return max(1, (self.m - 1).bit_length())

    @property
    def prod_bits(self) -> int:
        return self.man_bits_w + self.man_bits_x

    @property
    def p_bits(self) -> int:
        """Width of a block dot product ``P`` (signed)."""
        return (self.block_len * mantissa_max(self.man_bits_w)
                * mantissa_max(self.man_bits_x)).bit_length() + 1

    @property
    def acc_bits(self) -> int:
        return accumulator_bits(self.man_bits_w, self.man_bits_x, self.block_len, self.k_max,
                                self.guard_bits)

    @property
    def effective_macs(self) -> int:
        """Dense-equivalent MACs per beat (one ``m x m`` tile)."""
        return self.m * self.m

    def to_dict(self) -> dict:
        return asdict(self)


def beat_layout(cfg: SparseEngineConfig) -> data.StructLayout:
    fields = {"w_man": data.ArrayLayout(signed(cfg.man_bits_w), cfg.slots)}
    if not cfg.dense:
        fields["w_idx"] = data.ArrayLayout(unsigned(cfg.idx_bits), cfg.slots)
    fields.update({"x": data.ArrayLayout(signed(cfg.man_bits_x), cfg.m), "mode": 1,
                   "first": 1, "last_k": 1, "last": 1, "shift": unsigned(SHIFT_BITS)})
    return data.StructLayout(fields)


def out_layout(cfg: SparseEngineConfig) -> data.StructLayout:
    return data.StructLayout({"acc": data.ArrayLayout(signed(cfg.acc_bits), cfg.m)})


def _offsets(layout: data.StructLayout) -> dict:
    return {name: (f.offset, f.width) for name, f in layout}


def pack_beat(cfg: SparseEngineConfig, *, w_man, x, mode=0, first=0, last_k=0, last=0,
              shift=0, w_idx=None) -> int:
    """The integer payload of one input beat (for testbenches and drivers)."""
    lay = beat_layout(cfg)
    off = _offsets(lay)
    word = 0

    def put_array(name, values, bits):
        nonlocal word
        base = off[name][0]
        for k, v in enumerate(values):
            word |= (int(v) & ((1 << bits) - 1)) << (base + k * bits)

    put_array("w_man", w_man, cfg.man_bits_w)
    if not cfg.dense:
        put_array("w_idx", w_idx, cfg.idx_bits)
    put_array("x", x, cfg.man_bits_x)
    for name, v in (("mode", mode), ("first", first), ("last_k", last_k), ("last", last),
                    ("shift", min(int(shift), (1 << SHIFT_BITS) - 1))):
        word |= int(v) << off[name][0]
    return word


def unpack_out(cfg: SparseEngineConfig, word: int) -> list[int]:
    w = cfg.acc_bits
    out = []
    for k in range(cfg.m):
        v = (word >> (k * w)) & ((1 << w) - 1)
        out.append(v - (1 << w) if v >> (w - 1) else v)
    return out


class SparseEngine(wiring.Component):
    """Sparse (or, ``cfg.dense``, dense) tile MAC engine; see the module notes.

    Ports: ``i`` (stream of :func:`beat_layout`), ``o`` (stream of :func:`out_layout`).
    """

    def __init__(self, cfg: SparseEngineConfig):
        if not isinstance(cfg, SparseEngineConfig):
            raise TypeError(f"cfg must be a SparseEngineConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        super().__init__({"i": In(stream.Signature(beat_layout(cfg))),
                          "o": Out(stream.Signature(out_layout(cfg)))})

    def elaborate(self, platform):
        m_ = Module()
        cfg = self.cfg
        m, S = cfg.m, cfg.slots
        per = S // m                                   # products per output lane
        en = Signal()
        m_.d.comb += [en.eq(~self.o.valid | self.o.ready), self.i.ready.eq(en)]

        ctrl = data.StructLayout({"valid": 1, "first": 1, "last_k": 1, "last": 1,
                                  "shift": unsigned(SHIFT_BITS)})

        def stage(name):
            return Signal(ctrl, name=name)

        # s0: input register
        b0 = Signal(beat_layout(cfg), name="b0")
        v0 = Signal(name="v0")
        with m_.If(en):
            m_.d.sync += v0.eq(self.i.valid)
            with m_.If(self.i.valid):
                m_.d.sync += b0.eq(self.i.payload)

        # s1: operand selection
        a1 = [Signal(signed(cfg.man_bits_w), name=f"a1_{k}") for k in range(S)]
        x1 = [Signal(signed(cfg.man_bits_x), name=f"x1_{k}") for k in range(S)]
        c1 = stage("c1")
        if cfg.dense:
            sel_a = [b0.w_man[k] for k in range(S)]
            sel_x = [b0.x[k % m] for k in range(S)]      # product (r, c) = w[r, c] x[c]
        else:
            sel_a, sel_x = self._select(m_, b0)
        with m_.If(en):
            m_.d.sync += [c1.valid.eq(v0), c1.first.eq(b0.first), c1.last_k.eq(b0.last_k),
                          c1.last.eq(b0.last), c1.shift.eq(b0.shift)]
            m_.d.sync += [a.eq(s) for a, s in zip(a1, sel_a)]
            m_.d.sync += [x.eq(s) for x, s in zip(x1, sel_x)]

        # s2: multipliers
        p2 = [Signal(signed(cfg.prod_bits), name=f"p2_{k}") for k in range(S)]
        c2 = stage("c2")
        with m_.If(en):
            m_.d.sync += c2.eq(c1)
            m_.d.sync += [p.eq(a * x) for p, a, x in zip(p2, a1, x1)]

        # s3: per-lane sums of the tile
        t3 = [Signal(signed(cfg.p_bits), name=f"t3_{r}") for r in range(m)]
        c3 = stage("c3")
        with m_.If(en):
            m_.d.sync += c3.eq(c2)
            for r in range(m):
                terms = p2[r * per:(r + 1) * per]
                s = terms[0]
                for t in terms[1:]:
                    s = s + t
                m_.d.sync += t3[r].eq(s)

        # s4: block dot product over the K-block, alignment at last_k
        wide = cfg.p_bits + cfg.guard_bits
        psum = [Signal(signed(cfg.p_bits), name=f"psum_{r}") for r in range(m)]
        blk_open = Signal(init=1)          # next tile starts a K-block
        al4 = [Signal(signed(wide), name=f"al4_{r}") for r in range(m)]
        c4 = stage("c4")                   # valid: an aligned block is in al4
        sh = Signal(range(wide + 1))
        m_.d.comb += sh.eq(Mux(c3.shift > wide, wide, c3.shift))
        with m_.If(en):
            m_.d.sync += [c4.first.eq(c3.first), c4.last.eq(c3.last),
                          c4.valid.eq(c3.valid & c3.last_k)]
            with m_.If(c3.valid):
                m_.d.sync += blk_open.eq(c3.last_k)
                for r in range(m):
                    pn = Signal(signed(cfg.p_bits), name=f"pn_{r}")
                    m_.d.comb += pn.eq(Mux(blk_open | c3.first, 0, psum[r]) + t3[r])
                    m_.d.sync += [psum[r].eq(pn),
                                  al4[r].eq((pn.as_signed() << cfg.guard_bits) >> sh)]
        # a job's first flag must reach s5 with its first block: hold it until then
        first_pending = Signal()
        first4 = Signal()
        with m_.If(en & c3.valid):
            with m_.If(c3.first & ~c3.last_k):
                m_.d.sync += first_pending.eq(1)
            with m_.Elif(c3.last_k):
                m_.d.sync += [first4.eq(c3.first | first_pending), first_pending.eq(0)]

        # s5: accumulators, output register
        acc = [Signal(signed(cfg.acc_bits), name=f"acc_{r}") for r in range(m)]
        with m_.If(self.o.ready):
            m_.d.sync += self.o.valid.eq(0)
        with m_.If(en & c4.valid):
            for r in range(m):
                an = Signal(signed(cfg.acc_bits), name=f"an_{r}")
                m_.d.comb += an.eq(Mux(first4, 0, acc[r]) + al4[r])
                m_.d.sync += acc[r].eq(an)
                with m_.If(c4.last):
                    m_.d.sync += self.o.payload.acc[r].eq(an)
            with m_.If(c4.last):
                m_.d.sync += self.o.valid.eq(1)
        return m_

    def _select(self, m_: Module, b0):
        """Operands of the ``m·n`` multipliers in both modes (comb): forward, product
        ``k = r·n + s`` is ``man[k] · x[idx[k]]``; transposed, product ``k = c·n + j`` is
        ``man[ρ(c, j)·n + σ(c, j)] · x[ρ(c, j)]``."""
        cfg = self.cfg
        m, n = cfg.m, cfg.n
        # hit[r][s][c]: slot (r, s) names column c
        hit = [[[Signal(name=f"hit_{r}_{s}_{c}") for c in range(m)] for s in range(n)]
               for r in range(m)]
        for r in range(m):
            for s in range(n):
                for c in range(m):
                    m_.d.comb += hit[r][s][c].eq(b0.w_idx[r * n + s] == c)
        sel_a, sel_x = [], []
        for c in range(m):
            # inrow[r]: row r keeps column c; its kept-man of column c; rank among rows
            inrow = [Signal(name=f"in_{r}_{c}") for r in range(m)]
            mc = [Signal(signed(cfg.man_bits_w), name=f"mc_{r}_{c}") for r in range(m)]
            for r in range(m):
                m_.d.comb += inrow[r].eq(sum(hit[r][s][c] for s in range(n)) != 0)
                v = 0
                for s in range(n):
                    v = Mux(hit[r][s][c], b0.w_man[r * n + s], v)
                m_.d.comb += mc[r].eq(v)
            rank = []
            cnt = 0
            for r in range(m):
                rk = Signal(range(m + 1), name=f"rk_{r}_{c}")
                m_.d.comb += rk.eq(cnt)
                rank.append(rk)
                cnt = rk + inrow[r]
            for j in range(n):
                k = c * n + j
                ta, tx = 0, 0
                for r in range(m):
                    hitj = inrow[r] & (rank[r] == j)
                    ta = Mux(hitj, mc[r], ta)
                    tx = Mux(hitj, b0.x[r], tx)
                # forward operands of the same multiplier (row r = c here, slot s = j)
                fa = b0.w_man[k]
                fx = 0
                for q in range(m):
                    fx = Mux(b0.w_idx[k] == q, b0.x[q], fx)
                sel_a.append(Mux(b0.mode, ta, fa))
                sel_x.append(Mux(b0.mode, tx, fx))
        return sel_a, sel_x


def generate(cfg: SparseEngineConfig, out_dir, *, name: str = "sparse_pe") -> Path:
    """Write ``<name>.v`` (and ``<name>.cfg.json``, the configuration) into ``out_dir``."""
    import json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v = out / f"{name}.v"
    v.write_text(verilog.convert(SparseEngine(cfg), name=name, emit_src=False))
    (out / f"{name}.cfg.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return v
