"""End-to-end GEMM over the wire protocol: throughput per transport, bytes on the wire
versus the minimum, link efficiency, and the link-limited bound of the 3 Mbaud UART.

    .venv/bin/python benchmarks/bench_link.py [--sizes 64 128 256] [--url emulate://]
        [--sim-sizes 16 32]

*Minimum* bytes for an M x K x N GEMM, for every call: the two BFP operands once
(mantissas at their wire width plus one exponent code per block) and the FP32 results
once. ``matmul quantize_on=device`` sends FP32 operands, so it cannot reach it. *Wire* bytes
count everything both ways: frame headers, CRCs, command headers, acknowledgements,
retries. Link efficiency = minimum / wire. The serial bound is the time the wire bytes
take at the configured baud rate (8N1, stop-and-wait: both directions added), i.e. the
best a board on that link can do with this protocol.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import hbfp_hw.host as host
from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.quantize import quantize


#: ``matmul_q`` takes BFP operands; ``matmul`` takes FP32 and quantizes it on the device
#: (FP32 crosses the link) or on the host with the golden model (BFP crosses the link).
MODES = ("matmul_q", "matmul quantize_on=device", "matmul quantize_on=host")


def bfp_bytes(q, specs) -> int:
    man = specs["op0.man"].wire_bytes
    exp = specs["op0.exp"].wire_bytes
    return q.layout.num_blocks * (q.layout.block_size * man + exp)


def config_for(url: str) -> AcceleratorConfig:
    """The default accelerator; for sim:// the top's small simulation config."""
    if url.startswith("sim://"):
        from hbfp_hw.gateware.sim_device import SIM_CONFIG
        return SIM_CONFIG
    return AcceleratorConfig.default()


def run(url: str, sizes: list[int], repeats: int) -> list[dict]:
    cfg = config_for(url)
    fmt = cfg.formats[0]
    specs = {s.name: s for s in P.buffer_map(cfg)}
    rows = []
    rng = np.random.default_rng(0)
    with host.open(url, config=cfg, progress=False) as dev:
        for n in sizes:
            a = rng.standard_normal((n, n)).astype(np.float32)
            b = rng.standard_normal((n, n)).astype(np.float32)
            for mode in MODES:
                aq, bq = quantize(a, fmt), quantize(b, fmt)
                ref = bfp_matmul(aq, bq)
                best = float("inf")
                for _ in range(repeats):
                    dev.reset()
                    before = dict(dev.link)
                    t = time.perf_counter()
                    y = (dev.matmul_q(aq, bq) if mode == "matmul_q"
                         else dev.matmul(a, b, quantize_on=mode.split("=")[1]))
                    best = min(best, time.perf_counter() - t)
                    assert np.array_equal(y, ref), "result differs from the golden model"
                wire = sum(dev.link[k] - before.get(k, 0) for k in ("bytes_tx", "bytes_rx"))
                minimum = bfp_bytes(aq, specs) + bfp_bytes(bq, specs) + 4 * n * n
                serial_s = wire / cfg.link_bytes_per_second
                rows.append(dict(url=url, mode=mode, n=n, seconds=best, wire=wire,
                                 minimum=minimum, eff=minimum / wire, serial_s=serial_s,
                                 gops=2 * n**3 / best / 1e9,
                                 serial_gops=2 * n**3 / serial_s / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--url", action="append", default=None,
                    help="device URL (repeatable); default emulate:// and sim://")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sim-sizes", type=int, nargs="+", default=[16, 32],
                    help="sizes for sim:// (the simulated RTL runs ~1-3k cycles/s)")
    args = ap.parse_args()
    for url in args.url or ["emulate://", "sim://"]:
        cfg = config_for(url)
        print(f"{url} config: {cfg.formats[0].describe()}; buffers {cfg.operand_depth} "
              f"mantissas x {cfg.operand_buffers}, out {cfg.output_depth} words; "
              f"link {cfg.baud_rate} baud")
    print("| transport | call | M=K=N | wall ms | GOP/s | wire B | min B | link eff. | "
          "3 Mbaud bound ms | bound GOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for url in args.url or ["emulate://", "sim://"]:
        sizes = args.sim_sizes if url.startswith("sim://") else args.sizes
        for r in run(url, sizes, 1 if url.startswith("sim://") else args.repeats):
            print(f"| {r['url']} | {r['mode']} | {r['n']} | {1e3 * r['seconds']:.1f} | "
                  f"{r['gops']:.3f} | {r['wire']} | {r['minimum']} | {100 * r['eff']:.1f}% | "
                  f"{1e3 * r['serial_s']:.0f} | {r['serial_gops']:.4f} |")


if __name__ == "__main__":
    main()
