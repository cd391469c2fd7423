"""The LUQ gateware (streaming quantizer, shift-add PE) under cocotb/Verilator, bit-exact
against the golden model with random stalls; an Amaranth-level check of the widths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import wiring

from hbfp_hw.gateware.luq_quantizer import LuqQuantizer
from hbfp_hw.gateware.luq_quantizer import generate as gen_quantizer
from hbfp_hw.gateware.luq_shift_pe import LuqShiftPE
from hbfp_hw.gateware.luq_shift_pe import generate as gen_pe
from hbfp_hw.luq import LUQ4, luq_accumulator_bits
from hbfp_hw.manifest import write_manifest
from hbfp_hw.sim.runner import quick_cxx, run_cocotb

SIM_DIR = Path(__file__).resolve().parents[1] / "sim"


def _run(vpath, mpath, top, testcase, tmp_path, seed, n=None, env=None):
    env = dict(env or {}, HBFP_LUQ_SEED=str(seed))
    if mpath is not None:
        env["HBFP_MANIFEST"] = str(mpath)
    if n is not None:
        env["HBFP_LUQ_N"] = str(n)
    with quick_cxx():
        run_cocotb(verilog_sources=[vpath], toplevel=top, test_module="tb_luq",
                   build_dir=tmp_path / "build", python_paths=[SIM_DIR], extra_env=env,
                   testcase=testcase)


class BothUnits(wiring.Component):
    """Both units side by side in one top (one Verilator build for the default run):
    the quantizer's streams are ``q_i``/``q_o``, the PE's ``pe_i``/``pe_o``."""

    def __init__(self, q: LuqQuantizer, pe: LuqShiftPE):
        self.q, self.pe = q, pe
        qs, ps = q.signature.members, pe.signature.members
        super().__init__({"q_i": qs["i"], "q_o": qs["o"], "alpha": qs["alpha"],
                          "seed": qs["seed"], "reseed": qs["reseed"], "amax": qs["amax"],
                          "invalid": qs["invalid"], "pe_i": ps["i"], "pe_o": ps["o"]})

    def elaborate(self, platform):
        m = Module()
        m.submodules.q, m.submodules.pe = self.q, self.pe
        wiring.connect(m, wiring.flipped(self.q_i), self.q.i)
        wiring.connect(m, self.q.o, wiring.flipped(self.q_o))
        wiring.connect(m, wiring.flipped(self.pe_i), self.pe.i)
        wiring.connect(m, self.pe.o, wiring.flipped(self.pe_o))
        m.d.comb += [self.q.alpha.eq(self.alpha), self.q.seed.eq(self.seed),
                     self.q.reseed.eq(self.reseed), self.amax.eq(self.q.amax),
                     self.invalid.eq(self.q.invalid)]
        return m


def test_luq_units_cocotb(tmp_path, seed):
    """Default run: the 4-lane quantizer (16 random bits, 8000 random elements) and the
    4-bit, SMP 2 shift PE (2 lanes, 2 columns, K blocks of 8), one build."""
    qf = LUQ4.replace(lanes=4, seed=7)
    pe = LuqShiftPE(LUQ4.replace(samples=2), man_bits=4, lanes=2, cols=2, tile=8, k_max=32)
    _, mq = gen_quantizer(qf, tmp_path / "q")
    _, mpe = gen_pe(pe, tmp_path / "pe")
    top = BothUnits(LuqQuantizer(qf), pe)
    v = tmp_path / "luq_units.v"
    v.write_text(verilog.convert(top, name="luq_units", emit_src=False))
    write_manifest(tmp_path / "luq_units.json", kind="luq_units", top="luq_units",
                   config={}, ports={}, verilog=v)
    _run(v, None, "luq_units", None, tmp_path, seed,
         env={"HBFP_MANIFEST_Q": str(mq), "HBFP_MANIFEST_PE": str(mpe),
              "HBFP_LUQ_Q_PREFIX": "q_", "HBFP_LUQ_PE_PREFIX": "pe_",
              "HBFP_LUQ_N": os.environ.get("HBFP_LUQ_N", "8000")})


# more configurations, one unit per top, and the check that the testbench fails on a
# wrong unit: under -m sweep (each Verilator build takes 20-50 s)
QUANTIZERS = {
    "l4_r16": LUQ4.replace(lanes=4, seed=7),
    "l1_r5": LUQ4.replace(lanes=1, sr_bits=5, seed=123),
}


@pytest.mark.sweep
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_luq_quantizer_cocotb(name, tmp_path, seed):
    v, mpath = gen_quantizer(QUANTIZERS[name], tmp_path / "gen")
    _run(v, mpath, "luq_quantizer", "test_luq_quantizer", tmp_path, seed,
         int(os.environ.get("HBFP_LUQ_N", "8000")))


PES = {
    "hbfp8_l4_c4": dict(fmt=LUQ4, man_bits=8, lanes=4, cols=4, tile=16, k_max=64),
    "hbfp4_smp2_l2_c2": dict(fmt=LUQ4.replace(samples=2), man_bits=4, lanes=2, cols=2,
                             tile=8, k_max=32),
}


@pytest.mark.sweep
@pytest.mark.parametrize("name", list(PES))
def test_luq_shift_pe_cocotb(name, tmp_path, seed):
    kw = dict(PES[name])
    pe = LuqShiftPE(kw.pop("fmt"), **kw)
    v, mpath = gen_pe(pe, tmp_path / "gen")
    _run(v, mpath, "luq_shift_pe", "test_luq_shift_pe", tmp_path, seed)


@pytest.mark.sweep
def test_testbench_detects_wrong_dut(tmp_path):
    """The quantizer check fails on a unit that draws 2 random bits instead of 16 (its
    rounding probabilities are quantized to quarters)."""
    v, _ = gen_quantizer(LUQ4.replace(lanes=2, sr_bits=2), tmp_path / "wrong")
    _, mpath = gen_quantizer(LUQ4.replace(lanes=2), tmp_path / "gen")
    with pytest.raises((AssertionError, SystemExit)):
        _run(v, mpath, "luq_quantizer", "test_luq_quantizer", tmp_path, 1, 200)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_widths_and_errors():
    pe = LuqShiftPE(LUQ4, man_bits=8, lanes=4, cols=1, tile=16, k_max=1024)
    assert pe.acc_bits == luq_accumulator_bits(LUQ4, 8, 16, 1024)
    assert pe.term_bits == 8 + 6 + 1
    with pytest.raises(ValueError, match="tile=10 is not a multiple of lanes=4"):
        LuqShiftPE(LUQ4, lanes=4, tile=10)
    with pytest.raises(ValueError, match=r"man_bits=1 is out of range; accepted range is "
                                         r"\[2, 16\]"):
        LuqShiftPE(LUQ4, man_bits=1)
    with pytest.raises(TypeError, match="fmt must be a LUQFormat"):
        LuqQuantizer("luq4")
