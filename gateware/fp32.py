"""IEEE-754 binary32 as an Amaranth data layout."""

from __future__ import annotations

from amaranth.lib import data

__all__ = ["FP32Layout", "FP32_EXP_BIAS", "FP32_EXP_BITS", "FP32_EXP_SPECIAL", "FP32_FRAC_BITS"]

FP32_EXP_BIAS = 127
FP32_EXP_BITS = 8
#: Exponent field of Inf and NaN (all ones).
FP32_EXP_SPECIAL = 2**FP32_EXP_BITS - 1
FP32_FRAC_BITS = 23

#: One binary32 value; fields from the least significant bit, so the 32-bit raw value
#: of a ``float32`` maps onto it unchanged.
FP32Layout = data.StructLayout({"frac": FP32_FRAC_BITS, "exp": FP32_EXP_BITS, "sign": 1})
