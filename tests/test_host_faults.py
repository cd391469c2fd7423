"""Fault injection: corrupted, dropped, duplicated and delayed bytes never give a silent
wrong result -- every operation either returns the golden bits or raises."""

from __future__ import annotations

import numpy as np
import pytest

import hbfp_hw.host as host
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP8
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.quantize import quantize

CFG = AcceleratorConfig(operand_depth=2048, input_depth=1024, output_depth=512, k_max=2048)


def _faulty_device(seed: int, rate: float, retries: int = 30, **kw):
    emu = Emulator(CFG)
    ft = host.FaultInjectingTransport(host.LoopbackTransport(emu), seed=seed, rate=0.0, **kw)
    dev = host.Device(ft, retries=retries, timeout=0.0, chunk=512)
    ft.rate = rate            # INFO handshake clean, faults from here on
    return dev, ft, emu


def test_thousand_faults_no_silent_errors(seed):
    rng = np.random.default_rng(seed)
    dev, ft, emu = _faulty_device(seed, rate=4e-4)
    ok = reported = 0
    while ft.total_faults < 1000:
        M, K, N = (int(v) for v in rng.integers(1, 80, 3))
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        ref = bfp_matmul(quantize(a, HBFP8), quantize(b, HBFP8))
        try:
            y = dev.matmul(a, b) if rng.random() < 0.5 else \
                dev.matmul_q(quantize(a, HBFP8), quantize(b, HBFP8))
        except (host.LinkError, host.DeviceError) as e:  # reported, never silent
            reported += 1
            assert "retries" in str(e) or "rejected" in str(e)
            continue
        assert np.array_equal(y, ref), (M, K, N)
        ok += 1
    print(f"faults {dict(ft.counts)}, link {dict(dev.link)}, ok {ok}, reported {reported}")
    assert ft.total_faults >= 1000
    assert all(ft.counts[k] > 100 for k in ft.KINDS)
    assert ok > 10 * max(1, reported)
    assert dev.link["retries"] > 0
    assert emu.guards_intact()


def test_hopeless_link_reports_error(seed):
    dev, ft, _ = _faulty_device(seed, rate=0.05, retries=3)
    with pytest.raises(host.LinkError, match=r"no valid answer after 3 retries"):
        dev.matmul(np.ones((40, 40), np.float32), np.ones((40, 40), np.float32))


def test_accumulating_gemm_retry_not_applied_twice(seed):
    """Responses lost after a K-split GEMM executed: the retry must not accumulate twice."""
    dev, ft, emu = _faulty_device(seed, rate=0.0, weights={"drop": 1.0})
    rng = np.random.default_rng(seed)
    a_q = quantize(rng.standard_normal((20, 700)).astype(np.float32), HBFP8)
    b_q = quantize(rng.standard_normal((700, 10)).astype(np.float32), HBFP8)
    ft.rate = 3e-3
    y = dev.matmul_q(a_q, b_q)
    assert np.array_equal(y, bfp_matmul(a_q, b_q))
    # K=700 over 128-wide K chunks (16 rows x 128 = 2048 = operand depth): 6 chunks,
    # M=20 in 2 row tiles of 16: 12 GEMMs executed once each, whatever was retried
    assert emu.counters["GEMM"] == 12
    assert ft.counts["drop"] > 0 and dev.link["retries"] > 0
