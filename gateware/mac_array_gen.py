"""MAC array generation: Verilog and manifest (:func:`generate`) and the
``hbfp-hw generate mac-array`` command (:func:`register_cli`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from amaranth.back import verilog

from ..config.mac_array import MULTIPLIER_MAPPINGS, MacArrayConfig
from ..manifest import (check_verilog_identifier, config_from_source, verilog_ports,
                        write_manifest)
from .mac_array import MacArray, operand_layout, output_layout
from .pe import PRIMITIVES

__all__ = ["generate", "port_map", "register_cli"]


def port_map(cfg: MacArrayConfig) -> dict:
    def fields(layout):
        return {name: {"offset": f.offset, "width": f.width} for name, f in layout}
    la = operand_layout(cfg, cfg.man_bits_a, runtime_frac=cfg.dual_precision)
    lb = operand_layout(cfg, cfg.man_bits_b, runtime_frac=cfg.dual_precision)
    return {
        "a": {"payload_width": la.size, "fields": fields(la)},
        "b": {"payload_width": lb.size, "fields": fields(lb)},
        "o": {"payload_width": output_layout(cfg).size, "fields": fields(output_layout(cfg))},
    }


def generate(cfg: MacArrayConfig, outdir: str | Path, *, name: str = "mac_array",
             primitives: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.v`` and ``<name>.json`` (manifest) into ``outdir``.

    ``name`` (the top module and file name) must be a Verilog identifier.
    A ``dual_precision`` config is built with ``runtime_frac`` (its ports carry ``frac``).

    ``primitives="ecp5"`` instantiates MULT18X18D (with its registers) for the DSP
    mappings; simulating that Verilog needs a MULT18X18D model
    (``sim/models/mult18x18d.v``)."""
    check_verilog_identifier(name, "name")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    text = verilog.convert(MacArray(cfg, primitives=primitives), name=name,
                           emit_src=False)
    vpath = outdir / f"{name}.v"
    vpath.write_text(text)
    ports = port_map(cfg)
    ports["signals"] = verilog_ports(vpath, name, text=text)
    mpath = write_manifest(outdir / f"{name}.json", kind="mac_array", top=name,
                           config=cfg.to_dict(), ports=ports, verilog=vpath,
                           extra={"primitives": primitives})
    return vpath, mpath


#: ``generate mac-array`` options that set a :class:`MacArrayConfig` field, with help.
_CLI_FIELDS = {
    "rows": "PE rows (output rows per pass); must divide --tile [1, 64]",
    "cols": "PE columns (output columns per pass); must divide --tile [1, 64]",
    "lanes": "MACs per PE per cycle (block dot-product width); must divide --tile [1, 64]",
    "tile": "HyperBlock tile edge T: one shared exponent per T x T tile, the K block "
            "length; a multiple of --rows, --cols and --lanes [1, 64]",
    "man_bits_a": "mantissa bits (sign included) of operand A [2, 16]",
    "man_bits_b": "mantissa bits of operand B [2, 16]; default: --man-bits-a",
    "exp_bits": "shared-exponent bits of both operands [2, 10]",
    "k_max": "largest reduction length K the accumulator is sized for [1, 2**24]",
    "guard_bits": "accumulator guard bits below the aligned products [0, 24]",
    "mapping": "multipliers: lut (shift-add), dsp (one DSP per product), dsp-packed "
               "(several products per 18x18 DSP where the widths allow)",
    "dual_precision": "add the 4-bit mode (two products per multiplier) selected per job "
                      "by the operands' frac header fields",
}


class _Given(argparse.Action):
    """Stores an option's value and records that it was given (in ``args.given``), so
    that only the options on the command line override ``--config``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = set(getattr(namespace, "given", ())) | {self.dest}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ``None`` of options without one."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _check_tile(tile: int, dims: dict[str, int]) -> None:
    """``--tile`` given while ``--rows`` / ``--cols`` / ``--lanes`` keep their values from
    the defaults or ``--config``: blame the tile, naming the values it must divide."""
    if not (isinstance(tile, int) and 1 <= tile <= 64):
        return                               # range errors: MacArrayConfig's message
    bad = {k: v for k, v in dims.items() if tile % v}
    if not bad:
        return
    step = math.lcm(*dims.values())
    given = ", ".join(f"--{k} {v}" for k, v in dims.items())
    raise ValueError(
        f"--tile {tile} is not a multiple of {', '.join(f'--{k} {v}' for k, v in bad.items())}"
        f": the tile edge must be a multiple of the array's rows, cols and lanes ({given}); "
        f"accepted --tile values with these are {list(range(step, 65, step))} (or also give "
        f"--rows/--cols/--lanes that divide {tile})")


def _cli_config(args) -> MacArrayConfig:
    """``--config`` (if given) as the base, then the options given on the command line."""
    if args.config:
        base = config_from_source(args.config, "mac_array", MacArrayConfig.from_dict)
    else:
        base = MacArrayConfig()
    given = {f: getattr(args, f) for f in _CLI_FIELDS if f in getattr(args, "given", ())}
    if "man_bits_a" in given and "man_bits_b" not in given:
        given["man_bits_b"] = given["man_bits_a"]
    if "tile" in given:
        _check_tile(given["tile"], {k: getattr(base, k) for k in ("rows", "cols", "lanes")
                                    if k not in given})
    return base.replace(**given)


def _cli_generate(args) -> int:
    cfg = _cli_config(args)
    v, mf = generate(cfg, args.output, name=args.name, primitives=args.primitives)
    narrow = (f", {cfg.macs_per_cycle_narrow} in the 4-bit mode" if cfg.dual_precision
              else "")
    print(f"wrote {v} and {mf} ({cfg.macs_per_cycle} MACs/cycle{narrow}, accumulator "
          f"{cfg.acc_bits} bits)")
    return 0


def register_cli(subparsers, generate_subparsers) -> None:
    p = generate_subparsers.add_parser(
        "mac-array", help="BFP MAC array with transposable HyperBlock tile buffers",
        description="Write the MAC array's Verilog and JSON manifest. Start from --config "
                    "(or the defaults shown) and override single fields.",
        formatter_class=_HelpFormatter)
    d = MacArrayConfig()
    p.add_argument("--config", metavar="JSON",
                   help="MacArrayConfig JSON (a file or literal text; a mac_array manifest "
                        "works too) to start from; the options given override it")
    for field, text in _CLI_FIELDS.items():
        flag = "--" + field.replace("_", "-")
        if field == "dual_precision":
            p.add_argument(flag, action=_Given, nargs=0, const=True, default=False, help=text)
        elif field == "mapping":
            p.add_argument(flag, action=_Given, choices=MULTIPLIER_MAPPINGS, default=d.mapping,
                           help=text)
        else:
            p.add_argument(flag, action=_Given, type=int,
                           default=None if field == "man_bits_b" else getattr(d, field),
                           help=text)
    p.add_argument("--name", default="mac_array",
                   help="top module name, a Verilog identifier")
    p.add_argument("--primitives", choices=[p for p in PRIMITIVES if p], default=None,
                   help="instantiate vendor DSP primitives (ecp5: MULT18X18D with its "
                        "input/pipeline/output registers; needs a model to simulate)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=_cli_generate, given=())
