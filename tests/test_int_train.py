"""Integer-GEMM training (hbfp_hw.host.torch_int, ``hbfp-hw train --formats int8-hs``):
every GEMM of a step against an exact scalar (Fraction) reference, the in-hindsight
ranges fed by the GEMM output statistics, and steps on emulate:// (here) and sim://
(sweep) bit-identical with the in-process golden path."""

from __future__ import annotations

import copy
import time
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from hbfp_hw.host.torch_int import (ACT_FORMAT, IntConv2d, IntLinear,  # noqa: E402
                                    convert_int, int_layers, quantize_weight)
from hbfp_hw.intgemm import quantize_int, round_fp32_exact  # noqa: E402


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.int32)


def _ref_gemm(ca, ua, cw, uw) -> np.ndarray:
    """Scalar reference: exact Python-int sums, ``S = fp32(ua * uw)``, one rounding."""
    S = Fraction(float(np.float32(Fraction(float(ua)) * Fraction(float(uw)))))
    M, N = ca.shape[0], cw.shape[0]
    out = np.empty((M, N), np.float32)
    for m in range(M):
        for n in range(N):
            acc = sum(int(a) * int(b) for a, b in zip(ca[m], cw[n]))
            out[m, n] = round_fp32_exact(Fraction(acc) * S)
    return out


def test_weight_grid_is_symmetric_int8_per_tensor(rng):
    w = rng.standard_normal((5, 7)) * 0.3
    w[2, 3] = -np.abs(w).max() * 1.0            # the extreme is negative
    t = quantize_weight(w)
    c, u = t.operand()
    s = np.float32(np.abs(w).max() / 127)
    assert u == s and t.z2 == 256 and c.min() == -127 and np.abs(c).max() == 127
    for v, ci in zip(w.ravel(), c.ravel()):      # c = clip(rint(w / s)) element by element
        r = Fraction(float(v)) / Fraction(float(s))
        fl = r.numerator // r.denominator
        frac = r - fl
        near = fl + (1 if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and fl % 2) else 0)
        assert ci == max(-127, min(127, near))
    z = quantize_weight(np.zeros((2, 3)))
    assert z.scale == 1.0 and np.all(z.operand()[0] == 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(np.array([[np.nan]]))


def _lin_step(layer, x, seed=0):
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    return xt, y, dy.numpy()


def test_linear_step_against_scalar_reference(rng):
    """Forward, dX and dW of IntLinear each equal the scalar exact GEMM of the quantized
    operands (the quantizers' ranges read back from the layer's history)."""
    torch.manual_seed(0)
    layer = IntLinear(6, 4, method="dynamic", keep_history=True)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    xt, y, dy = _lin_step(layer, x)
    w = layer.weight.detach().numpy()
    xq = quantize_int(x, ACT_FORMAT, lo=x.min(), hi=x.max())
    assert layer.act_range.history[0][:2] == (float(x.min()), float(x.max()))
    gq = quantize_int(dy, ACT_FORMAT, lo=dy.min(), hi=dy.max())
    wq = quantize_weight(w)
    (ca, ua), (cw, uw), (cg, ug) = xq.operand(), wq.operand(), gq.operand()
    y_ref = _ref_gemm(ca, ua, cw, uw)
    b = layer.bias.detach().numpy()
    assert np.array_equal(_bits(y.detach().numpy()), _bits(y_ref + b))
    assert np.array_equal(_bits(xt.grad.numpy()), _bits(_ref_gemm(cg, ug, cw.T, uw)))
    assert np.array_equal(_bits(layer.weight.grad.numpy()), _bits(_ref_gemm(cg.T, ug, ca.T,
                                                                            ua)))
    assert np.array_equal(layer.bias.grad.numpy(), dy.sum(0))
    # the layer's FP32 output range is the exact min/max of the GEMM output
    assert layer.out_range == (float(y_ref.min()), float(y_ref.max()))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_conv_step_against_exact_integer_convolutions(rng, stride, padding):
    """IntConv2d: the integer sums of the forward, transposed and weight convolutions
    equal float64 convolutions of the integer operands (exact below 2**53), and each
    output is one FP32 rounding of sum * S (scalar reference on every element)."""
    torch.manual_seed(1)
    layer = IntConv2d(2, 3, 3, stride=stride, padding=padding, method="dynamic")
    x = rng.standard_normal((2, 2, 6, 5)).astype(np.float32)
    xt, y, dy = _lin_step(layer, x, seed=2)
    xq = quantize_int(x, ACT_FORMAT, lo=x.min(), hi=x.max())
    gq = quantize_int(dy, ACT_FORMAT, lo=dy.min(), hi=dy.max())
    wq = quantize_weight(layer.weight.detach().numpy())
    (ca, ua), (cw, uw), (cg, ug) = xq.operand(), wq.operand(), gq.operand()
    T = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    F = torch.nn.functional
    acc_y = F.conv2d(T(ca), T(cw), stride=stride, padding=padding).numpy()
    acc_dx = torch.nn.grad.conv2d_input(x.shape, T(cw), T(cg), stride=stride,
                                        padding=padding).numpy()
    acc_dw = torch.nn.grad.conv2d_weight(T(ca), cw.shape, T(cg), stride=stride,
                                         padding=padding).numpy()

    def rounded(acc, u1, u2):
        S = Fraction(float(np.float32(Fraction(float(u1)) * Fraction(float(u2)))))
        return np.vectorize(lambda v: round_fp32_exact(Fraction(int(v)) * S),
                            otypes=[np.float32])(acc)
    b = layer.bias.detach().numpy().reshape(1, -1, 1, 1)
    assert np.array_equal(_bits(y.detach().numpy()), _bits(rounded(acc_y, ua, uw) + b))
    assert np.array_equal(_bits(xt.grad.numpy()), _bits(rounded(acc_dx, ug, uw)))
    assert np.array_equal(_bits(layer.weight.grad.numpy()), _bits(rounded(acc_dw, ug, ua)))


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5),
                         nn.ReLU(), nn.Linear(5, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


def _train(model, xs, ys, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xs[i]), ys[i])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _data(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(shape, generator=g) for _ in range(steps)],
            [torch.randint(0, 3, (shape[0],), generator=g) for _ in range(steps)])


