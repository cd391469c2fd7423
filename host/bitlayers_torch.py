"""Inference with bit-layer weights (PrecisionBatching) for a trained PyTorch model.

:func:`deploy` copies a trained model and replaces each ``nn.Linear`` by a
:class:`BitLayerLinear`: its weights are quantized to ``weight_bits`` integers with a
per-row scale and decomposed into bit-planes **once** (:func:`hbfp_hw.bitlayers.decompose`);
its input activations become signed ``act_bits`` fixed point with a per-layer number of
fraction bits calibrated on sample inputs (:func:`hbfp_hw.bitlayers.fixed_frac` of the
largest magnitude seen). :func:`set_layers` then changes how many weight bit-layers every
layer accumulates, at run time, without touching the stored planes (on the accelerator:
a field of each GEMM command, no new bitstream).

A layer computes ``y = bitlayers.matmul(x_int, planes, k) * scale_row * 2**-frac + bias``
(float64, returned as float32), by default with the golden model; ``backend`` can be a
callable ``(x_int, layer, k) -> y_int`` that runs the GEMM elsewhere (an accelerator)
and must return the same integers.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn

from hbfp_hw import bitlayers as bl

__all__ = ["BitLayerLinear", "deploy", "set_layers", "bit_layers", "device_backend"]


class BitLayerLinear(nn.Module):
    """A Linear layer with bit-layer weights and fixed-point inputs (inference only)."""

    def __init__(self, linear: nn.Linear, *, weight_bits: int = 8, act_bits: int = 8,
                 frac: int = 0, scale: str = "row", layers: int | None = None,
                 backend: Callable | None = None):
        super().__init__()
        w = linear.weight.detach().double().cpu().numpy()
        w_int, s = bl.quantize_weights(w, weight_bits, scale)
        self.planes = bl.decompose(w_int, weight_bits)       # (bits, out, in), once
        self.w_scale = s
        self.bias_np = None if linear.bias is None else \
            linear.bias.detach().double().cpu().numpy()
        self.bits = weight_bits
        self.act_bits = bl._check_bits("act_bits", act_bits, *bl.ACT_BITS_RANGE)
        self.frac = int(frac)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        self.layers = None
        self.round_dropped = False
        self.set_layers(layers)

    def set_layers(self, layers: int | None, round_dropped: bool = False) -> None:
        """Accumulate the top ``layers`` weight bit-layers (None: all ``bits``);
        ``round_dropped`` adds the midpoint of the dropped layers on the host
        (:func:`hbfp_hw.bitlayers.matmul`'s option: ``2**(d-1) * sum(x_int)`` per
        output, after the GEMM)."""
        self.layers = bl._check_layers(layers, self.bits)
        self.round_dropped = bool(round_dropped)

    def input_ints(self, x) -> np.ndarray:
        """The fixed-point activations of input ``x`` (array-like, (batch, in))."""
        return bl.to_fixed(np.asarray(x, dtype=np.float64), self.act_bits, self.frac)

    def int_matmul(self, x_int, layers: int | None = None) -> np.ndarray:
        k = self.layers if layers is None else layers
        if self.backend is not None:
            y = np.asarray(self.backend(x_int, self, k), dtype=np.int64)
        else:
            y = bl.matmul(x_int, self.planes, k)
        d = self.bits - k
        if self.round_dropped and d > 0:
            y = y + (np.asarray(x_int, dtype=np.int64).sum(axis=1, keepdims=True) << (d - 1))
        return y

    def output_from_ints(self, y_int) -> np.ndarray:
        y = np.asarray(y_int, dtype=np.float64) * self.w_scale[None, :] * 2.0 ** -self.frac
        return y if self.bias_np is None else y + self.bias_np[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.detach().reshape(-1, shape[-1]).double().cpu().numpy()
        y = self.output_from_ints(self.int_matmul(self.input_ints(x2)))
        return torch.from_numpy(y.astype(np.float32)).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, W{self.bits} "
                f"({self.layers} layers), A{self.act_bits} frac={self.frac}")


def bit_layers(model: nn.Module) -> list[BitLayerLinear]:
    """The :class:`BitLayerLinear` modules of ``model`` in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, BitLayerLinear)]


def set_layers(model: nn.Module, layers: int | None,
               round_dropped: bool = False) -> nn.Module:
    """Set the weight bit-layers of every :class:`BitLayerLinear` in ``model``
    (:meth:`BitLayerLinear.set_layers`)."""
    found = bit_layers(model)
    if not found:
        raise ValueError("the model has no BitLayerLinear layers; call deploy() first")
    for m in found:
        m.set_layers(layers, round_dropped)
    return model


def deploy(model: nn.Module, *, weight_bits: int = 8, act_bits: int = 8,
           calib: torch.Tensor | None = None, scale: str = "row",
           layers: int | None = None, backend: Callable | None = None) -> nn.Module:
    """A copy of the trained ``model`` with every ``nn.Linear`` as a
    :class:`BitLayerLinear`.

    ``calib``: sample inputs of the model; each layer's fraction bits hold the largest
    input magnitude the FP32 model shows on them (without ``calib``: ``frac = act_bits
    - 2``, inputs in about [-2, 2)). The copy is in eval mode; ``model`` is unchanged.
    """
    bl._check_bits("weight_bits", weight_bits, 2, bl.BITS_RANGE[1])
    bl._check_bits("act_bits", act_bits, *bl.ACT_BITS_RANGE)
    model = copy.deepcopy(model).eval()
    amax: dict[str, float] = {}
    if calib is not None:
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                def hook(mod, inp, _out, name=name):
                    v = float(inp[0].detach().abs().max())
                    amax[name] = max(amax.get(name, 0.0), v)
                hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(calib)
        for h in hooks:
            h.remove()
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{cname}" if name else cname
                frac = bl.fixed_frac(amax[full], act_bits) if full in amax else act_bits - 2
                setattr(m, cname, BitLayerLinear(child, weight_bits=weight_bits,
                                                 act_bits=act_bits, frac=frac, scale=scale,
                                                 layers=layers, backend=backend))
    if not bit_layers(model):
        raise ValueError("the model has no nn.Linear layer to deploy")
    return model


def device_backend(device) -> Callable:
    """A ``backend`` for :func:`deploy` running each layer's GEMM on ``device``
    (:meth:`hbfp_hw.host.device.Device.bitlayer_matmul`; bit-exact with the golden
    model)."""
    def run(x_int, layer: BitLayerLinear, layers: int) -> np.ndarray:
        return device.bitlayer_matmul(x_int, layer.planes, layers)
    return run
