"""Fine-grained N:M sparsity: transposable masks, a compressed BFP weight format and the
sparse golden GEMMs (forward with ``W``, input gradient with ``Wᵀ``) from one compressed
tile.

Masks
-----
A weight ``w`` of shape ``[out, in]`` (a convolution weight ``[O, C, kh, kw]`` is viewed
as ``[O, C·kh·kw]``) is cut into ``m x m`` tiles of the matrix itself (rows ``out``,
columns ``in``).

* :func:`transposable_mask` keeps exactly ``n`` entries in every row **and** every
  column of every tile, so both ``W`` (reduction over ``in``) and ``Wᵀ`` (reduction over
  ``out``) are ``n:m`` sparse along their own reduction axis. ``method="optimal"``
  maximises the kept ``Σ|w|`` of each tile (an exhaustive table of the valid patterns
  when there are few of them, e.g. the 90 patterns of 2:4, else an integer program
  solved with SciPy's HiGHS); ``method="greedy"`` takes the entries in decreasing
  ``|w|`` while they fit (see :func:`_greedy`: with a pattern table, while some valid
  pattern holds all entries taken; otherwise while their row and column have room,
  tiles left short being completed with augmenting paths), so it always returns a
  valid mask.
* :func:`nm_mask` is the 1-D ``n:m`` mask: ``n`` of every ``m`` consecutive entries of a
  row (along ``in``); it accelerates ``W`` only.
* :func:`mask_diversity` counts the patterns of one ``m x m`` tile of each kind.

**Edge tiles.** When a dimension is not a multiple of ``m``, the matrix is padded with
zeros to whole tiles (as the hardware pads its operands), the mask is computed on the
padded tiles and cropped. Every row and column of a padded tile keeps exactly ``n``; the
real part of a partial tile therefore keeps *at most* ``n`` per row and column (``n``
where the tile is full in that direction and the weights are non-zero).
``transposable_mask(..., padded=True)`` returns the mask of the padded matrix.

Compressed weights
------------------
:class:`SparseBFPWeight` stores a masked weight quantized to a BFP format: for every
``m x m`` tile and every tile row, the ``n`` kept mantissas and their column indices
within the tile (ascending, ``ceil(log2 m)`` bits each), plus the BFP shared exponents
(and invalid flags) of the masked dense weight. :func:`sparse_matmul` (``X Wᵀ``) reads
a tile row by row and selects the activation lanes by index; :func:`sparse_matmul_t`
(``dY W``) reads the same tile column by column, deriving each column's ``n`` rows and
slots from the same indices. Both are bit-identical to :func:`hbfp_hw.bfp_matmul` on the
quantized masked dense weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .formats import BFPFormat
from .gemm import DEFAULT_GUARD_BITS, accumulator_bits, acc_to_fp32
from .quantize import BFPTensor, block_layout, quantize
from .validate import check_int

__all__ = ["MASK_METHODS", "MASK_KINDS", "transposable_mask", "nm_mask", "mask_diversity",
           "transposable_patterns", "is_transposable", "is_nm", "SparseBFPWeight",
           "compress", "sparse_matmul", "sparse_matmul_t", "parse_spec"]

MASK_METHODS = ("optimal", "greedy")
MASK_KINDS = ("transposable", "1d")
M_RANGE = (1, 64)
#: the exhaustive pattern table is used up to this many patterns per tile
TABLE_MAX_PATTERNS = 4096
_TABLE_CHUNK = 1 << 15          # tiles per chunk of the table search
_MILP_BATCH = 256               # tiles per integer program


# -- validation --------------------------------------------------------------------------

def _check_nm(n, m) -> tuple[int, int]:
    check_int("m", m, *M_RANGE)
    check_int("n", n, 1, m)
    return n, m


def parse_spec(spec: str) -> tuple[int, int, str]:
    """``"2:4-transposable"`` -> ``(2, 4, "transposable")``, ``"2:4"`` -> ``(2, 4, "1d")``."""
    if not isinstance(spec, str):
        raise ValueError(f"sparsity spec must be a string such as '2:4-transposable' or "
                         f"'2:4', got {spec!r}")
    s = spec.strip().lower()
    kind = "1d"
    if s.endswith("-transposable"):
        kind, s = "transposable", s[: -len("-transposable")]
    parts = s.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"sparsity spec {spec!r} is not 'N:M' or 'N:M-transposable' "
                         "(e.g. '2:4', '2:4-transposable')") from None
    _check_nm(n, m)
    return n, m, kind


def _as_matrix(w) -> tuple[np.ndarray, tuple[int, ...]]:
    a = np.asarray(w)
    if a.ndim < 2:
        raise ValueError(f"a mask needs a weight of at least 2 dimensions ([out, in] or "
                         f"[O, C, kh, kw]), got shape {a.shape}")
    if a.dtype.kind not in "fiub":
        raise ValueError(f"weight dtype {a.dtype} is not numeric")
    mat = np.abs(a.reshape(a.shape[0], -1).astype(np.float64))
    if not np.all(np.isfinite(mat)):
        bad = np.argwhere(~np.isfinite(mat))[0]
        raise ValueError(f"weight holds a non-finite value at [out, in] = {tuple(bad)}; "
                         "masks need finite weights")
    return mat, a.shape


def _tiles(mat: np.ndarray, m: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(R, C)`` -> zero-padded tiles ``(Tr, Tc, m, m)``."""
    r, c = mat.shape
    rp, cp = -(-r // m) * m, -(-c // m) * m
    p = np.zeros((rp, cp), mat.dtype)
    p[:r, :c] = mat
    return p.reshape(rp // m, m, cp // m, m).transpose(0, 2, 1, 3), (rp, cp)


def _untile(t: np.ndarray) -> np.ndarray:
    tr, tc, m, _ = t.shape
    return t.transpose(0, 2, 1, 3).reshape(tr * m, tc * m)


# -- pattern enumeration and counting --------------------------------------------------

@lru_cache(maxsize=None)
def mask_diversity(n: int, m: int, kind: str = "transposable") -> int:
    """Number of distinct masks of one ``m x m`` tile: ``"transposable"`` (exactly ``n``
    per row and column; e.g. 90 for 2:4) or ``"1d"`` (``n`` per row: ``C(m, n)**m``)."""
    _check_nm(n, m)
    if kind == "1d":
        return math.comb(m, n) ** m
    if kind != "transposable":
        raise ValueError(f"kind={kind!r}; accepted values are {', '.join(map(repr, MASK_KINDS))}")
    # rows one at a time; state = sorted column fill counts (the count depends only on
    # the multiset), each row adds 1 to n distinct columns with fill < n
    states = {(0,) * m: 1}
    for _ in range(m):
        nxt: dict[tuple, int] = {}
        for st, ways in states.items():
            vals = sorted(set(st))
            mult = [st.count(v) for v in vals]

            def rec(i, left, acc, new):
                if i == len(vals):
                    if left == 0:
                        key = tuple(sorted(new))
                        nxt[key] = nxt.get(key, 0) + ways * acc
                    return
                v, c = vals[i], mult[i]
                top = min(c, left) if v < n else 0
                for k in range(top + 1):
                    rec(i + 1, left - k, acc * math.comb(c, k),
                        new + [v + 1] * k + [v] * (c - k))
            rec(0, n, 1, [])
        states = nxt
    return states.get((n,) * m, 0)


@lru_cache(maxsize=None)
def transposable_patterns(n: int, m: int) -> np.ndarray:
    """All transposable ``n:m`` masks of one ``m x m`` tile, shape ``(P, m, m)`` bool
    (``P = mask_diversity(n, m)``); only for ``P <= TABLE_MAX_PATTERNS``."""
    _check_nm(n, m)
    count = mask_diversity(n, m)
    if count > TABLE_MAX_PATTERNS:
        raise ValueError(f"{n}:{m} has {count} transposable patterns per tile; the table is "
                         f"built up to {TABLE_MAX_PATTERNS}")
    import itertools
    rows = [np.array([j in cmb for j in range(m)]) for cmb in itertools.combinations(range(m), n)]
    out: list[np.ndarray] = []

    def rec(prefix: list, cols: np.ndarray) -> None:
        if len(prefix) == m:
            out.append(np.array(prefix))
            return
        for r in rows:
            c = cols + r
            if c.max() <= n:
                rec(prefix + [r], c)
    rec([], np.zeros(m, int))
    pats = np.array(out, dtype=bool).reshape(-1, m, m)
    pats.setflags(write=False)
    return pats


# -- mask checks ---------------------------------------------------------------------------

def is_transposable(mask, n: int, m: int, *, padded: bool = False) -> bool:
    """True if every row and column of every ``m x m`` tile keeps exactly ``n`` entries
    (``padded=False``: partial edge tiles at most ``n``, as :func:`transposable_mask`'s
    cropped masks)."""
    _check_nm(n, m)
    mat = np.asarray(mask, dtype=bool)
    mat = mat.reshape(mat.shape[0], -1)
    if padded and (mat.shape[0] % m or mat.shape[1] % m):
        return False
    t, _ = _tiles(mat.astype(np.int64), m)
    rs, cs = t.sum(axis=3), t.sum(axis=2)
    if padded:
        return bool(np.all(rs == n) and np.all(cs == n))
    r, c = mat.shape
    full_r = r // m
    full_c = c // m
    ok = np.all(rs <= n) and np.all(cs <= n)
    # full tiles: exactly n
    ok = ok and np.all(rs[:full_r, :full_c] == n) and np.all(cs[:full_r, :full_c] == n)
    return bool(ok)


def is_nm(mask, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive entries of a row keeps exactly ``n`` (a
    partial last group: at most ``n``)."""
    _check_nm(n, m)
    mat = np.asarray(mask, dtype=bool)
    mat = mat.reshape(mat.shape[0], -1)
    r, c = mat.shape
    cp = -(-c // m) * m
    p = np.zeros((r, cp), np.int64)
    p[:, :c] = mat
    g = p.reshape(r, cp // m, m).sum(axis=2)
    full = c // m
    return bool(np.all(g[:, :full] == n) and np.all(g <= n))


# -- masks ---------------------------------------------------------------------------------

def nm_mask(w, n: int = 2, m: int = 4) -> np.ndarray:
    """1-D ``n:m`` mask of ``w``'s shape: the ``n`` largest ``|w|`` of every ``m``
    consecutive entries along ``in`` (ties: the lower index). A partial last group keeps
    ``min(n, its length)``."""
    _check_nm(n, m)
    mat, shape = _as_matrix(w)
    r, c = mat.shape
    cp = -(-c // m) * m
    p = np.full((r, cp), -1.0)                  # padding loses to every real entry
    p[:, :c] = mat
    g = p.reshape(r, cp // m, m)
    order = np.argsort(-g, axis=2, kind="stable")[..., :n]
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order, True, axis=2)
    keep = keep.reshape(r, cp)[:, :c] & (p[:, :c] >= 0)
    return keep.reshape(shape)


def transposable_mask(w, n: int = 2, m: int = 4, method: str = "optimal", *,
                      padded: bool = False, solver: str = "auto") -> np.ndarray:
    """Transposable ``n:m`` mask of ``w`` (bool, ``w``'s shape; see the module notes for
    edge tiles; ``padded=True``: the ``[out_p, in_p]`` mask of the zero-padded matrix).

    ``method="optimal"`` maximises the kept ``Σ|w|`` of every tile; ``solver`` picks how:
    ``"table"`` (all patterns, vectorised; up to :data:`TABLE_MAX_PATTERNS` per tile),
    ``"milp"`` (the integer program of a batch of tiles with SciPy's HiGHS: its LP
    relaxation, integral here, with ``scipy.optimize.milp`` as fallback), ``"auto"``
    (the table where it exists, else the integer program). ``method="greedy"`` is the
    fast approximation (always a valid mask)."""
    _check_nm(n, m)
    if method not in MASK_METHODS:
        raise ValueError(f"method={method!r}; accepted values are "
                         f"{', '.join(map(repr, MASK_METHODS))}")
    if solver not in ("auto", "table", "milp"):
        raise ValueError(f"solver={solver!r}; accepted values are 'auto', 'table', 'milp'")
    mat, shape = _as_matrix(w)
    tiles, pshape = _tiles(mat, m)
    flat = tiles.reshape(-1, m, m)
    if method == "greedy":
        keep = _greedy(flat, n, m)
    else:
        if solver == "auto":
            solver = "table" if mask_diversity(n, m) <= TABLE_MAX_PATTERNS else "milp"
        keep = _optimal_table(flat, n, m) if solver == "table" else _optimal_milp(flat, n, m)
    full = _untile(keep.reshape(tiles.shape))
    if padded:
        return full
    r, c = mat.shape
    return full[:r, :c].reshape(shape)


def _optimal_table(flat: np.ndarray, n: int, m: int) -> np.ndarray:
    pats = transposable_patterns(n, m)
    pf = pats.reshape(len(pats), -1).astype(np.float64).T          # (m*m, P)
    x = flat.reshape(len(flat), -1)
    best = np.empty(len(flat), np.int64)
    for i in range(0, len(flat), _TABLE_CHUNK):
        best[i:i + _TABLE_CHUNK] = np.argmax(x[i:i + _TABLE_CHUNK] @ pf, axis=1)
    return pats[best]


def _tile_constraints(k: int, m: int):
    """Row and column sums of ``k`` tiles of ``m x m`` binaries, as a sparse matrix."""
    from scipy.sparse import coo_matrix
    v = np.arange(k * m * m).reshape(k, m, m)
    rows_r = (np.arange(k)[:, None, None] * m + np.arange(m)[None, :, None]) \
        + np.zeros((1, 1, m), int)
    rows_c = k * m + (np.arange(k)[:, None, None] * m + np.arange(m)[None, None, :]) \
        + np.zeros((1, m, 1), int)
    ri = np.concatenate([rows_r.ravel(), rows_c.ravel()])
    ci = np.concatenate([v.ravel(), v.ravel()])
    return coo_matrix((np.ones(len(ri)), (ri, ci)), shape=(2 * k * m, k * m * m)).tocsr()


def _milp_tiles(score: np.ndarray, n: int, m: int, lb: np.ndarray | None = None,
                ub: np.ndarray | None = None) -> np.ndarray:
    """max Σ score·x over binary x with n per row/column of each tile (bounds optional).

    The constraint matrix is that of a bipartite b-matching, totally unimodular: the LP
    relaxation's vertex solutions (HiGHS dual simplex) are integral. A batch whose LP
    solution is not integral (not expected) is solved by ``scipy.optimize.milp``."""
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp
    k = len(score)
    a = _tile_constraints(k, m)
    lo = np.zeros(k * m * m) if lb is None else lb.reshape(-1).astype(float)
    hi = np.ones(k * m * m) if ub is None else ub.reshape(-1).astype(float)
    c = -np.asarray(score, np.float64).reshape(-1)
    res = linprog(c, A_eq=a, b_eq=np.full(a.shape[0], float(n)),
                  bounds=np.stack([lo, hi], axis=1), method="highs-ds")
    x = res.x if res.status == 0 else None
    if x is None or np.abs(x - np.round(x)).max() > 1e-6:
        r2 = milp(c, integrality=np.ones(k * m * m), bounds=Bounds(lo, hi),
                  constraints=LinearConstraint(a, n, n))
        if r2.x is None:
            raise ValueError(f"no transposable {n}:{m} mask exists with the kept entries "
                             f"fixed ({r2.message})")
        x = r2.x
    return (x > 0.5).reshape(k, m, m)


def _optimal_milp(flat: np.ndarray, n: int, m: int) -> np.ndarray:
    out = np.empty(flat.shape, bool)
    for i in range(0, len(flat), _MILP_BATCH):
        out[i:i + _MILP_BATCH] = _milp_tiles(flat[i:i + _MILP_BATCH], n, m)
    return out


def _greedy(flat: np.ndarray, n: int, m: int) -> np.ndarray:
    """Greedy over tiles (entries in decreasing score, ties by position).

    With a pattern table (e.g. 2:4): an entry is kept if some valid pattern holds it and
    every entry kept so far, so the greedy never gets stuck (where the plain greedy,
    which only checks that row and column have room, completes a tile, the result is
    the same). Otherwise: the plain greedy, vectorised over tiles, then augmenting
    paths complete the tiles where it stopped short."""
    t = len(flat)
    order = np.argsort(-flat.reshape(t, -1), axis=1, kind="stable")
    if mask_diversity(n, m) <= TABLE_MAX_PATTERNS:
        pats = transposable_patterns(n, m).reshape(-1, m * m)
        npat = len(pats)
        words = -(-npat // 64)
        # holds[e]: the set of patterns that keep entry e, as `words` 64-bit words
        padded = np.zeros((m * m, words * 64), bool)
        padded[:, :npat] = pats.T
        holds = np.packbits(padded.reshape(m * m, words, 64), axis=2,
                            bitorder="little").view(np.uint64)[..., 0]   # (m*m, words)
        cand = np.broadcast_to(np.bitwise_or.reduce(holds, axis=0), (t, words)).copy()
        for k in range(m * m):
            has = cand & holds[order[:, k]]
            ok = has[:, 0] != 0
            for wd in range(1, words):
                ok |= has[:, wd] != 0
            np.copyto(cand, has, where=ok[:, None])
        # one pattern is left per tile: the lowest set bit
        bits = np.unpackbits(cand.view(np.uint8), axis=1, bitorder="little")[:, :npat]
        return pats[np.argmax(bits, axis=1)].reshape(t, m, m)
    keep = np.zeros((t, m * m), bool)
    rc = np.zeros((t, m), np.int64)
    cc = np.zeros((t, m), np.int64)
    ar = np.arange(t)
    for k in range(m * m):
        idx = order[:, k]
        r, c = idx // m, idx % m
        ok = (rc[ar, r] < n) & (cc[ar, c] < n)
        keep[ar[ok], idx[ok]] = True
        rc[ar[ok], r[ok]] += 1
        cc[ar[ok], c[ok]] += 1
    keep = keep.reshape(t, m, m)
    stuck = np.nonzero((rc < n).any(axis=1))[0]
    for i in stuck:
        _complete(keep[i], flat[i], n, m)
    return keep


def _complete(k: np.ndarray, score: np.ndarray, n: int, m: int) -> None:
    """Complete a partial b-matching ``k`` (in place) to n per row and column with
    augmenting paths (BFS from a deficient row; highest-score edges tried first)."""
    while True:
        rows = np.nonzero(k.sum(axis=1) < n)[0]
        if len(rows) == 0:
            return
        start = int(rows[0])
        # BFS over rows; from row r go to column c with k[r, c] == 0; from a full column
        # c go back to a row r' with k[r', c] == 1
        prev_col: dict[int, int] = {}        # column -> row it was reached from
        prev_row: dict[int, int] = {start: -1}  # row -> column it was reached from
        queue = [start]
        end = -1
        while queue and end < 0:
            nq = []
            for r in queue:
                for c in np.argsort(-score[r], kind="stable"):
                    c = int(c)
                    if k[r, c] or c in prev_col:
                        continue
                    prev_col[c] = r
                    if k[:, c].sum() < n:
                        end = c
                        break
                    for r2 in np.nonzero(k[:, c])[0]:
                        r2 = int(r2)
                        if r2 not in prev_row:
                            prev_row[r2] = c
                            nq.append(r2)
                if end >= 0:
                    break
            queue = nq
        if end < 0:  # pragma: no cover - a regular bipartite graph always has one
            raise RuntimeError("no augmenting path: cannot complete the tile")
        c = end
        while True:
            r = prev_col[c]
            k[r, c] = True
            pc = prev_row[r]
            if pc < 0:
                break
            k[r, pc] = False
            c = pc


# -- compressed BFP weights --------------------------------------------------------------

def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


@dataclass(frozen=True, eq=False)
class SparseBFPWeight:
    """An ``n:m`` sparse weight ``[out, in]`` in a BFP format, stored compressed.

    Attributes
    ----------
    fmt : BFPFormat
        The weight's BFP format (its block extents along ``out`` and ``in`` are
        multiples of ``m``).
    shape : (out, in)
    n, m : int
    kind : ``"transposable"`` (serves ``W`` and ``Wᵀ``) or ``"1d"`` (``W`` only)
    mantissas : int16 ``(Tr, Tc, m, n)``
        Kept mantissas of tile ``(tr, tc)``, row ``r``, slot ``s`` (slots in ascending
        column order; a row with fewer than ``n`` kept entries has zero-mantissa slots).
    indices : uint8 ``(Tr, Tc, m, n)``
        Column of each slot within its tile (distinct within a row; in a transposable
        tile every column is named exactly ``n`` times).
    exponents, invalid : the BFP exponents and invalid flags of the masked weight
        (``fmt``'s block grid over the padded matrix).
    """

    fmt: BFPFormat
    shape: tuple[int, int]
    n: int
    m: int
    kind: str
    mantissas: np.ndarray
    indices: np.ndarray
    exponents: np.ndarray
    invalid: np.ndarray

    @property
    def tiles(self) -> tuple[int, int]:
        return self.mantissas.shape[:2]

    @property
    def padded(self) -> tuple[int, int]:
        tr, tc = self.tiles
        return tr * self.m, tc * self.m

    def storage_bits(self) -> dict:
        """Bits of the compressed form and of the dense BFP form (mantissas, indices,
        exponents)."""
        tr, tc = self.tiles
        slots = tr * tc * self.m * self.n
        exps = int(self.exponents.size) * self.fmt.exp_bits
        sparse = slots * (self.fmt.man_bits + _index_bits(self.m)) + exps
        dense = tr * tc * self.m * self.m * self.fmt.man_bits + exps
        return {"sparse": sparse, "dense": dense, "ratio": dense / sparse}

    def dense_mantissas(self) -> np.ndarray:
        """The padded ``[out_p, in_p]`` mantissa matrix the tiles stand for."""
        tr, tc = self.tiles
        m = self.m
        d = np.zeros((tr, tc, m, m), np.int64)
        ti, tj, r = np.meshgrid(np.arange(tr), np.arange(tc), np.arange(m), indexing="ij")
        for s in range(self.n):
            np.add.at(d, (ti, tj, r, self.indices[..., s].astype(np.int64)),
                      self.mantissas[..., s].astype(np.int64))
        return _untile(d)

    def mask(self) -> np.ndarray:
        """Positions held by slots with a non-zero mantissa, shape ``shape``."""
        d = self.dense_mantissas()
        return (d != 0)[: self.shape[0], : self.shape[1]]

    def to_bfp(self) -> BFPTensor:
        """The dense :class:`BFPTensor` (masked weight) the compressed form stands for."""
        d = self.dense_mantissas()
        dt = np.int8 if self.fmt.man_bits <= 8 else np.int16
        return BFPTensor(self.fmt, self.shape, d.astype(dt), self.exponents.copy(),
                         self.invalid.copy())

    def column_view(self) -> tuple[np.ndarray, np.ndarray]:
        """For tile column ``c``, its ``n`` kept rows ``rho`` (ascending) and their slots
        ``sigma``, both ``(Tr, Tc, m, n)``, derived from the row indices (as the sparse
        engine does in its transposed mode). Raises for a non-transposable tile."""
        m, n = self.m, self.n
        hit = self.indices[..., None] == np.arange(m)             # (Tr,Tc,r,s,c)
        per = hit.sum(axis=(2, 3))                                 # (Tr,Tc,c)
        if self.kind != "transposable" or np.any(per != n):
            bad = np.argwhere(per != n)
            where = f" (tile {tuple(bad[0][:2])}, column {bad[0][2]})" if len(bad) else ""
            raise ValueError(f"this {self.kind} {n}:{m} weight does not name every tile "
                             f"column exactly {n} times{where}; Wᵀ needs a transposable mask")
        inrow = hit.any(axis=3)                                    # (Tr,Tc,r,c)
        slot = np.argmax(hit, axis=3)                              # (Tr,Tc,r,c)
        rho = np.argsort(~inrow, axis=2, kind="stable")[:, :, :n, :]   # (Tr,Tc,n,c)
        sigma = np.take_along_axis(slot, rho, axis=2)
        return (rho.transpose(0, 1, 3, 2).astype(np.uint8),
                sigma.transpose(0, 1, 3, 2).astype(np.uint8))


def compress(w, fmt: BFPFormat, n: int = 2, m: int = 4, *, mask=None,
             kind: str = "transposable", method: str = "optimal",
             nonfinite: str = "raise") -> SparseBFPWeight:
    """Mask ``w`` (``[out, in]``; a conv weight is viewed as ``[O, C·kh·kw]``), quantize
    the masked weight with ``fmt`` and store it compressed.

    ``mask`` (bool, ``w``'s shape) defaults to :func:`transposable_mask` (``kind=
    "transposable"``, with ``method``) or :func:`nm_mask` (``kind="1d"``). A given mask
    must keep at most ``n`` per tile row (and, transposable, per tile column) and be
    completable to exactly ``n`` with zero-mantissa slots (any mask from this module's
    functions is)."""
    _check_nm(n, m)
    if kind not in MASK_KINDS:
        raise ValueError(f"kind={kind!r}; accepted values are {', '.join(map(repr, MASK_KINDS))}")
    if not isinstance(fmt, BFPFormat):
        raise TypeError(f"fmt must be a BFPFormat, got {type(fmt).__name__}")
    a = np.asarray(w, dtype=np.float32)
    if a.ndim < 2:
        raise ValueError(f"compress needs a weight of at least 2 dimensions, got shape {a.shape}")
    mat = a.reshape(a.shape[0], -1)
    lay = block_layout(mat.shape, fmt)
    if lay.block[0] % m or lay.block[1] % m:
        raise ValueError(f"the format's blocks on [out, in] are {lay.block}; both extents "
                         f"must be multiples of m={m} (a 2-D tile format such as HBFP8)")
    R, C = mat.shape
    if mask is None:
        # the mask of the matrix zero-padded to whole BFP blocks (whole m x m tiles)
        big = np.zeros(lay.padded, np.float32)
        big[:R, :C] = np.abs(np.nan_to_num(mat, nan=0.0, posinf=0.0, neginf=0.0))
        if kind == "transposable":
            pmask = transposable_mask(big, n, m, method, padded=True)
        else:
            pmask = nm_mask(big, n, m)
        pmask[R:, :] = False
        pmask[:, C:] = False
    else:
        mk = np.asarray(mask, dtype=bool)
        if mk.shape != a.shape:
            raise ValueError(f"mask shape {mk.shape} differs from the weight's {a.shape}")
        mk = mk.reshape(mat.shape)
        ok = is_transposable(mk, n, m) if kind == "transposable" else is_nm(mk, n, m)
        if not ok:
            raise ValueError(f"the mask is not a valid {kind} {n}:{m} mask (at most {n} per "
                             f"tile row{' and column' if kind == 'transposable' else ''}, "
                             f"exactly {n} in full tiles)")
        pmask = np.zeros(lay.padded, bool)
        pmask[:R, :C] = mk
    wq = quantize(np.where(pmask[:R, :C], mat, np.float32(0)), fmt, nonfinite=nonfinite)
    # slots: kept positions, completed to exactly n per row (and column) of every tile
    tiles = _tiles(pmask.astype(np.int64), m)[0].astype(bool)
    tr, tc = tiles.shape[:2]
    flat = tiles.reshape(-1, m, m)
    short = np.nonzero((flat.sum(axis=2) < n).any(axis=1)
                       | ((flat.sum(axis=1) < n).any(axis=1) & (kind == "transposable")))[0]
    if len(short):
        if kind == "transposable":
            # fill with zero-mantissa slots only: kept entries fixed, any other free
            flat = flat.copy()
            flat[short] = _milp_tiles(np.zeros((len(short), m, m)), n, m,
                                      lb=flat[short].astype(float))
        else:
            flat = flat.copy()
            for i in short:
                for r in range(m):
                    free = np.nonzero(~flat[i, r])[0]
                    need = n - int(flat[i, r].sum())
                    flat[i, r, free[:need]] = True
    slots = flat.reshape(tr, tc, m, m)
    mt = _tiles(wq.mantissas.astype(np.int64), m)[0]
    idx = np.argsort(~slots, axis=3, kind="stable")[..., :n]          # ascending columns
    mans = np.take_along_axis(mt, idx, axis=3)
    return SparseBFPWeight(fmt, tuple(mat.shape), n, m, kind, mans.astype(np.int16),
                           idx.astype(np.uint8), wq.exponents.copy(), wq.invalid.copy())


# -- sparse golden GEMMs -------------------------------------------------------------------

def _acc_check(fa: BFPFormat, fb: BFPFormat, L: int, K: int, k_max, guard_bits: int) -> None:
    k_max = K if k_max is None else k_max
    if K > k_max:
        raise ValueError(f"K={K} exceeds k_max={k_max} the accumulator is sized for")
    width = accumulator_bits(fa.man_bits, fb.man_bits, L, max(k_max, 1), guard_bits)
    if width > 53:
        raise ValueError(f"accumulator of {width} bits exceeds the supported 53 bits; "
                         "reduce k_max or guard_bits")


def _finish(p, ea_full, eb_full, ea_row, eb_col, bad, fa, fb, guard_bits, shape, return_acc):
    """Steps 2-5 of :func:`hbfp_hw.bfp_matmul` from block dot products ``p (Mp, Np, nkb)``
    and exponents ``ea_full (Mp, nkb)``, ``eb_full (nkb, Np)``."""
    e_ref = ea_row[:, None] + eb_col[None, :]
    acc = np.zeros(e_ref.shape, np.int64)
    for kb in range(p.shape[2]):
        e = ea_full[:, kb][:, None] + eb_full[kb][None, :]
        s = np.minimum(e_ref - e, 62)
        acc += (p[:, :, kb] << guard_bits) >> s
    out = acc_to_fp32(acc, e_ref - guard_bits - fa.frac_bits - fb.frac_bits, bad)
    out = out[: shape[0], : shape[1]]
    return (out, acc, e_ref) if return_acc else out


def _lay(fmt: BFPFormat, shape):
    return block_layout(tuple(shape), fmt)


def _masked_exps(exps: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    return np.where(invalid, -(1 << 14), exps.astype(np.int64))


def sparse_matmul(xq: BFPTensor, sw: SparseBFPWeight, *, guard_bits: int = DEFAULT_GUARD_BITS,
                  k_max: int | None = None, return_acc: bool = False):
    """Forward ``Y = X Wᵀ`` from the compressed weight: for every tile row, the ``n`` kept
    mantissas times the activation lanes their indices select. Bit-identical to
    ``bfp_matmul(xq, sw.to_bfp().T)``. ``xq`` is ``(B, in)`` blocked along ``in`` with the
    weight's block length along ``in``."""
    if not isinstance(xq, BFPTensor) or not isinstance(sw, SparseBFPWeight):
        raise TypeError("sparse_matmul(xq, sw) takes a BFPTensor and a SparseBFPWeight")
    O, I = sw.shape
    if xq.ndim != 2 or xq.shape[1] != I:
        raise ValueError(f"x has shape {xq.shape}; the weight is [out, in] = {sw.shape}, so "
                         f"x must be (batch, {I})")
    lx, lw = xq.layout, _lay(sw.fmt, sw.shape)
    L = lx.block[1]
    if L != lw.block[1]:
        raise ValueError(f"x's block length along in ({L}) differs from the weight's "
                         f"({lw.block[1]})")
    _acc_check(xq.fmt, sw.fmt, L, I, k_max, guard_bits)
    m = sw.m
    Bp, Ip = lx.padded
    Op = lw.padded[0]
    tr, tc = sw.tiles
    xm3 = xq.mantissas.astype(np.int64).reshape(Bp, tc, m)
    cols = np.arange(tc)[None, :, None, None]
    xs = xm3[:, cols, sw.indices.astype(np.int64)]                 # (Bp, Tr, Tc, m, n)
    part = (xs * sw.mantissas.astype(np.int64)[None]).sum(axis=4)  # (Bp, Tr, Tc, m)
    nkb, per = Ip // L, L // m
    part = part.reshape(Bp, tr, nkb, per, m).sum(axis=3)
    p = part.transpose(0, 1, 3, 2).reshape(Bp, Op, nkb)
    ex = _masked_exps(xq.exponents, xq.invalid)                    # (gb, nkb)
    ew = _masked_exps(sw.exponents, sw.invalid)                    # (go, nkb)
    bx, bo = lx.block[0], lw.block[0]
    ea_full = np.repeat(xq.exponents.astype(np.int64), bx, axis=0)
    eb_full = np.repeat(sw.exponents.astype(np.int64).T, bo, axis=1)
    ea_row = np.repeat(ex.max(axis=1), bx)
    eb_col = np.repeat(ew.max(axis=1), bo)
    bad = (np.repeat(xq.invalid.any(axis=1), bx)[:, None]
           | np.repeat(sw.invalid.any(axis=1), bo)[None, :])
    return _finish(p, ea_full, eb_full, ea_row, eb_col, bad, xq.fmt, sw.fmt, guard_bits,
                   (xq.shape[0], O), return_acc)


def sparse_matmul_t(dyq: BFPTensor, sw: SparseBFPWeight, *,
                    guard_bits: int = DEFAULT_GUARD_BITS, k_max: int | None = None,
                    return_acc: bool = False):
    """Input gradient ``dX = dY W`` from the same compressed tiles read column by column
    (:meth:`SparseBFPWeight.column_view`): for every tile column, its ``n`` kept
    mantissas times the ``dY`` lanes of their rows. Bit-identical to
    ``bfp_matmul(dyq, sw.to_bfp())``. ``dyq`` is ``(B, out)`` blocked along ``out``
    with the weight's block length along ``out``."""
    if not isinstance(dyq, BFPTensor) or not isinstance(sw, SparseBFPWeight):
        raise TypeError("sparse_matmul_t(dyq, sw) takes a BFPTensor and a SparseBFPWeight")
    O, I = sw.shape
    if dyq.ndim != 2 or dyq.shape[1] != O:
        raise ValueError(f"dy has shape {dyq.shape}; the weight is [out, in] = {sw.shape}, "
                         f"so dy must be (batch, {O})")
    rho, sigma = sw.column_view()
    lg, lw = dyq.layout, _lay(sw.fmt, sw.shape)
    L = lg.block[1]
    if L != lw.block[0]:
        raise ValueError(f"dy's block length along out ({L}) differs from the weight's "
                         f"({lw.block[0]})")
    _acc_check(dyq.fmt, sw.fmt, L, O, k_max, guard_bits)
    m = sw.m
    Bp, Op = lg.padded
    Ip = lw.padded[1]
    tr, tc = sw.tiles
    gm3 = dyq.mantissas.astype(np.int64).reshape(Bp, tr, m)
    rows = np.arange(tr)[:, None, None, None]
    gs = gm3[:, rows, rho.astype(np.int64)]                         # (Bp, Tr, Tc, m, n)
    ti, tj = np.meshgrid(np.arange(tr), np.arange(tc), indexing="ij")
    mc = sw.mantissas.astype(np.int64)[ti[..., None, None], tj[..., None, None],
                                       rho.astype(np.int64), sigma.astype(np.int64)]
    part = (gs * mc[None]).sum(axis=4)                              # (Bp, Tr, Tc, m)
    nkb, per = Op // L, L // m
    part = part.reshape(Bp, nkb, per, tc, m).sum(axis=2)
    p = part.reshape(Bp, nkb, Ip).transpose(0, 2, 1)               # (Bp, Ip, nkb)
    eg = _masked_exps(dyq.exponents, dyq.invalid)                  # (gb, nkb)
    ew = _masked_exps(sw.exponents, sw.invalid)                    # (nkb, gi)
    bg, bi = lg.block[0], lw.block[1]
    ea_full = np.repeat(dyq.exponents.astype(np.int64), bg, axis=0)
    eb_full = np.repeat(sw.exponents.astype(np.int64), bi, axis=1)
    ea_row = np.repeat(eg.max(axis=1), bg)
    eb_col = np.repeat(ew.max(axis=0), bi)
    bad = (np.repeat(dyq.invalid.any(axis=1), bg)[:, None]
           | np.repeat(sw.invalid.any(axis=0), bi)[None, :])
    return _finish(p, ea_full, eb_full, ea_row, eb_col, bad, dyq.fmt, sw.fmt, guard_bits,
                   (dyq.shape[0], I), return_acc)
