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
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal, signed
from amaranth.lib import data, stream, wiring
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
        banks = [[[Signal(signed(w), name=f"m{b}_{r}_{c}") for c in range(T)]
                  for r in range(T)] for b in range(2)]
        full = [Signal(name=f"full{b}") for b in range(2)]
        trans = [Signal(name=f"tr{b}") for b in range(2)]
        metas = [Signal(self.meta_layout, name=f"meta{b}") for b in range(2)]
        wsel, rsel = Signal(), Signal()
        wrow = Signal(range(T))

        # write side
        m.d.comb += self.i.ready.eq(~Array(full)[wsel])
        with m.If(self.i.valid & self.i.ready):
            for b in range(2):
                with m.If(wsel == b):
                    for r in range(T):
                        with m.If(wrow == r):
                            m.d.sync += [banks[b][r][c].eq(self.i.payload.data[c])
                                         for c in range(T)]
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
        idx = Signal(range(4 * (T // V) * (T // L)))
        m.d.comb += idx.eq(((rsel * 2 + mode) * (T // V) + self.rd_pos) * (T // L) + self.rd_k)
        for v in range(V):
            for lane in range(L):
                cands = []
                for b in range(2):
                    for md in range(2):
                        for pos in range(T // V):
                            for k in range(T // L):
                                r, c = pos * V + v, k * L + lane
                                cands.append(banks[b][c][r] if md else banks[b][r][c])
                m.d.sync += self.rd_data[v][lane].eq(Array(cands)[idx])
        return m
