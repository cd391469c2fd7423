"""Post-training quantization (hbfp_hw.ptq): policy, quantizers, bias correction, LAPQ.

The quantized layers are checked against float64 recomputations from the documented
definitions (the integer GEMM itself is checked bit-exactly in test_intgemm.py).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from hbfp_hw import ptq  # noqa: E402
from hbfp_hw.intgemm import IntFormat, int_conv2d, int_linear, quantize_int  # noqa: E402


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _data(model, rng, shape, n=192):
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()      # the FP32 model is right
    return x, y


def _sym_ref(w, alpha, bits):
    """-alpha + k * 2 alpha / L with the float32 step, nearest (half even), clipped."""
    L = 2**bits - 1
    s = float(np.float32(2 * alpha / L))
    k = np.clip(np.rint(w / s + L / 2), 0, L)
    return s * (k - L / 2)


def _uns_ref(x, alpha, bits):
    L = 2**bits - 1
    s = float(np.float32(alpha / L))
    return s * np.clip(np.rint(x / s), 0, L)


def test_max_clip_policy_and_layer_math(rng):
    model = _mlp(1)
    x, _ = _data(model, rng, (12,))
    before = [p.detach().clone() for p in model.parameters()]
    q = ptq.max_clip(model, x, w_bits=3, a_bits=4)
    # the original is untouched; first and last stay FP32, the middle two are quantized
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert isinstance(q[0], nn.Linear) and isinstance(q[6], nn.Linear)
    assert q.ptq_info["layers"] == ["2", "4"]
    # float64 walk through the model from the definitions
    h = np.maximum(x.astype(np.float64) @ model[0].weight.detach().double().numpy().T
                   + model[0].bias.detach().double().numpy(), 0)
    for name in ("2", "4"):
        lin = model[int(name)]
        W, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
        aw, aa = q.ptq_info["alphas"][name]
        assert (aw, aa) == pytest.approx((np.abs(W).max(), h.max()), rel=1e-6)
        h32 = h.astype(np.float32)
        What, hhat = _sym_ref(W, aw, 3), _uns_ref(h32.astype(np.float64), aa, 4)
        b_corr = b - (What - W) @ h.mean(0)                 # bias correction
        # the quantized layer: integer GEMM of the quantized operands + corrected bias
        got = q[int(name)](torch.from_numpy(h32)).numpy()
        want = hhat @ What.T + b_corr
        assert np.abs(got - want).max() <= 1e-5 * (1 + np.abs(want).max())
        h = np.maximum(h @ W.T + b, 0)                      # FP32 inputs of the next layer
    with torch.no_grad():
        out = q(torch.from_numpy(x)).numpy()
    assert out.shape == (len(x), 4) and np.all(np.isfinite(out))


def test_quantized_layer_is_the_integer_gemm(rng):
    model = _mlp(2)
    x, _ = _data(model, rng, (12,))
    q = ptq.max_clip(model, x, 4, 4, bias_correction=False)
    layer = q[2]
    h = rng.uniform(0, 3, (7, 24)).astype(np.float32)
    aw, aa = q.ptq_info["alphas"]["2"]
    a = quantize_int(h, IntFormat(4, "unsigned"), alpha=aa)
    w = quantize_int(model[2].weight.detach().numpy(), IntFormat(4, "symmetric", axis=0),
                     alpha=aw)
    want = int_linear(a, w) + model[2].bias.detach().numpy()
    np.testing.assert_array_equal(layer(torch.from_numpy(h)).numpy(), want)


def test_conv_layers(rng):
    model = _cnn(3)
    x, y = _data(model, rng, (1, 6, 6), n=64)
    q = ptq.max_clip(model, x, 4, 4)
    assert isinstance(q[0], nn.Conv2d) and isinstance(q[7], nn.Linear)
    assert q.ptq_info["layers"] == ["2", "5"]
    conv = model[2]
    with torch.no_grad():
        h = torch.relu(model[0](torch.from_numpy(x))).double().numpy()
    W, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    aw, aa = q.ptq_info["alphas"]["2"]
    assert (aw, aa) == pytest.approx((np.abs(W).max(), h.max()), rel=1e-6)
    What, hhat = _sym_ref(W, aw, 4), _uns_ref(h, aa, 4)
    b_corr = b - (What - W).sum(axis=(2, 3)) @ h.mean(axis=(0, 2, 3))
    want = torch.nn.functional.conv2d(torch.from_numpy(hhat), torch.from_numpy(What),
                                      torch.from_numpy(b_corr), stride=2, padding=1).numpy()
    got = q[2](torch.from_numpy(h.astype(np.float32))).numpy()
    assert np.abs(got - want).max() <= 1e-5 * (1 + np.abs(want).max())
    # and bit-exact with the golden integer convolution
    a = quantize_int(h.astype(np.float32), IntFormat(4, "unsigned"), alpha=aa)
    w = quantize_int(W.astype(np.float32), IntFormat(4, "symmetric", axis=0), alpha=aw)
    exact = int_conv2d(a, w, stride=2, padding=1) + q[2].bias32[None, :, None, None]
    np.testing.assert_array_equal(got, exact)


def test_all_layers_and_signed_inputs(rng):
    model = _mlp(4)
    x, _ = _data(model, rng, (12,))
    q = ptq.max_clip(model, x, 4, 4, keep_first_last=False)
    assert q.ptq_info["layers"] == ["0", "2", "4", "6"]
    assert q[0].a_fmt.kind == "symmetric"          # the model input is signed
    assert q[2].a_fmt.kind == "unsigned"           # post-ReLU
    assert q[0].alpha_a == pytest.approx(np.abs(x).max())


def test_lp_alpha_against_brute_force(rng):
    x = rng.standard_normal(4000)
    for fmt, data in ((IntFormat(4, "symmetric"), x), (IntFormat(3, "unsigned"), np.abs(x))):
        for p in (2.0, 3.0, 4.0):
            def err(a):
                return np.mean(np.abs(quantize_int(data, fmt, alpha=a).dequantize64() - data)
                               ** p)
            amax = np.abs(data).max()
            grid = np.linspace(0.05, 1.0, 400) * amax
            best = min(err(a) for a in grid)
            got = ptq.lp_alpha(data, fmt, p)
            assert 1e-3 * amax <= got <= amax
            assert err(got) <= best * 1.02, (fmt, p)
    # larger p clips less
    f = IntFormat(4, "symmetric")
    assert ptq.lp_alpha(x, f, 2.0) < ptq.lp_alpha(x, f, 4.0)


def test_lapq(rng):
    model = _mlp(5)
    x, y = _data(model, rng, (12,), n=160)
    q = ptq.lapq(model, x, y, w_bits=2, a_bits=3, p_grid=(2.0, 3.0, 4.0),
                 powell_options={"maxiter": 1, "xtol": 1e-2, "ftol": 1e-3})
    info = q.ptq_info
    assert info["method"] == "lapq" and len(info["p_losses"]) == 3
    assert 2.0 <= info["p_star"] <= 4.0
    c2, c1, _ = info["quad_fit"]
    if c2 > 0:
        assert info["p_star"] == pytest.approx(np.clip(-c1 / (2 * c2), 2, 4))
    assert info["loss_final"] <= info["loss_init"]
    assert info["nfev"] > 0 and info["scipy_version"]
    # the recorded losses are the calibration cross-entropy of the returned models
    def ce(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(torch.from_numpy(x)),
                                                     torch.from_numpy(y)))
    assert ce(q) == pytest.approx(info["loss_final"], rel=1e-6)
    qi = ptq.with_alphas(q, info["alphas_init"])
    assert ce(qi) == pytest.approx(info["loss_init"], rel=1e-6)
    # deterministic: the same call gives the same logits bit for bit
    lp = ptq.lp_init(model, x, y, w_bits=2, a_bits=3, p_grid=(2.0, 3.0, 4.0))
    with torch.no_grad():
        assert torch.equal(lp(torch.from_numpy(x)), qi(torch.from_numpy(x)))


def test_calibration_subset():
    x, y = np.arange(100.0)[:, None], np.arange(100)
    a, b = ptq.calibration_subset(x, y, 10, seed=3)
    assert len(set(b.tolist())) == 10 and np.array_equal(a[:, 0], b)
    assert np.array_equal(ptq.calibration_subset(x, y, 10, seed=3)[1], b)
    with pytest.raises(ValueError, match=r"n=101 is out of range; accepted range is \[1, 100\]"):
        ptq.calibration_subset(x, y, 101)


def test_errors(rng):
    model = _mlp(6)
    x, y = _data(model, rng, (12,), n=32)
    with pytest.raises(ValueError, match=r"w_bits=1 is out of range; accepted range is \[2, 16\]"):
        ptq.max_clip(model, x, w_bits=1)
    with pytest.raises(ValueError, match=r"a_bits=17 is out of range"):
        ptq.lapq(model, x, y, a_bits=17)
    with pytest.raises(ValueError, match="backend='gpu': accepted values are 'emulate'"):
        ptq.max_clip(model, x, backend="gpu")
    with pytest.raises(ValueError, match="calib_y must be 32 class labels"):
        ptq.lapq(model, x, y[:5])
    with pytest.raises(ValueError, match="no layer left to quantize"):
        ptq.max_clip(nn.Sequential(nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 2)), x)
    with pytest.raises(ValueError, match="groups=1"):
        ptq.max_clip(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1, groups=2),
                                   nn.Conv2d(2, 2, 1)), np.ones((2, 2, 3, 3), np.float32))
    q = ptq.max_clip(model, x)
    with pytest.raises(ValueError, match="unknown layers"):
        ptq.with_alphas(q, {"9": (1.0, 1.0)})


def test_docs_example_runs():
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "ptq.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", src, re.S)
    runnable = [b for b in blocks if "import" in b]
    assert runnable, "docs/ptq.md has no runnable example"
    exec(compile(runnable[0], "docs/ptq.md", "exec"), {})
