"""The ``hbfp-hw`` command line.

Subcommands are contributed by the modules that own them: each module in
:data:`CLI_MODULES` defines ``register_cli(subparsers, generate_subparsers)`` and adds
its own parsers (``generate <unit>`` goes under ``generate_subparsers``). Each parser
sets ``func`` to the callable that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["CLI_MODULES", "build_parser", "main"]

#: Modules that contribute subcommands, in the order they appear in ``--help``.
CLI_MODULES = (
    "hbfp_hw.demo",
    "hbfp_hw.gateware.quantizer",
    "hbfp_hw.gateware.mac_array",
    "hbfp_hw.gateware.top",
    "hbfp_hw.host.train",
    "hbfp_hw.gateware.build",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbfp-hw",
        description="Generate, verify and drive block-floating-point training accelerators.")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hbfp-hw: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
