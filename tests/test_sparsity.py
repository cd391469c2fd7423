"""N:M masks, the compressed BFP weight format and the sparse golden GEMMs.

References are independent of :mod:`hbfp_hw.sparsity`: brute force over all 2**16 boolean
4x4 matrices, a networkx min-cost flow for 8x8 at 4:8, slow Python loops, and the dense
:func:`hbfp_hw.bfp_matmul` on the quantized masked weights.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import hbfp_hw as h
from hbfp_hw import sparsity as sp


# -- independent references ----------------------------------------------------------------

def _all_valid_4x4(n: int) -> np.ndarray:
    """Every 4x4 boolean matrix with exactly n per row and column (brute force, 2**16)."""
    codes = np.arange(1 << 16)
    bits = ((codes[:, None] >> np.arange(16)) & 1).reshape(-1, 4, 4)
    ok = np.all(bits.sum(axis=2) == n, axis=1) & np.all(bits.sum(axis=1) == n, axis=1)
    return bits[ok].astype(bool)


def _flow_best(tile: np.ndarray, n: int) -> int:
    """Max kept Σ of an integer tile with n per row/column: networkx min-cost flow."""
    import networkx as nx
    m = tile.shape[0]
    g = nx.DiGraph()
    g.add_node("s", demand=-n * m)
    g.add_node("t", demand=n * m)
    for i in range(m):
        g.add_edge("s", ("r", i), capacity=n, weight=0)
        g.add_edge(("c", i), "t", capacity=n, weight=0)
        for j in range(m):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(tile[i, j]))
    flow = nx.min_cost_flow(g)
    return sum(int(tile[i, j]) for i in range(m) for j in range(m) if flow[("r", i)][("c", j)])


def _tiles_of(a: np.ndarray, m: int):
    r, c = a.shape
    for i in range(0, r, m):
        for j in range(0, c, m):
            yield i, j, a[i:i + m, j:j + m]


def _check_transposable_loops(mask: np.ndarray, n: int, m: int, padded_shape=None) -> None:
    mat = mask.reshape(mask.shape[0], -1)
    r, c = mat.shape
    for i, j, t in _tiles_of(mat, m):
        full_r, full_c = t.shape[0] == m, t.shape[1] == m
        for row in t:
            assert row.sum() <= n and (row.sum() == n or not full_c)
        for col in t.T:
            assert col.sum() <= n and (col.sum() == n or not full_r)


# -- pattern counts --------------------------------------------------------------------------

def test_pattern_counts_against_brute_force():
    valid = _all_valid_4x4(2)
    assert len(valid) == 90
    assert sp.mask_diversity(2, 4) == 90
    assert sp.mask_diversity(1, 4) == len(_all_valid_4x4(1)) == 24
    assert sp.mask_diversity(3, 4) == len(_all_valid_4x4(3)) == 24
    pats = sp.transposable_patterns(2, 4)
    assert {p.tobytes() for p in pats} == {v.tobytes() for v in valid}
    # 1-D: C(m, n) per row, rows independent
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    assert sp.mask_diversity(2, 4, "1d") == len(rows) ** 4 == 1296
    assert sp.mask_diversity(4, 8, "1d") == math.comb(8, 4) ** 8


def test_pattern_count_5x5_and_8x8():
    # 5x5 at 2:5 by brute force over the row choices
    rows = np.array([r for r in itertools.product((0, 1), repeat=5) if sum(r) == 2])
    idx = np.array(list(itertools.product(range(len(rows)), repeat=5)))
    colsum = rows[idx].sum(axis=1)
    assert sp.mask_diversity(2, 5) == int(np.all(colsum == 2, axis=1).sum()) == 2040
    # 8x8 binary matrices with all line sums 4 (published count)
    assert sp.mask_diversity(4, 8) == 116_963_796_250


# -- optimal masks -----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["table", "milp"])
def test_optimal_2_4_matches_brute_force(rng, solver):
    valid = _all_valid_4x4(2).reshape(90, 16).astype(np.float64)
    w = rng.standard_normal((32, 40 if solver == "table" else 16))
    w[:4, :4] = 1.0                                  # a tile of ties
    w[4:8, :4] = 0.0                                 # an all-zero tile
    mask = sp.transposable_mask(w, 2, 4, "optimal", solver=solver)
    assert mask.shape == w.shape and mask.dtype == bool
    _check_transposable_loops(mask, 2, 4)
    for i, j, t in _tiles_of(np.abs(w), 4):
        best = (valid @ t.reshape(16)).max()
        got = t[mask[i:i + 4, j:j + 4]].sum()
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12), (i, j)


def test_optimal_4_8_matches_min_cost_flow(rng):
    w = rng.integers(-1000, 1000, size=(16, 40)).astype(np.float64)
    mask = sp.transposable_mask(w, 4, 8)                       # integer program
    _check_transposable_loops(mask, 4, 8)
    for i, j, t in _tiles_of(np.abs(w), 8):
        assert t[mask[i:i + 8, j:j + 8]].sum() == _flow_best(t.astype(np.int64), 4), (i, j)


def test_optimal_edge_tiles(rng):
    """A partial tile's mask is the optimum of its zero-padded tile, cropped."""
    valid = _all_valid_4x4(2).reshape(90, 16).astype(np.float64)
    w = rng.standard_normal((10, 13))
    mask = sp.transposable_mask(w, 2, 4)
    _check_transposable_loops(mask, 2, 4)
    full = sp.transposable_mask(w, 2, 4, padded=True)
    assert full.shape == (12, 16)
    assert sp.is_transposable(full, 2, 4, padded=True)
    assert np.array_equal(full[:10, :13], mask)
    pad = np.zeros((12, 16))
    pad[:10, :13] = np.abs(w)
    for i, j, t in _tiles_of(pad, 4):
        assert t[full[i:i + 4, j:j + 4]].sum() == pytest.approx((valid @ t.reshape(16)).max())
    # convolution weights: [O, C, kh, kw] viewed as [O, C*kh*kw]
    wc = rng.standard_normal((8, 3, 3, 3))
    mc = sp.transposable_mask(wc, 2, 4)
    assert mc.shape == wc.shape
    assert np.array_equal(mc.reshape(8, 27), sp.transposable_mask(wc.reshape(8, 27), 2, 4))
    _check_transposable_loops(mc.reshape(8, 27), 2, 4)


