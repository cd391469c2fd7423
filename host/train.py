"""``hbfp-hw train``: low-precision training of small models on scikit-learn's digits.

Trains an MLP and a small CNN on the bundled 8x8 digits dataset (1797 images, no
download; fixed stratified 80/20 split) in several number formats, for several seeds,
then prints the final test accuracy per format (mean, min-max spread) and writes a PNG
of the learning curves. The formats:

============ ===========================================================================
fp32         PyTorch's own layers
hbfp8        HyperBlock 16x16 tiles, 8-bit mantissas for W/A/G, stochastic rounding of G;
             convolutions quantize X, W, dY once each with 16 (samples) x 16 (channels)
             blocks per position (HyperBlock convolution, ``docs/conv.md``)
hb4          as hbfp8 with 4-bit mantissas for W/A/G; the model input (first layer's X)
             is rounded stochastically in training (convert's default for a 4-bit
             input), to nearest in evaluation
hb4-rne      as hb4 with the model input rounded to nearest in training too
hbfp8-im2col as hbfp8, convolutions as im2col GEMMs with 16x16 tiles on the unfolded input
hb4-im2col   as hb4, convolutions as im2col GEMMs with 16x16 tiles on the unfolded input
hb4-t8       as hb4 with 8x8 tiles (finer shared exponents)
hb4-in8      as hb4, except the model input (first layer's X) in HBFP8 (8-bit mantissas)
mxint8       OCP MXINT8 (32-element blocks along each GEMM's reduction axis, 6 quantizations)
int8-hs      integer GEMMs: per-tensor asymmetric int8 A/G with in-hindsight (EMA of
             past steps, eta 0.5, statistics from the GEMM outputs) ranges, symmetric
             int8 W
int8-dyn     integer GEMMs: per-tensor asymmetric int8 A/G with dynamic (current
             batch) ranges, symmetric int8 W
int8p2-hs    per-tensor symmetric int8 with a power-of-two scale: HBFP8 16x16 tiles that
             all share one static exponent per tensor (the accelerator's QUANTIZE
             STATIC_EXP), in-hindsight A/G exponents from the range tracker's min/max
int8p2-dyn   as int8p2-hs with dynamic (current batch) A/G exponents
============ ===========================================================================

The other schemes' formats (LUQ gradients, MLS, transposable N:M sparsity ...) come
from their modules' ``TRAIN_FORMATS`` tables (:data:`SCHEME_TRAIN_MODULES`); ``hbfp-hw
train --list-formats`` prints every name with its description. They are accepted by
``--formats`` but not trained by default.

``--blocks BNxBC`` gives the HyperBlock formats other blocks: X and dY ``Bn x Bc``
(samples x channels or features), W ``Bc x Bc``.

Bias, ReLU, pooling, softmax/cross-entropy and the SGD optimizer stay FP32 (FP32 master
weights). See ``docs/training.md``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FORMAT_NAMES", "SCHEME_TRAIN_MODULES", "scheme_train_formats", "all_format_names",
           "list_formats", "MODEL_NAMES", "TrainConfig", "RunResult", "load_digits_split",
           "make_model", "format_kwargs", "train_one", "run_grid", "summarise",
           "format_table", "plot_curves", "register_cli"]

FORMAT_NAMES = ("fp32", "hbfp8", "hb4", "hb4-t8", "hb4-in8", "hb4-rne", "mxint8", "int8-hs",
                "int8-dyn", "int8p2-hs", "int8p2-dyn", "hbfp8-im2col", "hb4-im2col")
MODEL_NAMES = ("mlp", "cnn", "cnn2", "mlp2")
#: the models ``--model all`` trains
DEFAULT_MODELS = ("mlp", "cnn")
#: EMA momentum of the int8-hs ranges (docs/training.md, "Integer GEMMs in training")
INT8_HS_ETA = 0.5

#: modules of :mod:`hbfp_hw.host` whose ``TRAIN_FORMATS`` (name -> (description,
#: factory of :func:`~hbfp_hw.host.torch.convert` keyword arguments)) add formats
SCHEME_TRAIN_MODULES = ("train_luq", "train_mls", "train_sparsity", "train_bitlayers")


def scheme_train_formats() -> dict:
    """The other schemes' training formats: name -> (description, kwargs factory)."""
    out: dict = {}
    for m in SCHEME_TRAIN_MODULES:
        name = f"{__package__}.{m}"
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:      # that scheme is not part of this installation
                continue
            raise
        for k, v in mod.TRAIN_FORMATS.items():
            if k in FORMAT_NAMES or k in out:
                raise ValueError(f"training format {k!r} of {name} is defined twice")
            out[k] = v
    return out


