"""Compiled (numba) kernels of the emulate backend: the quantizer and the GEMM's
per-call work in one pass each, bit-identical to the golden model.

The eager PyTorch/NumPy paths of :mod:`hbfp_hw.host.torch_quant` and
:func:`hbfp_hw.host.torch.fast_bfp_matmul` cost a dozen or more small tensor operations
per call (~60-100 µs of fixed overhead, whatever the size). On the small layers of the
digits models that, not arithmetic, sets the step time. These kernels do the same work
in one compiled loop nest per call:

* :func:`quantize_2d` — block maxima, shared exponents, the float32 power-of-two
  scaling, rounding (all four modes; the xorshift32 streams of :mod:`hbfp_hw.prng`
  stepped directly, lane by lane) and saturation, for a 2-D float32 array with blocks
  over one or both axes. Every float operation is the golden model's own, in the same
  precision (float32 scaling, float64 stochastic rounding), so the bits are the same.
* :func:`matmul_prepare` / :func:`matmul_finish` — the grid-level work of the exact
  GEMM (row/column exponent maxima, shifts, the truncation test, the float32
  exactness bound), the pre-shifted operands, and the conversion of the accumulator
  to FP32 with the golden model's flush and rounding. The GEMM itself stays a
  PyTorch ``mm``/``bmm`` (BLAS), called by :func:`hbfp_hw.host.torch.fast_bfp_matmul`.
* :func:`conv_quantize_4d` / :func:`conv_check` / :func:`conv_finish` — the HyperBlock
  convolution's operands quantized straight from NCHW (with the operand scaled by
  powers of two and per-block L1 statistics), the test that a float32 (or float64)
  convolution of them is exact, and the one rounding to FP32; the convolutions are
  PyTorch's.

numba is optional: without it (or with ``HBFP_HW_NO_NUMBA=1`` in the environment, or
:data:`ENABLED` set to False) the callers take their pure-PyTorch paths, which give the
same bits. The kernels are compiled on first use (cached on disk by numba), so the
first call of each kind takes a second or two; :func:`warm_up` compiles them ahead.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

from hbfp_hw.prng import LANE_SEED_MULT, ZERO_SEED_REPLACEMENT

try:  # pragma: no cover - exercised by whichever configuration is installed
    if os.environ.get("HBFP_HW_NO_NUMBA"):
        raise ImportError("disabled by HBFP_HW_NO_NUMBA")
    from numba import njit
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

    def njit(*args, **kwargs):
        def wrap(f):
            return f
        return wrap

__all__ = ["HAVE_NUMBA", "ENABLED", "quantize_2d", "matmul_prepare", "matmul_finish",
           "warm_up", "ROUNDING_CODES"]

#: use the compiled kernels (True when numba is importable); tests switch it off to
#: exercise the pure-PyTorch paths
ENABLED = HAVE_NUMBA

ROUNDING_CODES = {"nearest_even": 0, "toward_zero": 1, "nearest_away": 2, "stochastic": 3}

_ABS = 0x7FFFFFFF
_INF = 0x7F800000
_MIN_NORMAL = 0x00800000
_MASK32 = 0xFFFFFFFF
_LANE_MULT = LANE_SEED_MULT                # hbfp_hw.prng: the lanes' start states
_ZERO_SEED = ZERO_SEED_REPLACEMENT


# -- the quantizer ---------------------------------------------------------------------

#: exact powers of two, float32 ``2**k`` at ``[k + 126]`` for k in [-126, 127] and
#: float64 at ``[k + 1022]`` for k in [-1022, 1023] (a table lookup is several times
#: cheaper than ``ldexp`` in the kernels' per-block work)
_POW2_F32 = np.ldexp(np.float32(1.0), np.arange(-126, 128)).astype(np.float32)
_POW2_F64 = np.ldexp(1.0, np.arange(-1022, 1024))


@njit(cache=True, nogil=True, inline="always")
def _pow2_f32(k):
    """Exact float32 ``2**k`` for integer ``k`` in [-126, 127]."""
    return _POW2_F32[k + 126]


@njit(cache=True, nogil=True, inline="always")
def _shift_run(fv, iv, lo, n, live, s, w):
    """One block's operand pre-shift over ``fv/iv[lo:lo+n]``: the float32 factor
    ``2**-s`` and the integer weight ``2**(w-s)`` of the exactness bound (0 if the block
    pair is dead)."""
    f = _pow2_f32(-s) if live else np.float32(0.0)
    m = (1 << (w - s)) if live else 0
    for c in range(lo, lo + n):
        fv[c] = f
        iv[c] = m


@njit(cache=True, nogil=True, inline="always")
def _pow2_f64(k):
    """Exact float64 ``2**k`` for integer ``k`` (table inside the normal range)."""
    if -1022 <= k <= 1023:
        return _POW2_F64[k + 1022]
    return math.ldexp(1.0, k)


@njit(cache=True, nogil=True, inline="always")
def _lane_state(seed, lane):
    """Lane ``lane``'s start state (:mod:`hbfp_hw.prng`): ``seed`` XOR ``(lane + 1)``
    times the lane multiplier, the zero state replaced."""
    s = (seed ^ (((lane + 1) * _LANE_MULT) & _MASK32)) & _MASK32
    return s if s != 0 else np.int64(_ZERO_SEED)


@njit(cache=True, nogil=True)
def _random_stream(seed, lanes, count, bits):
    """:func:`hbfp_hw.prng.random_bits_u32` (``count`` numbers of ``bits`` bits): lane
    ``l`` of ``lanes`` holds elements ``l, l + lanes, ...``; each is the top ``bits``
    bits of the lane's next xorshift32 state."""
    states = np.empty(lanes, np.int64)
    for lane in range(lanes):
        states[lane] = _lane_state(seed, lane)
    u = np.empty(count, np.int64)
    shift = 32 - bits
    steps = (count + lanes - 1) // lanes
    n = 0
    for _ in range(steps):
        for lane in range(lanes):
            s = states[lane]
            s ^= (s << 13) & _MASK32
            s ^= s >> 17
            s ^= (s << 5) & _MASK32
            states[lane] = s
            if n < count:
                u[n] = s >> shift
            n += 1
    return u


#: independent xorshift32 chains run side by side per lane by :func:`_random_stream_fast`
#: (each stream is cut into this many consecutive chunks, whose start states come from
#: the jump-ahead ``A**n``); they give the same numbers as the one chain, several times
#: faster (the chain's steps are dependent, eight chains fill the pipeline)
CHUNKS = 8


@njit(cache=True, nogil=True)
def _jump_cols(n):
    """``A**n`` of the xorshift32 step (a linear map over GF(2)) as its 32 columns:
    ``cols[i]`` = the state ``1 << i`` stepped ``n`` times."""
    cols = np.empty(32, np.int64)
    for i in range(32):
        s = np.int64(1) << i
        for _ in range(n):
            s ^= (s << 13) & _MASK32
            s ^= s >> 17
            s ^= (s << 5) & _MASK32
        cols[i] = s
    return cols


@njit(cache=True, nogil=True, inline="always")
def _jump(cols, s):
    r = np.int64(0)
    for i in range(32):
        if (s >> i) & 1:
            r ^= cols[i]
    return r


@njit(cache=True, nogil=True, inline="always")
def _xs(s):
    s ^= (s << 13) & _MASK32
    s ^= s >> 17
    s ^= (s << 5) & _MASK32
    return s


@njit(cache=True, nogil=True, inline="always")
def _xs32(x):
    """:func:`_xs` on a uint32 state (32-bit lanes: loops over chains vectorise)."""
    x = np.uint32(x ^ (x << np.uint32(13)))
    x ^= x >> np.uint32(17)
    return np.uint32(x ^ (x << np.uint32(5)))


@njit(cache=True, nogil=True)
def _random_stream_fast(seed, lanes, count, bits, cols):
    """:func:`_random_stream` computed as :data:`CHUNKS` (8) chains per lane: lane
    ``l``'s sequence of ``S = ceil(count / lanes)`` steps is cut into chunks of
    ``n = ceil(S / 8)``; chunk ``c`` starts from the lane's initial state advanced
    ``c·n`` steps (``cols`` = the columns of ``A**n``, :func:`_jump_cols`) and the
    eight chunks are stepped together. Same numbers, same order."""
    u = np.empty(count, np.int64)
    _random_stream_fast_into(seed, lanes, count, bits, cols, u)
    return u


