"""``hbfp-hw sim UNIT``: generate, build and run a unit's cocotb regression, with waves;
``sim://?vcd=PATH``."""

import pytest

from hbfp_hw.cli import main


def test_sim_quantizer_with_waves(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)      # a relative output folder
    assert main(["sim", "quantizer", "-o", tmp_path.name, "--count", "20", "--waves",
                 "--config", '{"format": {"man_bits": 4, "block_shape": [8]}, "lanes": 2}'
                 ]) == 0
    out = capsys.readouterr().out
    wave = tmp_path / "build" / "dump.vcd"
    assert f"waves: {wave}" in out and "passed" in out
    text = wave.read_text(errors="replace")
    assert "$enddefinitions" in text and "i__valid" in text and "o__ready" in text
    # the regression ran the generated config (4-bit mantissas, blocks of 8, 2 lanes)
    manifest = (tmp_path / "gen" / "quantizer.json").read_text()
    assert '"man_bits": 4' in manifest and '"lanes": 2' in manifest


@pytest.mark.parametrize("argv,msg", [
    (["--count", "0"], "--count=0; accepted range is >= 1"),
    (["--seed", "-1"], "--seed=-1; accepted range is [0, 2**32-1]"),
    (["--config", '{"lane": 2}'], "unknown key 'lane'"),
])
def test_sim_errors(argv, msg, tmp_path, capsys):
    assert main(["sim", "quantizer", "-o", str(tmp_path), *argv]) == 2
    assert msg in capsys.readouterr().err


def test_sim_url_writes_a_vcd(tmp_path):
    from hbfp_hw.host.device import open as open_device
    from hbfp_hw.gateware.sim_device import SIM_CONFIG
    small = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], array_rows=1, array_cols=1,
                               operand_depth=256, input_depth=64, output_depth=256, k_max=16,
                               bitlayer_lanes=0)
    path = tmp_path / "w.vcd"
    with open_device(f"sim://?vcd={path}", config=small) as dev:
        dev.reset()
    text = path.read_text()
    assert "$enddefinitions" in text and "cmd__payload" in text
    assert text.rstrip().splitlines()[-1].startswith(("#", "b", "0", "1"))  # value changes
    with pytest.raises(ValueError, match="unknown option 'wave'; sim:// accepts vcd=PATH"):
        open_device("sim://?wave=x.vcd")
    with pytest.raises(ValueError, match="the folder .* does not exist"):
        open_device(f"sim://?vcd={tmp_path}/no/such/w.vcd")
