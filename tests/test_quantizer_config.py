"""QuantizerConfig validation messages and round trip."""

from __future__ import annotations

import pytest

from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import BFPFormat, HBFP8


def test_derived_and_round_trip():
    cfg = QuantizerConfig(format=HBFP8, lanes=8, runtime_rounding=True)
    assert cfg.block_size == 256 and cfg.beats_per_block == 32 and cfg.has_stochastic
    assert QuantizerConfig.from_dict(cfg.to_dict()) == cfg
    g = cfg.golden_format(rounding="stochastic", seed=4)
    assert g.block_shape == (256,) and g.sr_lanes == 8 and g.seed == 4


@pytest.mark.parametrize("kw,msg", [
    ({"lanes": 0}, "lanes=0 is out of range; accepted range is [1, 64]"),
    ({"lanes": 65}, "lanes=65 is out of range; accepted range is [1, 64]"),
    ({"lanes": 2.0}, "lanes must be an integer in [1, 64], got 2.0"),
    ({"lanes": 3}, "block size 32 (block_shape=(32,)) is not a multiple of lanes=3; "
                   "accepted lanes are the divisors of 32 in [1, 64]: [1, 2, 4, 8, 16, 32]"),
    ({"runtime_rounding": 1}, "runtime_rounding must be True or False, got 1"),
    ({"format": "mxint8"}, "format must be a BFPFormat, got str"),
])
def test_validation_messages(kw, msg):
    args = {"format": BFPFormat(), "lanes": 1} | kw
    with pytest.raises(ValueError) as e:
        QuantizerConfig(**args)
    assert str(e.value) == msg


def test_golden_format_rejects_unbuilt_mode():
    cfg = QuantizerConfig(format=BFPFormat(), lanes=1)
    with pytest.raises(ValueError, match="rounding='stochastic' is not built into this unit; "
                                         "accepted values are nearest_even"):
        cfg.golden_format(rounding="stochastic")
