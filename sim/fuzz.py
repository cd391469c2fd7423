"""Protocol fuzzing: request generator, byte-stream mutations, framers, shadow model.

Shared by ``tests/test_fuzz_emulator.py`` (the device model :class:`Emulator` as the
device under test), ``tests/test_fuzz_rtl.py`` and ``sim/tb_fuzz.py`` (the accelerator
top in Amaranth's simulator and under cocotb/Verilator). See ``docs/fuzzing.md``.

Frames are built only with :func:`hbfp_hw.protocol.encode_frame` and the request layouts
(``P.REQUESTS[op].pack``), and decided only with
:class:`hbfp_hw.host.codec.FrameParser`: mutations act on the encoded bytes without
knowing where the header, the payload or the CRC are.

**Bursts.** :meth:`Fuzzer.burst` builds a burst: a few requests (:class:`RequestGen`:
plausible commands, commands with hostile field values, raw payloads and unknown
opcodes), each encoded and then sent intact or mutated (:data:`MUTATIONS`), with
garbage runs (:data:`GARBAGE`) in between. A burst is a list of *pieces*; the line goes
idle after each piece (the device drops a partial frame then), so a burst ends with the
device's parser empty.

**Shadow model.** The device under test receives the mutated bytes. The
:class:`Shadow` (a second :class:`Emulator`) receives, in order, for every event the
framer reports on the mutated stream:

* a delivered frame (:class:`Frame`: it passed the CRC): that frame, re-encoded intact;
* a CRC failure (:class:`CrcError`): a frame with the same ``SEQ``, opcode and ``LEN``
  whose CRC is wrong (:func:`bad_crc_frame`), which an emulator answers ``BAD_CRC``
  without touching its state;
* anything else (garbage, an oversize length, a partial frame dropped when the line
  went idle): nothing.

The rule checked is: *the device's answer bytes are the shadow's, byte for byte, and
after every burst its state (every buffer, both statistics records, the replay record
and anything else an answer shows) equals the shadow's*, read back with clean
requests (:meth:`Fuzzer.probes`). So a mutated or hostile frame changes the device only
if it reached it intact, and then exactly as the same intact frame would. Every
delivered frame must moreover be one the fuzzer built (a mutation never forges a valid
frame; a mutation that left a frame intact -- a cut after its end, a duplicate -- is a
delivery like any other).

**Which framer.** For the emulator the framer is :class:`FrameParser` itself
(:func:`parser_events`). For the RTL it is :func:`hw_framing`: a new parser started
after every event it reports, i.e. a framer that never looks back at bytes it has
consumed, as the gateware's frame decoder (``gateware/cmd_decoder.py``); it also tells
the byte where each event ends. With the delimited framing the two agree
(``test_hw_framing_is_the_parser`` checks it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import ROUNDING_MODES
from hbfp_hw.host.codec import CrcError, Frame, FrameParser, Garbage, Oversize, Truncated
from hbfp_hw.host.emulator import Emulator
from hbfp_hw.quantize import block_layout

__all__ = ["Profile", "RequestGen", "MUTATIONS", "GARBAGE", "Mutator", "Burst", "FuzzStats",
           "Fuzzer", "schedule", "parser_events", "AmbiguousStream", "hw_framing",
           "hw_events", "bad_crc_frame", "operand_fields_ok", "Shadow", "answer_frames",
           "count_events", "check_delivered", "hw_bursts", "describe", "mismatch"]

G, Q, S = P.GemmFlag, P.QuantizeFlag, P.StatsFlag

#: Mutations of one encoded frame (weights in :class:`Mutator`).
MUTATIONS = ("intact", "flip", "flips", "set_byte", "insert", "delete", "truncate",
             "cut_head", "duplicate", "dup_slice", "stutter", "splice", "retry")
#: Kinds of garbage run between frames.
GARBAGE = ("random", "fragments", "frame_heads", "constant", "long")


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """What the device under test implements of the protocol (requests outside it are
    not generated, or are changed into requests it implements).

    ``info``: INFO requests with an offset inside the description (the RTL's
    description has an extra key, so its INFO answers differ by design); ``rounding``:
    per format slot, the QUANTIZE rounding modes built (``None``: all); ``acc_capacity``:
    ACCUMULATE only on GEMMs whose padded ``M x N`` fits (``None``: any); ``mx_slots``:
    slots whose GEMMs take no ACCUMULATE / EXT_EREF and are not mixed with other slots;
    ``max_dim``: largest rows / cols of the plausible tensors; ``max_data``: largest WRITE
    data block and READ answer of the plausible requests (hostile ones go to the
    protocol's limits).
    """

    info: bool = True
    rounding: tuple[tuple[int, ...], ...] | None = None
    acc_capacity: int | None = None
    mx_slots: tuple[int, ...] = ()
    max_dim: int = 64
    max_data: int = P.MAX_DATA

    @classmethod
    def for_rtl(cls, cfg: AcceleratorConfig, *, runtime_rounding: bool = True,
                max_dim: int = 32, max_data: int = 1024) -> "Profile":
        """The accelerator top's :func:`~hbfp_hw.gateware.top.unsupported` gaps."""
        from hbfp_hw.gateware.top import accumulator_capacity, mx_slots, quant_rounding
        return cls(info=False,
                   rounding=tuple(tuple(r) for r in quant_rounding(cfg, runtime_rounding)),
                   acc_capacity=accumulator_capacity(cfg), mx_slots=tuple(mx_slots(cfg)),
                   max_dim=max_dim, max_data=max_data)


def _top(size: int) -> int:
    return (1 << (8 * size)) - 1


class RequestGen:
    """Random requests ``(opcode, payload)`` for every opcode of :class:`P.Op`.

    Three kinds: *plausible* (fields drawn to be mostly valid for ``cfg``, with the
    tensor shapes of earlier QUANTIZEs remembered so GEMMs chain and run), *hostile*
    (every field an edge value: 0, 1, all ones, depths +-1, ...) and *raw* (any opcode,
    unknown ones included, with random payload bytes or a payload one byte too short or
    long). ``kind`` of the last request is in :attr:`last_kind`.
    """

    KINDS = ("plausible", "hostile", "raw")

    def __init__(self, cfg: AcceleratorConfig, rng: np.random.Generator,
                 profile: Profile | None = None,
                 weights: tuple[float, float, float] = (0.7, 0.22, 0.08)) -> None:
        self.cfg, self.rng = cfg, rng
        self.profile = profile or Profile()
        self.weights = np.asarray(weights, float) / sum(weights)
        self.specs = P.buffer_map(cfg)
        self.nfmt = len(cfg.formats)
        self.info_len = len(P.canonical_json(P.device_description(cfg)))
        self.quantized: dict[int, tuple[int, int, int]] = {}   # dst -> slot, rows, cols
        self.last_gemm: dict | None = None
        self.last_kind = "plausible"
        self.counts: Counter = Counter()

    # -- helpers ----------------------------------------------------------------------
    def _pick(self, values):
        return values[int(self.rng.integers(0, len(values)))]

    def _edge(self, size: int) -> int:
        top = _top(size)
        cfg = self.cfg
        cands = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256,
                 top, top - 1, top >> 1, (top >> 1) + 1, len(self.specs), self.nfmt,
                 cfg.operand_buffers, cfg.input_depth, cfg.input_depth - 1,
                 cfg.operand_depth, cfg.operand_depth + 1, cfg.output_depth - 1,
                 cfg.output_depth, P.MAX_DATA]
        if self.rng.random() < 0.25:
            return int(self.rng.integers(0, top + 1, dtype=np.uint64))
        return int(self._pick(cands)) & top

    def _fp32(self, n: int) -> bytes:
        r = self.rng
        x = (r.standard_normal(n) * np.exp2(r.integers(-30, 30, n))).astype(np.float32)
        if n > 4 and r.random() < 0.3:
            x[int(r.integers(0, n))] = r.choice([np.nan, np.inf, -np.inf, 0.0, -0.0])
        if n > 4 and r.random() < 0.2:
            x[int(r.integers(0, n))] = np.float32(r.standard_normal() * 2.0**-135)
        return x.tobytes()

    def _shape(self) -> tuple[int, int]:
        m = min(self.profile.max_dim, self.cfg.input_depth)
        if self.rng.random() < 0.15:           # thin: long reductions (K_OVERFLOW)
            rows = int(self.rng.integers(1, 4))
            cols = int(self.rng.integers(1, self.cfg.input_depth // rows + 1))
            return (rows, cols) if self.rng.random() < 0.5 else (cols, rows)
        while True:
            rows, cols = (int(v) for v in self.rng.integers(1, m + 1, 2))
            if rows * cols <= self.cfg.input_depth:
                return rows, cols

    # -- requests ---------------------------------------------------------------------
    def request(self) -> tuple[int, bytes]:
        kind = self.KINDS[int(self.rng.choice(3, p=self.weights))]
        self.last_kind = kind
        if kind == "raw":
            op, payload = self._raw()
        elif kind == "hostile":
            op = self._pick(list(P.Op))
            if op == P.Op.RESET and self.rng.random() < 0.8:   # keep some state around
                op = P.Op.GEMM
            payload = self._hostile(op)
        else:
            op, payload = self._plausible()
        payload = self.sanitize(int(op), payload)
        self.counts[(kind, _op_name(int(op)))] += 1
        return int(op), payload

    def _raw(self) -> tuple[int, bytes]:
        r = self.rng
        if r.random() < 0.5:
            return int(r.integers(0, 256)), r.bytes(int(r.choice([0, 1, 2, 5, 16, 64])))
        op = self._pick(list(P.Op))
        lay = P.REQUESTS[op]
        n = lay.header_size + int(r.choice([-1, 1, 2]) if lay.header_size else 1)
        return int(op), r.bytes(max(0, n))

    def _hostile(self, op: P.Op) -> bytes:
        lay = P.REQUESTS[op]
        vals = {f.name: (self._edge(f.size) if f.kind == "u" else
                         self.rng.bytes(f.size) if f.kind == "bytes" else
                         float(self.rng.standard_normal())) for f in lay.fields}
        data = b""
        if lay.data:
            n = int(self.rng.choice([0, 1, 2, 3, 4, 5, 16, 63, 64, 300, P.MAX_DATA,
                                     P.MAX_DATA + 1]))
            data = self.rng.bytes(min(n, P.MAX_PAYLOAD - lay.header_size))
        return lay.pack(data, **vals)

    #: relative weights of the opcodes of plausible requests (others: 0.02)
    OP_WEIGHTS = {"WRITE": 0.3, "READ": 0.1, "QUANTIZE": 0.22, "GEMM": 0.25,
                  "READ_STATS": 0.06, "RESET": 0.01, "INFO": 0.05, "SESSION": 0.02,
                  "BITLAYER": 0.05}

    def _plausible(self) -> tuple[P.Op, bytes]:
        ops = list(P.Op)
        w = np.array([self.OP_WEIGHTS.get(op.name, 0.02) for op in ops])
        op = ops[int(self.rng.choice(len(ops), p=w / w.sum()))]
        make = getattr(self, f"_p_{op.name.lower()}", None)
        return op, (make() if make is not None else self._hostile(op))

    def _p_info(self) -> bytes:
        off = int(self.rng.integers(0, self.info_len + 2))
        return P.REQUESTS[P.Op.INFO].pack(offset=off)

    def _p_write(self) -> bytes:
        r = self.rng
        specs = [s for s in self.specs if s.writable or r.random() < 0.1]
        s = self._pick(specs)
        lim = max(1, min(s.depth, self.profile.max_data // s.wire_bytes))
        n = int(r.integers(1, lim + 1)) if r.random() < 0.3 else int(r.integers(1,
                                                                             min(lim, 64) + 1))
        off = int(r.integers(0, s.depth - n + 1))
        if r.random() < 0.05:
            off = s.depth - n + 1                                # one element too far
        if s.kind == P.BufferKind.FP32:
            data = self._fp32(n)
        elif s.kind == P.BufferKind.MANTISSA:
            fmt = self._pick(self.cfg.formats)
            data = r.integers(-fmt.mmax, fmt.mmax + 1, n).astype(
                "<i2" if s.wire_bytes == 2 else "i1").tobytes()
        elif s.kind == P.BufferKind.EXPONENT:
            fmt = self._pick(self.cfg.formats)
            data = r.integers(0, fmt.exp_invalid_code + 1, n).astype(
                "<u2" if s.wire_bytes == 2 else "u1").tobytes()
        elif s.kind == P.BufferKind.EREF:
            fmt = self._pick(self.cfg.formats)
            data = (fmt.exp_bias + r.integers(-4, 12, n)).astype("<u2").tobytes()
        else:                                                    # bit-layer planes / ints
            data = r.integers(0, 256, n * s.wire_bytes, dtype=np.uint8).tobytes()
        if r.random() < 0.1:
            data = r.bytes(len(data))                            # any bit pattern
        if r.random() < 0.03 and s.wire_bytes > 1:
            data = data[:-1]                                     # not whole elements
        return P.REQUESTS[P.Op.WRITE].pack(data, buffer=s.id, offset=off)

    def _p_read(self) -> bytes:
        r = self.rng
        s = self._pick(self.specs)
        lim = min(s.depth, max(1, self.profile.max_data // s.wire_bytes))
        n = int(r.integers(0, lim + 1))
        off = int(r.integers(0, s.depth - n + 1))
        if r.random() < 0.05:
            n = P.MAX_DATA // s.wire_bytes + 1                   # answer too long
        return P.REQUESTS[P.Op.READ].pack(buffer=s.id, offset=off, count=n)

    def _p_quantize(self) -> bytes:
        r, cfg = self.rng, self.cfg
        slot = int(r.integers(0, self.nfmt)) if r.random() < 0.95 else self.nfmt
        dst = int(r.integers(0, cfg.operand_buffers)) if r.random() < 0.95 else 255
        flags = int(r.choice([0, int(Q.RETURN), int(Q.STATIC_EXP),
                              int(Q.RETURN | Q.STATIC_EXP)]))
        if r.random() < 0.03:
            flags |= 0x80
        rows, cols = self._shape()
        src = int(r.integers(0, cfg.input_depth - rows * cols + 1))
        fmt = cfg.formats[min(slot, self.nfmt - 1)]
        exp_code = int(np.clip(fmt.exp_bias + r.integers(-12, 12), 0, 0xFFFF))
        if r.random() < 0.1:
            exp_code = int(r.integers(0, 0x10000))
        rnd = int(r.integers(0, len(ROUNDING_MODES) + (1 if r.random() < 0.05 else 0)))
        if slot < self.nfmt and dst < cfg.operand_buffers:
            self.quantized[dst] = (slot, rows, cols)
        return P.REQUESTS[P.Op.QUANTIZE].pack(
            slot=slot, dst=dst, flags=flags, rows=rows, cols=cols, src_offset=src,
            rounding=rnd, seed=int(r.integers(0, 1 << 32, dtype=np.uint64)),
            exp_code=exp_code)

    def _p_gemm(self) -> bytes:
        r, cfg = self.rng, self.cfg
        if self.last_gemm is not None and r.random() < 0.3:      # accumulate onto it
            f = dict(self.last_gemm)
            f["flags"] = (f["flags"] | int(G.ACCUMULATE)) & ~int(G.EXT_EREF)
            return P.REQUESTS[P.Op.GEMM].pack(**f)
        if r.random() < 0.05:
            long_k = self._long_k()
            if long_k is not None:
                return long_k
        known = sorted(self.quantized)
        a = self._pick(known) if known else int(r.integers(0, cfg.operand_buffers))
        same = [k for k in known if self.quantized[k][0] == self.quantized.get(a, (0,))[0]]
        b = self._pick(same if same and r.random() < 0.8 else known) if known else \
            int(r.integers(0, cfg.operand_buffers))
        sa, ra, ca = self.quantized.get(a, (0, 8, 8))
        sb, rb, cb = self.quantized.get(b, (0, 8, 8))
        chains = [(ta, tb) for ta in (0, 1) for tb in (0, 1)
                  if (ra if ta else ca) == (cb if tb else rb)]
        ta, tb = self._pick(chains) if chains else (int(r.integers(0, 2)),
                                                    int(r.integers(0, 2)))
        m, n = (ca if ta else ra), (rb if tb else cb)
        flags = (int(G.TRANS_A) * ta) | (int(G.TRANS_B) * tb)
        if r.random() < 0.85:
            flags |= int(G.STORE)
        if r.random() < 0.3:
            flags |= int(G.ALLOW_INVALID)
        if r.random() < 0.05:
            flags |= int(G.EXT_EREF)
        if r.random() < 0.02:
            flags |= 0x40
        out_off = int(r.integers(0, max(1, cfg.output_depth - m * n + 1)))
        f = dict(a=a, b=b, flags=flags, slot_a=sa, slot_b=sb, a_rows=ra, a_cols=ca,
                 b_rows=rb, b_cols=cb, out_offset=out_off)
        self.last_gemm = f
        return P.REQUESTS[P.Op.GEMM].pack(**f)

    def _long_k(self) -> bytes | None:
        """A GEMM reducing over more than ``k_max`` (K_OVERFLOW) if a slot's blocks let
        a ``1 x K`` operand fit, else None."""
        cfg, r = self.cfg, self.rng
        slot = int(r.integers(0, self.nfmt))
        kmax = 0
        for k in (cfg.k_max + 1, 2 * cfg.k_max, cfg.operand_depth):
            if k > cfg.k_max and operand_fields_ok(cfg, 0, slot, 1, k):
                kmax = k
        if not kmax:
            return None
        k = int(r.integers(cfg.k_max + 1, kmax + 1))
        a, b = (int(v) for v in r.integers(0, cfg.operand_buffers, 2))
        flags = int(G.TRANS_B | G.ALLOW_INVALID)
        return P.REQUESTS[P.Op.GEMM].pack(a=a, b=b, flags=flags, slot_a=slot, slot_b=slot,
                                          a_rows=1, a_cols=k, b_rows=1, b_cols=k,
                                          out_offset=0)

    def _p_read_stats(self) -> bytes:
        flags = int(self.rng.integers(0, 4)) | (0x10 if self.rng.random() < 0.05 else 0)
        return P.REQUESTS[P.Op.READ_STATS].pack(flags=flags)

    def _p_reset(self) -> bytes:
        return P.REQUESTS[P.Op.RESET].pack()

    def _p_session(self) -> bytes:
        token = int(self.rng.integers(0, 1 << 32, dtype=np.uint64))
        return P.REQUESTS[P.Op["SESSION"]].pack(token=0 if self.rng.random() < 0.1 else token)

    def _p_bitlayer(self) -> bytes:
        """Mostly in range: shapes that fit ``bl.w`` / ``bl.x`` / ``bl.y``, any width and
        layer count (some out of range)."""
        r = self.rng
        lay = P.REQUESTS[P.Op.BITLAYER]
        lanes = P.bitlayer_lanes(self.cfg)
        if not lanes:
            return self._hostile(P.Op.BITLAYER)
        sp = {s.name: s for s in self.specs}
        dw, dx, dy = sp["bl.w"].depth, sp["bl.x"].depth, sp["bl.y"].depth
        bits = int(r.integers(1, P.BITLAYER_BITS_MAX + 1))
        layers = int(r.integers(1, bits + 1))
        cols = int(r.integers(1, min(P.bitlayer_k_max(self.cfg), dx) + 1))
        chunks = -(-cols // lanes)
        rows = int(r.integers(1, max(1, min(8, dw // (bits * chunks))) + 1))
        batch = int(r.integers(1, max(1, min(4, dx // cols, dy // rows)) + 1))
        f = dict(bits=bits, layers=layers, rows=rows, cols=cols, batch=batch,
                 w_offset=int(r.integers(0, max(1, dw - rows * bits * chunks + 1))),
                 x_offset=int(r.integers(0, max(1, dx - batch * cols + 1))),
                 y_offset=int(r.integers(0, max(1, dy - batch * rows + 1))),
                 flags=int(r.integers(0, P.flag_mask(P.BitLayerFlag) + 1)))
        if r.random() < 0.15:                                    # one field off
            name = self._pick([fl.name for fl in lay.fields])
            f[name] = self._edge(next(fl.size for fl in lay.fields if fl.name == name))
        return lay.pack(**f)

    # -- the device's profile ---------------------------------------------------------
    def sanitize(self, op: int, payload: bytes) -> bytes:
        """``payload`` changed (if needed) into a request :attr:`profile` implements."""
        pr = self.profile
        try:
            o = P.Op(op)
            fields, data = P.REQUESTS[o].unpack(payload)
        except ValueError:
            return payload             # unknown opcode or wrong length: answered alike
        if o == P.Op.INFO and not pr.info and fields["offset"] <= (1 << 24):
            fields["offset"] += 1 << 24
        elif o == P.Op.QUANTIZE and pr.rounding is not None:
            s, rnd = fields["slot"], fields["rounding"]
            if s < self.nfmt and rnd < len(ROUNDING_MODES) and rnd not in pr.rounding[s]:
                fields["rounding"] = int(self._pick(pr.rounding[s]))
        elif o == P.Op.GEMM:
            fields = self._gemm_profile(fields)
        else:
            return payload
        return P.REQUESTS[o].pack(data, **fields)

    def _gemm_profile(self, f: dict) -> dict:
        pr = self.profile
        mx = set(pr.mx_slots)
        if mx & {f["slot_a"], f["slot_b"]}:
            f["flags"] &= ~int(G.ACCUMULATE | G.EXT_EREF)
            if (f["slot_a"] in mx) != (f["slot_b"] in mx) and f["slot_b"] < self.nfmt \
                    and f["slot_a"] < self.nfmt:
                f["slot_b"] = f["slot_a"]
        if pr.acc_capacity is not None and f["flags"] & G.ACCUMULATE:
            m = f["a_cols"] if f["flags"] & G.TRANS_A else f["a_rows"]
            n = f["b_rows"] if f["flags"] & G.TRANS_B else f["b_cols"]
            pad = max([self.cfg.tile] + [max(self.cfg.block_2d(i))
                                         for i in range(self.nfmt)])
            mp, np_ = -(-m // pad) * pad, -(-n // pad) * pad
            if mp * np_ > pr.acc_capacity:
                f["flags"] &= ~int(G.ACCUMULATE)
        return f


def _op_name(op: int) -> str:
    try:
        return P.Op(op).name
    except ValueError:
        return "unknown"


# ---------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------
class Mutator:
    """Mutations of encoded frames and garbage runs, on bytes only."""

    #: relative weights of :data:`MUTATIONS`
    WEIGHTS = {"intact": 0.32, "flip": 0.12, "flips": 0.06, "set_byte": 0.06,
               "insert": 0.06, "delete": 0.07, "truncate": 0.07, "cut_head": 0.04,
               "duplicate": 0.04, "dup_slice": 0.04, "stutter": 0.03, "splice": 0.05,
               "retry": 0.04}
    #: relative weights of :data:`GARBAGE`
    GARBAGE_WEIGHTS = {"random": 0.45, "fragments": 0.25, "frame_heads": 0.15,
                       "constant": 0.1, "long": 0.05}

    def __init__(self, rng: np.random.Generator, *, long_garbage: tuple[int, int] =
                 (5000, 40000)) -> None:
        self.rng = rng
        self.long_garbage = long_garbage
        self._m = list(self.WEIGHTS)
        self._mp = np.array([self.WEIGHTS[k] for k in self._m])
        self._mp /= self._mp.sum()
        self._g = list(self.GARBAGE_WEIGHTS)
        self._gp = np.array([self.GARBAGE_WEIGHTS[k] for k in self._g])
        self._gp /= self._gp.sum()

    def pick(self) -> str:
        return self._m[int(self.rng.choice(len(self._m), p=self._mp))]

    def mutate(self, kind: str, frame: bytes, other: bytes) -> bytes:
        """``frame`` after mutation ``kind`` (``other``: another encoded frame)."""
        r = self.rng
        b = bytearray(frame)
        n = len(b)
        if kind in ("intact", "retry"):
            return bytes(b)
        if kind in ("flip", "flips"):
            for _ in range(1 if kind == "flip" else int(r.integers(2, 9))):
                b[int(r.integers(0, n))] ^= 1 << int(r.integers(0, 8))
        elif kind == "set_byte":
            i = int(r.integers(0, n))
            b[i] = (b[i] + int(r.integers(1, 256))) & 0xFF
        elif kind == "insert":
            for _ in range(int(r.integers(1, 4))):
                b.insert(int(r.integers(0, len(b) + 1)), int(r.integers(0, 256)))
        elif kind == "delete":
            for _ in range(min(int(r.integers(1, 4)), len(b) - 1)):
                del b[int(r.integers(0, len(b)))]
        elif kind == "truncate":
            b = b[: int(r.integers(1, n))]
        elif kind == "cut_head":
            b = b[int(r.integers(1, n)):]
        elif kind == "duplicate":
            b = b + b
        elif kind == "dup_slice":
            i = int(r.integers(0, n))
            j = int(r.integers(i, min(n, i + 64) + 1))
            b = b[:j] + b[i:j] + b[j:]
        elif kind == "stutter":
            i = int(r.integers(0, n))
            b = b[:i] + bytes([b[i]]) * int(r.integers(2, 40)) + b[i:]
        elif kind == "splice":
            b = b[: int(r.integers(1, n))] + other[int(r.integers(0, len(other))):]
        else:
            raise ValueError(f"unknown mutation {kind!r}; accepted are {MUTATIONS}")
        return bytes(b)

    def garbage(self, frames: list[bytes]) -> tuple[str, bytes]:
        """A garbage run (``frames``: encoded frames to cut fragments from)."""
        r = self.rng
        kind = self._g[int(r.choice(len(self._g), p=self._gp))]
        if kind == "random":
            return kind, r.bytes(int(r.integers(1, 300)))
        if kind == "long":
            return kind, r.bytes(int(r.integers(*self.long_garbage)))
        if kind == "constant":
            return kind, bytes([int(r.choice([0, 0xFF, int(r.integers(0, 256))]))]) * int(
                r.integers(1, 200))
        out = bytearray()
        for _ in range(int(r.integers(1, 8))):
            fr = frames[int(r.integers(0, len(frames)))]
            if kind == "frame_heads":     # frame starts: delimiting bytes and headers
                out += fr[: int(r.integers(1, min(len(fr), 12) + 1))]
            else:
                i = int(r.integers(0, len(fr)))
                out += fr[i: i + int(r.integers(1, 80))]
        return kind, bytes(out)


# ---------------------------------------------------------------------------------------
# Bursts
# ---------------------------------------------------------------------------------------
@dataclass
class Burst:
    """Wire bytes of one burst: ``pieces`` (the line goes idle after each one),
    ``intended``: every frame built for it as ``(seq, opcode, payload)`` (also those
    only cut into garbage fragments); ``resync``: the
    clean request that ends the last piece (answered once the line went idle), or
    None."""

    pieces: list[bytes]
    intended: list[tuple[int, int, bytes]]
    resync: tuple[int, int, bytes] | None = None
    kinds: Counter = field(default_factory=Counter)
    stats: "FuzzStats | None" = None


@dataclass
class FuzzStats:
    """Counts over a fuzzing run (see :meth:`summary`)."""

    frames: int = 0        # frames put on the wire (mutated or not), probes excluded
    mutated: int = 0       # ... whose bytes a mutation changed
    hostile: int = 0       # ... sent intact with hostile fields or a raw payload
    garbage: int = 0       # garbage runs
    garbage_bytes: int = 0
    bytes: int = 0         # wire bytes of the bursts
    bursts: int = 0
    dropped: int = 0       # bursts not sent (:class:`AmbiguousStream`)
    events: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)

    def add(self, burst: Burst) -> None:
        """Count ``burst`` (sent)."""
        b = burst.stats
        self.bursts += 1
        self.kinds.update(burst.kinds)
        self.bytes += sum(len(p) for p in burst.pieces)
        for k in ("frames", "mutated", "hostile", "garbage", "garbage_bytes"):
            setattr(self, k, getattr(self, k) + getattr(b, k))

    def summary(self) -> str:
        ev = ", ".join(f"{k} {v}" for k, v in sorted(self.events.items()))
        mk = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        drop = f" ({self.dropped} built but not sent)" if self.dropped else ""
        return (f"{self.bursts} bursts{drop}, {self.bytes} bytes: {self.frames} frames "
                f"({self.mutated} mutated, {self.hostile} intact hostile/raw), "
                f"{self.garbage} garbage runs ({self.garbage_bytes} bytes); "
                f"framer events: {ev}; mutations/garbage: {mk}")


class Fuzzer:
    """Builds bursts of mutated and hostile frames for ``cfg`` (see the module text)."""

    def __init__(self, cfg: AcceleratorConfig, rng: np.random.Generator,
                 profile: Profile | None = None, *,
                 long_garbage: tuple[int, int] = (5000, 40000),
                 p_garbage: float = 0.25, p_pause: float = 0.15) -> None:
        self.cfg, self.rng = cfg, rng
        self.gen = RequestGen(cfg, rng, profile)
        self.mut = Mutator(rng, long_garbage=long_garbage)
        self.p_garbage, self.p_pause = p_garbage, p_pause
        self.seq = int(rng.integers(0, 256))
        self.stats = FuzzStats()
        self._last: tuple[int, int, bytes] | None = None

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq

    def clean(self, op: int, payload: bytes = b"") -> tuple[tuple[int, int, bytes], bytes]:
        """A clean request with the next sequence tag: ``((seq, op, payload), bytes)``."""
        seq = self.next_seq()
        return (seq, int(op), payload), P.encode_frame(seq, int(op), payload)

    def burst(self, n_frames: int, *, resync: bool = True, count: bool = True) -> Burst:
        """``n_frames`` frames, mutated or not, garbage runs and line pauses between them;
        ``resync``: a clean READ_STATS right after the last item, in the same piece;
        ``count``: add it to :attr:`stats` (else the caller does if it sends it)."""
        r = self.rng
        st = FuzzStats()
        pieces: list[bytes] = []
        cur = bytearray()
        intended: list[tuple[int, int, bytes]] = []
        kinds: Counter = Counter()
        encoded: list[bytes] = []
        for _ in range(n_frames):
            if r.random() < self.p_garbage:
                if not encoded:                  # fragments need a frame to cut
                    key = (int(r.integers(0, 256)), *self.gen.request())
                    intended.append(key)
                    encoded.append(P.encode_frame(*key))
                g_kind, g = self.mut.garbage(encoded)
                kinds["garbage:" + g_kind] += 1
                st.garbage += 1
                st.garbage_bytes += len(g)
                cur += g
            kind = self.mut.pick()
            if kind == "retry" and self._last is not None:
                key = self._last
            else:
                if kind == "retry":
                    kind = "intact"
                op, payload = self.gen.request()
                key = (self.next_seq(), op, payload)
            fr = P.encode_frame(*key)
            other = encoded[int(r.integers(0, len(encoded)))] if encoded else fr
            wire = self.mut.mutate(kind, fr, other)
            intended.append(key)
            encoded.append(fr)
            self._last = key
            kinds[kind] += 1
            st.frames += 1
            if wire != fr:
                st.mutated += 1
            elif self.gen.last_kind != "plausible":
                st.hostile += 1
            cur += wire
            if r.random() < self.p_pause:
                pieces.append(bytes(cur))
                cur = bytearray()
        rs = None
        if resync:
            rs, fr = self.clean(P.Op.READ_STATS,
                                P.REQUESTS[P.Op.READ_STATS].pack(flags=0))
            cur += fr
            intended.append(rs)
        if cur:
            pieces.append(bytes(cur))
        b = Burst([p for p in pieces if p], intended, rs, kinds, st)
        if count:
            self.stats.add(b)
        return b

    def probes(self) -> list[tuple[tuple[int, int, bytes], bytes]]:
        """Clean requests reading the whole state: every buffer (READs of at most
        ``MAX_DATA`` bytes) and both statistics records (without CLEAR)."""
        out = []
        for s in P.buffer_map(self.cfg):
            step = P.MAX_DATA // s.wire_bytes
            for off in range(0, s.depth, step):
                out.append(self.clean(P.Op.READ, P.REQUESTS[P.Op.READ].pack(
                    buffer=s.id, offset=off, count=min(step, s.depth - off))))
        for flags in (0, int(S.QUANTIZE_INPUT)):
            out.append(self.clean(P.Op.READ_STATS,
                                  P.REQUESTS[P.Op.READ_STATS].pack(flags=flags)))
        return out


# ---------------------------------------------------------------------------------------
# Framers and the shadow model
# ---------------------------------------------------------------------------------------
def schedule(pieces: list[bytes], rng: np.random.Generator | None = None,
             max_chunk: int = 512) -> list[bytes | None]:
    """How the bytes reach a sans-IO device: chunks of random sizes (``rng``; one chunk
    per piece without it), ``None`` where the line goes idle (after every piece)."""
    out: list[bytes | None] = []
    for p in pieces:
        i = 0
        while i < len(p):
            n = len(p) - i if rng is None else int(rng.integers(1, max_chunk + 1))
            if rng is not None and rng.random() < 0.05:
                n = 1
            out.append(p[i: i + n])
            i += n
        out.append(None)
    return out


def parser_events(sched: list[bytes | None]) -> list:
    """The events :class:`FrameParser` reports on a :func:`schedule`."""
    fp = FrameParser()
    out = []
    for chunk in sched:
        out += fp.idle() if chunk is None else fp.feed(chunk)
    return out


class AmbiguousStream(Exception):
    """:func:`hw_framing` cannot predict the gateware's framer on this stream: an
    oversize length (the framer decides on the length field, before the rest of the
    header) followed at once by bytes whose framing depends on exactly where it
    resumes."""


def _first_event(piece: bytes, pos: int):
    """The first event a new :class:`FrameParser` reports on ``piece[pos:]`` and the index
    of the byte that completed it: ``(event, k)``, or ``(None, len(piece))``."""
    fp = FrameParser()
    for k in range(pos, len(piece)):
        evs = [e for e in fp.feed(piece[k: k + 1]) if not isinstance(e, Garbage)]
        if evs:
            return evs[0], k
    return None, len(piece)


def hw_framing(pieces: list[bytes]) -> list[list[tuple[object, int]]]:
    """The events of the gateware's framer on ``pieces`` (the line idle after each), per
    piece as ``(event, index of the byte that completed it)``.

    The framer never rescans: after a frame, a CRC failure or an oversize length it
    goes on with the following bytes, and it drops a partial frame when the line goes
    idle. Modelled with a new :class:`FrameParser` from the byte after each event (from
    the interrupting byte after a :class:`Truncated`). Raises :class:`AmbiguousStream`
    where that model cannot tell what the gateware does.
    """
    out = []
    for piece in pieces:
        evs: list[tuple[object, int]] = []
        pos = 0
        while pos < len(piece):
            ev, k = _first_event(piece, pos)
            if ev is None:             # garbage or a partial frame: dropped at idle
                break
            evs.append((ev, k))
            if isinstance(ev, Truncated):
                pos = k
            elif isinstance(ev, Oversize):
                nxt = {_first_event(piece, j) for j in range(max(pos, k - 1), k + 2)}
                if len(nxt) > 1:
                    raise AmbiguousStream(f"oversize length {ev.length} at byte {k}")
                pos = k + 1
            else:
                pos = k + 1
        out.append(evs)
    return out


def hw_events(pieces: list[bytes]) -> list:
    """The events of :func:`hw_framing`, in order."""
    return [ev for per_piece in hw_framing(pieces) for ev, _ in per_piece]


@lru_cache(maxsize=4096)
def bad_crc_frame(seq: int, opcode: int, length: int) -> bytes:
    """Wire bytes on which :class:`FrameParser` (fed them, then idle) reports exactly one
    :class:`CrcError` with this header and otherwise only events no device answers
    (garbage, oversize, truncated): a frame of ``length`` bytes with one bit flipped."""
    want = CrcError(seq, opcode, length)
    for fill in (0x00, 0xFF, 0x55):
        good = P.encode_frame(seq, opcode, bytes([fill]) * length)
        for i in range(len(good) - 1, -1, -1):
            for bit in range(8):
                b = bytearray(good)
                b[i] ^= 1 << bit
                fp = FrameParser()
                evs = [e for e in fp.feed(bytes(b)) + fp.idle()
                       if isinstance(e, (Frame, CrcError))]
                if evs == [want]:
                    return bytes(b)
    raise AssertionError(f"no one-bit change of a frame makes a CRC failure {want}")


def operand_fields_ok(cfg: AcceleratorConfig, buf: int, slot: int, rows: int,
                      cols: int) -> bool:
    """Whether a GEMM operand's fields pass the checks that precede its data: slot,
    buffer, non-zero shape, mantissas and blocks within the operand buffer."""
    if slot >= len(cfg.formats) or buf >= cfg.operand_buffers or rows == 0 or cols == 0:
        return False
    lay = block_layout((rows, cols), cfg.formats[slot])
    return (lay.num_blocks * lay.block_size <= cfg.operand_depth
            and lay.num_blocks <= cfg.exponent_depth)


class Shadow:
    """The shadow model: an :class:`Emulator` that receives only intact frames (and CRC
    failures with the same header), see the module text."""

    def __init__(self, cfg: AcceleratorConfig) -> None:
        self.emu = Emulator(cfg)
        self.delivered = 0
        self.crc_errors = 0

    def answer(self, events: list) -> bytes:
        """The answer bytes to the framer ``events`` (the shadow's state follows)."""
        out = []
        for ev in events:
            if isinstance(ev, Frame):
                self.delivered += 1
                out.append(self.emu.feed(P.encode_frame(ev.seq, ev.opcode, ev.payload)))
            elif isinstance(ev, CrcError):
                self.crc_errors += 1
                out.append(self.emu.feed(bad_crc_frame(ev.seq, ev.opcode, ev.length)))
                out.append(self.emu.idle())      # leaves the parser empty
        return b"".join(out)

    def request(self, frame: bytes) -> bytes:
        """The answer to a clean request."""
        return self.emu.feed(frame)


def answer_frames(data: bytes) -> list[Frame]:
    """``data`` (a device's output) as frames; raises ``AssertionError`` if any byte is
    not part of a complete, CRC-valid frame."""
    fp = FrameParser()
    evs = fp.feed(data) + fp.idle()
    bad = [e for e in evs if not isinstance(e, Frame)]
    assert not bad, f"device output is not a sequence of valid frames: {bad[:4]}"
    return evs


def count_events(stats: FuzzStats, events: list) -> None:
    for e in events:
        stats.events[type(e).__name__] += 1


def check_delivered(events: list, burst: Burst) -> None:
    """Every delivered frame is one the fuzzer built (no mutation forges a frame)."""
    built = set(burst.intended)
    for e in events:
        if isinstance(e, Frame):
            assert (e.seq, e.opcode, e.payload) in built, (
                f"a frame nobody built was delivered: seq={e.seq} op=0x{e.opcode:02x} "
                f"payload={e.payload[:32].hex()}")


def hw_bursts(fz: Fuzzer, shadow: Shadow, n_frames: int, burst_max: int = 6):
    """Bursts for the RTL until ``fz`` built ``n_frames`` frames: yields ``(burst,
    expected answer bytes)``, the shadow fed the :func:`hw_events` of each (a burst whose
    framing is ambiguous, :class:`AmbiguousStream`, is dropped unsent)."""
    while fz.stats.frames < n_frames:
        burst = fz.burst(int(fz.rng.integers(1, burst_max + 1)), count=False)
        try:
            events = hw_events(burst.pieces)
        except AmbiguousStream:
            fz.stats.dropped += 1
            continue
        fz.stats.add(burst)
        count_events(fz.stats, events)
        check_delivered(events, burst)
        yield burst, shadow.answer(events)


def describe(data: bytes, limit: int = 12) -> str:
    """A device output (or any bytes) as the events of :class:`FrameParser`."""
    fp = FrameParser()
    evs = fp.feed(data) + fp.idle()
    return "; ".join(f"seq={e.seq} op=0x{e.opcode:02x} {e.payload[:24].hex()}"
                     if isinstance(e, Frame) else repr(e) for e in evs[:limit])


def mismatch(ctx: str, got: bytes, want: bytes, burst: Burst | None = None) -> str | None:
    """None if ``got == want``, else a report: first differing byte, both decoded, and
    the burst's wire bytes (the start of each piece)."""
    if got == want:
        return None
    n = min(len(got), len(want))
    first = next((k for k in range(n) if got[k] != want[k]), n)
    pieces = "" if burst is None else "\n  pieces " + " | ".join(
        p[:200].hex() for p in burst.pieces)
    return (f"{ctx}: RTL answer != emulator answer (first difference at byte {first})\n"
            f"  RTL      {describe(got)}\n  emulator {describe(want)}{pieces}")
