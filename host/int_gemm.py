"""Uniform-integer GEMMs on the device: the integer mode of the accelerator.

The golden integer GEMM (:mod:`hbfp_hw.intgemm`) is ``acc = ca @ cw^T`` in exact
integers on the signed operands ``c`` of the two :class:`~hbfp_hw.intgemm.IntTensor`
objects, then one FP32 scaling step ``y = fp32(acc * S)`` with ``S = fp32(ua * uw)`` per
output channel. On the device the integer products run on the bit-serial integer engine
(BITLAYER, every weight bit-plane kept: an exact integer GEMM of int16 activations and
weights of up to :data:`~hbfp_hw.protocol.BITLAYER_BITS_MAX` two's-complement bits):

* activations: ``ca`` as they are (``|ca| <= 2**a_bits - 1``, so ``a_bits <= 15`` fits
  the int16 activation buffer);
* weights: when ``cw`` fits the engine's planes it is sent as it is. Otherwise (8-bit
  weights: the symmetric grid's ``cw = 2q - 255`` needs 9 bits) the codes are re-centred,
  ``cw = s * (q - h) + t`` with ``h = 2**(w_bits - 1)``, ``q - h`` in
  ``[-h, h - 1]`` (``w_bits`` planes), ``s = 2, t = 1`` for the symmetric grid and
  ``s = 1, t = h - z`` for an integer zero point. The device computes ``P = ca @ (q -
  h)^T`` and, as one extra weight row of ones, the row sums ``R = ca @ 1``; the host
  forms ``acc = s * P + t * R`` (zero-point correction, exact integers);
* the FP32 scaling step is the golden model's own epilogue on the host.

Each BITLAYER command covers at most ``bitlayer_k_max`` (``8 * bitlayer_lanes``) of K,
so its int32 sums cannot overflow (``256 * 2**15 * 2**7 = 2**30``); the host adds the
K chunks in int64, as :meth:`~hbfp_hw.host.Device.bitlayer_matmul` does.

So the result is bit-identical to :func:`hbfp_hw.intgemm.int_linear` /
:func:`~hbfp_hw.intgemm.int_conv2d` whenever the device's integer sums are exact, which
the emulator / RTL parity tests check command by command. Convolutions are im2col GEMMs
(padding contributes ``c = 0``).
"""

from __future__ import annotations

import functools

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.bitlayers import decompose
from hbfp_hw.intgemm import MAX_ACC_BITS, IntTensor, _conv2d, _linear, int_accumulator_bits

__all__ = ["int_linear", "int_conv2d", "weight_operand", "augmented_operands", "tracked_acc",
           "ACT_BITS_MAX", "WEIGHT_BITS_MAX"]

#: Widest activation format: ``|ca| <= 2**bits - 1`` must fit the int16 ``bl.x`` buffer.
ACT_BITS_MAX = P.BITLAYER_ACT_BITS - 1
#: Widest weight format (``q - 2**(bits-1)`` must fit the engine's weight planes).
WEIGHT_BITS_MAX = P.BITLAYER_BITS_MAX


def _signed_bits(v: np.ndarray) -> int:
    """Two's-complement bits holding every value of ``v`` (at least 1)."""
    if not v.size:
        return 1
    lo, hi = int(v.min()), int(v.max())
    b = 1
    while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
        b += 1
    return b


def weight_operand(w: IntTensor) -> tuple[np.ndarray, int, int, int]:
    """How the weight operand of ``w`` (``(N, K)``) goes to the engine:
    ``(w_dev, bits, s, t)`` with ``cw = s * w_dev + t`` (``t`` applied through the row
    sums; ``s = 1, t = 0`` when ``cw`` is sent as it is) and ``bits`` the planes."""
    cw, _ = w.operand()
    bits = _signed_bits(cw)
    if bits <= WEIGHT_BITS_MAX:
        return cw, bits, 1, 0
    b = w.fmt.bits
    if b > WEIGHT_BITS_MAX:
        raise ValueError(f"weights of {b} bits do not fit the device's integer engine; "
                         f"accepted weight bits are [2, {WEIGHT_BITS_MAX}]")
    h = 1 << (b - 1)
    q = w.q.astype(np.int64)
    if w.z2 % 2:                       # symmetric grid: cw = 2q - L = 2(q - h) + 1
        return q - h, b, 2, 1
    return q - h, b, 1, h - w.z2 // 2  # integer zero point z: cw = (q - h) + (h - z)


def _device_acc(dev, ca: np.ndarray, w: IntTensor, bits_a: int) -> np.ndarray:
    """``ca (M, K) @ cw^T`` in exact integers on ``dev`` (BITLAYER)."""
    if bits_a > ACT_BITS_MAX:
        raise ValueError(f"activations of {bits_a} bits do not fit the device's int16 "
                         f"activation buffer; accepted activation bits are [2, {ACT_BITS_MAX}]")
    K = ca.shape[1]
    width = int_accumulator_bits(bits_a, w.fmt.bits, max(K, 1))
    if width > MAX_ACC_BITS:
        raise ValueError(f"an accumulator of {width} bits (bits {bits_a}x{w.fmt.bits}, "
                         f"K={K}) exceeds the supported {MAX_ACC_BITS} bits; reduce K or "
                         f"the bits")
    w_dev, bits, s, t = weight_operand(w)
    N = w_dev.shape[0]
    if t:
        w_dev = np.concatenate([w_dev, np.ones((1, K), np.int64)])   # the row sums
    bits = max(bits, 2)
    y = dev.bitlayer_matmul(ca, decompose(w_dev, bits))
    acc = s * y[:, :N]
    if t:
        acc = acc + t * y[:, N:]
    return acc


