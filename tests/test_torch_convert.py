"""convert(): what it converts and skips, the include filter, atomicity; the layers'
input checks (dtype, unbatched convolution input, 3-D block formats)."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from hbfp_hw import HBFP4, HBFP8  # noqa: E402
from hbfp_hw.host.torch import BFPConv2d, BFPLinear, ConversionReport, convert  # noqa: E402


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, groups=2),
                         nn.Conv1d(4, 4, 1), nn.Flatten(),
                         nn.Sequential(nn.Linear(8, 8), MyLinear(8, 4)))


def test_report_lists_converted_and_skipped_with_reasons(capsys):
    m = convert(_model(), HBFP8, verbose=True)
    rep = m.bfp_conversion
    assert isinstance(rep, ConversionReport)
    assert rep.converted == ["0", "5.0"]
    reasons = dict(rep.skipped)
    assert set(reasons) == {"2", "3", "5.1"}
    assert "groups=2" in reasons["2"]
    assert "Conv1d is not supported" in reasons["3"]
    assert "MyLinear is a subclass of nn.Linear" in reasons["5.1"]
    assert type(m[5][1]) is MyLinear and isinstance(m[0], BFPConv2d)
    out = capsys.readouterr().out
    assert "converted 2 layer(s): 0, 5.0" in out and "left in FP32: 3 (Conv1d" in out


def test_include_filter():
    m = convert(_model(), HBFP8, include=lambda name, mod: not name.startswith("5"))
    assert m.bfp_conversion.converted == ["0"]
    assert ("5.0", "excluded by include") in m.bfp_conversion.skipped
    with pytest.raises(TypeError, match="include must be a callable"):
        convert(_model(), include="0")


def test_an_error_leaves_the_model_unchanged():
    m = _model()
    before = [type(x) for x in m.modules()]
    bad3d = HBFP8.replace(block_shape=(2, 2, 2), block_axes=(0, 1, 2))
    with pytest.raises(ValueError, match="3-D blocks"):
        convert(m, HBFP8, grad_fmt=bad3d)
    assert [type(x) for x in m.modules()] == before
    assert not hasattr(m, "bfp_conversion")


def test_input_dtype_is_checked():
    lin = BFPLinear(4, 2, fmt=HBFP4)
    for dt in (torch.float64, torch.float16, torch.int64):
        with pytest.raises(TypeError, match=f"takes float32 input .*got {dt}"):
            lin(torch.ones(3, 4, dtype=dt))


def test_conv_takes_unbatched_input():
    torch.manual_seed(0)
    conv = BFPConv2d(2, 3, 3, padding=1, fmt=HBFP8)
    x = torch.randn(2, 5, 5)
    y = conv(x)
    assert y.shape == (3, 5, 5)
    torch.testing.assert_close(y, conv(x.unsqueeze(0))[0])
    with pytest.raises(ValueError, match=r"takes \(N, C, H, W\) or \(C, H, W\) input, got "
                                         r"shape \(5, 5\)"):
        conv(torch.randn(5, 5))


def test_round_weights_reaches_the_dense_weight_of_a_pruned_layer():
    from hbfp_hw import quantize
    from hbfp_hw.host.torch import round_weights
    torch.manual_seed(3)
    m = convert(nn.Sequential(nn.Linear(16, 8)), HBFP8, shadow_fmt=HBFP4,
                sparsity="2:4-transposable", mask_period=1)
    lin = m[0]
    dense = lin.parametrizations.weight.original
    round_weights(m)
    want = quantize(dense.detach().numpy(), HBFP4).dequantize()
    assert torch.equal(dense.detach(), torch.from_numpy(want))
    assert (lin.weight == 0).sum() == lin.weight.numel() // 2     # still pruned 2:4
