"""Amaranth-sim unit tests of the MAC-array parts: PE, operand packing, tile buffer,
FP32 conversion; configuration validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from amaranth.hdl import Module, Signal, signed
from amaranth.sim import Simulator

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gateware.fp32_convert import FP32_NAN, Fp32Convert
from hbfp_hw.gateware.pe import PE, pack_operand, packed_bits
from hbfp_hw.gateware.tile_buffer import TileBuffer
from hbfp_hw.gemm import accumulator_bits


def _run(dut, tb):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()


# ---- PE ---------------------------------------------------------------------------

def _pe_reference(cfg, a, b, shifts, wins, first_tiles):
    """acc[win] per the golden datapath: P = sum of k steps, acc += floor(P*2^G / 2^s)."""
    acc = {}
    for t, (s, w, ft) in enumerate(zip(shifts, wins, first_tiles)):
        p = sum(int(x) * int(y) for ks in range(cfg.k_steps)
                for x, y in zip(a[t][ks], b[t][ks]))
        v = (p << cfg.guard_bits) >> s
        acc[w] = v if ft or w not in acc else acc[w] + v
    return acc


@pytest.mark.parametrize("mapping,ma,mb,rows,r,n,lanes", [
    ("lut", 4, 4, 1, 1, 1, 2), ("dsp", 8, 8, 1, 1, 1, 2),
    ("dsp-packed", 4, 4, 1, 1, 2, 2), ("dsp-packed", 3, 6, 1, 1, 2, 2),
    ("dsp-packed", 4, 4, 2, 2, 2, 2),       # 2x2 block: 4 products per multiplier
    ("dsp-packed", 4, 4, 2, 2, 1, 2),       # partial group: a gap between row fields
    ("dsp-packed", 4, 4, 2, 1, 2, 2),
    ("dsp-packed", 4, 4, 2, 2, 2, 8), ("lut", 5, 3, 1, 1, 1, 7)])   # 2-stage lane sums
def test_pe_block_dot_and_accumulate(rng, mapping, ma, mb, rows, r, n, lanes):
    cfg = MacArrayConfig(rows=rows, cols=4, lanes=lanes, tile=math.lcm(4, lanes),
                         man_bits_a=ma, man_bits_b=mb, k_max=64, mapping=mapping)
    assert cfg.sum_stages == (2 if lanes > 4 else 1)
    assert r <= cfg.pack_rows and n <= cfg.pack
    dut = PE(cfg, n=n, r=r)
    ntiles = 6
    a = rng.integers(-cfg.mmax_a, cfg.mmax_a + 1, (r, ntiles, cfg.k_steps, cfg.lanes))
    b = rng.integers(-cfg.mmax_b, cfg.mmax_b + 1, (n, ntiles, cfg.k_steps, cfg.lanes))
    a[:, 0] = cfg.mmax_a            # extreme magnitudes on the first tile
    b[:, 0] = -cfg.mmax_b
    shifts = [0] + list(rng.integers(0, cfg.shift_max + 1, ntiles - 1))
    wins = [int(x) for x in rng.integers(0, cfg.windows, ntiles)]
    first = [1] + [int(x) for x in rng.integers(0, 2, ntiles - 1)]
    p = cfg.prod_bits

    async def tb(ctx):
        for t in range(ntiles):
            for ks in range(cfg.k_steps):
                for lane in range(cfg.lanes):
                    # packed operands as integers: the PE sees sum x_i * 2**(i * spacing)
                    pa = sum(int(a[i, t, ks, lane]) << (i * cfg.pack * p) for i in range(r))
                    pb = sum(int(b[j, t, ks, lane]) << (j * p) for j in range(n))
                    ctx.set(dut.a[lane], pa)
                    ctx.set(dut.b[lane], pb)
                ctx.set(dut.ctrl.valid, 1)
                ctx.set(dut.ctrl.first_k, ks == 0)
                ctx.set(dut.ctrl.last_k, ks == cfg.k_steps - 1)
                ctx.set(dut.ctrl.first_tile, first[t])
                ctx.set(dut.ctrl.win, wins[t])
                ctx.set(dut.ctrl.shift, int(shifts[t]))
                await ctx.tick()
        ctx.set(dut.ctrl.valid, 0)
        await ctx.tick().repeat(cfg.pe_latency + 1)
        for i in range(r):
            for j in range(n):
                ref = _pe_reference(cfg, a[i], b[j], shifts, wins, first)
                for w, v in ref.items():
                    ctx.set(dut.rd_win, w)
                    assert ctx.get(dut.acc[i * n + j]) == v, (i, j, w)

    _run(dut, tb)


@pytest.mark.parametrize("man,rows,cols,want", [
    (4, 4, 4, (2, 2)), (4, 8, 8, (2, 2)), (4, 1, 4, (1, 2)), (4, 1, 3, (1, 3)),
    (4, 3, 1, (3, 1)), (3, 2, 2, (2, 2)), (8, 4, 4, (1, 1)), (6, 4, 4, (2, 1))])
def test_packing_shape(man, rows, cols, want):
    """The packed operands fit 18 bits and the fields cannot overlap: derived here from
    the product bound, independently of the config's own search."""
    cfg = MacArrayConfig(rows=rows, cols=cols, lanes=1, tile=12 if 12 % rows == 0
                         and 12 % cols == 0 else rows * cols, man_bits_a=man,
                         man_bits_b=man, k_max=64, mapping="dsp-packed")
    r, n = cfg.packing
    assert (r, n) == want
    mmax = 2 ** (man - 1) - 1
    field = (mmax * mmax).bit_length() + 1           # |a*b| < 2**(field-1)
    assert (n - 1) * field + man <= 18 and (r - 1) * n * field + man <= 18
    assert cfg.multipliers == -(-rows // r) * -(-cols // n)


def test_pack_operand_value(rng):
    cfg = MacArrayConfig(rows=1, cols=3, lanes=1, tile=3, man_bits_a=4, man_bits_b=4,
                         k_max=9, mapping="dsp-packed")
    assert cfg.pack == 3
    m = Module()
    bs = [Signal(signed(4), name=f"b{i}") for i in range(3)]
    out = pack_operand(m, cfg, bs)
    assert len(out) == packed_bits(cfg, 3) <= 18
    vals = rng.integers(-7, 8, (200, 3))
    vals[:8] = [[-7, -7, -7], [7, 7, 7], [-7, 0, 7], [0, -7, 0], [0, 0, 0], [-1, -1, -1],
                [1, -1, 1], [-7, 7, -7]]

    async def tb(ctx):
        for v in vals:
            for s, x in zip(bs, v):
                ctx.set(s, int(x))
            expect = sum(int(x) << (i * cfg.prod_bits) for i, x in enumerate(v))
            assert ctx.get(out) == expect, v

    sim = Simulator(m)
    sim.add_testbench(tb)
    sim.run()


# ---- tile buffer ----------------------------------------------------------------------

@pytest.mark.parametrize("col_major", [False, True])
@pytest.mark.parametrize("T,L,V", [(4, 2, 2), (8, 2, 4), (8, 8, 2), (12, 4, 3), (6, 1, 6)])
def test_tile_buffer_orientations_and_double_buffering(rng, col_major, T, L, V):
    """Every (pos, k) read in both orientations over four tiles, writes overlapping the
    reads; shapes with nvec != lanes, non-power-of-two tiles and residues that straddle
    the row groups of the storage (nvec = 3 with lanes = 4)."""
    w = 5
    dut = TileBuffer(tile=T, lanes=L, nvec=V, width=w, meta_layout=8, col_major=col_major)
    tiles = [rng.integers(-15, 16, (T, T)) for _ in range(4)]
    trans = [0, 1, 1, 0]

    async def writer_then_reader(ctx):
        # fill both banks; the third tile must wait (ready low) until a bank is released
        for t in range(2):
            for r in range(T):
                ctx.set(dut.i.valid, 1)
                ctx.set(dut.i.payload.data, [int(x) for x in tiles[t][r]])
                ctx.set(dut.i.payload.transpose, trans[t])
                ctx.set(dut.i.payload.meta, 10 + t)
                assert ctx.get(dut.i.ready)
                await ctx.tick()
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload.data, [int(x) for x in tiles[2][0]])
        ctx.set(dut.i.payload.transpose, trans[2])
        ctx.set(dut.i.payload.meta, 12)
        assert not ctx.get(dut.i.ready)
        written = {2: 0}
        for t in range(4):
            assert ctx.get(dut.rd_valid)
            assert ctx.get(dut.rd_meta) == 10 + t
            mode_col = bool(trans[t]) ^ col_major
            for pos in range(T // V):
                for k in range(T // L):
                    ctx.set(dut.rd_pos, pos)
                    ctx.set(dut.rd_k, k)
                    release = pos == T // V - 1 and k == T // L - 1
                    ctx.set(dut.release, release)
                    # keep writing the next tile while this one is read (overlap)
                    nxt = t + 2
                    if nxt < 4 and written.get(nxt, 0) < T and ctx.get(dut.i.ready):
                        r = written.get(nxt, 0)
                        ctx.set(dut.i.valid, 1)
                        ctx.set(dut.i.payload.data, [int(x) for x in tiles[nxt][r]])
                        ctx.set(dut.i.payload.transpose, trans[nxt])
                        ctx.set(dut.i.payload.meta, 10 + nxt)
                        written[nxt] = r + 1
                    else:
                        ctx.set(dut.i.valid, 0)
                    await ctx.tick()
                    ctx.set(dut.release, 0)
                    got = np.array([[ctx.get(dut.rd_data[v][lane]) for lane in range(L)]
                                    for v in range(V)])
                    st = tiles[t]
                    view = st.T if mode_col else st
                    exp = view[pos * V:(pos + 1) * V, k * L:(k + 1) * L]
                    assert np.array_equal(got, exp), (t, pos, k)
            # finish writing the tile two ahead if reads were shorter than its rows
            while t + 2 < 4 and written.get(t + 2, 0) < T:
                r = written[t + 2] if t + 2 in written else 0
                ctx.set(dut.i.valid, 1)
                ctx.set(dut.i.payload.data, [int(x) for x in tiles[t + 2][r]])
                ctx.set(dut.i.payload.transpose, trans[t + 2])
                ctx.set(dut.i.payload.meta, 10 + t + 2)
                ready = ctx.get(dut.i.ready)
                await ctx.tick()
                if ready:
                    written[t + 2] = r + 1
            ctx.set(dut.i.valid, 0)
        assert not ctx.get(dut.rd_valid)

    _run(dut, writer_then_reader)


# ---- FP32 conversion -------------------------------------------------------------------

def _golden_fp32(acc: int, scale: int, nan: bool) -> int:
    """The conversion step of hbfp_hw.gemm.bfp_matmul for one value."""
    if nan:
        return FP32_NAN
    v = np.ldexp(np.float64(acc), scale)
    with np.errstate(over="ignore"):
        out = np.float32(0.0) if abs(v) < 2.0**-126 else np.float32(v)
    return int(np.array(out, dtype=np.float32).view(np.uint32))


@pytest.mark.parametrize("acc_bits", [12, 33, 53])
def test_fp32_convert(rng, acc_bits):
    dut = Fp32Convert(acc_bits=acc_bits)
    lo, hi = -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
    cases = [(0, 0, 0), (lo, 0, 0), (hi, 0, 0), (1, -126, 0), (1, -127, 0), (-1, -126, 0),
             (3, -128, 0), (1, 127, 0), (hi, 127, 0), (lo, 100, 0), (5, 3, 1),
             (-(1 << (acc_bits - 1)) + 1, -150, 0)]
    if acc_bits > 25:
        # ties: 24 significant bits + exactly half an ulp, even and odd
        for sig in ((1 << 23) | 2, (1 << 23) | 3, (1 << 24) - 1):
            cases += [((sig << 1) | 1, -10, 0), (-((sig << 1) | 1), -10, 0),
                      ((sig << 2) | 2, 0, 0), ((sig << 2) | 3, 0, 0), ((sig << 2) | 1, 0, 0)]
        cases += [(((1 << 24) - 1) << 1 | 1, 103, 0)]   # rounds up to 2**128 -> Inf
    for _ in range(300):
        cases.append((int(rng.integers(lo, hi, endpoint=True)), int(rng.integers(-200, 130)),
                      int(rng.random() < 0.05)))
    results = []

    async def tb(ctx):
        for acc, sc, nan in cases:
            ctx.set(dut.i_valid, 1)
            ctx.set(dut.acc, acc)
            ctx.set(dut.scale, sc)
            ctx.set(dut.nan, nan)
            await ctx.tick()
            if ctx.get(dut.o_valid):
                results.append(ctx.get(dut.bits))
        ctx.set(dut.i_valid, 0)
        for _ in range(Fp32Convert.LATENCY):
            await ctx.tick()
            if ctx.get(dut.o_valid):
                results.append(ctx.get(dut.bits))

    _run(dut, tb)
    expected = [_golden_fp32(*c) for c in cases]
    assert len(results) == len(cases)
    for c, g, e in zip(cases, results, expected):
        assert g == e, f"acc={c[0]} scale={c[1]} nan={c[2]}: got {g:#010x}, expected {e:#010x}"


# ---- configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(rows=0), "rows=0 is out of range; accepted range is [1, 64]"),
    (dict(cols=3, tile=8), "cols=3 must divide tile=8; accepted values are [1, 2, 4, 8]"),
    (dict(lanes=5, tile=8), "lanes=5 must divide tile=8"),
    (dict(man_bits_a=17), "man_bits_a=17 is out of range; accepted range is [2, 16]"),
    (dict(mapping="bram"), "mapping='bram' is not supported; accepted values are lut, dsp, "
                           "dsp-packed"),
    (dict(k_max=0), "k_max=0 is out of range; accepted range is [1, 16777216]"),
    (dict(man_bits_a=16, man_bits_b=16, k_max=2**24), "accumulator of"),
    (dict(rows=2.0), "rows must be an integer in [1, 64], got 2.0"),
])
def test_config_validation_messages(kw, msg):
    with pytest.raises(ValueError) as e:
        MacArrayConfig(**kw)
    assert msg in str(e.value)


def test_config_derived_and_roundtrip():
    cfg = MacArrayConfig(rows=4, cols=4, lanes=4, tile=8, man_bits_a=4, man_bits_b=4,
                         k_max=1024, guard_bits=8, mapping="dsp-packed")
    # 4-bit: products fit 7 bits signed; a 2x2 block of products shares one multiplier
    # (row operand (2-1)*2*7 + 4 = 18 bits, column operand 7 + 4 = 11 bits)
    assert cfg.prod_bits == 7 and cfg.packing == (2, 2)
    assert cfg.multipliers == 2 * 2 * 4 and cfg.macs_per_cycle == 64
    assert cfg.acc_bits == accumulator_bits(4, 4, 8, 1024, 8)
    assert MacArrayConfig.from_dict(cfg.to_dict()) == cfg
    # 8-bit: a second 15-bit field would need 23 bits > 18: no packing into MULT18X18D
    assert MacArrayConfig(man_bits_a=8, man_bits_b=8, mapping="dsp-packed").pack == 1
