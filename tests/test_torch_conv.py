"""BFPConv2d's HyperBlock convolution: bit for bit against hbfp_hw.conv, quantize once,
the forward's X reused by dW, conv modes and the device fallback."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from torch import nn  # noqa: E402

import hbfp_hw.host.torch as htorch  # noqa: E402
from hbfp_hw.conv import (ConvGeometry, bfp_conv2d, bfp_conv2d_input_grad,  # noqa: E402
                          bfp_conv2d_weight_grad, conv_format)
from hbfp_hw.formats import HBFP4, HBFP8, MXINT8  # noqa: E402
from hbfp_hw.host import torch_kernels  # noqa: E402
from hbfp_hw.host.ranges import StaticExpQuantizer  # noqa: E402
from hbfp_hw.host.torch import (BFPConv2d, DeviceBackend, EmulateBackend,  # noqa: E402
                                bfp_layers, conv_quantize, convert, fast_bfp_conv2d,
                                fast_bfp_conv2d_input_grad, fast_bfp_conv2d_weight_grad)
from hbfp_hw.quantize import NonFiniteBlockError, quantize  # noqa: E402


def _same(a, b, msg=""):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, msg
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=msg)


def _data(rng, shape, spread=6, zeros=0.1):
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread + 1, shape)
    x[rng.random(shape) < zeros] = 0.0
    return x.astype(np.float32)


# -- the PyTorch implementation against the golden model ---------------------------------

def _random_case(rng, trial):
    N, C, O = (int(v) for v in rng.integers(1, 20, 3))
    kh, kw = (int(v) for v in rng.integers(1, 4, 2))
    s = tuple(int(v) for v in rng.integers(1, 3, 2))
    p = tuple(int(v) for v in rng.integers(0, 3, 2))
    d = tuple(int(v) for v in rng.integers(1, 3, 2))
    H = int(rng.integers(max(1, d[0] * (kh - 1) + 1 - 2 * p[0]), 11))
    W = int(rng.integers(max(1, d[1] * (kw - 1) + 1 - 2 * p[1]), 11))
    blocks = tuple(int(v) for v in rng.choice([1, 2, 3, 4, 8, 16], 3))
    return (N, C, O, H, W, kh, kw), ConvGeometry.of(s, p, d), blocks


@pytest.mark.parametrize("spread", [0, 3, 12, 40])
def test_fast_conv_is_bit_identical(spread, rng):
    """Random shapes, strides 1-2, padding 0-2, dilation 1-2, blocks 1-16, 4/8/12-bit
    mantissas (12 bits: float64 block products), guard bits 0-16, invalid blocks: the
    three PyTorch convolutions equal hbfp_hw.conv's bit for bit."""
    for trial in range(16):
        (N, C, O, H, W, kh, kw), geo, (bn, bc, bo) = _random_case(rng, trial)
        fmt = (HBFP8, HBFP4, HBFP8.replace(man_bits=12))[trial % 3]
        G = (8, 0, 3, 16)[trial % 4]
        x = _data(rng, (N, C, H, W), spread)
        w = _data(rng, (O, C, kh, kw), spread)
        if trial % 5 == 4:
            x[0, 0, 0, 0] = np.nan
            w[-1, -1, 0, 0] = np.inf
        xq = quantize(x, conv_format(fmt, bn, bc), nonfinite="flag")
        wq = quantize(w, conv_format(fmt, bo, bc), nonfinite="flag")
        msg = f"trial {trial}: {(N, C, O, H, W, kh, kw)} {geo} blocks {(bn, bc, bo)} G={G}"
        y = bfp_conv2d(xq, wq, geometry=geo, guard_bits=G)
        _same(fast_bfp_conv2d(xq, wq, geo, guard_bits=G), y, msg)
        gq = quantize(_data(rng, y.shape, spread), conv_format(fmt, bn, bo))
        _same(fast_bfp_conv2d_input_grad(gq, wq, (H, W), geo, guard_bits=G),
              bfp_conv2d_input_grad(gq, wq, (H, W), geometry=geo, guard_bits=G), msg)
        _same(fast_bfp_conv2d_weight_grad(gq, xq, (kh, kw), geo, guard_bits=G),
              bfp_conv2d_weight_grad(gq, xq, (kh, kw), geometry=geo, guard_bits=G), msg)


