"""The layers' fake-quantization mode: scheme formats (fp32, and any registered format)
in some roles, FP32 GEMMs/convolutions on the quantized operands."""

from dataclasses import dataclass, replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from hbfp_hw import FP32, HBFP4, dequantize, get_format, quantize  # noqa: E402
from hbfp_hw.conv import conv_format  # noqa: E402
from hbfp_hw.formats import FP32Tensor  # noqa: E402
from hbfp_hw.host.torch import BFPConv2d, BFPLinear, convert  # noqa: E402


@dataclass(frozen=True)
class Halves:
    """A toy scheme format: values rounded to multiples of ``step`` (with a hook that
    records what the layer passed)."""

    step: float = 0.5
    name: str = "halves"
    calls: tuple = ()

    def replace(self, **kw):
        return replace(self, **kw)

    def quantize_array(self, x):
        return FP32Tensor(np.round(np.asarray(x, np.float32) / self.step).astype(np.float32)
                          * np.float32(self.step), FP32)


@dataclass(frozen=True)
class Recording(Halves):
    log: list = None

    def train_quantize(self, x, *, role, seed, state, update):
        state["n"] = state.get("n", 0) + 1
        self.log.append((role, x.shape, seed, state["n"], update))
        return np.asarray(self.quantize_array(x).dequantize())


def _pair(layer_cls, ref_cls, args, conv=None, **kw):
    torch.manual_seed(0)
    ref = ref_cls(*args, **(conv or {}))
    q = layer_cls(*args, **(conv or {}), **kw)
    q.load_state_dict(ref.state_dict())
    return ref, q


def test_fp32_roles_match_torch_exactly():
    ref, q = _pair(BFPLinear, nn.Linear, (12, 5), fmt=FP32)
    assert q._mode == "fake"
    x = torch.randn(7, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), q(x2)
    torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)


def test_conv_fp32_roles_match_torch():
    ref, q = _pair(BFPConv2d, nn.Conv2d, (3, 4, 3), conv=dict(stride=2, padding=1),
                   fmt=FP32)
    assert q.conv_mode == "fake"
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), q(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)


def test_operands_are_quantized_in_their_roles():
    """X in a scheme format, W in HBFP4, dY in FP32: each GEMM on the quantized values,
    checked against float64 products of independently quantized operands."""
    torch.manual_seed(1)
    q = BFPLinear(20, 6, bias=False, act_fmt=Halves(), weight_fmt=HBFP4, grad_fmt=FP32)
    x = torch.randn(5, 20, requires_grad=True) * 3
    x.retain_grad()
    y = q(x)
    xq = np.round(x.detach().numpy() / 0.5) * 0.5
    wq = dequantize(quantize(q.weight.detach().numpy(), HBFP4)).astype(np.float64)
    np.testing.assert_allclose(y.detach().numpy(), xq @ wq.T, rtol=1e-5, atol=1e-5)
    g = torch.randn(5, 6)
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy().astype(np.float64) @ wq, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(q.weight.grad.numpy(), g.numpy().astype(np.float64).T @ xq,
                               rtol=1e-5, atol=1e-5)


def test_conv_bfp_role_takes_conv_blocking():
    torch.manual_seed(2)
    q = BFPConv2d(3, 4, 3, padding=1, bias=False, act_fmt=HBFP4, weight_fmt=HBFP4,
                  grad_fmt=FP32)
    x = torch.randn(2, 3, 5, 5)
    y = q(x)
    xq = dequantize(quantize(x.numpy(), conv_format(HBFP4)))
    wq = dequantize(quantize(q.weight.detach().numpy(), conv_format(HBFP4)))
    ref = torch.nn.functional.conv2d(torch.from_numpy(xq), torch.from_numpy(wq), padding=1)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)


def test_train_quantize_hook_sees_roles_seeds_state():
    log = []
    fmt = Recording(log=log)
    model = convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), fmt, seed=7)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
    model.eval()
    with torch.no_grad():
        model(torch.randn(5, 4))
    roles = [(r, s) for r, s, *_ in log]
    assert roles[:4] == [("act", (5, 4)), ("weight", (3, 4)), ("act", (5, 3)),
                         ("weight", (2, 3))]
    assert ("grad", (5, 2)) in roles and ("grad", (5, 3)) in roles
    seeds = [s for _, _, s, _, _ in log]
    assert len(set(seeds)) == len(seeds)          # per layer, step and role
    # state: private per (layer, role), persistent across steps
    first_act = [n for r, shape, _, n, _ in log if r == "act" and shape == (5, 4)]
    assert first_act == [1, 2, 3]
    assert [u for r, *_, u in log if r == "act"][-2:] == [False, False]


def test_fake_mode_errors():
    from hbfp_hw.host.ranges import dynamic_int8
    with pytest.raises(TypeError, match="not int quantizers"):
        BFPLinear(3, 2, weight_fmt=FP32, act_fmt=dynamic_int8(), grad_fmt=FP32)
    with pytest.raises(ValueError, match="conv_mode='hyperblock'"):
        BFPConv2d(1, 1, 3, fmt=FP32, conv_mode="hyperblock")
    assert get_format("fp32") is FP32


def test_train_format_tables(monkeypatch):
    """The trainer takes the schemes' TRAIN_FORMATS; a name defined twice is an error."""
    import sys
    import types

    from hbfp_hw.host import train
    mod = types.ModuleType("hbfp_hw.host.train_toy")
    mod.TRAIN_FORMATS = {"toy-fp32": ("all roles fp32 (fake mode)", lambda: dict(fmt=FP32))}
    monkeypatch.setitem(sys.modules, "hbfp_hw.host.train_toy", mod)
    monkeypatch.setattr(train, "SCHEME_TRAIN_MODULES", ("train_toy",))
    assert "toy-fp32" in train.all_format_names()
    assert train.format_kwargs("toy-fp32") == dict(fmt=FP32)
    assert "toy-fp32" in train.list_formats()
    cfg = train.TrainConfig(epochs=1)
    data = train.load_digits_split()
    r = train.train_one("mlp", "toy-fp32", 0, cfg, data, progress=False)
    assert r.final > 50.0
    mod.TRAIN_FORMATS = {"hbfp8": ("clash", dict)}
    with pytest.raises(ValueError, match="defined twice"):
        train.all_format_names()
