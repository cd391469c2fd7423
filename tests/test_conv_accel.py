"""CONV on the accelerator: the emulator against the golden HyperBlock convolution
(``hbfp_hw.conv``), the top over sim:// against the emulator frame by frame (results,
statistics and every error frame), and Device.conv2d / conv2d_input_grad /
conv2d_weight_grad on emulate:// and sim:// bit-identical to ``hbfp_hw.conv``. The
larger sim:// matrix is behind ``-m sweep``."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import protocol as P
from hbfp_hw.conv import (bfp_conv2d, bfp_conv2d_input_grad, bfp_conv2d_weight_grad,
                          conv_format)
from hbfp_hw.formats import HBFP4, BFPFormat
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host import device as D
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.quantize import quantize

T = 4
#: SIM_CONFIG with the conv address generator on 4x4 tiles (HBFP8 and HBFP4 HyperBlock
#: slots; a quarter of the bytes per block, so the top simulates faster): 32 blocks per
#: operand buffer, k_max 64
CFG = SIM_CONFIG.replace(
    formats=(BFPFormat(man_bits=8, exp_bits=8, block_shape=(T, T), block_axes=(-2, -1),
                       name="HBFP8T4"), HBFP4.replace(block_shape=(T, T), name="HBFP4T4")),
    tile=T, conv=1, operand_depth=512, k_max=64, name="hbfp_sim_conv")
BS = T * T
#: more room: 128 blocks per operand buffer, k_max 1024 (emulate:// shapes, the sweep)
BIG = CFG.replace(operand_depth=2048, output_depth=2048, k_max=1024, name="hbfp_sim_conv2")
#: room for the emulator-only shapes
EMU = BIG.replace(operand_depth=16384, output_depth=16384, name="hbfp_sim_conv3")
IDX = P.REQUESTS[P.Op.CONV].index


def _fmt(cfg, slot):
    return conv_format(cfg.formats[slot], T, T)


def _q(rng, shape, cfg=CFG, slot=0, scale=1.0):
    return quantize((rng.standard_normal(shape) * scale).astype(np.float32), _fmt(cfg, slot))


def _bits(y):
    return np.ascontiguousarray(y, np.float32).view(np.uint32)


def _fields(mode, n, c, h, w, o, kh, kw, s=1, p=0, d=1, **kw_):
    f = dict(mode=mode, a=0, b=1, slot_a=0, slot_b=0, n=n, c=c, h=h, w=w, o=o, kh=kh, kw=kw,
             stride_h=s, stride_w=s, pad_h=p, pad_w=p, dil_h=d, dil_w=d, out_offset=0)
    f.update(kw_)
    return f


def _put(emu, buf, t):
    B = {s.name: s for s in emu.specs}
    codes, man = t.stream()
    emu.buffers[B[f"op{buf}.exp"].id][: codes.size] = codes
    emu.buffers[B[f"op{buf}.man"].id][: man.size] = man.reshape(-1)


def _emu_out(emu, mode, f):
    """The emulator's ``out`` matrix unpacked into the golden model's layout."""
    pl = P.conv_plan(mode, f["n"], f["c"], f["h"], f["w"], f["o"], f["kh"], f["kw"],
                     (f["stride_h"], f["stride_w"]), (f["pad_h"], f["pad_w"]),
                     (f["dil_h"], f["dil_w"]), T)
    B = {s.name: s for s in emu.specs}
    n = pl["mt"] * pl["nt"] * T * T
    r = emu.buffers[B["out"].id][f["out_offset"]: f["out_offset"] + n].view(np.float32)
    gn, ho, wo = pl["gn"], pl["ho"], pl["wo"]
    if mode == 0:
        r = r.reshape(gn, ho, wo, T, -1).transpose(0, 3, 4, 1, 2).reshape(gn * T, -1, ho, wo)
        return r[: f["n"], : f["o"]]
    if mode == 1:
        h, w = f["h"], f["w"]
        r = r.reshape(gn, h, w, T, -1).transpose(0, 3, 4, 1, 2).reshape(gn * T, -1, h, w)
        return r[: f["n"], : f["c"]]
    kh, kw = f["kh"], f["kw"]
    r = r.reshape(pl["go"] * T, -1, kh, kw, T).transpose(0, 1, 4, 2, 3)
    return r.reshape(pl["go"] * T, -1, kh, kw)[: f["o"], : f["c"]]


@pytest.mark.parametrize("geo", [(1, 0, 1), (1, 1, 1), (2, 1, 1), (2, 0, 2), (4, 2, 1)])
def test_emulator_conv_matches_golden(rng, geo):
    """Forward, dX and dW from the buffers, in the out layout of conv_plan, bit-identical
    to hbfp_hw.conv (several blocks on every axis, mixed HBFP8 x HBFP4 slots, an
    invalid block in each operand)."""
    s, p, d = geo
    emu = Emulator(EMU)
    N, C, H, W, O, KH, KW = 11, 10, 5, 6, 9, 3, 2
    g = dict(stride=s, padding=p, dilation=d)
    xq = _q(rng, (N, C, H, W), EMU, 0, 8.0)
    wq = _q(rng, (O, C, KH, KW), EMU, 1)
    y = bfp_conv2d(xq, wq, **g)
    dyq = _q(rng, y.shape, EMU, 0)
    xi = quantize(np.where(np.arange(H * W).reshape(H, W) == 3, np.nan,
                           rng.standard_normal((N, C, H, W))).astype(np.float32),
                  _fmt(EMU, 0), nonfinite="flag")
    for mode, a, b, sa, sb, size, fn in (
            (0, xq, wq, 0, 1, None, lambda a, b: bfp_conv2d(a, b, **g)),
            (0, xi, wq, 0, 1, None, lambda a, b: bfp_conv2d(a, b, **g)),
            (1, dyq, wq, 0, 1, (H, W), lambda a, b: bfp_conv2d_input_grad(a, b, (H, W), **g)),
            (2, dyq, xq, 0, 0, (KH, KW), lambda a, b: bfp_conv2d_weight_grad(a, b, (KH, KW),
                                                                                **g)),
            (2, dyq, xi, 0, 0, (KH, KW), lambda a, b: bfp_conv2d_weight_grad(a, b, (KH, KW),
                                                                                **g))):
        _put(emu, 0, a)
        _put(emu, 1, b)
        f = _fields(mode, N, C, H, W, O, KH, KW, s, p, d, slot_a=sa, slot_b=sb, out_offset=7)
        emu._op_conv(f, b"")
        ref = fn(a, b)
        assert np.array_equal(_bits(_emu_out(emu, mode, f)), _bits(ref)), mode
        if (a is xi or b is xi) and s == 1:     # (h, w) = (0, 3) is read at stride 1
            assert np.isnan(ref).any() and not np.isnan(ref).all()


def _err(emu, f):
    from hbfp_hw.host.emulator import _DevError
    with pytest.raises(_DevError) as e:
        emu._op_conv(f, b"")
    return e.value.code, e.value.detail


#: bad CONV requests (changes to a good forward 3x3 request) and the expected error
BAD = [
    ({"mode": 3}, P.ErrorCode.BAD_ARGUMENT, IDX("mode")),
    ({"slot_a": 5}, P.ErrorCode.BAD_ARGUMENT, IDX("slot_a")),
    ({"slot_b": 2}, P.ErrorCode.BAD_ARGUMENT, IDX("slot_b")),
    ({"a": 3}, P.ErrorCode.BAD_BUFFER, 3),
    ({"b": 7}, P.ErrorCode.BAD_BUFFER, 7),
    ({"n": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("n")),
    ({"c": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("c")),
    ({"w": 0, "kw": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("w")),
    ({"kw": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("kw")),
    ({"stride_h": 3}, P.ErrorCode.BAD_ARGUMENT, IDX("stride_h")),
    ({"stride_w": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("stride_w")),
    ({"dil_w": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("dil_w")),
    ({"kh": 9, "pad_h": 2}, P.ErrorCode.BAD_ARGUMENT, IDX("kh")),
    ({"dil_w": 2, "pad_w": 0}, P.ErrorCode.BAD_ARGUMENT, IDX("kw")),
    ({"h": 11}, P.ErrorCode.OUT_OF_RANGE, 33 * BS),                # X: 33 blocks > 32
    ({"c": 33}, P.ErrorCode.OUT_OF_RANGE, 81 * BS),                # X: 81 blocks
    ({"o": 5, "c": 5, "h": 2, "w": 2}, P.ErrorCode.OUT_OF_RANGE, 36 * BS),   # W
    ({"mode": 2, "h": 8, "w": 8, "c": 1, "o": 1, "pad_h": 0, "pad_w": 0,
      "kh": 1, "kw": 1, "stride_h": 2, "stride_w": 2},
     P.ErrorCode.OUT_OF_RANGE, 64 * BS),                           # X of dW: 64 blocks
    ({"c": 5}, P.ErrorCode.K_OVERFLOW, 18 * T),                    # K: 3 x 3 x 2 blocks
    ({"out_offset": 1024 - BS * 9 + 1}, P.ErrorCode.OUT_OF_RANGE, 1024),
    ({"out_offset": 2 ** 32 - 1}, P.ErrorCode.OUT_OF_RANGE, 2 ** 32 - 1),
]
GOOD = dict(n=3, c=3, h=3, w=3, o=3, kh=3, kw=3, s=1, p=1)


def test_emulator_conv_errors():
    emu = Emulator(CFG)
    for change, code, detail in BAD:
        f = {**_fields(0, **GOOD), **change}
        assert _err(emu, f) == (code, detail), change
    # stored data out of range: the first bad mantissa / code, A before B
    B = {s.name: s for s in emu.specs}
    emu.buffers[B["op1.man"].id][100] = -128
    assert _err(emu, _fields(0, **GOOD)) == (P.ErrorCode.DATA_RANGE, 100)
    emu.buffers[B["op0.exp"].id][4] = 0xFF + 0     # the invalid code is in range
    emu.buffers[B["op1.man"].id][100] = 0
    emu._op_conv(_fields(0, **GOOD), b"")
    # CONV forgets the GEMM accumulators; conv = 0: UNSUPPORTED before any check
    assert emu._acc is None and emu._k_total == 0
    assert _err(Emulator(SIM_CONFIG), {**_fields(0, **GOOD), "mode": 9}) == (
        P.ErrorCode.UNSUPPORTED, 0)
    # the MXINT8 slot (1-D blocks) is not a conv slot
    assert _err(Emulator(SIM_CONFIG.replace(conv=1)), {**_fields(0, **GOOD), "slot_a": 2}) \
        == (P.ErrorCode.UNSUPPORTED, IDX("slot_a"))


def _req(op, seq, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def _write_frames(seq, buf, t, specs):
    codes, man = t.stream()
    e, m = specs[f"op{buf}.exp"], specs[f"op{buf}.man"]
    return [_req(P.Op.WRITE, seq, codes.astype("u1").tobytes(), buffer=e.id, offset=0),
            _req(P.Op.WRITE, seq + 1, man.reshape(-1).astype("i1").tobytes(), buffer=m.id,
                 offset=0)]


def _run_frames(emu, sim, frames):
    for fr in frames:
        sim.write(fr)
        e, s = emu.feed(fr), sim.read(0.0)
        assert e and s == e, f"request {fr[:12].hex()}: sim {s[:40].hex()} != emu {e[:40].hex()}"


def _conv_frames(rng, cfg, specs, seq, cases):
    """WRITE, CONV and READ frames for each ``(mode, fields, a, b)`` case."""
    frames = []
    for mode, f, a, b in cases:
        frames += _write_frames(seq, 0, a, specs) + _write_frames(seq + 2, 1, b, specs)
        frames.append(_req(P.Op.CONV, seq + 4, **f))
        pl = P.conv_plan(mode, f["n"], f["c"], f["h"], f["w"], f["o"], f["kh"], f["kw"],
                         (f["stride_h"], f["stride_w"]), (f["pad_h"], f["pad_w"]),
                         (f["dil_h"], f["dil_w"]), T)
        n = pl["mt"] * pl["nt"] * T * T
        seq += 5
        for off in range(0, n + f["out_offset"], 1024):
            frames.append(_req(P.Op.READ, seq, buffer=specs["out"].id, offset=off,
                               count=min(1024, n + f["out_offset"] - off)))
            seq += 1
    return frames, seq


def test_top_conv_frames_identical(rng):
    """The RTL top answers every frame as the emulator: forward (3x3, stride 2, padding
    1, two sample and two output-channel blocks), dX (3x3, stride 2, padding 1, HBFP4
    weights, two channel blocks), dW (2x2, stride 1, padding 1, dilation 2 on the rows,
    an Inf block), statistics, ACCUMULATE after CONV, and every error frame."""
    emu, sim = Emulator(CFG), SimTransport(CFG)
    specs = {s.name: s for s in emu.specs}
    xq = _q(rng, (6, 3, 3, 3), scale=4.0)
    wq = _q(rng, (7, 3, 3, 3))
    w4 = _q(rng, (3, 6, 3, 3), slot=1)
    dy1 = _q(rng, (3, 3, 2, 2))
    x5 = quantize(np.where(rng.random((3, 4, 3, 2)) < 0.05, np.inf,
                           rng.standard_normal((3, 4, 3, 2))).astype(np.float32),
                  _fmt(CFG, 0), nonfinite="flag")
    dy2 = _q(rng, (3, 5, 3, 3))
    cases = [
        (0, _fields(0, 6, 3, 3, 3, 7, 3, 3, 2, 1, out_offset=5), xq, wq),
        (1, _fields(1, 3, 6, 3, 3, 3, 3, 3, 2, 1, slot_b=1), dy1, w4),
        (2, _fields(2, 3, 4, 3, 2, 5, 2, 2, 1, 1, dil_h=2), dy2, x5),
    ]
    G = P.GemmFlag
    gemm = dict(a=0, b=1, flags=int(G.STORE | G.ALLOW_INVALID), slot_a=0, slot_b=0,
                a_rows=T, a_cols=T, b_rows=T, b_cols=T, out_offset=0)
    frames, seq = _conv_frames(rng, CFG, specs, 2, cases)
    frames.insert(0, _req(P.Op.GEMM, 1, **gemm))       # accumulators before the CONVs
    frames.append(_req(P.Op.READ_STATS, seq, flags=0))
    frames.append(_req(P.Op.GEMM, seq + 1, **{**gemm, "flags": gemm["flags"]
                                               | int(G.ACCUMULATE)}))   # none after CONV
    seq += 2
    for change, _, _ in BAD:
        frames.append(_req(P.Op.CONV, seq, **{**_fields(0, **GOOD), **change}))
        seq += 1
    bad = np.zeros(16, "i1")
    bad[9] = -128
    frames.append(_req(P.Op.WRITE, seq, bad.tobytes(), buffer=specs["op1.man"].id,
                       offset=64))
    frames.append(_req(P.Op.CONV, seq + 1, **_fields(0, **GOOD)))   # DATA_RANGE 73
    frames.append(_req(P.Op.WRITE, seq + 2, b"\xfe", buffer=specs["op0.exp"].id, offset=2))
    frames.append(_req(P.Op.CONV, seq + 3, **_fields(1, **{**GOOD, "s": 2})))
    frames.append(P.encode_frame(seq + 4, P.Op.CONV, b"\0" * 5))          # bad length
    _run_frames(emu, sim, frames)
    assert emu.counters["CONV"] == 3 and emu.counters["error_DATA_RANGE"] == 2
    assert emu.counters["GEMM"] == 1 and emu.counters["error_BAD_ARGUMENT"] >= 12


def test_top_conv_unsupported_without_generator():
    cfg = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], name="hbfp_sim_noconv")
    emu, sim = Emulator(cfg), SimTransport(cfg)
    _run_frames(emu, sim, [_req(P.Op.CONV, 1, **_fields(0, **GOOD)),
                           _req(P.Op.CONV, 2, **{**_fields(0, **GOOD), "mode": 7})])
    assert emu.counters["error_UNSUPPORTED"] == 2


def _device_cases(dev, rng, cases, slots=(0, 0)):
    cfg = dev.config
    for (N, C, H, W, O, KH, KW, s, p, d) in cases:
        g = dict(stride=s, padding=p, dilation=d)
        xq = _q(rng, (N, C, H, W), cfg, slots[0], 4.0)
        wq = _q(rng, (O, C, KH, KW), cfg, slots[1])
        y = dev.conv2d(xq, wq, **g)
        assert np.array_equal(_bits(y), _bits(bfp_conv2d(xq, wq, **g)))
        dyq = _q(rng, y.shape, cfg, slots[0])
        dx = dev.conv2d_input_grad(dyq, wq, (H, W), **g)
        assert np.array_equal(_bits(dx), _bits(bfp_conv2d_input_grad(dyq, wq, (H, W), **g)))
        dw = dev.conv2d_weight_grad(dyq, xq, (KH, KW), **g)
        assert np.array_equal(_bits(dw), _bits(bfp_conv2d_weight_grad(dyq, xq, (KH, KW),
                                                                       **g)))


def test_device_conv_emulate(rng):
    """Any size on emulate://: split over sample, channel and output-channel blocks."""
    dev = D.open("emulate://", config=BIG)
    try:
        _device_cases(dev, rng, [(19, 13, 4, 5, 17, 3, 3, 1, 1, 1),
                                 (9, 10, 5, 4, 12, 3, 3, 2, 1, 1),
                                 (12, 3, 5, 6, 9, 2, 3, 2, 0, 2),
                                 (4, 12, 5, 5, 3, 1, 1, 4, 0, 1)])
        _device_cases(dev, rng, [(10, 9, 4, 4, 9, 3, 3, 1, 1, 1)], slots=(1, 0))
        xq, wq = _q(rng, (2, 3, 4, 4), BIG), _q(rng, (5, 3, 3, 3), BIG)
        with pytest.raises(ValueError, match="stride=.3, 3. is not supported by CONV"):
            dev.conv2d(xq, wq, stride=3)
        with pytest.raises(ValueError, match=r"blocks \(8, 8\) are not the device's 4 x 4"):
            dev.conv2d(quantize(np.ones((2, 3, 4, 4), np.float32),
                                conv_format(BIG.formats[0], 8, 8)), wq)
        with pytest.raises(ValueError, match="exceeds the device's k_max=1024"):
            dev.conv2d_weight_grad(_q(rng, (40, 5, 6, 6), BIG), _q(rng, (40, 3, 8, 8), BIG),
                                   (3, 3))
    finally:
        dev.close()
    dev = D.open("emulate://", config=CFG.replace(conv=0))
    try:
        with pytest.raises(D.DeviceError, match="UNSUPPORTED"):
            dev.conv2d(xq, wq)
    finally:
        dev.close()


