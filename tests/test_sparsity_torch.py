"""N:M sparse training layers: masks on weight, straight-through gradients, refresh period,
plain and BFP layers, convert(sparsity=...), the training rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hbfp_hw as h
from hbfp_hw import sparsity as sp
from hbfp_hw.host.torch import convert
from hbfp_hw.host.torch_sparsity import (NMMask, apply_sparsity, mask_density,
                                         remove_sparsity, sparse_layers)


def _mask_ref(w: torch.Tensor, kind: str) -> np.ndarray:
    a = w.detach().double().numpy()
    return sp.transposable_mask(a, 2, 4) if kind == "transposable" else sp.nm_mask(a, 2, 4)


@pytest.mark.parametrize("spec,kind", [("2:4-transposable", "transposable"), ("2:4", "1d")])
def test_linear_forward_and_straight_through(seed, spec, kind):
    torch.manual_seed(seed)
    lin = nn.Linear(24, 12)
    w0 = lin.weight.detach().clone()
    apply_sparsity(lin, spec, period=5)
    mk = torch.from_numpy(_mask_ref(w0, kind))
    x = torch.randn(7, 24, requires_grad=True)
    y = lin(x)
    wm = (w0 * mk).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, wm, lin.bias.detach())
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    # straight-through: the dense weight gets the gradient of the masked weight, pruned
    # positions included
    assert torch.equal(lin.parametrizations.weight.original.grad, wm.grad)
    assert torch.equal(x.grad, x2.grad)
    assert (lin.parametrizations.weight.original.grad[~mk] != 0).any()


def test_refresh_period_and_eval(seed):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8, bias=False)
    apply_sparsity(lin, "2:4-transposable", period=3)
    p = lin.parametrizations.weight[0]
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    masks = []
    for step in range(7):
        before = lin.parametrizations.weight.original.detach().clone()
        opt.zero_grad()
        lin(torch.randn(4, 16)).square().sum().backward()
        # the mask used in this step: the mask of the weights before the step at steps
        # 3 and 6, else unchanged
        masks.append(p.mask.clone())
        if step in (3, 6):
            assert torch.equal(p.mask, torch.from_numpy(_mask_ref(before, "transposable")))
        opt.step()
    assert p.step == 7 and p.updates == 3
    assert not torch.equal(masks[0], masks[3])
    assert all(torch.equal(masks[i], masks[0]) for i in (1, 2))
    lin.eval()
    for _ in range(5):
        lin(torch.randn(2, 16))
    assert p.step == 7
    assert sp.is_transposable(lin.weight.detach().numpy() != 0, 2, 4)


def test_conv2d_and_removal(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16, 10))
    apply_sparsity(model, "2:4-transposable", period=10)
    assert sparse_layers(model) == [model[0], model[3]]
    mk = model[0].parametrizations.weight[0].mask
    assert mk.shape == (8, 3, 3, 3)
    assert sp.is_transposable(mk.numpy().reshape(8, 27), 2, 4)
    assert 0.4 < mask_density(model) <= 0.5
    x = torch.randn(2, 3, 4, 4)
    y = model(x)
    remove_sparsity(model)
    assert not sparse_layers(model)
    assert isinstance(model[0].weight, nn.Parameter)
    assert torch.equal(model(x), y)
    assert not (model[0].weight.detach()[~mk] != 0).any()


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_bfp_layers_see_masked_weights(seed, model_name):
    """A sparse BFP model computes what the same BFP model computes on masked weights."""
    from hbfp_hw.host.train import make_model
    torch.manual_seed(seed)
    base = make_model(model_name)
    a = convert(copy.deepcopy(base), h.HBFP8, seed=1)
    apply_sparsity(a, "2:4-transposable", period=100)
    b = convert(copy.deepcopy(base), h.HBFP8, seed=1)
    with torch.no_grad():
        for la, lb in zip(sparse_layers(a), [m for m in b.modules()
                                             if isinstance(m, (nn.Linear, nn.Conv2d))]):
            lb.weight.mul_(la.parametrizations.weight[0].mask)
    x = torch.rand(32, 1, 8, 8)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)


def test_convert_keyword_and_train_rows():
    from hbfp_hw.host.train import format_kwargs, make_model
    from hbfp_hw.host.train_sparsity import TRAIN_FORMATS
    assert set(TRAIN_FORMATS) == {"hbfp8-24t", "hbfp8-24", "hb4-24t", "hb4-24"}
    kw = TRAIN_FORMATS["hb4-24t"][1]()
    assert kw["sparsity"] == "2:4-transposable" and kw["fmt"] is h.HBFP4
    model = convert(make_model("mlp"), **kw)
    assert len(sparse_layers(model)) == 3
    assert format_kwargs("hbfp8-24")["sparsity"] == "2:4"     # the loader finds the rows
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.rand(32, 1, 8, 8)), torch.randint(0, 10, (32,))).backward()
        opt.step()
    for layer in sparse_layers(model):
        w = layer.weight.detach().numpy()
        assert sp.is_transposable(w != 0, 2, 4)


def test_errors():
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="period=0 is out of range"):
        apply_sparsity(lin, "2:4", period=0)
    with pytest.raises(ValueError, match="'2/4' is not"):
        apply_sparsity(lin, "2/4")
    with pytest.raises(ValueError, match="method='best'"):
        apply_sparsity(lin, "2:4-transposable", method="best")
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_sparsity(nn.ReLU(), "2:4")
    apply_sparsity(lin, "2:4")
    with pytest.raises(ValueError, match="called twice"):
        apply_sparsity(lin, "2:4")
    assert isinstance(lin.parametrizations.weight[0], NMMask)
