"""cocotb 2.x testbenches of the MLS quantizer and the MLS MAC, against the golden model.

Run through :func:`hbfp_hw.sim.runner.run_cocotb` (``tests/test_mls_cocotb.py``).
Environment:

* ``HBFP_MLS_MANIFEST`` — the JSON written next to the Verilog by
  :func:`hbfp_hw.gateware.mls_quantizer.generate` / :func:`hbfp_hw.gateware.mls_pe.generate`
  (its ``kind`` selects the tests that run);
* ``HBFP_MLS_N`` — random groups (quantizer) or outputs (MAC) per test (default 400);
* ``HBFP_MLS_SEED`` — stimulus seed (default 1; printed in the log).

Every expected value comes from :mod:`hbfp_hw.mls` (``quantize_array`` with the tensor
exponent the unit is given, ``mls_matmul(..., return_acc=True)``); comparisons are bit
for bit. Input gaps and output back-pressure are random.
"""

from __future__ import annotations

import json
import os
from collections import deque

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from hbfp_hw.mls import MLSFormat, mls_matmul
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor


def _manifest() -> dict:
    with open(os.environ["HBFP_MLS_MANIFEST"]) as f:
        return json.load(f)


def _kind() -> str:
    try:
        return _manifest()["kind"]
    except (KeyError, OSError):
        return ""


def _fmt(man: dict) -> MLSFormat:
    return MLSFormat.from_dict(man["format"])


def _seed() -> int:
    return int(os.environ.get("HBFP_MLS_SEED", "1"))


def _n() -> int:
    return int(os.environ.get("HBFP_MLS_N", "400"))


async def _clock_reset(dut, zero_inputs) -> None:
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    for s in zero_inputs:
        getattr(dut, s).value = 0
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


# ---------------------------------------------------------------------------- stimulus

def random_groups(rng, n: int, L: int) -> np.ndarray:
    """Groups of FP32 values with a random spread of magnitudes per group."""
    base = rng.integers(-30, 30, size=(n, 1))
    spread = rng.integers(0, 12, size=(n, 1))
    e = base - rng.integers(0, spread + 1, size=(n, L))
    x = rng.uniform(1, 2, size=(n, L)) * np.ldexp(1.0, e) * rng.choice([-1, 1], size=(n, L))
    x = x.astype(np.float32)
    x[rng.random((n, L)) < 0.05] = 0
    return x


def edge_groups(rng, fmt: MLSFormat, L: int, T: int) -> tuple[np.ndarray, list[str]]:
    """Named edge classes, relative to the tensor exponent ``T = t + 2**E - 2``."""
    M = fmt.man_bits
    out, names = [], []

    def add(name, vals):
        v = np.zeros(L, np.float32)
        vals = np.asarray(vals, dtype=np.float32)
        v[:len(vals)] = vals[:L]
        out.append(v)
        names.append(name)

    top = 2.0 ** T
    add("zero group", [])
    add("negative zeros", [-0.0] * L)
    add("subnormal inputs only", [1e-40, -3e-42, 1e-45])
    add("max element exponent", [top * 1.96875, -top * 1.5, top, top * 1.999])
    add("round up into saturation", [top * (2 - 2.0 ** -(M + 2))] * L)
    add("exact max elements", [top * (2 - 2.0 ** -M)] * L)
    q = 2.0 ** (T - M)        # quantum of the top binade
    add("ties in the top binade", [top + q * (i + 0.5) for i in range(L)])
    add("ties in the subnormals", [2.0 ** (T - 2 ** fmt.exp_bits + 2 - M) * (i + 0.5)
                                   for i in range(L)])
    add("group far below: g clamped to gmax", [2.0 ** (T - fmt.gmax - 8) * 1.3] * L)
    add("group gmax below", [2.0 ** (T - fmt.gmax) * 1.7, -2.0 ** (T - fmt.gmax - 3)])
    add("mixed signs one binade", list(rng.uniform(-1, 1, L) * top))
    add("one element per binade", [2.0 ** (T - i) * 1.25 for i in range(L)])
    add("FP32 extremes", [3.4e38, 1.2e-38, -2.0 ** -126])
    return np.stack(out), names


# ------------------------------------------------------------------------ quantizer tb

