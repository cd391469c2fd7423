"""In-hindsight per-tensor int8 on the accelerator's datapath: StaticExpQuantizer.

One static BFP exponent per tensor (the device's QUANTIZE STATIC_EXP), chosen from the
EMA of past steps' min/max (in-hindsight) or from the tensor's own range (dynamic), the
min/max coming from the backend while it quantizes (the device's quantize-input range
tracker, READ_STATS QUANTIZE_INPUT). Checked against NumPy recomputations of the rule
and the golden ``quantize(..., exponent=E)``, and emulate against the device backends.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from hbfp_hw.formats import HBFP4, HBFP8  # noqa: E402
from hbfp_hw.quantize import quantize  # noqa: E402
from hbfp_hw.host.ranges import StaticExpQuantizer, exponent_for_range  # noqa: E402
from hbfp_hw.host.torch import (  # noqa: E402
    BFPLinear, DeviceBackend, EmulateBackend, bfp_layers, convert)

ETA = 0.9


def _floor_log2(a: float) -> int:
    """floor(log2 a) by exact comparison with powers of two (independent of frexp)."""
    e = 0
    while 2.0 ** e > a:
        e -= 1
    while 2.0 ** (e + 1) <= a:
        e += 1
    return e


def test_exponent_for_range_is_floor_log2_of_the_magnitude(rng):
    for _ in range(300):
        a = float(np.float32(rng.uniform(0.5, 2.0) * 2.0 ** rng.integers(-40, 40)))
        lo, hi = (-a, a * rng.uniform(0, 1)) if rng.random() < 0.5 else (-a * rng.random(), a)
        e = exponent_for_range(lo, hi, HBFP8)
        assert e == _floor_log2(a)
        assert 2.0 ** e <= a < 2.0 ** (e + 1)
    assert exponent_for_range(0.0, 0.0, HBFP8) == HBFP8.emin
    assert exponent_for_range(-0.0, 0.0, HBFP8) == HBFP8.emin
    assert exponent_for_range(0.0, 1.0, HBFP8) == 0
    assert exponent_for_range(-1.0, 0.99, HBFP8) == 0
    assert exponent_for_range(0.0, 0.99, HBFP8) == -1
    small = HBFP4.replace(exp_bits=4)
    assert exponent_for_range(0.0, 1e30, small) == small.emax
    assert exponent_for_range(0.0, 1e-30, small) == small.emin
    with pytest.raises(ValueError, match="not finite"):
        exponent_for_range(0.0, float("inf"), HBFP8)


def test_quantizer_validation():
    with pytest.raises(TypeError, match="must be a BFPFormat"):
        StaticExpQuantizer("hbfp8")
    with pytest.raises(ValueError, match="accepted values are 'dynamic', 'hindsight'"):
        StaticExpQuantizer(HBFP8, "ema")
    q = StaticExpQuantizer(HBFP8, "hindsight")
    with pytest.raises(ValueError, match="needs the tensor's own range"):
        q.exponent()
    mx = HBFP8.replace(block_axes=(-1,), block_shape=(32,))
    with pytest.raises(ValueError, match="needs HyperBlock"):
        BFPLinear(32, 16, fmt=StaticExpQuantizer(mx))
    with pytest.raises(ValueError, match="grad_stochastic needs a BFP gradient format"):
        BFPLinear(32, 16, fmt=StaticExpQuantizer(HBFP8), grad_stochastic=True)


class StaticRecorder(EmulateBackend):
    """Emulate backend that records each static quantization (input, exponent, result)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def _quantize_static(self, x, fmt, exponent):
        q, r = super()._quantize_static(x, fmt, exponent)
        t = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        self.log.append((t.astype(np.float32), exponent, q, r))
        return q, r


def _ema_exponents(tensors, fmt, method):
    """Expected exponent per step, recomputed from the tensors with NumPy."""
    out, lo, hi = [], None, None
    for t in tensors:
        tmin, tmax = float(t.min()), float(t.max())
        use = (tmin, tmax) if (method == "dynamic" or lo is None) else (lo, hi)
        out.append(_floor_log2(max(abs(use[0]), abs(use[1]))))
        lo, hi = (tmin, tmax) if lo is None else (ETA * lo + (1 - ETA) * tmin,
                                                 ETA * hi + (1 - ETA) * tmax)
    return out


@pytest.mark.parametrize("method", ["hindsight", "dynamic"])
def test_activation_exponents_follow_the_range_rule(method, rng):
    """A layer's activation exponent at each step is the rule applied to the EMA of the
    previous steps' min/max (hindsight) or to the step's own (dynamic); every block of
    the quantized X carries it and X equals the golden quantize(x, exponent=E)."""
    be = StaticRecorder()
    layer = BFPLinear(32, 16, weight_fmt=StaticExpQuantizer(HBFP8, "dynamic"),
                      act_fmt=StaticExpQuantizer(HBFP8, method),
                      grad_fmt=StaticExpQuantizer(HBFP8, method), backend=be)
    scales = [1.0, 3.0, 0.2, 40.0, 1.0]
    xs = [(rng.standard_normal((16, 32)) * s).astype(np.float32) for s in scales]
    for x in xs:
        layer(torch.from_numpy(x)).sum().backward()
    acts = [(e, q) for (t, e, q, _) in be.log if t.shape == (16, 32)
            and any(np.array_equal(t, x) for x in xs)]
    assert [e for e, _ in acts] == _ema_exponents(xs, HBFP8, method)
    for x, (e, q) in zip(xs, acts):
        assert (q.exponents == e).all()
        assert q.equal(quantize(x, HBFP8, exponent=e))
    if method == "hindsight":   # step 3's range comes from smaller past steps: saturation
        e3, q3 = acts[3]
        assert np.abs(q3.mantissas).max() == HBFP8.mmax
        assert np.abs(xs[3]).max() >= 2.0 ** (e3 + 1)


