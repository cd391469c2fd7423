"""``sim://``: what ``host.open("sim://")`` builds (``SIM_CONFIG``, three format slots)
and the simulator's progress lines.

The Amaranth simulator runs one to three thousand clocks per second and opening a
device costs ~5 s, so the module shares one ``sim://`` device; the progress tests turn
its transport's reporting on for one short call (with a zero interval, so every clock
reports and nothing depends on wall-clock time) and restore it afterwards.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

import hbfp_hw.host as host
from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, MXINT8, BFPFormat
from hbfp_hw.gateware import sim_device
from hbfp_hw.gateware.sim_device import (PROGRESS_ENV, SIM_CONFIG, SimTransport,
                                         progress_default)
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.quantize import quantize

LINE = re.compile(r"sim://: (\d+) cycles simulated in this call \((\d+) in total\), "
                  r"(\d+) cycles/s")


@pytest.fixture(scope="module")
def dev():
    d = host.open("sim://", progress=False)
    yield d
    d.close()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _with_progress(tr: SimTransport, on: bool, stream=None):
    """Set the shared transport's reporting; returns the old settings."""
    old = tr.progress, tr.progress_interval, tr.progress_stream
    tr.progress, tr.progress_interval, tr.progress_stream = on, 0.0, stream
    return old


# ---------------------------------------------------------------------------------------
# the configuration sim:// opens
# ---------------------------------------------------------------------------------------
def test_sim_url_opens_sim_config(dev):
    assert isinstance(dev.transport, SimTransport)
    assert dev.transport.config == SIM_CONFIG
    assert dev.config == SIM_CONFIG
    assert dev.info()["hash"] == P.device_hash(SIM_CONFIG).hex()
    assert dev.config != AcceleratorConfig.default()


def test_sim_config_three_format_slots(dev):
    f0, f1, f2 = SIM_CONFIG.formats
    assert f0 == BFPFormat(man_bits=8, exp_bits=8, block_shape=(8, 8), block_axes=(-2, -1),
                           name="HBFP8T8")
    assert f1 == HBFP4.replace(block_shape=(8, 8), name="HBFP4T8")
    assert (f1.man_bits, f1.exp_bits, f1.block_shape, f1.block_axes) == (4, 8, (8, 8), (-2, -1))
    assert f2 == MXINT8 and (f2.block_shape, f2.block_axes) == ((32,), (-1,))
    assert [SIM_CONFIG.block_2d(i) for i in range(3)] == [(8, 8), (8, 8), (1, 32)]
    assert SIM_CONFIG.operand_depth == 1024 and SIM_CONFIG.tile == 8
    # the device describes the same three slots; the MAC array computes slot 0
    assert [f["name"] for f in dev.info()["config"]["formats"]] == ["HBFP8T8", "HBFP4T8",
                                                                     "MXINT8"]
    assert 0 in dev.info()["gateware"]["gemm_slots"]


@pytest.mark.parametrize("slot,shape", [(0, (9, 13)), (1, (9, 13)), (2, (3, 40))])
def test_sim_quantize_every_slot_bit_exact(dev, rng, slot, shape):
    fmt = SIM_CONFIG.formats[slot]
    x = (rng.standard_normal(shape)
         * np.exp2(rng.integers(-20, 20, size=(shape[0], 1)))).astype(np.float32)
    assert dev.quantize(x, fmt).equal(quantize(x, fmt))


