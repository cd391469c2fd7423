"""``hbfp-hw sim UNIT``: the cocotb regression of a unit on freshly generated Verilog.

Generates the unit's Verilog and manifest from its configuration (the unit's default,
or ``--config``) into ``-o DIR``, builds it in Verilator (or Icarus) and runs the unit's
cocotb testbench against the golden model, with random stalls on its streams:

============ ================================ =====================================
unit         testbench                        ``--count``
============ ================================ =====================================
quantizer    ``tb_quantizer``                 blocks streamed (default 200)
mac-array    ``tb_mac_array``                 GEMMs (default 3)
accelerator  ``tb_accelerator`` (frames)      rounds of requests (default 4)
============ ================================ =====================================

``--waves`` records every signal: Verilator writes ``DIR/build/dump.vcd``, Icarus
``DIR/build/<top>.fst``; the path is printed at the end. The accelerator's default
configuration is the small ``sim://`` build (2x2 array).
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["UNITS", "run_unit", "register_cli"]

SIM_DIR = Path(__file__).resolve().parent

#: unit -> (testbench module, --count variable, default count)
UNITS = {
    "quantizer": ("tb_quantizer", "HBFP_Q_BLOCKS", 200),
    "mac-array": ("tb_mac_array", "HBFP_MAC_GEMMS", 3),
    "accelerator": ("tb_accelerator", "HBFP_ACC_SAMPLES", 4),
}


def _generate(unit: str, config_text: str | None, gen_dir: Path) -> tuple[Path, Path, str]:
    """Verilog, manifest and top-module name of ``unit`` built from ``--config``."""
    from hbfp_hw.manifest import config_from_source
    if unit == "quantizer":
        from hbfp_hw.config.quantizer import QuantizerConfig
        from hbfp_hw.formats import BFPFormat
        from hbfp_hw.gateware.quantizer import generate
        cfg = (config_from_source(config_text, "quantizer", QuantizerConfig.from_dict)
               if config_text else QuantizerConfig(format=BFPFormat(), lanes=1))
        v, m = generate(cfg, gen_dir)
        return v, m, "quantizer"
    if unit == "mac-array":
        from hbfp_hw.config.mac_array import MacArrayConfig
        from hbfp_hw.gateware.mac_array_gen import generate
        cfg = (config_from_source(config_text, "mac_array", MacArrayConfig.from_dict)
               if config_text else MacArrayConfig())
        v, m = generate(cfg, gen_dir)
        return v, m, "mac_array"
    from hbfp_hw.config.accelerator import AcceleratorConfig
    from hbfp_hw.gateware.sim_device import SIM_CONFIG
    from hbfp_hw.gateware.top import generate
    cfg = (config_from_source(config_text, ("accelerator", "board", "engine"),
                              AcceleratorConfig.from_dict) if config_text else SIM_CONFIG)
    v, m = generate(cfg, gen_dir)
    return v, m, f"{cfg.name}_accel"


def run_unit(unit: str, outdir: str | Path, *, config: str | None = None,
             simulator: str = "verilator", seed: int = 1, count: int | None = None,
             waves: bool = False) -> Path | None:
    """Generate ``unit`` into ``outdir`` and run its cocotb regression; returns the
    waveform file (``waves=True``) or None. Raises ``AssertionError`` on a failed test."""
    from .runner import available_simulators, quick_cxx, run_cocotb
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r}; accepted units are {', '.join(UNITS)}")
    if simulator not in ("verilator", "icarus"):
        raise ValueError(f"--simulator={simulator!r}; accepted values are verilator, icarus")
    if simulator not in available_simulators():
        raise ValueError(f"--simulator={simulator}: {simulator} is not installed"
                         + (" (apt-get install iverilog)" if simulator == "icarus" else ""))
    tb, var, default = UNITS[unit]
    count = default if count is None else count
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"--count={count!r}; accepted range is >= 1")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed={seed!r}; accepted range is [0, 2**32-1]")
    outdir = Path(outdir).resolve()      # the testbench runs in the build folder
    print(f"generating {unit} Verilog into {outdir / 'gen'} ...", flush=True)
    t0 = time.perf_counter()
    v, m, top = _generate(unit, config, outdir / "gen")
    print(f"  {v} ({time.perf_counter() - t0:.1f} s)", flush=True)
    env = {"HBFP_MANIFEST": str(m), var: str(count), "HBFP_Q_SEED": str(seed),
           "HBFP_MAC_SEED": str(seed), "HBFP_ACC_SEED": str(seed)}
    build = outdir / "build"
    print(f"building with {simulator} and running {tb} (seed {seed}, {count} "
          f"{'blocks' if unit == 'quantizer' else 'GEMMs' if unit == 'mac-array' else 'rounds'}"
          f"){', recording waves' if waves else ''} ...", flush=True)
    t0 = time.perf_counter()
    with quick_cxx():
        run_cocotb(verilog_sources=[v], toplevel=top, test_module=tb, build_dir=build,
                   simulator=simulator, python_paths=[SIM_DIR], extra_env=env, seed=seed,
                   waves=waves)
    print(f"passed ({time.perf_counter() - t0:.1f} s); results {build / 'results.xml'}")
    if not waves:
        return None
    wave = build / ("dump.vcd" if simulator == "verilator" else f"{top}.fst")
    if not wave.exists():
        raise AssertionError(f"{simulator} wrote no waveform file at {wave}")
    print(f"waves: {wave}")
    return wave


def _run(args) -> int:
    outdir = args.output or f"build/sim_{args.unit.replace('-', '_')}"
    try:
        run_unit(args.unit, outdir, config=args.config, simulator=args.simulator,
                 seed=args.seed, count=args.count, waves=args.waves)
    except AssertionError as e:
        print(f"hbfp-hw sim: FAILED: {e}")
        return 1
    return 0


def register_cli(subparsers, generate_subparsers) -> None:
    """Add ``hbfp-hw sim``."""
    p = subparsers.add_parser(
        "sim", help="generate a unit and run its cocotb regression (Verilator/Icarus)",
        description="Generate a unit's Verilog from its configuration and run its cocotb "
                    "testbench against the golden model, with random stalls.")
    p.add_argument("unit", choices=tuple(UNITS))
    p.add_argument("--config", default=None,
                   help="the unit's configuration: JSON text, a JSON file or a manifest "
                        "(default: the unit's default; accelerator: the small sim:// build)")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default build/sim_<unit>)")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"),
                   help="HDL simulator (default verilator)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--count", type=int, default=None,
                   help="work items: quantizer blocks (200), mac-array GEMMs (3), "
                        "accelerator rounds (4)")
    p.add_argument("--waves", action="store_true",
                   help="record waveforms (Verilator: build/dump.vcd, Icarus: build/<top>.fst)")
    p.set_defaults(func=_run)
