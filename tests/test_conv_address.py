"""The CONV address generator alone (``gateware/engines/conv_address.py``) against the
block-level im2col map computed in Python from the digits (``docs/conv.md``), on random
geometries of all three modes (strides 1-8, padding, dilation, several channel and
sample blocks) with random stalls of the counters."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth import Module, Mux, Signal
from amaranth.sim import Simulator

from hbfp_hw.gateware.engines.conv_address import ConvAddress
from hbfp_hw.gateware.engines.gemm_stream import job_layout


def _geometry(rng, mode):
    while True:
        g = dict(kh=int(rng.integers(1, 4)), kw=int(rng.integers(1, 4)),
                 lsh=int(rng.choice([0, 0, 1, 1, 2, 3])), lsw=int(rng.choice([0, 1, 1, 2, 3])),
                 dh=int(rng.integers(1, 3)), dw=int(rng.integers(1, 3)),
                 ph=int(rng.integers(0, 3)), pw=int(rng.integers(0, 3)),
                 H=int(rng.integers(1, 9)), W=int(rng.integers(1, 9)),
                 gn=int(rng.integers(1, 3)), gc=int(rng.integers(1, 3)),
                 go=int(rng.integers(1, 3)))
        sh = [(g["H"] + 2 * g["ph"] - g["dh"] * (g["kh"] - 1) - 1),
              (g["W"] + 2 * g["pw"] - g["dw"] * (g["kw"] - 1) - 1)]
        if min(sh) >= 0:
            g["Ho"], g["Wo"] = (sh[0] >> g["lsh"]) + 1, (sh[1] >> g["lsw"]) + 1
            g["cmode"] = mode
            return g


def _radices(g):
    """(it, jt, kk) digit radices of each mode, as the GEMM engine's C_JOB sets them."""
    return {0: ((g["Wo"], g["Ho"], g["gn"]), (g["go"], 1, 1), (g["gc"], g["kw"], g["kh"])),
            1: ((g["W"], g["H"], g["gn"]), (g["gc"], 1, 1), (g["go"], g["kw"], g["kh"])),
            2: ((g["go"], 1, 1), (g["kw"], g["kh"], g["gc"]), (g["Wo"], g["Ho"], g["gn"]))
            }[g["cmode"]]


