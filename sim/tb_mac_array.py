"""cocotb testbench of the generated MAC array (``hbfp-hw generate mac-array``).

The configuration comes from the manifest named by ``HBFP_MANIFEST``; every output is
compared bit for bit with :func:`hbfp_hw.bfp_matmul`. Small classes: a stream driver per
operand (random valid gaps), a monitor on ``o`` (random ready back-pressure), a model
(golden GEMM) and a checker. Environment: ``HBFP_MAC_GEMMS`` (random GEMMs, default 3),
``HBFP_MAC_SEED`` (default: cocotb's random seed), ``HBFP_MAC_STALL`` (stall
probability, default 0.3).
"""

from __future__ import annotations

import os

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge

from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.gateware.mac_array import (assemble_output, gemm_beats, operand_layout,
                                        output_beats_per_job, output_layout, pack_struct,
                                        unpack_struct)
from hbfp_hw.manifest import read_manifest
from hbfp_hw.quantize import quantize
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor


def _config() -> MacArrayConfig:
    man = read_manifest(os.environ["HBFP_MANIFEST"], kind="mac_array")
    return MacArrayConfig.from_dict(man["config"])


class OutputMonitor:
    """Takes ``o`` beats under random back-pressure (:class:`StreamMonitor`)."""

    def __init__(self, dut, cfg: MacArrayConfig, rng: np.random.Generator, stall: float):
        self.dut, self.cfg = dut, cfg
        self.layout = output_layout(cfg)
        self.beats: list[dict] = []
        self.stream = StreamMonitor(
            dut, "o", rng, lambda w: self.beats.append(unpack_struct(self.layout, w)),
            p_ready=1.0 - stall)

    async def run(self) -> None:
        await self.stream.run()

    async def take(self, n: int, timeout_cycles: int) -> list[dict]:
        for _ in range(timeout_cycles):
            if len(self.beats) >= n:
                break
            await FallingEdge(self.dut.clk)
        assert len(self.beats) >= n, f"timeout: {len(self.beats)} of {n} output beats"
        out, self.beats = self.beats[:n], self.beats[n:]
        return out


class Model:
    """The golden GEMM of the stored operands in the orientation the job asks for."""

    def __init__(self, cfg: MacArrayConfig):
        self.cfg = cfg

    def __call__(self, sa, ta, sb, tb) -> np.ndarray:
        return bfp_matmul(sa.T if ta else sa, sb.T if tb else sb,
                          guard_bits=self.cfg.guard_bits, k_max=self.cfg.k_max)


class Checker:
    """Bit-for-bit comparison of FP32 results; also checks the ``last`` flags."""

    def __init__(self, cfg: MacArrayConfig, log):
        self.cfg, self.log = cfg, log
        self.checked = 0

    def __call__(self, what: str, beats: list[dict], jobs, shape, expected: np.ndarray):
        per = output_beats_per_job(self.cfg)
        for n, b in enumerate(beats):
            assert b["last"] == int((n + 1) % per == 0), f"{what}: bad last flag on beat {n}"
        got = assemble_output(self.cfg, [b["data"] for b in beats], jobs, shape)
        gb, eb = got.view(np.uint32), expected.view(np.uint32)
        bad = np.argwhere(gb != eb)
        if len(bad):
            i, j = bad[0]
            raise AssertionError(
                f"{what}: {len(bad)} of {gb.size} outputs differ; first at ({i}, {j}): "
                f"got {gb[i, j]:#010x} ({got[i, j]!r}), expected {eb[i, j]:#010x} "
                f"({expected[i, j]!r})")
        self.checked += gb.size
        self.log.info(f"{what}: {gb.size} outputs bit-exact (shape {shape})")