@pytest.mark.parametrize("fmt", [HBFP4, HBFP8])
def test_fast_conv_digits_cnn_shapes(fmt, rng):
    """The digits CNN's layers (batch 32, 1->16 and 16->32 channels, 3x3, padding 1),
    ReLU-like inputs and small gradients: every summation path of the PyTorch
    implementation (one float32 sum, float32 runs added in float64, float64)."""
    for C, O in ((1, 16), (16, 32)):
        fx, fw = conv_format(fmt), conv_format(fmt)
        x = np.maximum(_data(rng, (32, C, 8, 8), 3), 0)
        xq, wq = quantize(x, fx), quantize(_data(rng, (O, C, 3, 3), 3), fw)
        gq = quantize(_data(rng, (32, O, 8, 8), 8) * np.float32(1e-3),
                      conv_format(fmt).replace(rounding="stochastic", seed=C))
        geo = ConvGeometry.of(1, 1, 1)
        _same(fast_bfp_conv2d(xq, wq, geo), bfp_conv2d(xq, wq, geometry=geo))
        _same(fast_bfp_conv2d_input_grad(gq, wq, (8, 8), geo),
              bfp_conv2d_input_grad(gq, wq, (8, 8), geometry=geo))
        _same(fast_bfp_conv2d_weight_grad(gq, xq, (3, 3), geo),
              bfp_conv2d_weight_grad(gq, xq, (3, 3), geometry=geo))


def test_fast_conv_rejects_what_the_golden_model_rejects(rng):
    xq = quantize(_data(rng, (4, 4, 5, 5)), conv_format(HBFP8, 2, 4))
    wq = quantize(_data(rng, (4, 4, 3, 3)), conv_format(HBFP8, 2, 2))
    with pytest.raises(ValueError, match="channel block"):
        fast_bfp_conv2d(xq, wq, ConvGeometry())
    with pytest.raises(ValueError, match="spatial axis"):
        fast_bfp_conv2d(xq, quantize(_data(rng, (4, 4, 3, 3)), HBFP8), ConvGeometry())


@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero",
                                      "stochastic"])
def test_conv_quantize_is_the_golden_quantizer(rounding, rng):
    """4-D operands blocked over (samples x channels) at each position through the 2-D
    quantizer: the same bits (stochastic streams too), padding on N and C, tiny and
    huge values; NaN/Inf raise the golden model's error."""
    for shape, blk, lanes in [((20, 5, 3, 4), (8, 4), 1), ((32, 16, 8, 8), (16, 16), 3),
                              ((3, 33, 2, 5), (2, 16), 2), ((7, 1, 6, 6), (16, 16), 1)]:
        x = _data(rng, shape, spread=40, zeros=0.2)
        x.flat[0] = 1e-40                                 # a subnormal
        fmt = conv_format(HBFP4 if lanes == 2 else HBFP8, *blk).replace(
            rounding=rounding, sr_lanes=lanes, seed=int(rng.integers(2**32)))
        ref = quantize(x, fmt)
        got = conv_quantize(torch.from_numpy(x), fmt)
        assert got.equal(ref), (shape, blk)
        assert got.fmt is fmt and got.shape == shape
    x[1, 0, 2, 3] = np.inf
    with pytest.raises(NonFiniteBlockError) as e:
        conv_quantize(torch.from_numpy(x), fmt)
    with pytest.raises(NonFiniteBlockError) as e2:
        quantize(x, fmt)
    assert str(e.value) == str(e2.value)


# -- the layer: bit for bit, quantize once -----------------------------------------------

