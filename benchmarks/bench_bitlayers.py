"""PrecisionBatching bit-layer GEMMs: accuracy/speed trade-off and synthesis.

Two parts (both by default):

``tradeoff``
    Trains the digits MLP (64-128-64-10) in FP32 with the project's trainer
    (``hbfp_hw.host.train.train_one("mlp", "fp32", seed, TrainConfig())``), deploys its
    Linear layers as 8-bit weight bit-layers (per-row scale) with 8- and 16-bit
    activations (:mod:`hbfp_hw.host.bitlayers_torch`) and, for k = 1..8 layers, prints
    the test accuracy, the engine's clocks per inference (the sum over the three layer
    commands of :func:`hbfp_hw.gateware.bitserial.command_cycles`, checked against an
    Amaranth simulation of the unit running one test image, bit-exact) and the speed-up
    over k = 8. Writes the PNG plot with ``--plot``. ``--train-format pb-w8k3`` trains
    with the weights of 3 bit-layers instead (:mod:`hbfp_hw.host.train_bitlayers`).
``synth``
    Synthesises the bit-serial unit (``--lanes`` lanes, 8-bit planes, 8- and 16-bit
    activations) and the BFP MAC array (8-bit, LUT multipliers, 2x2 PEs x 4 lanes) for
    the ECP5-85F out of context (``synth_ecp5``, ABC9, seed 1) in the same run and prints
    LUT, FF, BRAM, Fmax, bit-MACs per clock, and the effective GMAC/s (8-bit-weight MACs)
    at k = 1, 2, 4, 8, raw and scaled to the MAC array's LUT count.

``engine``
    Synthesises the accelerator's BITLAYER engine (``SIM_CONFIG``) on its own.

Run: ``.venv/bin/python benchmarks/bench_bitlayers.py [tradeoff|synth|engine|all]
[--plot PNG]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hbfp_hw.gateware.bitserial import BitSerialConfig, command_cycles

#: The unit the trade-off's cycle counts are for (and the synthesised design point).
DEPLOY_CONFIG = BitSerialConfig(lanes=64, act_bits=16, bits_max=8, w_depth=4096,
                                chunks_max=4)


def mlp_cycles(cfg: BitSerialConfig, dims, layers: int) -> int:
    """Clocks of one inference: one command per Linear layer, each after the previous
    layer's last result (the host applies ReLU and re-quantizes in between)."""
    return sum(command_cycles(cfg, rows=o, chunks=-(-i // cfg.lanes), layers=layers)
               for i, o in zip(dims[:-1], dims[1:]))


def _simulate_inference(cfg, model, x, layers):
    """Run one image through the unit in Amaranth's simulator; returns (clocks, logits
    bit-exact?)."""
    from hbfp_hw.gateware.bitserial import pack_planes
    from hbfp_hw.sim.bitserial_bench import Command, run_commands

    from hbfp_hw.host.bitlayers_torch import bit_layers
    layers_ = bit_layers(model)
    words, bases, base = {}, [], 0
    for lay in layers_:
        chunks = -(-lay.in_features // cfg.lanes)
        ws = pack_planes(lay.planes, chunks, cfg.lanes)
        words.update({base + i: w for i, w in enumerate(ws)})
        bases.append((base, chunks))
        base += len(ws)
    total = 0
    ok = True
    h = x
    for n, (lay, (b, chunks)) in enumerate(zip(layers_, bases)):
        xi = lay.input_ints(h)
        cmd = Command(b, lay.out_features, chunks, lay.bits, layers, xi)
        run_commands(cfg, words, [cmd])
        total += cmd.cycles
        y_int = np.array(cmd.results, dtype=np.int64).reshape(xi.shape[0], -1)
        ok &= bool(np.array_equal(y_int, lay.int_matmul(xi, layers)))
        h = lay.output_from_ints(y_int)
        if n < len(layers_) - 1:
            h = np.maximum(h, 0)
    return total, ok


def tradeoff(args) -> int:
    import torch

    from hbfp_hw.host import train as T
    from hbfp_hw.host.bitlayers_torch import deploy, set_layers

    captured = []
    orig = T.make_model

    def capture(name):  # keep the model train_one builds, to deploy it afterwards
        m = orig(name)
        captured.append(m)
        return m

    if "train_bitlayers" not in T.SCHEME_TRAIN_MODULES:   # the pb-w8k<k> rows
        T.SCHEME_TRAIN_MODULES = (*T.SCHEME_TRAIN_MODULES, "train_bitlayers")
    fmt = args.train_format
    t0 = time.perf_counter()
    cache = Path(args.model_cache) if args.model_cache else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        model = T.make_model("mlp")
        model.load_state_dict(saved["state"])
        fp32_acc = saved["acc"]
        how = f"loaded from {cache}"
    else:
        T.make_model = capture
        try:
            res = T.train_one("mlp", fmt, args.seed, T.TrainConfig(), progress=False)
        finally:
            T.make_model = orig
        model, fp32_acc = orig("mlp"), res.final
        model.load_state_dict(captured[-1].state_dict())   # plain Linear layers
        how = f"{T.TrainConfig().epochs} epochs, {time.perf_counter() - t0:.0f} s"
        if cache is not None:
            torch.save({"state": model.state_dict(), "acc": fp32_acc}, cache)
    model.eval()
    xtr, ytr, xte, yte = T.load_digits_split()
    print(f"MLP (train_one('mlp', {fmt!r}, seed={args.seed}, TrainConfig()); {how}): "
          f"test accuracy {fp32_acc:.2f} % (as trained)")
    dims = [64, 128, 64, 10]
    cfg = DEPLOY_CONFIG
    accs = {}
    for a, rnd in ((8, False), (16, False), (8, True)):
        dep = deploy(model, weight_bits=8, act_bits=a, calib=torch.from_numpy(xtr))
        for k in range(1, 9):
            set_layers(dep, k, round_dropped=rnd)
            with torch.no_grad():
                pred = dep(torch.from_numpy(xte)).argmax(1).numpy()
            accs[(a, k) if not rnd else (a, k, "rnd")] = 100.0 * float((pred == yte).mean())
    # the formula against the unit's simulation, one test image per k, bit-exact
    dep16 = deploy(model, weight_bits=8, act_bits=16, calib=torch.from_numpy(xtr))
    sim = {}
    for k in ((1, 2, 4, 8) if args.quick else range(1, 9)):
        set_layers(dep16, k)
        cyc, ok = _simulate_inference(cfg, dep16, xte[:1].reshape(1, -1), k)
        sim[k] = (cyc, ok)
        if not ok or cyc != mlp_cycles(cfg, dims, k):
            print(f"MISMATCH at k={k}: simulated {cyc} clocks (bit-exact: {ok}), formula "
                  f"{mlp_cycles(cfg, dims, k)}")
            return 1
    c8 = mlp_cycles(cfg, dims, 8)
    print(f"\nbit-serial unit: {cfg.lanes} lanes, 8-bit weight planes; MLP {dims}; "
          f"test set {len(yte)} images")
    print(f"{'k':>2} {'acc A8 %':>8} {'acc A16 %':>9} {'A8 rnd %':>8} {'clk/inf':>8} "
          f"{'sim clk':>7} {'speed-up':>8}")
    for k in range(1, 9):
        c = mlp_cycles(cfg, dims, k)
        s = f"{sim[k][0]:>7}" if k in sim else f"{'-':>7}"
        print(f"{k:>2} {accs[(8, k)]:8.2f} {accs[(16, k)]:9.2f} {accs[(8, k, 'rnd')]:8.2f} "
              f"{c:>8} {s} "
              f"{c8 / c:7.2f}x")
    print(f"as trained ({fmt}): {fp32_acc:.2f} %; 'A8 rnd': round_dropped (midpoint of the "
          "dropped layers added on the host); 'sim clk': Amaranth simulation of one image, "
          "results bit-exact with hbfp_hw.bitlayers.matmul")
    if args.plot:
        _plot(args.plot, accs, fp32_acc, {k: mlp_cycles(cfg, dims, k) for k in range(1, 9)})
        print(f"plot: {args.plot}")
    return 0


def _plot(path, accs, fp32, cycles):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = list(range(1, 9))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for a, mk in ((8, "o-"), (16, "s--")):
        ax.plot(ks, [accs[(a, k)] for k in ks], mk, label=f"W k-bit A{a}")
    ax.plot(ks, [accs[(8, k, "rnd")] for k in ks], "d-.", color="tab:green",
            label="A8, dropped-layer midpoint")
    ax.axhline(fp32, color="gray", lw=0.8, ls=":", label=f"FP32 {fp32:.1f} %")
    ax.set_xlabel("weight bit-layers k")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(ks, [cycles[8] / cycles[k] for k in ks], "^:", color="tab:red",
             label="speed-up vs k=8")
    ax2.set_ylabel("speed-up over k = 8 (engine clocks)", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax.set_title("Digits MLP, 8-bit weight bit-layers: accuracy and speed vs k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def synth(args) -> int:
    from hbfp_hw.config.mac_array import MacArrayConfig
    from hbfp_hw.gateware.bitserial import generate
    from hbfp_hw.gateware.mac_array import generate as gen_array
    from hbfp_hw.gateware.synth import SynthError, synth_ecp5

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_bitlayers_"))
    print(f"ECP5-85F out of context, synth_ecp5 (ABC9, seed 1, target {args.freq:g} MHz)",
          flush=True)
    print(f"{'design':34} {'LUT':>6} {'FF':>6} {'DSP':>4} {'BRAM':>4} {'Fmax':>6} "
          f"{'bitMAC/c':>8} {'MAC/c k=1,2,4,8':>16} {'GMAC/s k=1,2,4,8':>24}", flush=True)
    designs = []
    for a in (16, 8):
        cfg = DEPLOY_CONFIG.replace(lanes=args.lanes, act_bits=a, tree_pipe=args.tree_pipe)
        d = out / f"bitserial_a{a}"
        v, _ = generate(cfg, d)
        try:
            res = synth_ecp5(v, "bitserial", workdir=d / "ecp5", freq_mhz=args.freq,
                             abc9=True, timeout=args.timeout)
        except SynthError as e:
            print(f"bit-serial A{a} synthesis failed: {str(e).splitlines()[0]}", flush=True)
            continue
        macs = [cfg.lanes / k for k in (1, 2, 4, 8)]
        g = [m * res.fmax_mhz / 1000 for m in macs]
        label = (f"bit-serial {cfg.lanes} lanes W8 A{cfg.act_bits}"
                 + (" tree_pipe" if cfg.tree_pipe else ""))
        print(f"{label:34} {res.core_luts:>6} {res.core_ffs:>6} {res.dsps:>4} "
              f"{res.brams:>4} {res.fmax_mhz:6.1f} {cfg.lanes:>8} "
              f"{','.join(f'{m:g}' for m in macs):>16} "
              f"{','.join(f'{x:.2f}' for x in g):>24}", flush=True)
        designs.append((label, res, g))
    if not args.array:
        return 0
    acfg = MacArrayConfig(rows=args.array, cols=args.array, lanes=4, tile=8, man_bits_a=8,
                          man_bits_b=8, k_max=1024, mapping="lut")
    d = out / "mac_array"
    v, _ = gen_array(acfg, d, name="mac_array", primitives="ecp5")
    try:
        ares = synth_ecp5(v, "mac_array", workdir=d / "ecp5", freq_mhz=args.freq, abc9=True,
                          timeout=args.timeout)
    except SynthError as e:
        print(f"MAC array synthesis failed: {str(e).splitlines()[0]}", flush=True)
        return 1
    amacs = acfg.macs_per_cycle
    ag = amacs * ares.fmax_mhz / 1000
    alabel = f"BFP MAC array {args.array}x{args.array}x4 t8 8b lut"
    print(f"{alabel:34} {ares.core_luts:>6} {ares.core_ffs:>6} {ares.dsps:>4} "
          f"{ares.brams:>4} {ares.fmax_mhz:6.1f} {'-':>8} {amacs:>16} {ag:>24.2f}")
    print(f"\nGMAC/s at the MAC array's LUT budget ({ares.core_luts} LUT4): the unit's "
          "GMAC/s x array LUTs / unit LUTs")
    print(f"{'design':34} {'k=1':>7} {'k=2':>7} {'k=4':>7} {'k=8':>7}")
    print(f"{alabel:34} {ag:>7.2f} {ag:>7.2f} {ag:>7.2f} {ag:>7.2f}")
    for label, res, g in designs:
        sc = ares.core_luts / res.core_luts
        print(f"{label:34} " + " ".join(f"{x * sc:>7.2f}" for x in g))
    print("MAC/c of the bit-serial unit: 8-bit-weight MACs per clock at k layers = lanes / k")
    print(f"(work directory: {out})")
    return 0


def engine(args) -> int:
    """The BITLAYER engine of ``Accelerator(SIM_CONFIG)`` on its own, every buffer port
    a port (ECP5-85F out of context, target 60 MHz)."""
    from amaranth.back import verilog

    from hbfp_hw import protocol as P
    from hbfp_hw.gateware.sim_device import SIM_CONFIG
    from hbfp_hw.gateware.synth import synth_ecp5
    from hbfp_hw.gateware.top import Accelerator

    eng = Accelerator(SIM_CONFIG).engines(["bitlayer"])["bitlayer"]
    d = Path(args.out or tempfile.mkdtemp(prefix="bench_bitlayers_")) / "engine"
    d.mkdir(parents=True, exist_ok=True)
    v = d / "bitlayer_engine.v"
    v.write_text(verilog.convert(eng, name="bitlayer_engine", emit_src=False))
    r = synth_ecp5(v, "bitlayer_engine", workdir=d / "ecp5", freq_mhz=60, abc9=True,
                   timeout=args.timeout)
    print(f"BITLAYER engine, SIM_CONFIG ({P.bitlayer_lanes(SIM_CONFIG)} lanes): "
          f"{r.core_luts} LUT4, {r.core_ffs} FF, {r.dsps} MULT18X18D, {r.brams} DP16KD, "
          f"Fmax {r.fmax_mhz:.1f} MHz")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default="all",
                    choices=("all", "tradeoff", "synth", "engine"))
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--train-format", default="fp32",
                    help="training format of the MLP (fp32, or pb-w8k2/3/4: trained with "
                    "the weights of k bit-layers)")
    ap.add_argument("--plot", default="", help="PNG path of the trade-off plot")
    ap.add_argument("--model-cache", default="", help="save the trained FP32 model here "
                    "(and reuse it if the file exists)")
    ap.add_argument("--quick", action="store_true", help="simulate k = 1, 2, 4, 8 only")
    ap.add_argument("--lanes", type=int, default=DEPLOY_CONFIG.lanes)
    ap.add_argument("--freq", type=float, default=100.0, help="P&R target MHz")
    ap.add_argument("--array", type=int, default=2,
                    help="PE rows = cols of the BFP MAC array (4 lanes, tile 8, 8-bit, LUT); "
                    "0: no MAC array")
    ap.add_argument("--tree-pipe", action="store_true",
                    help="the units with the mid-tree register (tree_pipe=True)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per tool run")
    ap.add_argument("--out", default=None, help="synthesis work directory")
    args = ap.parse_args(argv)
    rc = 0
    if args.part in ("all", "tradeoff"):
        rc |= tradeoff(args)
    if args.part in ("all", "synth"):
        rc |= synth(args)
    if args.part == "engine":
        rc |= engine(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
