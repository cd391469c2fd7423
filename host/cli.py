"""``hbfp-hw info URL``: what a device says about itself (its INFO answer).

Works on every transport: ``emulate://``, ``sim://`` (the simulated RTL) and
``serial:///dev/ttyUSB0?baud=3000000`` (a programmed board). Prints the configuration,
the format slots, the buffers and the device hash; ``--json`` prints the whole INFO
description as JSON.
"""

from __future__ import annotations

import json

__all__ = ["describe", "register_cli"]


def describe(info: dict) -> str:
    """A readable summary of a device's INFO description."""
    c = info["config"]
    lines = [f"device {c['name']}: hash {info['hash'][:16]}...",
             f"  MAC array     {c['array_rows']}x{c['array_cols']} PEs, {c['tile']}x{c['tile']} "
             f"output tiles, k_max {c['k_max']}, accumulators {c['accumulator_bits']} bits",
             f"  clock         {c['clock_hz'] / 1e6:g} MHz, UART {c['baud_rate']} baud"]
    for i, f in enumerate(c["formats"]):
        blk = "x".join(str(b) for b in f["block_shape"])
        lines.append(f"  format slot {i} {f['name']}: {f['man_bits']}-bit mantissas, "
                     f"{f['exp_bits']}-bit exponent, blocks {blk} on axes "
                     f"{tuple(f['block_axes'])}, {f['rounding']}")
    for b in info["buffers"]:
        lines.append(f"  buffer {b['id']:<2} {b['name']:<10} {b['depth']} x {b['elem_bits']} "
                     f"bits ({b['kind']}{', writable' if b['writable'] else ''})")
    proto = info.get("protocol", {})
    if "version" in proto:
        lines.append(f"  protocol      version {proto['version']}")
    return "\n".join(lines)


def _run(args) -> int:
    from .device import open as open_device
    with open_device(args.url) as dev:
        info = dev.info()
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else describe(info))
    return 0


def register_cli(subparsers, generate_subparsers) -> None:
    """Add ``hbfp-hw info``."""
    p = subparsers.add_parser(
        "info", help="print a device's INFO (emulate://, sim://, serial://PORT)",
        description="Open a device and print what it says about itself: configuration, "
                    "format slots, buffers, device hash.")
    p.add_argument("url", help="device URL: emulate://, sim://, "
                               "serial:///dev/ttyUSB0?baud=3000000")
    p.add_argument("--json", action="store_true", help="the whole INFO description as JSON")
    p.set_defaults(func=_run)
