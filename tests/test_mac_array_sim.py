"""Amaranth-sim tests of the whole MAC array against hbfp_hw.bfp_matmul, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gemm import bfp_matmul

from mac_array_helpers import quantized, random_operand, run_gemm_amaranth


def _check(cfg, sa, ta, sb, tb, rng, **kw):
    got = run_gemm_amaranth(cfg, sa, ta, sb, tb, rng, **kw)
    exp = bfp_matmul(sa.T if ta else sa, sb.T if tb else sb, guard_bits=cfg.guard_bits,
                     k_max=cfg.k_max)
    gb, eb = got.view(np.uint32), exp.view(np.uint32)
    bad = np.argwhere(gb != eb)
    assert not len(bad), f"{len(bad)} outputs differ, first {bad[0]}: {gb[tuple(bad[0])]:#x} " \
                         f"vs {eb[tuple(bad[0])]:#x}"
    return got


CONFIGS = [
    MacArrayConfig(rows=2, cols=2, lanes=2, tile=4, man_bits_a=4, man_bits_b=4, k_max=64,
                   mapping="lut"),
    MacArrayConfig(rows=2, cols=4, lanes=1, tile=4, man_bits_a=8, man_bits_b=6, k_max=64,
                   mapping="dsp"),
    MacArrayConfig(rows=1, cols=2, lanes=4, tile=4, man_bits_a=4, man_bits_b=4, k_max=64,
                   mapping="dsp-packed", guard_bits=3),
    # 2x2 products per multiplier, 8 lanes (two-stage lane sums)
    MacArrayConfig(rows=2, cols=2, lanes=8, tile=8, man_bits_a=4, man_bits_b=4, k_max=64,
                   mapping="dsp-packed"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.rows}x{c.cols}x{c.lanes}-"
                         f"{c.man_bits_a}b{c.man_bits_b}-{c.mapping}")
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_random_gemm_padded_with_stalls(cfg, ta, tb, rng):
    M, K, N = 5, 11, 7               # not multiples of tile, rows or cols
    A, B = random_operand(rng, (M, K), 2), random_operand(rng, (K, N), 2)
    sa = quantized(cfg, A.T if ta else A)
    sb = quantized(cfg, B.T if tb else B, "b")
    _check(cfg, sa, bool(ta), sb, bool(tb), rng, stall=0.4)


def test_accumulator_extreme_no_overflow(rng):
    """All mantissas at the maximum magnitude over K = k_max: the accumulator reaches
    its derived bound (nkb * T * mmax_a * mmax_b * 2**G) without overflowing."""
    cfg = MacArrayConfig(rows=2, cols=2, lanes=4, tile=4, man_bits_a=5, man_bits_b=5,
                         k_max=40, guard_bits=8, mapping="dsp")
    K = cfg.k_max
    bound = (K // cfg.tile) * cfg.tile * cfg.mmax_a * cfg.mmax_b << cfg.guard_bits
    # the width is exactly what the bound needs: one bit less would overflow
    assert bound < 2 ** (cfg.acc_bits - 1) and bound >= 2 ** (cfg.acc_bits - 2)
    big = np.float32(1.999)
    A = np.full((2, K), big, np.float32)
    A[1] = -big
    B = np.full((K, 2), big, np.float32)
    sa, sb = quantized(cfg, A), quantized(cfg, B, "b")
    assert np.all(np.abs(sa.mantissas[:2, :K]) == cfg.mmax_a)
    assert np.all(np.abs(sb.mantissas[:K, :2]) == cfg.mmax_b)
    _, acc, _ = bfp_matmul(sa, sb, guard_bits=cfg.guard_bits, k_max=K, return_acc=True)
    assert acc[0, 0] == bound and acc[1, 0] == -bound
    got = _check(cfg, sa, False, sb, False, rng, stall=0.0)
    # value check independent of the golden: bound * 2**(e_ref - G - fa - fb)
    e = 0  # 1.999 has exponent 0 in both operands
    want = np.float32(bound * 2.0 ** (e + e - cfg.guard_bits - cfg.frac_a - cfg.frac_b))
    assert got[0, 0] == want and got[0, 1] == want
    assert got[1, 0] == -want and got[1, 1] == -want


def test_hyperblock_three_gemms_from_one_quantization(rng):
    """X, W, dY quantized once: forward X W^T, dX = dY W, dW = dY^T X."""
    cfg = MacArrayConfig(rows=2, cols=2, lanes=2, tile=4, man_bits_a=6, man_bits_b=6,
                         k_max=64, mapping="dsp")
    batch, d_in, d_out = 9, 7, 6
    X = quantized(cfg, random_operand(rng, (batch, d_in)))
    W = quantized(cfg, random_operand(rng, (d_out, d_in)), "b")
    dY = quantized(cfg, random_operand(rng, (batch, d_out)))
    y = _check(cfg, X, False, W, True, rng)
    dx = _check(cfg, dY, False, W, False, rng)
    dw = _check(cfg, dY, True, X, False, rng)
    assert y.shape == (batch, d_out) and dx.shape == (batch, d_in) and dw.shape == (d_out, d_in)


def test_invalid_blocks_give_nan(rng):
    cfg = CONFIGS[0]
    A, B = random_operand(rng, (8, 8)), random_operand(rng, (8, 8))
    A[5, 1] = np.inf
    sa = quantized(cfg, A, nonfinite="flag")
    sb = quantized(cfg, B, "b", nonfinite="flag")
    got = _check(cfg, sa, False, sb, False, rng)
    assert np.isnan(got[4:8]).all() and not np.isnan(got[:4]).any()


@pytest.mark.sweep
@pytest.mark.parametrize("rows,cols,lanes,tile", [(1, 1, 1, 2), (2, 4, 2, 8), (4, 2, 8, 8),
                                                  (4, 4, 4, 4)])
@pytest.mark.parametrize("ma,mb", [(2, 2), (3, 7), (8, 8), (12, 5)])
@pytest.mark.parametrize("mapping", ["lut", "dsp", "dsp-packed"])
def test_sweep_shapes_widths(rows, cols, lanes, tile, ma, mb, mapping, rng):
    cfg = MacArrayConfig(rows=rows, cols=cols, lanes=lanes, tile=tile, man_bits_a=ma,
                         man_bits_b=mb, k_max=4 * tile, mapping=mapping)
    M, K, N = (int(x) for x in rng.integers(1, 2 * tile + 2, 3))
    K = min(K, cfg.k_max)
    A, B = random_operand(rng, (M, K)), random_operand(rng, (K, N))
    ta, tb = (bool(x) for x in rng.integers(0, 2, 2))
    _check(cfg, quantized(cfg, A.T if ta else A), ta, quantized(cfg, B.T if tb else B, "b"),
           tb, rng)


def _run_carry_gemm(cfg, sa, sb, row, col, carry):
    """One GEMM through ``MacArray(ext_eref=True, carry=True)``: a reference header beat
    (``row[it]`` / ``col[jt]``) after each job's exponent headers, ``carry[n]`` added to
    output beat ``n`` (None: zeros). Returns (FP32 beats, acc_o beats, acc_o NaN flags)."""
    from amaranth.hdl import Value
    from amaranth.sim import Simulator

    from hbfp_hw.gateware.mac_array import (MacArray, carry_bits, gemm_beats, operand_layout,
                                            output_beats_per_job, output_layout,
                                            pack_struct, unpack_struct)
    dut = MacArray(cfg, ext_eref=True, carry=True)
    a_beats, b_beats, jobs, _ = gemm_beats(cfg, sa, False, sb, False)
    nk = sa.layout.grid[1]
    per_job = nk * (1 + cfg.tile)

    def with_ref(beats, refs, idx):
        out = []
        for j, (it, jt) in enumerate(jobs):
            job = beats[j * per_job:(j + 1) * per_job]
            out += job[:nk] + [dict(header=1, ref=1, eref=int(refs[idx(it, jt)]))] + job[nk:]
        return out

    a_beats = with_ref(a_beats, row, lambda i, j: i)
    b_beats = with_ref(b_beats, col, lambda i, j: j)
    n_out = output_beats_per_job(cfg) * len(jobs)
    lo = output_layout(cfg)
    got, accs, nans = [], [], []

    def producer(port, beats, layout):
        async def tb(ctx):
            for beat in beats:
                ctx.set(port.valid, 1)
                ctx.set(Value.cast(port.payload), pack_struct(layout, **beat))
                await ctx.tick().until(port.ready)
            ctx.set(port.valid, 0)
        return tb

    cw = carry_bits(cfg)

    async def carry_tb(ctx):   # carry of beat n in the cycle after its cin_take
        n = 0
        while True:
            _, _, take, av, an, raw = await ctx.tick().sample(
                dut.cin_take, dut.acc_o_valid, dut.acc_o_nan, Value.cast(dut.acc_o))
            if av:
                f = [(raw >> (c * cw)) & ((1 << cw) - 1) for c in range(cfg.cols)]
                accs.append([v - (1 << cw) if v >> (cw - 1) else v for v in f])
                nans.append(an)
            if take:
                for c in range(cfg.cols):
                    ctx.set(dut.cin[c], carry[n][c] if carry else 0)
                n += 1

    async def consumer(ctx):
        ctx.set(dut.o.ready, 1)
        cycles = 0
        while len(got) < n_out:
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid,
                                                           Value.cast(dut.o.payload))
            if valid:
                got.append(unpack_struct(lo, payload)["data"])
            cycles += 1
            assert cycles < 50_000
        for _ in range(4):
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer(dut.a, a_beats, operand_layout(cfg, cfg.man_bits_a, True)),
                      background=True)
    sim.add_testbench(producer(dut.b, b_beats, operand_layout(cfg, cfg.man_bits_b, True)),
                      background=True)
    sim.add_testbench(carry_tb, background=True)
    sim.add_testbench(consumer)
    sim.run()
    return got, accs, nans, jobs


@pytest.mark.filterwarnings("ignore:overflow encountered in ldexp:RuntimeWarning")
def test_ext_eref_and_carry_ports_split_k(rng):
    """The top's build: K split in two GEMMs with external reference exponents (one
    above the own maxima, one far above the exponent range) and the first GEMM's
    accumulators carried into the second: bit-identical to the unsplit golden GEMM with
    the reference K block appended (the emulator's EXT_EREF definition)."""
    from hbfp_hw.gateware.mac_array import assemble_output, ref_exponent_limit
    from hbfp_hw.host.emulator import _with_reference_block
    cfg = CONFIGS[0]
    T = cfg.tile
    M, K1, K2, N = 8, 8, 4, 8
    A = random_operand(rng, (M, K1 + K2), 3)
    B = random_operand(rng, (K1 + K2, N), 3)
    sa, sb = quantized(cfg, A), quantized(cfg, B, "b")
    row = sa.exponents.max(axis=1).astype(np.int64) + np.array([0, 1])
    col = sb.exponents.max(axis=0).astype(np.int64)
    col[1] = 10_000                           # clamped: -Inf / +0 outputs in column tile 1
    lim = ref_exponent_limit(cfg)
    a1, a2 = quantized(cfg, A[:, :K1]), quantized(cfg, A[:, K1:])
    b1, b2 = quantized(cfg, B[:K1], "b"), quantized(cfg, B[K1:], "b")
    clamp = np.minimum(col, lim)
    _, acc1, nan1, _ = _run_carry_gemm(cfg, a1, b1, row, clamp, None)
    assert not any(nan1)
    got, _, _, jobs = _run_carry_gemm(cfg, a2, b2, row, clamp, acc1)
    y = assemble_output(cfg, got, jobs, (M, N))
    ea, eb = _with_reference_block(sa, sb, row, col, T)
    exp = bfp_matmul(ea, eb, guard_bits=cfg.guard_bits)
    assert np.array_equal(y.view(np.uint32), exp.view(np.uint32))
    assert np.isneginf(exp[:, T:]).any() and (exp[:, T:] == 0).any()
