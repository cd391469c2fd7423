"""Golden BFP GEMM: the exact datapath of the MAC array.

``bfp_matmul(a, b)`` computes ``a @ b`` for a quantized ``a`` of shape ``(M, K)``
blocked along K (axis 1) and a quantized ``b`` of shape ``(K, N)`` blocked along K
(axis 0) with the same block length ``L`` along K. Blocks may also extend along M
(for ``a``) and N (for ``b``): HyperBlock 2-D tiles.

Datapath (bit-exact with the gateware):

1. **Block dot product** (exact integers). For output ``(i, j)`` and K-block ``kb``::

       P[kb] = sum_{l < L} ma[i, kb*L + l] * mb[kb*L + l, j]
       e[kb] = Ea[i, kb] + Eb[kb, j]        (value of P is P * 2**(e - fa - fb))

   with ``fa = man_bits_a - 2``, ``fb = man_bits_b - 2``.
2. **Reference exponent** per output, known before any product:
   ``e_ref[i, j] = max_kb Ea[i, kb] + max_kb Eb[kb, j]`` (row maximum of ``a``'s
   exponents plus column maximum of ``b``'s, over valid blocks), so
   ``e_ref >= e[kb]`` for every ``kb``.
3. **Fixed-point accumulation** with ``G`` guard bits (``guard_bits``, default 8)::

       acc = sum_kb floor(P[kb] * 2**G / 2**(e_ref - e[kb]))

   i.e. an arithmetic shift right by ``s = e_ref - e[kb]`` (results for
   ``s >= 62`` are 0 or -1 as the shift implies). The accumulator is a signed
   integer of :func:`accumulator_bits` bits: it cannot overflow for K up to ``k_max``.
   The sum is order independent.
4. **Conversion to FP32**: ``v = acc * 2**(e_ref - G - fa - fb)``; if
   ``|v| < 2**-126`` the result is ``+0.0`` (flush to zero, no subnormal outputs);
   otherwise ``v`` is rounded to a 24-bit significand with round-to-nearest-even and
   becomes ``+-Inf`` if the rounded magnitude reaches ``2**128``.
5. Outputs whose row of ``a`` or column of ``b`` holds an invalid block are NaN.

Error bound against the float64 product of the dequantized operands
(:func:`matmul_error_bound`)::

    |y - y64| <= nkb * 2**(e_ref - G - fa - fb) + 2**-24 * |y64| (+ 2**-126 flush)

(each of the ``nkb`` truncations loses less than one accumulator LSB; the final
rounding is half an ulp of the result).
"""

from __future__ import annotations

import math

import numpy as np

from .formats import mantissa_max
from .quantize import BFPTensor

__all__ = ["DEFAULT_GUARD_BITS", "acc_to_fp32", "accumulator_bits", "bfp_matmul",
           "matmul_reference", "matmul_error_bound", "k_block_length"]

DEFAULT_GUARD_BITS = 8
_MAX_ACC_BITS = 53  # the golden model converts the accumulator exactly through float64


def accumulator_bits(man_bits_a: int, man_bits_b: int, block_len: int, k_max: int,
                     guard_bits: int = DEFAULT_GUARD_BITS) -> int:
    """Width (sign included) of an accumulator that cannot overflow.

    ``|acc| <= ceil(k_max / block_len) * block_len * mmax_a * mmax_b * 2**guard_bits``.
    """
    for name, v, lo, hi in (("man_bits_a", man_bits_a, 2, 16), ("man_bits_b", man_bits_b, 2, 16),
                            ("block_len", block_len, 1, 65536), ("k_max", k_max, 1, 2**24),
                            ("guard_bits", guard_bits, 0, 24)):
        if not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{name}={v!r} is out of range; accepted range is [{lo}, {hi}]")
    nkb = -(-k_max // block_len)
    bound = nkb * block_len * mantissa_max(man_bits_a) * mantissa_max(man_bits_b)
    bound <<= guard_bits
    return bound.bit_length() + 1


def _check_operands(a, b, fn: str) -> None:
    """``TypeError`` naming the argument unless both operands are :class:`BFPTensor`."""
    for arg, v in (("a", a), ("b", b)):
        if not isinstance(v, BFPTensor):
            kind = type(v).__module__ + "." + type(v).__qualname__
            if kind.startswith("builtins."):
                kind = type(v).__qualname__
            raise TypeError(
                f"{fn}: argument {arg!r} is a {kind}, not a BFPTensor; quantize it first: "
                f"{fn}(quantize(a, fmt), quantize(b, fmt)), both blocked along K (with a "
                f"1-D format such as MXINT8, quantize b with fmt.transposed())")


def k_block_length(a: BFPTensor, b: BFPTensor, fn: str = "bfp_matmul") -> int:
    """The common block length along K of ``a (M, K)`` and ``b (K, N)``; validates."""
    _check_operands(a, b, fn)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"bfp_matmul needs 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {a.shape}, b is {b.shape}")
    la, lb = a.layout.block[1], b.layout.block[0]
    if la != lb:
        raise ValueError(
            f"a's block length along K ({la}, blocks {a.layout.block}) differs from b's "
            f"({lb}, blocks {b.layout.block}); quantize b (or b.T) with the same K block")
    return la


def _row_col_max(a: BFPTensor, b: BFPTensor) -> tuple[np.ndarray, np.ndarray]:
    lo = -(1 << 14)
    ea = np.where(a.invalid, lo, a.exponents.astype(np.int64)).max(axis=1)
    eb = np.where(b.invalid, lo, b.exponents.astype(np.int64)).max(axis=0)
    return ea, eb