class Bench:
    def __init__(self, dut):
        self.dut = dut
        self.cfg = _config()
        seed = int(os.environ.get("HBFP_MAC_SEED", cocotb.RANDOM_SEED))
        self.rng = np.random.default_rng(seed)
        self.stall = float(os.environ.get("HBFP_MAC_STALL", "0.3"))
        self.model = Model(self.cfg)
        self.checker = Checker(self.cfg, dut._log)
        self.monitor = OutputMonitor(dut, self.cfg, self.rng, self.stall)
        rf = self.cfg.dual_precision        # such arrays are built with runtime_frac
        self.la = operand_layout(self.cfg, self.cfg.man_bits_a, runtime_frac=rf)
        self.lb = operand_layout(self.cfg, self.cfg.man_bits_b, runtime_frac=rf)
        dut._log.info(f"MAC array {self.cfg.to_dict()}, HBFP_MAC_SEED={seed}")

    async def start(self) -> None:
        dut = self.dut
        cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
        dut.rst.value = 1
        dut.a__valid.value = 0
        dut.b__valid.value = 0
        dut.o__ready.value = 0
        await ClockCycles(dut.clk, 3)
        await FallingEdge(dut.clk)
        dut.rst.value = 0
        cocotb.start_soon(self.monitor.run())

    def quantize(self, x, which="a", nonfinite="raise", man_bits=None):
        fmt = self.cfg.format_a() if which == "a" else self.cfg.format_b()
        if man_bits is not None:
            fmt = fmt.replace(man_bits=man_bits)
        return quantize(np.asarray(x, dtype=np.float32), fmt, nonfinite=nonfinite)

    async def gemm(self, what: str, sa, ta: bool, sb, tb: bool) -> None:
        a_beats, b_beats, jobs, shape = gemm_beats(self.cfg, sa, ta, sb, tb,
                                                   man_bits_a=sa.fmt.man_bits,
                                                   man_bits_b=sb.fmt.man_bits)
        da = StreamDriver(self.dut, "a", np.random.default_rng(self.rng.integers(2**32)),
                          1.0 - self.stall)
        db = StreamDriver(self.dut, "b", np.random.default_rng(self.rng.integers(2**32)),
                          1.0 - self.stall)
        ta_ = cocotb.start_soon(da.send([pack_struct(self.la, **b) for b in a_beats]))
        tb_ = cocotb.start_soon(db.send([pack_struct(self.lb, **b) for b in b_beats]))
        n = output_beats_per_job(self.cfg) * len(jobs)
        cyc = 50 * (len(a_beats) + len(b_beats) + n) + 1000
        beats = await self.monitor.take(n, cyc)
        await ta_
        await tb_
        self.checker(what, beats, jobs, shape, self.model(sa, ta, sb, tb))


def _values(rng, shape, spread=3):
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
            ).astype(np.float32)


def _dims(rng, cfg):
    """Sizes that are not multiples of the tile / array (padding)."""
    T = cfg.tile
    def d(): return int(rng.integers(1, 2 * T + 2))
    return d(), min(cfg.k_max, int(rng.integers(1, 3 * T + 2))), d()


@cocotb.test()
async def random_gemms(dut):
    """Random GEMMs, random orientations, sizes not multiples of tile or array."""
    b = Bench(dut)
    await b.start()
    for g in range(int(os.environ.get("HBFP_MAC_GEMMS", "3"))):
        M, K, N = _dims(b.rng, b.cfg)
        ta, tb = bool(b.rng.integers(2)), bool(b.rng.integers(2))
        A, B = _values(b.rng, (M, K)), _values(b.rng, (K, N))
        sa = b.quantize(A.T if ta else A, "a")
        sb = b.quantize(B.T if tb else B, "b")
        await b.gemm(f"gemm {g} {M}x{K}x{N} ta={ta} tb={tb}", sa, ta, sb, tb)


