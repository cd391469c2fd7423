"""Fake-quantization mode of the PyTorch layers: the formats of the other schemes.

When a role (weight, activation or gradient) of a :class:`~hbfp_hw.host.torch.BFPLinear`
or :class:`~hbfp_hw.host.torch.BFPConv2d` is a *scheme format* (a format registered with
:func:`hbfp_hw.formats.register_format`: LUQ, MLS, ``get_format("fp32")`` ...), the layer
runs in the ``"fake"`` mode:

* each operand, ``X``, ``W`` and the output gradient ``dY``, is quantized once per step
  in its role's format and dequantized (float32 values on the format's grid);
* the forward, dX and dW GEMMs (or convolutions) run in FP32 on those values.

So the numerics of the schemes' exact GEMMs are not reproduced bit for bit in training
(their golden models are); the operands are. A scheme format controls its own training
quantization through an optional hook::

    fmt.train_quantize(x, *, role, seed, state, update) -> np.ndarray

``x`` is the float32 operand in the layer's natural shape (Linear: ``X (B, I)``,
``W (O, I)``, ``dY (B, O)``; Conv2d: ``X (N, C, H, W)``, ``W (O, C, kh, kw)``,
``dY (N, O, H', W')``), ``role`` is ``"act"``, ``"weight"`` or ``"grad"``, ``seed`` changes
per layer, step and role, ``state`` is a dict private to the (layer, role) that persists
across steps (in-hindsight statistics), and ``update`` is False for activations and
weights in evaluation mode. Without the hook the layer uses
``dequantize(quantize(x, fmt))``.

A BFP format in another role of such a layer is quantized and dequantized with its own
format; on a 4-D convolution operand a HyperBlock (2-D tile) format takes the
convolution blocking of :func:`hbfp_hw.conv.conv_format` (samples x channels at each
position), a 1-D block format blocks along the channels (axis 1).
"""

from __future__ import annotations

import numpy as np
import torch

from hbfp_hw.conv import conv_format
from hbfp_hw.formats import BFPFormat
from hbfp_hw.quantize import dequantize, quantize

__all__ = ["is_scheme_format", "fake_quantize", "FakeGemm", "FakeConv"]

#: the role index mixed into the per-step seed (a stream per role)
ROLE_IDS = {"act": 1, "weight": 2, "grad": 3}


def is_scheme_format(q: object) -> bool:
    """True for a format of another scheme (not a BFPFormat, has ``quantize_array``)."""
    return not isinstance(q, BFPFormat) and callable(getattr(q, "quantize_array", None))


def _bfp_for(fmt: BFPFormat, shape: tuple) -> BFPFormat:
    if len(shape) != 4:
        return fmt
    if len(fmt.block_axes) == 2:
        return conv_format(fmt)
    return fmt.replace(block_axes=(1,))


def fake_quantize(fmt, x: np.ndarray, *, role: str, seed: int, state: dict,
                  update: bool) -> np.ndarray:
    """``x`` quantized in ``fmt`` and dequantized (float32, same shape)."""
    if isinstance(fmt, BFPFormat):
        f = _bfp_for(fmt, x.shape)
        if f.rounding == "stochastic":
            f = f.replace(seed=int(seed))
        return quantize(x, f).dequantize()
    hook = getattr(fmt, "train_quantize", None)
    if hook is not None:
        out = hook(x, role=role, seed=int(seed), state=state, update=bool(update))
    else:
        out = dequantize(quantize(x, fmt))
    out = np.asarray(out, dtype=np.float32)
    if out.shape != x.shape:
        raise ValueError(f"{getattr(fmt, 'name', fmt)!r}.train_quantize returned shape "
                         f"{out.shape} for a {role} operand of shape {x.shape}")
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def _t(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a).to(like.device)


def _quantize_xw(ctx, layer, x, w) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's quantized X and W of ``layer`` (saved on ``ctx`` for the backward)."""
    ctx.layer = layer
    xq = _t(layer._fake_quant(_np(x), layer.act_fmt, "act"), x)
    wq = _t(layer._fake_quant(_np(w), layer.weight_fmt, "weight"), w)
    ctx.saved = (xq, wq)
    return xq, wq


def _quantize_dy(ctx, dy) -> torch.Tensor:
    layer = ctx.layer
    return _t(layer._fake_quant(_np(dy), layer._grad_fmt_for_step(), "grad"), dy)


class FakeGemm(torch.autograd.Function):
    """``Y = X̂ Ŵᵀ (+ b)``; ``dX = dŶ Ŵ``, ``dW = dŶᵀ X̂`` in FP32 on quantized operands."""

    @staticmethod
    def forward(ctx, x, w, bias, layer):
        ctx.has_bias = bias is not None
        xq, wq = _quantize_xw(ctx, layer, x, w)
        y = xq @ wq.T
        return y + bias.detach() if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        xq, wq = ctx.saved
        gq = _quantize_dy(ctx, dy)
        dx = gq @ wq if ctx.needs_input_grad[0] else None
        dw = gq.T @ xq if ctx.needs_input_grad[1] else None
        db = dy.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        layer._step += 1
        ctx.saved = None
        return dx, dw, db, None


class FakeConv(torch.autograd.Function):
    """A 2-D convolution in FP32 on quantized ``X``, ``W`` and ``dY`` (4-D operands)."""

    @staticmethod
    def forward(ctx, x, w, bias, layer):
        ctx.has_bias = bias is not None
        xq, wq = _quantize_xw(ctx, layer, x, w)
        ctx.conf = (layer.stride, layer.padding, layer.dilation)
        return torch.nn.functional.conv2d(xq, wq, None if bias is None else bias.detach(),
                                          *ctx.conf)

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        xq, wq = ctx.saved
        gq = _quantize_dy(ctx, dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(xq.shape, wq, gq, *ctx.conf)
        if ctx.needs_input_grad[1]:
            dw = torch.nn.grad.conv2d_weight(xq, wq.shape, gq, *ctx.conf)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3))
        layer._step += 1
        ctx.saved = None
        return dx, dw, db, None
