"""In-hindsight / dynamic per-tensor int8 quantization (golden statistics on emulate)."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw.host.ranges import (RangeEMA, UniformQuantizer, fake_quantize_uniform,
                                 quantize_uniform, uniform_params)


def test_uniform_params_by_hand():
    s, z = uniform_params(-1.0, 3.0, 8)
    assert s == 4.0 / 255 and z == 64            # -(-1)/(4/255) = 63.75 -> 64
    s, z = uniform_params(0.5, 2.0, 8)            # range widened to hold 0
    assert s == 2.0 / 255 and z == 0
    s, z = uniform_params(-2.0, -1.0, 4)
    assert s == 2.0 / 15 and z == 15
    assert uniform_params(0.0, 0.0, 8) == (1.0, 0)


def test_quantize_uniform_codes_and_clipping():
    x = np.array([-1.0, 0.0, 1.0, 3.0, 10.0, -5.0], np.float32)
    q, s, z = quantize_uniform(x, -1.0, 3.0, 8)
    assert q.dtype == np.uint8
    # codes: round(x * 63.75) + 64, clipped to [0, 255]
    assert q.tolist() == [0, 64, 128, 255, 255, 0]
    xh = fake_quantize_uniform(x, -1.0, 3.0, 8)
    assert xh[1] == 0.0                           # zero is exact
    assert xh[4] == np.float32(191 * 4.0 / 255)   # clipped at the top of the grid
    assert np.all(np.abs(xh[:4] - x[:4]) <= s / 2 + 1e-7)


@pytest.mark.parametrize("bad,msg", [
    (dict(lo=1.0, hi=0.0), "is empty"),
    (dict(lo=0.0, hi=np.inf), "not finite"),
    (dict(lo=0.0, hi=1.0, bits=1), "bits=1 is out of range"),
])
def test_uniform_params_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        uniform_params(**bad)


def test_ema_recurrence_by_hand():
    ema = RangeEMA(0.9)
    with pytest.raises(ValueError, match="no statistics"):
        ema.range
    ema.update(-1.0, 2.0)                       # initialised from the first batch
    assert ema.range == (-1.0, 2.0)
    ema.update(-3.0, 4.0)
    assert ema.range == pytest.approx((-1.2, 2.2))
    ema.update(0.0, 1.0)
    assert ema.range == pytest.approx((0.9 * -1.2, 0.9 * 2.2 + 0.1))
    with pytest.raises(ValueError, match="eta=1.0 is out of range"):
        RangeEMA(1.0)


def test_hindsight_uses_only_past_steps(rng):
    """Step t is quantized with the EMA of steps < t; step 0 with its own range."""
    q = UniformQuantizer("hindsight", 8, 0.9, keep_history=True)
    xs = [rng.standard_normal(100).astype(np.float32) * (1 + t) for t in range(5)]
    outs = [q(x) for x in xs]
    mins = [float(x.min()) for x in xs]
    maxs = [float(x.max()) for x in xs]
    lo, hi = mins[0], maxs[0]
    expected = [(mins[0], maxs[0])]
    for t in range(1, 5):
        expected.append((lo, hi))                 # fixed before x_t is seen
        lo, hi = 0.9 * lo + 0.1 * mins[t], 0.9 * hi + 0.1 * maxs[t]
    for (glo, ghi), (elo, ehi) in zip(q.history, expected):
        assert glo == pytest.approx(elo) and ghi == pytest.approx(ehi)
    # growing tensors: the stale range clips the new maximum
    assert outs[4].max() < xs[4].max()
    np.testing.assert_array_equal(outs[3], fake_quantize_uniform(xs[3], *expected[3]))


def test_dynamic_uses_current_range(rng):
    q = UniformQuantizer("dynamic", 8)
    for t in range(3):
        x = rng.standard_normal(50).astype(np.float32) * (t + 1)
        np.testing.assert_array_equal(q(x), fake_quantize_uniform(x, x.min(), x.max()))


def test_no_update_in_eval(rng):
    q = UniformQuantizer("hindsight", 8)
    q(np.array([-1.0, 1.0], np.float32))
    q(np.array([-10.0, 10.0], np.float32), update=False)
    assert q.ema.range == (-1.0, 1.0) and q.ema.steps == 1
    with pytest.raises(ValueError, match="method='static'"):
        UniformQuantizer("static")


def test_layer_activation_ranges_follow_ema(rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from hbfp_hw.host.torch import BFPLinear
    from hbfp_hw.host.ranges import hindsight_int8, dynamic_int8
    layer = BFPLinear(16, 8, weight_fmt=dynamic_int8(), act_fmt=hindsight_int8(),
                      grad_fmt=hindsight_int8())
    assert layer.act_fmt is not layer.grad_fmt   # each tensor has its own statistics
    xs = [rng.standard_normal((8, 16)).astype(np.float32) * (t + 1) for t in range(3)]
    for x in xs:
        xt = torch.from_numpy(x).requires_grad_()
        layer(xt).sum().backward()
    lo = 0.81 * xs[0].min() + 0.09 * xs[1].min() + 0.1 * xs[2].min()
    hi = 0.81 * xs[0].max() + 0.09 * xs[1].max() + 0.1 * xs[2].max()
    assert layer.act_fmt.ema.range == pytest.approx((lo, hi), rel=1e-6)
    # gradient of sum() is all ones: its range is [1, 1] every step
    assert layer.grad_fmt.ema.range == pytest.approx((1.0, 1.0))
    assert dict(layer.quant_calls) == {"act": 3, "weight": 3, "grad": 3}
