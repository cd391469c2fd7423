"""``hbfp-hw demo``: the main job on its built-in default.

Quantizes a real tensor (scikit-learn's bundled handwritten-digits images, no
download) with every preset format, prints each format's summary and its error
against float64, and runs a HyperBlock BFP GEMM with its error against the float64
product and the documented bound. Further stages (generate + simulate + train) are
added by the units that provide them, through :data:`DEMO_STAGES`.
"""

from __future__ import annotations

import argparse
import importlib
import time

import numpy as np

from . import formats
from .gemm import bfp_matmul, matmul_error_bound, matmul_reference
from .quantize import dequantize, quantize

__all__ = ["DEMO_STAGES", "load_real_tensor", "run_demo", "register_cli"]

#: Optional later stages: ``module:function`` names called as ``fn(args) -> None``
#: after the numerics stage. A module that is not present yet is skipped and said so.
DEMO_STAGES = (
    "hbfp_hw.host.demo_stage:run",
    "hbfp_hw.host.train:demo_stage",
)


def load_real_tensor() -> tuple[np.ndarray, str]:
    """The digits images as a float32 ``(1797, 64)`` tensor, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), "sklearn digits images (1797 x 64)"


def _numerics_stage() -> None:
    x, what = load_real_tensor()
    # centre it so signs are mixed, as activations/gradients are
    x = x - x.mean(axis=0, keepdims=True)
    x64 = x.astype(np.float64)
    print(f"== 1. quantize a real tensor: {what}, centred")
    print(f"{'format':<8} {'bits/elem':>9} {'max |err|':>10} {'rel RMS err':>12} {'SNR dB':>7}"
          f"  description")
    for f in formats.FORMATS.values():
        q = quantize(x, f)
        err = dequantize(q).astype(np.float64) - x64
        rms = np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(x64**2))
        snr = -20 * np.log10(rms)
        print(f"{f.name:<8} {f.bits_per_element:9.3f} {np.abs(err).max():10.2e} {rms:12.3e} "
              f"{snr:7.1f}  {f.describe()}")

    print("\n== 2. HyperBlock BFP GEMM (Gram matrix X^T X, HBFP8 tiles quantized once)")
    xq = quantize(x, formats.HBFP8)
    t0 = time.perf_counter()
    g = bfp_matmul(xq.T, xq)                      # reduces over the batch axis
    dt = time.perf_counter() - t0
    ref_q = matmul_reference(xq.T, xq)            # exact product of the BFP operands
    ref = x64.T @ x64                             # float64 of the raw data
    bound = matmul_error_bound(xq.T, xq)
    acc_err = np.abs(g - ref_q)
    print(f"shape {g.shape}, K={x.shape[0]}; golden time {dt * 1e3:.1f} ms")
    print(f"accumulation error vs exact BFP product: max {acc_err.max():.3e} "
          f"(documented bound max {bound.max():.3e}; within bound: "
          f"{bool(np.all(acc_err <= bound))})")
    print(f"total error vs float64 of raw data: rel max "
          f"{np.abs(g - ref).max() / np.abs(ref).max():.3e}")


def run_demo(args: argparse.Namespace) -> int:
    _numerics_stage()
    for spec in DEMO_STAGES:
        mod_name, fn_name = spec.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                print(f"\n(skipping stage {spec}: not built yet)")
                continue
            raise
        fn = getattr(mod, fn_name, None)
        if fn is None:
            print(f"\n(skipping stage {spec}: not built yet)")
            continue
        fn(args)
    return 0


def register_cli(sub, gen_sub) -> None:
    p = sub.add_parser("demo", help="run the main job on its built-in default")
    p.add_argument("--quick", action="store_true", default=True,
                   help="short versions of the long stages (default)")
    p.add_argument("--full", dest="quick", action="store_false",
                   help="full-length stages")
    p.set_defaults(func=run_demo)
