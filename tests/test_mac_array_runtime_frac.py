# amaranth: UnusedElaboratable=no
"""``MacArray(runtime_frac=True)``: formats narrower than the ports (HBFP4 mantissas
sign-extended in an 8-bit array) with the FP32 scale taken per job from the header
beats' ``frac``, bit for bit against ``hbfp_hw.bfp_matmul`` of each GEMM's formats;
and the ``dual_precision`` array, whose HBFP4 x HBFP4 jobs run two products per
multiplier."""

from __future__ import annotations

import re

import numpy as np
import pytest
from amaranth.hdl import Value
from amaranth.sim import Simulator

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.formats import BFPFormat
from hbfp_hw.gateware.mac_array import (MacArray, assemble_output, frac_width, gemm_beats,
                                        operand_frac, operand_layout, output_beats_per_job,
                                        output_layout, pack_struct, unpack_struct)
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.quantize import quantize

CFG = MacArrayConfig(rows=2, cols=2, lanes=2, tile=4, man_bits_a=8, man_bits_b=8, k_max=64,
                     mapping="dsp")
#: dual-precision arrays: narrow mode 1 k step (T = 2L), 2 k steps with a LUT multiplier
#: and one lane, 8 lanes (two-stage lane sums) in a 16-wide tile
DUAL_CFGS = [
    CFG.replace(dual_precision=True),
    MacArrayConfig(rows=2, cols=1, lanes=1, tile=4, man_bits_a=8, man_bits_b=6, k_max=64,
                   mapping="lut", dual_precision=True, guard_bits=3),
    # tile 16, 8 lanes: about 100 s per build in the simulator, so in the sweep
    pytest.param(MacArrayConfig(rows=2, cols=2, lanes=8, tile=16, man_bits_a=8,
                                man_bits_b=8, k_max=64, mapping="dsp", dual_precision=True),
                 marks=pytest.mark.sweep),
]


def _fmt(cfg: MacArrayConfig, man_bits: int) -> BFPFormat:
    return BFPFormat(man_bits=man_bits, exp_bits=cfg.exp_bits,
                     block_shape=(cfg.tile, cfg.tile), block_axes=(0, 1), name=f"HBFP{man_bits}")


