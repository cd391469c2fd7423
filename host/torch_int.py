"""Integer-GEMM training layers: per-tensor int8 with in-hindsight or dynamic ranges.

:class:`IntLinear` and :class:`IntConv2d` run every GEMM of a training step — forward
``Y = X Wᵀ``, input gradient ``dX = dY W`` and weight gradient ``dW = dYᵀ X`` (for a
convolution: the forward convolution, the transposed convolution and the weight
correlation) — as the golden integer GEMM of :mod:`hbfp_hw.intgemm`: exact integer sums
of the signed operands ``c`` (``q - z``), then one FP32 rounding ``y = fp32(acc * S)``
with ``S = fp32(u_a * u_w)``. :func:`convert_int` swaps them into a model.

Quantizers (``docs/training.md``, "Integer GEMMs in training"):

* activations ``X`` and output gradients ``dY``: per-tensor asymmetric int8
  (:data:`ACT_FORMAT`, :func:`hbfp_hw.intgemm.quantize_int` over a range ``[lo, hi]``:
  ``s = fp32((hi' - lo') / 255)``, ``z = clip(rint(-lo' / s), 0, 255)``,
  ``q = clip(rint(x / s + z), 0, 255)``, ``c = q - z``);
* weights ``W``: per-tensor symmetric int8 (:func:`quantize_weight`):
  ``s_w = fp32(max|W| / 127)``, ``c_w = clip(rint(W / s_w), -127, 127)`` (stored as an
  asymmetric :class:`~hbfp_hw.intgemm.IntTensor` with ``z = 128``, so ``c = q - 128``).
  One scale per tensor keeps ``S`` one scalar per GEMM, so the output ``fp32(acc * S)``
  is a non-decreasing function of ``acc`` and the FP32 output range follows exactly from
  the integer range: ``min y = fp32(min acc * S)``, ``max y = fp32(max acc * S)``.

Ranges (:class:`IntRange`): ``"dynamic"`` uses the tensor's own min/max; ``"hindsight"``
the EMA (momentum ``eta``, default 0.9; ``hbfp-hw train`` uses 0.5) of previous steps
(:class:`~hbfp_hw.host.ranges.RangeEMA`). The per-step statistic a hindsight range
folds in comes from the GEMM that produced the tensor when there is one
(:func:`convert_int` links consecutive layers of an ``nn.Sequential`` joined only by
ReLU / MaxPool2d / Flatten / Identity; Dropout scales the kept values and breaks the
link):

* ``X`` of layer ``l+1``: ``[min Y_l + min b_l, max Y_l + max b_l]`` from the forward
  output statistics of layer ``l`` (a superset of the range of ``ReLU(Y_l + b_l)`` and
  of its pooling);
* ``dY`` of layer ``l``: ``[min dX_{l+1}, max dX_{l+1}]`` of layer ``l+1``'s input
  gradient (the ReLU / pooling backward only zeroes or drops elements, and every range
  holds 0).

On a device those statistics are the integer-output statistics the bit-serial engine
tracks as it writes each GEMM's final sums (``READ_STATS`` ``INT_OUTPUT``,
:func:`hbfp_hw.host.int_gemm.tracked_acc`); in process they are the golden
model's min/max of the same integer sums. The host never reduces a GEMM output tensor;
it computes min/max only of tensors no GEMM produced (the model input and the loss
gradient) and for ``"dynamic"`` ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hbfp_hw.intgemm import (IntFormat, IntTensor, _epilogue, _golden_acc, im2col,
                             quantize_int, scale_to_fp32)

from .ranges import RangeEMA

__all__ = ["ACT_FORMAT", "WEIGHT_FORMAT", "IntRange", "quantize_weight", "IntGemmEngine",
           "IntLinear", "IntConv2d", "convert_int", "int_layers", "LINK_THROUGH"]

#: activations and gradients: per-tensor asymmetric int8
ACT_FORMAT = IntFormat(8, "asymmetric", None, "int8-asym")
#: weights: per-tensor symmetric int8 (``c`` in [-127, 127]) stored with ``z = 128``
WEIGHT_FORMAT = IntFormat(8, "asymmetric", None, "int8-w-sym")
#: modules :func:`convert_int` links two integer layers through
LINK_THROUGH = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity)


def quantize_weight(w) -> IntTensor:
    """Per-tensor symmetric int8: ``s = fp32(max|w| / 127)`` (1 for an all-zero tensor),
    ``c = clip(rint(w / s), -127, 127)`` in float64 (half to even), ``q = c + 128``."""
    w64 = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(w64)):
        raise ValueError("quantize_weight: the weight holds NaN or Inf")
    amax = float(np.abs(w64).max()) if w64.size else 0.0
    s = np.float32(amax / 127.0)
    if not s > 0:
        s = np.float32(1.0)
    c = np.clip(np.rint(w64 / np.float64(s)), -127, 127)
    return IntTensor((c + 128).astype(np.uint16), np.asarray(s, np.float32).reshape(()),
                     256, WEIGHT_FORMAT)


def _host_range(x: np.ndarray) -> tuple[float, float]:
    return (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)


@dataclass
class IntRange:
    """The range source of one tensor role of one layer.

    ``method``: ``"dynamic"`` (the tensor's own min/max) or ``"hindsight"`` (EMA of
    previous steps; step 0 uses the producer's statistics of this step if a producer is
    linked, else the tensor's own range). :attr:`pending` holds this step's statistics
    pushed by the producing GEMM (:meth:`push`); :meth:`quantize` folds them in after
    quantizing (or, without a producer, the tensor's own min/max).
    """

    method: str = "hindsight"
    eta: float = 0.9
    name: str = ""
    ema: RangeEMA = field(default=None, repr=False)  # type: ignore[assignment]
    pending: tuple | None = None
    #: (lo, hi, source of the folded statistic) per quantization, with keep_history
    history: list = field(default_factory=list, repr=False)
    keep_history: bool = False
    #: how often the host reduced the tensor itself / used a producer's statistics
    host_reductions: int = 0
    device_stats: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("dynamic", "hindsight"):
            raise ValueError(f"method={self.method!r}; accepted values are 'dynamic', "
                             f"'hindsight'")
        if self.ema is None:
            self.ema = RangeEMA(self.eta)

    def push(self, lo: float, hi: float) -> None:
        """This step's statistics of the tensor, from the GEMM that produced it."""
        self.pending = (float(lo), float(hi))

    def quantize(self, x: np.ndarray, *, update: bool = True) -> IntTensor:
        """``x`` on the int8 grid of this step's range; folds this step's statistics."""
        pend, self.pending = self.pending, None
        own = None
        if self.method == "dynamic":
            own = _host_range(x)
            self.host_reductions += 1
            lo, hi = own
        elif self.ema.initialised:
            lo, hi = self.ema.range
        elif pend is not None:
            lo, hi = pend
        else:
            own = _host_range(x)
            self.host_reductions += 1
            lo, hi = own
        q = quantize_int(x, ACT_FORMAT, lo=lo, hi=hi)
        src = None
        if self.method == "hindsight" and (update or not self.ema.initialised):
            if pend is not None:
                obs, src = pend, "producer"
                self.device_stats += 1
            else:
                if own is None:
                    own = _host_range(x)
                    self.host_reductions += 1
                obs, src = own, "host"
            self.ema.update(*obs)
        if self.keep_history:
            self.history.append((lo, hi, src))
        return q


def _transpose(t: IntTensor) -> IntTensor:
    return IntTensor(np.ascontiguousarray(t.q.T), t.scale, t.z2, t.fmt)


class IntGemmEngine:
    """Where the integer sums are computed: in process (the golden model) or on a
    device (``hbfp_hw.host`` :class:`~hbfp_hw.host.Device`, bit-serial engine, with the
    integer-output statistics read back from the device)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.gemms = 0

    @property
    def on_device(self) -> bool:
        return self.device is not None

    def acc(self, ca: np.ndarray, w: IntTensor, a_bits: int):
        """``(acc, (acc_min, acc_max, count))``: exact ``ca @ cw^T`` and its statistics."""
        self.gemms += 1
        if self.device is not None:
            from .int_gemm import tracked_acc
            return tracked_acc(self.device, ca, w, a_bits)
        acc = _golden_acc(ca, w, a_bits)
        st = ((int(acc.min()), int(acc.max()), int(acc.size)) if acc.size else (0, 0, 0))
        return acc, st

    def gemm(self, ca: np.ndarray, ua, a_bits: int, w: IntTensor):
        """``y = fp32(acc * S)`` (float32, ``(M, N)``) and the exact FP32 output range
        ``(min y, max y)`` from the integer statistics (``None`` when empty)."""
        acc, (amin, amax, n) = self.acc(ca, w, a_bits)
        S = scale_to_fp32(ua, w.operand()[1])
        y = _epilogue(acc, np.broadcast_to(S, (w.shape[0],)))
        rng = None
        if n:
            lohi = _epilogue(np.array([amin, amax], np.int64), np.broadcast_to(S, (2,)))
            rng = (float(lohi[0]), float(lohi[1]))
        return y, rng


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


class _IntLayerMixin:
    """Range sources, links and the engine of an integer-GEMM layer."""

    def _setup_int(self, method: str, eta: float, engine: IntGemmEngine,
                   keep_history: bool = False) -> None:
        self.int_method = method
        self.act_range = IntRange(method, eta, "act", keep_history=keep_history)
        self.grad_range = IntRange(method, eta, "grad", keep_history=keep_history)
        self.engine = engine
        #: the next / previous integer layer (links, see :func:`convert_int`)
        # (plain attributes, not registered submodules: the links form a cycle)
        object.__setattr__(self, "int_next", None)
        object.__setattr__(self, "int_prev", None)
        #: the FP32 ranges of the last forward output / input gradient (from the GEMMs)
        self.out_range: tuple | None = None
        self.dx_range: tuple | None = None

    def _report_forward(self, rng, bias) -> None:
        self.out_range = rng
        nxt = self.int_next
        if nxt is not None and rng is not None:
            if bias is not None:
                b = bias.detach()
                lo, hi = rng[0] + float(b.min()), rng[1] + float(b.max())
            else:
                lo, hi = rng
            nxt.act_range.push(lo, hi)

    def _report_dx(self, rng) -> None:
        self.dx_range = rng
        prv = self.int_prev
        if prv is not None and rng is not None:
            prv.grad_range.push(*rng)

    def extra_repr_int(self) -> str:
        where = "device" if self.engine.on_device else "golden"
        return f"int8 W/A/G, {self.int_method} ranges, integer GEMMs ({where})"


def _check_input(layer, x: torch.Tensor) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"{type(layer).__name__} takes float32 input, got {x.dtype}")


class _IntGemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, layer):
        xq = layer.act_range.quantize(_np(x), update=layer.training)
        wq = quantize_weight(_np(w))
        ca, ua = xq.operand()
        y, rng = layer.engine.gemm(ca, ua, xq.fmt.bits, wq)
        layer._report_forward(rng, bias)
        ctx.layer, ctx.saved_q, ctx.has_bias = layer, (xq, wq), bias is not None
        out = torch.from_numpy(y).to(x.device)
        return out + bias.detach() if bias is not None else out

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        xq, wq = ctx.saved_q
        gq = layer.grad_range.quantize(_np(dy))
        cg, ug = gq.operand()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:                      # dX = dY W: (B, O) x (I, O)^T
            y, rng = layer.engine.gemm(cg, ug, gq.fmt.bits, _transpose(wq))
            layer._report_dx(rng)
            dx = torch.from_numpy(y).to(dy.device)
        if ctx.needs_input_grad[1]:                      # dW = dY^T X: (O, B) x (I, B)^T
            y, _ = layer.engine.gemm(np.ascontiguousarray(cg.T), ug, gq.fmt.bits,
                                     _transpose(xq))
            dw = torch.from_numpy(y).to(dy.device)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=0)
        ctx.saved_q = None
        return dx, dw, db, None


def _conv_dx_rows(cg: np.ndarray, kh: int, kw: int, stride, padding, in_hw):
    """im2col rows of the transposed convolution: ``dY`` (N, O, Ho, Wo) zero-upsampled by
    the stride and padded so that a stride-1 correlation with the flipped kernel gives
    ``dX`` (N, C, H, W)."""
    (sh, sw), (ph, pw) = stride, padding
    N, O, Ho, Wo = cg.shape
    H, W = in_hw
    up = np.zeros((N, O, (Ho - 1) * sh + 1, (Wo - 1) * sw + 1), cg.dtype)
    up[:, :, ::sh, ::sw] = cg
    eh = H + 2 * ph - kh - (Ho - 1) * sh            # input rows the forward never reached
    ew = W + 2 * pw - kw - (Wo - 1) * sw
    top, left = kh - 1 - ph, kw - 1 - pw
    if top < 0 or left < 0:
        raise ValueError(f"padding {padding} larger than kernel - 1 is not supported")
    up = np.pad(up, ((0, 0), (0, 0), (top, top + eh), (left, left + ew)))
    rows, (_, Hd, Wd) = im2col(up, kh, kw, 1, 0)
    assert (Hd, Wd) == (H, W)
    return rows


class _IntConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, layer):
        xq = layer.act_range.quantize(_np(x), update=layer.training)
        wq = quantize_weight(_np(w))
        O, C, kh, kw = wq.shape
        cx, ux = xq.operand()
        rows, (N, Ho, Wo) = im2col(cx, kh, kw, layer.stride, layer.padding)
        w2 = IntTensor(wq.q.reshape(O, -1), wq.scale, wq.z2, wq.fmt)
        y, rng = layer.engine.gemm(rows, ux, xq.fmt.bits, w2)
        layer._report_forward(rng, bias)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.saved_q = (xq, wq, rows, (N, Ho, Wo))
        out = torch.from_numpy(y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2).copy())
        out = out.to(x.device)
        return out + bias.detach().view(1, -1, 1, 1) if bias is not None else out

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        xq, wq, rows, (N, Ho, Wo) = ctx.saved_q
        O, C, kh, kw = wq.shape
        gq = layer.grad_range.quantize(_np(dy))
        cg, ug = gq.operand()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dX: correlation of the upsampled, padded dY with the flipped kernel
            drows = _conv_dx_rows(cg, kh, kw, layer.stride, layer.padding, xq.shape[2:])
            wt = wq.q[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, -1)
            y, rng = layer.engine.gemm(drows, ug, gq.fmt.bits,
                                       IntTensor(np.ascontiguousarray(wt), wq.scale, wq.z2,
                                                 wq.fmt))
            layer._report_dx(rng)
            H, W = xq.shape[2:]
            dx = torch.from_numpy(y.reshape(N, H, W, C).transpose(0, 3, 1, 2).copy())
        if ctx.needs_input_grad[1]:
            # dW (O, C*kh*kw) = dY (O, N*Ho*Wo) x im2col(X)^T
            a = np.ascontiguousarray(cg.transpose(1, 0, 2, 3).reshape(O, -1))
            z = xq.z2 // 2
            xt = IntTensor((np.ascontiguousarray(rows.T) + z).astype(np.uint16), xq.scale,
                           xq.z2, xq.fmt)
            y, _ = layer.engine.gemm(a, ug, gq.fmt.bits, xt)
            dw = torch.from_numpy(y.reshape(O, C, kh, kw).copy())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3))
        ctx.saved_q = None
        return dx, dw, db, None


class IntLinear(nn.Linear, _IntLayerMixin):
    """``nn.Linear`` whose three GEMMs are integer GEMMs (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 method: str = "hindsight", eta: float = 0.9,
                 engine: IntGemmEngine | None = None, keep_history: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self._setup_int(method, eta, engine or IntGemmEngine(), keep_history)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if x.dim() != 2:
            raise ValueError(f"IntLinear takes (batch, {self.in_features}) input, got "
                             f"shape {tuple(x.shape)}")
        return _IntGemmFn.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.extra_repr_int()}"


class IntConv2d(nn.Conv2d, _IntLayerMixin):
    """``nn.Conv2d`` (groups 1, dilation 1, zero padding) whose forward, input-gradient
    and weight-gradient convolutions are integer im2col GEMMs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, bias: bool = True, *, method: str = "hindsight",
                 eta: float = 0.9, engine: IntGemmEngine | None = None,
                 keep_history: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        if isinstance(self.padding, str):
            raise ValueError(f"padding={padding!r}; IntConv2d takes integer padding")
        self._setup_int(method, eta, engine or IntGemmEngine(), keep_history)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if x.dim() != 4:
            raise ValueError(f"IntConv2d takes (N, C, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        return _IntConvFn.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.extra_repr_int()}"


def _convertible(m: nn.Module) -> str | None:
    if type(m) is nn.Linear:
        return "linear"
    if type(m) is nn.Conv2d:
        if (m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros"
                or isinstance(m.padding, str)):
            return None
        return "conv"
    return None


def int_layers(model: nn.Module) -> list:
    """The integer-GEMM layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _IntLayerMixin)]


