"""The command line: help, demo, and error reporting."""

from __future__ import annotations

import subprocess
import sys

from hbfp_hw.cli import build_parser, main


def test_help_lists_commands():
    text = build_parser().format_help()
    assert "generate" in text and "demo" in text


def test_demo_numerics_stage_runs(capsys):
    from hbfp_hw import demo
    demo._numerics_stage()
    out = capsys.readouterr().out
    assert "MXINT8" in out and "HBFP4" in out and "within bound: True" in out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "hbfp_hw.cli", "--help"], capture_output=True,
                       text=True, check=True)
    assert "hbfp-hw" in r.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