@pytest.mark.sweep
def test_device_conv_sim(rng):
    """sim:// runs the three convolutions on the RTL bit-identical to hbfp_hw.conv: 3x3
    kernels, strides 1 and 2, padding 0 and 1, dilation 2, several blocks per axis
    (commands split over them), HBFP8 and HBFP4 operands."""
    dev = D.open("sim://", config=CFG.replace(k_max=512, name="hbfp_sim_conv4"))
    try:
        _device_cases(dev, rng, [(5, 6, 3, 3, 7, 3, 3, 2, 1, 1), (3, 5, 4, 3, 6, 3, 3, 1, 0, 1),
                                 (5, 3, 4, 4, 3, 2, 2, 1, 1, 2)])
        _device_cases(dev, rng, [(3, 3, 3, 3, 3, 3, 3, 1, 1, 1)], slots=(1, 1))
    finally:
        dev.close()


def _tiny_cnn_step(backend, x, y, seed=0):
    torch = pytest.importorskip("torch")
    from torch import nn

    from hbfp_hw.host.torch import bfp_layers, convert
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 2 * 2, 4))
    m = convert(model, BIG.formats[0], backend=backend)
    assert [la.conv_mode for la in bfp_layers(m)[:2]] == ["hyperblock"] * 2
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    grads = [p.grad.detach().clone() for p in m.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in m.parameters()]


