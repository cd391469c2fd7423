"""One engine of the accelerator top on its own, against the golden device model.

An engine (:mod:`hbfp_hw.gateware.engine`) sees a command stream, a status stream and
memory ports. This module replaces everything around it with Python:

* :class:`BufferModel`: every memory the engine's ports reach (the buffer map with
  mantissa buffers as words of ``tile`` lanes, the INFO ROM, the request staging RAM),
  with the timing of :class:`amaranth.lib.memory.Memory` ports (read data one clock after
  the address, read-before-write, per-lane write enables);
* a *script* of steps built next to an :class:`~hbfp_hw.host.emulator.Emulator`:
  ``("cmd", op, payload)`` runs one command, ``("samples", port, words)`` offers FP32
  samples on an input sample stream (the statistics engine), ``("check", buffers)``
  compares every buffer with a snapshot of the emulator's and ``("load", buffers)``
  loads them from one (the initial state, or what other engines wrote between two
  commands);
* :func:`answer` turns a status beat into the answer payload the response encoder would
  send, so every command is compared with the emulator's answer byte for byte.

Two drivers run a script: :func:`run_amaranth` (Amaranth's simulator) and the cocotb
testbench ``tb_engine.py`` (Verilator), both with random gaps on the command stream and
random back-pressure on the status stream. The engine's own sample outputs (QUANTIZE
inputs, stored GEMM outputs) are folded like the statistics engine folds them and
compared with the emulator's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from amaranth import Module, Signal
from amaranth.lib import data, stream, wiring

from hbfp_hw import protocol as P
from hbfp_hw.gateware.engine import (FIX_BYTES, buffer_geometry, cmd_layout, port_name,
                                     status_layout)
from hbfp_hw.host.codec import Frame, FrameParser
from hbfp_hw.host.emulator import Emulator, _empty_stats, _fold_ints, _fold_stats

__all__ = ["BufferModel", "Script", "cmd_word", "decode_status", "answer", "fold", "fold_ints",
           "check_answers", "model_step", "run_amaranth", "prepared_emulator", "standalone",
           "generate_engine"]


class BufferModel:
    """The memories behind an engine's ``bufs`` ports, as Python integers per word."""

    def __init__(self, specs, tile: int, rom: bytes) -> None:
        self.specs, self.tile = list(specs), tile
        self.words: dict[str, list[int]] = {}
        self.lane_bits: dict[str, int | None] = {}
        for s in self.specs:
            _, depth, gran = buffer_geometry(s, tile)
            self.words[port_name(s)] = [0] * depth
            self.lane_bits[port_name(s)] = gran
        self.words["rom"] = list(rom)
        self.words["stage"] = [0] * P.MAX_PAYLOAD
        self.data = {n: 0 for n in self.words}       # read data presented now

    # -- element view (the emulator's) ------------------------------------------------
    def elements(self, s: P.BufferSpec) -> np.ndarray:
        """Buffer ``s`` as unsigned wire integers, one per element."""
        w = self.words[port_name(s)]
        if s.kind not in P.LANE_KINDS:
            return np.array(w, dtype=np.uint64)
        eb = 8 * s.wire_bytes
        mask = (1 << eb) - 1
        return np.array([(word >> (eb * j)) & mask for word in w for j in range(self.tile)],
                        dtype=np.uint64)

    def load(self, buffers: list[np.ndarray]) -> None:
        """Every buffer from a snapshot of the emulator's (:meth:`Script.snapshot`)."""
        for s in self.specs:
            eb = 8 * s.wire_bytes
            el = buffers[s.id].view(f"u{s.wire_bytes}").astype(np.uint64)
            if s.kind in P.LANE_KINDS:
                el = el.reshape(-1, self.tile)
                self.words[port_name(s)] = [
                    sum(int(v) << (eb * j) for j, v in enumerate(row)) for row in el]
            else:
                self.words[port_name(s)] = [int(v) for v in el]

    def mismatches(self, buffers: list[np.ndarray]) -> list[str]:
        """Buffers whose contents differ from a snapshot (first differing element)."""
        out = []
        for s in self.specs:
            want = buffers[s.id].view(f"u{s.wire_bytes}").astype(np.uint64)
            got = self.elements(s)
            bad = np.flatnonzero(got != want)
            if bad.size:
                i = int(bad[0])
                out.append(f"buffer {s.name}: {bad.size} elements differ, first [{i}]: "
                           f"RTL 0x{int(got[i]):x}, emulator 0x{int(want[i]):x}")
        return out

    def element_bytes(self, buf: int, index: int) -> bytes:
        """One element of buffer id ``buf`` (``len(specs)``: the INFO ROM) as wire bytes."""
        if buf == len(self.specs):
            return bytes([self.words["rom"][index]])
        s = self.specs[buf]
        return int(self.elements(s)[index]).to_bytes(s.wire_bytes, "little")

    # -- one clock ------------------------------------------------------------------
    def clock(self, reads: dict[str, tuple[int, int]],
              writes: dict[str, tuple[int, int, int]]) -> dict[str, int]:
        """Reads ``{name: (addr, en)}`` and writes ``{name: (addr, data, en)}`` sampled at a
        clock edge; returns the read data presented after it (old contents: reads come
        before writes)."""
        for n, (addr, en) in reads.items():
            if en:
                mem = self.words[n]
                self.data[n] = mem[addr] if addr < len(mem) else 0
        for n, (addr, val, en) in writes.items():
            if not en:
                continue
            mem = self.words[n]
            if addr >= len(mem):
                raise AssertionError(f"write to {n} at word {addr}, depth {len(mem)}")
            lb = self.lane_bits[n]
            if lb is None:
                mem[addr] = val
            else:
                for j in range(self.tile):
                    if en >> j & 1:
                        m = ((1 << lb) - 1) << (lb * j)
                        mem[addr] = (mem[addr] & ~m) | (val & m)
        return dict(self.data)

    def port_names(self) -> list[str]:
        return list(self.words)

    def writable(self) -> list[str]:
        return [port_name(s) for s in self.specs]