def all_format_names() -> tuple[str, ...]:
    """Every name ``--formats`` accepts: :data:`FORMAT_NAMES`, then the schemes'."""
    return FORMAT_NAMES + tuple(scheme_train_formats())


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the same for every format)."""

    epochs: int = 15
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backend: str = "emulate"
    #: HyperBlock blocks (Bn, Bc) instead of the formats' own tiles (None: 16x16)
    blocks: tuple | None = None


@dataclass
class RunResult:
    model: str
    fmt: str
    seed: int
    test_acc: list = field(default_factory=list)    # per epoch, percent
    train_loss: list = field(default_factory=list)  # per epoch, mean
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.test_acc[-1]


def load_digits_split(split_seed: int = 0):
    """Digits as float32 in [0, 1], shape (N, 1, 8, 8); fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y,
                                          random_state=split_seed)
    return xtr, ytr, xte, yte


def make_model(name: str):
    """The small models (FP32 PyTorch layers; :func:`convert` swaps them)."""
    from torch import nn
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                             nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    if name == "cnn2":      # wider, and a stride-2 convolution instead of the pooling
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    if name == "mlp2":      # one wide hidden layer
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    raise ValueError(f"unknown model {name!r}; accepted names are {', '.join(MODEL_NAMES)}")


def format_kwargs(name: str, blocks: tuple[int, int] | None = None) -> dict | None:
    """Keyword arguments of :func:`hbfp_hw.host.torch.convert` for a format name
    (``None`` for fp32). ``blocks = (Bn, Bc)`` re-blocks a HyperBlock format: X and dY
    in ``Bn x Bc`` tiles/blocks, W in ``Bc x Bc``."""
    kw = _format_kwargs(name)
    if blocks is None or kw is None:
        return kw
    return _with_blocks(name, kw, blocks)


def _with_blocks(name: str, kw: dict, blocks: tuple[int, int]) -> dict:
    from hbfp_hw.formats import BFPFormat
    bn, bc = (int(b) for b in blocks)
    fmt = kw.get("fmt")
    if not (isinstance(fmt, BFPFormat) and len(fmt.block_shape) == 2):
        raise ValueError(f"blocks apply to the HyperBlock formats; {name!r} is not one")

    def tile(f, shape):
        return f.replace(block_shape=shape, name=f"{f.name}-{shape[0]}x{shape[1]}")

    kw = dict(kw)
    kw.update(act_fmt=tile(fmt, (bn, bc)), weight_fmt=tile(fmt, (bc, bc)),
              grad_fmt=tile(fmt, (bn, bc)))
    if kw.get("input_act_fmt") is not None:
        kw["input_act_fmt"] = tile(kw["input_act_fmt"], (bn, bc))
    return kw


def _format_kwargs(name: str) -> dict | None:
    from hbfp_hw.formats import HBFP4, HBFP8, MXINT8

    from .ranges import StaticExpQuantizer
    if name == "fp32":
        return None
    scheme = scheme_train_formats().get(name)
    if scheme is not None:
        return dict(scheme[1]())
    if name in ("hbfp8-im2col", "hb4-im2col"):
        kw = _format_kwargs(name[: -len("-im2col")])
        kw["conv_mode"] = "im2col_tiles"
        return kw
    if name == "hbfp8":
        return dict(fmt=HBFP8, grad_stochastic=True)
    if name == "hb4":
        return dict(fmt=HBFP4, grad_stochastic=True)
    if name == "hb4-t8":
        return dict(fmt=HBFP4.replace(block_shape=(8, 8), name="HBFP4-8x8"),
                    grad_stochastic=True)
    if name == "hb4-in8":
        return dict(fmt=HBFP4, grad_stochastic=True, input_act_fmt=HBFP8)
    if name == "hb4-rne":
        return dict(fmt=HBFP4, grad_stochastic=True, input_act_stochastic=False)
    if name == "mxint8":
        return dict(fmt=MXINT8)
    if name in ("int8-hs", "int8-dyn"):
        # integer-GEMM layers (hbfp_hw.host.torch_int.convert_int), not convert's
        return dict(int_gemm="hindsight" if name == "int8-hs" else "dynamic",
                    eta=INT8_HS_ETA)
    if name in ("int8p2-hs", "int8p2-dyn"):
        method = "hindsight" if name == "int8p2-hs" else "dynamic"
        q = StaticExpQuantizer(HBFP8, method, name=name)
        return dict(fmt=None, weight_fmt=StaticExpQuantizer(HBFP8, "dynamic", name="w-int8p2"),
                    act_fmt=q, grad_fmt=q)
    raise ValueError(f"unknown format {name!r}; accepted names are "
                     f"{', '.join(all_format_names())}")


