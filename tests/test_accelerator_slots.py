"""GEMMs on every HyperBlock format slot of the RTL: HBFP4 and HBFP8 tiles, mixed.

The simulated top (``SIM_CONFIG``: slot 0 HBFP8 on 8x8 tiles, slot 1 HBFP4 on 8x8 tiles)
against the golden device model (``emulate://``) and ``bfp_matmul``, bit for bit, in
both orientations, and the three HyperBlock training GEMMs (forward, dX, dW) from X, W
and dY each quantized once at 4 bits.
"""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.gateware.top import gemm_slots, runtime_frac
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.host.device import Device
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.host.transport import LoopbackTransport
from hbfp_hw.quantize import quantize

CFG = SIM_CONFIG
HB8, HB4 = CFG.formats[0], CFG.formats[1]


@pytest.fixture(scope="module")
def devs():
    return (Device(SimTransport(CFG), timeout=0.0),
            Device(LoopbackTransport(Emulator(CFG)), timeout=0.0))


def _q(x, fmt, trans):
    return quantize(np.ascontiguousarray(x.T), fmt).T if trans else quantize(x, fmt)


def _same(y, ref):
    assert y.shape == ref.shape
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))


def test_sim_config_gemm_slots():
    assert HB4.man_bits == 4 and HB8.man_bits == 8
    assert gemm_slots(CFG) == [0, 1]      # the MXINT8 slot's 1-D blocks are not tiles
    assert runtime_frac(CFG)


@pytest.mark.parametrize("fa,fb,ta,tb", [("hb4", "hb4", False, False),
                                         ("hb4", "hb4", True, True),
                                         ("hb8", "hb4", False, True),
                                         ("hb4", "hb8", True, False)])
def test_gemm_slot_mix_sim_equals_emulate(devs, fa, fb, ta, tb):
    seed = 7 + 4 * ta + 2 * tb + 16 * (fa == "hb8") + 32 * (fb == "hb8")
    rng = np.random.default_rng(seed)
    fmts = {"hb4": HB4, "hb8": HB8}
    M, K, N = 13, 20, 11
    a = (rng.standard_normal((M, K)) * np.exp2(rng.integers(-8, 8, (M, 1)))).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    b[:, 3] = 0.0                                    # an all-zero column block part
    a[2, :] *= np.float32(2.0**100)                  # large exponents in one row
    qa, qb = _q(a, fmts[fa], ta), _q(b, fmts[fb], tb)
    ref = bfp_matmul(qa, qb)
    sim, emu = devs
    ys, ye = sim.matmul_q(qa, qb), emu.matmul_q(qa, qb)
    _same(ye, ref)
    _same(ys, ref)
    assert sim.read_stats() == emu.read_stats(), f"seed {seed}"


def test_hyperblock_training_gemms_at_4_bits(devs):
    """Forward, dX and dW of one linear layer from X, W, dY quantized once (HBFP4)."""
    rng = np.random.default_rng(3)
    batch, fin, fout = 16, 24, 8
    x = rng.standard_normal((batch, fin)).astype(np.float32)
    w = (0.1 * rng.standard_normal((fout, fin))).astype(np.float32)
    dy = (1e-3 * rng.standard_normal((batch, fout))).astype(np.float32)
    qx, qw, qdy = quantize(x, HB4), quantize(w, HB4), quantize(dy, HB4)
    sim, emu = devs
    for name, (l, r) in {"forward": (qx, qw.T), "dX": (qdy, qw),
                         "dW": (qdy.T, qx)}.items():
        ref = bfp_matmul(l, r)
        _same(emu.matmul_q(l, r), ref)
        y = sim.matmul_q(l, r)
        _same(y, ref)
        assert np.all(np.isfinite(y)), name


def test_mx_slot_gemm_unsupported_on_rtl():
    """The MXINT8 slot quantizes on the RTL; its GEMM is UNSUPPORTED (detail 3), and
    INFO lists the computing slots."""
    mx = next(i for i, f in enumerate(CFG.formats) if f.block_size == 32)
    sim = SimTransport(CFG)
    fr = P.encode_frame(1, P.Op.GEMM, P.REQUESTS[P.Op.GEMM].pack(
        a=0, b=1, flags=int(P.GemmFlag.STORE), slot_a=mx, slot_b=mx, a_rows=1,
        a_cols=32, b_rows=32, b_cols=1, out_offset=0))
    sim.write(fr)
    out = sim.read(0.0)
    assert out[5] == P.ERROR_OPCODE
    code, op, detail = (out[6], out[7], int.from_bytes(out[8:12], "little"))
    assert (code, op, detail) == (P.ErrorCode.UNSUPPORTED, P.Op.GEMM, 3)
