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