class RecordingBackend(EmulateBackend):
    """Emulate backend (per-call path: a subclass) recording quantized tensors and the
    operands of every convolution."""

    def __init__(self):
        super().__init__()
        self.quantized, self.convs = [], []

    def _quantize(self, x, fmt):
        q = super()._quantize(x, fmt)
        self.quantized.append(q)
        return q

    def _conv2d(self, xq, wq, geometry):
        self.convs.append(("y", xq, wq))
        return super()._conv2d(xq, wq, geometry)

    def _conv2d_input_grad(self, gq, wq, input_size, geometry):
        self.convs.append(("dx", gq, wq))
        return super()._conv2d_input_grad(gq, wq, input_size, geometry)

    def _conv2d_weight_grad(self, gq, xq, kernel_size, geometry):
        self.convs.append(("dw", gq, xq))
        return super()._conv2d_weight_grad(gq, xq, kernel_size, geometry)


_LAYERS = [
    # C, O, k, stride, padding, dilation, formats (act, weight, grad), bias
    (16, 32, 3, 1, 1, 1, (HBFP8, HBFP8, HBFP8), True),
    (3, 5, (3, 2), (2, 1), (0, 2), (1, 2), (HBFP4, HBFP4, HBFP4), True),
    (20, 7, 2, 2, 1, 2, (HBFP8, HBFP4, HBFP4), False),
    # Bn = 8, Bc = 4, Bo = 2: act (batch x in) 8x4, weight (out x in) 2x4, grad 8x2
    (5, 9, 3, 1, 2, 1, (HBFP4.replace(block_shape=(8, 4)), HBFP4.replace(block_shape=(2, 4)),
                        HBFP4.replace(block_shape=(8, 2))), True),
]


@pytest.mark.parametrize("path", ["direct", "per_call"])
@pytest.mark.parametrize("case", _LAYERS)
@pytest.mark.parametrize("sr", [False, True])
def test_layer_equals_golden_conv(case, path, sr, rng):
    """Y, dX, dW (and db) of BFPConv2d equal hbfp_hw.conv on quantize(X), quantize(W),
    quantize(dY) with the layer's per-step formats, for two steps (stochastic gradients
    and input with new seeds each step)."""
    C, O, k, s, p, d, (fa, fw, fg), bias = case
    be = "emulate" if path == "direct" else RecordingBackend()
    layer = BFPConv2d(C, O, k, stride=s, padding=p, dilation=d, bias=bias, act_fmt=fa,
                      weight_fmt=fw, grad_fmt=fg, backend=be, grad_stochastic=sr,
                      act_stochastic=sr, seed=7, layer_id=2)
    assert layer.conv_mode == "hyperblock"
    geo = layer.geometry
    for step in range(2):
        htorch.fused_calls.clear()
        x = _data(rng, (18, C, 9, 8), spread=4)
        xt = torch.from_numpy(x).requires_grad_()
        fx = conv_format(layer._act_fmt_for_step())
        y = layer(xt)
        dy = _data(rng, tuple(y.shape), spread=4)
        fgs = conv_format(layer._grad_fmt_for_step())
        assert fgs.rounding == ("stochastic" if sr else "nearest_even")
        y.backward(torch.from_numpy(dy))
        w = layer.weight.detach().numpy()
        xq, wq = quantize(x, fx), quantize(w, conv_format(fw))
        gq = quantize(dy, fgs)
        ref = bfp_conv2d(xq, wq, geometry=geo)
        if bias:
            ref = (torch.from_numpy(ref) + layer.bias.detach().view(1, -1, 1, 1)).numpy()
        _same(y.detach().numpy(), ref, f"Y step {step}")
        _same(xt.grad.numpy(), bfp_conv2d_input_grad(gq, wq, (9, 8), geometry=geo),
              f"dX step {step}")
        _same(layer.weight.grad.numpy(),
              bfp_conv2d_weight_grad(gq, xq, layer.kernel_size, geometry=geo),
              f"dW step {step}")
        if bias:
            assert torch.equal(layer.bias.grad, torch.from_numpy(dy).sum(dim=(0, 2, 3)))
        layer.zero_grad()
        direct = path == "direct" and torch_kernels.ENABLED
        assert htorch.fused_calls == ({"forward": 1, "backward": 1} if direct else {})
    assert layer._step == 2