def _cnn_data(rng):
    torch = pytest.importorskip("torch")
    return (torch.from_numpy(rng.standard_normal((6, 3, 4, 4)).astype(np.float32)),
            torch.from_numpy(rng.integers(0, 4, 6)))


def test_cnn_step_device_backend_emulate(rng, monkeypatch):
    """A converted CNN (HyperBlock convolutions) trains on a device with CONV: on
    emulate://, one step's gradients and weights equal the EmulateBackend's bit for bit
    (its PyTorch path: the compiled kernels' first compilation takes seconds), and the
    convolutions ran as CONV commands."""
    torch = pytest.importorskip("torch")
    from hbfp_hw.host import torch_kernels
    from hbfp_hw.host.torch import DeviceBackend, EmulateBackend
    monkeypatch.setattr(torch_kernels, "ENABLED", False)
    x, y = _cnn_data(rng)
    ref = _tiny_cnn_step(EmulateBackend(), x, y)
    dev = D.open("emulate://", config=BIG)
    try:
        be = DeviceBackend(dev)
        assert be.supports_conv
        got = _tiny_cnn_step(be, x, y)
        n_conv = dev.transport.device.counters["CONV"] if hasattr(dev.transport, "device") \
            else None
    finally:
        dev.close()
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert torch.equal(a, b)
    assert be.calls["conv2d"] == 2 and be.calls["conv2d_weight_grad"] == 2
    assert be.calls["conv2d_input_grad"] == 1
    if n_conv is not None:
        assert n_conv == 5