# -- greedy ------------------------------------------------------------------------------------

def _plain_greedy(t: np.ndarray, n: int) -> tuple[np.ndarray, bool]:
    """The published greedy (take entries by decreasing |w| while row and column have
    room): its mask and whether it ended with a row or column short."""
    m = t.shape[0]
    rc, cc = [0] * m, [0] * m
    keep = np.zeros((m, m), bool)
    for k in np.argsort(-t.reshape(-1), kind="stable"):
        r, c = divmod(int(k), m)
        if rc[r] < n and cc[c] < n:
            rc[r] += 1
            cc[c] += 1
            keep[r, c] = True
    return keep, min(rc) < n


def _plain_greedy_stuck(t: np.ndarray, n: int) -> bool:
    return _plain_greedy(t, n)[1]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_greedy_always_valid(rng, n, m):
    w = rng.standard_normal((m * 30, m * 20))
    w[:m, :m] = np.round(w[:m, :m])               # ties
    stuck = [(i, j) for i, j, t in _tiles_of(np.abs(w), m) if _plain_greedy_stuck(t, n)]
    if (n, m) == (2, 4):
        assert stuck, "no tile where the plain greedy gets stuck: the test needs one"
    g = sp.transposable_mask(w, n, m, "greedy")
    _check_transposable_loops(g, n, m)
    o = sp.transposable_mask(w, n, m, "optimal")
    for i, j, t in _tiles_of(np.abs(w), m):
        assert t[g[i:i + m, j:j + m]].sum() <= t[o[i:i + m, j:j + m]].sum() + 1e-9
    # where the published greedy completes a tile, the mask is its mask
    for i, j, t in _tiles_of(np.abs(w), m):
        ref, stuck_here = _plain_greedy(t, n)
        if not stuck_here:
            assert np.array_equal(g[i:i + m, j:j + m], ref), (i, j)