def test_three_quantizations_per_step_and_dw_reuses_the_forward_x(rng):
    """Per conv layer and step exactly 3 quantizations (X, W, dY); the X and W objects
    that served the forward are the ones dW and dX use; no GEMM is called."""
    be = RecordingBackend()
    model = convert(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16 * 4 * 4, 10)), HBFP4,
                    backend=be, grad_stochastic=True)
    conv1, conv2, fc = bfp_layers(model)
    x = torch.from_numpy(rng.random((24, 1, 8, 8), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 24))
    for step in range(2):
        be.quantized.clear()
        be.convs.clear()
        nn.functional.cross_entropy(model(x), y).backward()
        for layer in (conv1, conv2, fc):
            assert dict(layer.quant_calls) == {"act": step + 1, "weight": step + 1,
                                               "grad": step + 1}
        assert len(be.quantized) == 9
        ids = {id(q) for q in be.quantized}
        # forward conv1, conv2; backward conv2 dX, dW; conv1 dW (input layer: no dX)
        kinds = [k for k, _, _ in be.convs]
        assert sorted(kinds) == ["dw", "dw", "dx", "y", "y"]
        (_, x1, w1), (_, x2, w2) = [c for c in be.convs if c[0] == "y"]
        dws = [c for c in be.convs if c[0] == "dw"]
        dx2 = [c for c in be.convs if c[0] == "dx"][0]
        assert {id(c[2]) for c in dws} == {id(x1), id(x2)}          # the very forward X
        assert dx2[2] is w2                                        # the very forward W
        for _, a, b in be.convs:
            assert id(a) in ids and id(b) in ids                   # no other quantization
        assert [q.ndim for q in be.quantized].count(4) == 6
        assert all(q.fmt.block_axes == (0, 1) for q in be.quantized if q.ndim == 4)
    assert be.calls["quantize"] == 18 and be.calls["matmul"] == 2 * 3   # fc only


def test_direct_path_reuses_the_forward_x(rng, monkeypatch):
    """The same on the direct path (plain emulate backend): three conv_quantize calls per
    conv layer and step, and dW receives the forward's quantized X object."""
    if not torch_kernels.ENABLED:
        pytest.skip("the direct path needs the compiled kernels")
    seen = {"q": [], "y": [], "dw": []}
    q0, y0, b0 = htorch._conv_operand, htorch._conv_forward, htorch._conv_backward

    def q(x, fmt):
        r = q0(x, fmt)
        seen["q"].append(r)
        return r

    def y(xq, wq, geo, **kw):
        seen["y"].append(xq)
        return y0(xq, wq, geo, **kw)

    def bw(gq, wq, xq, *a, **kw):
        seen["dw"].append(xq)
        return b0(gq, wq, xq, *a, **kw)

    monkeypatch.setattr(htorch, "_conv_operand", q)
    monkeypatch.setattr(htorch, "_conv_forward", y)
    monkeypatch.setattr(htorch, "_conv_backward", bw)
    layer = BFPConv2d(4, 6, 3, padding=1, fmt=HBFP8, grad_stochastic=True)
    x = torch.from_numpy(rng.standard_normal((8, 4, 6, 6)).astype(np.float32))
    layer(x).square().sum().backward()
    assert len(seen["q"]) == 3 and seen["dw"][0] is seen["y"][0] is seen["q"][0]
    assert dict(layer.quant_calls) == {"act": 1, "weight": 1, "grad": 1}
    assert layer.backend.calls == {"quantize": 3, "conv2d": 1, "conv2d_weight_grad": 1,
                                   "conv2d_input_grad": 0}


