"""Random command scripts for each engine of the accelerator top (see ``engine_bench``).

Each builder returns a :class:`~hbfp_hw.sim.engine_bench.Script`: the commands of its
engine with random fields (valid ones and the errors the engine checks), the emulator's
answer to each, and buffer checks. State other engines would have made (FP32 inputs,
quantized operands) is prepared on the emulator and loaded into the buffer model between
commands. Only what the generated RTL computes is asked (``gemm_slots``, the rounding
modes each slot's quantizer builds, no ``ACCUMULATE`` on 1-D block slots); the rest is
covered by the top-level tests of ``UNSUPPORTED``.
"""

from __future__ import annotations

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.gateware.top import mx_slots, quant_rounding, tile_slots

from .engine_bench import Script, prepared_emulator

__all__ = ["SCRIPTS", "fp32_tensor", "buffer_io_script", "stats_script", "quantize_script",
           "gemm_script", "bitlayer_script"]

G, Q, S = P.GemmFlag, P.QuantizeFlag, P.StatsFlag


def fp32_tensor(rng: np.random.Generator, n: int, specials: bool = True) -> np.ndarray:
    """``n`` FP32 values: random magnitudes, a zero run, subnormals, maybe NaN/Inf."""
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    if n > 8:
        k = int(rng.integers(0, n - 8))
        x[k:k + int(rng.integers(1, 8))] = 0.0
        x[rng.integers(0, n, 2)] = (rng.standard_normal(2) * 2.0**-130).astype(np.float32)
    if specials and n and rng.random() < 0.5:
        x[int(rng.integers(0, n))] = rng.choice([np.nan, np.inf, -np.inf])
    return x


def _spec(specs, name: str) -> P.BufferSpec:
    return next(s for s in specs if s.name == name)


