"""cocotb 2.x testbench of one engine of the accelerator top on its own (Verilator),
against the golden device model: the same scripts and buffer model as the Amaranth
simulator tests (``engine_bench.py``, ``engine_scripts.py``).

Environment:

* ``HBFP_MANIFEST`` -- the engine's manifest (:func:`~hbfp_hw.sim.engine_bench.
  generate_engine`: the accelerator configuration and the engine's name), required;
* ``HBFP_ENGINE_SEED`` -- seed of the script and of the stalls (default 1).

The memories answer on the engine's ports with the timing of Amaranth memory ports: the
addresses, enables and write data are sampled on ``ReadOnly`` before each rising edge and
the read data are driven at the next falling edge. The command stream gets random gaps,
the status stream random back-pressure, sample inputs random gaps.
"""

from __future__ import annotations

import os

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly

from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.manifest import read_manifest
from hbfp_hw.sim.engine_bench import (BufferModel, answer, check_answers, cmd_word,
                                      decode_status, fold, fold_ints, model_step,
                                      standalone)
from hbfp_hw.sim.engine_scripts import SCRIPTS


async def memories(dut, model: BufferModel, name: str, res: dict) -> None:
    """The buffer model on the engine's memory ports, the sample and pulse outputs."""
    g = lambda n: getattr(dut, f"bufs__{n}")          # noqa: E731
    reads = {n: (g(f"{n}_r__addr"), g(f"{n}_r__en"), g(f"{n}_r__data"))
             for n in model.port_names()}
    writes = {n: (g(f"{n}_w__addr"), g(f"{n}_w__data"), g(f"{n}_w__en"))
              for n in model.writable()}
    has_sample = name in ("quantize", "gemm", "bitlayer")
    if has_sample and hasattr(dut, "sample__ready"):
        dut.sample__ready.value = 1
    pulse = dut.soft_reset if name == "buffer_io" else None
    while True:
        await FallingEdge(dut.clk)
        for n, (_, _, d) in reads.items():
            d.value = model.data[n]
        await ReadOnly()
        rd = {n: (int(a.value), int(e.value)) for n, (a, e, _) in reads.items()}
        wr = {n: (int(a.value), d.value.to_unsigned(), int(e.value))
              for n, (a, d, e) in writes.items()}
        if has_sample and int(dut.sample__valid.value):
            res["samples"].append(dut.sample__payload.value.to_unsigned())
        if pulse is not None:
            res["pulses"] += int(pulse.value)
        model.clock(rd, wr)
        res["cycles"] += 1


async def commands(dut, model: BufferModel, script, rng, p_valid: float, p_ready: float,
                   res: dict) -> None:
    for step in script.steps:
        if model_step(step, model, res):
            continue
        if step[0] == "samples":
            valid = getattr(dut, f"{step[1]}__valid")
            payload = getattr(dut, f"{step[1]}__payload")
            ready = getattr(dut, f"{step[1]}__ready", None)   # None: always ready
            k = 0
            while k < len(step[2]):
                await FallingEdge(dut.clk)
                offer = rng.random() < p_valid
                valid.value = int(offer)
                payload.value = int(step[2][k])
                await ReadOnly()
                if offer and (ready is None or int(ready.value)):
                    k += 1
            await FallingEdge(dut.clk)
            valid.value = 0
            continue
        _, op, pl = step
        model.words["stage"][:len(pl)] = list(pl)
        while True:
            await FallingEdge(dut.clk)
            offer = rng.random() < p_valid
            dut.cmd__valid.value = int(offer)
            dut.cmd__payload.value = cmd_word(op, pl)
            await ReadOnly()
            if offer and int(dut.cmd__ready.value):
                break
        await FallingEdge(dut.clk)
        dut.cmd__valid.value = 0
        while True:
            rdy = rng.random() < p_ready
            dut.status__ready.value = int(rdy)
            await ReadOnly()
            if rdy and int(dut.status__valid.value):
                word = dut.status__payload.value.to_unsigned()
                break
            await FallingEdge(dut.clk)
        await FallingEdge(dut.clk)
        dut.status__ready.value = 0
        res["answers"].append(answer(op, decode_status(word), model))


@cocotb.test()
async def engine_against_emulator(dut):
    man = read_manifest(os.environ["HBFP_MANIFEST"], kind="engine")
    cfg = AcceleratorConfig.from_dict(man["config"])
    name = man["engine"]
    seed = int(os.environ.get("HBFP_ENGINE_SEED", "1"))
    rng = np.random.default_rng(seed)
    _, info, specs = standalone(cfg, name)
    script = SCRIPTS[name](cfg, info, rng)
    model = BufferModel(specs, cfg.tile, info)
    p_valid, p_ready = float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 1))
    dut._log.info(f"engine {name}, seed {seed}, {len(script.answers)} commands, "
                  f"p_valid {p_valid:.2f}, p_ready {p_ready:.2f}")
    inputs = ["cmd__valid", "status__ready"]
    inputs += {"stats": ["gemm_sample__valid", "quant_sample__valid", "int_sample__valid",
                         "soft_reset"],
               "gemm": ["soft_reset"]}.get(name, [])
    for n in inputs:
        getattr(dut, n).value = 0
    dut.rst.value = 1
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    await FallingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    res = {"answers": [], "samples": [], "pulses": 0, "checks": [], "cycles": 0}
    cocotb.start_soon(memories(dut, model, name, res))
    await commands(dut, model, script, rng, p_valid, p_ready, res)
    check_answers(script, res["answers"], res["checks"])
    if name == "quantize":
        assert fold(res["samples"]) == script.emu._qstats, "QUANTIZE samples"
    if name == "gemm":
        assert fold(res["samples"]) == script.emu._stats, "GEMM samples"
    if name == "bitlayer":
        assert fold_ints(res["samples"]) == script.emu._istats, "BITLAYER TRACK samples"
    if name == "buffer_io":
        assert res["pulses"] >= 1, "RESET gave no soft_reset pulse"
        assert int(dut.token.value) == script.emu.session, "session token"
    dut._log.info(f"engine {name}: {len(res['answers'])} answers equal the emulator's, "
                  f"{res['cycles']} clocks")
