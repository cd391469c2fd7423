"""Device.matmul / train_step: where FP32 operands are quantized (``quantize_on``).

Every choice gives the golden model's bits; ``"host"`` sends BFP instead of FP32, so it
moves fewer bytes, and lifts the one-QUANTIZE limit of stochastic formats.
"""

from __future__ import annotations

import numpy as np
import pytest

import hbfp_hw.host as host
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, HBFP8, MXINT8
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.quantize import NonFiniteBlockError, quantize

SMALL = AcceleratorConfig(formats=(HBFP8, HBFP4, MXINT8), operand_depth=2048,
                          input_depth=1024, output_depth=512, k_max=2048)


def _wire(dev) -> int:
    return dev.link["bytes_tx"] + dev.link["bytes_rx"]


def _payload(link) -> tuple[int, int, int]:
    return link["payload_tx"], link["payload_rx"], link["frames_tx"]


@pytest.mark.parametrize("shape", [(8, 16, 8), (40, 70, 30), (70, 600, 20)])
def test_every_choice_is_bit_exact(shape, rng):
    M, K, N = shape
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    ref = bfp_matmul(quantize(a, HBFP8), quantize(b, HBFP8))
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        for where in ("auto", "device", "host"):
            assert np.array_equal(dev.matmul(a, b, quantize_on=where), ref), where


def test_host_quantization_moves_fewer_bytes(rng):
    """Operands too big for the chip: the device path sends FP32, reads the BFP tensor
    back and sends it again; the host path sends BFP once."""
    a = rng.standard_normal((64, 256)).astype(np.float32)
    b = rng.standard_normal((256, 64)).astype(np.float32)
    wire, links = {}, {}
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        for where in ("device", "host", "auto"):
            before = _wire(dev)
            link0 = dev.link.copy()
            dev.matmul(a, b, quantize_on=where)
            wire[where] = _wire(dev) - before
            links[where] = dev.link - link0
    auto_link, host_link = links["auto"], links["host"]
    fp32_operands = 4 * (a.size + b.size)
    # the device path also sent the FP32 operands and read their BFP form back
    assert wire["device"] - wire["host"] > fp32_operands + (a.size + b.size)
    # does not fit: auto -> host (the same frames; byte stuffing of the SEQ and CRC
    # bytes, which differ between the two runs, adds a few bytes either way)
    assert abs(wire["auto"] - wire["host"]) <= 2 * dev.link["frames_tx"] // 3
    assert _payload(auto_link) == _payload(host_link)


def test_auto_keeps_device_quantizer_when_operands_fit(rng):
    a = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 16)).astype(np.float32)
    wire = {}
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        for where in ("device", "host", "auto"):
            dev.reset()
            before = _wire(dev)
            dev.matmul(a, b, quantize_on=where)
            wire[where] = _wire(dev) - before
    assert wire["device"] > wire["host"] + 3 * (a.size + b.size)   # FP32 vs int8 operands
    assert abs(wire["auto"] - wire["device"]) <= 16    # fits on chip: auto -> device


def test_stochastic_format_larger_than_one_quantize(rng):
    fmt = HBFP8.replace(rounding="stochastic", seed=7)
    a = rng.standard_normal((64, 256)).astype(np.float32)   # 16384 > input_depth 1024
    b = rng.standard_normal((256, 16)).astype(np.float32)
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        with pytest.raises(ValueError, match="stochastic"):
            dev.matmul(a, b, fmt, fmt, quantize_on="device")
        y = dev.matmul(a, b, fmt, fmt)                     # auto -> host
    assert np.array_equal(y, bfp_matmul(quantize(a, fmt), quantize(b, fmt)))


def test_train_step_host_matches_golden(rng):
    x = rng.standard_normal((48, 80)).astype(np.float32)
    w = rng.standard_normal((64, 80)).astype(np.float32)
    dy = rng.standard_normal((48, 64)).astype(np.float32)
    xq, wq, dyq = (quantize(t, HBFP8) for t in (x, w, dy))
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        for where in ("host", "device"):
            y, dx, dw = dev.train_step(x, w, dy, quantize_on=where)
            assert np.array_equal(y, bfp_matmul(xq, wq.T)), where
            assert np.array_equal(dx, bfp_matmul(dyq, wq)), where
            assert np.array_equal(dw, bfp_matmul(dyq.T, xq)), where


def test_errors(rng):
    a = np.ones((4, 16), np.float32)
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        with pytest.raises(ValueError, match=r"quantize_on='gpu'.*'auto', 'device', 'host'"):
            dev.matmul(a, a.T, quantize_on="gpu")
        a[2, 3] = np.nan
        with pytest.raises(NonFiniteBlockError, match="'a'"):
            dev.matmul(a, np.ones((16, 4), np.float32), quantize_on="host")


def test_quantize_tiles_cover_the_tensor_in_whole_blocks():
    with host.open("emulate://", config=SMALL, progress=False) as dev:
        assert dev.quantize_tiles((16, 32)) == [(0, 16, 0, 32)]
        tiles = dev.quantize_tiles((70, 100))              # 7000 > input_depth 1024
    cover = np.zeros((70, 100), int)
    for r0, r1, c0, c1 in tiles:
        assert r0 % 16 == 0 and c0 % 16 == 0               # HBFP8: 16x16 blocks
        assert (r1 - r0) * (c1 - c0) <= SMALL.input_depth
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()
