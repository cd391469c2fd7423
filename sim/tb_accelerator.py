"""cocotb 2.x testbench of the generated accelerator top, frame by frame against the
golden device model (:class:`hbfp_hw.host.emulator.Emulator`).

Run through :func:`hbfp_hw.sim.runner.run_cocotb` (see ``tests/test_accelerator_cocotb.py``).
The configuration and the buffer map come from the manifest written next to the Verilog
(``HBFP_MANIFEST``), never from a hand-written copy. Environment:

* ``HBFP_MANIFEST`` -- path of the accelerator manifest (required);
* ``HBFP_ACC_SEED`` -- seed of the stimulus and of the stalls (default 1; printed in the
  log and in every failure message);
* ``HBFP_ACC_SAMPLES`` -- rounds of the random frame sequence (default 4);
* ``HBFP_ACC_P_VALID`` / ``HBFP_ACC_P_READY`` -- probability per cycle of offering the
  next request byte on ``i`` / of taking an answer byte on ``o`` (default: drawn per
  frame in [0.2, 1]).

Every request frame is built with :mod:`hbfp_hw.protocol`, fed to the emulator and
driven into the top's byte port ``i`` with random valid gaps (:class:`StreamDriver`)
while :class:`StreamMonitor` takes the answer from ``o`` under random back-pressure; the
answer bytes must equal the emulator's, and nothing more may come out. One round:
WRITE random FP32 tensors (NaN/Inf/subnormals now and then) into ``fp_in``; QUANTIZE
them into ``op0`` (slot 0) and ``op1`` (slot 1) with RETURN; GEMMs with STORE on slot 0 x
slot 0, slot 1 x slot 1 and slot 0 x slot 1, each in an orientation (TRANS_A / TRANS_B)
the shapes allow, orientations not seen yet first, each READ back from ``out``;
READ_STATS; error frames (unknown opcode, bad length, bad buffer, bad CRC, out of range,
GEMM with a bad slot, flags or shapes that do not chain); retransmitted requests (same
SEQ and bytes: answered from the record, not executed again); RESET, then reads of the
cleared buffers and statistics.

Not compared here (the RTL differs from the emulator by design, see
:func:`hbfp_hw.gateware.top.unsupported`): INFO's answer (the RTL adds a ``"gateware"``
key), rounding modes a slot's quantizer does not build, ACCUMULATE beyond the
accumulator capacity. ACCUMULATE / EXT_EREF and STATIC_EXP are left to
``tests/test_accelerator_top.py``.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import ROUNDING_MODES
from hbfp_hw.gateware.top import gemm_slots, quant_rounding
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.manifest import read_manifest
from hbfp_hw.sim.streams import StreamDriver, StreamMonitor, start_byte_top

G, Q, S = P.GemmFlag, P.QuantizeFlag, P.StatsFlag


def _load() -> tuple[dict, AcceleratorConfig, dict[str, P.BufferSpec]]:
    """Manifest, configuration and buffer map (by name) of the build under test."""
    man = read_manifest(os.environ["HBFP_MANIFEST"], kind="accelerator")
    cfg = AcceleratorConfig.from_dict(man["config"])
    # the manifest's device description must be what the emulator derives from the
    # config (else the comparison below would test a different device)
    assert P.device_hash(cfg).hex() == man["device_hash"], "manifest config round trip"
    specs = P.buffer_map(cfg)
    assert [b.to_json() for b in specs] == man["device"]["buffers"], "manifest buffer map"
    ports = man["ports"]
    assert ports["i"] == {"dir": "in", "stream": 8}, ports
    assert ports["o"] == {"dir": "out", "stream": 8}, ports
    return man, cfg, {b.name: b for b in specs}


def _describe(frame: bytes) -> str:
    """One line naming a frame: SEQ, opcode, decoded request fields."""
    try:
        seq, op, payload = P.decode_frame(frame)
    except ValueError as e:
        return f"not one frame ({e}): {frame[:24].hex()}"
    try:
        o = P.Op(op)
        fields, data = P.REQUESTS[o].unpack(payload)
        return f"seq={seq} {o.name} {fields} +{len(data)} data bytes"
    except ValueError:
        return f"seq={seq} op=0x{op:02x} LEN={len(payload)} payload={payload[:16].hex()}"


def _describe_answer(ans: bytes) -> str:
    try:
        seq, op, payload = P.decode_frame(ans)
        token, body = P.split_answer(payload)
    except ValueError as e:
        return f"{len(ans)} bytes, not one answer frame ({e}): {ans[:24].hex()}"
    if op == P.ERROR_OPCODE and len(body) >= 6:
        code, opc, detail = struct.unpack_from("<BBI", body, 0)
        try:
            name = P.ErrorCode(code).name
        except ValueError:
            name = str(code)
        return (f"{len(ans)} bytes: error {name} op=0x{opc:02x} detail={detail} "
                f"token=0x{token:08x}")
    return (f"{len(ans)} bytes: op=0x{op:02x} seq={seq} token=0x{token:08x} "
            f"head={body[:16].hex()}")


class Env:
    """Clock, reset, byte-port driver/monitor, emulator and the frame comparison."""

    def __init__(self, dut):
        self.dut = dut
        self.manifest, self.cfg, self.B = _load()
        self.seed = int(os.environ.get("HBFP_ACC_SEED", "1"))
        self.rng = np.random.default_rng(self.seed)
        self.emu = Emulator(self.cfg)
        self.rx = bytearray()
        self.driver = StreamDriver(dut, "i", self.rng, 1.0)
        self.monitor = StreamMonitor(dut, "o", self.rng, self.rx.append, 1.0)
        self.seq = 0
        self.frames = 0
        self.last: bytes | None = None
        self.cycles_total = 0
        self.error_kinds: Counter = Counter()
        # QUANTIZE rounding modes the build implements per slot (others: UNSUPPORTED)
        self.rounding = quant_rounding(self.cfg)
        pv, pr = os.environ.get("HBFP_ACC_P_VALID"), os.environ.get("HBFP_ACC_P_READY")
        self.p_fixed = (float(pv) if pv else None, float(pr) if pr else None)
        dut._log.info(f"accelerator test: {self.manifest['top']}, formats "
                      f"{[f.name for f in self.cfg.formats]}, HBFP_ACC_SEED={self.seed}")

    async def start(self) -> None:
        await start_byte_top(self.dut, self.monitor)

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq

    def req(self, op: P.Op, data: bytes = b"", **fields) -> bytes:
        return P.encode_frame(self.next_seq(), op, P.REQUESTS[op].pack(data, **fields))

    def _probs(self) -> tuple[float, float]:
        r = self.rng
        mode = r.random()
        if mode < 0.15:                  # full rate both ways now and then
            pv, pr = 1.0, 1.0
        else:
            pv, pr = float(r.uniform(0.2, 1.0)), float(r.uniform(0.2, 1.0))
        return (self.p_fixed[0] if self.p_fixed[0] is not None else pv,
                self.p_fixed[1] if self.p_fixed[1] is not None else pr)

    async def transact(self, frame: bytes, what: str) -> bytes:
        """Send ``frame`` under random stalls; the answer must be the emulator's."""
        dut = self.dut
        self.frames += 1
        expected = self.emu.feed(frame)
        assert expected, f"{what}: the emulator gives no answer to {_describe(frame)}"
        pv, pr = self._probs()
        self.driver.p_valid, self.monitor.p_ready = pv, pr
        ctx = (f"HBFP_ACC_SEED={self.seed}, frame #{self.frames} ({what}), "
               f"p_valid={pv:.2f} p_ready={pr:.2f}\n  request {_describe(frame)}\n"
               f"  request bytes {frame.hex()}")
        assert not self.rx, f"{ctx}\n  stray bytes before the request: {bytes(self.rx).hex()}"
        start = self.monitor.cycle
        await self.driver.send(list(frame))
        # generous: every byte each way at the stall rates, plus computation
        limit = (200_000 + int(8 * len(frame) / pv) + int(8 * len(expected) / pr))
        waited = 0
        while len(self.rx) < len(expected) and waited < limit:
            await ClockCycles(dut.clk, 8)
            waited += 8
        if len(self.rx) < len(expected):
            raise AssertionError(
                f"{ctx}\n  timeout after {waited} cycles: {len(self.rx)} of "
                f"{len(expected)} answer bytes\n  got      {bytes(self.rx).hex()}\n"
                f"  expected {expected.hex()}")
        # the answer is complete: busy must fall and nothing more may come out
        for _ in range(64):
            await FallingEdge(dut.clk)
            await ReadOnly()
            if not int(dut.busy.value):
                break
        await ClockCycles(dut.clk, 16)
        await ReadOnly()
        busy = int(dut.busy.value)
        got = bytes(self.rx)
        self.rx.clear()
        self.cycles_total += self.monitor.cycle - start
        if got != expected:
            n = min(len(got), len(expected))
            first = next((k for k in range(n) if got[k] != expected[k]), n)
            raise AssertionError(
                f"{ctx}\n  RTL answer != emulator answer (first difference at byte "
                f"{first})\n  RTL      {_describe_answer(got)}\n  emulator "
                f"{_describe_answer(expected)}\n  RTL bytes      {got.hex()}\n"
                f"  emulator bytes {expected.hex()}")
        assert not busy, f"{ctx}\n  busy still high after the answer"
        await FallingEdge(self.dut.clk)
        self.last = frame
        return got

    # -- stimulus ---------------------------------------------------------------------
    def tensor(self, n: int, specials: bool) -> np.ndarray:
        """``n`` FP32 values: random magnitudes, zero runs, subnormals, maybe NaN/Inf."""
        r = self.rng
        x = (r.standard_normal(n) * np.exp2(r.integers(-20, 20, n))).astype(np.float32)
        k = int(r.integers(0, n - 8))
        x[k:k + int(r.integers(1, 8))] = 0.0
        sub = r.integers(0, n, 3)
        x[sub] = (r.standard_normal(3) * 2.0**-130).astype(np.float32)
        if specials:
            x[int(r.integers(0, n))] = r.choice([np.nan, np.inf, -np.inf])
        return x

    async def write_fp_in(self, x: np.ndarray, what: str) -> None:
        """``x`` into ``fp_in`` from element 0, in one to three WRITEs."""
        s = self.B["fp_in"]
        n = len(x)
        inner = self.rng.integers(1, n, int(self.rng.integers(0, 3)))
        cuts = sorted({0, n, *(int(c) for c in inner)})
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            await self.transact(self.req(P.Op.WRITE, x[lo:hi].tobytes(), buffer=s.id,
                                         offset=lo), f"{what}: WRITE fp_in[{lo}:{hi}]")

    def shape(self) -> tuple[int, int]:
        """A tensor shape fitting fp_in whose GEMM outputs fit ``out``."""
        r = self.rng
        cap = min(32, self.cfg.input_depth)
        if r.random() < 0.4:                         # square: every orientation valid
            n = int(r.integers(1, int(np.sqrt(self.cfg.input_depth)) + 1))
            n = min(n, cap)
            return n, n
        while True:
            rows, cols = (int(v) for v in r.integers(1, cap + 1, 2))
            if rows * cols <= self.cfg.input_depth:
                return rows, cols

    async def quantize(self, slot: int, dst: int, shape: tuple[int, int], what: str,
                       flags: int = int(Q.RETURN)) -> None:
        rows, cols = shape
        src = int(self.rng.integers(0, self.cfg.input_depth - rows * cols + 1))
        rnd = int(self.rng.choice(self.rounding[slot]))
        fr = self.req(P.Op.QUANTIZE, slot=slot, dst=dst, flags=flags, rows=rows, cols=cols,
                      src_offset=src, rounding=rnd, seed=int(self.rng.integers(0, 2**32)),
                      exp_code=0)
        await self.transact(fr, f"{what}: QUANTIZE slot {slot} -> op{dst} {rows}x{cols} "
                                f"{ROUNDING_MODES[rnd]}")

    def gemm_frame(self, a: int, b: int, sa: int, sb: int, sh_a, sh_b, ta: bool, tb: bool,
                   extra: int = 0,
                   out_offset: int | None = None) -> tuple[bytes, int, int]:
        """The GEMM request, its output count M*N (0 if the shapes do not chain) and
        its ``out_offset``."""
        am = (sh_a[1], sh_a[0]) if ta else sh_a
        bm = (sh_b[1], sh_b[0]) if tb else sh_b
        mn = am[0] * bm[1] if am[1] == bm[0] else 0
        depth = self.B["out"].depth
        if out_offset is None:
            out_offset = int(self.rng.integers(0, max(1, depth - mn + 1)))
        flags = int(G.STORE) | (int(G.TRANS_A) if ta else 0) | (int(G.TRANS_B) if tb else 0)
        flags |= extra
        fr = self.req(P.Op.GEMM, a=a, b=b, flags=flags, slot_a=sa, slot_b=sb,
                      a_rows=sh_a[0], a_cols=sh_a[1], b_rows=sh_b[0], b_cols=sh_b[1],
                      out_offset=out_offset)
        return fr, mn, out_offset

    async def read_out(self, offset: int, count: int, what: str) -> None:
        s = self.B["out"]
        count = min(count, P.MAX_DATA // s.wire_bytes, s.depth - offset)
        await self.transact(self.req(P.Op.READ, buffer=s.id, offset=offset, count=count),
                            f"{what}: READ out[{offset}:+{count}]")


def _orientations(sh_a, sh_b) -> list[tuple[bool, bool]]:
    out = []
    for ta in (False, True):
        for tb in (False, True):
            am = (sh_a[1], sh_a[0]) if ta else sh_a
            bm = (sh_b[1], sh_b[0]) if tb else sh_b
            if am[1] == bm[0]:
                out.append((ta, tb))
    return out


async def _round(env: Env, r: int, seen: set) -> None:
    cfg, rng, B = env.cfg, env.rng, env.B
    what = f"round {r}"
    x = env.tensor(cfg.input_depth, specials=rng.random() < 0.3)
    await env.write_fp_in(x, what)
    shapes = {0: env.shape(), 1: env.shape()}
    if rng.random() < 0.5:                        # mixed GEMMs need chaining shapes
        shapes[1] = shapes[0] if rng.random() < 0.5 else (shapes[0][1], shapes[0][0])
    for slot in (0, 1):
        await env.quantize(slot, slot, shapes[slot], what)
    # GEMMs: slot 0 x slot 0, slot 1 x slot 1, slot 0 x slot 1, every valid orientation
    # at least once over the rounds (first the ones not seen yet)
    for a, b in ((0, 0), (1, 1), (0, 1)):
        opts = _orientations(shapes[a], shapes[b])
        if not opts:
            # no orientation chains: the error frame (BAD_ARGUMENT 5) is compared too
            fr, _, _ = env.gemm_frame(a, b, a, b, shapes[a], shapes[b], False, False)
            await env.transact(fr, f"{what}: GEMM op{a} x op{b} (shapes do not chain)")
            continue
        fresh = [o for o in opts if (a, b, o) not in seen]
        ta, tb = (fresh or opts)[int(rng.integers(0, len(fresh or opts)))]
        seen.add((a, b, (ta, tb)))
        extra = int(G.ALLOW_INVALID) if rng.random() < 0.3 else 0
        fr, mn, off = env.gemm_frame(a, b, a, b, shapes[a], shapes[b], ta, tb, extra)
        tag = f"GEMM op{a} x op{b} slots {a}x{b} TA={int(ta)} TB={int(tb)}"
        await env.transact(fr, f"{what}: {tag}")
        if rng.random() < 0.3:                    # retransmission: answered from the record
            await env.transact(fr, f"{what}: {tag} retransmitted")
        await env.read_out(off, max(mn, 1), f"{what} after {tag}")
        if rng.random() < 0.5 and opts:           # an invalid orientation, if there is one
            bad = [(p, q) for p in (False, True) for q in (False, True) if (p, q) not in opts]
            if bad:
                p, q = bad[int(rng.integers(0, len(bad)))]
                fr, _, _ = env.gemm_frame(a, b, a, b, shapes[a], shapes[b], p, q)
                await env.transact(fr, f"{what}: GEMM op{a} x op{b} TA={int(p)} TB={int(q)}"
                                       f" (shapes do not chain)")
    # statistics; a retransmitted READ_STATS CLEAR must not clear twice
    for fl in (int(S.QUANTIZE_INPUT), int(S.CLEAR)):
        fr = env.req(P.Op.READ_STATS, flags=fl)
        await env.transact(fr, f"{what}: READ_STATS flags={fl}")
        if fl & S.CLEAR:
            await env.transact(fr, f"{what}: READ_STATS flags={fl} retransmitted")
    await env.transact(env.req(P.Op.READ_STATS, flags=0), f"{what}: READ_STATS after CLEAR")
    # error frames: every kind in the first round, four at random later
    errors = _error_frames(env)
    for k in rng.permutation(len(errors))[:len(errors) if r == 0 else 4]:
        name, fr = errors[int(k)]
        env.error_kinds[name] += 1
        await env.transact(fr, f"{what}: error frame ({name})")
    # the stored operands read back (also after RESET: all zero)
    for name in ("op0.man", "op1.exp"):
        s = B[name]
        await env.transact(env.req(P.Op.READ, buffer=s.id, offset=0,
                                   count=min(s.depth, 128)), f"{what}: READ {name}")


def _error_frames(env: Env) -> list[tuple[str, bytes]]:
    cfg, rng, B = env.cfg, env.rng, env.B
    nfmt, nbuf = len(cfg.formats), len(B)
    ok = dict(a=0, b=0, flags=int(G.STORE), slot_a=0, slot_b=0, a_rows=8, a_cols=8,
              b_rows=8, b_cols=8, out_offset=0)
    bad_op = int(rng.choice([0x00, *range(0x08, 0x80)]))
    crc = bytearray(env.req(P.Op.READ, buffer=0, offset=0, count=1))
    crc[-1 - int(rng.integers(0, 4))] ^= 1 << int(rng.integers(0, 8))
    return [
        ("unknown opcode", P.encode_frame(env.next_seq(), bad_op, b"abc")),
        ("bad length: READ", P.encode_frame(env.next_seq(), P.Op.READ, b"\0\0")),
        ("bad length: GEMM", P.encode_frame(env.next_seq(), P.Op.GEMM,
                                            P.REQUESTS[P.Op.GEMM].pack(**ok)[:-1])),
        ("bad length: WRITE fp_in", env.req(P.Op.WRITE, b"\1\2\3", buffer=B["fp_in"].id,
                                            offset=0)),
        ("bad buffer: READ", env.req(P.Op.READ, buffer=int(rng.integers(nbuf, 256)),
                                     offset=0, count=1)),
        ("bad buffer: WRITE out", env.req(P.Op.WRITE, b"\0" * 4, buffer=B["out"].id,
                                          offset=0)),
        ("bad buffer: QUANTIZE dst", env.req(
            P.Op.QUANTIZE, slot=0, dst=int(rng.integers(cfg.operand_buffers, 256)),
            flags=0, rows=8, cols=8, src_offset=0, rounding=0, seed=0, exp_code=0)),
        ("bad slot: GEMM slot_a", env.req(P.Op.GEMM, **{
            **ok, "slot_a": int(rng.integers(nfmt, 256))})),
        ("bad slot: GEMM slot_b", env.req(P.Op.GEMM, **{
            **ok, "slot_b": int(rng.integers(nfmt, 256))})),
        ("bad flags: GEMM", env.req(P.Op.GEMM, **{**ok, "flags": 0x40})),
        ("out of range: INFO offset", env.req(P.Op.INFO, offset=1 << 20)),
        ("out of range: READ out", env.req(P.Op.READ, buffer=B["out"].id,
                                           offset=B["out"].depth, count=1)),
        ("bad CRC", bytes(crc)),
    ]


@cocotb.test()
async def test_frames_against_emulator(dut):
    """Random frame sequence with random stalls; every answer byte-identical."""
    env = Env(dut)
    cfg = env.cfg
    slots = gemm_slots(cfg)
    assert {0, 1} <= set(slots), (f"this test needs GEMM on slots 0 and 1; the build has "
                                  f"gemm_slots={slots} for {[f.name for f in cfg.formats]}")
    await env.start()
    rounds = int(os.environ.get("HBFP_ACC_SAMPLES", "4"))
    seen: set = set()
    for r in range(rounds):
        await _round(env, r, seen)
        if r % 2 == 1 or r == rounds - 1:
            await env.transact(env.req(P.Op.RESET), f"round {r}: RESET")
            fr = env.req(P.Op.RESET)
            await env.transact(fr, f"round {r}: RESET")
            await env.transact(fr, f"round {r}: RESET retransmitted")
            for name in ("op0.man", "out"):
                s = env.B[name]
                await env.transact(env.req(P.Op.READ, buffer=s.id, offset=0, count=64),
                                   f"round {r}: READ {name} after RESET")
            await env.transact(env.req(P.Op.READ_STATS, flags=0),
                               f"round {r}: READ_STATS after RESET")
    assert env.emu.guards_intact()
    dut._log.info(f"{env.frames} frames identical to the emulator over {rounds} rounds, "
                  f"{env.cycles_total} cycles; GEMM orientations seen: {sorted(seen)}; error "
                  f"frames: {dict(env.error_kinds)}")
