"""Slow, independent scalar reference of the numeric rules (docs/numerics.md).

Written from the rules, element by element with Python integers and ``Fraction``s, to
check the vectorised golden model. It shares no code with ``hbfp_hw`` except the
format object's plain fields.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction


def f32_fields(v: float) -> tuple[int, int, int]:
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return bits >> 31, (bits >> 23) & 0xFF, bits & 0x7FFFFF


def f32_value(v: float) -> Fraction | None:
    """Exact value of a float32 with subnormals flushed; None for NaN/Inf."""
    s, f, frac = f32_fields(v)
    if f == 0xFF:
        return None
    if f == 0:
        return Fraction(0)
    mag = Fraction(frac | (1 << 23), 1 << 23) * Fraction(2) ** (f - 127)
    return -mag if s else mag


def xorshift32_seq(state: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        out.append(state)
    return out


def sr_bits_stream(seed: int, lanes: int, count: int, bits: int) -> list[int]:
    """u for stream elements 0..count-1 (per-lane xorshift32, step then use)."""
    per_lane = -(-count // lanes)
    seqs = []
    for lane in range(lanes):
        s0 = (seed ^ (((lane + 1) * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF
        if s0 == 0:
            s0 = 0x6D2B79F5
        seqs.append(xorshift32_seq(s0, per_lane))
    return [seqs[n % lanes][n // lanes] >> (32 - bits) for n in range(count)]


def quantize_block(vals: list[float], fmt, us: list[int] | None = None):
    """Quantize one block given in stream order. Returns (E, mantissas, invalid)."""
    emax = 2 ** (fmt.exp_bits - 1) - 1
    emin = -emax
    mmax = 2 ** (fmt.man_bits - 1) - 1
    exact = [f32_value(v) for v in vals]
    if any(x is None for x in exact):
        return emin, [0] * len(vals), True
    # floor(log2) of an exact binary fraction, corrected against float rounding
    exps = []
    for x in exact:
        if x == 0:
            continue
        e = math.floor(math.log2(abs(x)))
        while Fraction(2) ** e > abs(x):
            e -= 1
        while Fraction(2) ** (e + 1) <= abs(x):
            e += 1
        exps.append(e)
    E = min(max(max(exps), emin), emax) if exps else emin
    out = []
    for n, x in enumerate(exact):
        y = abs(x) * Fraction(2) ** (fmt.man_bits - 2 - E)
        if fmt.rounding == "nearest_even":
            q = round(y)  # Fraction rounds half to even
        elif fmt.rounding == "nearest_away":
            q = math.floor(y + Fraction(1, 2))
        elif fmt.rounding == "toward_zero":
            q = math.floor(y)
        else:
            q = math.floor(y + Fraction(us[n], 2**fmt.sr_bits))
        q = min(q, mmax)
        out.append(-q if x < 0 else q)
    return E, out, False


def bfp_matmul_slow(a_man, a_exp, a_inv, a_blk, fa, b_man, b_exp, b_inv, b_blk, fb, L, G):
    """Spec of hbfp_hw.gemm written as loops over Python ints.

    a_man[i][k], a_exp[gi][gk] (block rows a_blk along M); b_man[k][j], b_exp[gk][gj]
    (block cols b_blk along N). Returns a list of lists of Python floats (float32 values).
    """
    import numpy as np

    M, K = len(a_man), len(a_man[0])
    N = len(b_man[0])
    nkb = K // L
    out = [[0.0] * N for _ in range(M)]
    for i in range(M):
        gi = i // a_blk
        row_valid = [kb for kb in range(nkb) if not a_inv[gi][kb]]
        for j in range(N):
            gj = j // b_blk
            if len(row_valid) < nkb or any(b_inv[kb][gj] for kb in range(nkb)):
                out[i][j] = float("nan")
                continue
            e_ref = max(a_exp[gi][kb] for kb in range(nkb)) + max(b_exp[kb][gj]
                                                                  for kb in range(nkb))
            acc = 0
            for kb in range(nkb):
                p = sum(a_man[i][kb * L + t] * b_man[kb * L + t][j] for t in range(L))
                s = e_ref - (a_exp[gi][kb] + b_exp[kb][gj])
                acc += (p * 2**G) >> s      # Python >> is floor division by 2**s
            v = Fraction(acc) * Fraction(2) ** (e_ref - G - fa - fb)
            if abs(v) < Fraction(2) ** -126:
                out[i][j] = 0.0
            else:
                out[i][j] = float(np.float32(_round_f32(v)))
    return out


def _round_f32(v: Fraction) -> float:
    """Round an exact rational to float32 (RNE, normal range; overflow -> inf)."""
    sign = -1 if v < 0 else 1
    a = abs(v)
    e = math.floor(math.log2(a))
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    scaled = a * Fraction(2) ** (23 - e)   # in [2^23, 2^24)
    q = round(scaled)                      # ties to even
    val = Fraction(q) * Fraction(2) ** (e - 23)
    if val >= Fraction(2) ** 128:
        return sign * float("inf")
    return sign * float(val)
