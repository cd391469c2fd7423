"""The ``hbfp-hw`` command line (also ``python -m hbfp_hw``).

Subcommands are contributed by the modules that own them: each module in
:data:`CLI_MODULES` defines ``register_cli(subparsers, generate_subparsers)`` and adds
its own parsers (``generate <unit>`` goes under ``generate_subparsers``). Each parser
sets ``func`` to the callable that runs it.

Before a command runs, :func:`main` checks the arguments every generator shares, so
that a mistake is reported as one line naming the option rather than as a traceback from
deep inside the generator: ``--name`` of ``generate <unit>`` must be a Verilog
identifier, and ``--config`` of the commands in :data:`CONFIG_CHECKS` must name an
existing JSON file (or be JSON text) holding a configuration or a manifest of a
matching kind, with known keys only.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

__all__ = ["CLI_MODULES", "CONFIG_CHECKS", "build_parser", "main"]

#: Modules that contribute subcommands, in the order they appear in ``--help``.
CLI_MODULES = (
    "hbfp_hw.demo",
    "hbfp_hw.gateware.quantizer",
    "hbfp_hw.gateware.mac_array",
    "hbfp_hw.gateware.top",
    "hbfp_hw.host.train",
    "hbfp_hw.gateware.build",
    "hbfp_hw.sim.cli",
    "hbfp_hw.host.cli",
)

#: ``--config`` checks: ``(command, unit)`` -> (manifest kinds whose ``config`` is
#: accepted, the first being the one generated; ``module:Class`` of the config).
#: The quantizer and MAC-array generators read their ``--config`` themselves.
CONFIG_CHECKS = {
    ("generate", "accelerator"): (("accelerator", "board", "engine"),
                                  "hbfp_hw.config.accelerator:AcceleratorConfig"),
    ("build", None): (("accelerator", "board", "engine"),
                      "hbfp_hw.config.accelerator:AcceleratorConfig"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbfp-hw",
        description="Generate, verify and drive block-floating-point training accelerators.")
    parser.add_argument("--version", action="version", version=f"hbfp-hw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", help="write Verilog and a JSON manifest for a unit")
    gen_sub = gen.add_subparsers(dest="unit", metavar="UNIT")
    gen.set_defaults(func=lambda args: gen.print_help() or 2)
    for name in CLI_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # only a module not written yet is skipped
            if e.name == name:
                continue
            raise
        register = getattr(mod, "register_cli", None)
        if register is not None:  # a module still being built may not offer commands yet
            register(sub, gen_sub)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The shared argument checks (see the module docstring); ``ValueError`` /
    ``FileNotFoundError`` with the message for the user."""
    from .manifest import check_verilog_identifier, config_from_source

    command, unit = getattr(args, "command", None), getattr(args, "unit", None)
    if command == "generate" and unit and getattr(args, "name", None) is not None:
        check_verilog_identifier(args.name, "--name")
    check = CONFIG_CHECKS.get((command, unit if command == "generate" else None))
    text = getattr(args, "config", None)
    if check is not None and text:
        kinds, target = check
        mod_name, cls_name = target.split(":")
        cls = getattr(importlib.import_module(mod_name), cls_name)
        config_from_source(text, kinds, cls.from_dict)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_args(args)
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hbfp-hw: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hbfp-hw: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