def _start(cfg, rom: bytes, rng) -> Script:
    sc = Script(prepared_emulator(cfg, rom))
    fp = _spec(sc.emu.specs, "fp_in")
    x = fp32_tensor(rng, fp.depth)
    for lo in range(0, fp.depth, P.MAX_DATA // 4):
        sc.emulate(P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
            x[lo: lo + P.MAX_DATA // 4].tobytes(), buffer=fp.id, offset=lo))
    return sc


def buffer_io_script(cfg, rom: bytes, rng, n: int = 24) -> Script:
    """WRITE / READ / INFO / SESSION with random buffers, offsets, lengths and tokens
    (some out of range or of a bad length), then RESET and reads of the cleared
    buffers."""
    sc = _start(cfg, rom, rng)
    specs = sc.emu.specs
    for s in specs:                                   # random contents everywhere
        if s.writable:
            raw = rng.integers(0, 256, s.size_bytes, dtype=np.uint8).tobytes()
            step = P.MAX_DATA // s.wire_bytes
            for lo in range(0, s.depth, step):
                sc.emulate(P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
                    raw[lo * s.wire_bytes: (lo + step) * s.wire_bytes], buffer=s.id,
                    offset=lo))
    sc.load()
    for k in range(n):
        s = specs[int(rng.integers(0, len(specs)))]
        bid = s.id if rng.random() > 0.05 else len(specs) + int(rng.integers(0, 3))
        near_end = rng.random() < 0.2
        off = int(rng.integers(max(0, s.depth - 8), s.depth + 4)) if near_end \
            else int(rng.integers(0, s.depth))
        kind = rng.random()
        if kind < 0.45:
            cnt = int(rng.integers(0, 12))
            data = rng.integers(0, 256, cnt * s.wire_bytes + (rng.random() < 0.1),
                                dtype=np.uint8).tobytes()
            sc.cmd(P.Op.WRITE, data, buffer=bid, offset=off)
        elif kind < 0.8:
            cnt = int(rng.integers(0, 24)) if rng.random() > 0.05 else P.MAX_DATA
            sc.cmd(P.Op.READ, buffer=bid, offset=off, count=cnt)
        elif kind < 0.9:
            sc.cmd(P.Op.SESSION, token=int(rng.integers(0, 2**32)))
        else:
            sc.cmd(P.Op.INFO, offset=int(rng.integers(0, len(rom) + 8)))
        if k % 6 == 5:
            sc.check()
    sc.cmd(P.Op.SESSION, token=int(rng.integers(1, 2**32)))
    sc.cmd(P.Op.RESET)
    for s in specs:
        sc.cmd(P.Op.READ, buffer=s.id, offset=s.depth - 4, count=4)
    sc.finish()
    return sc


def stats_script(cfg, rom: bytes, rng, n: int = 10) -> Script:
    """FP32 samples (specials, signed zeros, subnormals) on both sample inputs between
    READ_STATS with random flags (CLEAR, QUANTIZE_INPUT, an undefined bit)."""
    sc = _start(cfg, rom, rng)
    sc.load()
    for _ in range(n):
        for port in ("gemm_sample", "quant_sample"):
            if rng.random() < 0.7:
                x = fp32_tensor(rng, int(rng.integers(0, 20)))
                if x.size and rng.random() < 0.3:
                    x[0] = -0.0
                sc.samples(port, [int(v) for v in x.view(np.uint32)])
        flags = int(rng.choice([0, S.CLEAR, S.QUANTIZE_INPUT, S.CLEAR | S.QUANTIZE_INPUT,
                                0x80]))
        sc.cmd(P.Op.READ_STATS, flags=flags)
    sc.finish()
    return sc


def quantize_script(cfg, rom: bytes, rng, n: int = 12) -> Script:
    """QUANTIZE on every slot with the rounding modes its quantizer builds, random
    shapes, offsets, flags (RETURN, STATIC_EXP) and exponent codes, and errors (unknown
    slot, bad destination, flags, rounding or static exponent, out of range)."""
    sc = _start(cfg, rom, rng)
    specs = sc.emu.specs
    ops = sorted({s.operand for s in specs if s.operand is not None})
    rounding = quant_rounding(cfg)
    fp = _spec(specs, "fp_in")
    sc.load()
    for k in range(n):
        slot = k % len(cfg.formats)
        fmt = cfg.formats[slot]
        rows, cols = (int(v) for v in rng.integers(1, 17, 2))
        fields = dict(slot=slot, dst=int(rng.choice(ops)),
                      flags=int(rng.choice([0, Q.RETURN, Q.STATIC_EXP,
                                            Q.RETURN | Q.STATIC_EXP])),
                      rows=rows, cols=cols,
                      src_offset=int(rng.integers(0, fp.depth - rows * cols + 1)),
                      rounding=int(rng.choice(rounding[slot])),
                      seed=int(rng.integers(0, 2**32)),
                      exp_code=int(fmt.exp_bias + rng.integers(-12, 12)))
        if rng.random() < 0.25:                       # one bad field
            bad = str(rng.choice(["slot", "dst", "flags", "rounding", "exp_code",
                                  "src_offset"]))
            fields[bad] = {"slot": len(cfg.formats), "dst": 0xEE, "flags": 0x40,
                           "rounding": 9, "exp_code": 0xFFFF,
                           "src_offset": fp.depth - 1}[bad]
            if bad == "exp_code":
                fields["flags"] |= Q.STATIC_EXP
        sc.cmd(P.Op.QUANTIZE, **fields)
        if k % 3 == 2:
            sc.check()
    sc.finish()
    return sc


def gemm_script(cfg, rom: bytes, rng, n: int = 6) -> Script:
    """GEMMs of every computed slot pair (HyperBlock tiles mixed freely, 1-D block slots
    with themselves) in random orientations, shapes and output offsets, with ``STORE``,
    ``ALLOW_INVALID`` and (tile slots) an ``ACCUMULATE`` repeat; errors: shapes that do
    not chain, an unknown slot, undefined flags."""
    sc = _start(cfg, rom, rng)
    specs = sc.emu.specs
    ts, ms = tile_slots(cfg), mx_slots(cfg)
    pairs = [(a, b) for a in ts for b in ts] + [(s, s) for s in ms]
    fp = _spec(specs, "fp_in")
    out = _spec(specs, "out")
    for k in range(n):
        sa, sb = pairs[k % len(pairs)]
        M, K, N = (int(v) for v in rng.integers(1, 17, 3))
        ta, tb = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
        sh_a = (K, M) if ta else (M, K)
        sh_b = (N, K) if tb else (K, N)
        for dst, slot, (r, c) in ((0, sa, sh_a), (1, sb, sh_b)):
            ans = sc.emulate(P.Op.QUANTIZE, P.REQUESTS[P.Op.QUANTIZE].pack(
                slot=slot, dst=dst, flags=0, rows=r, cols=c,
                src_offset=int(rng.integers(0, fp.depth - r * c + 1)), rounding=0,
                seed=0, exp_code=0))
            assert ans[0] == P.Op.QUANTIZE | P.RESPONSE_FLAG, ans
        sc.load()
        flags = int(G.STORE) | (int(G.TRANS_A) if ta else 0) | (int(G.TRANS_B) if tb else 0)
        if rng.random() < 0.5:
            flags |= int(G.ALLOW_INVALID)
        oo = int(rng.integers(0, out.depth - M * N + 1))
        g = dict(a=0, b=1, slot_a=sa, slot_b=sb, a_rows=sh_a[0], a_cols=sh_a[1],
                 b_rows=sh_b[0], b_cols=sh_b[1], out_offset=oo)
        sc.cmd(P.Op.GEMM, flags=flags, **g)
        if sa in ts and sb in ts:
            sc.cmd(P.Op.GEMM, flags=flags | int(G.ACCUMULATE), **g)
        bad = k % 3
        if bad == 0:
            sc.cmd(P.Op.GEMM, flags=flags, **{**g, "b_rows": g["b_rows"] + 1})
        elif bad == 1:
            sc.cmd(P.Op.GEMM, flags=flags, **{**g, "slot_b": len(cfg.formats)})
        else:
            sc.cmd(P.Op.GEMM, flags=flags | 0x80, **g)
        sc.check()
    sc.finish()
    return sc


def bitlayer_script(cfg, rom: bytes, rng, n: int = 10) -> Script:
    """BITLAYER with random weight bit-plane words (bits past ``cols`` set too),
    activations over the whole int16 range (extremes included), random widths, layer
    counts, shapes and offsets; errors: each bad field, each buffer range."""
    sc = Script(prepared_emulator(cfg, rom))
    specs = {s.name: s for s in sc.emu.specs}
    lanes = P.bitlayer_lanes(cfg)
    if not lanes:
        sc.cmd(P.Op.BITLAYER, bits=8, layers=8, rows=1, cols=1, batch=1, w_offset=0,
               x_offset=0, y_offset=0)
        sc.finish()
        return sc
    ws, xs, ys = specs["bl.w"], specs["bl.x"], specs["bl.y"]
    words = rng.integers(0, 1 << lanes, ws.depth, dtype=np.int64)
    words[:8] = (1 << lanes) - 1                       # all-ones planes
    x = rng.integers(-2**15, 2**15, xs.depth, dtype=np.int64)
    x[:4] = [-2**15, 2**15 - 1, -2**15, 2**15 - 1]
    for spec, vals, dt in ((ws, words, f"<u{ws.wire_bytes}"), (xs, x, "<i2")):
        raw = vals.astype(dt).tobytes()
        step = P.MAX_DATA // spec.wire_bytes
        for lo in range(0, spec.depth, step):
            sc.emulate(P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
                raw[lo * spec.wire_bytes: (lo + step) * spec.wire_bytes], buffer=spec.id,
                offset=lo))
    sc.load()
    kmax = P.bitlayer_k_max(cfg)
    for k in range(n):
        bits = int(rng.integers(1, P.BITLAYER_BITS_MAX + 1))
        layers = int(rng.choice([1, bits, int(rng.integers(1, bits + 1))]))
        cols = int(rng.choice([1, lanes, kmax, int(rng.integers(1, kmax + 1))]))
        chunks = -(-cols // lanes)
        cols = min(cols, xs.depth)
        rows = int(rng.integers(1, max(2, min(6, ws.depth // (bits * chunks)) + 1)))
        rows = max(1, min(rows, ws.depth // (bits * chunks)))
        batch = int(rng.integers(1, max(2, min(3, xs.depth // cols, ys.depth // rows) + 1)))
        batch = max(1, min(batch, xs.depth // cols, ys.depth // rows))
        f = dict(bits=bits, layers=layers, rows=rows, cols=cols, batch=batch,
                 w_offset=int(rng.integers(0, ws.depth - rows * bits * chunks + 1)),
                 x_offset=int(rng.integers(0, xs.depth - batch * cols + 1)),
                 y_offset=int(rng.integers(0, ys.depth - batch * rows + 1)))
        sc.cmd(P.Op.BITLAYER, **f)
        if k % 2 == 1:                                 # one bad field
            bad = str(rng.choice(["bits", "layers", "rows", "cols", "batch", "w_offset",
                                  "x_offset", "y_offset"]))
            val = {"bits": int(rng.choice([0, P.BITLAYER_BITS_MAX + 1])),
                   "layers": int(rng.choice([0, bits + 1])), "rows": 0,
                   "cols": int(rng.choice([0, kmax + 1])), "batch": 0,
                   "w_offset": ws.depth - rows * bits * chunks + 1,
                   "x_offset": int(rng.choice([xs.depth - batch * cols + 1, 2**32 - 1])),
                   "y_offset": ys.depth + 5}[bad]
            sc.cmd(P.Op.BITLAYER, **{**f, bad: val})
        sc.check()
    sc.finish()
    return sc


#: Script builder per engine name of :data:`hbfp_hw.gateware.top.ENGINES`.
SCRIPTS = {"buffer_io": buffer_io_script, "stats": stats_script,
           "quantize": quantize_script, "gemm": gemm_script, "bitlayer": bitlayer_script}
