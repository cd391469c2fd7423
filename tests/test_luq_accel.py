"""LUQ on the accelerator (LUQ_GEMM, LUQ_QUANTIZE): the emulator against the golden model
and an independent scalar reference, the top over sim:// against the emulator frame by
frame (every error, edge cases), the engine on its own with random stalls, and
Device.luq_matmul / Device.luq_quantize (emulate:// and sim://) against
hbfp_hw.luq.luq_matmul / luq_quantize, bit for bit."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host import device as D
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.luq import luq_matmul, luq_quantize

#: SIM_CONFIG with the LUQ engine (4 generator lanes), two HyperBlock slots (HBFP8 and
#: HBFP4 on 8x8 tiles) and no bit-serial engine: the top simulates faster
CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:2], luq_lanes=4, bitlayer_lanes=0,
                         name="hbfp_sim_luq")
B = {s.name: s for s in P.buffer_map(CFG)}
T = CFG.tile


def _f32bits(v: float) -> int:
    return int(np.array([v], np.float32).view(np.uint32)[0])


def _req(op, seq, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def test_config_field_and_buffers():
    assert AcceleratorConfig().luq_lanes == 0 and SIM_CONFIG.luq_lanes == 0
    assert "luq.a" not in {s.name for s in P.buffer_map(SIM_CONFIG)}
    with pytest.raises(ValueError, match=r"luq_lanes=3; accepted values are 0, 1, 2, 4, 8"):
        SIM_CONFIG.replace(luq_lanes=3)
    assert B["luq.a"].kind == P.BufferKind.LUQ_CODES and B["luq.a"].depth == 1024
    assert P.luq_slots(CFG) == [0, 1] and P.luq_slots(SIM_CONFIG) == [0, 1]


def _load_gemm(emu, a, b, buf=1, a_off=0):
    codes, man = b.stream()
    emu.buffers[B[f"op{buf}.man"].id][:man.size] = man.reshape(-1)
    emu.buffers[B[f"op{buf}.exp"].id][:codes.size] = codes
    emu.buffers[B["luq.a"].id][a_off:a_off + a.codes.size] = a.codes.reshape(-1)


def test_emulator_luq_gemm_matches_scalar_reference():
    """The emulator's buffer layout read back by a scalar loop in exact arithmetic: the
    result is within the golden model's error bound of the exact product, and equal to
    luq_matmul bit for bit."""
    rng = np.random.default_rng(5)
    emu = Emulator(CFG)
    M, K, N, S = 3, 2 * T + 3, T + 5, 2
    g = (rng.standard_normal((M, K)) * 1e-2).astype(np.float32)
    a = luq_quantize(g, P.luq_format(CFG, samples=S, seed=9))
    w = (rng.standard_normal((K, N)) * np.exp2(rng.integers(-4, 4, (K, 1)))).astype(np.float32)
    b = h.quantize(w, CFG.formats[0])
    _load_gemm(emu, a, b, buf=2, a_off=7)
    emu._op_luq_gemm(dict(flags=0, b=2, slot_b=0, samples=S, rows=M, k=K, cols=N,
                          alpha=_f32bits(a.alpha), a_offset=7, out_offset=3), b"")
    y = emu.buffers[B["out"].id][3:3 + M * N].view(np.float32).reshape(M, N)
    assert np.array_equal(y.view(np.uint32), luq_matmul(a, b).view(np.uint32))
    fmt = CFG.formats[0]
    man = emu.buffers[B["op2.man"].id]
    exp = emu.buffers[B["op2.exp"].id].astype(int)
    codes = emu.buffers[B["luq.a"].id]
    gn = -(-N // T)
    bound = luq_matmul.__globals__["luq_matmul_error_bound"](a, b)
    for i in range(M):
        for j in range(N):
            exact = Fraction(0)
            for kk in range(K):
                blk = (kk // T) * gn + j // T
                mv = int(man[blk * T * T + (kk % T) * T + j % T])
                e = exp[blk] - fmt.exp_bias - fmt.frac_bits
                for s in range(S):
                    c = int(codes[7 + (s * M + i) * K + kk])
                    if c & 7:
                        sgn = -1 if c & 8 else 1
                        exact += sgn * Fraction(2) ** (c % 8 - 1) * mv * Fraction(2) ** e
            exact = exact * Fraction(a.alpha) / S
            assert abs(float(y[i, j]) - float(exact)) <= bound[i, j], (i, j)


def test_emulator_luq_quantize_chunks_equal_one_stream():
    """A tensor quantized in CONTINUE chunks (a partial beat in the middle) equals the
    golden model on the whole stream; RESET keeps the generators."""
    rng = np.random.default_rng(6)
    emu = Emulator(CFG)
    x = (rng.standard_normal(90) * 1e-3).astype(np.float32)
    x[5] = 2.0**-140                                            # subnormal: flushed
    fp = emu.buffers[B["fp_in"].id]
    fp[:90] = x.view(np.uint32)
    m = float(np.abs(x).max())
    full = luq_quantize(x, P.luq_format(CFG, seed=77), max_abs=m)
    Q = P.LuqQuantizeFlag
    emu._op_luq_quantize(dict(flags=Q.MAX_ABS, count=40, src_offset=0, dst_offset=0,
                              seed=77, max_abs=_f32bits(m)), b"")
    emu._op_reset({}, b"")
    fp[:90] = x.view(np.uint32)
    r, _ = emu._op_luq_quantize(dict(flags=Q.MAX_ABS | Q.CONTINUE, count=50, src_offset=40,
                                     dst_offset=40, seed=0, max_abs=_f32bits(m)), b"")
    assert r["alpha"] == _f32bits(full.alpha)
    got = emu.buffers[B["luq.a"].id][40:90]
    assert np.array_equal(got, full.codes[0, 40:])
    # 7 elements (not whole beats of 4 lanes): the next chunk starts on a new beat
    emu._op_luq_quantize(dict(flags=0, count=7, src_offset=0, dst_offset=0, seed=3,
                              max_abs=0), b"")
    emu._op_luq_quantize(dict(flags=Q.CONTINUE, count=9, src_offset=0, dst_offset=0,
                              seed=0, max_abs=0), b"")
    pad = np.concatenate([x[:7], np.zeros(1, np.float32), x[:9]])
    ref = luq_quantize(pad, P.luq_format(CFG, seed=3), max_abs=float(np.abs(x[:9]).max()))
    assert np.array_equal(emu.buffers[B["luq.a"].id][:9], ref.codes[0, 8:])


def _edge_gemms(rng):
    """(name, a codes (S, M, K) uint8, alpha bits, b BFPTensor, flags)."""
    fmt = CFG.formats[0]
    out = []
    M, K, N = 2, T + 3, T + 2                  # 2 x 2 blocks, padding along K and N
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[:, 0] *= 2.0**20                         # K blocks with different exponents
    b = h.quantize(w, fmt)
    c = rng.integers(0, 16, (2, M, K)).astype(np.uint8)
    out.append(("random S2", c, _f32bits(1.5e-3), b, 0))
    # an invalid block (NaN column block) and the smallest normal alpha (products
    # below 2**-126 flushed)
    wi = w.copy()
    wi[0, T] = np.nan
    bi = h.quantize(wi, fmt, nonfinite="flag")
    out.append(("invalid block, smallest normal alpha", c[:1], 0x00800000, bi, 0))
    m, k, n = 2, 3, 3                          # one block
    bs = h.quantize(w[:k, 1:n + 1], fmt)
    cs = c[:, :m, :k]
    out.append(("zero codes", np.zeros((1, m, k), np.uint8), _f32bits(0.25), bs, 0))
    out.append(("A_INVALID", cs[:1], _f32bits(0.25), bs, int(P.LuqGemmFlag.A_INVALID)))
    top = np.full((4, m, k), 7, np.uint8)
    top[1::2] |= 8                                           # +-alpha*64, cancelling
    top[:, 0, :2] = 15
    # max exponent codes: every block at the top valid code -> overflow to Inf
    big = h.quantize(np.full((k, n), 1.0e38, np.float32), fmt)
    out.append(("max exponents, alpha big", top, _f32bits(3.0e38), big, 0))
    out.append(("max exponents, alpha 0 (Inf * 0)", np.full((1, m, k), 7, np.uint8), 0,
                big, 0))
    # v = 2**E, alpha = (2 - 2**-23) * 2**(-127 - E): the product rounds up to 2**-126
    one = h.quantize(np.full((1, 1), 0.5, np.float32), fmt)          # 64 * 2**-7
    for ab in (0x00FFFFFF, 0x00FFFFFE, 0x01000000):
        out.append((f"underflow edge {ab:#x}", np.ones((1, 1, 1), np.uint8), ab, one, 0))
    # HBFP4 slot
    b4 = h.quantize(w[:5, 1:4], CFG.formats[1])
    out.append(("hbfp4 S16", rng.integers(0, 16, (16, 1, 5)).astype(np.uint8),
                _f32bits(7e-5), b4, 0))
    return out


@pytest.fixture(scope="module")
def sim_pair():
    return Emulator(CFG), SimTransport(CFG)


def _check(emu, sim, frames):
    for fr in frames:
        sim.write(fr)
        e, s = emu.feed(fr), sim.read(0.0)
        assert e and s == e, f"request {fr[:12].hex()}: sim {s[:48].hex()} != emu {e[:48].hex()}"


#: edge cases of the default run (the others run with -m sweep)
DEFAULT_EDGES = ("random S2", "zero codes", "max exponents, alpha 0 (Inf * 0)",
                 "underflow edge 0xffffff")


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.sweep)])
def test_top_luq_gemm_frames_identical(sim_pair, full):
    emu, sim = sim_pair
    rng = np.random.default_rng(11)
    frames, seq = [], 1
    for name, codes, ab, b, flags in _edge_gemms(rng):
        if not full and name not in DEFAULT_EDGES:
            continue
        S, M, K = codes.shape
        N = b.shape[1]
        slot = 1 if b.fmt.man_bits == 4 else 0
        bc, bm = b.stream()
        frames += [_req(P.Op.WRITE, seq, bm.reshape(-1).astype("i1").tobytes(),
                        buffer=B["op1.man"].id, offset=0),
                   _req(P.Op.WRITE, seq + 1, bc.astype("u1").tobytes(),
                        buffer=B["op1.exp"].id, offset=0),
                   _req(P.Op.WRITE, seq + 2, codes.reshape(-1).tobytes(),
                        buffer=B["luq.a"].id, offset=3),
                   _req(P.Op.LUQ_GEMM, seq + 3, flags=flags, b=1, slot_b=slot, samples=S,
                        rows=M, k=K, cols=N, alpha=ab, a_offset=3, out_offset=1),
                   _req(P.Op.READ, seq + 4, buffer=B["out"].id, offset=0, count=M * N + 2)]
        seq += 5
        _check(emu, sim, frames)
        frames = []
        y = emu.buffers[B["out"].id][1:1 + M * N].view(np.float32).reshape(M, N)
        a = h.luq.LUQTensor(P.luq_format(CFG, samples=S), (M, K), codes & 15,
                            float(np.array([ab], np.uint32).view(np.float32)[0]), 0.0,
                            invalid=bool(flags))
        want = luq_matmul(a, b)
        assert np.array_equal(y.view(np.uint32), want.view(np.uint32)), name
        if name.startswith("underflow edge 0xffffff"):
            assert y[0, 0] == 2.0**-126, name
        if name.startswith("underflow edge 0xfffffe"):
            assert y[0, 0] == 0.0, name
    # every error, in the emulator's order
    good = dict(flags=0, b=1, slot_b=0, samples=1, rows=2, k=T + 3, cols=T + 2,
                alpha=_f32bits(0.5), a_offset=0, out_offset=0)
    for f in ({**good, "flags": 2}, {**good, "b": 3}, {**good, "slot_b": 2},
              {**good, "samples": 3}, {**good, "samples": 32}, {**good, "rows": 0},
              {**good, "k": 0}, {**good, "cols": 0}, {**good, "k": CFG.k_max + 1},
              {**good, "alpha": 0x80800000}, {**good, "alpha": 0x7F800000},
              {**good, "alpha": 0x00000001}, {**good, "k": 129, "cols": 70},
              {**good, "a_offset": B["luq.a"].depth - 5},
              {**good, "out_offset": 2**32 - 1}):
        frames.append(_req(P.Op.LUQ_GEMM, seq, **f))
        seq += 1
    frames.append(_req(P.Op.WRITE, seq, np.array([127, -128], "i1").tobytes(),
                       buffer=B["op1.man"].id, offset=5))        # HBFP8 mmax is 127
    frames.append(_req(P.Op.LUQ_GEMM, seq + 1, **good))
    frames.append(_req(P.Op.WRITE, seq + 2, np.array([0], "i1").tobytes(),
                       buffer=B["op1.man"].id, offset=6))
    frames.append(_req(P.Op.WRITE, seq + 3, np.array([255], "u1").tobytes(),
                       buffer=B["op1.exp"].id, offset=1))         # above the invalid code
    frames.append(_req(P.Op.LUQ_GEMM, seq + 4, **good))
    frames.append(P.encode_frame(seq + 5, P.Op.LUQ_GEMM, b"\0" * 5))    # bad length
    _check(emu, sim, frames)


def test_top_luq_quantize_frames_identical(sim_pair):
    emu, sim = sim_pair
    rng = np.random.default_rng(12)
    Q = P.LuqQuantizeFlag
    x = (rng.standard_normal(40) * 1e-3).astype(np.float32)
    x[3], x[4], x[10] = 0.0, 2.0**-130, -x[10]
    x[20] = 0.0254 * 64                          # far above the max_abs below: saturates
    seq = 1
    frames = [_req(P.Op.WRITE, seq, x.view("<u4").tobytes(), buffer=B["fp_in"].id, offset=0),
              _req(P.Op.WRITE, seq + 1, np.array([-np.inf], "<f4").tobytes(),
                   buffer=B["fp_in"].id, offset=100)]
    seq += 2
    reqs = [dict(flags=0, count=37, src_offset=0, dst_offset=100, seed=5, max_abs=0),
            dict(flags=Q.MAX_ABS, count=40, src_offset=0, dst_offset=0, seed=6,
                 max_abs=_f32bits(0.0254)),
            dict(flags=Q.MAX_ABS | Q.CONTINUE, count=9, src_offset=3, dst_offset=64, seed=0,
                 max_abs=0x037FFFFF),             # alpha rounds up to 2**-126
            dict(flags=Q.MAX_ABS, count=8, src_offset=0, dst_offset=80, seed=1,
                 max_abs=0x03800000 - 2),         # alpha below 2**-126: all zero codes
            dict(flags=Q.CONTINUE, count=5, src_offset=7, dst_offset=90, seed=0, max_abs=0),
            dict(flags=0, count=20, src_offset=90, dst_offset=0, seed=2, max_abs=0),  # -Inf
            dict(flags=4, count=4, src_offset=0, dst_offset=0, seed=2, max_abs=0),
            dict(flags=0, count=0, src_offset=0, dst_offset=0, seed=2, max_abs=0),
            dict(flags=Q.MAX_ABS, count=4, src_offset=0, dst_offset=0, seed=2,
                 max_abs=0xBF800000),
            dict(flags=Q.MAX_ABS, count=4, src_offset=0, dst_offset=0, seed=2,
                 max_abs=0x7FC00000),
            dict(flags=0, count=4, src_offset=B["fp_in"].depth - 3, dst_offset=0, seed=2,
                 max_abs=0),
            dict(flags=0, count=4, src_offset=0, dst_offset=B["luq.a"].depth - 3, seed=2,
                 max_abs=0)]
    for f in reqs:
        frames.append(_req(P.Op.LUQ_QUANTIZE, seq, **f))
        seq += 1
    frames.append(P.encode_frame(seq, P.Op.LUQ_QUANTIZE, b"\0" * 4))
    frames.append(_req(P.Op.READ, seq + 1, buffer=B["luq.a"].id, offset=0, count=140))
    _check(emu, sim, frames)
    # the first command's codes and answer are the golden model's
    ref = luq_quantize(x[:37], P.luq_format(CFG, seed=5))
    e2 = Emulator(CFG)
    e2.buffers[B["fp_in"].id][:40] = x.view(np.uint32)
    r, _ = e2._op_luq_quantize(reqs[0], b"")
    assert np.array_equal(e2.buffers[B["luq.a"].id][100:137], ref.codes[0])
    assert r == {"alpha": _f32bits(ref.alpha), "max_abs": _f32bits(ref.max_abs),
                 "saturated": 0}
    r, _ = e2._op_luq_quantize(reqs[1], b"")
    ref = luq_quantize(x, P.luq_format(CFG, seed=6), max_abs=float(np.float32(0.0254)))
    assert r["saturated"] == ref.saturated >= 1


def test_luq_unsupported_without_engine():
    emu = Emulator(SIM_CONFIG)
    for op in (P.Op.LUQ_GEMM, P.Op.LUQ_QUANTIZE):
        fr = _req(op, 1, **{f.name: 0 for f in P.REQUESTS[op].fields})
        ans = emu.feed(fr)
        _, _, payload = P.decode_frame(ans)
        err = P.ERROR_LAYOUT.unpack(P.split_answer(payload)[1])[0]
        assert err["code"] == P.ErrorCode.UNSUPPORTED and err["detail"] == 0
    with D.open("emulate://", config=SIM_CONFIG) as dev:
        a = luq_quantize(np.ones((2, 8), np.float32), P.luq_format(SIM_CONFIG))
        with pytest.raises(D.DeviceError, match="UNSUPPORTED"):
            dev.luq_matmul(a, h.quantize(np.ones((8, 8), np.float32), SIM_CONFIG.formats[0]))
        with pytest.raises(D.DeviceError, match="UNSUPPORTED"):
            dev.luq_quantize(np.ones(4, np.float32))


@pytest.mark.parametrize("lanes", [4, pytest.param(1, marks=pytest.mark.sweep)])
def test_luq_engine_standalone(seed, lanes):
    from hbfp_hw.sim.engine_bench import BufferModel, check_answers, run_amaranth, standalone
    from hbfp_hw.sim.engine_scripts import SCRIPTS
    cfg = SIM_CONFIG.replace(luq_lanes=lanes)
    rng = np.random.default_rng(seed)
    eng, info, specs = standalone(cfg, "luq")
    script = SCRIPTS["luq"](cfg, info, rng, n=4)
    res = run_amaranth(eng, BufferModel(specs, cfg.tile, info), script, rng,
                       p_valid=float(rng.uniform(0.3, 1)), p_ready=float(rng.uniform(0.3, 1)))
    check_answers(script, res["answers"], res["checks"])
    ok = [a for a in script.answers if a[1] == P.Op.LUQ_GEMM | P.RESPONSE_FLAG]
    assert ok, "no LUQ_GEMM computed"


def _device_case(dev, rng, M, K, N, samples):
    g = (rng.standard_normal((M, K)) * 1e-3).astype(np.float32)
    g[0, :3] = 0.0
    for S in samples:
        fmt = P.luq_format(dev.config, samples=S, seed=int(rng.integers(0, 2**32)))
        q = dev.luq_quantize(g, fmt)
        ref = luq_quantize(g, fmt)
        assert q.equal(ref) and (q.max_abs, q.saturated) == (ref.max_abs, ref.saturated)
        hs = 0.5 * float(np.abs(g).max())
        q = dev.luq_quantize(g, fmt, max_abs=hs)
        ref = luq_quantize(g, fmt, max_abs=hs)
        assert q.equal(ref) and (q.max_abs, q.saturated) == (ref.max_abs, ref.saturated)
        assert ref.saturated > 0
        for slot in (0, 1):
            w = (rng.standard_normal((K, N)) * np.exp2(rng.integers(-8, 8, (K, 1)))
                 ).astype(np.float32)
            b = h.quantize(w, dev.config.formats[slot])
            for a in (ref, luq_quantize(g.T.copy(), fmt).T):       # dX-style and dW-style
                y = dev.luq_matmul(a, b)
                assert np.array_equal(y.view(np.uint32), luq_matmul(a, b).view(np.uint32))


def test_device_luq_emulate():
    """emulate://: sizes split over several commands (rows, column blocks, quantize
    chunks with CONTINUE), SMP samples, both slots; NaN handling as the golden model."""
    rng = np.random.default_rng(21)
    with D.open("emulate://", config=CFG) as dev:
        _device_case(dev, rng, 40, 100, 150, (1, 4))
        x = rng.standard_normal(3000).astype(np.float32)            # > fp_in: 12 chunks
        fmt = P.luq_format(CFG, samples=2, seed=8)
        q = dev.luq_quantize(x, fmt)
        ref = luq_quantize(x, fmt)
        assert q.equal(ref) and q.max_abs == ref.max_abs
        x[7] = np.nan
        with pytest.raises(ValueError, match=r"holds nan at index \(7,\)"):
            dev.luq_quantize(x, fmt)
        assert dev.luq_quantize(x, fmt, nonfinite="flag").invalid
        with pytest.raises(ValueError, match=r"fmt.lanes=1; the device's LUQ quantizer"):
            dev.luq_quantize(x, P.luq_format(CFG).replace(lanes=1))
        a = luq_quantize(np.ones((2, 300), np.float32), fmt)
        with pytest.raises(ValueError, match=r"K=300 is too long"):
            dev.luq_matmul(a, h.quantize(np.ones((300, 8), np.float32), CFG.formats[0]))


@pytest.mark.sweep
def test_device_luq_sim():
    """sim://: the same Device calls on the simulated RTL (opening the device alone takes
    tens of seconds on a loaded machine: behind the sweep marker, as the next test; the
    frame-level tests compare the same commands with the emulator in the default run)."""
    rng = np.random.default_rng(22)
    with D.open("sim://", config=CFG) as dev:
        _device_case(dev, rng, 3, 2 * T + 1, T + 3, (1, 2))


@pytest.mark.sweep
def test_device_luq_sim_transport(sim_pair):
    """Device.luq_quantize / luq_matmul on the simulated RTL (the module's SimTransport,
    opened as a Device) bit-identical to the golden model."""
    _, sim = sim_pair
    dev = D.Device(sim, expected_config=CFG)
    rng = np.random.default_rng(23)
    g = (rng.standard_normal((3, 2 * T + 1)) * 1e-3).astype(np.float32)
    fmt = P.luq_format(CFG, samples=2, seed=99)
    q = dev.luq_quantize(g, fmt)
    ref = luq_quantize(g, fmt)
    assert q.equal(ref) and (q.max_abs, q.saturated) == (ref.max_abs, ref.saturated)
    b = h.quantize(rng.standard_normal((2 * T + 1, T + 3)).astype(np.float32), CFG.formats[0])
    y = dev.luq_matmul(q, b)
    assert np.array_equal(y.view(np.uint32), luq_matmul(ref, b).view(np.uint32))
    assert math.isfinite(float(np.abs(y).max()))


def test_docs_on_the_device_example_runs():
    """The example of docs/luq.md, "On the device", runs and its assertions hold."""
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "luq.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", src, re.S) if "luq_lanes" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/luq.md", "exec"), {})


@pytest.mark.sweep
def test_luq_engine_verilator(tmp_path, seed):
    """The engine with ``luq_lanes=4`` as Verilog under cocotb (Verilator), driven by the
    ``luq`` script of sim/engine_scripts.py (as tests/test_engines_cocotb.py does for the
    default configuration, where the engine only answers UNSUPPORTED)."""
    from pathlib import Path

    from hbfp_hw.sim.engine_bench import generate_engine
    from hbfp_hw.sim.runner import quick_cxx, run_cocotb
    sim_dir = Path(__file__).resolve().parents[1] / "sim"
    vpath, mpath, top = generate_engine(SIM_CONFIG.replace(luq_lanes=4), "luq",
                                        tmp_path / "gen")
    with quick_cxx():
        run_cocotb(verilog_sources=[vpath], toplevel=top, test_module="tb_engine",
                   build_dir=tmp_path / "build", simulator="verilator",
                   python_paths=[sim_dir],
                   extra_env={"HBFP_MANIFEST": str(mpath), "HBFP_ENGINE_SEED": str(seed)},
                   seed=seed)
