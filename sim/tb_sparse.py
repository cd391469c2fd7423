"""cocotb testbench of the sparse MAC engine (:mod:`hbfp_hw.gateware.sparse_pe`),
checked bit for bit against the sparse golden GEMMs of :mod:`hbfp_hw.sparsity`.

The stimulus is built on the pytest side by :func:`build_vectors` from the golden model
(compressed weights, quantized activations / output gradients, and the accumulators
``sparse_matmul(..., return_acc=True)`` / ``sparse_matmul_t(...)`` return) and handed
over in an ``.npz`` file. Environment:

* ``HBFP_SPARSE_VECTORS`` — path of the ``.npz`` (beats, expected outputs, configuration);
* ``HBFP_SPARSE_P_VALID`` / ``HBFP_SPARSE_P_READY`` — probability of input valid / output
  ready per cycle (default 1.0 / 1.0; the stall tests set them below 1);
* ``HBFP_SPARSE_SEED`` — seed of the stall pattern.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hbfp_hw.gateware.sparse_pe import SparseEngineConfig, pack_beat, unpack_out


def _job_beats(cfg: SparseEngineConfig, tiles, xs, shifts, mode: int) -> list[int]:
    """Beats of one job: ``tiles`` a list of (man, idx) along the reduction axis."""
    per_block = cfg.block_len // cfg.m
    beats = []
    for t, ((man, idx), x, sh) in enumerate(zip(tiles, xs, shifts)):
        beats.append(pack_beat(cfg, w_man=man, w_idx=None if cfg.dense else idx, x=x,
                               mode=mode, first=int(t == 0),
                               last_k=int((t + 1) % per_block == 0 or t == len(tiles) - 1),
                               last=int(t == len(tiles) - 1), shift=sh))
    return beats


def build_vectors(cfg: SparseEngineConfig, sw, xq, dyq, *, order: str = "interleave"):
    """Beats and expected accumulators of every forward job (activation row ``b``, tile
    row ``to``) and every transposed job (``dY`` row ``b``, tile column ``tc``), checked
    against the golden accumulators. Returns ``(beats, expected, jobs)``. For a dense
    engine (``cfg.dense``) the beats carry the whole tiles (forward jobs only)."""
    from hbfp_hw.quantize import block_layout
    from hbfp_hw.sparsity import sparse_matmul, sparse_matmul_t
    m = cfg.m
    tr, tc_n = sw.tiles
    lw = block_layout(sw.shape, sw.fmt)
    bo, bi = lw.block
    fwd, bwd = [], []
    dense = sw.dense_mantissas().reshape(tr, m, tc_n, m).transpose(0, 2, 1, 3) \
        if cfg.dense else None
    if cfg.dense:
        dyq = None
    if xq is not None:
        _, acc, e_ref = sparse_matmul(xq, sw, return_acc=True)
        bx = xq.layout.block[0]
        xm = xq.mantissas.astype(np.int64)
        for b in range(xq.layout.padded[0]):
            for to in range(tr):
                tiles, xs, shifts = [], [], []
                for tc in range(tc_n):
                    kb = tc * m // bi
                    e = int(xq.exponents[b // bx, kb]) + int(sw.exponents[to * m // bo, kb])
                    tiles.append((sw.mantissas[to, tc].reshape(-1),
                                  sw.indices[to, tc].reshape(-1)) if dense is None
                                 else (dense[to, tc].reshape(-1), None))
                    xs.append(xm[b, tc * m:(tc + 1) * m])
                    shifts.append(min(int(e_ref[b, to * m]) - e, 62))
                fwd.append((_job_beats(cfg, tiles, xs, shifts, 0),
                            [int(v) for v in acc[b, to * m:(to + 1) * m]], ("W", b, to)))
    if dyq is not None:
        _, acc, e_ref = sparse_matmul_t(dyq, sw, return_acc=True)
        bg = dyq.layout.block[0]
        gm = dyq.mantissas.astype(np.int64)
        for b in range(dyq.layout.padded[0]):
            for tc in range(tc_n):
                tiles, xs, shifts = [], [], []
                for to in range(tr):
                    kb = to * m // bo
                    e = int(dyq.exponents[b // bg, kb]) + int(sw.exponents[kb, tc * m // bi])
                    tiles.append((sw.mantissas[to, tc].reshape(-1),
                                  sw.indices[to, tc].reshape(-1)))
                    xs.append(gm[b, to * m:(to + 1) * m])
                    shifts.append(min(int(e_ref[b, tc * m]) - e, 62))
                bwd.append((_job_beats(cfg, tiles, xs, shifts, 1),
                            [int(v) for v in acc[b, tc * m:(tc + 1) * m]], ("Wt", b, tc)))
    jobs = []
    if order == "interleave":
        for i in range(max(len(fwd), len(bwd))):
            jobs += fwd[i:i + 1] + bwd[i:i + 1]
    else:
        jobs = fwd + bwd
    beats = [bt for j in jobs for bt in j[0]]
    return beats, [j[1] for j in jobs], [j[2] for j in jobs]


def save_vectors(path, cfg: SparseEngineConfig, beats, expected, jobs) -> None:
    np.savez(path, beats=np.array([str(b) for b in beats]),
             expected=np.array(expected, dtype=np.int64), cfg=json.dumps(cfg.to_dict()),
             jobs=np.array([json.dumps(list(j)) for j in jobs]))


# -- cocotb ----------------------------------------------------------------------------------

try:
    import cocotb
    from cocotb.triggers import ClockCycles, FallingEdge
except ImportError:  # pragma: no cover - the vector builder works without cocotb
    cocotb = None


if cocotb is not None:
    @cocotb.test()
    async def test_sparse_engine(dut):
        from hbfp_hw.sim.streams import StreamDriver, StreamMonitor, start_byte_top
        vec = np.load(os.environ["HBFP_SPARSE_VECTORS"])
        cfg = SparseEngineConfig(**json.loads(str(vec["cfg"])))
        beats = [int(b) for b in vec["beats"]]
        expected = [[int(v) for v in e] for e in vec["expected"]]
        jobs = [json.loads(j) for j in vec["jobs"]]
        p_valid = float(os.environ.get("HBFP_SPARSE_P_VALID", "1.0"))
        p_ready = float(os.environ.get("HBFP_SPARSE_P_READY", "1.0"))
        rng = np.random.default_rng(int(os.environ.get("HBFP_SPARSE_SEED", "1")))
        dut._log.info(f"{len(beats)} beats, {len(expected)} jobs, p_valid={p_valid}, "
                      f"p_ready={p_ready}, config {cfg}")
        got: list[list[int]] = []
        mon = StreamMonitor(dut, "o", rng, lambda w: got.append(unpack_out(cfg, w)), p_ready)
        await start_byte_top(dut, mon)      # clock, reset with both streams idle, monitor
        drv = StreamDriver(dut, "i", rng, p_valid)
        await drv.send(beats)
        for _ in range(200 + 20 * len(expected)):
            if len(got) >= len(expected):
                break
            await FallingEdge(dut.clk)
        await ClockCycles(dut.clk, 10)
        errors = []
        if len(got) != len(expected):
            errors.append(f"{len(got)} outputs, expected {len(expected)}")
        for k, (g, e) in enumerate(zip(got, expected)):
            if g != e and len(errors) < 5:
                errors.append(f"job {k} {jobs[k]}: got {g}, expected {e}")
        assert not errors, "\n".join(errors)
        dut._log.info(f"{len(got)} jobs bit-exact; {drv.cycle} input cycles")
