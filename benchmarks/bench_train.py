"""Time per training step: BFP emulate backend versus FP32 on the same model.

Usage::

    python benchmarks/bench_train.py [--steps 30] [--threads 1] [--formats hbfp8,hb4,mxint8]
                                     [--only cnn] [--clock wall|cpu] [--data digits|random]

For each model (the digits MLP and CNN of ``hbfp-hw train`` at batch 32, plus two wider
MLPs where the GEMMs dominate), times forward + backward + SGD step in FP32 and
in each BFP format with the emulate backend, interleaved in one run (warm-up steps
excluded; FP32 and emulate steps alternate one by one so machine load affects both
alike) and prints the medians, the minima (the least disturbed steps on a shared
machine) and their ratios. The digits models train on shuffled batches of the digits
training split (``--data digits``, the default: the exact-convolution paths a real run
takes, fallbacks included), both models on the same batches; ``--data random`` (and the
wider MLPs always) repeat one batch of uniform random inputs. ``--clock cpu`` times
the process's CPU time instead of wall time (with one thread, the step's own work:
steadier on a machine shared with other jobs). The compiled kernels of the emulate
backend (numba, when installed) are compiled or loaded from numba's cache before any
timing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from hbfp_hw.host import torch_kernels
from hbfp_hw.host import torch as htorch
from hbfp_hw.host.torch import bfp_layers, convert
from hbfp_hw.host.train import format_kwargs, load_digits_split, make_model


def _models():
    wide = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))
    wider = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    return [("mlp (digits), batch 32", make_model("mlp"), (1, 8, 8), 32),
            ("cnn (digits), batch 32", make_model("cnn"), (1, 8, 8), 32),
            ("mlp 256-512-512-10, batch 256", wide, (256,), 256),
            ("mlp 1024-1024-1024-10, batch 512", wider, (1024,), 512)]


#: the clocks of ``--clock``: wall time, or the CPU time of the process (with one
#: thread, the step's own work: on a machine shared with other jobs it does not count
#: the time the process waits for a CPU)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Stepper:
    """One model with its SGD optimizer; :meth:`step` times one training step."""

    def __init__(self, model, clock=time.perf_counter):
        self.model, self.clock = model, clock
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(self, x, y) -> float:
        t0 = self.clock()
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return self.clock() - t0


def _step_times(model, x, y, steps: int, warmup: int = 2) -> list[float]:
    """Times of ``steps`` training steps (on one batch) after ``warmup`` untimed ones."""
    s = _Stepper(model)
    for _ in range(warmup):
        s.step(x, y)
    return [s.step(x, y) for _ in range(steps)]


def _batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int = 0):
    """Endless shuffled epochs of ``(x, y)`` in batches (torch tensors)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(x))
        for s in range(0, len(x) - batch + 1, batch):
            idx = perm[s: s + batch]
            yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def _repeat(x, y):
    while True:
        yield x, y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", default="hbfp8,hb4,mxint8")
    ap.add_argument("--only", default="", help="run only models whose label contains this")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default) or the process's CPU time")
    ap.add_argument("--data", choices=("digits", "random"), default="digits",
                    help="the digits models' batches: shuffled digits training batches "
                         "(default) or one repeated batch of uniform random inputs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    torch_kernels.warm_up()
    warm = time.perf_counter() - t0
    kern = "numba kernels" if torch_kernels.ENABLED else "no numba: PyTorch paths"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps, "
          f"median per step, {args.clock} clock; {kern} (warm-up {warm:.1f} s, not timed); "
          f"load average {load:.1f} on {os.cpu_count()} CPUs at start; digits models on "
          f"{'shuffled digits batches' if args.data == 'digits' else 'one random batch'}")
    print("| model | format | FP32 ms/step (median) | emulate ms/step (median) | ratio "
          "| FP32 min | emulate min | ratio of minima |")
    print("|---|---|---|---|---|---|---|---|")
    paths = []
    for label, base, shape, batch in _models():
        if args.only not in label:
            continue
        x = torch.from_numpy(rng.random((batch, *shape), dtype=np.float32))
        y = torch.from_numpy(rng.integers(0, 10, batch))
        digits = args.data == "digits" and shape == (1, 8, 8)
        if digits:
            xtr, ytr, _, _ = load_digits_split()
        for f in formats:
            torch.manual_seed(0)
            fp = copy.deepcopy(base)
            bfp = convert(copy.deepcopy(base), backend="emulate", **format_kwargs(f))
            assert bfp_layers(bfp)
            # alternate single steps so machine load affects both alike
            clock = CLOCKS[args.clock]
            sf, sb = _Stepper(fp, clock), _Stepper(bfp, clock)
            data = _batches(xtr, ytr, batch) if digits else _repeat(x, y)
            for _ in range(3):
                xb, yb = next(data)
                sf.step(xb, yb), sb.step(xb, yb)
            t_fp, t_bfp = [], []
            htorch.conv_paths.clear()
            for _ in range(args.steps):
                xb, yb = next(data)
                t_fp.append(sf.step(xb, yb))
                t_bfp.append(sb.step(xb, yb))
            a, b = statistics.median(t_fp) * 1e3, statistics.median(t_bfp) * 1e3
            print(f"| {label} | {f} | {a:.2f} | {b:.2f} | {b / a:.1f}x "
                  f"| {min(t_fp) * 1e3:.2f} | {min(t_bfp) * 1e3:.2f} "
                  f"| {min(t_bfp) / min(t_fp):.1f}x |", flush=True)
            if htorch.conv_paths:
                paths.append((label, f, sorted(htorch.conv_paths.items())))
    if paths:
        print("\nexact convolution paths taken in the timed steps (direction, path: calls):")
        for label, f, counts in paths:
            print(f"  {label}, {f}: " + ", ".join(f"{d} {p} {n}" for (d, p), n in counts))
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
