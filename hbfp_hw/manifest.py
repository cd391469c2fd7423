"""Manifests: the JSON description written next to every generated Verilog file.

A manifest records what was generated (unit kind, top module name, the full format /
array configuration, derived widths, the port map) so that testbenches and the host
driver read parameters from the build, never from a hand-written copy.

Every manifest has the same top-level keys, whatever the unit:

``manifest_version``, ``generator``
    Schema version and the generator that wrote it.
``kind``, ``top``
    Unit kind (``quantizer``, ``mac_array``, ``accelerator``, ``board``, ...) and the
    Verilog top module name.
``verilog``
    File name of the Verilog, relative to the manifest (``None`` if none was written).
``latency_cycles``
    Clocks from an input beat to its output beat for a streaming unit with a fixed
    pipeline latency; ``None`` where no such number is defined.
``config``
    The unit's configuration (``to_dict`` of its config object).
``ports``
    The unit's port description. ``ports["signals"]`` always maps every Verilog port
    name of the top module to ``{"dir": "in" | "out", "width": bits}``; the other keys
    are unit specific (payload field layouts, stream names, board pins).

Units add their own keys next to these (``device``, ``device_hash``, ``board``,
``build``, ``banks``, ...).

This module also has the checks the command line applies to what users pass it:
:func:`load_config_source` (``--config``) and :func:`check_verilog_identifier`
(``--name``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["MANIFEST_VERSION", "write_manifest", "read_manifest", "verilog_ports",
           "load_config_source", "config_from_source", "check_verilog_identifier",
           "VERILOG_KEYWORDS"]

MANIFEST_VERSION = 1

#: Reserved words of Verilog-2005 (IEEE 1364-2005, annex B) and the SystemVerilog
#: words tools commonly reject as module names.
VERILOG_KEYWORDS = frozenset("""
always and assign automatic begin buf bufif0 bufif1 case casex casez cell cmos config
deassign default defparam design disable edge else end endcase endconfig endfunction
endgenerate endmodule endprimitive endspecify endtable endtask event for force forever fork
function generate genvar highz0 highz1 if ifnone incdir include initial inout input
instance integer join large liblist library localparam macromodule medium module nand
negedge nmos nor noshowcancelled not notif0 notif1 or output parameter pmos posedge
primitive pull0 pull1 pulldown pullup pulsestyle_ondetect pulsestyle_onevent rcmos real
realtime reg release repeat rnmos rpmos rtran rtranif0 rtranif1 scalared showcancelled
signed small specify specparam strong0 strong1 supply0 supply1 table task time tran
tranif0 tranif1 tri tri0 tri1 triand trior trireg unsigned use uwire vectored wait wand
weak0 weak1 while wire wor xnor xor
bit byte logic int shortint longint interface endinterface package endpackage class
endclass program endprogram
""".split())

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_verilog_identifier(name: object, what: str = "name") -> str:
    """``name`` if it can be a Verilog module name (and a file name): a letter or ``_``,
    then letters, digits or ``_``, not a Verilog keyword; else ``ValueError`` naming the
    value and the rule."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise ValueError(
            f"{what}={name!r} is not a valid Verilog identifier: it must start with a letter "
            f"or '_' and hold only letters, digits and '_' (no spaces, '-', '.' or '$'), "
            f"e.g. {_suggest(name)!r}")
    if name in VERILOG_KEYWORDS:
        raise ValueError(f"{what}={name!r} is a Verilog keyword and cannot name a module; "
                         f"e.g. {name + '_top'!r}")
    return name


def _suggest(name: object) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", str(name)).strip("_") or "top"
    return s if re.match(r"[A-Za-z_]", s) else "u_" + s


def verilog_ports(verilog: str | Path | None, top: str, *,
                  text: str | None = None) -> dict[str, dict[str, Any]]:
    """Ports of module ``top`` in a Verilog file (or in ``text``), in header order:
    ``{name: {"dir": "in" | "out" | "inout", "width": bits}}``."""
    if text is None:
        text = Path(verilog).read_text()
    m = re.search(r"^\s*module\s+\\?" + re.escape(top) + r"\s*\((.*?)\)\s*;(.*?)^\s*endmodule",
                  text, re.S | re.M)
    if m is None:
        raise ValueError(f"module {top!r} not found in the Verilog")
    order = [p.strip().lstrip("\\").strip() for p in m.group(1).split(",") if p.strip()]
    decl = {}
    for d in re.finditer(r"^\s*(input|output|inout)\s+(?:wire\s+|reg\s+)?(?:signed\s+)?"
                         r"(?:\[(\d+):(\d+)\]\s*)?\\?([^\s;]+)\s*;", m.group(2), re.M):
        hi, lo = d.group(2), d.group(3)
        width = abs(int(hi) - int(lo)) + 1 if hi is not None else 1
        decl[d.group(4)] = {"dir": {"input": "in", "output": "out"}.get(d.group(1), "inout"),
                            "width": width}
    return {p: decl[p] for p in order if p in decl}