# ---------------------------------------------------------------------------------------
# Command and status beats
# ---------------------------------------------------------------------------------------
def cmd_word(op: P.Op, payload: bytes) -> int:
    """The command beat of a request (op, length, header decoded as ``args``)."""
    lay = cmd_layout()
    hdr = payload[:P.REQUESTS[op].header_size]
    return (int(op) << lay["op"].offset | len(payload) << lay["length"].offset
            | int.from_bytes(hdr, "little") << lay["args"].offset)


def decode_status(word: int):
    """A status beat as a view (``.code``, ``.fix``, ``.seg0.buf`` ...)."""
    return data.Const(status_layout(), word)


def answer(op: P.Op, st, model: BufferModel) -> tuple[int, bytes]:
    """``(response opcode, payload)`` the encoder sends for status ``st`` of ``op``."""
    if int(st.code):
        return P.ERROR_OPCODE, P.ERROR_LAYOUT.pack(code=int(st.code), opcode=int(op),
                                                   detail=int(st.detail))
    fix = int(st.fix).to_bytes(FIX_BYTES, "little")[:int(st.nfix)]
    body = bytearray(fix)
    for seg in (st.seg0, st.seg1):
        for k in range(int(seg.count)):
            body += model.element_bytes(int(seg.buf), int(seg.offset) + k)
    return int(op) | P.RESPONSE_FLAG, bytes(body)


def fold(words) -> list:
    """Statistics ``[count, non-finite, min key, max key]`` of FP32 bit patterns."""
    st = _empty_stats()
    if len(words):
        _fold_stats(st, np.array(words, dtype=np.uint32).view(np.float32))
    return st


def fold_ints(words) -> list:
    """Statistics ``[count, 0, min, max]`` of int32 words (the integer tracker's)."""
    st = _empty_stats()
    _fold_ints(st, np.array(words, dtype=np.uint32).view(np.int32))
    return st


# ---------------------------------------------------------------------------------------
# Scripts built next to the emulator
# ---------------------------------------------------------------------------------------
@dataclass
class Script:
    """Steps for an engine and what the emulator answered to each command."""

    emu: Emulator
    steps: list = field(default_factory=list)
    answers: list = field(default_factory=list)     # (op, response opcode, payload)
    _seq: int = 0

    def cmd(self, op: P.Op, data: bytes = b"", **fields) -> tuple[int, bytes]:
        """Run a command on the emulator and append it; returns the emulator's answer."""
        payload = P.REQUESTS[op].pack(data, **fields)
        self.steps.append(("cmd", op, payload))
        ans = self.emulate(op, payload)
        self.answers.append((op,) + ans)
        return ans

    def emulate(self, op: P.Op, payload: bytes) -> tuple[int, bytes]:
        """The emulator's answer ``(opcode, payload after the session token)`` (not a
        step: prepares state for :meth:`load`)."""
        self._seq = (self._seq + 1) % 256
        frames = [e for e in FrameParser().feed(
            self.emu.feed(P.encode_frame(self._seq, op, payload))) if isinstance(e, Frame)]
        assert len(frames) == 1, frames
        token, body = P.split_answer(frames[0].payload)
        assert token == self.emu.session
        return frames[0].opcode, body

    def samples(self, port: str, words: list[int]) -> None:
        self.steps.append(("samples", port, list(words)))
        if port == "int_sample":                 # int32 words (BITLAYER TRACK)
            _fold_ints(self.emu._istats, np.array(words, dtype=np.uint32).view(np.int32))
            return
        target = "_qstats" if port == "quant_sample" else "_stats"
        if words:
            _fold_stats(getattr(self.emu, target),
                        np.array(words, dtype=np.uint32).view(np.float32))

    def snapshot(self) -> list[np.ndarray]:
        return [b.copy() for b in self.emu.buffers]

    def check(self) -> None:
        """Compare every buffer with the emulator's now."""
        self.steps.append(("check", self.snapshot()))

    def load(self) -> None:
        """Load every buffer from the emulator's now (the first step of a script; later:
        what other engines wrote, prepared with :meth:`emulate`)."""
        self.steps.append(("load", self.snapshot()))

    def finish(self) -> None:
        self.check()