def convert_int(model: nn.Module, method: str = "hindsight", *, backend: Any = "emulate",
                eta: float = 0.9, keep_history: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` (groups 1, dilation 1, zero padding)
    of ``model`` for :class:`IntLinear` / :class:`IntConv2d` in place (parameters kept),
    all sharing one :class:`IntGemmEngine`, and link consecutive integer layers of every
    ``nn.Sequential`` joined only by :data:`LINK_THROUGH` modules (the producer's
    statistics feed the consumer's hindsight ranges).

    ``backend``: ``"emulate"`` (the golden integer GEMM in process), a device URL
    (``"emulate://"``, ``"sim://"``, ``"serial://..."``) or an open
    :class:`~hbfp_hw.host.Device`.
    """
    if method not in ("dynamic", "hindsight"):
        raise ValueError(f"method={method!r}; accepted values are 'dynamic', 'hindsight'")
    if backend is None or backend == "emulate":
        dev = None
    elif isinstance(backend, str):
        if "://" not in backend:
            raise ValueError(f"backend={backend!r}; accepted values are 'emulate' or a "
                             "device URL such as 'emulate://'")
        from .device import open as open_device
        dev = open_device(backend)
    else:
        dev = backend
    engine = IntGemmEngine(dev)

    def make(m: nn.Module, kind: str) -> nn.Module:
        kw = dict(method=method, eta=eta, engine=engine, keep_history=keep_history)
        if kind == "linear":
            new = IntLinear(m.in_features, m.out_features, m.bias is not None, **kw)
        else:
            new = IntConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                            m.padding, m.bias is not None, **kw)
        new.weight = m.weight
        if m.bias is not None:
            new.bias = m.bias
        return new.to(m.weight.device)

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            kind = _convertible(child)
            if kind is not None:
                setattr(parent, name, make(child, kind))
            else:
                walk(child)

    walk(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        prev = None
        for child in seq.children():
            if isinstance(child, _IntLayerMixin):
                if prev is not None:
                    object.__setattr__(prev, "int_next", child)
                    object.__setattr__(child, "int_prev", prev)
                prev = child
            elif not isinstance(child, LINK_THROUGH):
                prev = None
    model.int_engine = engine
    return model
