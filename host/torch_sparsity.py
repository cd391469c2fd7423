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

from hbfp_hw.host.torch import DeviceBackend
from hbfp_hw.sparsity import MASK_METHODS, nm_mask, parse_spec, transposable_mask

__all__ = ["NMMask", "apply_sparsity", "remove_sparsity", "sparse_layers", "mask_density",
           "sparse_weight_from_bfp", "SparseDeviceBackend"]


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


# -- sparse GEMMs on a device ----------------------------------------------------------

def sparse_weight_from_bfp(wq, n: int, m: int):
    """The :class:`~hbfp_hw.sparsity.SparseBFPWeight` of a quantized weight ``wq``
    (``[out, in]`` :class:`~hbfp_hw.quantize.BFPTensor`) whose non-zero mantissas keep at
    most ``n`` per row and column of every ``m x m`` tile (a transposable ``n:m`` masked
    weight: kept weights that quantized to 0 leave fewer), else ``None``. The slots are
    completed to exactly ``n`` per row and column with zero mantissas; ``to_bfp()`` of
    the result is ``wq`` itself (mantissas, exponents, invalid flags)."""
    from hbfp_hw.sparsity import SparseBFPWeight, _milp_tiles, _tiles
    if wq.ndim != 2:
        return None
    blk = wq.layout.block
    if blk[0] % m or blk[1] % m:
        return None
    man = wq.mantissas.astype(np.int64)
    nz = _tiles((man != 0).astype(np.int64), m)[0].astype(bool)        # (Tr, Tc, m, m)
    if (nz.sum(axis=3) > n).any() or (nz.sum(axis=2) > n).any():
        return None
    tr, tc = nz.shape[:2]
    flat = nz.reshape(-1, m, m).copy()
    short = np.nonzero((flat.sum(axis=2) < n).any(axis=1) | (flat.sum(axis=1) < n).any(axis=1))[0]
    if len(short):
        flat[short] = _milp_tiles(np.zeros((len(short), m, m)), n, m,
                                  lb=flat[short].astype(float))
    slots = flat.reshape(tr, tc, m, m)
    idx = np.argsort(~slots, axis=3, kind="stable")[..., :n]
    mans = np.take_along_axis(_tiles(man, m)[0], idx, axis=3)
    return SparseBFPWeight(wq.fmt, tuple(wq.shape), n, m, "transposable",
                           mans.astype(np.int16), idx.astype(np.uint8),
                           wq.exponents.copy(), wq.invalid.copy())


def _digest(q) -> bytes:
    import hashlib
    h = hashlib.sha1(repr((q.shape, q.fmt.man_bits, q.fmt.exp_bits)).encode())
    for a in (q.mantissas, q.exponents, q.invalid):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


class SparseDeviceBackend(DeviceBackend):
    """A :class:`~hbfp_hw.host.torch.DeviceBackend` that runs the GEMMs of N:M
    sparse weights on the device's sparse engine (``Device.sparse_matmul``,
    SPARSE_GEMM), every other GEMM as ``matmul_q``; the results are those of
    ``bfp_matmul`` bit for bit either way.

    ``a @ b`` with ``bᵀ`` a transposable ``N:M`` masked weight (the forward ``X Wᵀ``
    of a layer under :func:`apply_sparsity`) runs forward, its compressed weight is
    remembered; ``a @ b`` with ``b`` a remembered weight (the layer's ``dX = dY W``)
    runs with ``transpose=True`` on the same compressed weight. ``calls`` counts
    ``"sparse"`` and ``"sparse_t"`` GEMMs. GEMMs whose reduction is longer than one
    SPARSE_GEMM reduces, or whose operands are in no ``tile x tile`` slot, stay dense.
    """

    def __init__(self, device, *, cache: int = 64) -> None:
        super().__init__(device)
        import hbfp_hw.protocol as P
        cfg = self.device.config
        self.nm = P.sparse_nm(cfg) if P.sparse_lanes(cfg) else None
        self._weights: dict[bytes, object] = {}
        self._cache = cache

    def _fits(self, a, k: int) -> bool:
        from hbfp_hw.host.device import FormatMismatchError
        T = self.device.config.tile
        if a.ndim != 2 or a.layout.block != (T, T) or k > self.device.sparse_k_max():
            return False
        try:                                       # a format slot of the device
            self.device._sparse_slot(a.fmt, a.layout.block, "a")
        except FormatMismatchError:
            return False
        return True

    def _matmul(self, a, b):
        if self.nm is not None and b.ndim == 2 and self._fits(a, b.shape[0]):
            sw = self._weights.get(_digest(b))
            if sw is not None:                     # b is W: dX = dY W
                self.calls["sparse_t"] += 1
                return self.device.sparse_matmul(a, sw, transpose=True)
            sw = sparse_weight_from_bfp(b.T, *self.nm)
            if sw is not None and b.layout.block == (self.device.config.tile,) * 2:
                if len(self._weights) >= self._cache:
                    self._weights.pop(next(iter(self._weights)))
                self._weights[_digest(b.T)] = sw
                self.calls["sparse"] += 1
                return self.device.sparse_matmul(a, sw)   # Y = X Wᵀ, W = bᵀ
        return super()._matmul(a, b)

