"""N:M sparse training of PyTorch models: masks on the layers' ``weight``, recomputed
every ``period`` training steps, straight-through to the dense master weights.

:func:`apply_sparsity` registers a :mod:`torch.nn.utils.parametrize` parametrization on
the ``weight`` of every :class:`~torch.nn.Linear` / :class:`~torch.nn.Conv2d` of a model
(the BFP layers of :mod:`hbfp_hw.host.torch` included, which subclass them). The layer
then sees ``weight = W ⊙ mask`` in its forward, dX and dW computations, while the
optimizer updates the dense ``W`` (``parametrizations.weight.original``) with the full
gradient (straight-through: ``∂L/∂W = ∂L/∂(W ⊙ mask)``), so pruned weights can grow back
when the mask is recomputed. The mask is recomputed from ``|W|`` at the first training
step and then every ``period`` training steps (a forward pre-hook counts the steps
in training mode; evaluation never changes it):

* ``"N:M-transposable"``: :func:`hbfp_hw.sparsity.transposable_mask` (optimal) on the
  weight viewed as ``[out, in]`` (conv: ``[O, C·kh·kw]``): ``W`` and ``Wᵀ`` both ``N:M``,
  so the forward and the dX GEMMs can skip the pruned weights;
* ``"N:M"``: :func:`hbfp_hw.sparsity.nm_mask`, ``N`` of every ``M`` along ``in`` (the
  forward GEMM only).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from hbfp_hw.sparsity import MASK_METHODS, nm_mask, parse_spec, transposable_mask

__all__ = ["NMMask", "apply_sparsity", "remove_sparsity", "sparse_layers", "mask_density"]


class NMMask(nn.Module):
    """Parametrization ``W -> W ⊙ mask`` with a straight-through gradient to ``W``.

    Attributes: ``n, m, kind`` (``"transposable"`` or ``"1d"``), ``period``, ``method``,
    ``step`` (training steps seen), ``updates`` (mask recomputations), buffer ``mask``.
    """

    def __init__(self, weight: torch.Tensor, n: int, m: int, kind: str, period: int,
                 method: str = "optimal"):
        super().__init__()
        self.n, self.m, self.kind, self.period, self.method = n, m, kind, period, method
        self.step = 0
        self.updates = 0
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        self.recompute(weight)

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().to(torch.float64).cpu().numpy()
        if self.kind == "transposable":
            mk = transposable_mask(w, self.n, self.m, self.method)
        else:
            mk = nm_mask(w, self.n, self.m)
        return torch.from_numpy(np.ascontiguousarray(mk)).to(weight.device)

    @torch.no_grad()
    def recompute(self, weight: torch.Tensor) -> None:
        self.mask.copy_(self.compute(weight))
        self.updates += 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        masked = w * self.mask.to(w.dtype)
        return w + (masked - w).detach()        # value: masked; gradient: identity

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m} {self.kind}, period={self.period}, method={self.method}"


def _pre_hook(module: nn.Module, args) -> None:
    if not module.training:
        return
    p = module.parametrizations.weight[0]
    if p.step > 0 and p.step % p.period == 0:
        p.recompute(module.parametrizations.weight.original)
    p.step += 1


def sparse_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that carry an :class:`NMMask`, in module order."""
    out = []
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight") and any(
                isinstance(p, NMMask) for p in mod.parametrizations.weight):
            out.append(mod)
    return out


def apply_sparsity(model: nn.Module, spec: str, period: int = 20, *,
                   method: str = "optimal",
                   exclude: Iterable[nn.Module] = ()) -> nn.Module:
    """Add ``N:M`` weight masks to every Linear / Conv2d of ``model`` (in place).

    Parameters
    ----------
    spec : ``"N:M-transposable"`` (e.g. ``"2:4-transposable"``) or ``"N:M"`` (1-D)
    period : int
        Training steps between mask recomputations (``>= 1``); the first mask is that of
        the weights at this call.
    method : ``"optimal"`` or ``"greedy"`` (transposable masks only)
    exclude : layers to leave dense (e.g. ``[model[0]]``)

    Call it after :func:`hbfp_hw.host.torch.convert` (``convert`` replaces exact
    ``nn.Linear`` / ``nn.Conv2d`` instances, and a parametrized layer is a subclass).
    Returns ``model``.
    """
    n, m, kind = parse_spec(spec)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period={period!r} is out of range; accepted range is [1, 2**31)")
    if method not in MASK_METHODS:
        raise ValueError(f"method={method!r}; accepted values are "
                         f"{', '.join(map(repr, MASK_METHODS))}")
    skip = {id(x) for x in exclude}
    layers = [mod for mod in model.modules()
              if isinstance(mod, (nn.Linear, nn.Conv2d)) and id(mod) not in skip]
    if not layers:
        raise ValueError("apply_sparsity: the model has no nn.Linear / nn.Conv2d layer")
    for mod in layers:
        if parametrize.is_parametrized(mod, "weight"):
            raise ValueError(f"{type(mod).__name__} already has a weight parametrization "
                             "(apply_sparsity called twice?)")
        p = NMMask(mod.weight.detach(), n, m, kind, period, method)
        parametrize.register_parametrization(mod, "weight", p)
        mod._nm_hook = mod.register_forward_pre_hook(_pre_hook)
    return model


def remove_sparsity(model: nn.Module) -> nn.Module:
    """Remove the masks, leaving the masked weights as plain parameters (in place)."""
    for mod in sparse_layers(model):
        mod._nm_hook.remove()
        del mod._nm_hook
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


def mask_density(model: nn.Module) -> float:
    """Fraction of the masked layers' weights that are kept."""
    kept = total = 0
    for mod in sparse_layers(model):
        mk = mod.parametrizations.weight[0].mask
        kept += int(mk.sum())
        total += mk.numel()
    return kept / total if total else 1.0
