"""cocotb 2.x testbenches of the LUQ units, checked bit for bit against the golden model.

Run through :func:`hbfp_hw.sim.runner.run_cocotb` (see ``tests/test_luq_cocotb.py``), one
cocotb test per unit. The top is one unit (ports ``i``, ``o``, ...; run only its test
with ``testcase``) or a wrapper holding both (streams ``q_i``/``q_o`` and
``pe_i``/``pe_o``: one Verilator build for both tests). The configuration comes from the
manifests written next to the Verilog. Environment:

* ``HBFP_MANIFEST_Q`` / ``HBFP_MANIFEST_PE`` — manifests of the quantizer / the shift PE
  (``HBFP_MANIFEST`` if unset);
* ``HBFP_LUQ_Q_PREFIX`` / ``HBFP_LUQ_PE_PREFIX`` — prefix of the unit's stream ports in
  the top (default none; the wrapper's are ``q_`` and ``pe_``);
* ``HBFP_LUQ_SEED`` — stimulus seed (default 1; printed in the log);
* ``HBFP_LUQ_N`` — random elements of the quantizer test (default 20000);
* ``HBFP_LUQ_GEMMS`` — random GEMMs of the shift-PE test (default 12).

Both tests drive the input stream with random gaps and take the output under random
back-pressure (:mod:`hbfp_hw.sim.streams`); the quantizer test also checks one beat per
cycle with no stalls.
"""

from __future__ import annotations

import os
from collections import deque

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge

from hbfp_hw.formats import BFPFormat
from hbfp_hw.luq import LUQFormat, luq_matmul, luq_quantize
from hbfp_hw.manifest import read_manifest
from hbfp_hw.quantize import quantize
from hbfp_hw.sim.quantizer_vectors import random_blocks
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor

SHIFT_BITS = 6


def _env():
    seed = int(os.environ.get("HBFP_LUQ_SEED", "1"))
    return seed, np.random.default_rng(seed)


def _manifest(unit: str, kind: str) -> dict:
    path = os.environ.get(f"HBFP_MANIFEST_{unit}") or os.environ["HBFP_MANIFEST"]
    return read_manifest(path, kind=kind)


def _prefix(unit: str) -> str:
    return os.environ.get(f"HBFP_LUQ_{unit}_PREFIX", "")


async def _reset(dut):
    """Clock, reset, every unit's streams idle."""
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    for p in {_prefix("Q"), _prefix("PE")}:
        if hasattr(dut, f"{p}i__valid"):
            getattr(dut, f"{p}i__valid").value = 0
            getattr(dut, f"{p}o__ready").value = 0
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


class Expect:
    """Queue of expected output words (None: any word, e.g. the codes of a stream
    the golden model flags invalid); collects the first mismatches."""

    def __init__(self, log):
        self.q: deque = deque()
        self.errors: list[str] = []
        self.log = log

    def __call__(self, word: int) -> None:
        if not self.q:
            self.errors.append(f"unexpected output word {word:#x}")
            return
        exp, what = self.q.popleft()
        if exp is not None and word != exp and len(self.errors) < 5:
            self.errors.append(f"{what}: expected {exp:#x}, got {word:#x}")
            self.log.error(self.errors[-1])

    async def drain(self, dut, limit: int) -> None:
        for _ in range(limit):
            if not self.q or self.errors:
                break
            await FallingEdge(dut.clk)
        assert not self.errors, "\n".join(self.errors)
        assert not self.q, f"{len(self.q)} output words missing after {limit} cycles"


