"""Clocks of LUQ_QUANTIZE and LUQ_GEMM on the simulated accelerator top.

``SIM_CONFIG`` with the LUQ engine (``luq_lanes=4``, HBFP8 / HBFP4 on 8x8 tiles): one
LUQ_QUANTIZE of 256 elements and LUQ_GEMMs of ``8x64 @ 64x16`` (SMP 1 and 2), each
answer checked against the emulator (which computes with the golden model) and the GEMM
results against :func:`hbfp_hw.luq.luq_matmul`. Counts the clocks from the first request
byte to the last answer byte (one byte per clock each way); operand transfers not
counted.

Run: ``.venv/bin/python benchmarks/bench_luq_device.py`` (a few minutes: the Python
simulator).
"""

from __future__ import annotations

import numpy as np

import hbfp_hw as h
from hbfp_hw import protocol as P
from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.luq import luq_matmul, luq_quantize

CFG = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:2], luq_lanes=4, bitlayer_lanes=0,
                         name="hbfp_sim_luq")


def main() -> None:
    B = {s.name: s for s in P.buffer_map(CFG)}
    emu, sim = Emulator(CFG), SimTransport(CFG)
    rng = np.random.default_rng(0)
    seq = [0]

    def run(op, data=b"", **f) -> int:
        seq[0] = (seq[0] + 1) % 256
        fr = P.encode_frame(seq[0], op, P.REQUESTS[op].pack(data, **f))
        c0 = sim.cycles
        sim.write(fr)
        got = sim.read(0.0)
        assert got == emu.feed(fr), op
        return sim.cycles - c0

    M, K, N = 8, 64, 16
    x = (rng.standard_normal(M * K) * 1e-3).astype(np.float32)
    run(P.Op.WRITE, x[:256].view("<u4").tobytes(), buffer=B["fp_in"].id, offset=0)
    print(f"{'command':36} {'clocks':>7}  rate")
    c = run(P.Op.LUQ_QUANTIZE, flags=0, count=256, src_offset=0, dst_offset=0, seed=1,
            max_abs=0)
    print(f"{'LUQ_QUANTIZE 256 elements':36} {c:7d}  {c / 256:.2f} clocks/element")
    for S in (1, 2):
        a = luq_quantize(x.reshape(M, K), P.luq_format(CFG, samples=S, seed=3))
        b = h.quantize(rng.standard_normal((K, N)).astype(np.float32), CFG.formats[0])
        bc, bm = b.stream()
        run(P.Op.WRITE, bm.reshape(-1).astype("i1").tobytes(), buffer=B["op0.man"].id,
            offset=0)
        run(P.Op.WRITE, bc.astype("u1").tobytes(), buffer=B["op0.exp"].id, offset=0)
        run(P.Op.WRITE, a.codes.reshape(-1).tobytes(), buffer=B["luq.a"].id, offset=0)
        c = run(P.Op.LUQ_GEMM, flags=0, b=0, slot_b=0, samples=S, rows=M, k=K, cols=N,
                alpha=int(np.float32(a.alpha).view(np.uint32)), a_offset=0, out_offset=0)
        y = emu.buffers[B["out"].id][:M * N].view(np.float32).reshape(M, N)
        assert np.array_equal(y.view(np.uint32), luq_matmul(a, b).view(np.uint32))
        print(f"{f'LUQ_GEMM {M}x{K} @ {K}x{N}, samples {S}':36} {c:7d}  "
              f"{M * K * N * S / c:.2f} shift-adds/clock (peak {CFG.tile})")


if __name__ == "__main__":
    main()