@njit(cache=True, nogil=True)
def _random_stream_fast_into(seed, lanes, count, bits, cols, u):
    """:func:`_random_stream_fast` into ``u[:count]``."""
    shift = 32 - bits
    steps = (count + lanes - 1) // lanes
    n = (steps + 7) // 8
    for lane in range(lanes):
        s0 = _lane_state(seed, lane)
        s1 = _jump(cols, s0)
        s2 = _jump(cols, s1)
        s3 = _jump(cols, s2)
        s4 = _jump(cols, s3)
        s5 = _jump(cols, s4)
        s6 = _jump(cols, s5)
        s7 = _jump(cols, s6)
        full = min(n, (count - lane - 1) // lanes - 7 * n + 1) if count > lane else 0
        # steps t < full: all eight chunks hold an element (k = (c n + t) lanes + lane)
        for t in range(max(full, 0)):
            s0 = _xs(s0)
            s1 = _xs(s1)
            s2 = _xs(s2)
            s3 = _xs(s3)
            s4 = _xs(s4)
            s5 = _xs(s5)
            s6 = _xs(s6)
            s7 = _xs(s7)
            k = t * lanes + lane
            d = n * lanes
            u[k] = s0 >> shift
            u[k + d] = s1 >> shift
            u[k + 2 * d] = s2 >> shift
            u[k + 3 * d] = s3 >> shift
            u[k + 4 * d] = s4 >> shift
            u[k + 5 * d] = s5 >> shift
            u[k + 6 * d] = s6 >> shift
            u[k + 7 * d] = s7 >> shift
        # the rest (the last chunks run out): one chain at a time
        st = np.array([s0, s1, s2, s3, s4, s5, s6, s7])
        for c in range(8):
            s = st[c]
            for t in range(max(full, 0), n):
                k = (c * n + t) * lanes + lane
                if k >= count:
                    break
                s = _xs(s)
                u[k] = s >> shift


@njit(cache=True, nogil=True)
def _random_stream_scatter(seed, lanes, count, bits, cols, pos, u):
    """:func:`_random_stream_fast` with number ``k`` written to ``u[pos[k]]``."""
    shift = 32 - bits
    steps = (count + lanes - 1) // lanes
    n = (steps + 7) // 8
    for lane in range(lanes):
        s0 = _lane_state(seed, lane)
        s1 = _jump(cols, s0)
        s2 = _jump(cols, s1)
        s3 = _jump(cols, s2)
        s4 = _jump(cols, s3)
        s5 = _jump(cols, s4)
        s6 = _jump(cols, s5)
        s7 = _jump(cols, s6)
        full = min(n, (count - lane - 1) // lanes - 7 * n + 1) if count > lane else 0
        # steps t < full: all eight chunks hold an element (k = (c n + t) lanes + lane)
        for t in range(max(full, 0)):
            s0 = _xs(s0)
            s1 = _xs(s1)
            s2 = _xs(s2)
            s3 = _xs(s3)
            s4 = _xs(s4)
            s5 = _xs(s5)
            s6 = _xs(s6)
            s7 = _xs(s7)
            k = t * lanes + lane
            d = n * lanes
            u[pos[k]] = s0 >> shift
            u[pos[k + d]] = s1 >> shift
            u[pos[k + 2 * d]] = s2 >> shift
            u[pos[k + 3 * d]] = s3 >> shift
            u[pos[k + 4 * d]] = s4 >> shift
            u[pos[k + 5 * d]] = s5 >> shift
            u[pos[k + 6 * d]] = s6 >> shift
            u[pos[k + 7 * d]] = s7 >> shift
        # the rest (the last chunks run out): one chain at a time
        st = np.array([s0, s1, s2, s3, s4, s5, s6, s7])
        for c in range(8):
            s = st[c]
            for t in range(max(full, 0), n):
                k = (c * n + t) * lanes + lane
                if k >= count:
                    break
                s = _xs(s)
                u[pos[k]] = s >> shift


_jumps: dict = {}


def jump_table(count: int, lanes: int) -> np.ndarray:
    """The jump-ahead columns :func:`_random_stream_fast` needs for a stream of
    ``count`` numbers over ``lanes`` lanes (cached per chunk length)."""
    return step_cols((-(-count // lanes) + CHUNKS - 1) // CHUNKS)


def step_cols(n: int) -> np.ndarray:
    """The columns of ``A**n`` (:func:`_jump_cols`: the xorshift32 step taken ``n``
    times), cached per ``n``."""
    cols = _jumps.get(n)
    if cols is None:
        if len(_jumps) > 256:
            _jumps.clear()
        cols = _jumps[n] = _jump_cols(n)
    return cols


@njit(cache=True, nogil=True)
def _quantize_kernel(x, b0, b1, emin, emax, frac_bits, mmax, man_bits, rnd, sr_bits,
                     seed, lanes, jump, man):
    """Quantize ``x`` (float32, (m, n)) into ``man`` (padded; padding zeroed here) and
    return the exponent grid, or an empty grid if a block holds NaN/Inf.

    Every loop over elements runs along a whole row (vectorised): per block row the
    block maxima go through a row of column maxima, and the per-block scale factors
    are expanded to a row first."""
    m, n = x.shape
    mp, np_ = man.shape
    g0, g1 = mp // b0, np_ // b1
    xb = x.view(np.int32)
    exps = np.empty((g0, g1), np.int16)
    colmax = np.empty(n, np.int32)
    f1 = np.empty(n, np.float32)
    f2 = np.empty(n, np.float32)
    mmf = np.float32(mmax)
    cap = 2.0 ** man_bits
    up = 2.0 ** sr_bits
    half = np.float32(0.5)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    # stochastic rounding: the random numbers come in stream order (blocks row-major over
    # the grid, elements row-major in a block); copied block row by block row into the
    # padded layout (u2[r, c] for element (r, c): the rounding loop below then reads
    # them in order, which is much faster than gathering them there)
    if rnd == 3:
        if jump.size:
            u = _random_stream_fast(seed, lanes, mp * np_, sr_bits, jump)
        else:
            u = _random_stream(seed, lanes, mp * np_, sr_bits)
        u2 = np.empty((mp, np_), np.int32)
        bb = b0 * b1
        for bi in range(g0):
            for bj in range(g1):
                base = (bi * g1 + bj) * bb
                for rr in range(b0):
                    r = bi * b0 + rr
                    o = base + rr * b1
                    for cc in range(b1):
                        u2[r, bj * b1 + cc] = u[o + cc]
    else:
        u2 = np.zeros((0, 0), np.int32)
    for r in range(m, mp):
        for c in range(np_):
            man[r, c] = 0
    for bi in range(g0):
        r0 = bi * b0
        r1 = min(m, r0 + b0)
        for c in range(n):
            colmax[c] = 0
        for r in range(r0, r1):
            for c in range(n):
                colmax[c] = max(colmax[c], xb[r, c] & _ABS)
        for bj in range(g1):
            a = 0
            for c in range(bj * b1, min(n, bj * b1 + b1)):
                a = max(a, colmax[c])
            if a >= _INF:
                return np.empty((0, 0), np.int16)
            field = a >> 23
            e = emin if field == 0 else field - 127
            e = min(max(e, emin), emax)
            exps[bi, bj] = e
            # y = x * 2**k, k = frac_bits - E: two exact float32 power-of-two
            # multiplies, each factor in the normal range, as the golden model
            k = frac_bits - max(e, -150)
            k1 = min(max(k, -126), 126)
            p1 = _pow2_f32(k1)
            p2 = _pow2_f32(k - k1)
            for c in range(bj * b1, min(n, bj * b1 + b1)):
                f1[c] = p1
                f2[c] = p2
        for r in range(r0, r1):
            for c in range(n, np_):
                man[r, c] = 0
            # the rounding mode is tested outside the element loops so that each loop
            # is branch-free; subnormal inputs flush to +0
            if rnd == 0:
                for c in range(n):
                    xv = x[r, c] if (xb[r, c] & _ABS) >= _MIN_NORMAL else zero
                    q = np.rint(xv * f1[c] * f2[c])
                    man[r, c] = np.int32(min(max(q, -mmf), mmf))
            elif rnd == 1:
                for c in range(n):
                    xv = x[r, c] if (xb[r, c] & _ABS) >= _MIN_NORMAL else zero
                    q = np.trunc(xv * f1[c] * f2[c])
                    man[r, c] = np.int32(min(max(q, -mmf), mmf))
            elif rnd == 2:
                for c in range(n):
                    xv = x[r, c] if (xb[r, c] & _ABS) >= _MIN_NORMAL else zero
                    y = xv * f1[c] * f2[c]
                    t = np.trunc(y)
                    # as the golden model: t + copysign(|y - t| >= 0.5, x)
                    q = t + ((-one if y < zero else one) if np.abs(y - t) >= half else zero)
                    man[r, c] = np.int32(min(max(q, -mmf), mmf))
            else:
                for c in range(n):
                    xv = x[r, c] if (xb[r, c] & _ABS) >= _MIN_NORMAL else zero
                    y = xv * f1[c] * f2[c]
                    # q = floor(|y| + u / 2**r) = (floor(|y| 2**r) + u) >> r, in float64
                    mag = min(np.float64(np.abs(y)), cap)
                    qm = min((np.int64(math.floor(mag * up)) + np.int64(u2[r, c])) >> sr_bits,
                             mmax)
                    man[r, c] = -qm if np.signbit(y) else qm
    return exps


_params: dict = {}
_NO_JUMP = np.zeros(0, np.int64)


def _format_params(fmt) -> tuple:
    """The kernel's scalar arguments for ``fmt``, cached per (widths, rounding): the
    format's properties recompute them on every access, and hashing the whole format
    costs more than these few fields (stochastic gradient formats are new objects,
    with a new seed, every step)."""
    key = (fmt.man_bits, fmt.exp_bits, fmt.rounding)
    p = _params.get(key)
    if p is None:
        p = _params[key] = (fmt.emin, fmt.emax, fmt.frac_bits, fmt.mmax, fmt.man_bits,
                            ROUNDING_CODES[fmt.rounding],
                            np.int8 if fmt.man_bits <= 8 else np.int16)
    return p


def quantize_2d(x: np.ndarray, fmt, b0: int, b1: int, mp: int, np_: int):
    """Mantissas ``(mp, np_)`` and exponents of a C-contiguous float32 2-D ``x``
    quantized with ``fmt`` (blocks ``b0 × b1``), or ``None`` if a block holds NaN/Inf
    (the caller then asks the golden model, which raises)."""
    emin, emax, frac_bits, mmax, man_bits, rnd, dt = _format_params(fmt)
    man = np.empty((mp, np_), dt)
    jump = jump_table(mp * np_, fmt.sr_lanes) if rnd == 3 else _NO_JUMP
    exps = _quantize_kernel(x, b0, b1, emin, emax, frac_bits, mmax, man_bits, rnd,
                            fmt.sr_bits, fmt.seed, fmt.sr_lanes, jump, man)
    if exps.size == 0 and mp * np_:
        return None
    return man, exps


# -- the GEMM --------------------------------------------------------------------------
#
# fast_bfp_matmul's decomposition (see there and hbfp_hw.gemm): shifts
# s = sa[i, kb] + sb[kb, j] with sa = (row max of a's exponents) - ea, sb likewise.
# A K-block is "safe" when no pair of non-zero blocks in it is shifted by more than the
# guard bits G: its products P * 2**(G - s) are integers, no truncation happens, and
# all safe K-blocks sum exactly in one GEMM of the pre-shifted operands
# A' = ma * 2**-sa, B' = mb * 2**-sb (acc = 2**G * A' @ B'). The other K-blocks are
# formed one by one (bmm) with the shift folded into the operands, then floored.

@njit(cache=True, nogil=True)
def _nonzero(man, e, emin, b0, b1):
    """Blocks (``b0 × b1``) holding a non-zero mantissa (with ``emin < -126`` the
    exponent tells: FP32 normals have exponents >= -126, subnormals are flushed)."""
    g0, g1 = e.shape
    nz = np.zeros((g0, g1), np.bool_)
    if emin < -126:
        for i in range(g0):
            for j in range(g1):
                nz[i, j] = e[i, j] > emin
        return nz
    r0, c0 = man.shape
    for r in range(r0):
        for c in range(c0):
            if man[r, c] != 0:
                nz[r // b0, c // b1] = True
    return nz


@njit(cache=True, nogil=True)
def _prepare_analyse(ma, ea, emin_a, mb, eb, emin_b, bm, L, bn, guard, ea_row, eb_col):
    """The grid analysis of ``a (Mp, Kp) @ b (Kp, Np)``: fills ``ea_row`` (row maxima
    of ``a``'s exponents) and ``eb_col`` (column maxima of ``b``'s), returns
    ``(nz_a, nz_b, safe, used, w, nu)``: the non-zero blocks, per K-block whether no
    live pair is shifted past the guard bits and whether it holds a live pair, the
    largest live shift ``w`` of the safe K-blocks and the number of unsafe ones."""
    gm, nkb = ea.shape
    gn = eb.shape[1]
    lo = -(1 << 14)
    for i in range(gm):
        ea_row[i] = lo
        for kb in range(nkb):
            ea_row[i] = max(ea_row[i], ea[i, kb])
    for j in range(gn):
        eb_col[j] = lo
    for kb in range(nkb):
        for j in range(gn):
            eb_col[j] = max(eb_col[j], eb[kb, j])
    nz_a = _nonzero(ma, ea, emin_a, bm, L)
    nz_b = _nonzero(mb, eb, emin_b, L, bn)
    # per K-block: the largest shift of a live pair (max over live rows of sa plus max
    # over live columns of sb: both terms and liveness are separable)
    neg = -(1 << 20)
    safe = np.empty(nkb, np.bool_)     # no live pair shifted past the guard bits
    used = np.empty(nkb, np.bool_)     # safe and holding a live pair
    w = 0
    nu = 0
    for kb in range(nkb):
        wa = neg
        for i in range(gm):
            if nz_a[i, kb]:
                wa = max(wa, ea_row[i] - ea[i, kb])
        wb = neg
        for j in range(gn):
            if nz_b[kb, j]:
                wb = max(wb, eb_col[j] - eb[kb, j])
        safe[kb] = wa + wb <= guard
        used[kb] = safe[kb] and wa > neg and wb > neg
        if used[kb]:
            w = max(w, wa + wb)        # sa <= wa <= w and sb <= wb <= w (both >= 0)
        elif not safe[kb]:
            nu += 1
    return nz_a, nz_b, safe, used, w, nu


@njit(cache=True, nogil=True)
def _chunks(rs, cs, ak, bk, w, L, maxc, ch):
    """The float32 exactness bound per K-chunk (see :func:`_prepare_fill`): with
    ``rs[kb, i]`` = sum over K-block ``kb`` of ``|a'_ik| 2**w``, ``cs[kb, j]`` likewise
    for ``b'``, ``ak[kb]``/``bk[kb]`` their largest elements, a chunk C passes when
    ``min(max_i sum_C rs * max_C bk, max_C ak * max_j sum_C cs) <= 2**(24 + w)`` (units
    of 2**-2w; ``sum_C |a'_ik b'_kj| <= sum_C |a'_ik| * max_C |b'_kj|`` and
    symmetrically). Greedy: each chunk is extended by K-blocks while it passes (the
    bound only grows with the chunk, so this gives the fewest chunks). Writes the chunk
    boundaries (element offsets) into ``ch`` and returns 0 (one chunk), ``nc << 1``
    (``nc`` >= 2 chunks) or 1 (a single K-block fails, or more than ``maxc`` chunks).

    Why the float64 sum of the chunk results is exact: each is an exact float32 value,
    an integer multiple of 2**-w with magnitude <= 2**(24 - w); any partial sum of
    ``nc`` of them is a multiple of 2**-w of magnitude <= nc * 2**(24 - w), i.e. an
    integer times 2**-w below nc * 2**24 <= 2**53 for nc <= 2**29, so exactly
    representable in float64 and every addition is exact (in any order)."""
    nkb, Mp = rs.shape
    Np = cs.shape[1]
    lim = 2.0 ** (24 + w)
    run_r = np.zeros(Mp, np.int64)
    run_c = np.zeros(Np, np.int64)
    run_a = 0
    run_b = 0
    k0 = 0
    nc = 0
    ch[0] = 0
    for kb in range(nkb):
        while True:
            mr = 0
            for r in range(Mp):
                mr = max(mr, run_r[r] + rs[kb, r])
            mc = 0
            for c in range(Np):
                mc = max(mc, run_c[c] + cs[kb, c])
            ra = max(run_a, ak[kb])
            rb = max(run_b, bk[kb])
            bound = min(float(mr) * float(rb), float(ra) * float(mc))
            if bound * (1.0 + 2.0 ** -50) <= lim:
                break
            if kb == k0 or nc + 2 > maxc:
                return 1                # one K-block alone fails, or too many chunks
            nc += 1                     # close the chunk before kb, start one at kb
            ch[nc] = kb * L
            k0 = kb
            run_r[:] = 0
            run_c[:] = 0
            run_a = 0
            run_b = 0
        for r in range(Mp):
            run_r[r] += rs[kb, r]
        for c in range(Np):
            run_c[c] += cs[kb, c]
        run_a = ra
        run_b = rb
    nc += 1
    ch[nc] = nkb * L
    return 0 if nc == 1 else nc << 1


@njit(cache=True, nogil=True)
def _prepare_fill(ma, ea, mb, eb, ea_row, eb_col, nz_a, nz_b, safe, used, w, nu, bm, L,
                  bn, guard, mmax_a, mmax_b, f32_min, maxc, ch, A, B, U, V):
    """The operands after :func:`_prepare_analyse`: ``A (Mp, Kp)``, ``B (Kp, Np)``
    (written whole when a K-block is safe) and the first ``nu`` slices of ``U``, ``V``
    (float32 or float64: the caller's choice, exact either way). Returns the status:
    bit 0: the float32 exactness bound failed, compute ``A @ B`` in float64; else
    ``status >> 1`` = ``nc`` >= 2: the bound holds on each of ``nc`` K-chunks
    ``ch[c]:ch[c + 1]`` (element offsets along K, on K-block boundaries, at most
    ``maxc`` chunks), compute each chunk's ``A @ B`` in float32 and add them in float64;
    0: one float32 GEMM is exact."""
    Mp, Kp = ma.shape
    Np = mb.shape[1]
    gm, nkb = ea.shape
    gn = eb.shape[1]
    status = 0
    if nu < nkb:
        # every product of live blocks is a multiple of 2**-w: all partial sums of any
        # order are exact in float32 while sum_k |a'_ik b'_kj| <= 2**(24 - w). Checked
        # on the format first (free), else on the data: a' * 2**w and b' * 2**w are
        # integers, their int64 sums per row (column) and K-block are exact. If the
        # bound fails on the whole of K, K is cut greedily into the fewest chunks of
        # whole K-blocks on each of which it holds (below): each chunk's float32 GEMM
        # is then exact, an integer multiple of 2**-w of magnitude <= 2**(24 - w).
        if Mp * Kp * Np < f32_min:
            status = 1
        need = status == 0 and float(Kp) * mmax_a * mmax_b > 2.0 ** (24 - w)
        frow = np.empty(Kp, np.float32)
        irow = np.empty(Kp, np.int64)
        # per K-block: row sums (nkb, Mp), column sums (nkb, Np), largest elements
        nk = nkb if need else 0         # (nothing allocated when the format bound holds)
        rs = np.zeros((nk, Mp), np.int64)
        cs = np.zeros((nk, Np), np.int64)
        ak = np.zeros(nk, np.int64)
        bk = np.zeros(nk, np.int64)
        for i in range(gm):
            for kb in range(nkb):
                _shift_run(frow, irow, kb * L, L, used[kb] and nz_a[i, kb],
                           ea_row[i] - ea[i, kb], w)
            for r in range(i * bm, i * bm + bm):
                for c in range(Kp):
                    A[r, c] = np.float32(ma[r, c]) * frow[c]
                if need:
                    for kb in range(nkb):       # irow is constant on a K-block
                        isum = 0
                        amx = 0
                        for c in range(kb * L, kb * L + L):
                            t = abs(np.int64(ma[r, c]))
                            isum += t
                            amx = max(amx, t)
                        rs[kb, r] = isum * irow[kb * L]
                        ak[kb] = max(ak[kb], amx * irow[kb * L])
        fcol = np.empty(Np, np.float32)
        icol = np.empty(Np, np.int64)
        csum = np.empty(Np if need else 0, np.int64)
        cmax = np.empty(Np if need else 0, np.int64)
        for kb in range(nkb):
            for j in range(gn):
                _shift_run(fcol, icol, j * bn, bn, used[kb] and nz_b[kb, j],
                           eb_col[j] - eb[kb, j], w)
            if need:
                csum[:] = 0
                cmax[:] = 0
            for r in range(kb * L, kb * L + L):
                for c in range(Np):
                    B[r, c] = np.float32(mb[r, c]) * fcol[c]
                if need:
                    for c in range(Np):
                        t = abs(np.int64(mb[r, c]))
                        csum[c] += t
                        cmax[c] = max(cmax[c], t)
            if need:                    # icol is constant along a K-block's rows
                bmx = 0
                for c in range(Np):
                    cs[kb, c] = csum[c] * icol[c]
                    bmx = max(bmx, cmax[c] * icol[c])
                bk[kb] = bmx
        if need:
            status = _chunks(rs, cs, ak, bk, w, L, maxc, ch)
    if nu == 0:
        return status
    # unsafe K-blocks: P * 2**(G - s) with the scaling folded into the operands; sa and
    # sb clamped to cl = bit_length(pmax) + 1 + G, where floor gives 0 or -1 either way
    pmax = L * mmax_a * mmax_b
    cl = 1
    while (1 << (cl - 1)) <= pmax:
        cl += 1
    cl += guard
    u = 0
    for kb in range(nkb):
        if safe[kb]:
            continue
        for r in range(Mp):
            f = _pow2_f64(guard - min(ea_row[r // bm] - ea[r // bm, kb], cl))
            for c in range(L):
                U[u, r, c] = ma[r, kb * L + c] * f    # exact (in float32 too if chosen)
        for r in range(L):
            for j in range(gn):
                f = _pow2_f64(-min(eb_col[j] - eb[kb, j], cl))
                for c in range(j * bn, j * bn + bn):
                    V[u, r, c] = mb[kb * L + r, c] * f
        u += 1
    return status


@njit(cache=True, nogil=True)
def _prepare_kernel(ma, ea, inv_a, emin_a, mb, eb, inv_b, emin_b, bm, L, bn, guard,
                    mmax_a, mmax_b, f32_min, maxc):
    """Grid analysis and operands of ``a (Mp, Kp) @ b (Kp, Np)`` (no invalid blocks).

    Returns ``(status, ea_row, eb_col, A, B, U, V, U64, V64, ch)``: the row maxima of
    ``a``'s exponents and the column maxima of ``b``'s (``e_ref`` of tile ``(i, j)``
    is their sum), ``A (Mp, Kp)``, ``B (Kp, Np)``
    float32 are ``A'``, ``B'`` on the safe K-blocks (zero elsewhere; empty if none is
    safe); ``U (nu, Mp, L)``, ``V (nu, L, Np)`` the unsafe K-blocks' operands
    ``ma * 2**(G - sa)``, ``mb * 2**-sb`` (shifts clamped as in fast_bfp_matmul), in
    float32 when the block products are exact there, else in ``U64``, ``V64`` (the
    unused pair is empty). ``status``: -1 invalid blocks (nothing computed), else as
    :func:`_prepare_fill` returns it (``ch`` the K-chunk boundaries)."""
    Mp, Kp = ma.shape
    Np = mb.shape[1]
    gm, nkb = ea.shape
    gn = eb.shape[1]
    z2 = np.empty((0, 0), np.float32)
    z32 = np.empty((0, 0, 0), np.float32)
    z64 = np.empty((0, 0, 0), np.float64)
    if inv_a.any() or inv_b.any():
        e = np.empty(0, np.int64)
        return -1, e, e, z2, z2, z32, z32, z64, z64, e
    ea_row = np.empty(gm, np.int64)
    eb_col = np.empty(gn, np.int64)
    nz_a, nz_b, safe, used, w, nu = _prepare_analyse(ma, ea, emin_a, mb, eb, emin_b, bm,
                                                     L, bn, guard, ea_row, eb_col)
    A, B = z2, z2
    ch = np.empty(nkb + 1, np.int64)
    if nu < nkb:
        A = np.empty((Mp, Kp), np.float32)
        B = np.empty((Kp, Np), np.float32)
    if L * mmax_a * mmax_b < (1 << 24):     # block products exact in float32
        U = np.empty((nu, Mp, L), np.float32)
        V = np.empty((nu, L, Np), np.float32)
        status = _prepare_fill(ma, ea, mb, eb, ea_row, eb_col, nz_a, nz_b, safe, used, w,
                               nu, bm, L, bn, guard, mmax_a, mmax_b, f32_min, maxc, ch,
                               A, B, U, V)
        return status, ea_row, eb_col, A, B, U, V, z64, z64, ch
    U64 = np.empty((nu, Mp, L), np.float64)
    V64 = np.empty((nu, L, Np), np.float64)
    status = _prepare_fill(ma, ea, mb, eb, ea_row, eb_col, nz_a, nz_b, safe, used, w, nu,
                           bm, L, bn, guard, mmax_a, mmax_b, f32_min, maxc, ch, A, B,
                           U64, V64)
    return status, ea_row, eb_col, A, B, z32, z32, U64, V64, ch


@njit(cache=True, nogil=True)
def _finish_kernel(acc, p, er, ec, guard, offset, M, N, bm, bn):
    """The result ``(M, N)`` as the golden model converts the accumulator:
    ``acc_int = sum_c acc[c] * 2**G + sum_u floor(p[u])`` (``acc (nc, M', N')`` the
    K-chunks' float32 or float64 GEMM results; exact in float64: integers below
    2**53), ``v = acc_int * 2**(e_ref - G + offset)`` with ``e_ref = er[i] + ec[j]``
    per tile (applied as two exact power-of-two multiplies), ``|v| < 2**-126`` -> +0,
    then rounded to float32. ``acc`` or ``p`` may be empty."""
    nu = p.shape[0]
    has_acc = acc.shape[0] > 0
    out = np.empty((M, N), np.float32)
    tiny = 2.0 ** -126
    if nu == 0 and not has_acc:
        out[:] = 0
        return out
    g = 2.0 ** guard
    fc = np.empty(N, np.float64)
    for j in range(N):
        fc[j] = _pow2_f64(ec[j // bn] + offset - guard)
    srow = np.empty(N, np.float64)
    for i in range(M):
        fr = _pow2_f64(er[i // bm])
        if has_acc:
            srow[:] = 0.0
            for c in range(acc.shape[0]):       # exact: see _chunks
                for j in range(N):
                    srow[j] += np.float64(acc[c, i, j])
            for j in range(N):
                srow[j] *= g
        else:
            srow[:] = 0.0
        for u in range(nu):
            for j in range(N):
                srow[j] += math.floor(np.float64(p[u, i, j]))
        for j in range(N):
            v = srow[j] * fc[j] * fr
            out[i, j] = np.float32(v if abs(v) >= tiny else 0.0)
    return out


# -- fused layer kernels ---------------------------------------------------------------
#
# One call per layer and direction for the HyperBlock training step (hbfp_hw.host.torch,
# _LayerPlan): the forward kernel quantizes X and W and prepares Y = Xq @ Wqᵀ; the
# backward kernel quantizes dY and prepares dX = dYq @ Wq and dW = dYqᵀ @ Xq. The
# transposes are views (no copies); every step is the very kernel above
# (_quantize_kernel, _prepare_kernel), so the bits are those of the separate calls.

#: a format's scalar parameters, in the int64 array the fused kernels take
#: (:func:`format_param_array`): emin, emax, frac_bits, mmax, man_bits, rounding code,
#: sr_bits, seed, sr_lanes
P_SEED = 7


def format_param_array(fmt) -> np.ndarray:
    """The int64 parameter array of ``fmt`` for the fused layer kernels (the seed at
    index :data:`P_SEED` may be overwritten per call)."""
    return np.array([fmt.emin, fmt.emax, fmt.frac_bits, fmt.mmax, fmt.man_bits,
                     ROUNDING_CODES[fmt.rounding], fmt.sr_bits, fmt.seed, fmt.sr_lanes],
                    np.int64)


@njit(cache=True, nogil=True, inline="always")
def _quantize_p(x, b0, b1, p, jump, man):
    return _quantize_kernel(x, b0, b1, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                            p[8], jump, man)


@njit(cache=True, nogil=True, inline="always")
def _prep_into(ma, ea, emin_a, mb, eb, emin_b, bm, L, bn, guard, mmax_a, mmax_b, f32_min,
               maxc, er, ec, ch, A, B, U, V):
    nz_a, nz_b, safe, used, w, nu = _prepare_analyse(ma, ea, emin_a, mb, eb, emin_b, bm, L,
                                                     bn, guard, er, ec)
    st = _prepare_fill(ma, ea, mb, eb, er, ec, nz_a, nz_b, safe, used, w, nu, bm, L, bn,
                       guard, mmax_a, mmax_b, f32_min, maxc, ch, A, B, U, V)
    return st, nu


@njit(cache=True, nogil=True)
def _layer_forward_kernel(x, w, xm, wm, px, pw, jx, jw, bm, L, bn, guard, f32_min, maxc,
                          er, ec, ch, A, B, U, V):
    """Quantize ``x`` (B, I) into ``xm`` (tiles ``bm × L``) and ``w`` (O, I) into ``wm``
    (tiles ``bn × L``), then prepare ``xm @ wmᵀ`` into the caller's buffers (``er``,
    ``ec``, ``A``, ``B``, ``U``, ``V`` as :func:`_prepare_kernel` returns them; ``U``,
    ``V`` with room for every K-block). Returns ``(ex, ew, status, nu)``; status -1 if
    a block holds NaN/Inf."""
    ex = _quantize_p(x, bm, L, px, jx, xm)
    ew = _quantize_p(w, bn, L, pw, jw, wm)
    if ex.size == 0 or ew.size == 0:
        return ex, ew, -1, 0
    st, nu = _prep_into(xm, ex, px[0], wm.T, ew.T, pw[0], bm, L, bn, guard, px[3], pw[3],
                        f32_min, maxc, er, ec, ch, A, B, U, V)
    return ex, ew, st, nu


@njit(cache=True, nogil=True)
def _layer_backward_kernel(dy, gm_, pg, jg, xm, ex, px, wm, ew, pw, gb, go, bi, guard,
                           f32_min, maxc, need_dx, need_dw, er1, ec1, ch1, A1, B1, U1, V1,
                           er2, ec2, ch2, A2, B2, U2, V2):
    """Quantize ``dy`` (B, O) into ``gm_`` (tiles ``gb × go``), then prepare
    ``dX = gm_ @ wm`` (``wm`` tiles ``go × bi``; buffers ``*1``) and
    ``dW = gm_ᵀ @ xm`` (``xm`` tiles ``gb × bi``; buffers ``*2``), each only if
    needed. Returns ``(ok, status_dx, nu_dx, status_dw, nu_dw)``; ``ok`` False if a
    block of ``dy`` holds NaN/Inf."""
    eg = _quantize_p(dy, gb, go, pg, jg, gm_)
    if eg.size == 0:
        return False, -1, 0, -1, 0
    s1, n1, s2, n2 = -1, 0, -1, 0
    if need_dx:
        s1, n1 = _prep_into(gm_, eg, pg[0], wm, ew, pw[0], gb, go, bi, guard, pg[3], pw[3],
                            f32_min, maxc, er1, ec1, ch1, A1, B1, U1, V1)
    if need_dw:
        s2, n2 = _prep_into(gm_.T, eg.T, pg[0], xm, ex, px[0], go, gb, bi, guard, pg[3],
                            px[3], f32_min, maxc, er2, ec2, ch2, A2, B2, U2, V2)
    return True, s1, n1, s2, n2


class GemmBuffers:
    """The prepared operands of one of a layer's GEMMs ``(Mp, Kp) @ (Kp, Np)``, reused
    every step (each is consumed by the ``mm`` and the conversion before the call that
    filled it returns): ``er``, ``ec``, ``ch`` (K-chunk boundaries), ``A``, ``B``,
    ``U``, ``V`` (NumPy, for the kernels) and the same memory as torch tensors ``At``,
    ``Bt``, ``Ut``, ``Vt``; ``acc`` ``(1, Mp, Np)`` the float32 GEMM's result (``acct``
    the torch view of ``acc[0]``)."""

    __slots__ = ("er", "ec", "ch", "A", "B", "U", "V", "At", "Bt", "Ut", "Vt", "nkb", "acc",
                 "acct")

    def __init__(self, Mp, Kp, Np, bm, L, bn, mmax_a, mmax_b):
        import torch
        self.nkb = Kp // L
        self.er = np.empty(Mp // bm, np.int64)
        self.ec = np.empty(Np // bn, np.int64)
        self.ch = np.empty(self.nkb + 1, np.int64)          # K-chunk boundaries
        self.A = np.empty((Mp, Kp), np.float32)
        self.B = np.empty((Kp, Np), np.float32)
        dt = np.float32 if L * mmax_a * mmax_b < (1 << 24) else np.float64
        self.U = np.empty((self.nkb, Mp, L), dt)
        self.V = np.empty((self.nkb, L, Np), dt)
        self.At, self.Bt = torch.from_numpy(self.A), torch.from_numpy(self.B)
        self.Ut, self.Vt = torch.from_numpy(self.U), torch.from_numpy(self.V)
        self.acc = np.empty((1, Mp, Np), np.float32)        # one float32 GEMM's result
        self.acct = torch.from_numpy(self.acc)[0]

    def args(self) -> tuple:
        return self.er, self.ec, self.ch, self.A, self.B, self.U, self.V


def layer_forward(x, w, xm, wm, px, pw, jx, jw, bm, L, bn, guard_bits: int,
                  f32_min: int, bufs: GemmBuffers, max_chunks: int = 1):
    """See :func:`_layer_forward_kernel` (``x``, ``w`` C-contiguous float32; ``xm``,
    ``wm`` the padded mantissa arrays to fill; ``jx``, ``jw`` the streams' jump tables,
    :func:`operand_jump`)."""
    return _layer_forward_kernel(x, w, xm, wm, px, pw, jx, jw, bm, L, bn, guard_bits,
                                 f32_min, max_chunks, *bufs.args())


def layer_backward(dy, gm_, pg, jg, xm, ex, px, wm, ew, pw, gb, go, bi, guard_bits: int,
                   f32_min: int, need_dx: bool, need_dw: bool, b1: GemmBuffers,
                   b2: GemmBuffers, max_chunks: int = 1):
    """See :func:`_layer_backward_kernel`."""
    return _layer_backward_kernel(dy, gm_, pg, jg, xm, ex, px, wm, ew, pw, gb, go, bi,
                                  guard_bits, f32_min, max_chunks, need_dx, need_dw,
                                  *b1.args(), *b2.args())


def operand_jump(fmt, mp: int, np_: int) -> np.ndarray:
    """The jump table of a padded ``mp × np_`` operand quantized with ``fmt`` (empty
    unless it rounds stochastically)."""
    return jump_table(mp * np_, fmt.sr_lanes) if fmt.rounding == "stochastic" else _NO_JUMP


def matmul_prepare(a, b, lay_a, lay_b, guard_bits: int, f32_min: int, max_chunks: int = 1):
    """Grid analysis and operands of the exact GEMM ``a @ b`` (BFPTensors):
    ``(status, er, ec, A, B, U, V, ch)``, see :func:`_prepare_kernel` (``U``, ``V`` the
    unsafe K-blocks' operands in float32 or float64), or ``None`` if an operand has
    invalid blocks."""
    pa, pb = _format_params(a.fmt), _format_params(b.fmt)
    c = np.ascontiguousarray
    status, er, ec, A, B, U, V, U64, V64, ch = _prepare_kernel(
        c(a.mantissas), c(a.exponents), c(a.invalid), pa[0], c(b.mantissas),
        c(b.exponents), c(b.invalid), pb[0], lay_a.block[0], lay_a.block[1],
        lay_b.block[1], guard_bits, pa[3], pb[3], f32_min, max_chunks)
    if status < 0:
        return None
    if U64.shape[0]:
        U, V = U64, V64
    return status, er, ec, A, B, U, V, ch


def matmul_finish(acc: np.ndarray, p: np.ndarray, er: np.ndarray, ec: np.ndarray,
                  guard_bits: int, offset: int, M: int, N: int, bm: int,
                  bn: int) -> np.ndarray:
    """``(M, N)`` float32 result: see :func:`_finish_kernel` (``acc`` 2-D: one chunk)."""
    if acc.ndim == 2:
        acc = acc.reshape(1 if acc.size else 0, *acc.shape)
    return _finish_kernel(acc, p, er, ec, guard_bits, offset, M, N, bm, bn)


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the kernels for the common
    signatures, so that the first training steps do not pay for it."""
    if not ENABLED:
        return
    from hbfp_hw.formats import HBFP4, HBFP8
    from hbfp_hw.quantize import BFPTensor, block_layout
    x = np.linspace(-1, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    e32 = np.empty((0, 16, 16), np.float32)
    e64 = np.empty((0, 16, 16), np.float64)
    for fmt in (HBFP8, HBFP8.replace(man_bits=12), HBFP4.replace(rounding="stochastic")):
        man, e = quantize_2d(x, fmt, 16, 16, 16, 16)
        t = BFPTensor(fmt, (16, 16), man, e, np.zeros(e.shape, bool))
        tt = t.T
        _, er, ec, A, B, U, V, _ = matmul_prepare(t, tt, block_layout((16, 16), fmt),
                                                 block_layout((16, 16), tt.fmt), 8, 0, 8)
    for acc in (np.zeros((1, 16, 16), np.float32), np.zeros((1, 16, 16))):
        for p in (e32, e64):
            matmul_finish(acc, p, er, ec, 8, 0, 16, 16, 16, 16)
    # the fused layer kernels (8-bit and narrower mantissas, the common case)
    for fmt in (HBFP8, HBFP4.replace(rounding="stochastic")):
        p = format_param_array(fmt)
        xm, wm, gm_ = (np.empty((16, 16), np.int8) for _ in range(3))
        j = operand_jump(fmt, 16, 16)
        bufs = GemmBuffers(16, 16, 16, 16, 16, 16, fmt.mmax, fmt.mmax)
        ex, ew, _, _ = layer_forward(x, x, xm, wm, p, p, j, j, 16, 16, 16, 8, 0, bufs, 8)
        layer_backward(x, gm_, p, j, xm, ex, p, wm, ew, p, 16, 16, 16, 8, 0, True, True,
                       bufs, bufs, 8)
    _warm_up_conv()


def _warm_up_conv() -> None:
    """The HyperBlock-convolution kernels (8-bit and narrower mantissas)."""
    from hbfp_hw.conv import ConvGeometry
    from hbfp_hw.formats import HBFP4, HBFP8
    x4 = np.linspace(-1, 1, 16 * 16 * 9, dtype=np.float32).reshape(16, 16, 3, 3)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1))
    for fmt in (HBFP8.replace(block_axes=(0, 1)),
                HBFP4.replace(block_axes=(0, 1), rounding="stochastic")):
        man, e, val, st, eref, _ = conv_quantize_4d(x4, fmt, 16, 16, 16, 16)
        for kind in ("fwd", "dx", "dw"):
            conv_check(kind, e, st, e, st, (3, 3), geo, 8)
        conv_split(man, e, eref, 16, 16, x4.shape)
    for y in (x4, x4.astype(np.float64)):
        conv_finish(y, 0)
        conv_finish(y, 0, x4[0, :, 0, 0].copy())


# -- the HyperBlock convolution --------------------------------------------------------
#
# hbfp_hw.conv's three convolutions sum floor(P * 2**G / 2**s) over (tap, channel block)
# pairs, s = (row max - Ea) + (column max - Eb). When no pair of non-zero blocks of an
# output block is shifted past the guard bits (s <= G), no floor cuts anything: the
# accumulator is the exact sum of the products of the dequantized operands, and the
# result is that sum rounded once to FP32. If, moreover, every partial sum of that
# output is an integer multiple of 2**g (g = the smallest Ea + Eb of a live pair) below
# 2**(24 + g), a float32 convolution of the operands scaled by exact powers of two
# computes it exactly (in any summation order). :func:`conv_quantize_4d` quantizes a
# 4-D operand and returns those scaled operands with per-block L1 statistics;
# :func:`conv_check` tests both conditions per output block on the block grid.

#: status of :func:`conv_check`: a float32 convolution is exact / (weight gradient)
#: one float32 convolution per sample block is, their float64 sum too / two float32
#: convolutions are, one per half of the first operand's mantissas (:func:`conv_split`)
#: / a float64 one is / some live block pair is shifted past the guard bits (the
#: golden model's per-pair floor is needed)
CONV_F32, CONV_CHUNKS, CONV_SPLIT, CONV_F64, CONV_TRUNC = 0, 1, 2, 3, 4

#: live blocks of a conv operand span at most this many binades below its largest
#: exponent on the fast path (the scaled operands and their products stay normal floats)
CONV_MAX_RANGE = 60

#: :data:`CONV_SPLIT` cuts a mantissa ``m`` into ``16 * floor(m / 16)`` and the low
#: nibble ``m mod 16`` (0-15): for man_bits <= 8 both halves' magnitudes, in units of
#: their own granularity (16 and 1), are at most 15
SPLIT_MAX = 15


@njit(cache=True, nogil=True)
def _conv_quantize_kernel(x, b0, b1, emin, emax, frac_bits, mmax, man_bits, rnd, sr_bits,
                          seed, lanes, jump, man, val, stats, max_range, scratch, pos):
    """Quantize the 4-D float32 ``x`` (A, B, H, W), blocked ``b0 x b1`` over axes 0 and 1
    at every (h, w), exactly as :func:`_quantize_kernel` quantizes the 2-D matrix that
    lists the blocks in stream order (grid (A/b0, B/b1, H, W) row-major, elements row-major
    in a block). Writes the padded mantissas ``man`` (Ap, Bp, H, W), per block
    ``stats[.., 0]`` = max |m|, ``[.., 1]`` = the largest sum of |m| along axis 1 (over a
    row of the block), ``[.., 2]`` the largest along axis 0, and ``val`` (A, B, H, W) =
    ``m * 2**(E - Eref)`` (float32, exact; ``Eref`` = the largest exponent of a non-zero
    block). Returns ``(exponents, Eref, ok)``: empty exponents if a block holds NaN/Inf;
    ``ok`` False when a non-zero block lies more than ``max_range`` binades below Eref."""
    A, B, H, W = x.shape
    Ap, Bp = man.shape[0], man.shape[1]
    g0, g1 = Ap // b0, Bp // b1
    HW = H * W
    xf = x.reshape(A, B, HW)
    xb = xf.view(np.int32)
    mf = man.reshape(Ap, Bp, HW)
    vf = val.reshape(A, B, HW)
    bmax = np.zeros((g0, g1, HW), np.int32)
    for a in range(A):
        i = a // b0
        for b in range(B):
            j = b // b1
            for k in range(HW):
                bmax[i, j, k] = max(bmax[i, j, k], xb[a, b, k] & _ABS)
    exps = np.empty((g0, g1, H, W), np.int16)
    ef = exps.reshape(g0, g1, HW)
    f1 = np.empty((g0, g1, HW), np.float32)
    f2 = np.empty((g0, g1, HW), np.float32)
    for i in range(g0):
        for j in range(g1):
            for k in range(HW):
                a_ = bmax[i, j, k]
                if a_ >= _INF:
                    return np.empty((0, 0, 0, 0), np.int16), 0, False
                field = a_ >> 23
                e = emin if field == 0 else field - 127
                e = min(max(e, emin), emax)
                ef[i, j, k] = e
                kk = frac_bits - max(e, -150)
                k1 = min(max(kk, -126), 126)
                f1[i, j, k] = _pow2_f32(k1)
                f2[i, j, k] = _pow2_f32(kk - k1)
    # with emin < -126 (exp_bits >= 8) a block is non-zero exactly when it holds a normal
    # float (its largest element then quantizes to a mantissa >= 1): Eref is known now and
    # ``val`` is written with the mantissas; otherwise it takes a pass of its own
    lo = -(1 << 14)
    fused = emin < -126
    eref = lo
    ok = True
    pv = np.empty((g0, g1, HW), np.float32)
    if fused:
        for i in range(g0):
            for j in range(g1):
                for k in range(HW):
                    if bmax[i, j, k] >= _MIN_NORMAL:
                        eref = max(eref, np.int64(ef[i, j, k]))
        if eref == lo:
            eref = 0
        for i in range(g0):
            for j in range(g1):
                for k in range(HW):
                    d = np.int64(ef[i, j, k]) - eref
                    if bmax[i, j, k] >= _MIN_NORMAL and d < -max_range:
                        ok = False
                    pv[i, j, k] = _pow2_f32(max(d, -126))
    # one lane (``chains``): the stream is one xorshift chain, listing the blocks of grid
    # row i as (j, k, element) with the elements row-major in a block, so block (i, j, k)
    # is the chain's segment ``b0 b1`` long starting at ((i g1 + j) HW + k) b0 b1. The
    # segments of one grid row are run side by side, one chain state per (j, k): block
    # (i, j, k)'s element (ia, ib) is its chain's next number when the loops below reach
    # it. The chains start one segment apart (``jump`` = the columns of A**(b0 b1)).
    chains = rnd == 3 and lanes == 1
    S = np.empty(g1 * HW if chains else 0, np.uint32)
    s_next = _lane_state(seed, 0)
    shift32 = np.uint32(32 - sr_bits)
    if rnd == 3 and not chains:
        # the stream written straight into the layout of ``man`` (rows padded by 16: no
        # cache-set conflicts): number n goes to ``pos[n]`` (:func:`conv_stream_pos`)
        u2 = scratch[: Ap * Bp * (HW + 16)].reshape(Ap, Bp, HW + 16)
        if jump.size:
            _random_stream_scatter(seed, lanes, Ap * Bp * HW, sr_bits, jump, pos,
                                   scratch)
        else:
            u = _random_stream(seed, lanes, Ap * Bp * HW, sr_bits)
            for n in range(Ap * Bp * HW):
                scratch[pos[n]] = u[n]
    else:
        u2 = np.zeros((0, 0, 0), np.int32)
    mmf = np.float32(mmax)
    cap = 2.0 ** man_bits
    up = 2.0 ** sr_bits
    half = np.float32(0.5)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    st = stats.reshape(3, g0, g1, HW)
    st[:] = 0
    rowacc = np.zeros((g1, HW), np.int32)
    colacc = np.zeros((Bp, HW), np.int32)
    qr = np.empty(HW, np.int32)
    ur = np.empty(HW, np.int32)
    narrow = man_bits + sr_bits <= 30
    cap32 = np.float32(cap)
    up32 = np.float32(up)
    mmax32 = np.int32(mmax)
    for a in range(Ap):
        i = a // b0
        ia = a - i * b0
        if chains and ia == 0:
            t = s_next
            for c in range(g1 * HW):
                S[c] = np.uint32(t)
                t = _jump(jump, t)
            s_next = t
        for j in range(g1):
            for k in range(HW):
                rowacc[j, k] = 0
        if ia == 0:
            for b in range(Bp):
                for k in range(HW):
                    colacc[b, k] = 0
        for b in range(Bp):
            j = b // b1
            if a >= A or b >= B:
                for k in range(HW):
                    mf[a, b, k] = 0
                if chains and a < A:        # a padding column: its numbers are skipped
                    Sj = S[j * HW: j * HW + HW]
                    for k in range(HW):
                        Sj[k] = _xs32(Sj[k])
                continue
            # the rounding mode is tested outside the element loops (branch-free loops);
            # subnormal inputs flush to +0
            if rnd == 0:
                for k in range(HW):
                    xv = xf[a, b, k] if (xb[a, b, k] & _ABS) >= _MIN_NORMAL else zero
                    qr[k] = np.int32(min(max(np.rint(xv * f1[i, j, k] * f2[i, j, k]), -mmf),
                                         mmf))
            elif rnd == 1:
                for k in range(HW):
                    xv = xf[a, b, k] if (xb[a, b, k] & _ABS) >= _MIN_NORMAL else zero
                    qr[k] = np.int32(min(max(np.trunc(xv * f1[i, j, k] * f2[i, j, k]), -mmf),
                                         mmf))
            elif rnd == 2:
                for k in range(HW):
                    xv = xf[a, b, k] if (xb[a, b, k] & _ABS) >= _MIN_NORMAL else zero
                    y = xv * f1[i, j, k] * f2[i, j, k]
                    t = np.trunc(y)
                    r = t + ((-one if y < zero else one) if np.abs(y - t) >= half else zero)
                    qr[k] = np.int32(min(max(r, -mmf), mmf))
            else:
                if chains:
                    # (through a slice: indexed as S[j HW + k] the loop does not vectorise)
                    Sj = S[j * HW: j * HW + HW]
                    for k in range(HW):
                        x = _xs32(Sj[k])
                        Sj[k] = x
                        ur[k] = np.int32(x >> shift32)
                else:
                    for k in range(HW):
                        ur[k] = u2[a, b, k]
                if narrow:
                    # |y| 2**r < 2**31 is exact in float32 (a power-of-two multiple of a
                    # float32): the same floor as the float64 one, in 32-bit lanes
                    for k in range(HW):
                        xv = xf[a, b, k] if (xb[a, b, k] & _ABS) >= _MIN_NORMAL else zero
                        y = xv * f1[i, j, k] * f2[i, j, k]
                        mag = min(np.abs(y), cap32)
                        qm = min((np.int32(mag * up32) + ur[k]) >> sr_bits, mmax32)
                        qr[k] = -qm if y < zero else qm
                else:
                    for k in range(HW):
                        xv = xf[a, b, k] if (xb[a, b, k] & _ABS) >= _MIN_NORMAL else zero
                        y = xv * f1[i, j, k] * f2[i, j, k]
                        mag = min(np.float64(np.abs(y)), cap)
                        qm = min((np.int64(math.floor(mag * up)) + ur[k]) >> sr_bits, mmax)
                        qr[k] = np.int32(-qm if np.signbit(y) else qm)
            if fused:
                for k in range(HW):
                    vf[a, b, k] = np.float32(qr[k]) * pv[i, j, k]
            for k in range(HW):
                q = qr[k]
                mf[a, b, k] = q
                aq = abs(q)
                st[0, i, j, k] = max(st[0, i, j, k], aq)
                rowacc[j, k] += aq
                colacc[b, k] += aq
        for j in range(g1):
            for k in range(HW):
                st[1, i, j, k] = max(st[1, i, j, k], rowacc[j, k])
        if ia == b0 - 1 or a == Ap - 1:
            for b in range(Bp):
                j = b // b1
                for k in range(HW):
                    st[2, i, j, k] = max(st[2, i, j, k], colacc[b, k])
    if fused:
        return exps, eref, ok
    for i in range(g0):
        for j in range(g1):
            for k in range(HW):
                if st[0, i, j, k] > 0:
                    eref = max(eref, np.int64(ef[i, j, k]))
    if eref == lo:
        eref = 0
    for i in range(g0):
        for j in range(g1):
            for k in range(HW):
                if st[0, i, j, k] > 0 and ef[i, j, k] < eref - max_range:
                    ok = False
    if not ok:
        return exps, eref, False
    for a in range(A):
        i = a // b0
        for b in range(B):
            j = b // b1
            for k in range(HW):
                vf[a, b, k] = np.float32(mf[a, b, k]) * _pow2_f32(
                    max(np.int64(ef[i, j, k]) - eref, -126))
    return exps, eref, True


#: per-thread work buffers and parameter arrays of the conv quantizer (both are
#: written by every call)
_local = threading.local()
_NO_SCRATCH = np.zeros(0, np.int32)


def _thread_dict(name: str) -> dict:
    d = getattr(_local, name, None)
    if d is None:
        d = {}
        setattr(_local, name, d)
    return d


def _scratch(n: int) -> np.ndarray:
    """A reused int32 work buffer of ``n`` elements, one per thread (the random streams
    of the conv quantizer: fresh large buffers cost page faults on every call)."""
    scratches = _thread_dict("scratch")
    b = scratches.get(n)
    if b is None:
        if len(scratches) > 16:
            scratches.clear()
        b = scratches[n] = np.empty(n, np.int32)
    return b


@njit(cache=True, nogil=True)
def _stream_pos(ap, bp, hw, b0, b1, pos):
    g0, g1 = ap // b0, bp // b1
    n = 0
    for i in range(g0):
        for j in range(g1):
            for k in range(hw):
                for ia in range(b0):
                    for ib in range(b1):
                        pos[n] = ((i * b0 + ia) * bp + j * b1 + ib) * (hw + 16) + k
                        n += 1


_positions: dict = {}


def conv_stream_pos(ap: int, bp: int, hw: int, b0: int, b1: int) -> np.ndarray:
    """Where the stochastic-rounding stream's numbers go in the conv quantizer's
    ``(ap, bp, hw + 16)`` layout: the stream lists the blocks row-major over the grid
    ``(ap/b0, bp/b1, hw)``, the elements row-major in a block (cached per shape)."""
    key = (ap, bp, hw, b0, b1)
    pos = _positions.get(key)
    if pos is None:
        if len(_positions) > 64:
            _positions.clear()
        pos = _positions[key] = np.empty(ap * bp * hw, np.int32)
        _stream_pos(ap, bp, hw, b0, b1, pos)
    return pos


@njit(cache=True, nogil=True)
def _conv_quantize_p(x, p, jump, man, val, stats, scratch, pos):
    """:func:`_conv_quantize_kernel` with its scalars packed in ``p`` (one array
    argument: the call's dispatch cost grows with the number of arguments)."""
    return _conv_quantize_kernel(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8],
                                 p[9], p[10], jump, man, val, stats, p[11], scratch, pos)


def conv_quantize_4d(x: np.ndarray, fmt, b0: int, b1: int, ap: int, bp: int):
    """Quantize a C-contiguous float32 4-D conv operand with ``fmt`` (blocks ``b0 x b1``
    over axes 0 and 1, padded to ``(ap, bp)``), bit for bit as the golden model.

    Returns None if a block holds NaN/Inf (the caller asks the golden model), else
    ``(mantissas, exponents, val, stats, eref, ok)`` (:func:`_conv_quantize_kernel`)."""
    key = (fmt.man_bits, fmt.exp_bits, fmt.rounding, fmt.sr_bits, fmt.sr_lanes, b0, b1)
    qparams = _thread_dict("qparams")
    p = qparams.get(key)
    if p is None:
        if len(qparams) > 256:
            qparams.clear()
        emin, emax, frac_bits, mmax, man_bits, rnd, dt = _format_params(fmt)
        p = qparams[key] = (np.array([b0, b1, emin, emax, frac_bits, mmax, man_bits, rnd,
                                       fmt.sr_bits, 0, fmt.sr_lanes, CONV_MAX_RANGE],
                                      np.int64), dt, rnd)
    p, dt, rnd = p
    p[9] = fmt.seed
    A, B, H, W = x.shape
    man = np.empty((ap, bp, H, W), dt)
    val = np.empty((A, B, H, W), np.float32)
    stats = np.empty((3, ap // b0, bp // b1, H, W), np.int32)
    if rnd == 3 and fmt.sr_lanes == 1:        # the kernel's chains, one block apart
        jump, pos, scratch = step_cols(b0 * b1), _NO_JUMP, _NO_SCRATCH
    elif rnd == 3:
        jump = jump_table(ap * bp * H * W, fmt.sr_lanes)
        scratch = _scratch(ap * bp * (H * W + 16))
        pos = conv_stream_pos(ap, bp, H * W, b0, b1)
    else:
        jump = pos = _NO_JUMP
        scratch = _NO_SCRATCH
    exps, eref, ok = _conv_quantize_p(x, p, jump, man, val, stats, scratch, pos)
    if exps.size == 0 and man.size:
        return None
    return man, exps, val, stats, int(eref), bool(ok)


@njit(cache=True, nogil=True, inline="always")
def _pair_term(e, r, t, lim):
    """``t * 2**(e - r)`` (e <= r) in float64; 0 below ``2**-1000``."""
    d = e - r
    return t * _POW2_F64[d + 1022] if d >= -1000 else 0.0


@njit(cache=True, nogil=True, inline="always")
def _path_mask(s_, s2, lim, chunks_ok):
    """The exact paths one output block allows, as bits: 1 float32 (``s_`` within
    ``lim``), 2 float32 per sample block (``chunks_ok``, weight gradient only), 4 the
    float32 halves (``s2`` within ``lim``), 8 float64 (always, once nothing truncates)."""
    eps = 1.0 + 2.0**-40
    return ((1 if s_ * eps <= lim else 0) | (2 if chunks_ok else 0)
            | (4 if s2 * eps <= lim else 0) | 8)


@njit(cache=True, nogil=True, inline="always")
def _cheapest_path(valid):
    """The cheapest path every output block allows (``valid``: the AND of their
    :func:`_path_mask`): 0 float32, 1 per sample block, 2 halves, 3 float64. (A path
    one block needs may not be exact for another: the halves' bound is not implied by
    the float32 one, so the paths are intersected, not their codes maximised.)"""
    if valid & 1:
        return 0
    if valid & 2:
        return 1
    if valid & 4:
        return 2
    return 3


@njit(cache=True, nogil=True)
def _conv_fwd_check(xe, xs, we, ws, Ho, Wo, sh, sw, ph, pw, dh, dw, G, split_max):
    """:func:`conv_check` for the forward convolution: output blocks (n-block, p, q,
    o-block) over (tap, channel block) pairs."""
    gn, gc, H, W = xe.shape
    go, _, KH, KW = we.shape
    lo = -(1 << 14)
    col = np.full(go, lo, np.int64)
    for ob in range(go):
        for cb in range(gc):
            for i in range(KH):
                for j in range(KW):
                    if ws[0, ob, cb, i, j] > 0:
                        col[ob] = max(col[ob], np.int64(we[ob, cb, i, j]))
    valid = 15
    for nb in range(gn):
        for p in range(Ho):
            for q in range(Wo):
                row = lo
                for cb in range(gc):
                    for i in range(KH):
                        h = p * sh + i * dh - ph
                        if h < 0 or h >= H:
                            continue
                        for j in range(KW):
                            w = q * sw + j * dw - pw
                            if 0 <= w < W and xs[0, nb, cb, h, w] > 0:
                                row = max(row, np.int64(xe[nb, cb, h, w]))
                if row == lo:
                    continue
                for ob in range(go):
                    if col[ob] == lo:
                        continue
                    r = row + col[ob]
                    gmin = r + 1
                    s_ = 0.0
                    s2 = 0.0
                    for cb in range(gc):
                        for i in range(KH):
                            h = p * sh + i * dh - ph
                            if h < 0 or h >= H:
                                continue
                            for j in range(KW):
                                w = q * sw + j * dw - pw
                                if w < 0 or w >= W or xs[0, nb, cb, h, w] == 0 or \
                                        ws[0, ob, cb, i, j] == 0:
                                    continue
                                e = np.int64(xe[nb, cb, h, w]) + np.int64(we[ob, cb, i, j])
                                gmin = min(gmin, e)
                                t = min(np.int64(xs[1, nb, cb, h, w]) * ws[0, ob, cb, i, j],
                                        np.int64(xs[0, nb, cb, h, w]) * ws[1, ob, cb, i, j])
                                s_ += _pair_term(e, r, np.float64(t), 0)
                                s2 += _pair_term(e, r, np.float64(
                                    split_max * np.int64(ws[1, ob, cb, i, j])), 0)
                    if gmin > r:
                        continue
                    if r - gmin > G:
                        return 4
                    valid &= _path_mask(s_, s2, 2.0 ** (24 - (r - gmin)), False)
    return _cheapest_path(valid)


@njit(cache=True, nogil=True)
def _conv_dx_check(ge, gs, we, ws, H, W, sh, sw, ph, pw, dh, dw, G, split_max):
    """:func:`conv_check` for the input gradient: output blocks (n-block, c-block, h, w)
    over (tap, output-channel block) pairs; tap (i, j) of input position h reads output
    position p = (h + ph - i dh) / sh when that is an integer in range."""
    gn, go, Ho, Wo = ge.shape
    _, gc, KH, KW = we.shape
    lo = -(1 << 14)
    col = np.full(gc, lo, np.int64)
    for ob in range(go):
        for cb in range(gc):
            for i in range(KH):
                for j in range(KW):
                    if ws[0, ob, cb, i, j] > 0:
                        col[cb] = max(col[cb], np.int64(we[ob, cb, i, j]))
    valid = 15
    for nb in range(gn):
        for h in range(H):
            for w in range(W):
                row = lo
                for i in range(KH):
                    pn = h + ph - i * dh
                    if pn < 0 or pn % sh != 0 or pn // sh >= Ho:
                        continue
                    p = pn // sh
                    for j in range(KW):
                        qn = w + pw - j * dw
                        if qn < 0 or qn % sw != 0 or qn // sw >= Wo:
                            continue
                        q = qn // sw
                        for ob in range(go):
                            if gs[0, nb, ob, p, q] > 0:
                                row = max(row, np.int64(ge[nb, ob, p, q]))
                if row == lo:
                    continue
                for cb in range(gc):
                    if col[cb] == lo:
                        continue
                    r = row + col[cb]
                    gmin = r + 1
                    s_ = 0.0
                    s2 = 0.0
                    for i in range(KH):
                        pn = h + ph - i * dh
                        if pn < 0 or pn % sh != 0 or pn // sh >= Ho:
                            continue
                        p = pn // sh
                        for j in range(KW):
                            qn = w + pw - j * dw
                            if qn < 0 or qn % sw != 0 or qn // sw >= Wo:
                                continue
                            q = qn // sw
                            for ob in range(go):
                                if gs[0, nb, ob, p, q] == 0 or ws[0, ob, cb, i, j] == 0:
                                    continue
                                e = np.int64(ge[nb, ob, p, q]) + np.int64(we[ob, cb, i, j])
                                gmin = min(gmin, e)
                                t = min(np.int64(gs[1, nb, ob, p, q]) * ws[0, ob, cb, i, j],
                                        np.int64(gs[0, nb, ob, p, q]) * ws[2, ob, cb, i, j])
                                s_ += _pair_term(e, r, np.float64(t), 0)
                                s2 += _pair_term(e, r, np.float64(
                                    split_max * np.int64(ws[2, ob, cb, i, j])), 0)
                    if gmin > r:
                        continue
                    if r - gmin > G:
                        return 4
                    valid &= _path_mask(s_, s2, 2.0 ** (24 - (r - gmin)), False)
    return _cheapest_path(valid)


@njit(cache=True, nogil=True)
def _conv_dw_check(ge, gs, xe, xs, KH, KW, sh, sw, ph, pw, dh, dw, G, split_max):
    """:func:`conv_check` for the weight gradient: output blocks (o-block, c-block, i, j)
    over the K-blocks (n-block, p, q)."""
    gn, go, Ho, Wo = ge.shape
    _, gc, H, W = xe.shape
    lo = -(1 << 14)
    row = np.full(go, lo, np.int64)
    for nb in range(gn):
        for ob in range(go):
            for p in range(Ho):
                for q in range(Wo):
                    if gs[0, nb, ob, p, q] > 0:
                        row[ob] = max(row[ob], np.int64(ge[nb, ob, p, q]))
    snb = np.zeros(gn, np.float64)
    gnb = np.zeros(gn, np.int64)
    valid = 15
    for cb in range(gc):
        for i in range(KH):
            for j in range(KW):
                col = lo
                for nb in range(gn):
                    for p in range(Ho):
                        h = p * sh + i * dh - ph
                        if h < 0 or h >= H:
                            continue
                        for q in range(Wo):
                            w = q * sw + j * dw - pw
                            if 0 <= w < W and xs[0, nb, cb, h, w] > 0:
                                col = max(col, np.int64(xe[nb, cb, h, w]))
                if col == lo:
                    continue
                for ob in range(go):
                    if row[ob] == lo:
                        continue
                    r = row[ob] + col
                    gmin = r + 1
                    s_ = 0.0
                    s2 = 0.0
                    for nb in range(gn):
                        snb[nb] = 0.0
                        gnb[nb] = r + 1
                    for nb in range(gn):
                        for p in range(Ho):
                            h = p * sh + i * dh - ph
                            if h < 0 or h >= H:
                                continue
                            for q in range(Wo):
                                w = q * sw + j * dw - pw
                                if w < 0 or w >= W or xs[0, nb, cb, h, w] == 0 or \
                                        gs[0, nb, ob, p, q] == 0:
                                    continue
                                e = np.int64(ge[nb, ob, p, q]) + np.int64(xe[nb, cb, h, w])
                                gmin = min(gmin, e)
                                t = min(np.int64(gs[2, nb, ob, p, q]) * xs[0, nb, cb, h, w],
                                        np.int64(gs[0, nb, ob, p, q]) * xs[2, nb, cb, h, w])
                                v = _pair_term(e, r, np.float64(t), 0)
                                s_ += v
                                snb[nb] += v
                                gnb[nb] = min(gnb[nb], e)
                                s2 += _pair_term(e, r, np.float64(
                                    split_max * np.int64(xs[2, nb, cb, h, w])), 0)
                    if gmin > r:
                        continue
                    if r - gmin > G:
                        return 4
                    # per sample block (its own sum and smallest unit; the whole sum
                    # within its bound implies every share within its own)
                    ch = True
                    for nb in range(gn):
                        if gnb[nb] <= r and snb[nb] * (1.0 + 2.0**-40) > 2.0 ** (
                                24 - (r - gnb[nb])):
                            ch = False
                    valid &= _path_mask(s_, s2, 2.0 ** (24 - (r - gmin)), ch)
    return _cheapest_path(valid)


@njit(cache=True, nogil=True, inline="always")
def _live_range(e, s0):
    """The smallest and largest exponent and the largest ``|m|`` of the non-zero blocks
    (``s0`` > 0) of one operand (flattened grids); ``(0, -1, 0)`` if none is."""
    lo, hi, mx = np.int64(1 << 30), np.int64(-(1 << 30)), np.int64(0)
    for n in range(e.size):
        if s0[n] > 0:
            lo = min(lo, np.int64(e[n]))
            hi = max(hi, np.int64(e[n]))
            mx = max(mx, np.int64(s0[n]))
    return (lo, hi, mx) if mx > 0 else (np.int64(0), np.int64(-1), np.int64(0))


@njit(cache=True, nogil=True)
def _conv_global_f32(ea, sa, eb, sb, n_terms, G):
    """A whole-tensor sufficient condition for :data:`CONV_F32` (checked first, in
    O(blocks)): with ``D`` the exponent spread of ``a``'s plus ``b``'s non-zero blocks,
    every output block has ``r - gmin <= D`` (so ``D <= G``: nothing truncates) and a
    sum of ``|a'| |b'|`` of at most ``n_terms`` (the padded reduction length) times the
    largest ``|m|`` of each, in units of ``2**r``: within ``2**(24 - D)`` it is within
    every output block's own float32 bound. ``n_terms < 0``: unknown, not checked."""
    if n_terms < 0:
        return False
    alo, ahi, ma = _live_range(ea.ravel(), sa[0].ravel())
    blo, bhi, mb = _live_range(eb.ravel(), sb[0].ravel())
    if ma == 0 or mb == 0:
        return False                    # (the per-block check handles empty operands)
    d = (ahi - alo) + (bhi - blo)
    return d <= G and d <= 24 and np.float64(n_terms) * np.float64(ma) * np.float64(mb) * (
        1.0 + 2.0**-40) <= 2.0 ** (24 - d)


@njit(cache=True, nogil=True)
def _conv_check_p(kind, ea, sa, eb, sb, p):
    """The check of ``kind`` (0 fwd, 1 dx, 2 dw) with its scalars packed in ``p``."""
    if _conv_global_f32(ea, sa, eb, sb, p[10], p[8]):
        return 0
    if kind == 0:
        return _conv_fwd_check(ea, sa, eb, sb, p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                               p[7], p[8], p[9])
    if kind == 1:
        return _conv_dx_check(ea, sa, eb, sb, p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                              p[7], p[8], p[9])
    return _conv_dw_check(ea, sa, eb, sb, p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                          p[7], p[8], p[9])


_KINDS = {"fwd": 0, "dx": 1, "dw": 2}
_cparams: dict = {}


def conv_check(kind: str, ea, sa, eb, sb, size, geometry, guard_bits: int,
               n_terms: int = -1) -> int:
    """Which exact path a HyperBlock convolution can take, from the exponents and
    :func:`conv_quantize_4d` statistics of its two operands: :data:`CONV_F32` (no live
    block pair shifted past the guard bits, and every output's sum of
    ``|a'| |b'|`` bounded — per (tap, block) pair by the smaller of (largest row L1
    of one block) x (largest element of the other) and the converse — by ``2**24``
    times its smallest live pair's unit: a float32 convolution is exact),
    :data:`CONV_CHUNKS` (weight gradient: the same bound holds for each sample block's
    share of the sum), :data:`CONV_SPLIT` (it holds for each half of ``a``'s mantissas
    (:func:`conv_split`), whose magnitudes are at most :data:`SPLIT_MAX`),
    :data:`CONV_F64` (no truncation; the float64 convolution is exact, the accumulator
    width check bounds it) or :data:`CONV_TRUNC` (the golden model's floor is needed).
    The cheapest path every output block allows. ``n_terms`` (the padded reduction
    length of an output, when known) enables a whole-tensor float32 test first
    (:func:`_conv_global_f32`).

    ``kind``: "fwd" (``a`` = X, ``b`` = W, ``size`` = output (H', W')), "dx" (``a`` = dY,
    ``b`` = W, ``size`` = input (H, W)) or "dw" (``a`` = dY, ``b`` = X, ``size`` = kernel
    (kh, kw))."""
    key = (kind, size, geometry, guard_bits, n_terms)
    p = _cparams.get(key)
    if p is None:
        if len(_cparams) > 1024:
            _cparams.clear()
        (sh, sw), (ph, pw), (dh, dw) = geometry.stride, geometry.padding, geometry.dilation
        p = _cparams[key] = np.array([int(size[0]), int(size[1]), sh, sw, ph, pw, dh, dw,
                                      int(guard_bits), SPLIT_MAX, int(n_terms)], np.int64)
    return int(_conv_check_p(_KINDS[kind], ea, sa, eb, sb, p))


@njit(cache=True, nogil=True)
def _conv_finish_kernel(y, p, bias, out):
    """``out = y * p`` rounded to float32 as the golden model converts (exact inputs:
    flush below ``2**-126``, nearest even, overflow to +-Inf, -0 to +0), then plus
    ``bias[channel]`` (float32, axis 1 of the 4-D ``out``) if ``bias`` is not empty."""
    n0, n1 = out.shape[0], out.shape[1]
    hw = out.shape[2] * out.shape[3]
    yf = y.reshape(n0, n1, hw)
    of = out.reshape(n0, n1, hw)
    tiny = 2.0 ** -126
    nb = bias.size > 0
    for a in range(n0):
        for b in range(n1):
            c = bias[b] if nb else np.float32(0.0)
            for k in range(hw):
                v = np.float64(yf[a, b, k]) * p
                r = np.float32(v) if abs(v) >= tiny else np.float32(0.0)
                of[a, b, k] = r + c if nb else r


_NO_BIAS = np.zeros(0, np.float32)


def conv_finish(y: np.ndarray, scale_exp: int, bias: np.ndarray | None = None) -> np.ndarray:
    """The FP32 result of an exact 4-D convolution sum ``y`` (float32 or float64,
    C-contiguous) in units of ``2**scale_exp``, plus the FP32 ``bias`` per channel (axis
    1) when given (the same float32 addition as adding it afterwards)."""
    out = np.empty(y.shape, np.float32)
    _conv_finish_kernel(y, math.ldexp(1.0, int(scale_exp)),
                        _NO_BIAS if bias is None else bias, out)
    return out


@njit(cache=True, nogil=True)
def _conv_split_kernel(man, exps, eref, b0, b1, hi, lo):
    A, B, H, W = hi.shape
    HW = H * W
    mf = man.reshape(man.shape[0], man.shape[1], HW)
    ef = exps.reshape(exps.shape[0], exps.shape[1], HW)
    hf = hi.reshape(A, B, HW)
    lf = lo.reshape(A, B, HW)
    for a in range(A):
        i = a // b0
        for b in range(B):
            j = b // b1
            for k in range(HW):
                m = np.int32(mf[a, b, k])
                mh = (m >> 4) << 4
                p = _pow2_f32(max(np.int64(ef[i, j, k]) - eref, -126))
                hf[a, b, k] = np.float32(mh) * p
                lf[a, b, k] = np.float32(m - mh) * p


def conv_split(man: np.ndarray, exps: np.ndarray, eref: int, b0: int, b1: int, shape):
    """The two halves of :data:`CONV_SPLIT`: ``16 * floor(m / 16) * 2**(E - eref)`` and
    ``(m mod 16) * 2**(E - eref)`` (float32, exact, unpadded ``shape``)."""
    hi = np.empty(shape, np.float32)
    lo = np.empty(shape, np.float32)
    _conv_split_kernel(man, exps, eref, b0, b1, hi, lo)
    return hi, lo
