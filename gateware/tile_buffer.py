"""Double-buffered, transposable HyperBlock tile buffer.

Holds two ``tile x tile`` banks of mantissas. Tiles are written one stored row per beat
(``tile`` beats per tile) into the bank not being read; the first beat of a tile also
carries its ``transpose`` flag and an opaque ``meta`` record (the tile's exponent and
job bookkeeping) kept with the bank.

The read side shows a window of ``nvec`` vectors of ``lanes`` elements, one vector per
array row (operand ``a``) or column (operand ``b``), lanes along the reduction axis K.
In *row* mode vector ``v`` is stored row ``pos*nvec + v`` and lane ``l`` is stored
column ``k*lanes + l``; in *column* mode the roles swap. The mode of a bank is
``transpose XOR col_major``, so one stored tile (one exponent, quantized once) feeds
the array along either of its axes. Reads are registered (one cycle latency).

Storage: ``G x tile`` small memories (``G = max(nvec, lanes)``), element ``(r, c)`` of
bank ``b`` in memory ``(r % G, c)`` at address ``b * tile/G + r // G``. A read window is
``nvec`` (row mode) or ``lanes`` (column mode) consecutive stored rows, so no memory is
read twice in a cycle; each memory has one asynchronous read port and one write port
(a stored row is one write per memory), which maps to LUT RAM on FPGAs. This replaced
``2 tile^2`` flip-flops behind ``4 (tile/nvec)(tile/lanes):1`` multiplexers per element.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["TileBuffer", "row_layout"]


def row_layout(tile: int, width: int, meta_layout) -> data.StructLayout:
    return data.StructLayout({
        "data": data.ArrayLayout(signed(width), tile),
        "transpose": 1,
        "meta": meta_layout,
    })


class TileBuffer(wiring.Component):
    """Two banks of ``tile x tile`` signed ``width``-bit mantissas.

    Parameters
    ----------
    tile, lanes, nvec, width : int
        Tile edge; lanes per vector and vectors per read (both divide ``tile``);
        mantissa width.
    meta_layout : ShapeLike
        Per-tile record captured from the first row beat.
    col_major : bool
        Read mode of an untransposed tile: False (row mode) for operand ``a`` stored
        ``(M, K)``, True (column mode) for operand ``b`` stored ``(K, N)``.
    """

    def __init__(self, *, tile: int, lanes: int, nvec: int, width: int, meta_layout,
                 col_major: bool = False):
        for name, v, lo, hi in (("tile", tile, 1, 64), ("lanes", lanes, 1, 64),
                                ("nvec", nvec, 1, 64), ("width", width, 2, 16)):
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}={v!r} is out of range; accepted range is [{lo}, {hi}]")
        for name, v in (("lanes", lanes), ("nvec", nvec)):
            if tile % v:
                raise ValueError(f"{name}={v} must divide tile={tile}")
        self.tile, self.lanes, self.nvec, self.width = tile, lanes, nvec, width
        self.col_major = bool(col_major)
        self.meta_layout = meta_layout
        super().__init__({
            "i": In(stream.Signature(row_layout(tile, width, meta_layout))),
            "rd_valid": Out(1),
            "rd_meta": Out(meta_layout),
            "rd_pos": In(range(tile // nvec)),
            "rd_k": In(range(tile // lanes)),
            "rd_data": Out(data.ArrayLayout(data.ArrayLayout(signed(width), lanes), nvec)),
            "release": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        T, L, V, w = self.tile, self.lanes, self.nvec, self.width
        # Storage: element (r, c) of bank b lives in memory (r % G, c) at address
        # b * T/G + r // G, G = max(nvec, lanes). A read touches nvec rows (row mode) or
        # lanes rows (column mode) of consecutive indices, so each memory is read at most
        # once per cycle (one asynchronous read port), and a stored row is one write per
        # memory. Small memories map to LUT RAM: the read is one address per row residue
        # and a (T/nvec or T/lanes):1 select per element, instead of a
        # 4 (T/nvec)(T/lanes):1 multiplexer over 2 T^2 flip-flops.
        G = max(V, L)
        D = T // G
        mems = [[Memory(shape=signed(w), depth=2 * D, init=[]) for c in range(T)]
                for g in range(G)]
        for g in range(G):
            for c in range(T):
                m.submodules[f"m{g}_{c}"] = mems[g][c]
        full = [Signal(name=f"full{b}") for b in range(2)]
        trans = [Signal(name=f"tr{b}") for b in range(2)]
        metas = [Signal(self.meta_layout, name=f"meta{b}") for b in range(2)]
        wsel, rsel = Signal(), Signal()
        wrow = Signal(range(T))

        # write side
        fire = Signal()
        m.d.comb += [self.i.ready.eq(~Array(full)[wsel]), fire.eq(self.i.valid & self.i.ready)]
        for g in range(G):
            for c in range(T):
                wp = mems[g][c].write_port()
                m.d.comb += [wp.addr.eq(wsel * D + wrow // G), wp.data.eq(self.i.payload.data[c]),
                             wp.en.eq(fire & (wrow % G == g))]
        with m.If(fire):
            for b in range(2):
                with m.If(wsel == b):
                    with m.If(wrow == 0):
                        m.d.sync += [trans[b].eq(self.i.payload.transpose),
                                     metas[b].eq(self.i.payload.meta)]
                    with m.If(wrow == T - 1):
                        m.d.sync += full[b].eq(1)
            with m.If(wrow == T - 1):
                m.d.sync += [wrow.eq(0), wsel.eq(~wsel)]
            with m.Else():
                m.d.sync += wrow.eq(wrow + 1)

        # read side
        m.d.comb += [self.rd_valid.eq(Array(full)[rsel]),
                     self.rd_meta.eq(Array(metas)[rsel])]
        with m.If(self.release):
            for b in range(2):
                with m.If(rsel == b):
                    m.d.sync += full[b].eq(0)
            m.d.sync += rsel.eq(~rsel)
        mode = Signal()
        m.d.comb += mode.eq(Array(trans)[rsel] ^ self.col_major)
        pos, k = self.rd_pos, self.rd_k

        def rows_read(md, p, kk):
            """Stored rows and columns read for vector v, lane l: {(v, l): (r, c)}."""
            if md:
                return {(v, ln): (kk * L + ln, p * V + v) for v in range(V) for ln in range(L)}
            return {(v, ln): (p * V + v, kk * L + ln) for v in range(V) for ln in range(L)}

        # per row residue g: the address (row // G) read in each (mode, pos, k)
        rdata = [[None] * T for _ in range(G)]
        for g in range(G):
            addr = Signal(range(D), name=f"ra{g}")
            with m.Switch(Cat(k, pos, mode)):
                cases = {}
                for md in range(2):
                    for p in range(T // V):
                        for kk in range(T // L):
                            hit = {r // G for r, _ in rows_read(md, p, kk).values() if r % G == g}
                            if hit:
                                key = (md << (len(pos) + len(k))) | (p << len(k)) | kk
                                cases.setdefault(hit.pop(), []).append(key)
                for a, keys in cases.items():
                    with m.Case(*keys):
                        m.d.comb += addr.eq(a)
            for c in range(T):
                rp = mems[g][c].read_port(domain="comb")
                m.d.comb += rp.addr.eq(rsel * D + addr)
                rdata[g][c] = rp.data
        # per element: the memory holding it in each (mode, pos, k)
        for v in range(V):
            for ln in range(L):
                srcs = {}
                for md in range(2):
                    for p in range(T // V):
                        for kk in range(T // L):
                            r, c = rows_read(md, p, kk)[(v, ln)]
                            key = (md << (len(pos) + len(k))) | (p << len(k)) | kk
                            srcs.setdefault((r % G, c), []).append(key)
                with m.Switch(Cat(k, pos, mode)):
                    for (g, c), keys in srcs.items():
                        with m.Case(*keys):
                            m.d.sync += self.rd_data[v][ln].eq(rdata[g][c])
        return m