@cocotb.test()
async def edge_classes(dut):
    """Zero tiles, maximum magnitudes at K = k_max, far-apart exponents, overflow to
    Inf, flush to zero, invalid blocks -> NaN."""
    b = Bench(dut)
    await b.start()
    cfg, rng, T = b.cfg, b.rng, b.cfg.tile
    # zero tiles mixed with non-zero ones
    A, B = _values(rng, (2 * T, 2 * T)), _values(rng, (2 * T, T + 1))
    A[:T, :T] = 0
    B[T:, :] = 0
    await b.gemm("zero tiles", b.quantize(A), False, b.quantize(B, "b"), False)
    # maximum magnitudes over the longest K the accumulator is sized for
    K = cfg.k_max
    big = np.float32(1.999)
    A = np.full((T, K), big, np.float32)
    B = np.full((K, 2), big, np.float32)
    B[:, 1] = -big
    sa, sb = b.quantize(A), b.quantize(B, "b")
    assert int(np.abs(sa.mantissas).min()) == cfg.mmax_a
    await b.gemm("max magnitude, K=k_max", sa, False, sb, False)
    # exponents far apart inside one reduction (alignment shifts beyond the accumulator)
    A = _values(rng, (T + 1, 3 * T))
    B = _values(rng, (3 * T, T))
    A[:, T:2 * T] *= np.float32(2.0**-60)
    B[2 * T:, :] *= np.float32(2.0**40)
    await b.gemm("far exponents", b.quantize(A), False, b.quantize(B, "b"), False)
    # FP32 overflow to +-Inf and flush to zero
    A = _values(rng, (T, T), 1) * np.float32(2.0**100)
    B = _values(rng, (T, T), 1) * np.float32(2.0**60)
    await b.gemm("overflow", b.quantize(A), False, b.quantize(B, "b"), False)
    A = _values(rng, (T, T), 1) * np.float32(2.0**-70)
    B = _values(rng, (T, T), 1) * np.float32(2.0**-60)
    await b.gemm("flush", b.quantize(A), False, b.quantize(B, "b"), False)
    # invalid (NaN / Inf) blocks propagate as NaN results
    A, B = _values(rng, (2 * T, 2 * T)), _values(rng, (2 * T, 2 * T))
    A[1, T + 1] = np.nan
    B[0, 1] = np.inf
    sa, sb = b.quantize(A, nonfinite="flag"), b.quantize(B, "b", nonfinite="flag")
    await b.gemm("invalid blocks", sa, False, sb, False)


@cocotb.test()
async def hyperblock_training_gemms(dut):
    """X, W, dY each quantized (and stored) once; forward X.W^T, dX = dY.W and
    dW = dY^T.X read the same stored tiles in both orientations."""
    b = Bench(dut)
    await b.start()
    cfg, rng, T = b.cfg, b.rng, b.cfg.tile
    batch, d_in, d_out = 2 * T + 1, T + 3, T + 2
    X = b.quantize(_values(rng, (batch, d_in)), "a")
    W = b.quantize(_values(rng, (d_out, d_in)), "b")
    dY = b.quantize(_values(rng, (batch, d_out)), "a")
    # the B operand of dW is X: same tiles, B's mantissa width
    if cfg.man_bits_a != cfg.man_bits_b:
        raise AssertionError("hyperblock test needs man_bits_a == man_bits_b")
    await b.gemm("forward Y = X W^T", X, False, W, True)
    await b.gemm("dX = dY W", dY, False, W, False)
    await b.gemm("dW = dY^T X", dY, True, X, False)


@cocotb.test()
async def dual_precision_modes(dut):
    """``dual_precision`` arrays: 4-bit x 4-bit GEMMs (two products per multiplier)
    alternating with 4 x 8, 8 x 4 and 8 x 8-bit ones, edge values included. Other
    arrays: nothing to run."""
    b = Bench(dut)
    if not b.cfg.dual_precision:
        return
    await b.start()
    cfg, rng, T = b.cfg, b.rng, b.cfg.tile
    wide = (cfg.man_bits_a, cfg.man_bits_b)
    for g, (ma, mb) in enumerate([(4, 4), (4, wide[1]), (wide[0], 4), (4, 4), wide, (4, 4)]):
        M, K, N = _dims(rng, cfg)
        A, B = _values(rng, (M, K)), _values(rng, (K, N))
        A[: min(M, T), : min(K, T)] = np.float32(1.999)            # saturating block
        if g == 3:
            A *= np.float32(2.0**90)
            B *= np.float32(2.0**40)                               # overflow to Inf
        if g == 5:
            B[0, 0] = np.nan
        sa = b.quantize(A, "a", nonfinite="flag", man_bits=ma)
        sb = b.quantize(B, "b", nonfinite="flag", man_bits=mb)
        await b.gemm(f"dual {g}: {ma}-bit x {mb}-bit {M}x{K}x{N}", sa, False, sb, False)
