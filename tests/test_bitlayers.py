"""Golden bit-layer GEMM (hbfp_hw.bitlayers) against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import bitlayers as bl
from hbfp_hw.formats import get_format


def _scalar_planes(v: int, bits: int) -> list[int]:
    """Bits of the two's-complement code by repeated halving (no masks)."""
    code = v + (1 << bits) if v < 0 else v
    out = []
    for _ in range(bits):
        out.append(code % 2)
        code //= 2
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 12])
def test_decompose_matches_scalar_bits(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    w = rng.integers(lo, hi, size=(6, 9))
    w[0, 0], w[0, 1] = lo, hi - 1
    p = bl.decompose(w, bits)
    assert p.shape == (bits, 6, 9) and p.dtype == np.uint8
    for idx in np.ndindex(w.shape):
        assert [int(p[i][idx]) for i in range(bits)] == _scalar_planes(int(w[idx]), bits)
    # the sign plane weighs -2**(bits-1): recompose is the inverse
    val = sum((-1 if i == bits - 1 else 1) * 2**i * p[i].astype(np.int64) for i in range(bits))
    assert np.array_equal(val, w)
    assert np.array_equal(bl.recompose(p), w)


def _ref_dot(x, w, bits, layers, round_dropped=False):
    """Python-integer reference: weights truncated to their top ``layers`` bits by
    floor division (the value the kept planes stand for)."""
    d = bits - layers
    out = np.zeros((x.shape[0], w.shape[0]), dtype=object)
    for b in range(x.shape[0]):
        for o in range(w.shape[0]):
            acc = 0
            for k in range(x.shape[1]):
                wt = (int(w[o, k]) // 2**d) * 2**d
                if round_dropped and d:
                    wt += 2**(d - 1)
                acc += int(x[b, k]) * wt
            out[b, o] = acc
    return out


@pytest.mark.parametrize("bits,act_bits", [(8, 8), (8, 16), (4, 8), (1, 8), (2, 3)])
def test_matmul_every_layer_count(bits, act_bits):
    rng = np.random.default_rng(100 + bits * act_bits)
    w = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(7, 13))
    x = rng.integers(-(1 << (act_bits - 1)), 1 << (act_bits - 1), size=(4, 13))
    p = bl.decompose(w, bits)
    for layers in range(1, bits + 1):
        for rd in (False, True):
            got = bl.matmul(x, p, layers, round_dropped=rd)
            assert got.dtype == np.int64
            assert np.array_equal(got.astype(object), _ref_dot(x, w, bits, layers, rd)), \
                (layers, rd)
    assert np.array_equal(bl.matmul(x, p), x @ w.T)
    # round_dropped with every layer changes nothing
    assert np.array_equal(bl.matmul(x, p, round_dropped=True), x @ w.T)


def test_matmul_edge_cases():
    bits, a = 8, 16
    k = 64
    amax, amin = (1 << (a - 1)) - 1, -(1 << (a - 1))
    x = np.array([[amax] * k, [amin] * k, [amin, amax] * (k // 2)])
    w = np.array([[-128] * k, [127] * k, [-1] * k, [0] * k])   # most negative, max, all ones
    p = bl.decompose(w, bits)
    assert p[:, 2].all()                          # -1: every plane all ones
    for layers in (1, 8):
        got = bl.matmul(x, p, layers)
        assert np.array_equal(got.astype(object), _ref_dot(x, w, bits, layers))
    assert bl.matmul(x, p)[1, 0] == amin * -128 * k


def test_layers_one_is_sign_plane_only():
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, size=(5, 11))
    x = rng.integers(-128, 128, size=(2, 11))
    got = bl.matmul(x, bl.decompose(w, 8), 1)
    assert np.array_equal(got, x @ np.where(w < 0, -128, 0).T)


def test_quantize_weights_and_fixed_point():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 10))
    w[3] = 0
    w_int, s = bl.quantize_weights(w, 8)
    assert w_int.min() >= -128 and w_int.max() <= 127
    assert np.all(np.abs(w_int).max(axis=1)[[0, 1, 2, 4, 5]] == 127)
    assert s[3] == 1.0 and not w_int[3].any()
    assert np.all(np.abs(w_int * s[:, None] - w) <= s[:, None] / 2 + 1e-12)
    wt, st = bl.quantize_weights(w, 8, "tensor")
    assert np.all(st == st[0]) and np.abs(wt).max() == 127
    assert bl.fixed_frac(1.0, 8) == 6 and bl.fixed_frac(0.9, 8) == 7
    assert bl.fixed_frac(0.0, 8) == 7
    x = np.array([0.5, -0.25, 1.0, 3.0, -3.0, 0.0078125 * 1.5])
    assert np.array_equal(bl.to_fixed(x, 8, 6), [32, -16, 64, 127, -128, 1])
    # real-valued layer = float reference of the quantized operands
    xr = rng.uniform(0, 1, size=(3, 10))
    p = bl.decompose(w_int, 8)
    y = bl.linear(xr, p, s, 16, 14, bias=np.arange(6))
    xi = np.rint(xr * 2**14)
    ref = (xi * 2.0**-14) @ (w_int * s[:, None]).T + np.arange(6)
    assert np.allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_registered_format():
    f = get_format("pb-w8")
    assert f.bits == 8 and f.layers is None
    w = np.random.default_rng(0).normal(size=(4, 3, 2))
    q = f.quantize_array(w)
    assert q.dequantize().shape == (4, 3, 2) and q.dequantize().dtype == np.float32
    w_int, s = bl.quantize_weights(w.reshape(4, -1), 8)
    q2 = f.replace(layers=2).quantize_array(w)
    assert np.allclose(q2.dequantize().reshape(4, -1),
                       ((w_int >> 6) << 6) * s[:, None], rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: bl.decompose([[128]], 8), r"128 is outside the 8-bit range \[-128, 127\]"),
    (lambda: bl.decompose([[0]], 0), r"bits=0; accepted range is integers in \[1, 16\]"),
    (lambda: bl.decompose([[0.5]], 8), "must hold integers"),
    (lambda: bl.matmul([[1, 2]], bl.decompose([[1, 2]], 4), 5),
     r"layers=5; accepted range is integers in \[1, 4\]"),
    (lambda: bl.matmul([[1, 2]], bl.decompose([[1, 2]], 4), 0), r"layers=0"),
    (lambda: bl.matmul([[1, 2, 3]], bl.decompose([[1, 2]], 4)), r"shape \(batch, 2\)"),
    (lambda: bl.matmul([[1]], np.full((2, 1, 1), 2)), "only 0 and 1"),
    (lambda: bl.quantize_weights(np.ones((2, 2)), 8, "col"), "'row', 'tensor'"),
    (lambda: bl.to_fixed([1.0], 1, 0), r"act_bits=1; accepted range is integers in \[2, 32\]"),
    (lambda: bl.fixed_frac(-1.0, 8), "amax=-1.0"),
    (lambda: bl.BitLayerFormat(bits=8, layers=9), r"layers=9"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docs_snippets_run():
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "docs" / "bitlayers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", src, re.S)
    assert len(blocks) == 2
    for i, b in enumerate(blocks):
        exec(compile(b, f"docs/bitlayers.md[{i}]", "exec"), {})


def test_train_rows():
    from hbfp_hw.host.train_bitlayers import TRAIN_FORMATS
    assert set(TRAIN_FORMATS) == {"pb-w8k2", "pb-w8k3", "pb-w8k4"}
    kw = TRAIN_FORMATS["pb-w8k3"][1]()
    w = np.random.default_rng(1).normal(size=(5, 9))
    w_int, s = bl.quantize_weights(w, 8)
    got = kw["weight_fmt"].quantize_array(w).dequantize()
    assert np.allclose(got, ((w_int >> 5) << 5) * s[:, None], rtol=1e-6)
    assert kw["act_fmt"].quantize_array(w).dequantize().dtype == np.float32