def test_eval_does_not_update_activation_statistics(rng):
    layer = BFPLinear(32, 16, fmt=StaticExpQuantizer(HBFP8, "hindsight"))
    x = torch.from_numpy(rng.standard_normal((16, 32)).astype(np.float32))
    layer(x).sum().backward()
    before = (layer.act_fmt.ema.lo, layer.act_fmt.ema.hi, layer.act_fmt.ema.steps)
    layer.eval()
    with torch.no_grad():
        layer(x * 100)
    assert (layer.act_fmt.ema.lo, layer.act_fmt.ema.hi, layer.act_fmt.ema.steps) == before
    assert layer.act_fmt.ema.steps == 1 and layer.weight_fmt.ema.steps >= 1


@pytest.mark.parametrize("method,passes", [("hindsight", (3, 1, 1)), ("dynamic", (3, 3, 3))])
def test_quantize_once_and_statistics_passes(method, passes, rng):
    """Each of X, W, dY quantized once per step; the dynamic range needs a statistics
    pass per tensor (an extra QUANTIZE on a device), in-hindsight only for the weights
    (whose current range the rule takes) and on the first step."""
    be = EmulateBackend()
    q = StaticExpQuantizer(HBFP8, method)
    model = convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                    None, weight_fmt=StaticExpQuantizer(HBFP8, "dynamic"), act_fmt=q,
                    grad_fmt=q, backend=be)
    layers = bfp_layers(model)
    assert all(lay.act_fmt is not q and lay.act_fmt.method == method for lay in layers)
    x = torch.from_numpy(rng.random((32, 64), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 32))
    for step, npass in enumerate(passes):
        be.calls.clear()
        nn.functional.cross_entropy(model(x), y).backward()
        assert be.calls["quantize_static"] == 3 * len(layers)
        assert be.calls["range_pass"] == npass * len(layers), step
        assert be.calls["matmul"] == 3 * len(layers) - 1    # the first layer needs no dX
        assert be.calls["quantize"] == 0
    for lay in layers:
        assert dict(lay.quant_calls) == {"act": 3, "weight": 3, "grad": 3}


def _train(backend, base, x, y, fmt, steps=3, method="hindsight"):
    q = StaticExpQuantizer(fmt, method, keep_history=True)
    m = convert(copy.deepcopy(base), None, weight_fmt=StaticExpQuantizer(fmt, "dynamic"),
                act_fmt=q, grad_fmt=q, backend=backend)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    hist = [(lay.act_fmt.history, lay.grad_fmt.history) for lay in bfp_layers(m)]
    return losses, [p.detach().clone() for p in m.parameters()], hist


def test_short_training_run_reaches_accuracy():
    """MLP, int8p2-hs (in-hindsight per-tensor int8), 5 epochs on digits: >= 93%."""
    from hbfp_hw.host.train import TrainConfig, train_one
    r = train_one("mlp", "int8p2-hs", 0, TrainConfig(epochs=5), progress=False)
    assert r.final >= 93.0, r.test_acc


def _tiny_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("method", ["hindsight", "dynamic"])
def test_emulate_url_device_equals_emulate(method, rng):
    """Through the host driver's emulate:// device (QUANTIZE STATIC_EXP, tiling, READ_STATS
    of the quantize-input tracker) a few training steps give the bits of the in-process
    golden model, with the same exponent/range history; every range the EMA folds in
    came from a READ_STATS answer."""
    x = torch.from_numpy(rng.random((32, 1, 8, 8), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 32))
    torch.manual_seed(1)
    base = _tiny_model()
    be = DeviceBackend("emulate://")
    reads = []
    orig = be.device.read_stats

    def spy(**kw):
        r = orig(**kw)
        reads.append((kw.get("source"), r))
        return r

    be.device.read_stats = spy
    l1, p1, h1 = _train(EmulateBackend(), base, x, y, HBFP8, method=method)
    l2, p2, h2 = _train(be, base, x, y, HBFP8, method=method)
    assert l1 == l2
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    assert h1 == h2 and all(len(a) == 3 for a, _ in h1)
    n = be.calls["quantize_static"]
    assert n == 3 * 3 * 3 and len(reads) == 2 * (n + be.calls["range_pass"])
    assert all(src == "quantize" for src, _ in reads)
    assert sum(r["count"] for _, r in reads) > 0


@pytest.mark.sweep
def test_sim_url_rtl_equals_emulate(rng):
    """The same on the RTL (sim://, the Amaranth simulation of the accelerator top,
    8x8 HBFP8 tiles): two in-hindsight steps of a small MLP, bit for bit."""
    from hbfp_hw.gateware.sim_device import SIM_CONFIG
    from hbfp_hw.host import open as open_device
    fmt = SIM_CONFIG.formats[0]
    x = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 4, 8))
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    # the first slot only (the simulator's speed falls with the design's size)
    be = DeviceBackend(open_device("sim://", config=SIM_CONFIG.replace(
        formats=SIM_CONFIG.formats[:1], name="hbfp_sim_one")))
    l1, p1, h1 = _train(EmulateBackend(), base, x, y, fmt, steps=2)
    l2, p2, h2 = _train(be, base, x, y, fmt, steps=2)
    assert l1 == l2 and h1 == h2
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    assert be.calls["quantize_static"] == 2 * 2 * 3
