"""Time per training step: BFP emulate backend versus FP32 on the same model.

Usage::

    python benchmarks/bench_train.py [--steps 30] [--threads 1] [--formats hbfp8,hb4,mxint8]

For each model (the digits MLP and CNN of ``hbfp-hw train`` at batch 32, plus two wider
MLPs where the GEMMs dominate), times forward + backward + SGD step in FP32 and
in each BFP format with the emulate backend, interleaved in one run (warm-up steps
excluded, median of the timed steps), and prints the ratio. Target: <= 2x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from torch import nn

from hbfp_hw.host.torch import bfp_layers, convert
from hbfp_hw.host.train import format_kwargs, make_model


def _models():
    wide = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))
    wider = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    return [("mlp (digits), batch 32", make_model("mlp"), (1, 8, 8), 32),
            ("cnn (digits), batch 32", make_model("cnn"), (1, 8, 8), 32),
            ("mlp 256-512-512-10, batch 256", wide, (256,), 256),
            ("mlp 1024-1024-1024-10, batch 512", wider, (1024,), 512)]


def _step_times(model, x, y, steps: int, warmup: int = 2) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", default="hbfp8,hb4,mxint8")
    ap.add_argument("--only", default="", help="run only models whose label contains this")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps, "
          f"median per step")
    print("| model | format | FP32 ms/step | emulate ms/step | ratio |")
    print("|---|---|---|---|---|")
    for label, base, shape, batch in _models():
        if args.only not in label:
            continue
        x = torch.from_numpy(rng.random((batch, *shape), dtype=np.float32))
        y = torch.from_numpy(rng.integers(0, 10, batch))
        for f in formats:
            torch.manual_seed(0)
            fp = copy.deepcopy(base)
            bfp = convert(copy.deepcopy(base), backend="emulate", **format_kwargs(f))
            assert bfp_layers(bfp)
            # interleave the two so machine load affects both alike
            t_fp, t_bfp = [], []
            for _ in range(3):
                t_fp += _step_times(fp, x, y, args.steps // 3)
                t_bfp += _step_times(bfp, x, y, args.steps // 3)
            a, b = statistics.median(t_fp) * 1e3, statistics.median(t_bfp) * 1e3
            print(f"| {label} | {f} | {a:.2f} | {b:.2f} | {b / a:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
