"""GEMMs on every format slot of the RTL: HBFP4 and HBFP8 tiles, mixed, and MXINT8.

The simulated top (``SIM_CONFIG``: slot 0 HBFP8 on 8x8 tiles, slot 1 HBFP4 on 8x8 tiles,
slot 2 MXINT8)
against the golden device model (``emulate://``) and ``bfp_matmul``, bit for bit, in
both orientations, and the three HyperBlock training GEMMs (forward, dX, dW) from X, W
and dY each quantized once at 4 bits.
"""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.gateware.top import gemm_slots, mx_slots, runtime_frac, tile_slots
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
    assert tile_slots(CFG) == [0, 1] and mx_slots(CFG) == [2]
    assert gemm_slots(CFG) == [0, 1, 2]
    assert runtime_frac(CFG)


@pytest.mark.parametrize("fa,fb,ta,tb", [
    ("hb4", "hb4", False, False), ("hb8", "hb4", False, True),
    pytest.param("hb4", "hb4", True, True, marks=pytest.mark.sweep),
    pytest.param("hb4", "hb8", True, False, marks=pytest.mark.sweep)])
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


MX = CFG.formats[2]


@pytest.mark.parametrize("orient", ["along_k", "along_mn"])
def test_mx_gemm_sim_equals_emulate(devs, orient):
    """MXINT8: A blocked along K and B along K (B stored transposed: 32-element K
    blocks), or A stored transposed and B as stored (K blocks of one element, exponents
    shared along M and N); edge rows: zeros, a huge row, NaN with ALLOW_INVALID."""
    rng = np.random.default_rng(21 if orient == "along_k" else 22)
    # along M and N every K element is a block of 32: K stays small (operand depth)
    M, K, N = (5, 70, 3) if orient == "along_k" else (5, 24, 3)
    a = (rng.standard_normal((M, K)) * np.exp2(rng.integers(-20, 20, (M, 1)))).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    a[1] = 0.0
    a[3, : K // 2] *= np.float32(2.0**90)
    if orient == "along_k":
        qa, qb = quantize(a, MX), quantize(np.ascontiguousarray(b.T), MX).T
    else:
        qa, qb = quantize(np.ascontiguousarray(a.T), MX).T, quantize(b, MX)
    assert qa.layout.block[1] == qb.layout.block[0]
    ref = bfp_matmul(qa, qb)
    sim, emu = devs
    _same(emu.matmul_q(qa, qb), ref)
    _same(sim.matmul_q(qa, qb), ref)
    assert sim.read_stats() == emu.read_stats()


def test_mx_gemm_invalid_blocks_and_errors(devs):
    """NaN blocks give NaN outputs with ALLOW_INVALID (else INVALID_DATA); K blocks of
    different lengths: BAD_ARGUMENT 5; ACCUMULATE on MX: UNSUPPORTED 2; MX with a tile
    slot: UNSUPPORTED 4; each frame answered as the emulator does where it computes."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    a[2, 40] = np.nan
    b = rng.standard_normal((64, 3)).astype(np.float32)
    qa = quantize(a, MX, nonfinite="flag")
    qb = quantize(np.ascontiguousarray(b.T), MX).T
    ref = bfp_matmul(qa, qb)
    sim, emu = devs
    _same(emu.matmul_q(qa, qb, allow_invalid=True), ref)
    _same(sim.matmul_q(qa, qb, allow_invalid=True), ref)
    assert np.isnan(ref[2]).all() and np.isfinite(ref[[0, 1, 3]]).all()

    pair = (Emulator(CFG), sim.transport)   # the frames below write every buffer they use
    pair[0].session = sim.session           # the RTL's token: the Device's session
    G = P.GemmFlag

    def both(seq, op, data=b"", **f):
        fr = P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))
        pair[1].write(fr)
        return pair[0].feed(fr), pair[1].read(0.0)

    x = rng.standard_normal(64 * 4).astype(np.float32)
    both(1, P.Op.WRITE, x.tobytes(), buffer=0, offset=0)
    for seq, (slot, dst, rows, cols) in enumerate(((2, 0, 4, 64), (2, 1, 3, 64),
                                                   (0, 2, 4, 64)), start=2):
        e, s = both(seq, P.Op.QUANTIZE, slot=slot, dst=dst, flags=0, rows=rows, cols=cols,
                    src_offset=0, rounding=0, seed=0, exp_code=0)
        assert s == e and P.decode_frame(e)[1] == P.Op.QUANTIZE | P.RESPONSE_FLAG
    gemm = dict(a=0, b=1, flags=int(G.STORE | G.TRANS_B), slot_a=2, slot_b=2, a_rows=4,
                a_cols=64, b_rows=3, b_cols=64, out_offset=0)
    e, s = both(10, P.Op.GEMM, **gemm)
    assert s == e and P.decode_frame(e)[1] == P.Op.GEMM | P.RESPONSE_FLAG
    want = {11: (dict(flags=int(G.STORE)), (P.ErrorCode.BAD_ARGUMENT, 5)),
            12: (dict(flags=int(G.STORE | G.TRANS_B | G.ACCUMULATE)),
                 (P.ErrorCode.UNSUPPORTED, 2)),
            13: (dict(b=2, slot_b=0, b_rows=4, b_cols=64),
                 (P.ErrorCode.BAD_ARGUMENT, 5))}
    for seq, (kw, code) in want.items():
        e, s = both(seq, P.Op.GEMM, **{**gemm, **kw})
        _, op, payload = P.decode_frame(s)
        body = P.split_answer(payload)[1]
        assert op == P.ERROR_OPCODE, seq
        assert (body[0], int.from_bytes(body[2:6], "little")) == code, seq
        if code[0] != P.ErrorCode.UNSUPPORTED:
            assert s == e, seq


@pytest.mark.sweep
@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 4), (4, 2), (4, 4)])
@pytest.mark.parametrize("mix", [(0, 0), (1, 1), (0, 1), (2, 2)])
def test_sweep_array_shapes_and_slot_mixes(rows, cols, mix):
    """Every array shape x slot mix: sim == bfp_matmul (``pytest -m sweep``)."""
    cfg = CFG.replace(array_rows=rows, array_cols=cols)
    rng = np.random.default_rng(rows * 10 + cols + 100 * mix[0] + 1000 * mix[1])
    fa, fb = cfg.formats[mix[0]], cfg.formats[mix[1]]
    a = rng.standard_normal((9, 40)).astype(np.float32)
    b = rng.standard_normal((40, 7)).astype(np.float32)
    qa = quantize(a, fa)
    qb = (quantize(np.ascontiguousarray(b.T), fb).T if fb.block_size == 32
          else quantize(b, fb))
    dev = Device(SimTransport(cfg), timeout=0.0)
    _same(dev.matmul_q(qa, qb), bfp_matmul(qa, qb))