def _reference(g, di, dj, dk):
    """(blk_a, pad_a, blk_b, pad_b) of the digits; a padding block's index is None."""
    sh, sw = 1 << g["lsh"], 1 << g["lsw"]
    H, W, Ho, Wo, gc, go = (g[k] for k in ("H", "W", "Ho", "Wo", "gc", "go"))

    def x_block(nb, cb, p, q, ti, tj):
        hh, ww = p * sh + ti * g["dh"] - g["ph"], q * sw + tj * g["dw"] - g["pw"]
        if 0 <= hh < H and 0 <= ww < W:
            return ((nb * gc + cb) * H + hh) * W + ww
        return None

    def w_block(ob, cb, ti, tj):
        return ((ob * gc + cb) * g["kh"] + ti) * g["kw"] + tj

    def y_block(nb, ob, p, q):
        return ((nb * go + ob) * Ho + p) * Wo + q

    if g["cmode"] == 0:
        (q, p, nb), (ob, _, _), (cb, tj, ti) = di, dj, dk
        return x_block(nb, cb, p, q, ti, tj), w_block(ob, cb, ti, tj)
    if g["cmode"] == 1:
        (x, y, nb), (cb, _, _), (ob, tj, ti) = di, dj, dk
        yh, yw = y + g["ph"] - ti * g["dh"], x + g["pw"] - tj * g["dw"]
        ok = (yh >= 0 and yh % sh == 0 and yh // sh < Ho and yw >= 0 and yw % sw == 0
              and yw // sw < Wo)
        return (y_block(nb, ob, yh // sh, yw // sw) if ok else None), w_block(ob, cb, ti, tj)
    (ob, _, _), (tj, ti, cb), (q, p, nb) = di, dj, dk
    return y_block(nb, ob, p, q), x_block(nb, cb, p, q, ti, tj)


def _run(geos, seed):
    m = Module()
    j = Signal(job_layout(2))
    start, stall, running = Signal(), Signal(), Signal()
    dig = {c: [Signal(16, name=f"d{c}{d}") for d in range(3)] for c in "ijk"}
    ndig = {c: [Signal(16, name=f"n_d{c}{d}") for d in range(3)] for c in "ijk"}
    for c in "ijk":
        m.d.comb += [n.eq(r) for n, r in zip(ndig[c], dig[c])]
        m.d.sync += [r.eq(n) for n, r in zip(ndig[c], dig[c])]
    cva = ConvAddress(m, j, ndig, start)
    top, last = {}, {}
    for c in "ijk":
        r = [getattr(j, f"r{c}{d}") for d in range(3)]
        top[c] = [dig[c][d] == r[d] - 1 for d in range(3)]
        last[c] = top[c][0] & top[c][1] & top[c][2]

    def inc(c):
        d0, d1, d2 = dig[c]
        t0, t1 = top[c][0], top[c][1]
        return [ndig[c][0].eq(Mux(t0, 0, d0 + 1)),
                ndig[c][1].eq(Mux(t0, Mux(t1, 0, d1 + 1), d1)),
                ndig[c][2].eq(Mux(t0 & t1, d2 + 1, d2)), *cva.inc(c)]

    def zero(c):
        return [n.eq(0) for n in ndig[c]] + cva.zero(c)

    with m.If(cva.go):
        m.d.comb += [*zero("i"), *zero("j"), *zero("k"), *cva.begin()]
        m.d.sync += running.eq(1)
    with m.Elif(running & ~stall):
        with m.If(~last["k"]):
            m.d.comb += inc("k")
        with m.Else():
            m.d.comb += zero("k")
            with m.If(~last["j"]):
                m.d.comb += inc("j")
            with m.Else():
                m.d.comb += zero("j")
                with m.If(~last["i"]):
                    m.d.comb += inc("i")
                with m.Else():
                    m.d.sync += running.eq(0)

    rng = np.random.default_rng(seed)
    checked = []

    async def bench(ctx):
        for g in geos:
            ctx.set(j.conv, 1)
            for k in ("H", "W", "Ho", "Wo", "gc", "go", "kh", "kw", "lsh", "lsw", "dh", "dw",
                      "ph", "pw", "cmode"):
                ctx.set(getattr(j, k), g[k])
            rads = _radices(g)
            for c, rs in zip("ijk", rads):
                for d, v in enumerate(rs):
                    ctx.set(getattr(j, f"r{c}{d}"), v)
            await ctx.tick()
            ctx.set(start, 1)
            await ctx.tick()
            ctx.set(start, 0)
            clocks, n = 0, 0
            total = int(np.prod([np.prod(r) for r in rads]))
            while True:
                ctx.set(stall, int(rng.random() < 0.3))
                go, run = ctx.get(cva.go), ctx.get(running)
                if go or run:         # the next state's blocks (a stalled state repeats)
                    d = [[ctx.get(x) for x in ndig[c]] for c in "ijk"]
                    want_a, want_b = _reference(g, *d)
                    got = (ctx.get(cva.blk_a), ctx.get(cva.pad_a), ctx.get(cva.blk_b),
                           ctx.get(cva.pad_b))
                    assert got[1] == (want_a is None), (g, d, got, want_a)
                    assert got[3] == (want_b is None), (g, d, got, want_b)
                    if want_a is not None:
                        assert got[0] == want_a, (g, d, got, want_a)
                    if want_b is not None:
                        assert got[2] == want_b, (g, d, got, want_b)
                    n += int(go or not ctx.get(stall))
                elif n:
                    break
                await ctx.tick()
                clocks += 1
                assert clocks < 20 * total + 200
            checked.append(n)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return checked


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_conv_address_matches_map(mode):
    rng = np.random.default_rng(100 + mode)
    geos = [_geometry(rng, mode) for _ in range(5)]
    # and an edge: stride 8 with a single output position, no padding
    geos.append(dict(_geometry(rng, mode), lsh=3, lsw=3))
    g = geos[-1]
    g["Ho"] = ((g["H"] + 2 * g["ph"] - g["dh"] * (g["kh"] - 1) - 1) >> 3) + 1
    g["Wo"] = ((g["W"] + 2 * g["pw"] - g["dw"] * (g["kw"] - 1) - 1) >> 3) + 1
    checked = _run(geos, seed=mode)
    for g, n in zip(geos, checked):
        assert n == int(np.prod([np.prod(r) for r in _radices(g)])) + 1, (g, n)
