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
sequence with vectorised jump-ahead (matrix powers by doubling) instead of a Python loop.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["LANE_SEED_MULT", "ZERO_SEED_REPLACEMENT", "lane_seed", "xorshift32",
           "lane_states", "random_bits"]

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


@lru_cache(maxsize=16)
def _tables(c: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    p1 = _powers(_step_cols(), c)          # A^j, j < c
    ac = _apply(_step_cols(), p1[c - 1])   # A^c = A * A^(c-1)
    p2 = _powers(ac, k)                    # A^(c*k'), k' < k
    return p1, p2


def lane_states(seeds0: np.ndarray, steps: int) -> np.ndarray:
    """States ``s_1 .. s_steps`` of each lane: shape ``(lanes, steps)``, uint32."""
    seeds0 = np.asarray(seeds0, dtype=np.uint32)
    if steps <= 0:
        return np.zeros((seeds0.size, 0), dtype=np.uint32)
    s1 = xorshift32(seeds0)
    c = 1 << max(0, int(np.ceil(np.log2(max(1.0, np.sqrt(steps))))))
    k = -(-steps // c)
    p1, p2 = _tables(c, k)
    starts = _apply(p2[None, :, :], s1[:, None])                  # (lanes, k)
    states = _apply(p1[None, None, :, :], starts[:, :, None])     # (lanes, k, c)
    return states.reshape(seeds0.size, k * c)[:, :steps]


def random_bits(seed: int, lanes: int, count: int, bits: int) -> np.ndarray:
    """The ``bits``-bit random integers ``u`` for stream elements ``0 .. count-1``.

    Returns an int64 array of length ``count``; see the module docstring for the
    element-to-lane mapping.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits} is out of range; accepted range is [1, 32]")
    seeds0 = np.array([lane_seed(seed, lane) for lane in range(lanes)], dtype=np.uint32)
    steps = -(-count // lanes)
    st = lane_states(seeds0, steps)                 # (lanes, steps)
    u = (st.T.reshape(-1)[:count] >> np.uint32(32 - bits)).astype(np.int64)
    return u
