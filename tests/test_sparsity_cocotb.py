"""The sparse MAC engine's Verilog under cocotb (Verilator), bit-exact against the sparse
golden GEMMs in both orientations (W and Wᵀ from the same compressed tiles), with random
input gaps and output back-pressure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw import sparsity as sp
from hbfp_hw.gateware.sparse_pe import SparseEngineConfig, generate
from hbfp_hw.sim.runner import quick_cxx, run_cocotb
from hbfp_hw.sim.tb_sparse import build_vectors, save_vectors

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"


def _operands(rng, fmt, n, m, O, I, B):
    w = (rng.standard_normal((O, I)) * np.exp2(rng.integers(-8, 8, (O, I)))).astype(np.float32)
    w[:m, :m] = 1.0                                  # a tile of full-scale mantissas
    w[m:2 * m, :] *= -1
    sw = sp.compress(w, fmt, n, m)
    x = rng.standard_normal((B, I)).astype(np.float32)
    dy = rng.standard_normal((B, O)).astype(np.float32)
    x[1] = -1.0                                      # -mmax x mmax products
    x[2] *= 1e-25                                    # shifts beyond the accumulator
    dy[1] = 1.0
    dy[2, : O // 2] *= 1e-20
    x[3, :] = 0.0
    return sw, h.quantize(x, fmt), h.quantize(dy, fmt)


def run_engine(tmp_path, cfg, sw, xq, dyq, *, p_valid=1.0, p_ready=1.0, seed=1,
               corrupt=False):
    v = generate(cfg, tmp_path / "gen")
    beats, expected, jobs = build_vectors(cfg, sw, xq, dyq)
    if corrupt:
        expected[len(expected) // 2][1] += 1
    vec = tmp_path / "vectors.npz"
    save_vectors(vec, cfg, beats, expected, jobs)
    env = {"HBFP_SPARSE_VECTORS": str(vec), "HBFP_SPARSE_P_VALID": str(p_valid),
           "HBFP_SPARSE_P_READY": str(p_ready), "HBFP_SPARSE_SEED": str(seed)}
    with quick_cxx():
        run_cocotb(verilog_sources=[v], toplevel="sparse_pe", test_module="tb_sparse",
                   build_dir=tmp_path / "build", python_paths=[SIM_DIR], extra_env=env)
    return len(expected)


def test_sparse_engine_2_4_both_orientations_with_stalls(tmp_path, rng, seed):
    cfg = SparseEngineConfig(n=2, m=4, man_bits_w=8, man_bits_x=8, block_len=16, k_max=64)
    sw, xq, dyq = _operands(rng, h.HBFP8, 2, 4, 32, 48, 6)
    assert run_engine(tmp_path, cfg, sw, xq, dyq, p_valid=0.6, p_ready=0.5,
                      seed=seed % 2**31) == 16 * 8 + 16 * 12


@pytest.mark.sweep
@pytest.mark.parametrize("name", ["hbfp4_2_4", "hbfp8_4_8_b8", "no_stalls", "dense"])
def test_sparse_engine_sweep(tmp_path, rng, seed, name):
    if name == "hbfp4_2_4":
        cfg = SparseEngineConfig(n=2, m=4, man_bits_w=4, man_bits_x=4, block_len=16,
                                 k_max=128)
        sw, xq, dyq = _operands(rng, h.HBFP4, 2, 4, 40, 72, 5)
    elif name == "hbfp8_4_8_b8":
        fmt = h.HBFP8.replace(block_shape=(8, 8), name="b8")
        cfg = SparseEngineConfig(n=4, m=8, man_bits_w=8, man_bits_x=8, block_len=8,
                                 k_max=64)
        sw, xq, dyq = _operands(rng, fmt, 4, 8, 24, 40, 4)
    elif name == "dense":       # the synthesis baseline: whole tiles, forward only
        cfg = SparseEngineConfig(k_max=64, dense=True)
        sw, xq, dyq = _operands(rng, h.HBFP8, 2, 4, 16, 32, 6)
    else:
        cfg = SparseEngineConfig(k_max=64)
        sw, xq, dyq = _operands(rng, h.HBFP8, 2, 4, 16, 32, 8)
    p = (1.0, 1.0) if name == "no_stalls" else (0.7, 0.4)
    run_engine(tmp_path, cfg, sw, xq, dyq, p_valid=p[0], p_ready=p[1], seed=seed % 2**31)


@pytest.mark.sweep
def test_testbench_detects_a_wrong_value(tmp_path, rng):
    cfg = SparseEngineConfig(k_max=64)
    sw, xq, dyq = _operands(rng, h.HBFP8, 2, 4, 16, 16, 4)
    with pytest.raises((AssertionError, SystemExit)):
        run_engine(tmp_path, cfg, sw, xq, dyq, corrupt=True)


def test_vectors_match_golden_gemm(rng):
    """The testbench's expected values are the golden GEMMs' accumulators, which equal
    the dense bfp_matmul's (so a wrong vector builder cannot hide an engine bug)."""
    cfg = SparseEngineConfig(k_max=64)
    sw, xq, dyq = _operands(rng, h.HBFP8, 2, 4, 16, 32, 4)
    _, expected, jobs = build_vectors(cfg, sw, xq, dyq, order="split")
    _, acc, _ = h.bfp_matmul(xq, sw.to_bfp().T, return_acc=True)
    _, dacc, _ = h.bfp_matmul(dyq, sw.to_bfp(), return_acc=True)
    for e, (kind, b, t) in zip(expected, jobs):
        ref = acc[b, 4 * t:4 * t + 4] if kind == "W" else dacc[b, 4 * t:4 * t + 4]
        assert e == [int(v) for v in ref]