def prepared_emulator(cfg, rom: bytes | None = None) -> Emulator:
    """An emulator of ``cfg`` whose INFO answers the RTL's ROM (``rom``: fixed fields and
    the description JSON of :func:`~hbfp_hw.gateware.top.info_blob`)."""
    emu = Emulator(cfg)
    if rom is not None:
        n = P.RESPONSES[P.Op.INFO].header_size
        emu._info = bytes(rom[n:])
    return emu


def standalone(cfg, name: str):
    """``(engine, INFO ROM bytes, buffer map)``: engine ``name`` as the top of ``cfg``
    builds it, alone."""
    from hbfp_hw.gateware.top import Accelerator
    acc = Accelerator(cfg)
    acc._MustUse__silence = True          # built for its engines, not elaborated
    return acc.engines([name])[name], acc.info, acc.specs


def generate_engine(cfg, name: str, outdir):
    """Write ``<cfg.name>_<name>.v`` (engine ``name`` alone) and its manifest (kind
    ``engine``); returns ``(verilog path, manifest path, top module name)``."""
    from pathlib import Path

    from amaranth.back import verilog

    from hbfp_hw.manifest import write_manifest
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    eng, _, _ = standalone(cfg, name)
    top = f"{cfg.name}_{name}"
    vpath = outdir / f"{top}.v"
    vpath.write_text(verilog.convert(_Top(eng), name=top, emit_src=False))
    mpath = write_manifest(outdir / f"{top}.json", kind="engine", top=top,
                           config=cfg.to_dict(), ports={}, extra={"engine": name})
    return vpath, mpath, top


class _Top(wiring.Component):
    """An engine with the same ports, its always-ready sample streams given a ``ready``
    port (a constant ``ready`` cannot be a Verilog port): an output's ``ready`` is
    ignored, an input's is 1."""

    def __init__(self, inner) -> None:
        self.inner = inner
        members = {}
        self._samples = []
        for name, mem in inner.signature.members.items():
            sig = mem.signature if mem.is_signature else None
            if isinstance(sig, stream.Signature) and sig.always_ready:
                self._samples.append(name)
                members[name] = mem.flow(stream.Signature(sig.members["payload"].shape))
            else:
                members[name] = mem
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.eng = eng = self.inner
        for name in self.signature.members:
            outer, inner = getattr(self, name), getattr(eng, name)
            if name in self._samples:
                if self.signature.members[name].flow == wiring.Out:
                    m.d.comb += [outer.valid.eq(inner.valid), outer.payload.eq(inner.payload)]
                else:
                    m.d.comb += [inner.valid.eq(outer.valid), inner.payload.eq(outer.payload),
                                 outer.ready.eq(1)]
            elif self.signature.members[name].is_signature:
                wiring.connect(m, wiring.flipped(outer), inner)
            elif self.signature.members[name].flow == wiring.Out:
                m.d.comb += outer.eq(inner)
            else:
                m.d.comb += inner.eq(outer)
        return m


class Mismatch(AssertionError):
    pass


def model_step(step, model: BufferModel, res: dict) -> bool:
    """Carry out a ``check`` or ``load`` step on the buffer model (``True``), or leave a
    step the driver runs (``False``)."""
    if step[0] == "check":
        res["checks"] += [f"after command {len(res['answers'])}: {c}"
                          for c in model.mismatches(step[1])]
        return True
    if step[0] == "load":
        model.load(step[1])
        return True
    return False


def check_answers(script: Script, got: list, model_checks: list[str]) -> None:
    """Raise :class:`Mismatch` naming the first differing command or buffer."""
    for k, ((op, wop, wpay), (gop, gpay)) in enumerate(zip(script.answers, got)):
        if (wop, wpay) != (gop, gpay):
            raise Mismatch(f"command {k} ({op.name}): RTL answered op 0x{gop:02x} "
                           f"{gpay.hex()}, emulator op 0x{wop:02x} {wpay.hex()}")
    if len(got) != len(script.answers):
        raise Mismatch(f"{len(got)} answers for {len(script.answers)} commands")
    if model_checks:
        raise Mismatch("; ".join(model_checks))