def _evaluate(model, x, y, batch: int = 512) -> float:
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(torch.from_numpy(x[i:i + batch]))
            correct += int((out.argmax(1).numpy() == y[i:i + batch]).sum())
    model.train()
    return 100.0 * correct / len(x)


def train_one(model_name: str, fmt_name: str, seed: int, cfg: TrainConfig, data=None,
              progress: bool = True) -> RunResult:
    """Train one model in one format from one seed; returns the learning curve."""
    import torch
    from torch import nn

    from .torch import convert
    xtr, ytr, xte, yte = data if data is not None else load_digits_split()
    torch.manual_seed(seed)
    model = make_model(model_name)
    kw = format_kwargs(fmt_name, cfg.blocks)
    if kw is not None and "int_gemm" in kw:
        from .torch_int import convert_int
        convert_int(model, kw["int_gemm"], backend=cfg.backend, eta=kw["eta"])
    elif kw is not None:
        convert(model, backend=cfg.backend, seed=seed, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    res = RunResult(model_name, fmt_name, seed)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.epochs, desc=f"{model_name:>3} {fmt_name:<8} seed {seed}",
                   unit="ep", leave=False)
    for _ in range(cfg.epochs):
        perm = rng.permutation(len(xtr))
        losses = []
        # drop the last partial batch: every step has the same shape
        for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = torch.from_numpy(xtr[idx]), torch.from_numpy(ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        res.train_loss.append(float(np.mean(losses)))
        res.test_acc.append(_evaluate(model, xte, yte))
        if bar is not None:
            bar.set_postfix(loss=f"{res.train_loss[-1]:.3f}", acc=f"{res.test_acc[-1]:.1f}")
            bar.update()
    if bar is not None:
        bar.close()
    res.seconds = time.perf_counter() - t0
    return res


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_grid`: :attr:`results` holds the runs that finished
    (the interrupted run is dropped), :attr:`total` the number of runs planned."""

    def __init__(self, results: list, total: int) -> None:
        super().__init__(f"interrupted after {len(results)} of {total} runs")
        self.results = results
        self.total = total


def run_grid(models, formats, seeds, cfg: TrainConfig, progress: bool = True):
    """All (model, format, seed) runs; seeds are ``0 .. seeds-1``. Ctrl-C raises
    :class:`Interrupted` carrying the finished runs."""
    data = load_digits_split()
    out: list = []
    total = len(models) * len(formats) * seeds
    for m in models:
        for f in formats:
            for s in range(seeds):
                try:
                    r = train_one(m, f, s, cfg, data, progress)
                except KeyboardInterrupt:
                    raise Interrupted(out, total) from None
                msg = f"{m:>3} {f:<8} seed {s}: test acc {r.final:6.2f}%  ({r.seconds:.1f} s)"
                if progress:
                    from tqdm import tqdm
                    tqdm.write(msg)
                else:
                    print(msg, flush=True)
                out.append(r)
    return out


def summarise(results) -> dict:
    """``{(model, fmt): (mean, min, max, n)}`` of final test accuracy."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.model, r.fmt), []).append(r.final)
    return {k: (float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v))
            for k, v in groups.items()}


_TARGETS = {"hbfp8": ("fp32", 0.5), "hb4": ("fp32", 1.0), "hb4-t8": ("fp32", 1.0),
            "hbfp8-im2col": ("fp32", 0.5), "hb4-im2col": ("fp32", 1.0),
            "hb4-in8": ("fp32", 1.0), "hb4-rne": ("fp32", 1.0), "int8-hs": ("int8-dyn", 0.5),
            "int8p2-hs": ("int8p2-dyn", 0.5), "mls-e2m4": ("fp32", 1.0),
            **{k: ("fp32", 1.0) for k in (
                "luq4-f32", "luq4-hs-f32", "luq4-smp2-f32", "luq4-hs-smp2-f32", "luq4-hb4",
                "luq4-hs-hb4", "luq4-smp2-hb4", "luq4-hs-smp2-hb4")}}


def format_table(results) -> str:
    """Markdown table: final test accuracy per model and format, with spread and the
    gap to the target's reference format."""
    summ = summarise(results)
    lines = ["| model | format | test acc % (mean) | min | max | seeds | vs ref | target |",
             "|---|---|---|---|---|---|---|---|"]
    for (m, f), (mean, lo, hi, n) in summ.items():
        gap, tgt = "", ""
        if f in _TARGETS and (m, _TARGETS[f][0]) in summ:
            ref, tol = _TARGETS[f]
            d = mean - summ[(m, ref)][0]
            gap = f"{d:+.2f} vs {ref}"
            tgt = f"within {tol} pt: {'met' if d >= -tol else 'MISSED'}"
        lines.append(f"| {m} | {f} | {mean:.2f} | {lo:.2f} | {hi:.2f} | {n} | {gap} | {tgt} |")
    return "\n".join(lines)


def plot_curves(results, path: str) -> None:
    """Test accuracy per epoch (mean over seeds, min-max band), one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r.model for r in results}, key=MODEL_NAMES.index)
    fmts = list(dict.fromkeys(r.fmt for r in results))       # in the order they ran
    colors = plt.get_cmap("tab20" if len(fmts) > 10 else "tab10").colors
    styles = ("-", "--", "-.", ":")
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models) + 2.2, 4.4),
                             squeeze=False)
    for ax, m in zip(axes[0], models):
        lows = []
        for i, f in enumerate(fmts):
            runs = [r for r in results if r.model == m and r.fmt == f]
            if not runs:
                continue
            curves = np.array([r.test_acc for r in runs])
            ep = np.arange(1, curves.shape[1] + 1)
            color = colors[i % len(colors)]
            ax.plot(ep, curves.mean(0), styles[(i // len(colors)) % len(styles)],
                    color=color, label=f"{f} ({len(runs)} seeds)")
            ax.fill_between(ep, curves.min(0), curves.max(0), alpha=0.12, color=color)
            lows.append(float(curves.min()))
        seeds = sorted({r.seed for r in results if r.model == m})
        epochs = max(len(r.test_acc) for r in results if r.model == m)
        ax.set_title(f"{m}: digits test accuracy\n{epochs} epochs, seeds "
                     f"{seeds[0]}..{seeds[-1]}; mean and min-max band", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        lo = min(lows) if lows else 0.0
        ax.set_ylim(max(0.0, np.floor(lo / 5) * 5 - 1), 100.5)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for ax in axes[0][:-1]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run(args) -> int:
    if args.list_formats:
        print(list_formats())
        return 0
    import torch
    torch.set_num_threads(max(1, args.threads))
    models = DEFAULT_MODELS if args.model == "all" else (args.model,)
    formats = tuple(args.formats.split(",")) if args.formats else FORMAT_NAMES
    known = all_format_names()
    for f in formats:
        if f not in known:
            raise ValueError(f"unknown format {f!r}; accepted names are {', '.join(known)}")
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads}; accepted range is >= 1")
    _check_backend(args.backend)
    if args.plot:
        _check_plot_path(args.plot)
    cfg = TrainConfig(backend=args.backend, blocks=_parse_blocks(args.blocks))
    if args.quick:
        cfg.epochs = 4
        seeds = args.seeds if args.seeds is not None else 1
        if not args.formats:
            formats = ("fp32", "hbfp8", "hb4", "int8-hs")
        if args.model == "all":
            models = ("mlp",)
    else:
        seeds = args.seeds if args.seeds is not None else 3
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs={args.epochs}; accepted range is >= 1")
        cfg.epochs = args.epochs
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}; accepted range is >= 1")
    t0 = time.perf_counter()
    try:  # NumPy's BLAS threads too (scikit-learn brings threadpoolctl)
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(max(1, args.threads))
    except ImportError:  # pragma: no cover
        limits = None
    interrupted = None
    if any(f != "fp32" for f in formats):
        _warm_up_kernels()
    try:
        results = run_grid(models, formats, seeds, cfg, progress=not args.no_progress)
    except Interrupted as e:
        interrupted, results = e, e.results
    finally:
        if limits is not None:
            limits.restore_original_limits()
    print()
    if interrupted is not None:
        print(f"interrupted (Ctrl-C) after {len(results)} of {interrupted.total} runs; the "
              "run in progress is dropped", flush=True)
        if not results:
            return 130
    blk = f", HyperBlock blocks {cfg.blocks[0]}x{cfg.blocks[1]}" if cfg.blocks else ""
    print(f"final test accuracy on digits (360 test images), {cfg.epochs} epochs, "
          f"backend {cfg.backend}, seeds 0..{seeds - 1}{blk}:")
    print(format_table(results))
    if args.plot:
        plot_curves(results, args.plot)
        print(f"learning curves: {args.plot}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 130 if interrupted is not None else 0


def _warm_up_kernels() -> None:
    """Load the compiled BFP kernels, saying so: the first run on a machine compiles
    them (numba caches them on disk), which takes up to a minute."""
    from . import torch_kernels
    if not torch_kernels.ENABLED:
        return
    print("loading the compiled BFP kernels (the first run on a machine compiles them: "
          "up to a minute) ...", end="", flush=True)
    t0 = time.perf_counter()
    torch_kernels.warm_up()
    print(f" {time.perf_counter() - t0:.1f} s", flush=True)


def _check_backend(backend: str) -> None:
    if backend != "emulate" and "://" not in backend:
        raise ValueError(f"--backend={backend!r}; accepted values are 'emulate' or a device "
                         "URL (emulate://, sim://, serial://PORT)")


def _check_plot_path(path: str) -> None:
    import os
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ValueError(f"--plot={path!r}: the folder {d} does not exist")
    if not os.access(d, os.W_OK):
        raise ValueError(f"--plot={path!r}: the folder {d} is not writable")
    if not path.lower().endswith((".png", ".pdf", ".svg")):
        raise ValueError(f"--plot={path!r}: accepted file types are .png, .pdf, .svg "
                         "('' for no plot)")


def list_formats() -> str:
    """Every training format name with its description (``--list-formats``)."""
    doc = __doc__.splitlines()
    seps = [i for i, ln in enumerate(doc) if ln.startswith("============ ")]
    lines = ["BFP and int formats (trained by default):"]
    lines += ["  " + ln for ln in doc[seps[0] + 1:seps[1]] if ln.strip()]
    extra = scheme_train_formats()
    if extra:
        lines.append("other schemes (name them in --formats):")
        lines += [f"  {k:<{max(12, len(k))}} {d}" for k, (d, _) in extra.items()]
    return "\n".join(lines)


def _parse_blocks(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        bn, bc = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--blocks={text!r}; accepted form is BNxBC, e.g. 16x16") from None
    if not (1 <= bn <= 4096 and 1 <= bc <= 4096):
        raise ValueError(f"--blocks={text!r} is out of range; each side in [1, 4096]")
    return bn, bc


def register_cli(subparsers, generate_subparsers) -> None:
    """Add ``hbfp-hw train``."""
    p = subparsers.add_parser(
        "train", help="train small models on digits in BFP / int8 formats",
        description="Train an MLP and a CNN on scikit-learn's digits in FP32, HBFP8, "
                    "HyperBlock 4-bit, MXINT8 and int8 (in-hindsight / dynamic ranges); "
                    "print the accuracy table and plot the learning curves.")
    p.add_argument("--model", choices=(*MODEL_NAMES, "all"), default="all",
                   help="mlp, cnn, cnn2 (wider CNN with a stride-2 convolution), mlp2 (one "
                        "hidden layer of 256), or all "
                        "(mlp and cnn; default)")
    p.add_argument("--formats", default="",
                   help=f"comma-separated format names (default: {','.join(FORMAT_NAMES)}; "
                        "--list-formats for all, the other schemes' included)")
    p.add_argument("--list-formats", action="store_true",
                   help="print every format name with its description and exit")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 15)")
    p.add_argument("--blocks", default="",
                   help="HyperBlock blocks BNxBC for the HBFP formats: X and dY BNxBC "
                        "(samples x channels/features), W BCxBC (default: 16x16)")
    p.add_argument("--quick", action="store_true",
                   help="short run for the demo: MLP, 4 epochs, 1 seed, 4 formats")
    p.add_argument("--plot", default="train_curves.png", help="PNG path ('' for none)")
    p.add_argument("--backend", default="emulate",
                   help="'emulate' (golden model) or a hbfp_hw.host device URL")
    p.add_argument("--threads", type=int, default=1, help="torch threads, >= 1 (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