def test_direct_and_per_call_paths_train_identically(rng, monkeypatch):
    """Three CNN training steps: the direct path, the per-call path (a backend subclass)
    and the pure-PyTorch fallback without the compiled kernels give the same weights."""
    from hbfp_hw.host.train import format_kwargs, make_model
    x = torch.from_numpy(rng.random((32, 1, 8, 8), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 32))
    torch.manual_seed(0)
    base = make_model("cnn")
    finals = []
    for be, enabled in (("emulate", True), (RecordingBackend(), True), ("emulate", False)):
        monkeypatch.setattr(torch_kernels, "ENABLED", enabled and torch_kernels.HAVE_NUMBA)
        m = convert(copy.deepcopy(base), backend=be, seed=3, **format_kwargs("hb4"))
        assert [la.conv_mode for la in bfp_layers(m)[:2]] == ["hyperblock"] * 2
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        finals.append([p.detach().clone() for p in m.parameters()])
    for ps in finals[1:]:
        for a, b in zip(finals[0], ps):
            assert torch.equal(a, b)


def test_hyperblock_and_im2col_modes_differ(rng):
    """The two modes quantize different tensors (X per position vs im2col tiles), so
    their results differ; both are close to FP32."""
    x = torch.from_numpy(_data(rng, (32, 16, 8, 8), spread=2, zeros=0.0))
    torch.manual_seed(0)
    ref = nn.Conv2d(16, 32, 3, padding=1)
    outs = {}
    for mode in ("hyperblock", "im2col_tiles"):
        layer = convert(copy.deepcopy(nn.Sequential(ref)), HBFP8, conv_mode=mode)[0]
        assert layer.conv_mode == mode
        outs[mode] = layer(x).detach()
    fp32 = ref(x).detach()
    assert not torch.equal(outs["hyperblock"], outs["im2col_tiles"])
    for o in outs.values():
        assert float((o - fp32).abs().max()) < 0.05 * float(fp32.abs().max())


# -- modes and the device fallback -------------------------------------------------------

class GoldenDevice:
    """A Device-API object (quantize, matmul_q) backed by the golden model."""

    def __init__(self):
        self.n_quantize = self.n_matmul = 0

    def quantize(self, x, fmt):
        from hbfp_hw.quantize import quantize
        self.n_quantize += 1
        return quantize(x, fmt)

    def matmul_q(self, a, b):
        from hbfp_hw.gemm import bfp_matmul
        self.n_matmul += 1
        return bfp_matmul(a, b)


