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
           "gemm_script", "bitlayer_script", "sparse_script", "sparse_weight_data",
           "mls_script", "luq_script"]

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
        if rng.random() < 0.7:                   # int32 words, extremes included
            v = rng.integers(-2**31, 2**31, int(rng.integers(0, 12)), dtype=np.int64)
            if v.size and rng.random() < 0.3:
                v[0] = int(rng.choice([-2**31, 2**31 - 1, -1, 0]))
            sc.samples("int_sample", [int(w) & 0xFFFFFFFF for w in v])
        flags = int(rng.choice([0, S.CLEAR, S.QUANTIZE_INPUT, S.CLEAR | S.QUANTIZE_INPUT,
                                S.INT_OUTPUT, S.CLEAR | S.INT_OUTPUT,
                                S.QUANTIZE_INPUT | S.INT_OUTPUT, 0x80]))
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
               x_offset=0, y_offset=0, flags=0)
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
                 y_offset=int(rng.integers(0, ys.depth - batch * rows + 1)),
                 flags=int(rng.integers(0, P.flag_mask(P.BitLayerFlag) + 1)))
        sc.cmd(P.Op.BITLAYER, **f)
        if k % 2 == 1:                                 # one bad field
            bad = str(rng.choice(["bits", "layers", "rows", "cols", "batch", "w_offset",
                                  "x_offset", "y_offset", "flags"]))
            val = {"bits": int(rng.choice([0, P.BITLAYER_BITS_MAX + 1])),
                   "layers": int(rng.choice([0, bits + 1])), "rows": 0,
                   "cols": int(rng.choice([0, kmax + 1])), "batch": 0,
                   "w_offset": ws.depth - rows * bits * chunks + 1,
                   "x_offset": int(rng.choice([xs.depth - batch * cols + 1, 2**32 - 1])),
                   "y_offset": ys.depth + 5,
                   "flags": int(rng.choice([0x04, 0x80, 0xFF]))}[bad]
            sc.cmd(P.Op.BITLAYER, **{**f, bad: val})
        sc.check()
    sc.finish()
    return sc


def sparse_weight_data(cfg, rng, w_rows: int, w_cols: int, slot: int = 0):
    """A compressed transposable weight of ``cfg``'s ``N:M`` in format ``slot`` with
    zero blocks and zero rows, as the three ``sp.*`` arrays ``(man, idx, exp codes)``
    and the :class:`~hbfp_hw.sparsity.SparseBFPWeight`."""
    from hbfp_hw.sparsity import compress
    n, m = P.sparse_nm(cfg)
    fmt = cfg.formats[slot]
    w = (rng.standard_normal((w_rows, w_cols)) * np.exp2(rng.integers(-6, 6))).astype(
        np.float32)
    w[: min(w_rows, cfg.tile), : min(w_cols, cfg.tile)] *= float(rng.choice([0.0, 1.0]))
    w[int(rng.integers(0, w_rows))] = 0.0
    sw = compress(w, fmt, n, m)
    codes = np.where(sw.invalid, fmt.exp_invalid_code,
                     sw.exponents.astype(np.int64) + fmt.exp_bias)
    return sw.mantissas.reshape(-1), sw.indices.reshape(-1), codes.reshape(-1), sw