def write_manifest(path: str | Path, *, kind: str, top: str, config: dict[str, Any],
                   ports: dict[str, Any], extra: dict[str, Any] | None = None,
                   verilog: str | Path | None = None,
                   latency_cycles: int | None = None) -> Path:
    """Write a manifest JSON file and return its path.

    ``verilog`` is the Verilog file written for this manifest (default: ``<stem>.v``
    next to the manifest, if it exists). ``ports["signals"]`` is filled from that
    file's ``top`` module when the caller has not given it (or, with no Verilog, from the
    ``ports`` entries that have a ``dir`` and a ``width``). ``extra`` keys are added at
    the top level (an ``extra`` ``verilog`` / ``latency_cycles`` also sets those).
    """
    path = Path(path)
    extra = dict(extra or {})
    verilog = extra.pop("verilog", verilog)
    latency_cycles = extra.pop("latency_cycles", latency_cycles)
    if verilog is None and path.with_suffix(".v").is_file():
        verilog = path.with_suffix(".v")
    vfile = None if verilog is None else path.parent / Path(verilog).name
    ports = dict(ports)
    if "signals" not in ports:
        if vfile is not None and vfile.is_file():
            ports["signals"] = verilog_ports(vfile, top)
        else:
            ports["signals"] = {k: {"dir": v["dir"], "width": v["width"]}
                                for k, v in ports.items()
                                if isinstance(v, dict) and "dir" in v and "width" in v}
    data = {"manifest_version": MANIFEST_VERSION, "generator": f"hbfp-hw {__version__}",
            "kind": kind, "top": top,
            "verilog": None if verilog is None else Path(verilog).name,
            "latency_cycles": latency_cycles, "config": config, "ports": ports}
    data.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a manifest; if ``kind`` is given, check it matches."""
    data = json.loads(Path(path).read_text())
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest_version {data.get('manifest_version')!r}, "
                         f"expected {MANIFEST_VERSION}")
    if kind is not None and data.get("kind") != kind:
        raise ValueError(f"{path}: manifest is for {data.get('kind')!r}, expected {kind!r}")
    return data


def load_config_source(text: str, kinds: str | tuple[str, ...], *,
                       option: str = "--config") -> dict[str, Any]:
    """The configuration dict a ``--config`` value names.

    ``text`` is a JSON file or literal JSON text (starting with ``{``) holding either a
    bare configuration object or a manifest. A manifest must be of one of ``kinds`` (the
    first is the one asked for); its ``config`` is returned. Errors (``ValueError``, or
    ``FileNotFoundError`` for a path that does not exist) name the option and the value.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    src = Path(text)
    is_json = text.lstrip().startswith("{")
    try:
        is_file = not is_json and src.is_file()
    except OSError:                  # e.g. a name too long to be a path
        is_file = False
    if is_file:
        try:
            data = json.loads(src.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{option} {text}: the file is not valid JSON ({e})") from None
        where = f"{option} {text}"
    elif is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{option}: the text is not valid JSON ({e}): {text!r}") from None
        where = option
    elif src.exists():
        raise ValueError(f"{option} {text}: is a directory; give a JSON file (a "
                         f"configuration or a manifest) or JSON text")
    else:
        raise FileNotFoundError(
            f"{option} {text}: no such file: {str(src.absolute())!r} (give a JSON file, "
            f"a manifest, or JSON text starting with '{{')")
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "manifest_version" in data or "kind" in data:
        kind = data.get("kind")
        if kind not in kinds:
            also = (f" (or {', '.join(repr(k) for k in kinds[1:])}, which hold the same "
                    f"configuration)" if len(kinds) > 1 else "")
            raise ValueError(
                f"{where} is a manifest of kind {kind!r}; this command takes a manifest of "
                f"kind {kinds[0]!r}{also} or a bare {kinds[0]} configuration")
        if not isinstance(data.get("config"), dict):
            raise ValueError(f"{where}: the manifest has no 'config' object")
        data = data["config"]
    return data


def config_from_source(text: str, kinds: str | tuple[str, ...], from_dict, *,
                       option: str = "--config"):
    """``from_dict(load_config_source(text, kinds))``, with the configuration's own
    errors (unknown keys, values out of range) prefixed by ``option``."""
    d = load_config_source(text, kinds, option=option)
    try:
        return from_dict(d)
    except (ValueError, TypeError) as e:
        shown = text if len(text) < 60 or not text.lstrip().startswith("{") else \
            text[:57] + "..."
        raise ValueError(f"{option} {shown}: {e}") from None
