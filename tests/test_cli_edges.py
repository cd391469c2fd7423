"""What a new user hits first: the messages and behaviour of the command line, the
configuration files it reads, the manifests it writes and the golden model's argument
checks. One test (or group) per rough edge; each asserts the message or the behaviour."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw.cli import build_parser, main
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.manifest import (check_verilog_identifier, load_config_source, verilog_ports,
                              write_manifest)

ROOT = Path(__file__).resolve().parents[1]


def _err(capsys) -> str:
    return capsys.readouterr().err


# ---- 1. --config --------------------------------------------------------------------------

@pytest.mark.parametrize("unit,text,key,accepted", [
    ("accelerator", '{"arrayrows": 4}', "'arrayrows' (did you mean 'array_rows'?)",
     "array_clock_hz, array_cols, array_lanes, array_rows, baud_rate"),
    ("mac-array", '{"row": 2}', "'row' (did you mean 'rows'?)", "cols, dual_precision"),
    ("quantizer", '{"lane": 4}', "'lane' (did you mean 'lanes'?)",
     "format, lanes, runtime_rounding, static_exponent"),
])
def test_config_unknown_keys_are_rejected(unit, text, key, accepted, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", unit, "--config", text, "-o", str(out)]) == 2
    err = _err(capsys)
    assert f"unknown key {key}" in err and f"accepted keys are {accepted}" in err
    assert not out.exists()                              # rejected before generating


def test_config_unknown_keys_in_a_file_and_in_a_format(tmp_path, capsys):
    src = tmp_path / "cfg.json"
    src.write_text(json.dumps({"formats": [{"man_bits": 4, "block": 8}]}))
    assert main(["build", "--config", str(src)]) == 2
    err = _err(capsys)
    assert f"--config {src}: formats[0]: unknown key 'block'" in err
    assert "accepted keys are block_axes, block_shape, exp_bits, man_bits" in err
    # the derived keys to_dict writes are not unknown: manifests and INFO still load
    cfg = AcceleratorConfig(formats=(h.HBFP4, h.MXINT8), array_rows=4, array_cols=4)
    assert AcceleratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    mc = MacArrayConfig(dual_precision=True)
    assert MacArrayConfig.from_dict(mc.to_dict()) == mc


def test_config_manifest_of_another_kind_names_both(tmp_path, capsys):
    qman = write_manifest(tmp_path / "q.json", kind="quantizer", top="quantizer",
                          config=QuantizerConfig(format=h.MXINT8).to_dict(), ports={})
    for unit, want in (("accelerator", "'accelerator'"), ("mac-array", "'mac_array'")):
        assert main(["generate", unit, "--config", str(qman), "-o", str(tmp_path / "o")]) == 2
        err = _err(capsys)
        assert f"is a manifest of kind 'quantizer'; this command takes a manifest of kind {want}" \
            in err, err
    mman = write_manifest(tmp_path / "m.json", kind="mac_array", top="mac_array",
                          config=MacArrayConfig().to_dict(), ports={})
    assert main(["generate", "quantizer", "--config", str(mman), "-o", str(tmp_path)]) == 2
    assert "manifest of kind 'mac_array'; this command takes a manifest of kind 'quantizer'" \
        in _err(capsys)
    # a manifest of the right kind (or a board's, same config) is accepted as a config
    aman = write_manifest(tmp_path / "a.json", kind="board", top="x",
                          config=AcceleratorConfig().to_dict(), ports={})
    assert load_config_source(str(aman), ("accelerator", "board")) == \
        json.loads(aman.read_text())["config"]


def test_config_missing_file_says_no_such_file(tmp_path, capsys):
    missing = tmp_path / "nope" / "cfg.json"
    for argv in (["generate", "accelerator", "--config", str(missing), "-o", str(tmp_path)],
                 ["generate", "quantizer", "--config", str(missing), "-o", str(tmp_path)],
                 ["build", "--config", str(missing)]):
        assert main(argv) == 2
        err = _err(capsys)
        assert f"--config {missing}: no such file: '{missing}'" in err, err
        assert "Expecting value" not in err
    assert main(["generate", "accelerator", "--config", "{bad", "-o", str(tmp_path)]) == 2
    assert "--config: the text is not valid JSON" in _err(capsys)


def test_config_bad_format_name_lists_the_presets(tmp_path, capsys):
    assert main(["generate", "accelerator", "--config", '{"formats": ["hbfp9"]}',
                 "-o", str(tmp_path)]) == 2
    err = _err(capsys)
    assert "formats[0]: unknown format 'hbfp9'; accepted names are cbfp8, hbfp4, hbfp8, " \
           "mxint8" in err
    assert "Traceback" not in err
    with pytest.raises(ValueError, match=r"formats\[1\]: 7 is neither a preset name"):
        AcceleratorConfig.from_dict({"formats": ["hbfp8", 7]})
    # preset names are accepted entries
    cfg = AcceleratorConfig.from_dict({"formats": ["hbfp4", "MXINT8"]})
    assert cfg.formats == (h.HBFP4, h.MXINT8)
    assert QuantizerConfig.from_dict({"format": "cbfp8", "lanes": 4}).format.man_bits == 8


# ---- 2. --name --------------------------------------------------------------------------

@pytest.mark.parametrize("unit", ["quantizer", "mac-array", "accelerator"])
@pytest.mark.parametrize("name,rule", [
    ("my quant", "is not a valid Verilog identifier: it must start with a letter or '_'"),
    ("9lives", "is not a valid Verilog identifier"),
    ("q-1", "is not a valid Verilog identifier"),
    ("module", "is a Verilog keyword"),
])
def test_generate_name_must_be_a_verilog_identifier(unit, name, rule, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", unit, "--name", name, "-o", str(out)]) == 2
    err = _err(capsys)
    assert f"--name={name!r} {rule}" in err, err
    assert not out.exists()


def test_generate_functions_check_the_name(tmp_path):
    from hbfp_hw.gateware import mac_array, quantizer
    with pytest.raises(ValueError, match=r"name='my quant' is not a valid Verilog identifier"):
        quantizer.generate(QuantizerConfig(format=h.MXINT8), tmp_path, name="my quant")
    with pytest.raises(ValueError, match=r"name='a.b' is not a valid Verilog identifier.*"
                                         r"e\.g\. 'a_b'"):
        mac_array.generate(MacArrayConfig(), tmp_path, name="a.b")
    assert check_verilog_identifier("_q8") == "_q8"
    assert not list(tmp_path.iterdir())


# ---- 3. derived format names ------------------------------------------------------------

def test_replace_that_changes_numerics_derives_the_name():
    f = h.HBFP8.replace(block_shape=(1, 16))
    assert f.name == "HBFP8[1x16]" and f.describe().startswith("HBFP8[1x16]: ")
    assert h.HBFP8.replace(man_bits=4, exp_bits=6).name == "HBFP8[man_bits=4, exp_bits=6]"
    assert h.MXINT8.replace(block_shape=(16,)).name == "MXINT8[16]"
    # named against the preset: chained replaces do not pile up, going back restores it
    assert f.replace(man_bits=6).name == "HBFP8[1x16, man_bits=6]"
    assert f.replace(block_shape=(16, 16)).name == "HBFP8"
    # name= wins; rounding, SR settings and orientation keep the name
    assert h.HBFP8.replace(block_shape=(8, 8), name="HBFP8T8").name == "HBFP8T8"
    assert h.HBFP8.replace(rounding="stochastic", seed=3, sr_lanes=4).name == "HBFP8"
    assert h.HBFP8.transposed().name == "HBFP8" and h.MXINT8.transposed().name == "MXINT8"
    # other names get the change appended; unnamed formats stay unnamed
    assert h.BFPFormat(name="mine").replace(man_bits=4).name == "mine[man_bits=4]"
    assert h.BFPFormat().replace(man_bits=4).name == ""


def test_derived_name_reaches_errors_and_manifests(tmp_path):
    q = h.quantize(np.ones((16, 16), np.float32), h.HBFP8.replace(block_shape=(4, 16)))
    assert "fmt=HBFP8[4x16]" in repr(q)
    with pytest.raises(ValueError, match=r"format HBFP8\[1x16\] does not exist"):
        h.quantize(np.ones(4, np.float32), h.HBFP8.replace(block_shape=(1, 16),
                                                           block_axes=(-3, -1)))


# ---- 4. demo --------------------------------------------------------------------------

def test_demo_full_selects_the_full_training_stage(monkeypatch):
    from hbfp_hw import cli, demo
    assert build_parser().parse_args(["demo", "--full"]).quick is False
    assert build_parser().parse_args(["demo"]).quick is True
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    demo.training_stage(Namespace(quick=False, output=None))
    assert calls and calls[0][:3] == ["train", "--seeds", str(demo.FULL_TRAIN_SEEDS)]


def test_demo_quick_training_prints_indications_not_missed(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch")
    from hbfp_hw import demo
    from hbfp_hw.host import train

    seen = {}

    def fake_grid(models, formats, seeds, cfg, progress=True):
        seen.update(models=models, formats=formats, seeds=seeds, epochs=cfg.epochs)
        acc = {"fp32": 97.0, "hbfp8": 95.0, "hb4": 93.0, "int8-hs": 96.0}
        return [train.RunResult(m, f, 0, test_acc=[acc[f]]) for m in models for f in formats]

    monkeypatch.setattr(train, "run_grid", fake_grid)
    monkeypatch.setattr(train, "plot_curves", lambda results, path: None)
    demo.training_stage(Namespace(quick=True, output=str(tmp_path)))
    out = capsys.readouterr().out
    assert seen == dict(models=("mlp",), formats=("fp32", "hbfp8", "hb4", "int8-hs"),
                        seeds=1, epochs=4)
    assert "MISSED" not in out and "met" not in out
    assert "| mlp | hbfp8 | 95.00 | 1 | -2.00 vs fp32 | within 0.5 pt of fp32 |" in out
    assert "target (for 5-seed means)" in out
    assert "1-seed, 4-epoch numbers are indications only" in out
    assert "hbfp-hw demo --full" in out


def test_demo_accelerator_stage_generates_what_it_simulates_in_a_removed_dir(
        monkeypatch, tmp_path, capsys):
    from hbfp_hw import demo
    from hbfp_hw.gateware import top
    from hbfp_hw.gateware.sim_device import SIM_CONFIG

    made = []

    def fake_generate(cfg, outdir, **kw):
        outdir = Path(outdir)
        v, m = outdir / f"{cfg.name}_accel.v", outdir / f"{cfg.name}_accel.json"
        v.write_text("module x; endmodule\n")
        m.write_text("{}")
        made.append((cfg, outdir))
        return v, m

    simulated = []
    monkeypatch.setattr(top, "generate", fake_generate)
    monkeypatch.setattr(demo, "_simulate", simulated.append)
    demo.accelerator_stage(Namespace(output=None, quick=True))
    (cfg, out), = made
    assert cfg is SIM_CONFIG and simulated == [SIM_CONFIG]
    assert not out.exists()                              # the temporary directory is gone
    assert "removed at the end" in capsys.readouterr().out
    keep = tmp_path / "keep"
    demo.accelerator_stage(Namespace(output=str(keep), quick=True))
    assert (keep / "hbfp_sim_accel.v").exists() and made[-1][1] == keep


# ---- 5-7. golden-model argument checks ------------------------------------------------------

def test_bfp_matmul_of_arrays_says_quantize_first():
    a = np.ones((16, 16), np.float32)
    q = h.quantize(a, h.HBFP8)
    with pytest.raises(TypeError, match=r"bfp_matmul: argument 'a' is a numpy\.ndarray, not a "
                                        r"BFPTensor; quantize it first: .*quantize\(a, fmt\)"):
        h.bfp_matmul(a, a)
    with pytest.raises(TypeError, match=r"bfp_matmul: argument 'b' is a list"):
        h.bfp_matmul(q, a.tolist())
    with pytest.raises(TypeError, match=r"matmul_error_bound: argument 'a'"):
        h.matmul_error_bound(a, q)
    with pytest.raises(TypeError, match=r"matmul_reference: argument 'b'"):
        h.matmul_reference(q, a)


def test_quantize_reports_float64_above_flt_max_as_out_of_fp32_range():
    x = np.zeros((2, 40))
    x[1, 35] = -1e39
    with pytest.raises(h.NonFiniteBlockError) as e:
        h.quantize(x, h.MXINT8, name="x")
    msg = str(e.value)
    assert "tensor 'x' holds -1e+39 at index (1, 35), outside the FP32 range " \
           "(|x| <= 3.4028235e+38): it overflows to Inf when cast to float32" in msg
    assert "NaN or Inf" not in msg and e.value.block_index == (1, 1)
    # real NaN / Inf keep their message; nonfinite='flag' flags the overflowing block
    with pytest.raises(h.NonFiniteBlockError, match="holds NaN or Inf in block"):
        h.quantize(np.array([1.0, np.inf]), h.MXINT8)
    assert h.quantize(x, h.MXINT8, nonfinite="flag").invalid.tolist() == [[False, False],
                                                                         [False, True]]


def test_static_exponent_not_an_integer():
    x = np.ones(32, np.float32)
    with pytest.raises(ValueError) as e:
        h.quantize(x, h.MXINT8, exponent=2.5)
    assert str(e.value).startswith("exponent=2.5 is not an integer (got float)")
    assert "out of range" not in str(e.value)
    with pytest.raises(ValueError, match=r"exponent=200 is out of range; accepted range is "
                                         r"\[-127, 127\]"):
        h.quantize(x, h.MXINT8, exponent=200)
    assert h.quantize(x, h.MXINT8, exponent=np.int16(2)).exponents.tolist() == [2]


# ---- 8. --version, python -m hbfp_hw -------------------------------------------------------

def test_version_and_python_m(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hbfp-hw {h.__version__}"
    r = subprocess.run([sys.executable, "-m", "hbfp_hw", "--version"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == f"hbfp-hw {h.__version__}"
    r = subprocess.run([sys.executable, "-m", "hbfp_hw", "generate", "mac-array",
                        "--tile", "7", "-o", "unused"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("hbfp-hw: error: --tile 7")
    from importlib.metadata import entry_points
    ep, = [e for e in entry_points(group="console_scripts") if e.name == "hbfp-hw"]
    assert ep.value == "hbfp_hw.cli:main"


# ---- 9. make bench ------------------------------------------------------------------------

def test_make_bench_runs_the_quick_benchmarks():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "-C", str(ROOT), "bench"], capture_output=True,
                       text=True, check=True)
    cmds = [ln for ln in r.stdout.splitlines() if "benchmarks/" in ln]
    scripts = [re.search(r"benchmarks/(\S+\.py)", c).group(1) for c in cmds]
    assert scripts == ["bench_quantize.py", "bench_link.py", "bench_accelerator_modes.py",
                       "bench_train.py"]
    assert "--url emulate://" in cmds[1]                # no sim:// sizes: quick
    for s in scripts:
        assert (ROOT / "benchmarks" / s).is_file()
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert "make bench" in doc and all(s in doc for s in scripts)


# ---- 10. generate mac-array --help, --tile ----------------------------------------------------

def test_mac_array_help_has_texts_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "mac-array", "--help"])
    out = capsys.readouterr().out
    options = {}                                         # option -> its help, one line
    for block in re.split(r"\n(?=  -)", out.split("options:", 1)[1].strip("\n")):
        flags = block.split()[0].rstrip(",")
        options[flags if flags != "-o" else "--output"] = " ".join(block.split())
    for opt, default in (("--rows", 4), ("--cols", 4), ("--lanes", 4), ("--tile", 8),
                         ("--man-bits-a", 8), ("--exp-bits", 8), ("--k-max", 1024),
                         ("--guard-bits", 8), ("--mapping", "dsp"),
                         ("--dual-precision", False), ("--name", "mac_array")):
        m = re.fullmatch(re.escape(opt) + r"(?: \S+)? (.+) \(default: ([^)]+)\)", options[opt])
        assert m and len(m.group(1)) > 10, options[opt]   # a help text, then the default
        assert m.group(2) == str(default), (opt, m.group(2))
    for opt in ("--config", "--man-bits-b", "--primitives", "--output"):
        assert len(options[opt]) > 30, opt
    assert "default: None" not in out
    assert "default: --man-bits-a" in options["--man-bits-b"].replace("- ", "-")


def test_mac_array_tile_error_names_the_tile(tmp_path, capsys):
    assert main(["generate", "mac-array", "--tile", "7", "-o", str(tmp_path)]) == 2
    err = _err(capsys)
    assert err.startswith("hbfp-hw: error: --tile 7 is not a multiple of --rows 4, --cols 4, "
                          "--lanes 4")
    assert "accepted --tile values with these are [4, 8, 12" in err and "rows=4" not in err
    # a dimension given on the command line is still the one blamed
    assert main(["generate", "mac-array", "--rows", "3", "--tile", "8",
                 "-o", str(tmp_path)]) == 2
    assert "rows=3 must divide tile=8" in _err(capsys)
    # --tile against a --config base: the config's values are named
    assert main(["generate", "mac-array", "--config", '{"rows": 2, "cols": 2, "lanes": 2}',
                 "--tile", "5", "-o", str(tmp_path)]) == 2
    assert "--tile 5 is not a multiple of --rows 2, --cols 2, --lanes 2" in _err(capsys)


# ---- 11-12. manifests -------------------------------------------------------------------------

def _module_ports(vfile: Path, top: str) -> list[str]:
    head = re.search(r"^module " + re.escape(top) + r"\((.*?)\);", vfile.read_text(), re.M | re.S)
    return sorted(p.strip() for p in head.group(1).split(","))


def test_quantizer_manifest_records_the_built_sr_lanes(tmp_path, capsys):
    assert QuantizerConfig(format=h.HBFP8, lanes=8).format.sr_lanes == 8
    assert main(["generate", "quantizer", "--format", "hbfp8", "--block", "32", "--lanes", "8",
                 "--rounding", "stochastic", "-o", str(tmp_path)]) == 0
    man = json.loads((tmp_path / "quantizer.json").read_text())
    fmt = man["config"]["format"]
    assert fmt["sr_lanes"] == 8 and man["config"]["lanes"] == 8
    assert fmt["name"] == "HBFP8[32]"                    # item 3: the block changed
    cfg = QuantizerConfig.from_dict(man["config"])
    assert cfg.golden_format().sr_lanes == cfg.format.sr_lanes == 8


def test_every_unit_manifest_has_the_same_schema(tmp_path, capsys):
    from hbfp_hw.gateware.sim_device import SIM_CONFIG
    small = json.dumps({"rows": 2, "cols": 2, "lanes": 2, "tile": 4, "man_bits_a": 4,
                        "man_bits_b": 4, "k_max": 32})
    runs = {
        "quantizer": ["generate", "quantizer", "--format", "mxint8", "--lanes", "4"],
        "mac_array": ["generate", "mac-array", "--config", small, "--guard-bits", "4"],
        "hbfp_sim_accel": ["generate", "accelerator", "--sim"],
    }
    latency = {}
    for top, argv in runs.items():
        out = tmp_path / top
        assert main([*argv, "-o", str(out)]) == 0
        man = json.loads((out / f"{top}.json").read_text())
        assert {"manifest_version", "generator", "kind", "top", "verilog", "latency_cycles",
                "config", "ports"} <= set(man), top
        vfile = out / man["verilog"]
        assert man["top"] == top and vfile.is_file()
        sig = man["ports"]["signals"]
        assert sorted(sig) == _module_ports(vfile, top), top
        assert sig == verilog_ports(vfile, top)
        assert all(s["dir"] in ("in", "out") and s["width"] >= 1 for s in sig.values())
        latency[man["kind"]] = man["latency_cycles"]
    assert isinstance(latency["quantizer"], int) and latency["quantizer"] > 0
    assert latency["mac_array"] is None and latency["accelerator"] is None
    # --config as the base, the given option on top of it
    mc = MacArrayConfig.from_dict(json.loads(
        (tmp_path / "mac_array" / "mac_array.json").read_text())["config"])
    assert (mc.rows, mc.tile, mc.man_bits_b, mc.k_max, mc.guard_bits) == (2, 4, 4, 32, 4)
    # existing unit-specific keys stay where their readers look for them
    acc = json.loads((tmp_path / "hbfp_sim_accel" / "hbfp_sim_accel.json").read_text())
    assert acc["ports"]["i"] == {"dir": "in", "stream": 8} and "device_hash" in acc
    assert AcceleratorConfig.from_dict(acc["config"]) == SIM_CONFIG
    # a manifest without Verilog (a board's) takes its signals from the port entries
    b = write_manifest(tmp_path / "board.json", kind="board", top="b", config={},
                       ports={"rx": {"dir": "in", "width": 1, "pins": ["M1"]}})
    bm = json.loads(b.read_text())
    assert bm["verilog"] is None and bm["ports"]["signals"] == {"rx": {"dir": "in", "width": 1}}


# -- train: early checks, Ctrl-C, plot -----------------------------------------------

@pytest.mark.parametrize("argv,msg", [
    (["--backend", "gpu"], "--backend='gpu'; accepted values are 'emulate' or a device URL"),
    (["--threads", "0"], "--threads=0; accepted range is >= 1"),
    (["--plot", "/no/such/dir/c.png"], "--plot='/no/such/dir/c.png': the folder /no/such/dir "
                                       "does not exist"),
    (["--plot", "curves.txt"], "accepted file types are .png, .pdf, .svg"),
])
def test_train_rejects_bad_options_before_training(argv, msg, monkeypatch, capsys):
    pytest.importorskip("torch")
    from hbfp_hw.host import train

    def boom(*a, **k):
        raise AssertionError("trained before checking the options")
    monkeypatch.setattr(train, "run_grid", boom)
    assert main(["train", "--quick", *argv]) == 2
    assert msg in _err(capsys)


def test_train_ctrl_c_keeps_the_finished_runs(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch")
    from hbfp_hw.host import train
    calls = []

    def fake_train_one(m, f, s, cfg, data=None, progress=True):
        calls.append((m, f, s))
        if len(calls) == 3:
            raise KeyboardInterrupt
        r = train.RunResult(m, f, s)
        r.train_loss, r.test_acc = [1.0, 0.5], [80.0, 90.0 + len(calls)]
        return r
    monkeypatch.setattr(train, "train_one", fake_train_one)
    monkeypatch.setattr(train, "_warm_up_kernels", lambda: None)   # (not what is tested)
    plot = tmp_path / "c.png"
    rc = main(["train", "--model", "mlp", "--formats", "fp32,hb4", "--seeds", "2",
               "--no-progress", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 130
    assert "interrupted (Ctrl-C) after 2 of 4 runs" in out
    assert "| mlp | fp32 | 91.50 | 91.00 | 92.00 | 2 |" in out
    assert "hb4" not in out.split("runs;")[1]
    assert plot.stat().st_size > 1000


def test_ctrl_c_in_any_command_exits_130_without_traceback(monkeypatch, capsys):
    from hbfp_hw import cli

    def interrupted(args):
        raise KeyboardInterrupt
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--quick"])
    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(args, interrupted))
    assert cli.main(["train"]) == 130
    assert "hbfp-hw: interrupted" in _err(capsys)


class _FixedParser:
    def __init__(self, args, func):
        args.func = func
        self.args = args

    def parse_args(self, argv):
        return self.args


def test_plot_colours_distinct_legend_outside(tmp_path):
    pytest.importorskip("matplotlib")
    from hbfp_hw.host import train
    results = []
    names = [f"f{i}" for i in range(13)]
    for f in names:
        for s in range(2):
            r = train.RunResult("mlp", f, s)
            r.test_acc = [30.0 + s, 95.0]
            results.append(r)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    saved = {}
    orig = plt.Figure.savefig

    def spy(fig, path, **kw):
        saved["fig"] = fig
        return orig(fig, path, **kw)
    plt.Figure.savefig = spy
    try:
        train.plot_curves(results, str(tmp_path / "p.png"))
    finally:
        plt.Figure.savefig = orig
    fig = saved["fig"]
    ax = fig.axes[0]
    styles = {(tuple(ln.get_color()) if not isinstance(ln.get_color(), str) else ln.get_color(),
               ln.get_linestyle()) for ln in ax.get_lines()}
    assert len(styles) == 13                              # one look per format
    assert ax.get_ylim()[0] <= 30.0                       # the first epoch is in range
    assert "2 seeds" in fig.legends[0].get_texts()[0].get_text()
    assert "seeds 0..1" in ax.get_title()
    # the legend sits right of the axes
    fig.canvas.draw()
    leg = fig.legends[0].get_window_extent()
    assert leg.x0 >= ax.get_window_extent().x1


@pytest.mark.parametrize("call", ["matmul", "train_step", "quantize"])
def test_device_calls_check_nonfinite_first(call):
    from hbfp_hw import host
    a = np.ones((16, 16), np.float32)
    with host.open("emulate://") as dev:
        fn = getattr(dev, call)
        args = {"matmul": (a, a), "train_step": (a, a, a), "quantize": (a,)}[call]
        with pytest.raises(ValueError, match="nonfinite='bogus'; accepted values are "
                                             "'raise', 'flag'"):
            fn(*args, nonfinite="bogus")


@pytest.mark.parametrize("v", [4, -1, True, "16"])
def test_bitlayer_lanes_validated(v):
    with pytest.raises(ValueError, match=r"bitlayer_lanes=.*accepted values are 0, 8, 16, 32"):
        AcceleratorConfig(bitlayer_lanes=v)
    assert AcceleratorConfig.from_dict({"bitlayer_lanes": 0}).bitlayer_lanes == 0
