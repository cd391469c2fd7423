"""Training formats of LUQ (4-bit logarithmic unbiased gradients) for ``hbfp-hw train``.

Every row quantizes the output gradient ``dY`` of each Linear/Conv2d layer with LUQ-4
(:mod:`hbfp_hw.luq`) once per step; the layers run in the fake-quantization mode of
:mod:`hbfp_hw.host.torch_fake` (quantized operands, FP32 GEMMs). Names::

    luq4[-hs][-smp2]-f32    LUQ-4 gradients, FP32 forward (X and W unquantized)
    luq4[-hs][-smp2]-hb4    LUQ-4 gradients, HBFP4 forward (X, W: 4-bit mantissas on
                            16x16 tiles, nearest): all three GEMM operands 4-bit

``hb4fwd-f32`` (HBFP4 forward, FP32 gradients) separates the cost of the 4-bit forward
from that of the LUQ gradients. ``-hs``: in-hindsight scale (the previous step's
``max|dY|`` of the layer, one pass); without it the scale comes from the current
``max|dY|`` (two passes). ``-smp2``: SMP with 2 samples averaged. Run the table with::

    python -m hbfp_hw.host.train_luq --models mlp cnn --seeds 5
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["TRAIN_FORMATS", "luq_kwargs", "main"]


def luq_kwargs(alpha: str = "tensor", samples: int = 1, forward: str = "fp32") -> dict:
    """:func:`hbfp_hw.host.torch.convert` keyword arguments of one LUQ row."""
    from hbfp_hw.formats import HBFP4, get_format
    from hbfp_hw.luq import LUQ4

    g = LUQ4.replace(alpha=alpha, samples=samples,
                     name="LUQ4" + ("-HS" if alpha == "hindsight" else "")
                     + (f"-SMP{samples}" if samples > 1 else ""))
    fwd = get_format("fp32") if forward == "fp32" else HBFP4
    return dict(fmt=fwd, weight_fmt=fwd, act_fmt=fwd, grad_fmt=g)


def _row(alpha: str, samples: int, forward: str):
    parts = ["LUQ-4 gradients"]
    parts.append("in-hindsight alpha (previous step's max|dY|)" if alpha == "hindsight"
                 else "per-tensor alpha (current max|dY|)")
    if samples > 1:
        parts.append(f"SMP x{samples}")
    parts.append("FP32 forward" if forward == "fp32" else "HBFP4 forward (X, W 16x16 tiles)")
    return ", ".join(parts), (lambda: luq_kwargs(alpha, samples, forward))


TRAIN_FORMATS: dict = {}
for _fwd, _sfx in (("fp32", "f32"), ("hbfp4", "hb4")):
    for _alpha, _a in (("tensor", ""), ("hindsight", "-hs")):
        for _smp, _s in ((1, ""), (2, "-smp2")):
            TRAIN_FORMATS[f"luq4{_a}{_s}-{_sfx}"] = _row(_alpha, _smp, _fwd)
del _fwd, _sfx, _alpha, _a, _smp, _s


def _hb4_fp32_grads() -> dict:
    from hbfp_hw.formats import HBFP4, get_format
    return dict(fmt=HBFP4, weight_fmt=HBFP4, act_fmt=HBFP4, grad_fmt=get_format("fp32"))


#: the reference of the -hb4 rows: the same HBFP4 forward, FP32 gradients
TRAIN_FORMATS["hb4fwd-f32"] = ("HBFP4 forward (X, W 16x16 tiles), FP32 gradients: the "
                               "reference of the luq4*-hb4 rows", _hb4_fp32_grads)


def main(argv=None) -> int:
    """Train the LUQ rows (and the fp32 reference) and print the accuracy table."""
    from .train import MODEL_NAMES, TrainConfig, format_table, run_grid
    ap = argparse.ArgumentParser(description="LUQ training table on digits")
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    ap.add_argument("--formats", nargs="+", default=["fp32", *TRAIN_FORMATS],
                    help="rows (default: fp32 and every LUQ row)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--threads", type=int, default=1,
                    help="PyTorch threads (default 1: the models are tiny, and several "
                         "threads only spin on a loaded machine)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    for f in a.formats:
        if f != "fp32" and f not in TRAIN_FORMATS:
            ap.error(f"unknown format {f!r}; accepted: fp32, {', '.join(TRAIN_FORMATS)}")
    res = run_grid(a.models, a.formats, a.seeds, TrainConfig(epochs=a.epochs), progress=False)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