def test_sim_matmul_slot0_bit_exact(dev, rng):
    a = rng.standard_normal((9, 16)).astype(np.float32)
    b = rng.standard_normal((16, 10)).astype(np.float32)
    fmt = SIM_CONFIG.formats[0]
    y = dev.matmul(a, b)
    ref = bfp_matmul(quantize(a, fmt), quantize(b, fmt))
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("slot", [1, 2])
def test_sim_gemm_other_slots_exact_or_unsupported(dev, rng, slot):
    """GEMM on slots 1 and 2: bit-exact when the build lists the slot in
    ``gemm_slots``, else answered ``UNSUPPORTED`` (never a wrong result)."""
    fmt = SIM_CONFIG.formats[slot]
    K = 32
    a_q = quantize(rng.standard_normal((8, K)).astype(np.float32), fmt)
    b_q = quantize(rng.standard_normal((8, K)).astype(np.float32), fmt).T   # blocks along K
    if slot in dev.info()["gateware"]["gemm_slots"]:
        y = dev.matmul_q(a_q, b_q)
        assert np.array_equal(y.view(np.uint32), bfp_matmul(a_q, b_q).view(np.uint32))
    else:
        with pytest.raises(host.DeviceError, match="UNSUPPORTED") as ei:
            dev.matmul_q(a_q, b_q)
        assert ei.value.code == P.ErrorCode.UNSUPPORTED


def test_open_sim_builds_sim_config_unless_given(monkeypatch):
    """open("sim://") hands SIM_CONFIG (or ``config=``) and ``progress`` to the
    transport factory (here a golden-model loopback, so nothing is simulated)."""
    calls = []

    def factory(config, *, progress=None):
        calls.append((config, progress))
        return host.LoopbackTransport(Emulator(config))

    monkeypatch.setattr(sim_device, "sim_transport", factory)
    with host.open("sim://") as d:
        assert d.config == SIM_CONFIG
    other = SIM_CONFIG.replace(k_max=128)
    with host.open("sim://", config=other, progress=True) as d:
        assert d.config == other
    assert calls == [(SIM_CONFIG, None), (other, True)]


# ---------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------
def test_progress_lines_report_cycles_and_rate(dev, capsys):
    tr = dev.transport
    old = _with_progress(tr, True)
    try:
        start = tr.cycles
        dev.read_stats()
        end = tr.cycles
    finally:
        tr.progress, tr.progress_interval, tr.progress_stream = old
    err = capsys.readouterr().err
    found = [tuple(int(v) for v in m) for m in LINE.findall(err)]
    assert found, err[-500:]
    assert len(err.splitlines()) == len(found)            # one plain line per report
    calls = [n for n, _, _ in found]
    totals = [t for _, t, _ in found]
    assert all(0 < n for n in calls) and totals == sorted(totals)
    assert all(t - n == start for n, t, _ in found[:1])    # first call starts at `start`
    assert start < totals[-1] <= end
    assert "cycles/s" in err


def test_progress_on_a_terminal_rewrites_one_line(dev):
    tr = dev.transport
    tty = _Tty()
    old = _with_progress(tr, True, tty)
    try:
        dev.read_stats()
    finally:
        tr.progress, tr.progress_interval, tr.progress_stream = old
    out = tty.getvalue()
    # each call that reported: "\r<line>" repeated, then one "\n" when it returns
    assert re.fullmatch(r"(?:(?:\r[^\r\n]+)+\n)+", out), out[-300:]
    assert all(LINE.fullmatch(seg.rstrip("\n")) for seg in out.split("\r")[1:])


def test_progress_off_prints_nothing(dev, capsys):
    tr = dev.transport
    old = _with_progress(tr, False)
    try:
        dev.read_stats()
    finally:
        tr.progress, tr.progress_interval, tr.progress_stream = old
    assert "sim://" not in capsys.readouterr().err


def test_progress_default_env_and_terminal(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_default(io.StringIO()) is False
    assert progress_default(_Tty()) is True
    for value, want in (("1", True), ("yes", True), ("0", False), ("off", False),
                        ("", False)):
        monkeypatch.setenv(PROGRESS_ENV, value)
        assert progress_default(io.StringIO()) is want, value
        assert progress_default(_Tty()) is want, value


def test_progress_interval_validated():
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match=r"progress_interval=.* accepted range is "
                                             r"\[0, inf\)"):
            SimTransport(progress_interval=bad)