def sparse_script(cfg, rom: bytes, rng, n: int = 8) -> Script:
    """SPARSE_GEMM forward and transposed with compressed weights (zero blocks, partial
    edge tiles, invalid blocks in X and W, offsets), random shapes; errors: each bad
    field, each buffer range, a non-transposable tile with ``TRANSPOSE``."""
    from hbfp_hw.quantize import quantize
    sc = Script(prepared_emulator(cfg, rom))
    specs = {s.name: s for s in sc.emu.specs}
    if not P.sparse_lanes(cfg):
        sc.cmd(P.Op.SPARSE_GEMM, flags=0, x=0, slot_x=0, slot_w=0, batch=1, w_rows=1,
               w_cols=1, w_offset=0, e_offset=0, out_offset=0)
        sc.finish()
        return sc
    T = cfg.tile
    nn, m = P.sparse_nm(cfg)
    S = nn * m
    slots = [i for i in range(len(cfg.formats)) if cfg.block_2d(i) == (T, T)]

    def put(spec, vals, off=0):
        dt = {(1, True): "i1", (1, False): "u1", (2, True): "<i2", (2, False): "<u2"}[
            (spec.wire_bytes, spec.signed)]
        raw = np.asarray(vals).astype(np.int64).astype(dt).tobytes()
        step = P.MAX_DATA
        for lo in range(0, len(raw), step):
            sc.emulate(P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
                raw[lo: lo + step], buffer=spec.id, offset=off + lo // spec.wire_bytes))

    kcap = min(cfg.k_max, cfg.operand_depth // (T * T) * T, 3 * T)
    for k in range(n):
        trans = k % 2 == 1
        slot_x, slot_w = int(rng.choice(slots)), int(rng.choice(slots))
        K = int(rng.integers(1, kcap + 1))
        Nn = int(rng.integers(1, 3 * T + 1))
        while Nn > 1 and (-(-Nn // T) * -(-K // T) * T * T // S > specs["sp.man"].depth // S
                          or -(-Nn // T) * -(-K // T) > specs["sp.exp"].depth
                          or Nn * 2 * T > specs["out"].depth):
            Nn = max(1, Nn - T)
        w_rows, w_cols = (K, Nn) if trans else (Nn, K)
        batch = int(rng.integers(1, min(2 * T, cfg.operand_depth // (-(-K // T) * T)) + 1))
        man, idx, codes, sw = sparse_weight_data(cfg, rng, w_rows, w_cols, slot_w)
        if rng.random() < 0.3:
            codes[int(rng.integers(0, len(codes)))] = cfg.formats[slot_w].exp_invalid_code
        ntile = len(man) // S
        w_off = int(rng.integers(0, specs["sp.man"].depth // S - ntile + 1))
        e_off = int(rng.integers(0, specs["sp.exp"].depth - len(codes) + 1))
        put(specs["sp.man"], man, w_off * S)
        put(specs["sp.idx"], idx + (m * rng.integers(0, 2, len(idx)) if k % 3 == 0 else 0),
            w_off * S)
        put(specs["sp.exp"], codes, e_off)
        xbuf = int(rng.integers(0, cfg.operand_buffers))
        x = (rng.standard_normal((batch, K)) * np.exp2(rng.integers(-8, 8))).astype(np.float32)
        if rng.random() < 0.3:
            x[int(rng.integers(0, batch)), int(rng.integers(0, K))] = np.nan
        xq = quantize(x, cfg.formats[slot_x], nonfinite="flag")
        xc, xm = xq.stream()
        put(specs[f"op{xbuf}.man"], xm.reshape(-1))
        put(specs[f"op{xbuf}.exp"], xc)
        sc.load()
        N = w_cols if trans else w_rows
        f = dict(flags=int(trans), x=xbuf, slot_x=slot_x, slot_w=slot_w, batch=batch,
                 w_rows=w_rows, w_cols=w_cols, w_offset=w_off, e_offset=e_off,
                 out_offset=int(rng.integers(0, specs["out"].depth - batch * N + 1)))
        sc.cmd(P.Op.SPARSE_GEMM, **f)
        sc.check()
        bad = str(rng.choice(["flags", "x", "slot_x", "slot_w", "batch", "w_rows", "w_cols",
                              "k", "xsize", "w_offset", "e_offset", "out_offset", "tile"]))
        g = dict(f)
        if bad == "flags":
            g["flags"] |= 0x40
        elif bad == "x":
            g["x"] = cfg.operand_buffers + int(rng.integers(0, 3))
        elif bad in ("slot_x", "slot_w"):
            g[bad] = int(rng.choice([len(cfg.formats)] + [i for i in range(len(cfg.formats))
                                                          if i not in slots]))
        elif bad in ("batch", "w_rows", "w_cols"):
            g[bad] = 0
        elif bad == "k":
            g["w_rows" if trans else "w_cols"] = cfg.k_max + 1
        elif bad == "xsize":
            g["batch"] = cfg.operand_depth // (-(-K // T)) + T
        elif bad == "w_offset":
            g["w_offset"] = int(rng.choice([specs["sp.man"].depth // S - ntile + 1,
                                            2**32 - 1]))
        elif bad == "e_offset":
            g["e_offset"] = specs["sp.exp"].depth - len(codes) + 1
        elif bad == "out_offset":
            g["out_offset"] = specs["out"].depth - batch * N + 1
        else:                              # a tile that is not transposable
            g["flags"] = int(P.SparseFlag.TRANSPOSE)
            g["w_rows"], g["w_cols"] = w_rows, w_cols
            t = int(rng.integers(0, ntile))
            r0 = t * S + int(rng.integers(0, m)) * nn
            bad_idx = idx[t * S: (t + 1) * S].copy()
            bad_idx[r0 - t * S + 1] = bad_idx[r0 - t * S]       # a column named twice
            put(specs["sp.idx"], bad_idx, (w_off + t) * S)
            sc.load()
        sc.cmd(P.Op.SPARSE_GEMM, **g)
        sc.check()
    sc.finish()
    return sc


def mls_script(cfg, rom: bytes, rng, n: int = 8) -> Script:
    """MLS_QUANTIZE of random FP32 tensors (zeros, subnormals, huge values; nearest and
    stochastic, both destinations) and MLS_GEMM over random code words (every code, bit 7
    set) and group shifts (above 15 too), random shapes, tensor exponents and offsets;
    errors: each bad field, each buffer range, a NaN element. Without the engine
    (``mls_lanes`` 0): UNSUPPORTED."""
    sc = Script(prepared_emulator(cfg, rom))
    specs = {s.name: s for s in sc.emu.specs}
    lanes = P.mls_lanes(cfg)
    if not lanes:
        for op in (P.Op.MLS_GEMM, P.Op.MLS_QUANTIZE):
            sc.cmd(op, **{f.name: 0 for f in P.REQUESTS[op].fields})
        sc.finish()
        return sc
    fp, ca, gs, out = specs["fp_in"], specs["mls.a"], specs["mls.ga"], specs["out"]

    def fill(spec, vals, dt):
        raw = vals.astype(dt).tobytes()
        step = P.MAX_DATA // spec.wire_bytes
        for lo in range(0, spec.depth, step):
            sc.emulate(P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
                raw[lo * spec.wire_bytes: (lo + step) * spec.wire_bytes], buffer=spec.id,
                offset=lo))
    fill(fp, fp32_tensor(rng, fp.depth).view(np.uint32), "<u4")
    for side in "ab":
        fill(specs[f"mls.{side}"], rng.integers(0, 1 << (8 * lanes), ca.depth,
                                                  dtype=np.int64), f"<u{ca.wire_bytes}")
        fill(specs[f"mls.g{side}"], rng.integers(0, 256, gs.depth), "u1")
    sc.load()
    Lq = P.MLS_QUANT_GROUP
    lq, lg = P.REQUESTS[P.Op.MLS_QUANTIZE], P.REQUESTS[P.Op.MLS_GEMM]
    for k in range(n):
        cols = int(rng.integers(1, 40))
        rows = int(rng.integers(1, max(2, min(4, fp.depth // cols) + 1)))
        ng = -(-cols // Lq)
        t = int(rng.integers(-20, 20))
        f = dict(dst=int(rng.integers(0, 2)), rows=rows, cols=cols,
                 src_offset=int(rng.integers(0, fp.depth - rows * cols + 1)), texp=t & 0xFFFF,
                 rounding=int(rng.integers(0, 2)), seed=int(rng.integers(0, 2**32)),
                 codes_offset=int(rng.integers(0, ca.depth - rows * ng * Lq // lanes + 1)),
                 g_offset=int(rng.integers(0, gs.depth - rows * ng + 1)))
        sc.cmd(P.Op.MLS_QUANTIZE, **f)
        if k % 2:
            bad = str(rng.choice([x.name for x in lq.fields if x.name != "seed"]))
            val = {"dst": 2, "rows": 0, "cols": 0, "texp": 201, "rounding": 2,
                   "src_offset": fp.depth, "codes_offset": ca.depth, "g_offset": gs.depth}[bad]
            sc.cmd(P.Op.MLS_QUANTIZE, **{**f, bad: val})
        sc.check()
        gw = int(rng.integers(1, 4))
        groups = int(rng.integers(1, 4))
        rl = groups * gw
        r, c = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        g = dict(rows=r, cols=c, groups=groups, group_words=gw,
                 exp_a=int(rng.integers(-200, 201)) & 0xFFFF,
                 exp_b=int(rng.integers(-200, 201)) & 0xFFFF,
                 a_offset=int(rng.integers(0, ca.depth - r * rl + 1)),
                 b_offset=int(rng.integers(0, ca.depth - c * rl + 1)),
                 ga_offset=int(rng.integers(0, gs.depth - r * groups + 1)),
                 gb_offset=int(rng.integers(0, gs.depth - c * groups + 1)),
                 y_offset=int(rng.integers(0, out.depth - r * c + 1)))
        sc.cmd(P.Op.MLS_GEMM, **g)
        if k % 2 == 0:
            bad = str(rng.choice([x.name for x in lg.fields]))
            val = {"rows": 0, "cols": 0, "groups": P.MLS_K_MAX, "group_words": 0,
                   "exp_a": 201, "exp_b": 0xFF00, "a_offset": ca.depth, "b_offset": 2**32 - 1,
                   "ga_offset": gs.depth, "gb_offset": gs.depth - c * groups + 1,
                   "y_offset": out.depth}[bad]
            sc.cmd(P.Op.MLS_GEMM, **{**g, bad: val})
        sc.check()
    sc.finish()
    return sc


#: Script builder per engine name of :data:`hbfp_hw.gateware.top.ENGINES`.
def luq_script(cfg, rom: bytes, rng, n: int = 6) -> Script:
    """LUQ_QUANTIZE (random counts and offsets over the FP32 inputs of ``_start``, NaN
    included; per-tensor or ``MAX_ABS`` scales, ``CONTINUE``) and LUQ_GEMM (random
    codes, valid mantissas with an out-of-range one in the last operand buffer, exponent
    codes up to the invalid code, every SMP sample count, alpha 0 or normal); errors:
    each bad field, each buffer range."""
    sc = _start(cfg, rom, rng)
    specs = {s.name: s for s in sc.emu.specs}
    if not P.luq_lanes(cfg):
        sc.load()
        for op in (P.Op.LUQ_GEMM, P.Op.LUQ_QUANTIZE):
            sc.cmd(op, **{f.name: 0 for f in P.REQUESTS[op].fields})
        sc.finish()
        return sc
    T = cfg.tile
    slots = P.luq_slots(cfg)
    a_s = specs["luq.a"]

    def write(spec, raw: bytes) -> None:
        step = P.MAX_DATA // spec.wire_bytes * spec.wire_bytes
        for lo in range(0, len(raw), step):
            sc.emulate(P.Op.WRITE, P.REQUESTS[P.Op.WRITE].pack(
                raw[lo: lo + step], buffer=spec.id, offset=lo // spec.wire_bytes))
    write(a_s, rng.integers(0, 256, a_s.depth).astype("u1").tobytes())
    fmt0 = cfg.formats[slots[0]]
    mm = min(cfg.formats[i].mmax for i in slots)
    for i in range(cfg.operand_buffers):
        ms, es = specs[f"op{i}.man"], specs[f"op{i}.exp"]
        man = rng.integers(-mm, mm + 1, ms.depth)
        if i == cfg.operand_buffers - 1:
            man[int(rng.integers(0, 3 * T * T))] = mm + 1
        codes = rng.integers(fmt0.exp_bias - 4, fmt0.exp_bias + 4, es.depth)
        codes[rng.integers(0, es.depth, 2)] = fmt0.exp_invalid_code
        write(ms, man.astype(f"<i{ms.wire_bytes}").tobytes())
        write(es, codes.astype(f"<u{es.wire_bytes}").tobytes())
    sc.load()
    fp = specs["fp_in"]
    for k in range(n):
        count = int(rng.integers(1, 40))
        flags = int(rng.integers(0, 4))
        mx = float(np.abs(rng.standard_normal()) * 2.0 ** int(rng.integers(-20, 20)))
        q = dict(flags=flags, count=count, src_offset=int(rng.integers(0, fp.depth - count)),
                 dst_offset=int(rng.integers(0, a_s.depth - count)),
                 seed=int(rng.integers(0, 2**32)),
                 max_abs=int(np.array([mx], np.float32).view(np.uint32)[0]))
        sc.cmd(P.Op.LUQ_QUANTIZE, **q)
        S = int(rng.choice(P.LUQ_SAMPLES[:3]))
        rows, kk, cols = int(rng.integers(1, 4)), int(rng.integers(1, 3 * T)), \
            int(rng.integers(1, 2 * T + 1))
        alpha = float(rng.choice([0.0, 2.0 ** int(rng.integers(-30, 30))]))
        g = dict(flags=int(rng.integers(0, 2)), b=int(rng.integers(0, cfg.operand_buffers)),
                 slot_b=int(rng.choice(slots)), samples=S, rows=rows, k=kk, cols=cols,
                 alpha=int(np.array([alpha], np.float32).view(np.uint32)[0]),
                 a_offset=int(rng.integers(0, a_s.depth - S * rows * kk)),
                 out_offset=int(rng.integers(0, specs["out"].depth - rows * cols)))
        sc.cmd(P.Op.LUQ_GEMM, **g)
        if k % 2 == 1:                                 # one bad field each
            bad = str(rng.choice(["flags", "b", "slot_b", "samples", "rows", "k", "alpha",
                                  "a_offset", "out_offset"]))
            val = {"flags": 2, "b": cfg.operand_buffers, "slot_b": len(cfg.formats),
                   "samples": 3, "rows": 0, "k": cfg.k_max + 1, "alpha": 0x80800000,
                   "a_offset": a_s.depth, "out_offset": 2**32 - 1}[bad]
            sc.cmd(P.Op.LUQ_GEMM, **{**g, bad: val})
            bad = str(rng.choice(["flags", "count", "max_abs", "src_offset", "dst_offset"]))
            val = {"flags": 4, "count": 0, "max_abs": 0x7F800000, "src_offset": fp.depth,
                   "dst_offset": a_s.depth - count + 1}[bad]
            sc.cmd(P.Op.LUQ_QUANTIZE, **{**q, bad: val, "flags": 1 if bad == "max_abs"
                                         else q["flags"] if bad != "flags" else val})
        sc.check()
    sc.finish()
    return sc


SCRIPTS = {"buffer_io": buffer_io_script, "stats": stats_script,
           "quantize": quantize_script, "gemm": gemm_script, "bitlayer": bitlayer_script,
           "sparse": sparse_script, "mls": mls_script, "luq": luq_script}