@pytest.mark.sweep
def test_cnn_step_sim_equals_emulate(rng):
    """The same step on sim:// (the RTL) and emulate://, bit for bit."""
    torch = pytest.importorskip("torch")
    from hbfp_hw.host.torch import DeviceBackend
    x, y = _cnn_data(rng)
    out = []
    for url in ("emulate://", "sim://"):
        dev = D.open(url, config=BIG)
        try:
            out.append(_tiny_cnn_step(DeviceBackend(dev), x, y))
        finally:
            dev.close()
    for a, b in zip(out[0][0] + out[0][1], out[1][0] + out[1][1]):
        assert torch.equal(a, b)


def test_config_conv_field():
    assert SIM_CONFIG.conv == 0 and CFG.conv == 1
    for bad in (2, True, "1", -1):
        with pytest.raises(ValueError, match=r"conv=.*; accepted values are 0, 1 \(0: no "
                                             r"CONV address generator\)"):
            SIM_CONFIG.replace(conv=bad)
    assert type(CFG).from_dict(CFG.to_dict()) == CFG


def test_device_backend_conv_quantize(rng):
    """DeviceBackend quantizes a 4-D conv operand with the device's QUANTIZE through the
    block-row matrix: the golden 4-D quantization bit for bit (nearest and stochastic
    rounding, padded samples and channels)."""
    pytest.importorskip("torch")
    from hbfp_hw.host.torch import DeviceBackend
    dev = D.open("emulate://", config=BIG)
    try:
        be = DeviceBackend(dev)
        x = rng.standard_normal((5, 7, 3, 2)).astype(np.float32)
        for fmt in (_fmt(BIG, 0), _fmt(BIG, 1).replace(rounding="stochastic", seed=11)):
            q = be.quantize(x, fmt)
            assert q.shape == x.shape and q.equal(quantize(x, fmt))
        assert dev.transport.device.counters["QUANTIZE"] == 2
    finally:
        dev.close()
