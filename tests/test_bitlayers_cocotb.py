"""The bit-serial GEMM unit: Amaranth simulation and its own Verilog under cocotb
(Verilator), bit-exact against hbfp_hw.bitlayers.matmul."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hbfp_hw import bitlayers as bl
from hbfp_hw.gateware.bitserial import (BitSerialConfig, command_cycles, generate,
                                        pack_planes)
from hbfp_hw.sim.bitserial_bench import Command, run_commands
from hbfp_hw.sim.runner import available_simulators, quick_cxx, run_cocotb

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"

#: Small build for the regression: 8 lanes, K up to 32, 8 planes, 16-bit activations.
SMALL = BitSerialConfig(lanes=8, act_bits=16, bits_max=8, w_depth=1024, chunks_max=4,
                        rows_bits=8, batch_bits=4)


@pytest.mark.parametrize("tree_pipe", [False, True])
def test_amaranth_sim_bit_exact_and_cycles(tree_pipe):
    cfg = SMALL.replace(act_bits=8, tree_pipe=tree_pipe)
    rng = np.random.default_rng(7)
    w = rng.integers(-128, 128, size=(6, 19))
    w[0, :] = -128
    w[1, :] = -1
    x = rng.integers(-128, 128, size=(3, 19))
    x[0, :] = -128
    planes = bl.decompose(w, 8)
    base = 37
    words = {base + i: v for i, v in enumerate(pack_planes(planes, 3, cfg.lanes))}
    cmds = [Command(base, 6, 3, 8, layers, x) for layers in (8, 1, 5)]
    run_commands(cfg, words, cmds)            # no gaps: exact cycle counts
    for c in cmds:
        assert c.results == bl.matmul(x, planes, c.layers).reshape(-1).tolist()
        assert c.cycles == command_cycles(cfg, rows=6, chunks=3, layers=c.layers, batch=3)
    stalled = [Command(base, 6, 3, 8, layers, x) for layers in (8, 2)]
    run_commands(cfg, words, stalled, seed=3, p_valid=0.4, p_ready=0.3)
    for c in stalled:
        assert c.results == bl.matmul(x, planes, c.layers).reshape(-1).tolist()


def test_bad_config():
    with pytest.raises(ValueError, match=r"lanes=12; accepted values are powers of two"):
        BitSerialConfig(lanes=12)
    with pytest.raises(ValueError, match=r"bits_max=17; accepted range is integers in \[1, 16\]"):
        BitSerialConfig(bits_max=17)


@pytest.mark.skipif("verilator" not in available_simulators(), reason="no Verilator")
def test_bitserial_cocotb(tmp_path):
    v, j = generate(SMALL, tmp_path / "gen")
    with quick_cxx():
        run_cocotb(verilog_sources=[v], toplevel="bitserial", test_module="tb_bitserial",
                   build_dir=tmp_path / "build", python_paths=[SIM_DIR],
                   extra_env={"HBFP_MANIFEST": str(j), "HBFP_BS_SEED": "1",
                              "HBFP_BS_CMDS": "60"})