def test_hindsight_ranges_come_from_the_gemm_statistics():
    """Linked layers fold the producing GEMM's output statistics (forward output plus the
    bias range for the next layer's X, the next layer's dX for dY): no host reduction of
    a GEMM output; the model input and the loss gradient are reduced on the host."""
    torch.manual_seed(0)
    model = convert_int(_mlp(), "hindsight", keep_history=True)
    l1, l2, l3 = int_layers(model)
    assert (l1.int_next, l2.int_prev, l2.int_next, l3.int_prev) == (l2, l1, l3, l2)
    xs, ys = _data((4, 12), 3)
    seen = []
    orig = l2.act_range.push
    l2.act_range.push = lambda lo, hi: (seen.append((lo, hi)), orig(lo, hi))
    _train(model, xs, ys, 3)
    b1 = l1.bias.detach()
    assert l2.act_range.host_reductions == 0 and l2.act_range.device_stats == 3
    assert l1.grad_range.host_reductions == 0 and l2.grad_range.host_reductions == 0
    assert l1.act_range.host_reductions == 3 and l3.grad_range.host_reductions == 3
    # step 0 quantizes with the producer's range; later steps with the EMA of past steps
    h = l2.act_range.history
    assert h[0][:2] == seen[0] and [e[2] for e in h] == ["producer"] * 3
    ema = seen[0]
    for t in (1, 2):
        assert h[t][:2] == pytest.approx(ema, rel=0, abs=0)
        ema = tuple(0.9 * e + 0.1 * s for e, s in zip(ema, seen[t]))
    assert l2.act_range.ema.range == pytest.approx(ema, rel=1e-15)
    # the pushed statistic is [min Y + min b, max Y + max b] (b after the last update:
    # compare the final step's push with the recorded output range and the bias then)
    lo, hi = l1.out_range
    assert seen[-1][0] <= lo + float(b1.max()) and seen[-1][1] >= hi + float(b1.min())
    # dynamic ranges never use the statistics
    dyn = convert_int(_mlp(), "dynamic")
    _train(dyn, xs, ys, 1)
    assert all(la.act_range.device_stats == 0 for la in int_layers(dyn))


def test_unlinked_layers_and_errors():
    for mid in (nn.Tanh(), nn.Dropout(0.5)):        # not range-preserving: no link
        m = nn.Sequential(nn.Linear(4, 4), mid, nn.Linear(4, 2))
        convert_int(m)
        a, b = int_layers(m)
        assert a.int_next is None and b.int_prev is None
    with pytest.raises(ValueError, match="method='static'"):
        convert_int(_mlp(), "static")
    with pytest.raises(ValueError, match="backend='emu'"):
        convert_int(_mlp(), backend="emu")
    with pytest.raises(TypeError, match="float32 input"):
        IntLinear(2, 2)(torch.zeros(1, 2, dtype=torch.float64))
    skip = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(2, 2, 3, dilation=2))
    convert_int(skip)
    assert int_layers(skip) == []


def _same_training(url, make, shape, steps):
    torch.manual_seed(0)
    base = make()
    xs, ys = _data(shape, steps)
    gold = convert_int(copy.deepcopy(base), "hindsight")
    dev = convert_int(copy.deepcopy(base), "hindsight", backend=url)
    lg = _train(gold, xs, ys, steps)
    ld = _train(dev, xs, ys, steps)
    assert lg == ld
    for (n, p), (_, q) in zip(gold.named_parameters(), dev.named_parameters()):
        assert torch.equal(p, q), n
    for la, lb in zip(int_layers(gold), int_layers(dev)):
        assert la.act_range.ema.range == lb.act_range.ema.range
        assert la.grad_range.ema.range == lb.grad_range.ema.range
    assert dev.int_engine.on_device and dev.int_engine.gemms == gold.int_engine.gemms > 0
    return dev


def test_training_on_emulate_device_is_bit_identical():
    """Two steps of an MLP and a CNN with every GEMM on emulate:// (BITLAYER, K chunks
    accumulated on the device, statistics from READ_STATS INT_OUTPUT) equal the golden
    path bit for bit: parameters, losses and hindsight ranges."""
    for make, shape in ((_mlp, (6, 12)), (_cnn, (5, 1, 4, 4))):
        dev = _same_training("emulate://", make, shape, 2)
        counters = dev.int_engine.device.transport.device.counters
        gemms = dev.int_engine.gemms
        assert counters["BITLAYER"] >= gemms and counters["READ_STATS"] == 2 * gemms


@pytest.mark.sweep
def test_training_on_sim_device_is_bit_identical():
    """One step of a small MLP on sim:// (the accelerator RTL) equals the golden path."""
    t0 = time.perf_counter()
    _same_training("sim://", lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(),
                                                   nn.Linear(4, 3)), (3, 5), 1)
    print(f"sim:// training step: {time.perf_counter() - t0:.0f} s")