def bfp_matmul(a: BFPTensor, b: BFPTensor, *, guard_bits: int = DEFAULT_GUARD_BITS,
               k_max: int | None = None, return_acc: bool = False):
    """Bit-exact golden model of the MAC array: ``a @ b`` as float32.

    Parameters
    ----------
    a, b : BFPTensor
        ``(M, K)`` blocked along K and ``(K, N)`` blocked along K, equal K block length.
    guard_bits : int
        Accumulator guard bits ``G``.
    k_max : int, optional
        Largest K the accumulator is sized for (default: this K). ``K > k_max`` raises.
    return_acc : bool
        Also return the raw ``(acc, e_ref)`` integer arrays (padded shape).

    Returns
    -------
    ndarray of float32, shape ``(M, N)`` (and ``(acc, e_ref)`` if ``return_acc``).
    """
    L = k_block_length(a, b)
    K = a.shape[1]
    k_max = K if k_max is None else k_max
    if K > k_max:
        raise ValueError(f"K={K} exceeds k_max={k_max} the accumulator is sized for")
    fa, fb = a.fmt.frac_bits, b.fmt.frac_bits
    width = accumulator_bits(a.fmt.man_bits, b.fmt.man_bits, L, max(k_max, 1), guard_bits)
    if width > _MAX_ACC_BITS:
        raise ValueError(
            f"accumulator of {width} bits (man_bits {a.fmt.man_bits}x{b.fmt.man_bits}, "
            f"K block {L}, k_max {k_max}, guard {guard_bits}) exceeds the supported "
            f"{_MAX_ACC_BITS} bits; reduce k_max or guard_bits")

    lay_a, lay_b = a.layout, b.layout
    Mp, Kp = lay_a.padded
    Np = lay_b.padded[1]
    nkb = Kp // L
    bm, bn = lay_a.block[0], lay_b.block[1]

    ea_row, eb_col = _row_col_max(a, b)                      # (gm,), (gn,)
    e_ref = np.repeat(ea_row, bm)[:, None] + np.repeat(eb_col, bn)[None, :]   # (Mp, Np)
    ea_full = np.repeat(a.exponents.astype(np.int64), bm, axis=0)             # (Mp, nkb)
    eb_full = np.repeat(b.exponents.astype(np.int64), bn, axis=1)             # (nkb, Np)

    am = a.mantissas.astype(np.float64).reshape(Mp, nkb, L).transpose(1, 0, 2)
    bmn = b.mantissas.astype(np.float64).reshape(nkb, L, Np)
    acc = np.zeros((Mp, Np), dtype=np.int64)
    chunk = max(1, int(2**24 // max(1, Mp * Np)))
    for k0 in range(0, nkb, chunk):
        k1 = min(nkb, k0 + chunk)
        # exact: |P| < 2**53 (checked by the accumulator width)
        p = np.matmul(am[k0:k1], bmn[k0:k1]).astype(np.int64)          # (c, Mp, Np)
        e = ea_full[:, k0:k1].T[:, :, None] + eb_full[k0:k1][:, None, :]
        s = np.minimum(e_ref[None] - e, 62)
        acc += ((p << guard_bits) >> s).sum(axis=0)

    bad = (np.repeat(a.invalid.any(axis=1), bm)[:, None]
           | np.repeat(b.invalid.any(axis=0), bn)[None, :])
    out = acc_to_fp32(acc, e_ref - guard_bits - fa - fb, bad)
    out = out[: a.shape[0], : b.shape[1]]
    if return_acc:
        return out, acc, e_ref
    return out


def acc_to_fp32(acc: np.ndarray, scale_exp: np.ndarray, bad: np.ndarray | None = None
                ) -> np.ndarray:
    """Steps 4 and 5: ``acc * 2**scale_exp`` to FP32 (exact in float64, then values
    below ``2**-126`` flushed to 0, round to nearest even, overflow to +-Inf), NaN where
    ``bad``. The overflow to Inf is the rule, so its NumPy warning is silenced."""
    with np.errstate(over="ignore"):
        v = np.ldexp(acc.astype(np.float64), np.asarray(scale_exp).astype(np.int32))
        out = np.where(np.abs(v) < 2.0**-126, 0.0, v).astype(np.float32)
    return out if bad is None else np.where(bad, np.float32(np.nan), out)


def matmul_reference(a: BFPTensor, b: BFPTensor) -> np.ndarray:
    """float64 product of the dequantized operands (the exact value of the BFP GEMM)."""
    _check_operands(a, b, "matmul_reference")
    return a.dequantize().astype(np.float64) @ b.dequantize().astype(np.float64)


def matmul_error_bound(a: BFPTensor, b: BFPTensor,
                       guard_bits: int = DEFAULT_GUARD_BITS) -> np.ndarray:
    """Per-output bound on ``|bfp_matmul(a, b) - matmul_reference(a, b)|``."""
    L = k_block_length(a, b, "matmul_error_bound")
    nkb = a.layout.padded[1] // L
    ea_row, eb_col = _row_col_max(a, b)
    e_ref = (np.repeat(ea_row, a.layout.block[0])[: a.shape[0], None]
             + np.repeat(eb_col, b.layout.block[1])[None, : b.shape[1]])
    lsb = np.ldexp(1.0, (e_ref - guard_bits - a.fmt.frac_bits - b.fmt.frac_bits).astype(np.int32))
    ref = np.abs(matmul_reference(a, b))
    return nkb * lsb + ref * 2.0**-24 + 2.0**-126 + math.ulp(0.0)