# --------------------------------------------------------------------- quantizer
def _finite_values(rng, n: int) -> np.ndarray:
    """FP32 bit patterns: random blocks (NaN/Inf replaced by 0) and exact levels."""
    bits = random_blocks(-(-n // 16), 16, rng).reshape(-1)[:n]
    bad = (bits & 0x7F800000) == 0x7F800000
    bits[bad] = 0
    return bits


@cocotb.test()
async def test_luq_quantizer(dut):
    """Streams with new seeds and scales (per-tensor, in-hindsight with saturation,
    zero, subnormal-level), random stalls; ``amax`` and ``invalid``; full throughput."""
    man = _manifest("Q", "luq_quantizer")
    fmt = LUQFormat.from_dict(man["config"])
    L, nb = fmt.lanes, fmt.bits
    seed, rng = _env()
    dut._log.info(f"{fmt.describe()}; HBFP_LUQ_SEED={seed}")
    exp = Expect(dut._log)
    drv = StreamDriver(dut, _prefix("Q") + "i", rng)
    mon = StreamMonitor(dut, _prefix("Q") + "o", rng, exp)
    await _reset(dut)
    dut.reseed.value = 0
    dut.alpha.value = 0
    cocotb.start_soon(mon.run())

    async def stream(bits: np.ndarray, max_abs, *, pv: float, pr: float, what: str,
                     check_stats: bool = True):
        s = int(rng.integers(0, 2**32))
        x = bits.view(np.float32)
        q = luq_quantize(x, fmt.replace(seed=s), max_abs=max_abs, nonfinite="flag")
        await FallingEdge(dut.clk)
        dut.alpha.value = int(np.float32(q.alpha).view(np.uint32))
        dut.seed.value = s
        dut.reseed.value = 1
        await FallingEdge(dut.clk)
        dut.reseed.value = 0
        codes = q.codes[0].reshape(-1, L)
        for b, row in enumerate(codes):
            exp.q.append((None if q.invalid else sum(int(c) << (nb * k) for k, c in enumerate(row)),
                          f"{what} beat {b} x={[hex(int(v)) for v in bits[b * L:(b + 1) * L]]}"
                          f" alpha={q.alpha!r}"))
        drv.p_valid, mon.p_ready = pv, pr
        await drv.send([sum(int(v) << (32 * k) for k, v in enumerate(r))
                        for r in bits.reshape(-1, L)])
        await exp.drain(dut, 100 + int(len(codes) * 4 / pr))
        for _ in range(6):
            await FallingEdge(dut.clk)
        assert int(dut.invalid.value) == int(q.invalid), what
        if check_stats and not q.invalid:
            want = int(np.float32(q.max_abs).view(np.uint32))
            got = int(dut.amax.value)
            assert got == want, f"{what}: amax {got:#x} != {want:#x}"

    # exact levels and neighbours at alpha = 1 (max 64), both signs, zeros, subnormals
    lv = 2.0 ** np.arange(-3, 7)
    edge = np.concatenate([lv, -lv, lv * 1.5, lv * np.float32(1 + 2**-23), lv * 0.999999,
                           [0.0, -0.0, 1e-40, -1e-45, 64.0]]).astype(np.float32)
    edge = np.resize(edge, -(-edge.size // L) * L).view(np.uint32)
    await stream(edge, 64.0, pv=0.7, pr=0.6, what="edge alpha=1")
    await stream(edge, None, pv=0.7, pr=0.6, what="edge per-tensor")
    await stream(edge, 2.0, pv=0.5, pr=0.5, what="edge hindsight (saturating)")
    await stream(edge, 0.0, pv=0.9, pr=0.9, what="alpha 0")
    await stream(edge, 2.0**-120, pv=0.9, pr=0.9, what="alpha smallest normal")
    # random streams, random scales and stalls
    total = int(os.environ.get("HBFP_LUQ_N", "20000"))
    per = max(L, (total // 8) // L * L)
    done = 0
    while done < total:
        bits = _finite_values(rng, per)
        xmax = float(np.max(np.abs(bits.view(np.float32))))
        kind = int(rng.integers(0, 3))
        mx = None if kind == 0 else min(xmax * 2.0 ** float(rng.uniform(-3, 3)), 3.4e38)
        pv, pr = float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 1))
        await stream(bits, mx, pv=pv, pr=pr,
                     what=f"random[{done}] max_abs={mx} pv={pv:.2f} pr={pr:.2f}")
        done += per
    # NaN/Inf: flagged
    bad = edge.copy()
    bad[3] = 0x7FC00000
    await stream(bad, None, pv=1, pr=1, what="nan")
    # throughput: one beat per cycle in and out
    bits = _finite_values(rng, 64 * L)
    drv.accept_cycles.clear()
    mon.cycles.clear()
    await stream(bits, None, pv=1.0, pr=1.0, what="throughput")
    acc = drv.accept_cycles
    assert acc[-1] - acc[0] == 63, f"input bubbles: 64 beats in {acc[-1] - acc[0] + 1} cycles"
    assert mon.cycles[-1] - mon.cycles[-64] == 63, "output bubbles"
    dut._log.info(f"luq quantizer: {done} random elements and the edge streams passed")


# ---------------------------------------------------------------------- shift PE
class PEPacker:
    def __init__(self, cfg: dict, fmt: LUQFormat):
        self.bits, self.mb = fmt.bits, cfg["man_bits"]
        self.L, self.C = cfg["lanes"], cfg["cols"]
        w_code = self.bits * self.L
        w_b = self.mb * self.L * self.C
        self.off_b = w_code
        self.off_sh = w_code + w_b
        self.off_fl = self.off_sh + SHIFT_BITS * self.C

    def pack(self, code, b, shift, kfirst, klast, ofirst, olast) -> int:
        v = 0
        for i, c in enumerate(code):
            v |= int(c) << (self.bits * i)
        mask = (1 << self.mb) - 1
        for c in range(self.C):
            for i in range(self.L):
                v |= (int(b[c][i]) & mask) << (self.off_b + (c * self.L + i) * self.mb)
        for c in range(self.C):
            v |= int(shift[c]) << (self.off_sh + SHIFT_BITS * c)
        for k, f in enumerate((kfirst, klast, ofirst, olast)):
            v |= int(f) << (self.off_fl + k)
        return v


def pe_beats(a, b, packer: PEPacker, tile: int):
    """Input words and expected output words for ``luq_matmul(a, b)``."""
    _, acc, eref = luq_matmul(a, b, return_acc=True)
    S = a.fmt.samples
    L, C = packer.L, packer.C
    M, K = a.shape
    N = b.shape[1]
    Kp = b.layout.padded[0]
    nkb = Kp // tile
    codes = np.zeros((S, M, Kp), np.uint8)
    codes[:, :, :K] = a.codes
    mb = b.mantissas
    bn = b.layout.block[1]
    words, outs = [], []
    for i in range(M):
        for j0 in range(0, N, C):
            for kb in range(nkb):
                sh = [min(int(eref[j0 + c] - b.exponents[kb, (j0 + c) // bn]), 62)
                      for c in range(C)]
                nbt = S * tile // L
                n = 0
                for s in range(S):
                    for t in range(tile // L):
                        k0 = kb * tile + t * L
                        words.append(packer.pack(
                            codes[s, i, k0:k0 + L],
                            [[mb[k0 + lane, j0 + c] for lane in range(L)] for c in range(C)],
                            sh, n == 0, n == nbt - 1, kb == 0, kb == nkb - 1))
                        n += 1
            outs.append([int(acc[i, j0 + c]) for c in range(C)])
    return words, outs


@cocotb.test()
async def test_luq_shift_pe(dut):
    """Random GEMMs dX = dY W / dW = dY^T X (dY in LUQ codes, the other operand HBFP
    with a wide exponent spread, so alignment shifts reach 62), random stalls."""
    man = _manifest("PE", "luq_shift_pe")
    cfg = man["config"]
    fmt = LUQFormat.from_dict(cfg["format"])
    T, C, mbits = cfg["tile"], cfg["cols"], cfg["man_bits"]
    acc_bits = man["acc_bits"]
    seed, rng = _env()
    dut._log.info(f"shift PE {cfg}; HBFP_LUQ_SEED={seed}")
    packer = PEPacker(cfg, fmt)
    exp = Expect(dut._log)
    drv = StreamDriver(dut, _prefix("PE") + "i", rng)
    mon = StreamMonitor(dut, _prefix("PE") + "o", rng, exp)
    await _reset(dut)
    if hasattr(dut, "reseed"):
        dut.reseed.value = 0
    cocotb.start_soon(mon.run())
    bfmt = BFPFormat(man_bits=mbits, exp_bits=8, block_shape=(T, 1), block_axes=(0, 1))
    amask = (1 << acc_bits) - 1
    runs = int(os.environ.get("HBFP_LUQ_GEMMS", "12"))
    for r in range(runs):
        M = int(rng.integers(1, 4))
        K = int(rng.integers(1, min(cfg["k_max"], 4 * T) + 1))
        N = C * int(rng.integers(1, 3))
        dy = rng.standard_normal((M, K)) * np.exp(rng.uniform(-6, 3, (M, 1)))
        if r % 3 == 0:
            dy[:, : K // 2] = 0
        other = rng.standard_normal((K, N)) * 2.0 ** rng.integers(-40, 40, (K, 1))
        if r % 4 == 1:
            other = rng.choice([-1.0, 1.0], (K, N)) * (2.0 - 2.0 ** -(mbits - 2))  # +-mmax
        a = luq_quantize(dy.astype(np.float32), fmt.replace(seed=int(rng.integers(0, 2**32))))
        b = quantize(other.astype(np.float32), bfmt)
        words, outs = pe_beats(a, b, packer, T)
        for n, o in enumerate(outs):
            exp.q.append((sum((v & amask) << (acc_bits * c) for c, v in enumerate(o)),
                          f"gemm {r} ({M}x{K}x{N}) output beat {n}"))
        pv, pr = float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 1))
        drv.p_valid, mon.p_ready = pv, pr
        await drv.send(words)
        await exp.drain(dut, 200 + int(len(words) * 4 / pr))
    dut._log.info(f"shift PE: {runs} GEMMs passed")
