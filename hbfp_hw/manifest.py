"""Manifests: the JSON description written next to every generated Verilog file.

A manifest records what was generated (unit kind, top module name, the full format /
array configuration, derived widths, the port map) so that testbenches and the host
driver read parameters from the build, never from a hand-written copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["MANIFEST_VERSION", "write_manifest", "read_manifest"]

MANIFEST_VERSION = 1


def write_manifest(path: str | Path, *, kind: str, top: str, config: dict[str, Any],
                   ports: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write a manifest JSON file and return its path."""
    data = {"manifest_version": MANIFEST_VERSION, "generator": f"hbfp-hw {__version__}",
            "kind": kind, "top": top, "config": config, "ports": ports}
    if extra:
        data.update(extra)
    path = Path(path)
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