def test_conv_modes_and_device_fallback(rng):
    """Defaults: HyperBlock formats on emulate run the HyperBlock convolution; MX, int and
    static-exponent roles the im2col-tile GEMMs. A device backend (no convolution
    command) falls back to the im2col-tile GEMMs on the device, with a warning; asking
    for 'hyperblock' there is an error."""
    assert BFPConv2d(4, 4, 3, fmt=HBFP4).conv_mode == "hyperblock"
    assert BFPConv2d(4, 4, 3, fmt=MXINT8).conv_mode == "im2col_tiles"
    st = StaticExpQuantizer(HBFP8, "hindsight")
    assert BFPConv2d(4, 4, 3, fmt=None, weight_fmt=st, act_fmt=st,
                     grad_fmt=st).conv_mode == "im2col_tiles"
    assert BFPConv2d(4, 4, 3, fmt=HBFP8, conv_mode="im2col_tiles").conv_mode == "im2col_tiles"
    with pytest.raises(ValueError, match="accepted values are 'hyperblock', 'im2col_tiles'"):
        BFPConv2d(4, 4, 3, conv_mode="winograd")
    with pytest.raises(ValueError, match="needs HyperBlock"):
        BFPConv2d(4, 4, 3, fmt=MXINT8, conv_mode="hyperblock")
    dev = GoldenDevice()
    be = DeviceBackend(dev)
    assert not be.supports_conv and EmulateBackend.supports_conv
    with pytest.raises(ValueError, match="has no HyperBlock convolution"):
        BFPConv2d(4, 4, 3, fmt=HBFP8, backend=be, conv_mode="hyperblock")
    with pytest.warns(UserWarning, match="runs its im2col-tile GEMMs"):
        layer = BFPConv2d(4, 6, 3, padding=1, fmt=HBFP8, backend=be)
    assert layer.conv_mode == "im2col_tiles" and "conv_mode=im2col_tiles" in repr(layer)
    x = torch.from_numpy(rng.standard_normal((8, 4, 6, 6)).astype(np.float32))
    xt = x.clone().requires_grad_()
    layer(xt).square().sum().backward()
    # the step ran on the device: 3 quantizations and 3 GEMMs, no convolution call
    assert (dev.n_quantize, dev.n_matmul) == (3, 3)
    assert be.calls["matmul"] == 3 and not any(k.startswith("conv") for k in be.calls)
    # and it is the emulate backend's im2col-tile result, bit for bit
    ref = BFPConv2d(4, 6, 3, padding=1, fmt=HBFP8, conv_mode="im2col_tiles")
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    assert torch.equal(xr.grad, xt.grad) and torch.equal(ref.weight.grad, layer.weight.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BFPConv2d(4, 4, 3, fmt=HBFP8, backend=be, conv_mode="im2col_tiles")   # no warning


def test_cnn_trains_with_hyperblock_4bit_convolutions():
    """The digits CNN, all roles HBFP4 with HyperBlock convolutions, 3 epochs: >= 90%."""
    pytest.importorskip("sklearn")
    from hbfp_hw.host.train import TrainConfig, train_one
    r = train_one("cnn", "hb4", 0, TrainConfig(epochs=3), progress=False)
    assert r.final >= 90.0, r.test_acc


def test_train_formats_and_blocks_option(capsys):
    """hbfp-hw train: the '-im2col' names pin the im2col-tile convolution, the plain names
    run HyperBlock convolutions; --blocks BNxBC re-blocks the HyperBlock roles (X, dY
    Bn x Bc, W Bc x Bc) and is refused for other formats."""
    pytest.importorskip("sklearn")
    from hbfp_hw.cli import main
    from hbfp_hw.host.train import FORMAT_NAMES, format_kwargs, make_model
    assert {"hbfp8-im2col", "hb4-im2col"} <= set(FORMAT_NAMES)
    assert format_kwargs("hb4-im2col") == dict(format_kwargs("hb4"), conv_mode="im2col_tiles")
    for name, mode in (("hb4", "hyperblock"), ("hb4-im2col", "im2col_tiles"),
                       ("hbfp8", "hyperblock"), ("mxint8", "im2col_tiles")):
        m = convert(make_model("cnn"), **format_kwargs(name))
        assert [la.conv_mode for la in bfp_layers(m)[:2]] == [mode, mode], name
    kw = format_kwargs("hb4-in8", (8, 16))
    assert kw["act_fmt"].block_shape == (8, 16) and kw["grad_fmt"].block_shape == (8, 16)
    assert kw["weight_fmt"].block_shape == (16, 16) and kw["weight_fmt"].man_bits == 4
    assert kw["input_act_fmt"].block_shape == (8, 16) and kw["input_act_fmt"].man_bits == 8
    conv = bfp_layers(convert(make_model("cnn"), **format_kwargs("hb4", (8, 16))))[1]
    assert conv.conv_mode == "hyperblock"
    assert conv_format(conv.act_fmt).block_shape == (8, 16)
    with pytest.raises(ValueError, match="HyperBlock formats"):
        format_kwargs("mxint8", (8, 16))
    assert main(["train", "--formats", "hb4", "--blocks", "8by16"]) == 2
    assert "accepted form is BNxBC" in capsys.readouterr().err
