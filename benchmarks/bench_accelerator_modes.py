"""GEMM cycles of the accelerator top per format slot (RTL in Amaranth's simulator).

Loads the same operands, quantized in each slot's format, into the simulated top and
counts the clocks of one GEMM command (request frame in to the last answer byte; the
operand transfers are not counted), so the table shows what the 8-bit, the 4-bit
(dual-precision narrow mode) and the MXINT8 datapaths cost on the same array. Every
result is checked bit for bit against ``bfp_matmul``.

    .venv/bin/python benchmarks/bench_accelerator_modes.py [--m 16 --k 64 --n 16]
"""

from __future__ import annotations

import argparse

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.gateware.top import mac_config, mx_slots
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.quantize import quantize


def _frame(seq, op, data=b"", **f):
    return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))


def _call(sim, frame) -> tuple[bytes, int]:
    c0 = sim.cycles
    sim.write(frame)
    out = sim.read(0.0)
    return out, sim.cycles - c0


def _load(sim, seq, buf, q, specs):
    codes, man = q.stream()
    man_s = specs[f"op{buf}.man"]
    exp_s = specs[f"op{buf}.exp"]
    for s, arr in ((man_s, man.reshape(-1).astype(np.int8)), (exp_s, codes.astype(np.uint8))):
        raw = arr.tobytes()
        for off in range(0, len(raw), P.MAX_DATA):
            _call(sim, _frame(seq, P.Op.WRITE, raw[off: off + P.MAX_DATA], buffer=s.id,
                              offset=off // s.wire_bytes))
            seq += 1
    return seq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args(argv)
    cfg = SIM_CONFIG
    mc = mac_config(cfg)
    specs = {s.name: s for s in P.buffer_map(cfg)}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((args.m, args.k)).astype(np.float32)
    b = rng.standard_normal((args.k, args.n)).astype(np.float32)
    sim = SimTransport(cfg, progress=False)
    print(f"SIM_CONFIG: {cfg.array_rows}x{cfg.array_cols} array, tile {cfg.tile}, "
          f"{mc.lanes} lanes, dual_precision={mc.dual_precision}; "
          f"GEMM {args.m}x{args.k} @ {args.k}x{args.n}")
    print(f"{'slot':>4}  {'format':<8} {'datapath':<22} {'GEMM clocks':>11} "
          f"{'MACs/clock':>10} {'vs slot 0':>9}")
    base = None
    seq = 1
    for slot, fmt in enumerate(cfg.formats):
        mx = slot in mx_slots(cfg)
        qa = quantize(a, fmt)
        qb = quantize(np.ascontiguousarray(b.T), fmt).T if mx else quantize(b, fmt)
        stored_b = qb.T if mx else qb
        seq = _load(sim, seq, 0, qa, specs)
        seq = _load(sim, seq, 1, stored_b, specs)
        flags = P.GemmFlag.STORE | (P.GemmFlag.TRANS_B if mx else 0)
        out, clocks = _call(sim, _frame(seq, P.Op.GEMM, a=0, b=1, flags=int(flags),
                                        slot_a=slot, slot_b=slot, a_rows=args.m,
                                        a_cols=args.k, b_rows=stored_b.shape[0],
                                        b_cols=stored_b.shape[1], out_offset=0))
        seq += 1
        assert P.decode_frame(out)[1] == P.Op.GEMM | P.RESPONSE_FLAG, f"slot {slot}: {out.hex()}"
        got, _ = _call(sim, _frame(seq, P.Op.READ, buffer=specs["out"].id, offset=0,
                                   count=args.m * args.n))
        seq += 1
        y = np.frombuffer(P.split_answer(P.decode_frame(got)[2])[1], dtype=np.float32)
        ref = bfp_matmul(qa, qb).reshape(-1)
        assert np.array_equal(y.view(np.uint32), ref.view(np.uint32)), f"slot {slot}"
        macs = args.m * args.k * args.n
        base = base or clocks
        path = ("MX datapath" if mx else
                "MAC array, 4-bit mode" if fmt.man_bits <= 4 and mc.dual_precision
                else "MAC array")
        print(f"{slot:>4}  {fmt.name:<8} {path:<22} {clocks:>11} {macs / clocks:>10.2f} "
              f"{base / clocks:>8.2f}x")
    print(f"peak MACs/clock of the array: {mc.macs_per_cycle} (8-bit), "
          f"{mc.macs_per_cycle_narrow} (4-bit mode); GEMM clocks include the operand "
          f"checks (one element per clock) and the answer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
