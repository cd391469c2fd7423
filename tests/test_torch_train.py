"""``hbfp-hw train``: the CLI end to end (tiny run) and the accuracy table."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from hbfp_hw.cli import main  # noqa: E402
from hbfp_hw.host.train import RunResult, format_table, load_digits_split, summarise  # noqa: E402


def test_digits_split_is_fixed():
    a, b = load_digits_split(), load_digits_split()
    assert a[0].shape == (1437, 1, 8, 8) and a[2].shape == (360, 1, 8, 8)
    assert (a[1] == b[1]).all() and (a[3] == b[3]).all()
    assert 0.0 <= a[0].min() and a[0].max() <= 1.0


def test_table_marks_targets():
    rs = [RunResult("mlp", "fp32", s, [90.0, v]) for s, v in enumerate([97.0, 98.0])]
    rs += [RunResult("mlp", "hbfp8", s, [90.0, v]) for s, v in enumerate([96.5, 97.3])]
    rs += [RunResult("mlp", "hb4", s, [90.0, v]) for s, v in enumerate([96.0, 97.2])]
    summ = summarise(rs)
    assert summ[("mlp", "fp32")] == (97.5, 97.0, 98.0, 2)
    t = format_table(rs)
    assert ("| mlp | hbfp8 | 96.90 | 96.50 | 97.30 | 2 | -0.60 vs fp32 "
            "| within 0.5 pt: MISSED |") in t
    assert "| mlp | hb4 | 96.60 | 96.00 | 97.20 | 2 | -0.90 vs fp32 | within 1.0 pt: met |" in t


def test_cli_tiny_run(tmp_path, capsys):
    png = tmp_path / "curves.png"
    rc = main(["train", "--model", "mlp", "--formats", "fp32,hbfp8", "--epochs", "1",
               "--seeds", "1", "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| mlp | fp32 |" in out and "| mlp | hbfp8 |" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_unknown_format(capsys):
    assert main(["train", "--formats", "fp32,fp8"]) == 2
    assert "unknown format 'fp8'" in capsys.readouterr().err


def test_hb4_variants_differ_from_hb4_only_where_named():
    from hbfp_hw.formats import HBFP4, HBFP8
    from hbfp_hw.host.train import FORMAT_NAMES, format_kwargs
    assert {"hb4", "hb4-t8", "hb4-in8"} <= set(FORMAT_NAMES)
    base = format_kwargs("hb4")
    t8 = format_kwargs("hb4-t8")
    assert t8["fmt"].block_shape == (8, 8) and t8["fmt"].man_bits == 4
    assert t8["fmt"].replace(block_shape=(16, 16), name=HBFP4.name) == HBFP4
    in8 = format_kwargs("hb4-in8")
    assert in8.pop("input_act_fmt") is HBFP8
    assert in8 == base and t8["grad_stochastic"] is True


def test_hb4_is_all_4bit_hyperblock_with_a_dithered_input():
    """hb4 (convert's default for HBFP4): every role of every layer is HBFP4 (4-bit
    mantissas, 16x16 tiles); only the model input is rounded stochastically, with new
    bits each training step, and evaluation rounds it to nearest. hb4-rne and an
    explicit input_act_stochastic=False keep round to nearest."""
    import numpy as np
    import torch

    from hbfp_hw.formats import HBFP4, HBFP8
    from hbfp_hw.host.torch import bfp_layers, convert
    from hbfp_hw.host.train import FORMAT_NAMES, format_kwargs, make_model
    from hbfp_hw.host.torch_quant import torch_quantize

    assert {"hb4", "hb4-rne"} <= set(FORMAT_NAMES)
    kw = format_kwargs("hb4")
    assert kw == dict(fmt=HBFP4, grad_stochastic=True)
    rne = convert(make_model("mlp"), seed=3, **format_kwargs("hb4-rne"))
    assert [la.act_stochastic for la in bfp_layers(rne)] == [False] * 3
    assert not any(la.act_stochastic for la in bfp_layers(convert(make_model("cnn"), HBFP8)))
    torch.manual_seed(0)
    model = convert(make_model("mlp"), seed=3, **kw)
    layers = bfp_layers(model)
    assert len(layers) == 3
    for layer in layers:
        for f in (layer.weight_fmt, layer.act_fmt, layer.grad_fmt):
            assert f.man_bits == 4 and f.block_shape == (16, 16) and f.rounding == "nearest_even"
    assert [la.act_stochastic for la in layers] == [True, False, False]

    first = layers[0]
    seen = []
    quant = first._quant

    def spy(x, fmt, role):
        q = quant(x, fmt, role)
        if role == "act":                        # the model input (first layer's X)
            seen.append((fmt, q.dequantize()))
        return q
    first._quant = spy
    xtr, ytr, _, _ = load_digits_split()
    x, y = torch.from_numpy(xtr[:32]), torch.from_numpy(ytr[:32])
    for _ in range(2):                           # two training steps
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.eval()
    with torch.no_grad():
        model(x)
    rne = torch_quantize(x.reshape(32, 64), HBFP4).dequantize()
    (f0, q0), (f1, q1), (fe, qe) = seen
    assert f0.rounding == f1.rounding == "stochastic" and f0.seed != f1.seed
    assert f0.man_bits == 4 and f0.block_shape == (16, 16)
    assert not np.array_equal(q0, rne) and not np.array_equal(q0, q1)
    assert fe.rounding == "nearest_even" and np.array_equal(qe, rne)
    # stochastic rounding is unbiased: the dithered input averages to the pixels
    # (step 0.25 on these tiles: RNE errs by up to 0.125 per pixel, 1/32 on average)
    xs = x.reshape(32, 64).numpy()
    assert abs(float((q0 - xs).mean())) < abs(float((rne - xs).mean())) + 0.01
    assert float(np.abs(q0 - xs).max()) < 0.25


def test_act_stochastic_needs_hyperblock():
    from hbfp_hw.formats import MXINT8
    from hbfp_hw.host.torch import BFPLinear
    with pytest.raises(ValueError, match="act_stochastic needs a HyperBlock"):
        BFPLinear(32, 16, fmt=MXINT8, act_stochastic=True)
