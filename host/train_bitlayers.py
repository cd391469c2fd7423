"""Training formats of bit-layer weights (PrecisionBatching) for ``hbfp-hw train``.

The scheme deploys FP32-trained models (``docs/bitlayers.md``); these rows train with
the weights the deployed model will use at ``k`` layers, fake-quantized (each weight
matrix quantized per row to 8 bits and truncated to its top ``k`` bit-layers once per
step, straight-through gradients), activations and gradients in FP32. Names::

    pb-w8k<k>    8-bit bit-layer weights, top k layers (k = 2, 3, 4), FP32 otherwise
"""

from __future__ import annotations

__all__ = ["TRAIN_FORMATS", "bitlayer_kwargs"]


def bitlayer_kwargs(layers: int) -> dict:
    """:func:`hbfp_hw.host.torch.convert` keyword arguments of one row."""
    from hbfp_hw.bitlayers import BitLayerFormat
    from hbfp_hw.formats import get_format

    f32 = get_format("fp32")
    w = BitLayerFormat(bits=8, layers=layers, name=f"PB-W8K{layers}")
    return dict(fmt=f32, weight_fmt=w, act_fmt=f32, grad_fmt=f32)


TRAIN_FORMATS: dict = {
    f"pb-w8k{k}": (f"8-bit bit-layer weights, top {k} layers (per-row scale), FP32 "
                   "activations and gradients", (lambda k=k: bitlayer_kwargs(k)))
    for k in (2, 3, 4)
}