def int_linear(dev, a: IntTensor, w: IntTensor, *, return_acc: bool = False):
    """:func:`hbfp_hw.intgemm.int_linear` with the integer sums computed on ``dev``
    (an open :class:`~hbfp_hw.host.Device`); bit-identical results."""
    return _linear(a, w, functools.partial(_device_acc, dev), return_acc)


def int_conv2d(dev, a: IntTensor, w: IntTensor, *, stride=1, padding=0,
               return_acc: bool = False):
    """:func:`hbfp_hw.intgemm.int_conv2d` (im2col GEMM) with the integer sums computed
    on ``dev``; bit-identical results."""
    return _conv2d(a, w, stride, padding, functools.partial(_device_acc, dev), return_acc)


# -- tracked integer GEMMs: the final sums, and their statistics, on the device ----------

_I16 = (1 << (P.BITLAYER_ACT_BITS - 1)) - 1


def augmented_operands(ca: np.ndarray, w: IntTensor, bits_a: int):
    """``(x, w_dev, bits)`` with ``x @ w_dev^T == ca @ cw^T`` exactly, ``x`` in int16 and
    ``w_dev`` in ``bits`` two's-complement planes, so one BITLAYER GEMM computes the
    final integer sums (no host-side correction).

    When ``cw`` does not fit the planes (:func:`weight_operand`: ``cw = s * w' + t``),
    the zero-point term is folded into extra K columns: ``x = [s * ca, -R_1 .. -R_J]``,
    ``w_dev = [w', -t .. -t]`` with ``R_j`` the row sums of ``ca`` over column chunk
    ``j`` (chunks of ``floor((2**15 - 1) / L_a)`` columns, ``L_a = 2**bits_a - 1``, so
    ``|R_j|`` fits int16) and ``-t`` in ``[-2**(bits-1), 2**(bits-1) - 1]``."""
    w_dev, bits, s, t = weight_operand(w)
    ca = np.asarray(ca, dtype=np.int64)
    if s == 1 and t == 0:
        return ca, w_dev, bits
    L = (1 << bits_a) - 1
    if s * L > _I16:
        raise ValueError(f"activations of {bits_a} bits times the weight step {s} do not fit "
                         f"the int16 activation buffer; accepted activation bits are "
                         f"[2, {(_I16 // s).bit_length()}] for these weights")
    M, K = ca.shape
    chunk = max(1, _I16 // L)
    n_ext = -(-K // chunk) if K else 0
    pad = np.zeros((M, n_ext * chunk), np.int64)
    pad[:, :K] = ca
    R = pad.reshape(M, n_ext, chunk).sum(axis=2)
    x = np.concatenate([s * ca, -R], axis=1)
    wx = np.concatenate([w_dev, np.full((w_dev.shape[0], n_ext), -t, np.int64)], axis=1)
    return x, wx, bits


def tracked_acc(dev, ca: np.ndarray, w: IntTensor, bits_a: int):
    """``(acc, (acc_min, acc_max, count))``: the exact ``ca (M, K) @ cw^T`` computed on
    ``dev`` with every K chunk summed on the device (:func:`augmented_operands`,
    ``Device.bitlayer_matmul(track=True)``), and the statistics of those final sums as
    the device tracked them (``READ_STATS`` ``INT_OUTPUT``, cleared before and after):
    the host does not reduce the output."""
    if bits_a > ACT_BITS_MAX:
        raise ValueError(f"activations of {bits_a} bits do not fit the device's int16 "
                         f"activation buffer; accepted activation bits are [2, {ACT_BITS_MAX}]")
    K = ca.shape[1]
    width = int_accumulator_bits(bits_a, w.fmt.bits, max(K, 1))
    if width > 32:
        raise ValueError(f"a tracked integer GEMM sums in int32 on the device; an "
                         f"accumulator of {width} bits (bits {bits_a}x{w.fmt.bits}, K={K}) "
                         f"exceeds 32 bits; reduce K or the bits")
    x, wd, bits = augmented_operands(ca, w, bits_a)
    dev.read_stats(source="int", clear=True)
    acc = dev.bitlayer_matmul(x, decompose(wd, max(bits, 2)), track=True)
    st = dev.read_stats(source="int", clear=True)
    if st["count"] != min(acc.size, 0xFFFFFFFF):
        from .device import ProtocolError
        raise ProtocolError(f"the device tracked {st['count']} integer outputs, expected "
                            f"{acc.size}")
    return acc, (st["min"], st["max"], st["count"])
