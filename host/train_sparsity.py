"""Training rows of N:M weight sparsity for ``hbfp-hw train`` (see ``docs/sparsity.md``).

Each factory returns :func:`hbfp_hw.host.torch.convert` keyword arguments: the dense
HBFP rows' formats (``hbfp8``, ``hb4`` of :mod:`hbfp_hw.host.train`) plus
``sparsity=`` and ``mask_period=`` (masks on every Linear / Conv2d weight, recomputed
every :data:`MASK_PERIOD` steps, straight-through to the dense weights).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["TRAIN_FORMATS", "MASK_PERIOD"]

#: training steps between mask recomputations in these rows (digits: 44 steps per epoch)
MASK_PERIOD = 20


def _row(base: str, spec: str) -> Callable[[], dict]:
    def factory() -> dict:
        from hbfp_hw.formats import HBFP4, HBFP8
        fmt = HBFP8 if base == "hbfp8" else HBFP4
        return dict(fmt=fmt, grad_stochastic=True, sparsity=spec, mask_period=MASK_PERIOD)
    return factory


TRAIN_FORMATS: dict[str, tuple[str, Callable[[], dict]]] = {
    "hbfp8-24t": ("HBFP8, 2:4 transposable weight masks (W and Wᵀ sparse), refreshed every "
                  f"{MASK_PERIOD} steps", _row("hbfp8", "2:4-transposable")),
    "hbfp8-24": ("HBFP8, 1-D 2:4 weight masks along the input (W only), refreshed every "
                 f"{MASK_PERIOD} steps", _row("hbfp8", "2:4")),
    "hb4-24t": ("HBFP4, 2:4 transposable weight masks (W and Wᵀ sparse), refreshed every "
                f"{MASK_PERIOD} steps", _row("hb4", "2:4-transposable")),
    "hb4-24": ("HBFP4, 1-D 2:4 weight masks along the input (W only), refreshed every "
               f"{MASK_PERIOD} steps", _row("hb4", "2:4")),
}