def test_greedy_stuck_tile_completed():
    # 2:4 tile on which the plain greedy stops with rows 2, 3 short
    # rows 0-2 fill columns 0-2, row 3 then finds one free column only
    t = np.full((4, 4), 0.1)
    t[0, 0], t[0, 1], t[1, 0], t[1, 2], t[2, 1], t[2, 2] = 9, 8, 7, 6, 5, 4
    assert _plain_greedy_stuck(t, 2)
    g = sp.transposable_mask(t, 2, 4, "greedy")
    assert np.all(g.sum(axis=0) == 2) and np.all(g.sum(axis=1) == 2)


# -- 1-D masks ----------------------------------------------------------------------------------

def test_nm_mask_against_loops(rng):
    w = rng.standard_normal((7, 22))
    w[0, :4] = [1, 1, 1, 1]
    mask = sp.nm_mask(w, 2, 4)
    for r in range(7):
        for g0 in range(0, 22, 4):
            grp = list(range(g0, min(g0 + 4, 22)))
            order = sorted(grp, key=lambda j: (-abs(w[r, j]), j))[:2]
            assert {j for j in grp if mask[r, j]} == set(order), (r, g0)
    assert sp.is_nm(mask, 2, 4)
    # 1-D masks are generally not transposable
    assert not sp.is_transposable(sp.nm_mask(rng.standard_normal((64, 64)), 2, 4), 2, 4)


# -- compressed weights and sparse GEMMs ---------------------------------------------------------

def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


