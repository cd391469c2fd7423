"""Format descriptions: validation messages, derived constants, presets, round trips."""

from __future__ import annotations

import numpy as np
import pytest

import hbfp_hw as h


@pytest.mark.parametrize("kw, msg", [
    (dict(man_bits=1), r"man_bits=1 is out of range; accepted range is \[2, 16\]"),
    (dict(man_bits=17), r"man_bits=17 is out of range; accepted range is \[2, 16\]"),
    (dict(man_bits=8.0), r"man_bits must be an integer in \[2, 16\], got 8.0"),
    (dict(exp_bits=11), r"exp_bits=11 is out of range; accepted range is \[2, 10\]"),
    (dict(block_shape=(0,)), r"block_shape\[0\]=0 is out of range; accepted range is \[1, 4096\]"),
    (dict(block_shape=(512, 512), block_axes=(0, 1)),
     r"block size 262144 .* accepted range is \[1, 65536\]"),
    (dict(block_shape=(4, 4)), r"must have the same length"),
    (dict(block_shape=(4, 4), block_axes=(1, 1)), r"block_axes=\(1, 1\) must be distinct"),
    (dict(rounding="nearest"), r"rounding='nearest' is not supported; accepted values are "
                               r"nearest_even, nearest_away, toward_zero, stochastic"),
    (dict(sr_bits=0), r"sr_bits=0 is out of range; accepted range is \[1, 24\]"),
    (dict(seed=-1), r"seed=-1 is out of range; accepted range is \[0, 4294967295\]"),
    (dict(sr_lanes=0), r"sr_lanes=0 is out of range; accepted range is \[1, 256\]"),
])
def test_validation_messages(kw, msg):
    with pytest.raises(ValueError, match=msg):
        h.BFPFormat(**kw)


def test_derived_constants():
    f = h.MXINT8
    assert (f.emin, f.emax, f.exp_bias, f.exp_invalid_code) == (-127, 127, 127, 255)
    assert (f.mmax, f.frac_bits, f.block_size) == (127, 6, 32)
    assert f.bits_per_element == 8.25
    g = h.BFPFormat(man_bits=4, exp_bits=5, block_shape=(4, 4), block_axes=(0, 1))
    assert (g.emin, g.emax, g.exp_invalid_code, g.mmax, g.block_size) == (-15, 15, 31, 7, 16)


def test_presets_and_lookup():
    assert h.get_format("hbfp8") is h.HBFP8 and h.get_format("MXINT8") is h.MXINT8
    assert h.HBFP4.man_bits == 4 and h.HBFP4.block_shape == (16, 16)
    assert h.CBFP8.block_axes == (1,)
    with pytest.raises(ValueError, match="unknown format 'fp9'; accepted names are"):
        h.get_format("fp9")


def test_dict_round_trip_and_immutability():
    f = h.HBFP8.replace(rounding="stochastic", seed=5, sr_lanes=8)
    assert h.BFPFormat.from_dict(f.to_dict()) == f
    with pytest.raises(Exception):
        f.man_bits = 4  # frozen
    assert "stochastic(8 bits, seed 5, 8 lanes)" in f.describe()


def test_scheme_format_registry():
    from dataclasses import dataclass, replace

    from hbfp_hw import FP32, dequantize, get_format, quantize, register_format
    from hbfp_hw.formats import SCHEME_FORMATS, get_bfp_format

    @dataclass(frozen=True)
    class Toy:
        name: str = "toy-scheme"

        def replace(self, **kw):
            return replace(self, **kw)

        def quantize_array(self, x, scale=1.0):
            return FP32.quantize_array(np.round(np.asarray(x) * scale) / scale)

    try:
        toy = register_format(Toy())
        assert get_format("TOY-scheme") is toy
        x = np.array([0.2, 0.7, -1.4], np.float32)
        np.testing.assert_array_equal(dequantize(quantize(x, toy)), [0.0, 1.0, -1.0])
        np.testing.assert_array_equal(dequantize(quantize(x, toy, scale=2.0)),
                                      [0.0, 0.5, -1.5])
        with pytest.raises(TypeError, match="exponent= is a BFP option"):
            quantize(x, toy, exponent=3)
        with pytest.raises(ValueError, match="taken by a BFP preset"):
            register_format(Toy(name="HBFP8"))
        with pytest.raises(ValueError, match="already registered"):
            register_format(Toy(name="fp32"))
        with pytest.raises(ValueError, match="not a block-floating-point format"):
            get_bfp_format("toy-scheme", "the accelerator")
        with pytest.raises(TypeError, match="unexpected keyword"):
            quantize(x, get_format("hbfp8"), scale=2.0)
    finally:
        SCHEME_FORMATS.pop("toy-scheme", None)