# ---------------------------------------------------------------------------------------
# Amaranth simulator driver
# ---------------------------------------------------------------------------------------
def _ports(engine, model: BufferModel):
    bufs = engine.bufs
    reads = {n: getattr(bufs, f"{n}_r") for n in model.port_names()}
    writes = {n: getattr(bufs, f"{n}_w") for n in model.writable()}
    return reads, writes


def run_amaranth(engine, model: BufferModel, script: Script, rng: np.random.Generator, *,
                 p_valid: float = 0.5, p_ready: float = 0.5, max_cycles: int = 200_000,
                 vcd: str | None = None, array_period: float | None = None) -> dict:
    """Run ``script`` on ``engine`` in Amaranth's simulator.

    Returns ``{"answers": [(opcode, payload)], "samples": {port: [words]},
    "pulses": {port: cycles high}, "checks": [buffer mismatches at check steps],
    "cycles": n, "token": the session token output at the end (or None)}``.
    """
    from amaranth.sim import Simulator

    reads, writes = _ports(engine, model)
    out_samples = [n for n in ("sample",) if hasattr(engine, n)]
    mem = engine.signature.members
    pulses = [n for n in ("soft_reset",) if n in mem and mem[n].flow is wiring.Flow.Out]
    res = {"answers": [], "samples": {n: [] for n in out_samples},
           "pulses": {n: 0 for n in pulses}, "checks": [], "cycles": 0, "token": None}
    token = [engine.token] if "token" in mem else []
    sig_r = [(n, p.addr, p.en) for n, p in reads.items()]
    sig_w = [(n, p.addr, p.data, p.en) for n, p in writes.items()]
    flat = [s for _, *ss in sig_r for s in ss] + [s for _, *ss in sig_w for s in ss]
    watch = [getattr(engine, n).valid for n in out_samples] + \
            [getattr(engine, n).payload for n in out_samples] + \
            [getattr(engine, n) for n in pulses] + token

    async def memories(ctx):
        for n in out_samples:          # (sample ports are always ready by contract)
            if isinstance(getattr(engine, n).ready, Signal):
                ctx.set(getattr(engine, n).ready, 1)
        async for vals in ctx.tick().sample(*flat, *watch):
            vals = vals[2:]
            rd = {}
            k = 0
            for n, _, _ in sig_r:
                rd[n] = (vals[k], vals[k + 1])
                k += 2
            wr = {}
            for n, _, _, _ in sig_w:
                wr[n] = (vals[k], vals[k + 1], vals[k + 2])
                k += 3
            no = len(out_samples)
            for j, n in enumerate(out_samples):
                if vals[k + j]:
                    res["samples"][n].append(int(vals[k + no + j]))
            for j, n in enumerate(pulses):
                res["pulses"][n] += int(vals[k + 2 * no + j])
            if token:
                res["token"] = int(vals[-1])
            for n, v in model.clock(rd, wr).items():
                ctx.set(reads[n].data, v)
            res["cycles"] += 1
            if res["cycles"] > max_cycles:
                raise Mismatch(f"no end after {max_cycles} clocks")

    async def commands(ctx):
        cmd, st = engine.cmd, engine.status
        for step in script.steps:
            if model_step(step, model, res):
                continue
            if step[0] == "samples":
                s = getattr(engine, step[1])
                for w in step[2]:
                    while rng.random() > p_valid:
                        ctx.set(s.valid, 0)
                        await ctx.tick()
                    ctx.set(s.valid, 1)
                    ctx.set(s.payload, w)
                    if isinstance(s.ready, Signal):
                        await ctx.tick().until(s.ready)
                    else:
                        await ctx.tick()
                ctx.set(s.valid, 0)
                continue
            _, op, payload = step
            model.words["stage"][:len(payload)] = list(payload)
            while rng.random() > p_valid:
                await ctx.tick()
            ctx.set(cmd.payload.as_value(), cmd_word(op, payload))
            ctx.set(cmd.valid, 1)
            await ctx.tick().until(cmd.ready)
            ctx.set(cmd.valid, 0)
            while True:
                rdy = int(rng.random() < p_ready)
                ctx.set(st.ready, rdy)
                _, _, v, word = await ctx.tick().sample(st.valid, st.payload.as_value())
                if v and rdy:
                    break
            ctx.set(st.ready, 0)
            res["answers"].append(answer(op, decode_status(word), model))
        for _ in range(8):
            await ctx.tick()

    sim = Simulator(engine)
    sim.add_clock(1e-6)
    if array_period:        # the MAC array's own domain (array_clock_hz), sync at 1 us
        sim.add_clock(array_period, domain="array")
    sim.add_process(memories)
    sim.add_testbench(commands)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    return res
