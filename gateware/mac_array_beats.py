"""Host side of the MAC array's streams: operand beats of a GEMM and output reassembly.

:func:`gemm_beats` turns two stored BFP operands into the beat sequences of
:class:`~hbfp_hw.gateware.mac_array.MacArray`'s ``a`` and ``b`` streams (one job per
output tile), :func:`assemble_output` the output beats back into the result matrix;
:func:`pack_struct` / :func:`unpack_struct` convert between field values and the
integers of a ``data.StructLayout``. Testbenches (Amaranth and cocotb) use them.
"""

from __future__ import annotations

import numpy as np
from amaranth.lib import data

from ..config.mac_array import MacArrayConfig
from ..quantize import BFPTensor

__all__ = ["pack_struct", "unpack_struct", "gemm_beats", "output_beats_per_job",
           "assemble_output"]


def pack_struct(layout: data.StructLayout, **fields) -> int:
    """Pack named field values (ints, or lists for array fields) into an integer."""
    v = 0
    for name, fld in layout:
        val = fields.get(name, 0)
        shape = fld.shape
        if isinstance(shape, data.ArrayLayout) and not isinstance(val, int):
            ew = shape.size // shape.length
            word = 0
            for i, x in enumerate(val):
                word |= (int(x) & ((1 << ew) - 1)) << (i * ew)
            val = word
        v |= (int(val) & ((1 << fld.width) - 1)) << fld.offset
    return v


def unpack_struct(layout: data.StructLayout, value: int) -> dict:
    out = {}
    for name, fld in layout:
        raw = (value >> fld.offset) & ((1 << fld.width) - 1)
        if isinstance(fld.shape, data.ArrayLayout):
            ew = fld.shape.size // fld.shape.length
            raw = [(raw >> (i * ew)) & ((1 << ew) - 1) for i in range(fld.shape.length)]
        out[name] = raw
    return out


def _tile(t: BFPTensor, T: int, i: int, j: int) -> tuple[np.ndarray, int]:
    return (t.mantissas[i * T:(i + 1) * T, j * T:(j + 1) * T].astype(np.int64),
            int(t.exponent_codes()[i, j]))


def _check_operand(cfg: MacArrayConfig, t: BFPTensor, man_bits: int, name: str) -> None:
    if t.ndim != 2 or tuple(t.layout.block) != (cfg.tile, cfg.tile):
        raise ValueError(f"{name} must be a 2-D tensor with {cfg.tile}x{cfg.tile} blocks, got "
                         f"shape {t.shape} blocks {t.layout.block}")
    if t.fmt.man_bits != man_bits or t.fmt.exp_bits != cfg.exp_bits:
        raise ValueError(f"{name} has man_bits={t.fmt.man_bits}, exp_bits={t.fmt.exp_bits}; "
                         f"the array needs {man_bits}, {cfg.exp_bits}")


def gemm_beats(cfg: MacArrayConfig, sa: BFPTensor, ta: bool, sb: BFPTensor, tb: bool, *,
               man_bits_a: int | None = None, man_bits_b: int | None = None):
    """Operand beats for ``A @ B`` with ``A = sa.T if ta else sa``, ``B = sb.T if tb else sb``.

    ``sa``/``sb`` are the tensors as stored (quantized once); the tiles stream as stored
    and the array reads them in the orientation the GEMM needs.

    ``man_bits_a`` / ``man_bits_b`` (default: the config's) are the operands' mantissa
    widths; narrower than the ports they need ``MacArray(runtime_frac=True)``. Header
    beats carry ``frac`` (:func:`operand_frac`); layouts without that field ignore it.

    Returns ``(a_beats, b_beats, jobs, (M, N))``: lists of dicts of payload fields, and
    the output-tile order ``[(it, jt), ...]``.
    """
    man_bits_a = cfg.man_bits_a if man_bits_a is None else man_bits_a
    man_bits_b = cfg.man_bits_b if man_bits_b is None else man_bits_b
    from .mac_array import operand_frac   # (mac_array re-exports this module's names)
    frac_a = operand_frac(cfg, man_bits_a, "a")
    frac_b = operand_frac(cfg, man_bits_b, "b")
    _check_operand(cfg, sa, man_bits_a, "a")
    _check_operand(cfg, sb, man_bits_b, "b")
    T = cfg.tile
    ga = sa.layout.grid[::-1] if ta else sa.layout.grid     # (mt, nk) of A
    gb = sb.layout.grid[::-1] if tb else sb.layout.grid     # (nk, nt) of B
    M = sa.shape[1] if ta else sa.shape[0]
    Ka = sa.shape[0] if ta else sa.shape[1]
    Kb = sb.shape[1] if tb else sb.shape[0]
    N = sb.shape[0] if tb else sb.shape[1]
    if Ka != Kb:
        raise ValueError(f"inner dimensions differ: A has K={Ka}, B has K={Kb}")
    if Ka > cfg.k_max:
        raise ValueError(f"K={Ka} exceeds k_max={cfg.k_max} the accumulator is sized for")
    mt, nk = ga
    nt = gb[1]
    a_beats, b_beats, jobs = [], [], []

    def a_tile(i, k):
        return _tile(sa, T, k, i) if ta else _tile(sa, T, i, k)

    def b_tile(k, j):
        return _tile(sb, T, j, k) if tb else _tile(sb, T, k, j)

    for it in range(mt):
        for jt in range(nt):
            jobs.append((it, jt))
            for beats, get, tr, fr in ((a_beats, lambda k: a_tile(it, k), ta, frac_a),
                                       (b_beats, lambda k: b_tile(k, jt), tb, frac_b)):
                for k in range(nk):
                    beats.append(dict(header=1, exp=get(k)[1], transpose=int(tr), frac=fr))
                for k in range(nk):
                    man, code = get(k)
                    for r in range(T):
                        beats.append(dict(header=0, exp=code, transpose=int(tr),
                                          data=[int(x) for x in man[r]],
                                          last=int(k == nk - 1)))
    return a_beats, b_beats, jobs, (M, N)


def output_beats_per_job(cfg: MacArrayConfig) -> int:
    return cfg.windows * cfg.rows


def assemble_output(cfg: MacArrayConfig, beats: list[list[int]], jobs, shape) -> np.ndarray:
    """FP32 bit patterns per output beat -> ``(M, N)`` float32 array."""
    T, R, C = cfg.tile, cfg.rows, cfg.cols
    mt = max(i for i, _ in jobs) + 1
    nt = max(j for _, j in jobs) + 1
    out = np.zeros((mt * T, nt * T), dtype=np.uint32)
    per = output_beats_per_job(cfg)
    if len(beats) != per * len(jobs):
        raise ValueError(f"got {len(beats)} output beats, expected {per * len(jobs)}")
    nwc = T // C
    for n, (it, jt) in enumerate(jobs):
        for w in range(cfg.windows):
            rg, cg = divmod(w, nwc)
            for r in range(R):
                row = beats[n * per + w * R + r]
                i = it * T + rg * R + r
                j0 = jt * T + cg * C
                out[i, j0:j0 + C] = row
    return out.view(np.float32)[: shape[0], : shape[1]]
