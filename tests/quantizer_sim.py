"""Amaranth-simulator harness for the quantizer: drive FP32 blocks, collect BFP beats.

Used by the ``test_quantizer_*`` tests. The expected values come from the golden model
(:func:`hbfp_hw.quantize`), never from the gateware.
"""

from __future__ import annotations

import numpy as np
from amaranth.sim import Simulator

from hbfp_hw.quantize import quantize as golden_quantize
from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import ROUNDING_MODES
from hbfp_hw.gateware.quantizer import Quantizer


def golden_stream(cfg: QuantizerConfig, bits: np.ndarray, *, rounding: str | None = None,
                  seed: int | None = None, exponent: int | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(codes[nb], mantissas[nb, block])`` of the golden model for raw FP32 ``bits``
    (``exponent``: the static shared exponent, golden ``quantize(..., exponent=E)``)."""
    fmt = cfg.golden_format(rounding=rounding, seed=seed if cfg.has_stochastic else None)
    x = np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32).reshape(-1)
    t = golden_quantize(x, fmt, nonfinite="flag", exponent=exponent)
    return t.stream()


def simulate(cfg: QuantizerConfig, bits: np.ndarray, *, rng: np.random.Generator,
             rounding: str | None = None, seed: int | None = None, p_valid: float = 1.0,
             p_ready: float = 1.0, max_cycles: int | None = None, quantizer=None,
             static_code: int | None = None):
    """Run the unit on ``bits`` (``(nblocks, block)`` uint32); return beats and cycles.

    ``static_code``: drive ``static_en`` high with this biased exponent code (the unit
    must be built with ``static_exponent``); ``None`` drives ``static_en`` low if the
    port exists.

    Returns ``(codes, invalid, mantissas, first, last, cycles)`` with one entry per output
    beat (mantissas ``(nbeats, lanes)``) and the cycle count from first to last beat.
    """
    dut = quantizer if quantizer is not None else Quantizer(cfg)
    lanes = cfg.lanes
    beats = np.asarray(bits, dtype=np.uint32).reshape(-1, lanes)
    nbeats = len(beats)
    packed = [sum(int(v) << (32 * k) for k, v in enumerate(b)) for b in beats]
    got: list[tuple] = []
    cycles = {"first": None, "last": None, "n": 0}
    limit = max_cycles or (nbeats * 40 + 200)

    async def driver(ctx):
        if cfg.runtime_rounding:
            ctx.set(dut.rounding, ROUNDING_MODES.index(rounding or cfg.format.rounding))
        if seed is not None and cfg.has_stochastic:
            ctx.set(dut.seed, seed)
            ctx.set(dut.reseed, 1)
            await ctx.tick()
            ctx.set(dut.reseed, 0)
        if cfg.static_exponent:
            ctx.set(dut.static_en, int(static_code is not None))
            ctx.set(dut.static_code, 0 if static_code is None else static_code)
        for word in packed:
            while rng.random() >= p_valid:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
            ctx.set(dut.i.valid, 1)
            ctx.set(dut.i.payload.as_value(), word)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def monitor(ctx):
        man_w = cfg.man_bits
        n = 0
        while len(got) < nbeats:
            n += 1
            if n > limit:
                raise AssertionError(f"timeout: {len(got)} of {nbeats} beats after {n} cycles")
            ready = int(rng.random() < p_ready)
            ctx.set(dut.o.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid,
                                                           dut.o.payload.as_value())
            if valid and ready:
                if cycles["first"] is None:
                    cycles["first"] = n
                cycles["last"] = n
                p = int(payload)
                mans = []
                for k in range(lanes):
                    v = (p >> (k * man_w)) & ((1 << man_w) - 1)
                    mans.append(v - (1 << man_w) if v >> (man_w - 1) else v)
                off = lanes * man_w
                code = (p >> off) & ((1 << cfg.exp_bits) - 1)
                off += cfg.exp_bits
                inv, first, last = (p >> off) & 1, (p >> (off + 1)) & 1, (p >> (off + 2)) & 1
                got.append((code, inv, mans, first, last))
        cycles["n"] = n

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(driver)
    sim.add_testbench(monitor)
    sim.run()
    codes = np.array([g[0] for g in got])
    inv = np.array([g[1] for g in got], dtype=bool)
    mans = np.array([g[2] for g in got]).reshape(nbeats, lanes)
    first = np.array([g[3] for g in got], dtype=bool)
    last = np.array([g[4] for g in got], dtype=bool)
    return codes, inv, mans, first, last, cycles


def check_against_golden(cfg: QuantizerConfig, bits: np.ndarray, result, *,
                         rounding: str | None = None, seed: int | None = None,
                         names: list[str] | None = None, exponent: int | None = None) -> None:
    """Assert the simulated beats equal the golden model's blocks bit for bit."""
    codes, inv, mans, first, last, _ = result
    bpb = cfg.beats_per_block
    nb = len(bits)
    gcodes, gman = golden_stream(cfg, bits, rounding=rounding, seed=seed, exponent=exponent)
    assert first.tolist() == [i % bpb == 0 for i in range(nb * bpb)]
    assert last.tolist() == [i % bpb == bpb - 1 for i in range(nb * bpb)]
    hcodes = codes.reshape(nb, bpb)
    assert (hcodes == hcodes[:, :1]).all(), "exponent code changes inside a block"
    hinv = inv.reshape(nb, bpb)[:, 0]
    hman = mans.reshape(nb, cfg.block_size)
    for b in range(nb):
        exp_inv = gcodes[b] == cfg.format.exp_invalid_code
        if (hcodes[b, 0] != gcodes[b] or hinv[b] != exp_inv
                or not np.array_equal(hman[b], gman[b])):
            label = f" ({names[b]})" if names else ""
            raise AssertionError(
                f"block {b}{label} mismatch (rounding={rounding or cfg.format.rounding}, "
                f"exponent={exponent}):\n"
                f"  input  = {[hex(int(v)) for v in bits[b]]}\n"
                f"  golden: code={gcodes[b]} invalid={exp_inv} man={gman[b].tolist()}\n"
                f"  gateware: code={hcodes[b, 0]} invalid={hinv[b]} man={hman[b].tolist()}")