class QEnv:
    def __init__(self, dut):
        self.dut = dut
        self.man = _manifest()
        self.fmt = _fmt(self.man)
        self.L = self.man["lanes"]
        self.stoch = self.man["stochastic"]
        self.rng = np.random.default_rng(_seed())
        self.expected: deque = deque()
        self.errors: list[str] = []
        self.driver = StreamDriver(dut, "i", self.rng)
        self.monitor = StreamMonitor(dut, "o", self.rng, self.check)
        dut._log.info(f"MLS quantizer: {self.fmt.describe()}, lanes {self.L}, "
                      f"HBFP_MLS_SEED={_seed()}")

    def unpack(self, word: int) -> tuple:
        eb, L = self.fmt.element_bits, self.L
        codes = tuple((word >> (eb * k)) & ((1 << eb) - 1) for k in range(L))
        g = (word >> (eb * L)) & ((1 << self.fmt.group_bits) - 1)
        return g, codes

    def check(self, word: int) -> None:
        got = self.unpack(word)
        if not self.expected:
            self.errors.append(f"unexpected output beat {got}")
            return
        exp, what = self.expected.popleft()
        if got != exp and len(self.errors) < 5:
            self.errors.append(f"{what}: expected (g, codes)={exp}\n  got={got}")
            self.dut._log.error(self.errors[-1])

    async def start(self):
        sig = ["i__valid", "o__ready", "texp"]
        if self.stoch:
            sig += ["rounding", "seed", "reseed"]
        await _clock_reset(self.dut, sig)
        cocotb.start_soon(self.monitor.run())

    async def stream(self, x: np.ndarray, names, *, t: int, rounding: str, seed: int,
                     p_valid: float, p_ready: float, what: str):
        dut, L = self.dut, self.L
        fmt = self.fmt.replace(rounding=rounding, seed=seed, sr_lanes=L, group_size=L,
                               group_axis=-1)
        q = fmt.quantize_array(x, tensor_exp=t)
        g, codes = q.stream()
        for i in range(len(g)):
            self.expected.append(((int(g[i]), tuple(int(c) for c in codes[i])),
                                  f"{what}: group {i} ({names[i]}) x={x[i].tolist()} t={t}"))
        await FallingEdge(dut.clk)
        dut.texp.value = t
        if self.stoch:
            dut.rounding.value = int(rounding == "stochastic")
            dut.seed.value = seed
            dut.reseed.value = 1
            await FallingEdge(dut.clk)
            dut.reseed.value = 0
        self.driver.p_valid, self.monitor.p_ready = p_valid, p_ready
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        words = [sum(int(v) << (32 * k) for k, v in enumerate(row)) for row in bits]
        await self.driver.send(words)
        limit = 50 + int(len(words) * 4 / max(p_ready, 0.05))
        for _ in range(limit):
            if not self.expected or self.errors:
                break
            await FallingEdge(dut.clk)
        assert not self.errors, "\n".join(self.errors[:5])
        assert not self.expected, f"{what}: {len(self.expected)} beats missing"

    def modes(self):
        return ("nearest_even", "stochastic") if self.stoch else ("nearest_even",)


def _dyn_t(fmt: MLSFormat, x: np.ndarray) -> int:
    return fmt.quantize_array(x).tensor_exp


@cocotb.test(skip=_kind() != "mls_quantizer")
async def test_quantizer_edges(dut):
    """Edge classes at several tensor exponents, both roundings, random stalls."""
    env = QEnv(dut)
    await env.start()
    fmt = env.fmt
    for mode in env.modes():
        for t in (-3, 0, 7, -40):
            T = t + fmt.top_exp
            x, names = edge_groups(env.rng, fmt, env.L, T)
            await env.stream(x, names, t=t, rounding=mode,
                             seed=int(env.rng.integers(0, 2**32)),
                             p_valid=float(env.rng.uniform(0.3, 1)),
                             p_ready=float(env.rng.uniform(0.3, 1)), what=f"edge/{mode}/t={t}")


