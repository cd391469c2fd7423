"""The LUQ training rows: convert() kwargs, the fake-quantization mode, the hook's state."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hbfp_hw.formats import HBFP4  # noqa: E402
from hbfp_hw.host.torch import convert  # noqa: E402
from hbfp_hw.host.train import make_model  # noqa: E402
from hbfp_hw.host.train_luq import TRAIN_FORMATS, luq_kwargs  # noqa: E402
from hbfp_hw.luq import LUQFormat, luq_quantize  # noqa: E402


def test_rows():
    assert len(TRAIN_FORMATS) == 9
    assert TRAIN_FORMATS["hb4fwd-f32"][1]()["grad_fmt"].name == "fp32"
    for name, (desc, factory) in TRAIN_FORMATS.items():
        if name == "hb4fwd-f32":
            continue
        kw = factory()
        g = kw["grad_fmt"]
        assert isinstance(g, LUQFormat) and g.bits == 4
        assert (g.alpha == "hindsight") == ("-hs" in name)
        assert g.samples == (2 if "smp2" in name else 1)
        assert (kw["act_fmt"] is HBFP4) == name.endswith("-hb4")
        assert "LUQ-4" in desc


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gradients_are_luq_values(model):
    """dY reaching the layers' backward is on the LUQ grid of its own (first step) max."""
    torch.manual_seed(0)
    m = make_model(model)
    convert(m, seed=3, **luq_kwargs("hindsight", 1, "hbfp4"))
    seen = []
    last = [mod for mod in m.modules() if hasattr(mod, "_fake_state")][-1]
    orig = last._fake_quant

    def spy(x, fmt, role):
        out = orig(x, fmt, role)
        if role == "grad":
            seen.append((x.copy(), out))
        return out
    last._fake_quant = spy
    x = torch.randn(16, 1, 8, 8)
    for _ in range(2):
        m(x).logsumexp(1).sum().backward()
    (g1, q1), (g2, q2) = seen
    a1 = np.abs(g1).max() / 64
    mags = np.abs(q1[q1 != 0]) / np.float32(a1)
    np.testing.assert_allclose(mags, 2.0 ** np.round(np.log2(mags)), rtol=1e-6)
    assert np.log2(mags).max() <= 6
    st = last._fake_state["grad"]
    assert st["steps"] == 2 and st["max_abs"] == float(np.abs(g2).max())
    # step 2 used step 1's maximum (in hindsight)
    assert np.abs(q2).max() <= np.abs(g1).max() * (1 + 1e-6)
    assert luq_quantize(g2, LUQFormat(), max_abs=float(np.abs(g1).max())).alpha == \
        pytest.approx(a1, rel=1e-6)
