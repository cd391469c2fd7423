"""BITLAYER on the accelerator: the emulator against a scalar reference, the top over
sim:// against the emulator frame by frame, and Device.bitlayer_matmul (emulate:// and
sim://) against hbfp_hw.bitlayers.matmul. (The engine on its own: the ``bitlayer``
script of sim/engine_scripts.py in tests/test_engines_standalone.py and
tests/test_engines_cocotb.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import bitlayers as bl
from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host import device as D
from hbfp_hw.host.emulator import Emulator

#: SIM_CONFIG with one format slot: the top simulates faster
CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], name="hbfp_sim_bl")
B = {s.name: s for s in P.buffer_map(CFG)}


def test_emulator_bitlayer_matches_independent_reference():
    """The emulator's plane-word layout, read back by a scalar loop."""
    emu = Emulator(CFG)
    lanes = P.bitlayer_lanes(CFG)
    rng = np.random.default_rng(4)
    rows, cols, batch, bits, layers = 3, lanes + 5, 2, 6, 4
    chunks = -(-cols // lanes)
    words = rng.integers(0, 1 << lanes, rows * bits * chunks)
    x = rng.integers(-2**15, 2**15, batch * cols)
    emu.buffers[B["bl.w"].id][7:7 + len(words)] = words
    emu.buffers[B["bl.x"].id][2:2 + len(x)] = x
    f = dict(bits=bits, layers=layers, rows=rows, cols=cols, batch=batch, w_offset=7,
             x_offset=2, y_offset=9, flags=0)
    emu._op_bitlayer(f, b"")
    got = emu.buffers[B["bl.y"].id][9:9 + batch * rows].reshape(batch, rows).copy()
    ref = np.zeros((batch, rows), np.int64)
    for b in range(batch):
        for o in range(rows):
            acc = 0
            for q in range(layers):                    # plane bits-1-q, sign plane first
                i = bits - 1 - q
                for kk in range(cols):
                    wd = int(words[(o * bits + q) * chunks + kk // lanes])
                    if (wd >> (kk % lanes)) & 1:
                        acc += (-1 if i == bits - 1 else 1) * 2**i * int(x[b * cols + kk])
            assert int(got[b, o]) == acc
            ref[b, o] = acc
    assert emu._istats[0] == 0                          # not tracked without TRACK
    # ACCUMULATE adds to bl.y; TRACK folds the words written into the int statistics
    F = P.BitLayerFlag
    emu._op_bitlayer({**f, "flags": int(F.ACCUMULATE | F.TRACK)}, b"")
    got2 = emu.buffers[B["bl.y"].id][9:9 + batch * rows].reshape(batch, rows)
    assert np.array_equal(got2, 2 * ref)
    st = emu._op_read_stats({"flags": int(P.StatsFlag.INT_OUTPUT | P.StatsFlag.CLEAR)},
                            b"")[0]
    lo, hi = (np.array([st["min"], st["max"]], np.uint32).view(np.int32))
    assert (st["count"], st["n_nonfinite"], lo, hi) == (batch * rows, 0, 2 * ref.min(),
                                                        2 * ref.max())
    assert emu._istats[0] == 0


def _req(op, seq, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def test_top_bitlayer_frames_identical():
    emu, sim = Emulator(CFG), SimTransport(CFG)
    rng = np.random.default_rng(9)
    lanes = P.bitlayer_lanes(CFG)
    ws, xs, ys = B["bl.w"], B["bl.x"], B["bl.y"]
    words = rng.integers(0, 1 << lanes, ws.depth).astype("<u2")
    words[:4] = 0xFFFF
    x = rng.integers(-2**15, 2**15, xs.depth).astype("<i2")
    x[:2] = [-2**15, 2**15 - 1]
    frames = [_req(P.Op.WRITE, 1, words.tobytes(), buffer=ws.id, offset=0),
              _req(P.Op.WRITE, 2, x.tobytes(), buffer=xs.id, offset=0)]
    good = dict(bits=8, layers=8, rows=3, cols=lanes + 3, batch=2, w_offset=0, x_offset=0,
                y_offset=5, flags=0)
    seq = 3
    for f in (good, {**good, "layers": 1}, {**good, "bits": 3, "layers": 2, "cols": 7},
              {**good, "bits": 0}, {**good, "layers": 9}, {**good, "rows": 0},
              {**good, "cols": P.bitlayer_k_max(CFG) + 1}, {**good, "batch": 0},
              {**good, "w_offset": ws.depth - 1}, {**good, "x_offset": 2**32 - 1},
              {**good, "y_offset": ys.depth - 5}):
        frames.append(_req(P.Op.BITLAYER, seq, **f))
        frames.append(_req(P.Op.READ, seq + 1, buffer=ys.id, offset=0, count=16))
        seq += 2
    frames.append(P.encode_frame(seq, P.Op.BITLAYER, b"\0" * 3))        # bad length
    frames.append(_req(P.Op.WRITE, seq + 1, b"\0\0\0\0", buffer=ys.id, offset=0))  # r/o
    for fr in frames:
        sim.write(fr)
        e, s = emu.feed(fr), sim.read(0.0)
        assert e and s == e, f"request {fr[:12].hex()}: sim {s[:40].hex()} != emu {e[:40].hex()}"
    # the last computing BITLAYER (bits 3, layers 2, K 7) stored the exact GEMM
    y = emu.buffers[ys.id][5:11].astype(np.int64).reshape(2, 3)
    wd = words.astype(np.int64)[:3 * 3].reshape(3, 3)              # (row, plane q)
    w_int = np.zeros((3, 7), dtype=np.int64)
    for q, i in ((0, 2), (1, 1)):                                  # the top 2 of 3 planes
        w_int += (-1 if i == 2 else 1) * 2**i * ((wd[:, q:q + 1] >> np.arange(7)) & 1)
    assert np.array_equal(y, x[:14].astype(np.int64).reshape(2, 7) @ w_int.T)


@pytest.mark.parametrize("url", ["emulate://", "sim://"])
def test_device_bitlayer_matmul(url):
    dev = D.open(url, config=CFG)
    try:
        rng = np.random.default_rng(3)
        if url == "emulate://":       # K split over two commands, rows and batch tiled
            n, k, batch = 21, P.bitlayer_k_max(CFG) + 37, 5
        else:
            n, k, batch = 5, 19, 2
        w = rng.integers(-128, 128, (n, k))
        w[0] = -128
        x = rng.integers(-2**15, 2**15, (batch, k))
        planes = bl.decompose(w, 8)
        for layers in ((1, 3, 8) if url == "emulate://" else (8, 2)):
            got = dev.bitlayer_matmul(x, planes, layers)
            assert got.dtype == np.int64
            assert np.array_equal(got, bl.matmul(x, planes, layers)), layers
        with pytest.raises(ValueError, match=r"x_int value 32768 is outside the int16 range"):
            dev.bitlayer_matmul(np.full((1, k), 2**15), planes)
        with pytest.raises(ValueError, match=r"planes hold 9 bit-layers"):
            dev.bitlayer_matmul(x, bl.decompose(w, 9))
    finally:
        dev.close()


def test_deploy_with_device_backend():
    torch = pytest.importorskip("torch")
    from hbfp_hw.host.bitlayers_torch import deploy, device_backend, set_layers
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    x = torch.rand(4, 12)
    dev = D.open("emulate://", config=CFG)
    try:
        ref = deploy(model, act_bits=8, calib=x)
        hw = deploy(model, act_bits=8, calib=x, backend=device_backend(dev))
        for k in (1, 4, 8):
            set_layers(ref, k)
            set_layers(hw, k)
            assert torch.equal(ref(x), hw(x))
    finally:
        dev.close()
