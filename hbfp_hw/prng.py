"""The stochastic-rounding random-bit generator shared by the golden model and gateware.

Specification (the gateware implements exactly this):

* One 32-bit **xorshift32** generator per lane (Marsaglia 2003, shifts 13, 17, 5)::

      s ^= (s << 13) mod 2**32
      s ^= s >> 17
      s ^= (s << 5) mod 2**32

* Lane ``l`` of ``L`` starts from ``s0 = seed XOR ((l + 1) * 0x9E3779B9 mod 2**32)``;
  if that is zero it is replaced by ``0x6D2B79F5`` (xorshift has no zero state).
  The per-lane constant is fixed at generation time, so seeding costs one XOR and
  one zero test per lane.
* Elements are consumed in stream order (block after block, each block in row-major
  order over its block shape). Element ``n`` belongs to lane ``n % L`` and is that
  lane's ``t = n // L``-th element. The lane first steps its generator, then uses the
  new state: ``u = s_{t+1} >> (32 - r)`` (the top ``r`` bits), where ``s_{t+1}`` is the
  state after ``t + 1`` steps from ``s0``.
* Every quantize call (every new stream in hardware) restarts from the seed.

The generator is linear over GF(2), so the golden model computes any stretch of the
sequence with vectorised jump-ahead (matrix powers, applied through byte tables)
instead of a Python loop.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["LANE_SEED_MULT", "ZERO_SEED_REPLACEMENT", "lane_seed", "xorshift32",
           "lane_states", "random_bits", "random_bits_u32"]

MASK32 = 0xFFFFFFFF
LANE_SEED_MULT = 0x9E3779B9
ZERO_SEED_REPLACEMENT = 0x6D2B79F5


def lane_seed(seed: int, lane: int) -> int:
    """Initial state of lane ``lane`` for ``seed`` (see module docstring)."""
    s = (seed ^ (((lane + 1) * LANE_SEED_MULT) & MASK32)) & MASK32
    return s if s != 0 else ZERO_SEED_REPLACEMENT


def xorshift32(s):
    """One xorshift32 step; works on Python ints and on uint32 NumPy arrays."""
    if isinstance(s, np.ndarray):
        s = s.astype(np.uint32, copy=True)
        s ^= s << np.uint32(13)
        s ^= s >> np.uint32(17)
        s ^= s << np.uint32(5)
        return s
    s ^= (s << 13) & MASK32
    s ^= s >> 17
    s ^= (s << 5) & MASK32
    return s


def _apply(cols: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Apply GF(2) matrices given by their images of the basis vectors to vectors.

    ``cols[..., i]`` is the matrix applied to ``1 << i``; broadcasts ``cols[..., i]``
    against ``v``.
    """
    out = np.zeros(np.broadcast_shapes(cols.shape[:-1], v.shape), dtype=np.uint32)
    for i in range(32):
        bit = (v >> np.uint32(i)) & np.uint32(1)
        out ^= bit * cols[..., i]
    return out


@lru_cache(maxsize=None)
def _step_cols() -> np.ndarray:
    return xorshift32((np.uint32(1) << np.arange(32, dtype=np.uint32)))


def _powers(mcols: np.ndarray, n: int) -> np.ndarray:
    """Columns of ``M**j`` for ``j = 0..n-1`` (shape ``(n, 32)``), by doubling."""
    p = np.empty((n, 32), dtype=np.uint32)
    p[0] = np.uint32(1) << np.arange(32, dtype=np.uint32)
    c, mc = 1, mcols
    while c < n:
        m = min(c, n - c)
        p[c:c + m] = _apply(mc, p[:m])
        mc = _apply(mc, mc)
        c *= 2
    return p


# -- byte-table jump-ahead ---------------------------------------------------------------
# A GF(2) matrix applied to a state is the XOR of four 256-entry table lookups, one per
# state byte. With ``_SEG`` consecutive states per segment, the segment starts
# ``A**(1+q*_SEG) s0`` come from one table set and the states inside a segment
# ``A**j x_q`` (``j < _SEG``) from another; both are cached, so a call costs 8 row
# gathers and XORs per element instead of 32 mask-XOR passes.

#: consecutive states computed from one segment start
_SEG = 256
#: above this many segments the segment starts come from the mask-XOR jump-ahead over
#: the starts only (32 passes over ``nseg`` values) instead of ever larger byte tables
_MAX_TABLE_SEGS = 4096