def edge_operand(rng, shape, T: int, nan: bool = False) -> np.ndarray:
    """Random values whose ``T x T`` tiles are drawn from edge classes: ordinary, all
    zero, saturating (the largest element rounds up to ``2**(man_bits-1)``), tiny
    (``2**-126 .. 2**-100``: products flush to zero), large (``2**100 .. 2**126``:
    products overflow to Inf), one NaN (``nan``)."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-3, 4, size=shape))
    gm, gn = -(-shape[0] // T), -(-shape[1] // T)
    for i in range(gm):
        for j in range(gn):
            blk = x[i * T:(i + 1) * T, j * T:(j + 1) * T]
            kind = rng.choice(["plain", "plain", "zero", "sat", "tiny", "large"])
            if kind == "zero":
                blk[...] = 0
            elif kind == "sat":
                blk[...] = np.sign(rng.standard_normal(blk.shape)) * 1.999
            elif kind == "tiny":
                blk *= 2.0 ** int(rng.integers(-126, -100))
            elif kind == "large":
                blk *= 2.0 ** int(rng.integers(100, 124))
    if nan:
        x[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.nan
    return x.astype(np.float32)


def _with_neutral_refs(cfg: MacArrayConfig, beats: list[dict]) -> list[dict]:
    """After each job's exponent headers, a reference beat at the smallest exponent
    (changes no maximum) whose ``frac`` is wrong on purpose: the array ignores it."""
    out = []
    for n, beat in enumerate(beats):
        out.append(beat)
        if beat["header"] and not beats[n + 1]["header"]:
            wrong = 6 if beat["frac"] <= 2 else 1
            out.append(dict(header=1, ref=1, eref=-cfg.exp_bias, frac=wrong))
    return out


def run_jobs(cfg: MacArrayConfig, gemms, rng, *, stall: float = 0.3, cycles: bool = False,
             **build):
    """Run GEMMs ``(sa, ta, sb, tb, man_bits_a, man_bits_b)`` back to back through one
    ``MacArray(cfg, runtime_frac=True, **build)`` (one beat stream per operand, so jobs
    of consecutive GEMMs overlap) with random valid gaps and ready back-pressure.
    Returns the FP32 result of each GEMM (and, ``cycles=True``, the clock cycles until
    the last output beat)."""
    dut = MacArray(cfg, runtime_frac=True, **build)
    ext = build.get("ext_eref", False)
    la = operand_layout(cfg, cfg.man_bits_a, ext, True)
    lb = operand_layout(cfg, cfg.man_bits_b, ext, True)
    lo = output_layout(cfg)
    per = output_beats_per_job(cfg)
    a_all, b_all, parts = [], [], []
    for sa, ta, sb, tb, ma, mb in gemms:
        a, b, jobs, shape = gemm_beats(cfg, sa, ta, sb, tb, man_bits_a=ma, man_bits_b=mb)
        if ext:
            a, b = _with_neutral_refs(cfg, a), _with_neutral_refs(cfg, b)
        a_all += a
        b_all += b
        parts.append((jobs, shape))
    n_out = per * sum(len(j) for j, _ in parts)
    seeds = rng.integers(0, 2**31, size=3)
    got: list[list[int]] = []
    n_cycles = [0]

    def producer(port, beats, layout, seed):
        r = np.random.default_rng(seed)

        async def tb(ctx):
            for beat in beats:
                while r.random() < stall:
                    await ctx.tick()
                ctx.set(port.valid, 1)
                ctx.set(Value.cast(port.payload), pack_struct(layout, **beat))
                await ctx.tick().until(port.ready)
                ctx.set(port.valid, 0)
        return tb

    async def consumer(ctx):
        r = np.random.default_rng(seeds[2])
        while len(got) < n_out:
            rdy = int(r.random() >= stall)
            ctx.set(dut.o.ready, rdy)
            await ctx.delay(0)
            if rdy and ctx.get(dut.o.valid):
                v = unpack_struct(lo, ctx.get(Value.cast(dut.o.payload)))
                got.append(v["data"])
                assert v["last"] == int(len(got) % per == 0), f"last wrong at {len(got)}"
            await ctx.tick()
            n_cycles[0] += 1
            assert n_cycles[0] < 400_000, "timeout waiting for output beats"
        ctx.set(dut.o.ready, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer(dut.a, a_all, la, seeds[0]), background=True)
    sim.add_testbench(producer(dut.b, b_all, lb, seeds[1]), background=True)
    sim.add_testbench(consumer)
    sim.run()
    out, n = [], 0
    for jobs, shape in parts:
        k = per * len(jobs)
        out.append(assemble_output(cfg, got[n:n + k], jobs, shape))
        n += k
    return (out, n_cycles[0]) if cycles else out


def _gemm(cfg, rng, ma, mb, nan=False):
    M, K, N = (int(x) for x in rng.integers(3, 2 * cfg.tile + 2, 3))
    A = edge_operand(rng, (M, K), cfg.tile, nan=nan)
    B = edge_operand(rng, (K, N), cfg.tile)
    ta, tb = (bool(x) for x in rng.integers(0, 2, 2))
    sa = quantize(A.T if ta else A, _fmt(cfg, ma), nonfinite="flag")
    sb = quantize(B.T if tb else B, _fmt(cfg, mb), nonfinite="flag")
    return sa, ta, sb, tb, ma, mb


def _assert_equal(got, sa, ta, sb, tb, cfg, what):
    exp = bfp_matmul(sa.T if ta else sa, sb.T if tb else sb, guard_bits=cfg.guard_bits,
                     k_max=cfg.k_max)
    g, e = got.view(np.uint32), exp.view(np.uint32)
    bad = np.argwhere(g != e)
    assert not len(bad), (f"{what}: {len(bad)} outputs differ, first {tuple(bad[0])}: "
                          f"{g[tuple(bad[0])]:#x} vs golden {e[tuple(bad[0])]:#x}")
    return exp


#: the top's build: reference header beats (neutral, with a wrong frac) in every job
BUILDS = {"runtime_frac": {}, "top": {"ext_eref": True, "carry": True}}


@pytest.mark.filterwarnings("ignore:overflow encountered in ldexp:RuntimeWarning")
@pytest.mark.parametrize("build", list(BUILDS))
def test_mixed_formats_back_to_back(build, rng):
    """HBFP4 x HBFP4, HBFP4 x HBFP8, HBFP8 x HBFP4, HBFP8 x HBFP8 GEMMs (twice, shuffled)
    in one stream with stalls: consecutive jobs have different fractions while one
    drains and the next loads. Edge tiles: zero, saturating, tiny, large, NaN."""
    cfg = CFG
    pairs = [(4, 4), (4, 8), (8, 4), (8, 8)] * 2
    order = rng.permutation(len(pairs))
    gemms = [_gemm(cfg, rng, *pairs[i], nan=(n == 3)) for n, i in enumerate(order)]
    outs = run_jobs(cfg, gemms, rng, stall=0.3, **BUILDS[build])
    seen = set()
    for n, ((sa, ta, sb, tb, ma, mb), got) in enumerate(zip(gemms, outs)):
        exp = _assert_equal(got, sa, ta, sb, tb, cfg, f"GEMM {n} HBFP{ma} x HBFP{mb}")
        seen |= {"nan" for v in exp.flat if np.isnan(v)}
        seen |= {"inf" for v in exp.flat if np.isinf(v)}
        seen |= {"zero" for v in exp.flat if v == 0}
    assert seen == {"nan", "inf", "zero"}, f"edge classes reached: {seen}"


def test_narrow_format_scale_differs_from_wide(rng):
    """The same integer mantissas read as HBFP4 and as HBFP8 differ by 2**(4+4) in
    value (scale fa + fb): the job's frac is used, not the ports' width."""
    cfg = CFG
    x = np.array([[1.5, -0.75, 0.5, 1.0]] * 4, np.float32)
    s4 = quantize(x, _fmt(cfg, 4))
    s8 = quantize(x, _fmt(cfg, 8))
    (y4,) = run_jobs(cfg, [(s4, False, s4, True, 4, 4)], rng, stall=0.0)
    (y8,) = run_jobs(cfg, [(s8, False, s8, True, 8, 8)], rng, stall=0.0)
    want = x.astype(np.float64) @ x.T.astype(np.float64)
    assert np.array_equal(y4, want.astype(np.float32))
    assert np.array_equal(y8, want.astype(np.float32))


def test_runtime_frac_layout_and_helpers():
    cfg = CFG
    assert "frac" not in dict(operand_layout(cfg, 8).members)
    lay = operand_layout(cfg, 8, runtime_frac=True)
    assert lay["frac"].width == frac_width(8) == 3
    assert frac_width(2) == 1 and frac_width(4) == 2
    assert operand_frac(cfg, 4, "a") == 2 and operand_frac(cfg, 8, "b") == 6
    with pytest.raises(ValueError, match=r"man_bits=9 of operand b is out of range; "
                                         r"accepted range is \[2, 8\]"):
        operand_frac(cfg, 9, "b")
    with pytest.raises(ValueError, match="operand='c'"):
        operand_frac(cfg, 4, "c")
    # the default build has no frac field and the same ports as before
    plain = MacArray(cfg)
    assert "frac" not in dict(plain.a.payload.shape().members)


# ---- dual_precision ------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in ldexp:RuntimeWarning")
@pytest.mark.parametrize("cfg", DUAL_CFGS, ids=lambda c: f"{c.rows}x{c.cols}x{c.lanes}-"
                         f"t{c.tile}-{c.man_bits_a}b{c.man_bits_b}-{c.mapping}")
@pytest.mark.parametrize("build", list(BUILDS))
def test_dual_precision_both_modes_back_to_back(cfg, build, rng):
    """Narrow-mode (HBFP4 x HBFP4: two products per multiplier) and wide-mode jobs
    (HBFP4 x HBFP8, HBFP8 x HBFP4, HBFP8 x HBFP8) interleaved in one stream with stalls,
    edge tiles included: bit for bit against bfp_matmul."""
    wide_b = min(8, cfg.man_bits_b)
    pairs = [(4, 4), (4, wide_b), (8, 4), (8, wide_b), (4, 4), (3, 2)] * 2
    order = rng.permutation(len(pairs))
    gemms = [_gemm(cfg, rng, *pairs[i], nan=(n == 2)) for n, i in enumerate(order)]
    outs = run_jobs(cfg, gemms, rng, stall=0.3, **BUILDS[build])
    for n, ((sa, ta, sb, tb, ma, mb), got) in enumerate(zip(gemms, outs)):
        _assert_equal(got, sa, ta, sb, tb, cfg, f"GEMM {n} HBFP{ma} x HBFP{mb}")


def test_dual_precision_extremes(rng):
    """Narrow mode at the field limits: every product pair at +-49 with equal and
    opposite signs (middle field +-98, low field +-49 borrowing), K = k_max."""
    cfg = DUAL_CFGS[0]
    K = cfg.k_max
    A = np.full((4, K), 1.75, np.float32)            # 1.75 * 4 = 7
    A[1] = -1.75
    A[2, ::2] = -1.75
    A[3, 1::3] = 0
    B = np.full((K, 4), 1.75, np.float32)
    B[:, 1] = -1.75
    B[1::2, 2] = -1.75
    B[::5, 3] = 0.5
    sa, sb = quantize(A, _fmt(cfg, 4)), quantize(B, _fmt(cfg, 4))
    assert np.abs(sa.mantissas).max() == 7 and np.abs(sb.mantissas).max() == 7
    (got,) = run_jobs(cfg, [(sa, False, sb, False, 4, 4)], rng, stall=0.2)
    _assert_equal(got, sa, False, sb, False, cfg, "extremes")


def test_dual_precision_narrow_mode_doubles_macs_per_cycle(rng):
    """Compute-bound shape (T**2 >= rows * cols * 2 lanes): each extra K tile of a job
    costs windows * T / lanes cycles in the wide mode and half that in the narrow mode,
    i.e. 2 * rows * cols * lanes MACs per cycle."""
    cfg = MacArrayConfig(rows=2, cols=2, lanes=2, tile=8, man_bits_a=8, man_bits_b=8,
                         k_max=64, mapping="dsp", dual_precision=True)
    assert cfg.k_steps_narrow * 2 == cfg.k_steps
    assert cfg.macs_per_cycle_narrow == 2 * cfg.macs_per_cycle == 16
    T = cfg.tile
    took = {}
    for mb in (4, 8):
        for nk in (2, 6):
            A = rng.standard_normal((T, nk * T)).astype(np.float32)
            B = rng.standard_normal((nk * T, T)).astype(np.float32)
            sa, sb = quantize(A, _fmt(cfg, 4)), quantize(B, _fmt(cfg, mb))
            (got,), n = run_jobs(cfg, [(sa, False, sb, False, 4, mb)], rng, stall=0.0,
                                 cycles=True)
            _assert_equal(got, sa, False, sb, False, cfg, f"nk={nk} b={mb}")
            took[mb, nk] = n
    # an extra K tile also adds one exponent header beat before the job's first product
    per_tile = {mb: (took[mb, 6] - took[mb, 2]) / 4 - 1 for mb in (4, 8)}
    assert per_tile[8] == cfg.windows * cfg.k_steps, took
    assert per_tile[4] == cfg.windows * cfg.k_steps_narrow, took
    assert T ** 3 / per_tile[4] == cfg.macs_per_cycle_narrow
    assert T ** 3 / per_tile[8] == cfg.macs_per_cycle


@pytest.mark.parametrize("kw,msg", [
    (dict(man_bits_a=4, man_bits_b=4, mapping="dsp-packed"),
     "dual_precision needs one product per multiplier"),
    (dict(man_bits_b=3), "dual_precision needs man_bits_b >= 4, got 3"),
    (dict(lanes=4, tile=4), "dual_precision needs 2 * lanes = 8 to divide tile=4"),
])
def test_dual_precision_config_messages(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        MacArrayConfig(**{**dict(rows=2, cols=2, lanes=2, tile=4, dual_precision=True), **kw})
    with pytest.raises(ValueError, match="runtime_frac must be True"):
        MacArray(DUAL_CFGS[0], runtime_frac=False)


def test_dual_precision_config_derived_and_roundtrip():
    cfg = MacArrayConfig(rows=4, cols=4, lanes=4, tile=16, man_bits_a=8, man_bits_b=8,
                         mapping="dsp", dual_precision=True)
    assert (cfg.k_steps, cfg.k_steps_narrow) == (4, 2)
    assert (cfg.macs_per_cycle, cfg.macs_per_cycle_narrow) == (64, 128)
    assert (cfg.mult_bits_a, cfg.mult_bits_b) == (12, 12)       # 8 + 4-bit packed pair
    assert cfg.multipliers == 64 and cfg.pe_latency == cfg.replace(
        dual_precision=False).pe_latency + 1
    assert MacArrayConfig.from_dict(cfg.to_dict()) == cfg
    assert "k_steps_narrow" not in cfg.replace(dual_precision=False).to_dict()["derived"]