CASES = [
    # (fmt, n, m, O, I, B, x block rows)
    (h.HBFP8, 2, 4, 48, 64, 20, 16),
    (h.HBFP8, 2, 4, 10, 13, 5, 16),            # edge tiles
    (h.HBFP4, 2, 4, 40, 72, 33, 16),
    (h.HBFP8.replace(block_shape=(8, 8), name="b8"), 4, 8, 24, 40, 9, 4),
    (h.HBFP8.replace(block_shape=(8, 16), name="b816"), 2, 8, 20, 48, 11, 8),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sparse_gemm_bit_identical(rng, case):
    fmt, n, m, O, I, B, bx = CASES[case]
    w = (rng.standard_normal((O, I)) * np.exp2(rng.integers(-6, 6, (O, I)))).astype(np.float32)
    sw = sp.compress(w, fmt, n, m)
    mask = sp.transposable_mask(w, n, m)
    wq = h.quantize(np.where(mask, w, 0).astype(np.float32), fmt)
    assert sw.to_bfp().equal(wq)
    assert np.array_equal(sw.mask(), wq.mantissas[:O, :I] != 0)
    fx = fmt.replace(block_shape=(bx, fmt.block_shape[1]), name="x")
    fg = fmt.replace(block_shape=(bx, fmt.block_shape[0]), name="g")
    x = rng.standard_normal((B, I)).astype(np.float32)
    dy = rng.standard_normal((B, O)).astype(np.float32)
    x[0] *= 1e-30                                       # tiny rows: flush to zero
    xq, dyq = h.quantize(x, fx), h.quantize(dy, fg)
    y, acc, _ = sp.sparse_matmul(xq, sw, return_acc=True)
    y0, acc0, _ = h.bfp_matmul(xq, wq.T, return_acc=True)
    assert np.array_equal(_bits(y), _bits(y0)) and np.array_equal(acc, acc0)
    d, dacc, _ = sp.sparse_matmul_t(dyq, sw, return_acc=True)
    d0, dacc0, _ = h.bfp_matmul(dyq, wq, return_acc=True)
    assert np.array_equal(_bits(d), _bits(d0)) and np.array_equal(dacc, dacc0)
    # and within the documented error bound of the float64 product
    assert np.all(np.abs(y - h.matmul_reference(xq, wq.T)) <= h.matmul_error_bound(xq, wq.T))


def test_sparse_gemm_invalid_blocks(rng):
    w = rng.standard_normal((32, 32)).astype(np.float32)
    sw = sp.compress(w, h.HBFP8)
    x = rng.standard_normal((20, 32)).astype(np.float32)
    x[3, 20] = np.nan
    xq = h.quantize(x, h.HBFP8, nonfinite="flag")
    y = sp.sparse_matmul(xq, sw)
    assert np.array_equal(_bits(y), _bits(h.bfp_matmul(xq, sw.to_bfp().T)))
    assert np.isnan(y[:16]).all() and not np.isnan(y[16:]).any()


def test_compressed_layout_against_loops(rng):
    w = rng.standard_normal((16, 16)).astype(np.float32)
    sw = sp.compress(w, h.HBFP8, 2, 4)
    dense = sw.to_bfp().mantissas.astype(int)
    rho, sigma = sw.column_view()
    for tr in range(4):
        for tc in range(4):
            t = dense[tr * 4:tr * 4 + 4, tc * 4:tc * 4 + 4]
            for r in range(4):
                cols = [c for c in range(4) if t[r, c] != 0]
                assert list(sw.indices[tr, tc, r]) == sorted(sw.indices[tr, tc, r])
                assert set(cols) <= set(sw.indices[tr, tc, r].tolist())
                for s in range(2):
                    assert sw.mantissas[tr, tc, r, s] == t[r, sw.indices[tr, tc, r, s]]
            for c in range(4):
                rows = [r for r in range(4) if c in sw.indices[tr, tc, r].tolist()]
                assert list(rho[tr, tc, c]) == rows
                for j in range(2):
                    r = rho[tr, tc, c, j]
                    assert sw.indices[tr, tc, r, sigma[tr, tc, c, j]] == c
    bits = sw.storage_bits()
    # 16 tiles x 4 rows x 2 slots x (8 mantissa + 2 index bits) + 1 exponent of 8 bits
    assert bits["sparse"] == 16 * 4 * 2 * 10 + 8
    assert bits["dense"] == 256 * 8 + 8


def test_compress_given_masks(rng):
    w = rng.standard_normal((12, 20)).astype(np.float32)
    mk = sp.transposable_mask(w, 2, 4, "greedy")
    sw = sp.compress(w, h.HBFP8, 2, 4, mask=mk)
    assert sw.to_bfp().equal(h.quantize(np.where(mk, w, 0).astype(np.float32), h.HBFP8))
    sw.column_view()
    # 1-D masks: forward only
    m1 = sp.nm_mask(w, 2, 4)
    s1 = sp.compress(w, h.HBFP8, 2, 4, mask=m1, kind="1d")
    assert s1.to_bfp().equal(h.quantize(np.where(m1, w, 0).astype(np.float32), h.HBFP8))
    x = h.quantize(rng.standard_normal((5, 20)).astype(np.float32), h.HBFP8)
    assert np.array_equal(_bits(sp.sparse_matmul(x, s1)), _bits(h.bfp_matmul(x, s1.to_bfp().T)))
    with pytest.raises(ValueError, match="transposable"):
        sp.sparse_matmul_t(h.quantize(rng.standard_normal((5, 12)).astype(np.float32),
                                      h.HBFP8), s1)
    with pytest.raises(ValueError, match="not a valid transposable 2:4 mask"):
        sp.compress(w, h.HBFP8, 2, 4, mask=m1)


def test_errors():
    w = np.ones((8, 8))
    with pytest.raises(ValueError, match=r"n=5 is out of range; accepted range is \[1, 4\]"):
        sp.transposable_mask(w, 5, 4)
    with pytest.raises(ValueError, match=r"m=0 is out of range"):
        sp.nm_mask(w, 1, 0)
    with pytest.raises(ValueError, match="method='best'"):
        sp.transposable_mask(w, 2, 4, "best")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sp.transposable_mask(np.ones(8))
    with pytest.raises(ValueError, match="non-finite"):
        sp.transposable_mask(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="multiples of m=4"):
        sp.compress(np.ones((8, 64), np.float32), h.MXINT8)
    with pytest.raises(ValueError, match="'2-4' is not"):
        sp.parse_spec("2-4")
    assert sp.parse_spec("2:4-transposable") == (2, 4, "transposable")
    assert sp.parse_spec("4:8") == (4, 8, "1d")
    with pytest.raises(ValueError, match="up to 4096"):
        sp.transposable_patterns(4, 8)