@cocotb.test(skip=_kind() != "mls_quantizer")
async def test_quantizer_random(dut):
    """Random tensors: dynamic tensor exponent, and a static one below the data
    (saturation) and above it (small elements, clamped group shifts)."""
    env = QEnv(dut)
    await env.start()
    n = _n()
    for c, mode in enumerate(env.modes() * 2):
        x = random_groups(env.rng, n // 4 + 1, env.L)
        t = _dyn_t(env.fmt, x) + (0, -2, 0, 5)[c % 4]
        await env.stream(x, ["random"] * len(x), t=t, rounding=mode,
                         seed=int(env.rng.integers(0, 2**32)),
                         p_valid=float(env.rng.uniform(0.3, 1)),
                         p_ready=float(env.rng.uniform(0.3, 1)), what=f"random[{c}]/{mode}")


@cocotb.test(skip=_kind() != "mls_quantizer")
async def test_quantizer_throughput(dut):
    """Input always valid, output always ready: one group per cycle."""
    env = QEnv(dut)
    await env.start()
    x = random_groups(env.rng, 32, env.L)
    await env.stream(x, ["random"] * 32, t=_dyn_t(env.fmt, x), rounding="nearest_even",
                     seed=1, p_valid=1.0, p_ready=1.0, what="throughput")
    acc, out = env.driver.accept_cycles, env.monitor.cycles
    assert acc[-1] - acc[0] == 31 and out[-1] - out[-32] == 31, "bubbles at full rate"


# ------------------------------------------------------------------------------ PE tb

def _pe_case(rng, fmt: MLSFormat, L: int, nkb: int, kind: str):
    """Operands ``a (1, K)``, ``b (K, 1)`` as MLS tensors for a named case."""
    K = nkb * L
    fa, fb = fmt.replace(group_size=L, group_axis=-1), fmt.replace(group_size=L, group_axis=0)
    if kind == "random":
        xa = random_groups(rng, nkb, L).reshape(1, K)
        xb = random_groups(rng, nkb, L).reshape(K, 1)
    elif kind == "zero groups":
        xa = random_groups(rng, nkb, L).reshape(1, K)
        xb = random_groups(rng, nkb, L).reshape(K, 1)
        xa[0, :L] = 0
        xb[-L:, 0] = 0
    elif kind == "max elements":      # every element Vmax, g = 0: the largest |acc|
        s = rng.choice([-1.0, 1.0])
        xa = np.full((1, K), 7.9e3, np.float32)
        xb = np.full((K, 1), s * 7.9e3, np.float32)
    elif kind == "max shifts":        # g = gmax on both sides next to g = 0 groups
        xa = np.full((1, K), 1.0, np.float32)
        xb = np.full((K, 1), -1.0, np.float32)
        xa[0, ::2 * L] = 2.0**20
        xb[L::2 * L, 0] = 2.0**20
    else:                             # alternating signs
        xa = random_groups(rng, nkb, L).reshape(1, K)
        xb = np.abs(random_groups(rng, nkb, L).reshape(K, 1))
        xb[::2] *= -1
    qa = fa.quantize_array(xa)
    qb = fb.quantize_array(xb)
    if kind == "max elements":
        assert (qa.magnitudes() == fmt.vmax).all() and (qa.group_shift == 0).all()
    return qa, qb


@cocotb.test(skip=_kind() != "mls_pe")
async def test_pe(dut):
    """Random and edge-case dot products, random bubbles, against mls_matmul's acc."""
    man = _manifest()
    fmt, P, L, k_max = _fmt(man), man["lanes"], man["group_len"], man["k_max"]
    rng = np.random.default_rng(_seed())
    dut._log.info(f"MLS PE: {fmt.describe()}, lanes {P}, L {L}, k_max {k_max}, "
                  f"acc {man['acc_bits']} bits, HBFP_MLS_SEED={_seed()}")
    await _clock_reset(dut, ["a", "b", "ga", "gb", "ctrl"])
    expected: deque = deque()
    errors: list[str] = []
    got = [0]

    async def monitor():
        while True:
            await FallingEdge(dut.clk)
            await ReadOnly()
            if int(dut.done.value):
                got[0] += 1
                acc = dut.acc.value.to_signed()
                exp, what = expected.popleft()
                if acc != exp and len(errors) < 5:
                    errors.append(f"{what}: expected acc {exp}, got {acc}")
                    dut._log.error(errors[-1])

    cocotb.start_soon(monitor())
    eb = fmt.element_bits
    kinds = ["zero groups", "max elements", "max shifts", "alternating signs"]
    cases = kinds + ["random"] * _n()
    nkb_max = k_max // L
    p_valid = float(rng.uniform(0.3, 0.9))
    for ci, kind in enumerate(cases):
        nkb = nkb_max if kind in ("max elements", "max shifts") else int(
            rng.integers(1, nkb_max + 1))
        qa, qb = _pe_case(rng, fmt, L, nkb, kind)
        _, acc, _ = mls_matmul(qa, qb, k_max=k_max, return_acc=True)
        expected.append((int(acc[0, 0]), f"case {ci} ({kind}, {nkb} groups)"))
        ca, cb = qa.codes.reshape(-1), qb.codes.reshape(-1)
        steps = L // P
        for kb in range(nkb):
            for s in range(steps):
                while rng.random() > p_valid:          # a bubble
                    await FallingEdge(dut.clk)
                    dut.ctrl.value = 0
                await FallingEdge(dut.clk)
                o = kb * L + s * P
                dut.a.value = sum(int(ca[o + j]) << (eb * j) for j in range(P))
                dut.b.value = sum(int(cb[o + j]) << (eb * j) for j in range(P))
                dut.ga.value = int(qa.group_shift[0, kb])
                dut.gb.value = int(qb.group_shift[kb, 0])
                dut.ctrl.value = (1 | (int(s == 0) << 1) | (int(s == steps - 1) << 2)
                                  | (int(kb == 0) << 3) | (int(kb == nkb - 1) << 4))
        if errors:
            break
    await FallingEdge(dut.clk)
    dut.ctrl.value = 0
    await ClockCycles(dut.clk, 12)
    assert not errors, "\n".join(errors)
    assert not expected, f"{len(expected)} outputs never finished"
    dut._log.info(f"{got[0]} dot products matched")
