"""MLS on the accelerator (MLS_GEMM, MLS_QUANTIZE): the emulator against an independent
exact reference and the golden quantizer, the top over sim:// against the emulator frame
by frame, and Device.mls_matmul / Device.mls_quantize (emulate:// and sim://) against
hbfp_hw.mls.mls_matmul / hbfp_hw.quantize. The engine on its own: the ``mls`` script of
sim/engine_scripts.py with mls_lanes = 4 in Amaranth's simulator (default suite) and as
Verilog under Verilator (sweep). sim:// Device tests open the device through the
simulated top (INFO alone is ~20 s), so they are in the sweep; the default suite's RTL
check is the frame-level test."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host import device as D
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.mls import MLS_E2M1, MLS_E2M4, MLSFormat, mls_matmul

#: SIM_CONFIG with one format slot, no bit-serial engine and the MLS engine (4 lanes)
CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], bitlayer_lanes=0, mls_lanes=4,
                         name="hbfp_sim_mls")
B = {s.name: s for s in P.buffer_map(CFG)}
FMT = P.mls_format(CFG)


def _fp32_exact(v: Fraction) -> np.float32:
    """Round an exact rational to FP32 as docs/mls.md states it: nearest even to 24
    significant bits, then below 2**-126 a zero with the sign, 2**128 and above Inf
    (scalar Fractions; independent of hbfp_hw.mls.round_to_fp32)."""
    if v == 0:
        return np.float32(0.0)
    s = -1.0 if v < 0 else 1.0
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    q = a / Fraction(2) ** (e - 23)                   # in [2**23, 2**24)
    n = q.numerator // q.denominator
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    r = Fraction(n) * Fraction(2) ** (e - 23)
    if r < Fraction(2) ** -126:
        return np.float32(s * 0.0)
    if r >= Fraction(2) ** 128:
        return np.float32(s * np.inf)
    return np.float32(s * float(r))                  # exact: 24 bits, normal range


def _value(code: int, g: int, t: int, fmt: MLSFormat) -> Fraction:
    """An element's exact value from the bit fields of docs/mls.md."""
    M, E = fmt.man_bits, fmt.exp_bits
    sign = (code >> (E + M)) & 1
    ec, m = (code >> M) & ((1 << E) - 1), code & ((1 << M) - 1)
    e = Fraction(m, 1 << M) if ec == 0 else (1 + Fraction(m, 1 << M)) * Fraction(2) ** (ec - 1)
    return (-e if sign else e) * Fraction(2) ** (t - g)