def _byte_tables(cols: np.ndarray) -> np.ndarray:
    """Byte tables of GF(2) matrices given by columns ``cols[..., 32]``:
    ``T[..., b, v]`` = the matrix applied to ``v << 8b``. Shape ``(..., 4, 256)``."""
    lead = cols.shape[:-1]
    c = cols.reshape(*lead, 4, 8)
    t = np.zeros((*lead, 4, 256), dtype=np.uint32)
    for i in range(8):
        t[..., 1 << i: 2 << i] = t[..., : 1 << i] ^ c[..., i, None]
    return t


@lru_cache(maxsize=1)
def _inner_tables() -> np.ndarray:
    """``(4, 256, _SEG)``: entry ``[b, v, j]`` = ``A**j (v << 8b)``, ``j < _SEG``."""
    p = _powers(_step_cols(), _SEG)                       # (SEG, 32) columns of A**j
    return np.ascontiguousarray(_byte_tables(p).transpose(1, 2, 0))


@lru_cache(maxsize=1)
def _seg_step_cols() -> np.ndarray:
    """Columns of ``A**_SEG``."""
    return _apply(_step_cols(), _powers(_step_cols(), _SEG)[-1])


@lru_cache(maxsize=4)
def _seg_powers(nseg: int) -> np.ndarray:
    """Columns of ``A**(q*_SEG)`` for ``q < nseg``."""
    return _powers(_seg_step_cols(), nseg)


_outer_cache: dict[str, np.ndarray] = {}


def _outer_tables(nseg: int) -> np.ndarray:
    """``(4, 256, >= nseg)``: entry ``[b, v, q]`` = ``A**(1 + q*_SEG) (v << 8b)``."""
    t = _outer_cache.get("t")
    if t is None or t.shape[2] < nseg:
        n = max(nseg, 2 * (0 if t is None else t.shape[2]), 64)
        p = _powers(_seg_step_cols(), n)                               # A**(q*SEG)
        cols = _apply(p[:, None, :], _step_cols()[None, :])            # A**(q*SEG) * A
        t = np.ascontiguousarray(_byte_tables(cols).transpose(1, 2, 0))
        _outer_cache["t"] = t
    return t


def _apply_tables(t: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """``t[b, byte_b(v), :n]`` XORed over the four bytes: shape ``(*v.shape, n)``."""
    out = t[0, v & 0xFF, :n]
    for b in range(1, 4):
        out ^= t[b, (v >> (8 * b)) & 0xFF, :n]
    return out


def lane_states(seeds0: np.ndarray, steps: int) -> np.ndarray:
    """States ``s_1 .. s_steps`` of each lane: shape ``(lanes, steps)``, uint32."""
    seeds0 = np.asarray(seeds0, dtype=np.uint32).reshape(-1)
    if steps <= 0:
        return np.zeros((seeds0.size, 0), dtype=np.uint32)
    nseg = -(-steps // _SEG)
    if nseg <= _MAX_TABLE_SEGS:
        starts = _apply_tables(_outer_tables(nseg), seeds0, nseg)   # (lanes, nseg)
    else:
        p = _seg_powers(1 << (nseg - 1).bit_length())[:nseg]
        starts = _apply(p[None, :, :], xorshift32(seeds0)[:, None])  # A**(q*SEG) s_1
    c = min(_SEG, steps)
    st = _apply_tables(_inner_tables(), starts, c)                  # (lanes, nseg, c)
    return st.reshape(seeds0.size, nseg * c)[:, :steps]


def random_bits_u32(seed: int, lanes: int, count: int, bits: int) -> np.ndarray:
    """:func:`random_bits` as uint32 (no int64 copy)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits} is out of range; accepted range is [1, 32]")
    if count <= 0:
        return np.zeros(0, dtype=np.uint32)
    seeds0 = np.array([lane_seed(seed, lane) for lane in range(lanes)], dtype=np.uint32)
    st = lane_states(seeds0, -(-count // lanes))    # (lanes, steps)
    if lanes > 1:
        st = st.T
    return st.reshape(-1)[:count] >> np.uint32(32 - bits)


def random_bits(seed: int, lanes: int, count: int, bits: int) -> np.ndarray:
    """The ``bits``-bit random integers ``u`` for stream elements ``0 .. count-1``.

    Returns an int64 array of length ``count``; see the module docstring for the
    element-to-lane mapping.
    """
    return random_bits_u32(seed, lanes, count, bits).astype(np.int64)
