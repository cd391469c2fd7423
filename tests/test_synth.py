"""Smoke tests of the out-of-context synthesis helper (``-m synth``: runs yosys/nextpnr)."""

from __future__ import annotations

import pytest

from hbfp_hw.gateware.synth import (ECP5_ABC_LUT_MAP, SynthError, ecp5_synth_script,
                                    synth_ecp5, synth_ice40, write_shift_harness)

# A registered 8x8 multiplier with 48 input and 16 output bits: known, small cell counts.
MUL_V = """
module mul8(input clk, input rst, input [7:0] a, input [7:0] b, input [31:0] unused,
            output reg [15:0] y);
  reg [7:0] ra, rb;
  always @(posedge clk) begin ra <= a; rb <= b; y <= ra * rb; end
endmodule
"""


def test_shift_harness_text(tmp_path):
    ffs, luts = write_shift_harness(tmp_path / "h.v", "mul8",
                                    [("clk", "input", 1), ("rst", "input", 1),
                                     ("a", "input", 8), ("b", "input", 8),
                                     ("y", "output", 16)])
    assert (ffs, luts) == (16 + 16, 16)
    text = (tmp_path / "h.v").read_text()
    assert ".a(in_sr[7:0])" in text and ".b(in_sr[15:8])" in text
    assert ".y(out_w[15:0])" in text and ".clk(clk)" in text and ".rst(rst)" in text


def test_bad_arguments(tmp_path):
    v = tmp_path / "m.v"
    v.write_text(MUL_V)
    with pytest.raises(ValueError, match="device='99k'"):
        synth_ecp5(v, "mul8", workdir=tmp_path / "w", device="99k")
    with pytest.raises(ValueError, match="harness='ooc'.*'shift'"):
        synth_ice40(v, "mul8", workdir=tmp_path / "w", harness="ooc")
    with pytest.raises(FileNotFoundError, match="nope.v"):
        synth_ecp5(tmp_path / "nope.v", "mul8", workdir=tmp_path / "w")


def test_ecp5_script_mappers():
    classic = ecp5_synth_script("t", "n.json")
    assert classic == (f"synth_ecp5 -top t -run :map_luts; {ECP5_ABC_LUT_MAP}; "
                       f"synth_ecp5 -top t -run map_cells: -json n.json")
    assert "abc -lut 4:7" in ECP5_ABC_LUT_MAP
    assert ecp5_synth_script("t", "n.json", abc9=True) == "synth_ecp5 -top t -json n.json"


@pytest.mark.synth
def test_ecp5_abc9_mapper(tmp_path):
    v = tmp_path / "m.v"
    v.write_text(MUL_V)
    r = synth_ecp5(v, "mul8", workdir=tmp_path / "abc9", freq_mhz=100, abc9=True)
    assert r.ffs == 32 and r.dsps == 1


@pytest.mark.synth
def test_ecp5_ooc_and_shift(tmp_path):
    v = tmp_path / "m.v"
    v.write_text(MUL_V)
    r = synth_ecp5(v, "mul8", workdir=tmp_path / "ooc", freq_mhz=100)
    assert r.ffs == 32 and r.dsps == 1 and r.fmax_mhz > 50
    assert r.mapper == "abc9"          # the default tries ABC9 first
    rc = synth_ecp5(v, "mul8", workdir=tmp_path / "classic", freq_mhz=100, abc9=False)
    assert rc.mapper == "abc" and rc.dsps == 1
    assert r.harness == "ooc" and r.harness_ffs == 0
    r2 = synth_ecp5(v, "mul8", workdir=tmp_path / "shift", freq_mhz=100, harness="shift")
    assert r2.ffs > r.ffs and r2.harness_ffs == 48 + 16
    with pytest.raises(SynthError, match="yosys.log"):
        (tmp_path / "bad.v").write_text("module bad(input clk; endmodule\n")
        synth_ecp5(tmp_path / "bad.v", "bad", workdir=tmp_path / "bad")


@pytest.mark.synth
def test_ice40_shift(tmp_path):
    v = tmp_path / "m.v"
    v.write_text(MUL_V)
    r = synth_ice40(v, "mul8", workdir=tmp_path / "ice", freq_mhz=24)
    assert r.utilization["SB_IO"]["used"] == 4       # clk, rst, sin, sout
    assert r.dsps == 1 and r.fmax_mhz > 24