def _req(op, seq, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def _edge_codes(rng, n_words: int) -> np.ndarray:
    """Code words (4 lanes of 8 bits): random codes, the largest element (saturated
    quantizer output) of both signs, zeros, negative zeros and bit 7 set (ignored)."""
    c = rng.integers(0, 256, (n_words, 4), dtype=np.int64)
    c[:4] = 0x3F                                     # +Vmax
    c[4:6] = 0x7F                                    # -Vmax
    c[6:8] = 0x40                                    # -0
    c[8:10] = 0
    return (c << (8 * np.arange(4))).sum(axis=1)


def test_emulator_mls_gemm_matches_exact_reference():
    emu = Emulator(CFG)
    rng = np.random.default_rng(5)
    rows, cols, groups, gw = 3, 4, 3, 2
    K = groups * gw * 4
    wa, wb = _edge_codes(rng, 40), _edge_codes(rng, 40)
    ga = rng.integers(0, 256, 64)                     # low 4 bits used
    ga[:3] = [0, 0, 15]
    gb = rng.integers(0, 16, 64)
    gb[:3] = [0, 15, 0]
    emu.buffers[B["mls.a"].id][:40] = wa
    emu.buffers[B["mls.b"].id][:40] = wb
    emu.buffers[B["mls.ga"].id][:64] = ga
    emu.buffers[B["mls.gb"].id][:64] = gb
    for ta, tb in ((0, 0), (-200, 3), (200, 200), (-200, -200), (120, -130)):
        emu._op_mls_gemm(dict(rows=rows, cols=cols, groups=groups, group_words=gw,
                              exp_a=ta & 0xFFFF, exp_b=tb & 0xFFFF, a_offset=2, b_offset=5,
                              ga_offset=1, gb_offset=7, y_offset=11), b"")
        got = emu.buffers[B["out"].id][11:11 + rows * cols].view(np.float32)
        for i in range(rows):
            for j in range(cols):
                acc = Fraction(0)
                for k in range(K):
                    wda, wdb = int(wa[2 + i * groups * gw + k // 4]), \
                        int(wb[5 + j * groups * gw + k // 4])
                    ca, cb = (wda >> (8 * (k % 4))) & 0x7F, (wdb >> (8 * (k % 4))) & 0x7F
                    acc += (_value(ca, int(ga[1 + i * groups + k // (gw * 4)]) & 15, ta, FMT)
                            * _value(cb, int(gb[7 + j * groups + k // (gw * 4)]) & 15, tb, FMT))
                want = _fp32_exact(acc)
                assert got[i * cols + j].view(np.uint32) == want.view(np.uint32), (ta, tb, i, j)


def test_emulator_mls_quantize_matches_golden():
    emu = Emulator(CFG)
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((5, 37)) * 2.0 ** rng.integers(-8, 8, (5, 37))).astype(np.float32)
    x[0, :16] = 0.0                                   # a zero group
    x[1, 3] = -0.0
    x[2, 5] = np.float32(1e-40)                       # FP32 subnormal: flushed
    emu.buffers[B["fp_in"].id][3:3 + x.size] = x.reshape(-1).view(np.uint32)
    for rounding, seed, dst, t in ((0, 0, 0, None), (1, 77, 1, None), (0, 0, 0, -3),
                                   (1, 5, 1, 4)):
        fmt = FMT.replace(rounding=("nearest_even", "stochastic")[rounding], seed=seed)
        want = fmt.quantize_array(x, tensor_exp=t)
        emu._op_mls_quantize(dict(dst=dst, rows=5, cols=37, src_offset=3,
                                  texp=want.tensor_exp & 0xFFFF, rounding=rounding, seed=seed,
                                  codes_offset=9, g_offset=4), b"")
        side = "ab"[dst]
        words = emu.buffers[B[f"mls.{side}"].id][9:9 + 5 * 3 * 4].astype(np.int64)
        codes = ((words[:, None] >> (8 * np.arange(4))) & 0xFF).reshape(5, 48)
        assert np.array_equal(codes, want.codes)
        assert np.array_equal(emu.buffers[B[f"mls.g{side}"].id][4:19].reshape(5, 3),
                              want.group_shift)
    # a NaN: INVALID_DATA naming the element, nothing written
    x[3, 30] = np.nan
    emu.buffers[B["fp_in"].id][3:3 + x.size] = x.reshape(-1).view(np.uint32)
    f = emu.feed(_req(P.Op.MLS_QUANTIZE, 1, dst=0, rows=5, cols=37, src_offset=3, texp=0,
                      rounding=0, seed=0, codes_offset=0, g_offset=0))
    _, op, pay = P.decode_frame(f)
    assert op == P.ERROR_OPCODE and pay[4:] == P.ERROR_LAYOUT.pack(
        code=P.ErrorCode.INVALID_DATA, opcode=P.Op.MLS_QUANTIZE, detail=3 * 37 + 30)


def test_no_engine_answers_unsupported():
    emu = Emulator(SIM_CONFIG)
    assert P.mls_lanes(SIM_CONFIG) == 0 and "mls.a" not in {s.name for s in emu.specs}
    for op in (P.Op.MLS_GEMM, P.Op.MLS_QUANTIZE):
        f = {fl.name: 0 for fl in P.REQUESTS[op].fields}
        _, code, pay = P.decode_frame(emu.feed(_req(op, 3, **f)))
        assert code == P.ERROR_OPCODE and pay[4] == P.ErrorCode.UNSUPPORTED
    with pytest.raises(ValueError, match=r"mls_lanes=3; accepted values are 0, 1, 2, 4"):
        SIM_CONFIG.replace(mls_lanes=3)


def _frames_gemm(rng, seq):
    wa, wb = _edge_codes(rng, 16), _edge_codes(rng, 16)
    ga, gb = rng.integers(0, 256, 8), rng.integers(0, 16, 8)
    ga[:2], gb[:2] = 15, 0
    frames = [_req(P.Op.WRITE, seq, wa.astype("<u4").tobytes(), buffer=B["mls.a"].id, offset=0),
              _req(P.Op.WRITE, seq + 1, wb.astype("<u4").tobytes(), buffer=B["mls.b"].id,
                   offset=0),
              _req(P.Op.WRITE, seq + 2, ga.astype("u1").tobytes(), buffer=B["mls.ga"].id,
                   offset=0),
              _req(P.Op.WRITE, seq + 3, gb.astype("u1").tobytes(), buffer=B["mls.gb"].id,
                   offset=0)]
    seq += 4
    good = dict(rows=2, cols=3, groups=2, group_words=2, exp_a=(-5) & 0xFFFF, exp_b=7,
                a_offset=1, b_offset=3, ga_offset=0, gb_offset=2, y_offset=4)
    for f in (good, {**good, "group_words": 1, "groups": 3, "exp_a": 200,
                     "exp_b": (-200) & 0xFFFF, "rows": 1},
              {**good, "exp_a": (-200) & 0xFFFF, "exp_b": (-200) & 0xFFFF},   # flushes
              {**good, "exp_a": 200, "exp_b": 200}):                          # Inf
        frames.append(_req(P.Op.MLS_GEMM, seq, **f))
        frames.append(_req(P.Op.READ, seq + 1, buffer=B["out"].id, offset=0, count=12))
        seq += 2
    for f in ({**good, "rows": 0}, {**good, "cols": 0}, {**good, "groups": 0},
              {**good, "group_words": 0}, {**good, "groups": 1025},
              {**good, "exp_a": 201}, {**good, "exp_b": (-201) & 0xFFFF},
              {**good, "a_offset": B["mls.a"].depth - 7},
              {**good, "b_offset": 2**32 - 1}, {**good, "ga_offset": B["mls.ga"].depth},
              {**good, "gb_offset": B["mls.gb"].depth - 5},
              {**good, "y_offset": CFG.output_depth - 5}):
        frames.append(_req(P.Op.MLS_GEMM, seq, **f))                 # errors
        seq += 1
    return frames, seq


def _frames_quantize(rng, seq):
    x = (rng.standard_normal(40) * 2.0 ** rng.integers(-6, 6, 40)).astype(np.float32)
    x[:8] = 0.0
    x[20] = np.float32(3e38)
    frames = [_req(P.Op.WRITE, seq, x.view("<u4").tobytes(), buffer=B["fp_in"].id, offset=0)]
    seq += 1
    good = dict(dst=0, rows=2, cols=19, src_offset=1, texp=(-2) & 0xFFFF, rounding=0, seed=9,
                codes_offset=3, g_offset=5)
    for f in (good, {**good, "dst": 1, "rounding": 1, "texp": 126},
              {**good, "rounding": 1, "seed": 12345, "rows": 1, "cols": 33}):
        frames.append(_req(P.Op.MLS_QUANTIZE, seq, **f))
        side = "ab"[f["dst"]]
        frames.append(_req(P.Op.READ, seq + 1, buffer=B[f"mls.{side}"].id, offset=0, count=16))
        frames.append(_req(P.Op.READ, seq + 2, buffer=B[f"mls.g{side}"].id, offset=0, count=12))
        seq += 3
    for f in ({**good, "dst": 2}, {**good, "rows": 0}, {**good, "cols": 0},
              {**good, "texp": 201}, {**good, "rounding": 2},
              {**good, "src_offset": CFG.input_depth - 10},
              {**good, "codes_offset": B["mls.a"].depth - 3},
              {**good, "g_offset": B["mls.ga"].depth - 1}):
        frames.append(_req(P.Op.MLS_QUANTIZE, seq, **f))             # errors
        seq += 1
    bad = x.copy()
    bad[25] = np.inf
    frames.append(_req(P.Op.WRITE, seq, bad.view("<u4").tobytes(), buffer=B["fp_in"].id,
                       offset=0))
    frames.append(_req(P.Op.MLS_QUANTIZE, seq + 1, **good))       # Inf: INVALID_DATA 24
    return frames, seq + 2


def test_top_mls_frames_identical():
    emu, sim = Emulator(CFG), SimTransport(CFG)
    rng = np.random.default_rng(11)
    frames, seq = _frames_gemm(rng, 1)
    more, seq = _frames_quantize(rng, seq)
    frames += more
    frames.append(P.encode_frame(seq, P.Op.MLS_GEMM, b"\0" * 3))         # bad length
    for fr in frames:
        sim.write(fr)
        e, s = emu.feed(fr), sim.read(0.0)
        assert e and s == e, f"request {fr[:12].hex()}: sim {s[:40].hex()} != emu {e[:40].hex()}"
    assert emu.counters["MLS_GEMM"] >= 4 and emu.counters["MLS_QUANTIZE"] >= 3


def _operands(rng, fa, fb, M, K, N):
    x = (rng.standard_normal((M, K)) * 2.0 ** rng.integers(-4, 4, (M, K))).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 2.0 ** rng.integers(-4, 4, (K, N))).astype(np.float32)
    x[0, :fa.group_size] = 0.0                       # a zero group (g = gmax)
    w[:, 0] = 1e30                                   # saturated column: maximum exponents
    return h.quantize(x, fa), h.quantize(w, fb.transposed())


def _check_device(dev, url):
    rng = np.random.default_rng(21)
    fmt = P.mls_format(dev.config)
    if url == "emulate://":     # M, N tiled over several commands, E2M1 / 3-bit shifts
        cases = [(MLS_E2M4, MLS_E2M4, 37, 96, 41),
                 (MLS_E2M1, MLS_E2M4.replace(group_bits=3), 9, 40, 30),
                 (MLS_E2M4.replace(group_size=6), MLS_E2M1.replace(group_size=6), 5, 30, 20)]
        qshapes = [(30, 50), (4, 50)]
    else:
        cases = [(MLS_E2M4, MLS_E2M4, 3, 32, 2), (MLS_E2M1.replace(group_size=6),
                                                  MLS_E2M4.replace(group_size=6), 2, 12, 3)]
        qshapes = [(2, 20)]
    for fa, fb, M, K, N in cases:
        a, b = _operands(rng, fa, fb, M, K, N)
        y = dev.mls_matmul(a, b)
        assert y.dtype == np.float32
        assert np.array_equal(y.view(np.uint32), mls_matmul(a, b).view(np.uint32)), (fa, fb)
    # tensor exponents at the range ends: underflow to signed zeros, overflow to Inf
    a, b = _operands(rng, MLS_E2M4, MLS_E2M4, 2, 16, 2)
    for ta, tb in ((-200, -200), (200, 200)):
        a2 = type(a)(a.fmt, a.shape, ta, a.group_shift, a.codes)
        b2 = type(b)(b.fmt, b.shape, tb, b.group_shift, b.codes)
        y = dev.mls_matmul(a2, b2)
        assert np.array_equal(y.view(np.uint32), mls_matmul(a2, b2).view(np.uint32))
    for shape in qshapes:
        x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-9, 9, shape)).astype(np.float32)
        x[0, :3] = [0.0, -0.0, 1e-40]
        for f in (fmt, fmt.replace(rounding="stochastic", seed=1234), fmt.transposed()):
            if f.rounding == "stochastic" and x.size > dev.config.input_depth:
                continue
            q = dev.mls_quantize(x, f)
            assert q.equal(h.quantize(x, f)) and q.fmt == f
        q = dev.mls_quantize(x, tensor_exp=-3)                      # static exponent
        assert q.equal(fmt.quantize_array(x, tensor_exp=-3))
    with pytest.raises(ValueError, match=r"holds nan at index \(0, 1\)"):
        dev.mls_quantize(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match=r"fmt.group_size=8; the device quantizes"):
        dev.mls_quantize(x, fmt.replace(group_size=8))
    with pytest.raises(ValueError, match=r"a.fmt.exp_bits=3 exceeds the device's exp_bits=2"):
        dev.mls_matmul(*_operands(rng, MLSFormat(exp_bits=3), MLS_E2M4, 2, 16, 2))


def test_device_mls_matmul_and_quantize_emulate():
    dev = D.open("emulate://", config=CFG)
    try:
        _check_device(dev, "emulate://")
        assert dev.transport.device.counters["MLS_GEMM"] >= 12
    finally:
        dev.close()


@pytest.mark.sweep
def test_device_mls_sim_small():
    """sim://: one GEMM with a zero group and a saturated column, one quantization.
    (Opening a sim:// device reads INFO through the simulated top, ~20 s: too long for
    the default suite, whose RTL check is the frame-level test above.)"""
    dev = D.open("sim://", config=CFG)
    try:
        a, b = _operands(np.random.default_rng(2), MLS_E2M4, MLS_E2M4, 2, 16, 2)
        y = dev.mls_matmul(a, b)
        assert np.array_equal(y.view(np.uint32), mls_matmul(a, b).view(np.uint32))
        x = np.random.default_rng(3).standard_normal((1, 20)).astype(np.float32)
        x[0, :2] = [-0.0, 1e-40]
        assert dev.mls_quantize(x).equal(h.quantize(x, FMT))
    finally:
        dev.close()


@pytest.mark.sweep
def test_device_mls_sim_sweep():
    """sim://: every case of the emulate:// test that fits the simulator's time."""
    dev = D.open("sim://", config=CFG)
    try:
        _check_device(dev, "sim://")
    finally:
        dev.close()


def test_device_without_engine_raises_unsupported():
    dev = D.open("emulate://", config=SIM_CONFIG)
    try:
        a, b = _operands(np.random.default_rng(0), MLS_E2M4, MLS_E2M4, 2, 16, 2)
        with pytest.raises(D.DeviceError, match="UNSUPPORTED"):
            dev.mls_matmul(a, b)
        with pytest.raises(D.DeviceError, match="UNSUPPORTED"):
            dev.mls_quantize(np.ones((2, 16), np.float32))
    finally:
        dev.close()


def test_mls_engine_standalone(seed):
    """The engine alone (Amaranth simulator, random command gaps and status
    back-pressure) against the emulator: every answer and buffer."""
    from hbfp_hw.sim.engine_bench import BufferModel, check_answers, run_amaranth, standalone
    from hbfp_hw.sim.engine_scripts import SCRIPTS
    rng = np.random.default_rng(seed)
    eng, info, specs = standalone(CFG, "mls")
    script = SCRIPTS["mls"](CFG, info, rng, n=6)
    res = run_amaranth(eng, BufferModel(specs, CFG.tile, info), script, rng,
                       p_valid=float(rng.uniform(0.3, 1)), p_ready=float(rng.uniform(0.3, 1)))
    check_answers(script, res["answers"], res["checks"])
    ok = [a for a in script.answers if a[1] in (P.Op.MLS_GEMM | P.RESPONSE_FLAG,
                                                P.Op.MLS_QUANTIZE | P.RESPONSE_FLAG)]
    assert len(ok) >= 6, "too few MLS commands were computed to compare"


def test_fp32_convert_flush_after_round_matches_round_to_fp32():
    """The converter of the engine (``Fp32Convert(flush_after_round=True)``) against
    :func:`hbfp_hw.mls.round_to_fp32` at the flush boundary (values just below 2**-126
    that round up to it, negative results flushing to -0.0), the overflow boundary and
    random 57-bit accumulators."""
    from amaranth.sim import Simulator

    from hbfp_hw.gateware.fp32_convert import Fp32Convert
    from hbfp_hw.mls import round_to_fp32
    rng = np.random.default_rng(8)
    cases = []
    for acc in (2**25 - 1, 2**24 - 1, 2**25 - 2, 2**25 + 1, 2**24, 1, 3, 0):
        for sign in (1, -1):
            for sc in (-150, -151, -149, -174, 104 - 1, 104, 103):
                cases.append((sign * acc, sc))
    for _ in range(60):
        acc = int(rng.integers(-2**56, 2**56)) >> int(rng.integers(0, 56))
        cases.append((acc, int(rng.integers(-240, 120))))
    dut = Fp32Convert(acc_bits=57, flush_after_round=True)
    got = []

    async def bench(ctx):
        for acc, sc in cases + [(0, 0)] * 6:
            ctx.set(dut.i_valid, 1)
            ctx.set(dut.acc, acc)
            ctx.set(dut.scale, sc)
            await ctx.tick()
            if ctx.get(dut.o_valid):
                got.append(ctx.get(dut.bits))
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    want = [int(round_to_fp32(np.array([a], np.int64), s).view(np.uint32)[0])
            for a, s in cases]
    assert got[:len(cases)] == want
    assert 0x80000000 in want and 0x00800000 in want and 0x7F800000 in want


def test_docs_on_the_device_example(capsys):
    """docs/mls.md's "On the device" example runs and prints what the page shows."""
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "mls.md").read_text()
    sec = src.split("## On the device", 1)[1]
    code = re.findall(r"```python\n(.*?)```", sec, re.S)[0]
    shown = re.search(r"prints `(.*?)`", sec).group(1)
    exec(compile(code, "docs/mls.md", "exec"), {})
    assert capsys.readouterr().out.strip() == shown


@pytest.mark.sweep
def test_mls_engine_verilator(tmp_path, seed):
    """The engine with mls_lanes = 4 as Verilog under cocotb (Verilator), the ``mls``
    script against the emulator (``sim/tb_engine.py``)."""
    from pathlib import Path

    from hbfp_hw.sim.engine_bench import generate_engine
    from hbfp_hw.sim.runner import quick_cxx, run_cocotb
    vpath, mpath, top = generate_engine(CFG, "mls", tmp_path / "gen")
    with quick_cxx():
        run_cocotb(verilog_sources=[vpath], toplevel=top, test_module="tb_engine",
                   build_dir=tmp_path / "build", simulator="verilator",
                   python_paths=[Path(__file__).resolve().parents[1] / "sim"],
                   extra_env={"HBFP_MANIFEST": str(mpath), "HBFP_ENGINE_SEED": str(seed)},
                   seed=seed)
