"""Post-training quantization on digits: FP32 vs max-abs clipping vs Lp init vs LAPQ.

Trains the digits MLP and CNN once in FP32 with ``hbfp_hw.host.train.train_one`` (the
``fp32`` row of ``hbfp-hw train``: same data split, hyper-parameters and seed), then for
each calibration seed draws 512 training images and quantizes the trained model with
``hbfp_hw.ptq.max_clip`` and ``hbfp_hw.ptq.lapq`` (whose Lp-initialised clipping values
give the "Lp init" column) at each W/A bit pair. Prints the test accuracy (360 held-out
images) as mean ± spread (spread = half the min-max range over the calibration seeds)
and the mean calibration cross-entropy of each method.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ptq.py               # docs/ptq.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ptq.py --all-layers  # all quantized
    .venv/bin/python benchmarks/bench_ptq.py --models mlp --seeds 2 --bits 4x4   # quick

(one thread makes the FP32 training, hence the whole table, reproducible)
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def train_fp32(model_name: str, seed: int, data):
    """The FP32 model of ``train_one(model_name, "fp32", seed)`` and its test accuracy."""
    from hbfp_hw.host import train as T
    made = []
    orig = T.make_model

    def capture(name):                      # train_one builds its model with make_model
        made.append(orig(name))
        return made[-1]

    T.make_model = capture
    try:
        res = T.train_one(model_name, "fp32", seed, T.TrainConfig(), data, progress=False)
    finally:
        T.make_model = orig
    return made[-1].eval(), res.final


def accuracy(model, x, y) -> float:
    import torch
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return 100.0 * float((out.argmax(1).numpy() == y).mean())


def fmt(v) -> str:
    v = np.asarray(v, dtype=np.float64)
    return f"{v.mean():.2f} ± {(v.max() - v.min()) / 2:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--bits", nargs="+", default=["4x4", "3x3", "2x4"],
                    help="W x A bit pairs (default: 4x4 3x3 2x4)")
    ap.add_argument("--seeds", type=int, default=5, help="calibration seeds 0..N-1")
    ap.add_argument("--calib", type=int, default=512, help="calibration images")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--all-layers", action="store_true",
                    help="quantize the first and last layers too")
    args = ap.parse_args(argv)
    import scipy

    from hbfp_hw import ptq
    from hbfp_hw.host.train import load_digits_split
    data = load_digits_split()
    xtr, ytr, xte, yte = data
    pairs = [tuple(int(b) for b in s.lower().split("x")) for s in args.bits]
    rows = []
    t0 = time.perf_counter()
    for m in args.models:
        model, fp_acc = train_fp32(m, args.train_seed, data)
        print(f"{m}: FP32 test accuracy {fp_acc:.2f}% (train seed {args.train_seed})",
              flush=True)
        for wb, ab in pairs:
            acc = {"max": [], "lp": [], "lapq": []}
            loss = {"max": [], "lp": [], "lapq": []}
            for s in range(args.seeds):
                cx, cy = ptq.calibration_subset(xtr, ytr, args.calib, seed=s)
                kw = dict(keep_first_last=not args.all_layers)
                qm = ptq.max_clip(model, cx, wb, ab, **kw)
                ql = ptq.lapq(model, cx, cy, wb, ab, **kw)
                qi = ptq.with_alphas(ql, ql.ptq_info["alphas_init"])
                for k, q in (("max", qm), ("lp", qi), ("lapq", ql)):
                    acc[k].append(accuracy(q, xte, yte))
                    loss[k].append(ptq_loss(q, cx, cy))
                print(f"  {m} W{wb}A{ab} seed {s}: max {acc['max'][-1]:.2f}  "
                      f"lp {acc['lp'][-1]:.2f} (p*={ql.ptq_info['p_star']:.2f})  "
                      f"lapq {acc['lapq'][-1]:.2f} (nfev {ql.ptq_info['nfev']}, calib CE "
                      f"{ql.ptq_info['loss_init']:.4f} -> {ql.ptq_info['loss_final']:.4f})",
                      flush=True)
            rows.append((m, f"W{wb}A{ab}", fp_acc, acc, loss))
    layers = "all layers quantized" if args.all_layers else "first/last layers FP32"
    print(f"\nTest accuracy %, mean ± spread over {args.seeds} calibration seeds "
          f"({args.calib} images each; {layers}; scipy {scipy.__version__}, Powell "
          f"{ptq.POWELL_OPTIONS}; {time.perf_counter() - t0:.0f} s)\n")
    print("| model | W/A | FP32 | max-abs | Lp init | LAPQ | calib CE max / Lp / LAPQ |")
    print("|---|---|---|---|---|---|---|")
    for m, wa, fp_acc, acc, loss in rows:
        ce = " / ".join(f"{np.mean(loss[k]):.4f}" for k in ("max", "lp", "lapq"))
        print(f"| {m} | {wa} | {fp_acc:.2f} | {fmt(acc['max'])} | {fmt(acc['lp'])} | "
              f"{fmt(acc['lapq'])} | {ce} |")
    return 0


def ptq_loss(q, cx, cy) -> float:
    import torch
    with torch.no_grad():
        out = q(torch.from_numpy(cx))
    return float(torch.nn.functional.cross_entropy(out, torch.from_numpy(cy)))


if __name__ == "__main__":
    raise SystemExit(main())
