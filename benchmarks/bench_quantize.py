"""Golden-model throughput: quantize + dequantize of a 4096x4096 FP32 tensor.

Prints MB/s of FP32 input for 1-D blocks of 32 (MXINT8) and 2-D 16x16 tiles (HBFP8)
per rounding mode, next to NumPy's own copy bandwidth measured in the same run; the
ratio to copy bandwidth is the figure of merit (target >= 0.25 for nearest rounding).

    .venv/bin/python benchmarks/bench_quantize.py [--size 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import hbfp_hw as h


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.size, args.size)).astype(np.float32)
    mb = x.nbytes / 1e6
    t_copy = best_time(lambda: np.copy(x), args.repeat)
    copy_bw = mb / t_copy
    print(f"tensor {args.size}x{args.size} float32 = {mb:.0f} MB; best of {args.repeat}")
    print(f"numpy copy: {copy_bw:8.0f} MB/s  (baseline)")
    print(f"{'format':<8} {'blocks':<7} {'rounding':<13} {'quant MB/s':>10} {'q+dq MB/s':>10} "
          f"{'ratio':>6}")
    for fmt in (h.MXINT8, h.HBFP8):
        for mode in ("nearest_even", "nearest_away", "toward_zero", "stochastic"):
            f = fmt.replace(rounding=mode, sr_lanes=8)
            rep = args.repeat if mode != "stochastic" else max(1, args.repeat // 2)
            tq = best_time(lambda: h.quantize(x, f), rep)
            q = h.quantize(x, f)
            tdq = best_time(lambda: h.dequantize(q), rep)
            bw = mb / (tq + tdq)
            blk = "x".join(map(str, f.block_shape))
            print(f"{f.name:<8} {blk:<7} {mode:<13} {mb / tq:10.0f} {bw:10.0f} "
                  f"{bw / copy_bw:6.2f}")


if __name__ == "__main__":
    main()
