"""Training formats of MLS (multi-level scaling) for ``hbfp-hw train``.

Every row puts all three operands of each Linear/Conv2d layer — ``X`` and ``W`` rounded
to nearest, the output gradient ``dY`` rounded stochastically — in an MLS format
(:mod:`hbfp_hw.mls`); the layers run in the fake-quantization mode of
:mod:`hbfp_hw.host.torch_fake` (each operand quantized once per step, FP32 GEMMs and
convolutions on the quantized values). Names::

    mls-e2m4    MLS E2M4 (7-bit elements), 4-bit group shifts, W/A/G
    mls-e2m1    MLS E2M1 (4-bit elements), 4-bit group shifts, W/A/G

Run the table with::

    python -m hbfp_hw.host.train_mls --models mlp cnn --seeds 5
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["TRAIN_FORMATS", "mls_kwargs", "main"]


def mls_kwargs(preset: str) -> dict:
    """:func:`hbfp_hw.host.torch.convert` keyword arguments of one MLS row: the preset in
    every role (its ``train_quantize`` rounds ``dY`` stochastically)."""
    from hbfp_hw.formats import get_format
    import hbfp_hw.mls  # noqa: F401  (registers the presets)

    f = get_format(preset)
    return dict(fmt=f, weight_fmt=f, act_fmt=f, grad_fmt=f)


TRAIN_FORMATS: dict = {
    "mls-e2m4": ("MLS E2M4 (7-bit elements, 4-bit group shifts, pow2 tensor scale) for "
                 "W/A/G, stochastic rounding of G", lambda: mls_kwargs("mls-e2m4")),
    "mls-e2m1": ("MLS E2M1 (4-bit elements, 4-bit group shifts, pow2 tensor scale) for "
                 "W/A/G, stochastic rounding of G", lambda: mls_kwargs("mls-e2m1")),
}


def main(argv=None) -> int:
    """Train the MLS rows (and the fp32 reference) and print the accuracy table."""
    from .train import MODEL_NAMES, TrainConfig, format_table, run_grid
    ap = argparse.ArgumentParser(description="MLS training table on digits")
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    ap.add_argument("--formats", nargs="+", default=["fp32", *TRAIN_FORMATS],
                    help="rows (default: fp32 and every MLS row)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    a = ap.parse_args(argv)
    for f in a.formats:
        if f != "fp32" and f not in TRAIN_FORMATS:
            ap.error(f"unknown format {f!r}; accepted: fp32, {', '.join(TRAIN_FORMATS)}")
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass
    import torch
    torch.set_num_threads(1)
    res = run_grid(a.models, a.formats, a.seeds, TrainConfig(epochs=a.epochs), progress=False)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
