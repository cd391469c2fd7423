"""Post-training quantization to uniform integer GEMMs: LAPQ and max-abs clipping.

``max_clip(model, calib_x)`` and ``lapq(model, calib_x, calib_y)`` return a copy of a
trained PyTorch model in which every quantized ``nn.Linear`` / ``nn.Conv2d`` runs its GEMM
through the golden integer GEMM (:mod:`hbfp_hw.intgemm`); the original model is not
changed. The quantizers (``L = 2**bits - 1``, one clipping value ``alpha`` per tensor):

* weights, ``w_bits``: the symmetric grid ``-alpha + k * 2 alpha / L`` (``2**bits``
  levels, no exact zero): :class:`~hbfp_hw.intgemm.IntFormat` ``kind="symmetric"``;
* activations (the input of each quantized layer), ``a_bits``: ``k * alpha / L``
  (``kind="unsigned"``) when the calibration inputs of the layer are all ``>= 0``
  (post-ReLU), otherwise the symmetric grid.

Policy: the first and the last GEMM layer (in ``model.modules()`` order) stay FP32
(``keep_first_last=False`` quantizes them too). Bias correction (``bias_correction=True``)
replaces each quantized layer's bias ``b`` by ``b - (W_hat - W) E[x]`` with ``E[x]`` the
mean calibration input of the layer (per feature for Linear; per input channel for
Conv2d, the kernel taps summed), so the expected output of each channel is unchanged.

Clipping values:

* :func:`max_clip`: ``alpha = max|w|`` and ``alpha = max`` of the calibration input.
* :func:`lp_init`: for each ``p`` of ``p_grid`` (default ``linspace(2, 4, 10)``) and each
  tensor, ``alpha_p = argmin mean|Q_alpha(x) - x|**p`` over ``[1e-3 max|x|, max|x|]``
  (``scipy.optimize.minimize_scalar(method="bounded", options={"xatol": 1e-4 max|x|})``,
  on the FP32 model's calibration inputs); the calibration cross-entropy of the model
  quantized with all ``alpha_p`` is fitted by a quadratic in ``p``; ``p*`` is its vertex
  clipped to the grid's range (the grid's best ``p`` if the fit is not convex) and
  ``alpha0 = alpha_{p*}`` (a new search at ``p*``).
* :func:`lapq`: from ``alpha0``, all clipping values jointly minimise the calibration
  cross-entropy with ``scipy.optimize.minimize(method="Powell")`` (no ``bounds``; the
  options of :data:`POWELL_OPTIONS`) over ``r = alpha / alpha0``, ``r`` clipped to
  ``[0.01, max|x| / alpha0]`` inside the objective; the result is the best point
  evaluated.

The returned module is for inference (``no_grad``; inputs are detached). Its
``ptq_info`` dict records the layers, clipping values, calibration losses and the
optimiser's settings and evaluation count.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from .intgemm import IntFormat, int_conv2d, int_linear, quantize_int

__all__ = ["POWELL_OPTIONS", "P_GRID", "calibration_subset", "max_clip", "lp_init", "lapq",
           "lp_alpha", "quantized_layers", "with_alphas", "deploy"]

#: Options of ``scipy.optimize.minimize(method="Powell")`` in :func:`lapq`.
POWELL_OPTIONS = {"maxiter": 2, "xtol": 1e-2, "ftol": 1e-4}
#: The default grid of ``p`` for the Lp initialisation.
P_GRID = tuple(float(p) for p in np.linspace(2.0, 4.0, 10))


def _check_bits(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 2 <= v <= 16:
        raise ValueError(f"{name}={v!r} is out of range; accepted range is [2, 16]")


def _check_backend(backend):
    if isinstance(backend, str) and (backend == "emulate" or "://" in backend):
        return
    if hasattr(backend, "bitlayer_matmul"):
        return
    raise ValueError(
        f"backend={backend!r}: accepted values are 'emulate' (the golden integer GEMM), a "
        f"device URL such as 'emulate://' or 'sim://', or an open hbfp_hw.host Device")


class _DeviceRef:
    """Holds the device a quantized layer runs on; shared, never deep-copied."""

    def __init__(self, device=None) -> None:
        self.device = device

    def __deepcopy__(self, memo):
        return self


@functools.lru_cache(maxsize=None)
def _qlayer_class():
    import torch
    from torch import nn

    class IntGemmLayer(nn.Module):
        """A Linear or Conv2d whose GEMM is the golden integer GEMM."""

        def __init__(self, src, name, w_bits, a_bits, a_kind, x_mean):
            super().__init__()
            self.name = name
            self.is_conv = isinstance(src, nn.Conv2d)
            if self.is_conv:
                self.stride, self.padding = tuple(src.stride), tuple(src.padding)
            self.weight64 = src.weight.detach().cpu().double().numpy().copy()
            self.bias64 = (src.bias.detach().cpu().double().numpy().copy()
                           if src.bias is not None else np.zeros(self.weight64.shape[0]))
            self.w_fmt = IntFormat(w_bits, "symmetric", axis=0, name=f"W{w_bits}")
            self.a_fmt = IntFormat(a_bits, a_kind, name=f"A{a_bits}")
            self.x_mean = x_mean
            self.alpha_w = self.alpha_a = None
            self.target = _DeviceRef()

        def set_alphas(self, alpha_w: float, alpha_a: float) -> None:
            self.alpha_w, self.alpha_a = float(alpha_w), float(alpha_a)
            self.wq = quantize_int(self.weight64, self.w_fmt, alpha=self.alpha_w)
            b = self.bias64
            if self.x_mean is not None:
                dw = self.wq.dequantize64() - self.weight64
                if self.is_conv:
                    dw = dw.sum(axis=(2, 3))
                b = b - dw @ self.x_mean
            self.bias32 = b.astype(np.float32)

        def forward(self, x):
            xn = x.detach().cpu().numpy()
            dev = self.target.device
            if dev is None:
                lin, conv = int_linear, int_conv2d
            else:
                from hbfp_hw.host import int_gemm
                lin = functools.partial(int_gemm.int_linear, dev)
                conv = functools.partial(int_gemm.int_conv2d, dev)
            if self.is_conv:
                aq = quantize_int(xn, self.a_fmt, alpha=self.alpha_a)
                y = conv(aq, self.wq, stride=self.stride, padding=self.padding)
                y = y + self.bias32[None, :, None, None]
            else:
                aq = quantize_int(xn.reshape(-1, xn.shape[-1]), self.a_fmt, alpha=self.alpha_a)
                y = (lin(aq, self.wq) + self.bias32).reshape(*xn.shape[:-1], -1)
            return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))

        def extra_repr(self) -> str:
            return (f"{self.name}, {self.w_fmt.describe()}, alpha_w={self.alpha_w:.4g}, "
                    f"{self.a_fmt.describe()}, alpha_a={self.alpha_a:.4g}")

    return IntGemmLayer


def _gemm_layers(model):
    from torch import nn
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros" \
                    or isinstance(m.padding, str):
                raise ValueError(f"layer {name!r}: only Conv2d with groups=1, dilation=1 and "
                                 f"integer zero padding is supported, got {m}")
            out.append((name, m))
        elif isinstance(m, nn.Linear):
            out.append((name, m))
    if not out:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to quantize")
    return out


def quantized_layers(model, keep_first_last: bool = True) -> list[str]:
    """Names of the GEMM layers the policy quantizes."""
    names = [n for n, _ in _gemm_layers(model)]
    if keep_first_last:
        names = names[1:-1]
    if not names:
        raise ValueError(f"no layer left to quantize: the model has {len(_gemm_layers(model))}"
                         f" GEMM layers and keep_first_last=True keeps the first and last")
    return names


def calibration_subset(x, y=None, n: int = 512, seed: int = 0):
    """``n`` samples drawn without replacement (seeded) from the training data."""
    x = np.asarray(x)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(x):
        raise ValueError(f"n={n!r} is out of range; accepted range is [1, {len(x)}]")
    idx = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return (x[idx],) if y is None else (x[idx], np.asarray(y)[idx])


def _to_tensor(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _capture_inputs(model, names, calib_x):
    import torch
    mods = dict(model.named_modules())
    got, hooks = {}, []
    for n in names:
        hooks.append(mods[n].register_forward_hook(
            lambda m, inp, out, n=n: got.__setitem__(n, inp[0].detach().cpu().numpy())))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_to_tensor(calib_x))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return got


class _Setup:
    """The quantized copy and what the clipping searches need."""

    def __init__(self, model, calib_x, w_bits, a_bits, backend, keep_first_last,
                 bias_correction):
        _check_bits("w_bits", w_bits)
        _check_bits("a_bits", a_bits)
        _check_backend(backend)
        self.backend = backend
        calib_x = np.asarray(calib_x.detach().cpu() if hasattr(calib_x, "detach") else calib_x,
                             dtype=np.float32)
        if calib_x.ndim < 2 or len(calib_x) < 1:
            raise ValueError(f"calib_x must hold at least one sample, got shape {calib_x.shape}")
        self.names = quantized_layers(model, keep_first_last)
        self.inputs = _capture_inputs(model, self.names, calib_x)
        self.calib_x = calib_x
        self.qmodel = copy.deepcopy(model).eval()
        cls = _qlayer_class()
        src = dict(self.qmodel.named_modules())
        self.layers = []
        for n in self.names:
            x = self.inputs[n].astype(np.float64)
            kind = "unsigned" if x.min() >= 0 else "symmetric"
            if bias_correction:
                xm = x.mean(axis=tuple(i for i in range(x.ndim) if i != 1)) \
                    if isinstance(src[n], _nn().Conv2d) else x.reshape(-1, x.shape[-1]).mean(0)
            else:
                xm = None
            q = cls(src[n], n, w_bits, a_bits, kind, xm)
            parent, _, leaf = n.rpartition(".")
            setattr(self.qmodel.get_submodule(parent) if parent else self.qmodel, leaf, q)
            self.layers.append(q)
        # per tensor: (values, grid format, max clipping value), weights then activations
        self.tensors = []
        for q in self.layers:
            w = q.weight64.ravel()
            x = self.inputs[q.name].astype(np.float64).ravel()
            amax = float(np.abs(x).max() if q.a_fmt.kind == "symmetric" else max(x.max(), 0))
            self.tensors.append((w, q.w_fmt.replace(axis=None), float(np.abs(w).max())))
            self.tensors.append((x, q.a_fmt, amax))
        self.max_alphas = np.array([t[2] for t in self.tensors])

    def set(self, alphas) -> None:
        for i, q in enumerate(self.layers):
            q.set_alphas(alphas[2 * i], alphas[2 * i + 1])

    def loss(self, calib_x, calib_y) -> float:
        import torch
        with torch.no_grad():
            out = self.qmodel(_to_tensor(calib_x))
            return float(torch.nn.functional.cross_entropy(
                out, torch.as_tensor(np.asarray(calib_y), dtype=torch.long)))

    def finish(self, method, info):
        self.qmodel.ptq_info = dict(
            method=method, layers=list(self.names),
            alphas={q.name: (q.alpha_w, q.alpha_a) for q in self.layers},
            w_bits=self.layers[0].w_fmt.bits, a_bits=self.layers[0].a_fmt.bits, **info)
        if self.backend != "emulate":
            return deploy(self.qmodel, self.backend)
        return self.qmodel


def _nn():
    from torch import nn
    return nn


def lp_alpha(x, fmt: IntFormat, p: float, amax: float | None = None) -> float:
    """``argmin_alpha mean|Q_alpha(x) - x|**p`` over ``[1e-3 amax, amax]`` (bounded
    Brent, ``xatol = 1e-4 amax``); ``amax`` defaults to ``max|x|``."""
    from scipy.optimize import minimize_scalar
    if not (np.isfinite(p) and p > 0):
        raise ValueError(f"p={p!r} is out of range; accepted range is (0, inf)")
    x = np.asarray(x, dtype=np.float64).ravel()
    amax = float(np.abs(x).max()) if amax is None else float(amax)
    if amax <= 0:
        return 0.0

    def err(a):
        return float(np.mean(np.abs(quantize_int(x, fmt, alpha=a).dequantize64() - x) ** p))

    r = minimize_scalar(err, bounds=(1e-3 * amax, amax), method="bounded",
                        options={"xatol": 1e-4 * amax})
    return float(r.x)


def max_clip(model, calib_x, w_bits: int = 4, a_bits: int = 4, *, backend="emulate",
             keep_first_last: bool = True, bias_correction: bool = True):
    """Quantized copy of ``model`` with max-abs clipping values (see the module doc)."""
    st = _Setup(model, calib_x, w_bits, a_bits, backend, keep_first_last, bias_correction)
    st.set(st.max_alphas)
    return st.finish("max_clip", {})


def _lp(st: _Setup, calib_y, p_grid):
    p_grid = tuple(float(p) for p in p_grid)
    if len(p_grid) < 3 or not all(np.isfinite(p) and p > 0 for p in p_grid):
        raise ValueError(f"p_grid={p_grid!r} needs at least 3 finite values > 0")
    losses = []
    for p in p_grid:
        st.set([lp_alpha(x, f, p, m) for x, f, m in st.tensors])
        losses.append(st.loss(st.calib_x, calib_y))
    coef = np.polyfit(p_grid, losses, 2)
    if coef[0] > 0:
        p_star = float(np.clip(-coef[1] / (2 * coef[0]), min(p_grid), max(p_grid)))
    else:
        p_star = p_grid[int(np.argmin(losses))]
    alphas = np.array([lp_alpha(x, f, p_star, m) for x, f, m in st.tensors])
    st.set(alphas)
    loss = st.loss(st.calib_x, calib_y)
    return alphas, dict(p_grid=p_grid, p_losses=losses, quad_fit=[float(c) for c in coef],
                        p_star=p_star, loss_init=loss)


def _check_labels(calib_x, calib_y):
    y = np.asarray(calib_y.detach().cpu() if hasattr(calib_y, "detach") else calib_y)
    if y.ndim != 1 or len(y) != len(calib_x):
        raise ValueError(f"calib_y must be {len(calib_x)} class labels, got shape {y.shape}")
    return y.astype(np.int64)


def lp_init(model, calib_x, calib_y, w_bits: int = 4, a_bits: int = 4, *, backend="emulate",
            keep_first_last: bool = True, bias_correction: bool = True, p_grid=P_GRID):
    """Quantized copy with the Lp-initialised clipping values ``alpha0`` (no Powell)."""
    st = _Setup(model, calib_x, w_bits, a_bits, backend, keep_first_last, bias_correction)
    _, info = _lp(st, _check_labels(st.calib_x, calib_y), p_grid)
    return st.finish("lp_init", info)


def lapq(model, calib_x, calib_y, w_bits: int = 4, a_bits: int = 4, *, backend="emulate",
         keep_first_last: bool = True, bias_correction: bool = True, p_grid=P_GRID,
         powell_options: dict | None = None):
    """LAPQ: Lp initialisation, then joint Powell on the calibration cross-entropy."""
    import scipy
    from scipy.optimize import minimize
    st = _Setup(model, calib_x, w_bits, a_bits, backend, keep_first_last, bias_correction)
    y = _check_labels(st.calib_x, calib_y)
    alpha0, info = _lp(st, y, p_grid)
    opts = dict(POWELL_OPTIONS if powell_options is None else powell_options)
    safe0 = np.where(alpha0 > 0, alpha0, 1.0)
    hi = np.maximum(st.max_alphas / safe0, 1.0)
    best = [info["loss_init"], np.ones(len(alpha0))]

    def f(r):
        r = np.clip(r, 0.01, hi)
        st.set(r * safe0)
        v = st.loss(st.calib_x, y)
        if v < best[0]:
            best[0], best[1] = v, r.copy()
        return v

    res = minimize(f, np.ones(len(alpha0)), method="Powell", options=opts)
    r = best[1]                               # the best point evaluated (alpha0 if none)
    st.set(r * safe0)
    info.update(alphas_init={q.name: (float(alpha0[2 * i]), float(alpha0[2 * i + 1]))
                             for i, q in enumerate(st.layers)})
    info.update(loss_final=st.loss(st.calib_x, y), nfev=int(res.nfev), powell_options=opts,
                scipy_version=scipy.__version__)
    return st.finish("lapq", info)


def deploy(qmodel, device):
    """A copy of a quantized model whose integer GEMMs run on ``device`` (a URL for
    :func:`hbfp_hw.host.open`, an open Device, or ``"emulate"`` for the golden integer
    GEMM). The integer sums run on the device's integer engine and the FP32 scaling on
    the host (:mod:`hbfp_hw.host.int_gemm`): the logits are bit-identical to the
    golden model's. The copy's ``ptq_info["device"]`` names the target."""
    _check_backend(device)
    if device == "emulate":
        dev, name = None, "emulate"
    elif isinstance(device, str):
        from hbfp_hw import host
        dev, name = host.open(device), device
    else:
        dev, name = device, type(device).__name__
    new = copy.deepcopy(qmodel)
    cls = _qlayer_class()
    layers = [m for m in new.modules() if isinstance(m, cls)]
    if not layers:
        raise ValueError("the model has no quantized layer; quantize it first with "
                         "max_clip, lp_init or lapq")
    ref = _DeviceRef(dev)
    for m in layers:
        m.target = ref
    new.ptq_info = dict(getattr(new, "ptq_info", {}), device=name)
    return new


def with_alphas(qmodel, alphas: dict):
    """A copy of a quantized model with other clipping values: ``alphas`` maps layer
    names to ``(alpha_w, alpha_a)`` (e.g. ``qmodel.ptq_info["alphas_init"]`` of a
    :func:`lapq` result gives its Lp-initialised model)."""
    cls = _qlayer_class()
    new = copy.deepcopy(qmodel)
    layers = {m.name: m for m in new.modules() if isinstance(m, cls)}
    unknown = sorted(set(alphas) - set(layers))
    if unknown:
        raise ValueError(f"unknown layers {unknown}; the quantized layers are {sorted(layers)}")
    for n, (aw, aa) in alphas.items():
        layers[n].set_alphas(aw, aa)
    if hasattr(new, "ptq_info"):
        new.ptq_info = dict(new.ptq_info, method="with_alphas",
                            alphas={n: (m.alpha_w, m.alpha_a) for n, m in layers.items()})
    return new
