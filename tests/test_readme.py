"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "(0, 0)" in out


# -- every command line of the README -------------------------------------------------

import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = README.parent

#: README command lines that take minutes: they run with ``-m sweep`` / ``-m synth``
LONG = {"make test": "sweep", "make demo": "sweep", "hbfp-hw train": "sweep",
        "hbfp-hw generate accelerator": "sweep",
        "hbfp-hw build": "synth"}


def _command_lines() -> list[str]:
    lines, fence = [], None
    for ln in README.read_text().splitlines():
        if ln.startswith("```"):
            fence = None if fence is not None else ln[3:].strip()
            continue
        if fence in ("", "sh"):
            cmd = ln.split("#", 1)[0].strip()
            if cmd.startswith(("make ", ".venv/bin/")):
                lines.append(cmd)
    return lines


def _kind(cmd: str) -> str:
    plain = cmd.replace(".venv/bin/", "")
    for prefix, marker in LONG.items():
        if plain.startswith(prefix):
            return marker
    return "default"


def _params():
    out = []
    for cmd in _command_lines():
        kind = _kind(cmd)
        marks = [getattr(pytest.mark, kind)] if kind != "default" else []
        out.append(pytest.param(cmd, marks=marks, id=cmd[:60]))
    return out


def test_readme_has_command_lines():
    cmds = _command_lines()
    assert "make test" in cmds and "make demo" in cmds
    assert any("generate accelerator" in c for c in cmds)


@pytest.mark.parametrize("cmd", _params())
def test_readme_command_line_runs(cmd, tmp_path):
    """Each command line as written, from a scratch folder (``out/`` lands there); the
    ``make`` targets from the repository itself."""
    argv = shlex.split(cmd)
    if argv[0] == "make":
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    else:
        exe = Path(sys.executable).with_name(Path(argv[0]).name)
        p = subprocess.run([str(exe), *argv[1:]], cwd=tmp_path, capture_output=True,
                           text=True)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
