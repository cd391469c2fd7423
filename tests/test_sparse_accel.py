"""SPARSE_GEMM on the accelerator: the emulator against the dense golden GEMM, the engine
on its own and the top over sim:// against the emulator, and Device.sparse_matmul
(emulate:// and sim://) bit-identical to hbfp_hw.sparsity.sparse_matmul /
sparse_matmul_t."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host import device as D
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.sim.engine_bench import BufferModel, check_answers, run_amaranth, standalone
from hbfp_hw.sim.engine_scripts import SCRIPTS, sparse_weight_data
from hbfp_hw.sparsity import compress, sparse_matmul, sparse_matmul_t

#: SIM_CONFIG with the two tile slots (HBFP8, HBFP4 on 8x8 blocks) and a 2:4 engine
CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:2], name="hbfp_sim_sp", sparse_lanes=4,
                         bitlayer_lanes=0)
CFG8 = CFG.replace(sparse_lanes=8)                      # 4:8
B = {s.name: s for s in P.buffer_map(CFG)}


def _bits(y):
    return np.asarray(y, np.float32).view(np.uint32)


def test_config_sparse_lanes():
    assert AcceleratorConfig().sparse_lanes == 0 and SIM_CONFIG.sparse_lanes == 0
    assert not any(s.name.startswith("sp.") for s in P.buffer_map(SIM_CONFIG))
    for v in (2, 16, True, "4"):
        with pytest.raises(ValueError, match=r"sparse_lanes=.*accepted values are 0, 4, 8"):
            AcceleratorConfig(sparse_lanes=v)
    with pytest.raises(ValueError, match=r"sparse_lanes=8 needs tile=4 .* accepted values "
                                         r"for this tile are 0, 4"):
        SIM_CONFIG.replace(tile=4, array_rows=2, array_cols=2, formats=(h.HBFP8.replace(
            block_shape=(4, 4)),), sparse_lanes=8)
    assert AcceleratorConfig.from_dict({"sparse_lanes": 8}).sparse_lanes == 8
    assert [s.name for s in P.buffer_map(CFG)][-3:] == ["sp.man", "sp.idx", "sp.exp"]


def _load(emu, cfg, xq, man, idx, codes, *, x=1, w_off=0, e_off=0):
    specs = {s.name: s for s in P.buffer_map(cfg)}
    xc, xm = xq.stream()
    emu.buffers[specs[f"op{x}.man"].id][: xm.size] = xm.reshape(-1)
    emu.buffers[specs[f"op{x}.exp"].id][: xc.size] = xc
    S = P.sparse_slots(cfg)
    emu.buffers[specs["sp.man"].id][w_off * S: w_off * S + man.size] = man
    emu.buffers[specs["sp.idx"].id][w_off * S: w_off * S + idx.size] = idx
    emu.buffers[specs["sp.exp"].id][e_off: e_off + codes.size] = codes


@pytest.mark.parametrize("cfg", [CFG, CFG8], ids=["2:4", "4:8"])
def test_emulator_sparse_gemm_matches_dense_golden_gemm(cfg):
    """The emulator's SPARSE_GEMM against bfp_matmul on the masked dense weight (zero
    blocks, partial edge tiles, invalid blocks, both formats, offsets)."""
    rng = np.random.default_rng(5)
    emu = Emulator(cfg)
    specs = {s.name: s for s in P.buffer_map(cfg)}
    for k, (batch, o, i) in enumerate(((5, 13, 19), (9, 8, 8), (17, 30, 1), (1, 3, 40))):
        trans = k % 2 == 1
        slot = k % 2
        man, idx, codes, sw = sparse_weight_data(cfg, rng, o, i, slot)
        x = rng.standard_normal((batch, o if trans else i)).astype(np.float32)
        if k == 2:
            x[0, 0] = np.inf                     # an invalid X block: its rows are NaN
        xq = h.quantize(x, cfg.formats[1 - slot], nonfinite="flag")
        _load(emu, cfg, xq, man, idx, codes, w_off=3, e_off=2)
        emu._op_sparse_gemm(dict(flags=int(trans), x=1, slot_x=1 - slot, slot_w=slot,
                                 batch=batch, w_rows=o, w_cols=i, w_offset=3, e_offset=2,
                                 out_offset=7), b"")
        n = i if trans else o
        got = emu.buffers[specs["out"].id][7: 7 + batch * n].reshape(batch, n)
        ref = h.bfp_matmul(xq, sw.to_bfp() if trans else sw.to_bfp().T)
        assert np.array_equal(got, _bits(ref)), (k, trans)
        if k == 2:
            assert np.isnan(ref[:min(batch, cfg.tile)]).all() and not np.isnan(ref[-1]).any()
    # a tile that names one column twice: DATA_RANGE with TRANSPOSE only
    idx2 = idx.copy()
    S = P.sparse_slots(cfg)
    idx2[S + 1] = idx2[S]
    _load(emu, cfg, xq, man, idx2, codes)
    f = dict(flags=1, x=1, slot_x=0, slot_w=1, batch=1, w_rows=3, w_cols=40, w_offset=0,
             e_offset=0, out_offset=0)
    with pytest.raises(Exception) as e:
        emu._op_sparse_gemm(f, b"")
    assert e.value.code == P.ErrorCode.DATA_RANGE and e.value.detail == 1
    with pytest.raises(Exception) as e:
        Emulator(SIM_CONFIG)._op_sparse_gemm(f, b"")
    assert e.value.code == P.ErrorCode.UNSUPPORTED


@pytest.mark.parametrize("cfg,seed", [(CFG, 1), (CFG8, 2)], ids=["2:4", "4:8"])
def test_sparse_engine_standalone(cfg, seed):
    """The engine alone (Python buffer model with memory-port timing, random command
    gaps and status back-pressure) against the emulator, answers and every buffer."""
    rng = np.random.default_rng(seed)
    eng, info, specs = standalone(cfg, "sparse")
    script = SCRIPTS["sparse"](cfg, info, rng, n=6 if cfg is CFG else 4)
    res = run_amaranth(eng, BufferModel(specs, cfg.tile, info), script, rng, p_valid=0.6,
                       p_ready=0.6)
    check_answers(script, res["answers"], res["checks"])
    ok = [a for a in script.answers if a[1] == P.Op.SPARSE_GEMM | P.RESPONSE_FLAG]
    err = {a[2][0] for a in script.answers if a[1] == P.ERROR_OPCODE}
    assert len(ok) >= 4 and len(err) >= 2


def _req(op, seq, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def test_top_sparse_frames_identical():
    emu, sim = Emulator(CFG), SimTransport(CFG)
    rng = np.random.default_rng(9)
    man, idx, codes, sw = sparse_weight_data(CFG, rng, 9, 11)      # 2 x 2 blocks, 4 x 4 tiles
    xq = h.quantize(rng.standard_normal((3, 11)).astype(np.float32), CFG.formats[0])
    dyq = h.quantize(rng.standard_normal((2, 9)).astype(np.float32), CFG.formats[1])
    xc, xm = xq.stream()
    gc, gm = dyq.stream()
    bad_idx = idx.copy()
    bad_idx[9] = bad_idx[8]                 # tile 1 names a column twice
    frames = [_req(P.Op.WRITE, 1, xm.astype("i1").tobytes(), buffer=B["op1.man"].id, offset=0),
              _req(P.Op.WRITE, 2, xc.astype("u1").tobytes(), buffer=B["op1.exp"].id, offset=0),
              _req(P.Op.WRITE, 3, gm.astype("i1").tobytes(), buffer=B["op2.man"].id, offset=0),
              _req(P.Op.WRITE, 4, gc.astype("u1").tobytes(), buffer=B["op2.exp"].id, offset=0),
              _req(P.Op.WRITE, 5, man.astype("i1").tobytes(), buffer=B["sp.man"].id, offset=8),
              _req(P.Op.WRITE, 6, idx.astype("u1").tobytes(), buffer=B["sp.idx"].id, offset=8),
              _req(P.Op.WRITE, 7, codes.astype("u1").tobytes(), buffer=B["sp.exp"].id,
                   offset=1)]
    good = dict(flags=0, x=1, slot_x=0, slot_w=0, batch=3, w_rows=9, w_cols=11, w_offset=1,
                e_offset=1, out_offset=3)
    back = {**good, "flags": 1, "x": 2, "slot_x": 1, "batch": 2, "out_offset": 30}
    seq = 8
    # (every check against the emulator with random fields: the standalone engine test)
    for f in (good, back, {**good, "flags": 2}, {**good, "x": 3}, {**good, "slot_w": 7},
              {**good, "batch": 0}, {**back, "w_rows": CFG.k_max + 1},
              {**good, "w_offset": B["sp.man"].depth // 8 - 5},
              {**good, "out_offset": B["out"].depth - 20}):
        frames.append(_req(P.Op.SPARSE_GEMM, seq, **f))
        seq += 1
    frames.append(_req(P.Op.READ, seq, buffer=B["out"].id, offset=3, count=49))
    seq += 1
    frames.append(_req(P.Op.WRITE, seq, bad_idx.astype("u1").tobytes(), buffer=B["sp.idx"].id,
                       offset=8))
    frames.append(_req(P.Op.SPARSE_GEMM, seq + 1, **back))            # DATA_RANGE, tile 1
    frames.append(_req(P.Op.SPARSE_GEMM, seq + 2, **{**good, "out_offset": 200}))  # no check
    frames.append(_req(P.Op.READ, seq + 4, buffer=B["out"].id, offset=200, count=27))
    frames.append(P.encode_frame(seq + 3, P.Op.SPARSE_GEMM, b"\0" * 5))  # bad length
    answers = []
    for fr in frames:
        sim.write(fr)
        e, s = emu.feed(fr), sim.read(0.0)
        assert e and s == e, f"request {fr[:12].hex()}: sim {s[:40].hex()} != emu {e[:40].hex()}"
        answers.append(P.decode_frame(e)[1])
    assert answers.count(P.ERROR_OPCODE) == 9
    # the two computing commands stored the golden results
    out = emu.buffers[B["out"].id]
    assert np.array_equal(out[3:3 + 27], _bits(sparse_matmul(xq, sw)).reshape(-1))
    assert np.array_equal(out[30:30 + 22], _bits(sparse_matmul_t(dyq, sw)).reshape(-1))
    sw2 = dataclasses.replace(sw, indices=bad_idx.reshape(sw.indices.shape))
    assert np.array_equal(out[200:200 + 27], _bits(sparse_matmul(xq, sw2)).reshape(-1))


_SIM_DEV = {}


def _device(url, cfg):
    if url == "emulate://":
        return D.open(url, config=cfg)
    if cfg.name not in _SIM_DEV:
        _SIM_DEV[cfg.name] = D.open(url, config=cfg)
    return _SIM_DEV[cfg.name]


@pytest.mark.parametrize("url", ["emulate://",
                                 pytest.param("sim://", marks=pytest.mark.sweep)])
def test_device_sparse_matmul(url):
    """Device.sparse_matmul bit-identical to the golden sparse GEMMs in both orientations
    (sim://: ~45 s, the simulated top answers INFO and moves every operand byte, so it
    runs with the sweep marker; the top's frames are compared in the default suite)."""
    rng = np.random.default_rng(3)
    if url == "emulate://":   # output split over weight pieces, batch over row blocks
        cases = [(CFG, 0, 37, 100, 40), (CFG, 1, 20, 40, 128), (CFG8, 0, 11, 24, 17),
                 (CFG8, 1, 3, 8, 8), (CFG, 0, 1, 1, 1)]
    else:
        cases = [(CFG, 0, 5, 13, 19), (CFG, 1, 2, 8, 9)]
    for cfg, slot, batch, o, i in cases:
        dev = _device(url, cfg)
        try:
            fmt = cfg.formats[slot]
            n, m = P.sparse_nm(cfg)
            w = rng.standard_normal((o, i)).astype(np.float32)
            w[: min(o, 8), : min(i, 8)] = 0.0                  # a zero block
            sw = compress(w, fmt, n, m)
            xq = h.quantize(rng.standard_normal((batch, i)).astype(np.float32), fmt)
            dyq = h.quantize(rng.standard_normal((batch, o)).astype(np.float32), fmt)
            y = dev.sparse_matmul(xq, sw)
            dx = dev.sparse_matmul(dyq, sw, transpose=True)
            assert np.array_equal(_bits(y), _bits(sparse_matmul(xq, sw))), (o, i)
            assert np.array_equal(_bits(dx), _bits(sparse_matmul_t(dyq, sw))), (o, i)
            assert np.array_equal(_bits(y), _bits(h.bfp_matmul(xq, sw.to_bfp().T)))
        finally:
            if url == "emulate://":
                dev.close()
    if url == "emulate://":
        dev = D.open(url, config=CFG)
        try:
            sw = compress(np.ones((8, 8), np.float32), CFG.formats[0], 4, 8)
            with pytest.raises(ValueError, match=r"the weight is 4:8 sparse; the device's "
                                                 r"engine runs 2:4 \(sparse_lanes=4\)"):
                dev.sparse_matmul(h.quantize(np.ones((1, 8), np.float32), CFG.formats[0]), sw)
            sw = compress(np.ones((8, 200), np.float32), CFG.formats[0], 2, 4)
            with pytest.raises(ValueError, match=r"reduction length 200 .* accepted range "
                                                 r"is \[1, 128\]"):
                dev.sparse_matmul(h.quantize(np.ones((1, 200), np.float32),
                                             CFG.formats[0]), sw)
        finally:
            dev.close()
        with D.open(url, config=SIM_CONFIG) as dev0:
            with pytest.raises(D.DeviceError, match="UNSUPPORTED"):
                dev0.sparse_matmul(h.quantize(np.ones((1, 8), np.float32),
                                              SIM_CONFIG.formats[0]),
                                   compress(np.ones((8, 8), np.float32),
                                            SIM_CONFIG.formats[0], 2, 4))


def teardown_module(module):
    for dev in _SIM_DEV.values():
        dev.close()


def test_sparse_device_backend_layers():
    """BFPLinear layers with transposable 2:4 masks on SparseDeviceBackend: the forward
    GEMMs and dX on the sparse engine (dX from the forward's compressed weight), outputs
    and gradients bit-identical to the golden EmulateBackend."""
    torch = pytest.importorskip("torch")
    from hbfp_hw.host.torch import EmulateBackend, convert
    from hbfp_hw.host.torch_sparsity import SparseDeviceBackend, sparse_weight_from_bfp

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 5))
    x = torch.randn(6, 24, requires_grad=True)
    got = []
    with D.open("emulate://", config=CFG) as dev:
        for be in (EmulateBackend(), SparseDeviceBackend(dev)):
            mdl = convert(model(), CFG.formats[0], backend=be, sparsity="2:4-transposable")
            x.grad = None
            y = mdl(x)
            y.square().sum().backward()
            got.append([_bits(t.detach().numpy()) for t in
                        (y, x.grad, *[p.grad for p in mdl.parameters()])])
        assert be.calls["sparse"] == 2 and be.calls["sparse_t"] == 2
    for a, b in zip(*got):
        assert np.array_equal(a, b)
    # a dense weight is not N:M: None (the backend keeps such GEMMs dense)
    wq = h.quantize(np.ones((8, 8), np.float32), CFG.formats[0])
    assert sparse_weight_from_bfp(wq, 2, 4) is None


@pytest.mark.sweep
@pytest.mark.parametrize("cfg", [CFG, CFG8], ids=["2:4", "4:8"])
def test_sparse_engine_verilator(tmp_path, cfg):
    """The sparse engine's Verilog under Verilator (cocotb, sim/tb_engine.py) against the
    emulator, as tests/test_engines_cocotb.py runs every engine of the default build."""
    from pathlib import Path

    from hbfp_hw.sim.engine_bench import generate_engine
    from hbfp_hw.sim.runner import quick_cxx, run_cocotb
    vpath, mpath, top = generate_engine(cfg, "sparse", tmp_path / "gen")
    with quick_cxx():
        run_cocotb(verilog_sources=[vpath], toplevel=top, test_module="tb_engine",
                   build_dir=tmp_path / "build", simulator="verilator",
                   python_paths=[Path(__file__).resolve().parents[1] / "sim"],
                   extra_env={"HBFP_MANIFEST": str(mpath), "HBFP_ENGINE_SEED": "3"},
                   seed=3)
