"""Test vectors for the quantizer: named edge-class blocks and random blocks (FP32 bits).

Shared by the Amaranth-simulator tests and the cocotb testbench so both exercise the
same classes. Everything is returned as ``uint32`` raw binary32 patterns of shape
``(nblocks, block_size)``; the expected output always comes from the golden model.
"""

from __future__ import annotations

import numpy as np

from hbfp_hw.formats import BFPFormat

__all__ = ["edge_blocks", "random_blocks", "f32_bits"]

POS_INF = 0x7F800000
NEG_INF = 0xFF800000
QNAN = 0x7FC00000
NAN_PAYLOAD = 0xFF800001        # signalling NaN, negative
MIN_SUB = 0x00000001
MAX_SUB = 0x007FFFFF
MIN_NORMAL = 0x00800000
MAX_FINITE = 0x7F7FFFFF


def f32_bits(x) -> np.ndarray:
    """float values -> uint32 binary32 patterns."""
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def _block_from_values(vals, block: int, rng: np.random.Generator) -> np.ndarray:
    """Place ``vals`` (uint32) at random positions of a zero block."""
    b = np.zeros(block, dtype=np.uint32)
    vals = np.asarray(vals, dtype=np.uint32)[:block]
    pos = rng.permutation(block)[:len(vals)]
    b[pos] = vals
    return b


def edge_blocks(fmt: BFPFormat, block: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                list[str]]:
    """One or more blocks per named edge class; returns ``(blocks, class_names)``.

    Classes: all zeros, negative zeros, one non-zero, subnormals only, subnormals with
    normals, +Inf, -Inf, NaN (quiet and signalling), largest finite values, smallest
    normals, the format's largest and smallest exponents (clamping), exact ties for every
    rounding mode (half-way between two mantissas, with both parities), values that
    round up into saturation, mixed signs, exact r-bit fractions (stochastic).
    """
    fb = fmt.frac_bits
    out: list[np.ndarray] = []
    names: list[str] = []

    def add(name, vals):
        out.append(_block_from_values(vals, block, rng))
        names.append(name)

    add("zeros", [])
    add("negative_zeros", [0x80000000] * block)
    for e in (0, 5, -20, 100, -100):
        add("one_nonzero", f32_bits([rng.choice([-1, 1]) * 1.375 * 2.0 ** e]))
    add("subnormals_only", rng.integers(MIN_SUB, MAX_SUB + 1, block, dtype=np.uint32)
        | (rng.integers(0, 2, block, dtype=np.uint32) << 31))
    add("subnormals_with_min_normal",
        [MIN_NORMAL, MAX_SUB, MIN_SUB, 0x80000000 | MAX_SUB, MIN_NORMAL | 0x80000000])
    add("pos_inf", [POS_INF] + list(f32_bits(rng.standard_normal(block - 1))))
    add("neg_inf", [NEG_INF, f32_bits(1.0)])
    add("nan", [QNAN] + list(f32_bits(rng.standard_normal(block - 1))))
    add("nan_signalling", [NAN_PAYLOAD])
    add("inf_and_nan", [POS_INF, NEG_INF, QNAN])
    add("max_finite", [MAX_FINITE, MAX_FINITE | 0x80000000, 0x7F000000])
    add("min_normal", [MIN_NORMAL, MIN_NORMAL + 1, 0x80000000 | MIN_NORMAL])
    # exponents at and beyond the format's range (clamped when exp_bits < 9)
    for e in (fmt.emax, fmt.emax + 1, fmt.emin, fmt.emin - 1, fmt.emin + 1):
        if -126 <= e <= 127:
            vals = f32_bits([1.5 * 2.0 ** e, -(2.0 ** e), 1.25 * 2.0 ** (e - 1)])
            add(f"exponent_{e}", vals)
    # exact ties: x = (k + 1/2) * 2**(E - fb) for k of both parities; E fixed by 1.0*2**E
    for E in (0, -3, 7):
        unit = 2.0 ** (E - fb)
        ks = np.arange(0, 2 ** (fmt.man_bits - 1) - 1)
        ks = ks[: block - 1]
        sign = rng.choice([-1.0, 1.0], len(ks))
        vals = np.concatenate([[2.0 ** E], sign * (ks + 0.5) * unit])
        add("ties", f32_bits(vals))
        # quarter and three-quarter points (not ties) next to ties
        vals = np.concatenate([[-(2.0 ** E)], (ks[: block // 2] + 0.25) * unit,
                               -(ks[: block // 2] + 0.75) * unit])
        add("near_ties", f32_bits(vals))
    # saturation: the largest element rounds up to 2**(man_bits-1)
    below = f32_bits(2.0) - 1                      # largest float below 2.0
    add("saturation", [below, below | 0x80000000, f32_bits(1.0)])
    half_up = f32_bits((2 ** (fmt.man_bits - 1) - 0.5) * 2.0 ** -fb)  # tie at the top
    add("saturation_tie", [half_up, half_up | 0x80000000])
    # mixed signs with a wide dynamic range
    mag = 2.0 ** rng.integers(-30, 30, block) * rng.uniform(1, 2, block)
    add("mixed_signs", f32_bits(mag * np.where(np.arange(block) % 2, -1, 1)))
    # exact fractions at sr_bits resolution (stochastic rounding boundaries)
    unit = 2.0 ** (-fb - fmt.sr_bits)
    k = rng.integers(0, 2 ** (fmt.man_bits - 1 + fmt.sr_bits) - 1, block - 1)
    add("sr_exact", f32_bits(np.concatenate([[1.0], k * unit])))
    return np.stack(out), names


def random_blocks(n: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random blocks mixing four distributions (see code), as uint32 bits.

    * normal values with a per-block scale over the whole FP32 exponent range;
    * values with a 12-binade spread inside the block (many flush to 0 / small);
    * arbitrary bit patterns (NaN/Inf/subnormals included at their natural rate);
    * small integers times a power of two (many exact ties).
    """
    kind = rng.integers(0, 4, n)
    out = np.empty((n, block), dtype=np.uint32)
    scale = rng.integers(-140, 128, n)
    # 0: gaussian times a block scale
    g = rng.standard_normal((n, block)) * np.ldexp(1.0, np.clip(scale, -149, 120))[:, None]
    with np.errstate(over="ignore"):
        b0 = f32_bits(g.astype(np.float32))
    # 1: per-element exponent spread around the block scale
    sign = rng.integers(0, 2, (n, block)).astype(np.uint32) << 31
    field = np.clip(scale[:, None] + 127 - rng.integers(0, 13, (n, block)), 0, 254)
    b1 = sign | (field.astype(np.uint32) << 23) | rng.integers(
        0, 1 << 23, (n, block), dtype=np.uint32)
    # 2: raw bit patterns
    b2 = rng.integers(0, 2**32, (n, block), dtype=np.uint64).astype(np.uint32)
    # 3: integers * 2**scale (exact ties)
    ints = rng.integers(-600, 601, (n, block)).astype(np.float64)
    b3 = f32_bits((ints * np.ldexp(1.0, np.clip(scale, -130, 100))[:, None] / 2.0 ** 4)
                  .astype(np.float32))
    for k, b in enumerate((b0, b1, b2, b3)):
        out[kind == k] = b[kind == k]
    return out
