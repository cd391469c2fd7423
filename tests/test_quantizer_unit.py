# amaranth: UnusedElaboratable=no
"""Amaranth-simulator tests of the quantizer's parts and of the whole unit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import ROUNDING_MODES, BFPFormat
from hbfp_hw.gateware.prng import XorshiftLanes
from hbfp_hw.gateware.quantizer import ElementQuantizer, MaxTree, Quantizer
from hbfp_hw.prng import random_bits
from hbfp_hw.sim.quantizer_vectors import edge_blocks, f32_bits, random_blocks

sys.path.insert(0, str(Path(__file__).parent))
from quantizer_sim import check_against_golden, golden_stream, simulate  # noqa: E402


def _run(dut, tb):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("n,lps", [(1, 2), (2, 1), (5, 2), (8, 2), (8, 1), (13, 3)])
def test_max_tree(n, lps, rng):
    dut = MaxTree(width=8, n=n, levels_per_stage=lps)
    vecs = rng.integers(0, 256, (200, n))
    vecs[:10] = 0
    vecs[10:20] = 255
    got = []

    async def tb(ctx):
        for t in range(len(vecs) + dut.latency):
            if t < len(vecs):
                ctx.set(dut.i.as_value(), sum(int(v) << (8 * k) for k, v in enumerate(vecs[t])))
            await ctx.tick()
            if t + 1 >= dut.latency:
                got.append(ctx.get(dut.o))
    _run(dut, tb)
    assert got[:len(vecs)] == vecs.max(axis=1).tolist()


def _element_results(man_bits, mode, xs, E, us=None, sr_bits=8, kill=False):
    """Drive ElementQuantizer with a new element every cycle; return its outputs."""
    dut = ElementQuantizer(man_bits=man_bits, modes=(mode,), sr_bits=sr_bits)
    bits = f32_bits(xs)
    got = []

    async def tb(ctx):
        ctx.set(dut.en, 1)
        ctx.set(dut.ep, E + 127)
        ctx.set(dut.kill, int(kill))
        n = len(bits)
        for t in range(n + 3):
            if t < n:
                ctx.set(dut.x.as_value(), int(bits[t]))
            if us is not None and 2 <= t < n + 2:
                ctx.set(dut.u, int(us[t - 2]))
            await ctx.tick()
            if t >= 2 and len(got) < n:
                got.append(ctx.get(dut.m))
    _run(dut, tb)
    return got


@pytest.mark.parametrize("mode", ["nearest_even", "nearest_away", "toward_zero"])
@pytest.mark.parametrize("man_bits", [2, 4, 8])
def test_element_rounding_ties(mode, man_bits):
    """x = (k + f) * 2**(E - frac_bits) for f in {0, 1/4, 1/2, 3/4}: hand-derived rounding."""
    E = 3
    fb = man_bits - 2
    mmax = 2 ** (man_bits - 1) - 1
    xs, want = [], []
    for k in range(0, mmax + 1):
        for f in (0.0, 0.25, 0.5, 0.75):
            for s in (1, -1):
                xs.append(s * (k + f) * 2.0 ** (E - fb))
                if mode == "toward_zero":
                    q = k
                elif mode == "nearest_away":
                    q = k + (f >= 0.5)
                else:
                    q = k + (f > 0.5 or (f == 0.5 and k % 2 == 1))
                want.append(s * min(q, mmax))
    assert _element_results(man_bits, mode, xs, E) == want


def test_element_stochastic_threshold():
    """floor(y + u/2**r): with fraction f (r bits), rounds up exactly when u >= 2**r - f."""
    r = 4
    xs, us, want = [], [], []
    for f in range(16):
        for u in range(16):
            xs.append((5 + f / 16) * 2.0 ** -6)   # E=0, man_bits=8: unit 2**-6
            us.append(u)
            want.append(5 + (f + u >= 16))
    assert _element_results(8, "stochastic", xs, 0, us=us, sr_bits=r) == want


def test_element_specials():
    # subnormals flush, zero, saturation above the block exponent (clamped E), kill
    xs = [np.float32(1e-45), -0.0, 0.0, 2.0 ** 5, -(2.0 ** 5), 1.99999988]
    assert _element_results(8, "nearest_even", xs, 0) == [0, 0, 0, 127, -127, 127]
    assert _element_results(8, "nearest_even", [1.0, -1.5], 0, kill=True) == [0, 0]


def test_prng_lanes_match_golden():
    lanes, bits, seed = 3, 7, 0xDEADBEEF
    dut = XorshiftLanes(lanes=lanes, bits=bits, reset_seed=5)
    steps = 40
    after_reset, after_seed = [], []

    async def tb(ctx):
        for _ in range(5):                       # reset-seed sequence, with idle cycles
            after_reset.append(ctx.get(dut.u))
            ctx.set(dut.step, 1)
            await ctx.tick()
            ctx.set(dut.step, 0)
            await ctx.tick()
        ctx.set(dut.seed, seed)
        ctx.set(dut.reseed, 1)
        await ctx.tick()
        ctx.set(dut.reseed, 0)
        ctx.set(dut.step, 1)
        for _ in range(steps):
            after_seed.append(ctx.get(dut.u))
            await ctx.tick()
    _run(dut, tb)

    def unpack(words):
        return np.array([[(w >> (bits * k)) & ((1 << bits) - 1) for k in range(lanes)]
                         for w in words]).reshape(-1)
    assert unpack(after_reset).tolist() == random_bits(5, lanes, 5 * lanes, bits).tolist()
    assert unpack(after_seed).tolist() == random_bits(seed, lanes, steps * lanes, bits).tolist()


def test_prng_zero_seed_replacement():
    # seed such that lane 0's start state is zero: must use the replacement constant
    from hbfp_hw.prng import LANE_SEED_MULT
    dut = XorshiftLanes(lanes=1, bits=32, reset_seed=LANE_SEED_MULT)
    got = []

    async def tb(ctx):
        got.append(ctx.get(dut.u))
    _run(dut, tb)
    assert got == random_bits(LANE_SEED_MULT, 1, 1, 32).tolist()


UNIT_CONFIGS = [
    (8, 32, 8, "nearest_even", True),
    (4, 8, 4, "stochastic", False),
    (2, 4, 1, "nearest_away", False),
    (5, 12, 3, "toward_zero", False),
    (8, 2, 2, "stochastic", False),
]


@pytest.mark.parametrize("mb,blk,ln,rnd,rt", UNIT_CONFIGS)
def test_unit_matches_golden(mb, blk, ln, rnd, rt, rng):
    cfg = QuantizerConfig(format=BFPFormat(man_bits=mb, block_shape=(blk,), rounding=rnd,
                                           exp_bits=6 if mb == 5 else 8),
                          lanes=ln, runtime_rounding=rt)
    dut = Quantizer(cfg)
    for mode in cfg.rounding_modes:
        eb, names = edge_blocks(cfg.format, blk, rng)
        bits = np.concatenate([eb, random_blocks(60, blk, rng)])
        names = names + ["random"] * 60
        seed = int(rng.integers(0, 2**32))
        res = simulate(cfg, bits, rng=rng, rounding=mode, seed=seed, p_valid=0.7,
                       p_ready=0.6, quantizer=dut)
        check_against_golden(cfg, bits, res, rounding=mode, seed=seed, names=names)


@pytest.mark.parametrize("blk,ln", [(32, 8), (8, 4), (4, 4), (1, 1), (6, 2)])
def test_unit_full_throughput(blk, ln, rng):
    cfg = QuantizerConfig(format=BFPFormat(block_shape=(blk,)), lanes=ln)
    bits = random_blocks(30, blk, rng)
    res = simulate(cfg, bits, rng=rng)
    check_against_golden(cfg, bits, res)
    c = res[-1]
    nbeats = 30 * blk // ln
    assert c["last"] - c["first"] + 1 == nbeats, "bubbles with input valid / output ready"


def test_unit_backpressure_extremes(rng):
    cfg = QuantizerConfig(format=BFPFormat(block_shape=(8,), rounding="stochastic"), lanes=2)
    bits = random_blocks(20, 8, rng)
    for pv, pr in [(1.0, 0.1), (0.1, 1.0), (0.5, 0.5)]:
        res = simulate(cfg, bits, rng=rng, p_valid=pv, p_ready=pr, seed=3)
        check_against_golden(cfg, bits, res, seed=3)


def _blocks_near(E: int, n: int, block: int, fmt: BFPFormat, rng) -> np.ndarray:
    """Blocks of values around a static exponent ``E``: exact multiples of half a
    mantissa step at ``E`` (ties of every parity, values that round into and past the
    mantissa range) and random values within 2**(E-12) .. 2**(E+3) (saturation above
    2**(E+1)), with zeros; exponent fields clipped to the normal range."""
    sign = rng.integers(0, 2, (n, block)).astype(np.uint32) << 31
    k = rng.integers(0, 4 * fmt.mmax + 8, (n, block)).astype(np.float64)
    step = np.ldexp(1.0, max(min(E - fmt.frac_bits - 1, 127), -149))
    with np.errstate(over="ignore"):
        ties = f32_bits((k * step).astype(np.float32)) & np.uint32(0x7FFFFFFF)
    field = np.clip(E + 127 - rng.integers(-3, 13, (n, block)), 1, 254)
    rnd = (field.astype(np.uint32) << 23) | rng.integers(0, 1 << 23, (n, block),
                                                         dtype=np.uint32)
    out = np.where(rng.random((n, block)) < 0.5, ties, rnd) | sign
    out[rng.random((n, block)) < 0.1] = 0
    return out.astype(np.uint32)


STATIC_CONFIGS = [
    (8, 32, 8, "nearest_even", True, 8),
    (4, 8, 4, "stochastic", False, 8),
    (5, 12, 3, "toward_zero", False, 6),
    (6, 4, 2, "nearest_away", False, 10),
]


@pytest.mark.parametrize("mb,blk,ln,rnd,rt,eb", STATIC_CONFIGS)
def test_unit_static_exponent_matches_golden(mb, blk, ln, rnd, rt, eb, rng):
    """static_en: every block gets E = static_code - bias, as golden
    quantize(..., exponent=E): E at both range ends, random E, E at the data; edge
    blocks (zeros, subnormals, NaN/Inf flagged, FLT_MAX), random blocks over the whole
    FP32 range and blocks around E (ties, saturation); random valid/ready stalls; then
    static_en low on the same unit gives the block maxima again."""
    cfg = QuantizerConfig(format=BFPFormat(man_bits=mb, block_shape=(blk,), rounding=rnd,
                                           exp_bits=eb),
                          lanes=ln, runtime_rounding=rt, static_exponent=True)
    fmt = cfg.format
    dut = Quantizer(cfg)
    edge, enames = edge_blocks(fmt, blk, rng)
    modes = cfg.rounding_modes
    for i, E in enumerate([fmt.emin, fmt.emax, int(rng.integers(fmt.emin, fmt.emax + 1)),
                           int(rng.integers(-30, 30)), 0]):
        mode = modes[i % len(modes)]
        bits = np.concatenate([edge, random_blocks(20, blk, rng),
                               _blocks_near(E, 20, blk, fmt, rng)])
        names = enames + ["random"] * 20 + [f"near E={E}"] * 20
        seed = int(rng.integers(0, 2**32))
        res = simulate(cfg, bits, rng=rng, rounding=mode, seed=seed, p_valid=0.7,
                       p_ready=0.6, quantizer=dut, static_code=E + fmt.exp_bias)
        check_against_golden(cfg, bits, res, rounding=mode, seed=seed, names=names,
                             exponent=E)
        codes = res[0].reshape(len(bits), -1)[:, 0]
        inv = res[1].reshape(len(bits), -1)[:, 0]
        assert (codes[~inv] == E + fmt.exp_bias).all() and inv.any()
    bits = np.concatenate([edge, random_blocks(20, blk, rng)])
    res = simulate(cfg, bits, rng=rng, seed=5, p_valid=0.8, p_ready=0.8, quantizer=dut)
    check_against_golden(cfg, bits, res, seed=5, names=enames + ["random"] * 20)


def test_static_exponent_ports_only_when_configured():
    cfg = QuantizerConfig(format=BFPFormat(block_shape=(8,)), lanes=2)
    assert "static_en" not in Quantizer(cfg).signature.members  # default: no new ports
    assert "static_exponent" not in cfg.to_dict()
    on = QuantizerConfig(format=BFPFormat(block_shape=(8,)), lanes=2, static_exponent=True)
    from amaranth.hdl import Shape
    mem = Quantizer(on).signature.members
    assert Shape.cast(mem["static_en"].shape).width == 1
    assert Shape.cast(mem["static_code"].shape).width == on.exp_bits
    assert QuantizerConfig.from_dict(on.to_dict()) == on
    assert QuantizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="static_exponent must be True or False"):
        QuantizerConfig(format=BFPFormat(block_shape=(8,)), static_exponent=1)


def test_golden_stream_helper_is_independent():
    # sanity of the comparison path: the golden helper gives MXINT8 values by hand
    cfg = QuantizerConfig(format=BFPFormat(block_shape=(4,)), lanes=4)
    codes, man = golden_stream(cfg, f32_bits([[1.0, 0.5, -0.25, 3.0]]))
    assert codes.tolist() == [128] and man.tolist() == [[32, 16, -8, 96]]


@pytest.mark.sweep
@pytest.mark.parametrize("mb", range(2, 9))
@pytest.mark.parametrize("blk,ln", [(4, 1), (4, 4), (8, 2), (16, 8), (32, 8), (24, 3)])
@pytest.mark.parametrize("rnd", ROUNDING_MODES)
def test_unit_sweep(mb, blk, ln, rnd, rng):
    cfg = QuantizerConfig(format=BFPFormat(man_bits=mb, block_shape=(blk,), rounding=rnd),
                          lanes=ln)
    eb, names = edge_blocks(cfg.format, blk, rng)
    bits = np.concatenate([eb, random_blocks(100, blk, rng)])
    res = simulate(cfg, bits, rng=rng, p_valid=0.8, p_ready=0.7, seed=11)
    check_against_golden(cfg, bits, res, seed=11, names=names + ["random"] * 100)
