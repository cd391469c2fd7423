"""A device model that speaks the wire protocol byte for byte and computes with the
golden model (:func:`hbfp_hw.quantize.quantize`, :func:`hbfp_hw.gemm.bfp_matmul`).

It is what ``emulate://`` talks to, over a :class:`~hbfp_hw.host.transport.LoopbackTransport`,
so the whole host path (codec, retries, tiling) runs without RTL. It behaves as the
accelerator top is specified to:

* every field is range-checked against the buffer map before anything is touched; a
  request the device cannot honour gets an error frame and changes nothing;
* a frame with a bad CRC gets a ``BAD_CRC`` error frame; a repeated request (same
  sequence tag and bytes as the last one) is answered from the last response without
  executing it again;
* GEMM accumulators persist across GEMMs with ``ACCUMULATE`` so a reduction split
  along K (with reference exponents supplied through ``eref``) is bit-identical to
  the unsplit golden GEMM;
* READ_STATS keeps two records, as the top's two range trackers: the stored GEMM
  outputs and (flag ``QUANTIZE_INPUT``) the FP32 tensor elements QUANTIZE read; RESET
  clears both;
* every answer starts with the session token (``session``: 0 for a new emulator, i.e.
  after power-up; set by ``SESSION``; RESET keeps it). A new ``Emulator`` is a device
  that was power-cycled.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import ROUNDING_MODES
from hbfp_hw.gemm import acc_to_fp32, bfp_matmul, k_block_length
from hbfp_hw.quantize import BFPTensor, block_layout, quantize

from .codec import CrcError, Frame, FrameParser

__all__ = ["Emulator", "GUARD_ELEMENTS"]

#: Sentinel elements kept before and after every buffer (tests check they never change).
GUARD_ELEMENTS = 16
_SENTINEL = 0x5A


class _DevError(Exception):
    def __init__(self, code: P.ErrorCode, detail: int = 0) -> None:
        super().__init__(code.name)
        self.code = code
        self.detail = int(detail) & 0xFFFFFFFF


def _np_dtype(spec: P.BufferSpec) -> np.dtype:
    if spec.kind == P.BufferKind.FP32:
        return np.dtype("<u4")
    return np.dtype({(1, True): "i1", (2, True): "<i2", (1, False): "u1",
                     (2, False): "<u2", (4, True): "<i4",
                     (4, False): "<u4"}[(spec.wire_bytes, spec.signed)])


class Emulator:
    """Golden-model accelerator speaking the protocol.

    Parameters
    ----------
    config
        The accelerator configuration (default :meth:`AcceleratorConfig.default`).
    """

    def __init__(self, config: AcceleratorConfig | None = None) -> None:
        self.config = config or AcceleratorConfig.default()
        self.specs = P.buffer_map(self.config)
        self._backing: list[np.ndarray] = []
        self.buffers: list[np.ndarray] = []
        for s in self.specs:
            dt = _np_dtype(s)
            back = np.empty(s.depth + 2 * GUARD_ELEMENTS, dtype=dt)
            back.view(np.uint8)[:] = _SENTINEL
            self._backing.append(back)
            self.buffers.append(back[GUARD_ELEMENTS: GUARD_ELEMENTS + s.depth])
            self.buffers[-1][:] = 0
        self._info = P.canonical_json(P.info_description(self.config))
        self._hash = P.device_hash(self.config)
        self._parser = FrameParser()
        self._last: tuple[int, int, bytes, bytes] | None = None
        self.counters: Counter = Counter()
        self.session = 0
        # LUQ quantizer generators: seed of the last reseed, stream elements since (whole
        # beats of luq_lanes); RESET keeps them, as the device's LUQ engine does
        self._luq_seed, self._luq_pos = 0, 0
        self._reset_state()

    # -- byte interface --------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Bytes from the host -> bytes to the host."""
        return b"".join(self._handle(e) for e in self._parser.feed(data))

    def idle(self) -> bytes:
        """The line went idle: drop a partial frame (and answer frames found in it)."""
        return b"".join(self._handle(e) for e in self._parser.idle())

    def guards_intact(self) -> bool:
        """True if no byte around any buffer was ever written."""
        for back in self._backing:
            raw = back.view(np.uint8)
            g = GUARD_ELEMENTS * back.itemsize
            if not (np.all(raw[:g] == _SENTINEL) and np.all(raw[-g:] == _SENTINEL)):
                return False
        return True

    # -- dispatch --------------------------------------------------------------------
    def _handle(self, ev) -> bytes:
        if isinstance(ev, CrcError):
            self.counters["bad_crc"] += 1
            return self._error(ev.seq, ev.opcode, P.ErrorCode.BAD_CRC, ev.length)
        if not isinstance(ev, Frame):
            return b""
        if self._last is not None and self._last[:3] == (ev.seq, ev.opcode, ev.payload):
            self.counters["replayed"] += 1
            return self._last[3]
        out = self._execute(ev)
        self._last = (ev.seq, ev.opcode, ev.payload, out)
        return out

    def _error(self, seq: int, opcode: int, code: P.ErrorCode, detail: int = 0) -> bytes:
        self.counters[f"error_{code.name}"] += 1
        payload = P.ERROR_LAYOUT.pack(code=int(code), opcode=opcode & 0xFF, detail=detail)
        return P.encode_frame(seq, P.ERROR_OPCODE, self._token() + payload)

    def _token(self) -> bytes:
        return self.session.to_bytes(P.SESSION_BYTES, "little")

    def _execute(self, fr: Frame) -> bytes:
        try:
            op = P.Op(fr.opcode)
        except ValueError:
            return self._error(fr.seq, fr.opcode, P.ErrorCode.UNKNOWN_OPCODE, fr.opcode)
        try:
            fields, data = P.REQUESTS[op].unpack(fr.payload)
        except ValueError:
            return self._error(fr.seq, fr.opcode, P.ErrorCode.BAD_LENGTH, len(fr.payload))
        try:
            handler = getattr(self, f"_op_{op.name.lower()}")
            rfields, rdata = handler(fields, data)
        except _DevError as e:
            return self._error(fr.seq, fr.opcode, e.code, e.detail)
        self.counters[op.name] += 1
        payload = P.RESPONSES[op].pack(rdata, **rfields)
        return P.encode_frame(fr.seq, op | P.RESPONSE_FLAG, self._token() + payload)

    # -- helpers ---------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._acc: np.ndarray | None = None
        self._acc_eref: np.ndarray | None = None
        self._acc_bad: np.ndarray | None = None
        self._acc_meta: tuple | None = None
        self._k_total = 0
        self._stats = _empty_stats()     # stored GEMM outputs
        self._qstats = _empty_stats()    # FP32 elements QUANTIZE read from fp_in
        self._istats = _empty_stats()    # int32 words BITLAYER TRACK wrote into bl.y

    def _spec(self, buf: int, *, writable: bool = False) -> P.BufferSpec:
        if buf >= len(self.specs):
            raise _DevError(P.ErrorCode.BAD_BUFFER, buf)
        s = self.specs[buf]
        if writable and not s.writable:
            raise _DevError(P.ErrorCode.BAD_BUFFER, buf)
        return s

    def _operand_specs(self, i: int) -> tuple[P.BufferSpec, P.BufferSpec]:
        if i >= self.config.operand_buffers:
            raise _DevError(P.ErrorCode.BAD_BUFFER, i)
        man = next(s for s in self.specs if s.kind == P.BufferKind.MANTISSA and s.operand == i)
        exp = next(s for s in self.specs if s.kind == P.BufferKind.EXPONENT and s.operand == i)
        return man, exp

    def _by_kind(self, kind: P.BufferKind, name: str) -> P.BufferSpec:
        return next(s for s in self.specs if s.kind == kind and s.name == name)

    def _slot(self, slot: int, field_no: int):
        if slot >= len(self.config.formats):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, field_no)
        return self.config.formats[slot]

    @staticmethod
    def _check_flags(flags: int, enum, field_no: int) -> None:
        if flags & ~P.flag_mask(enum):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, field_no)

    def _layout_fits(self, shape: tuple[int, int], fmt) -> object:
        if shape[0] == 0 or shape[1] == 0:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, 0)
        lay = block_layout(shape, fmt)
        n = lay.num_blocks * lay.block_size
        if n > self.config.operand_depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, n)
        if lay.num_blocks > self.config.exponent_depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, lay.num_blocks)
        return lay

    # -- commands --------------------------------------------------------------------
    def _op_info(self, f, data):
        off = f["offset"]
        if off > len(self._info):
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, off)
        chunk = self._info[off: off + P.MAX_DATA]
        return {"version": P.PROTOCOL_VERSION, "hash": self._hash,
                "total": len(self._info)}, chunk

    def _op_write(self, f, data):
        s = self._spec(f["buffer"], writable=True)
        if len(data) % s.wire_bytes or len(data) > P.MAX_DATA:
            raise _DevError(P.ErrorCode.BAD_LENGTH, len(data))
        n = len(data) // s.wire_bytes
        off = f["offset"]
        if off + n > s.depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, s.depth))
        self.buffers[s.id][off: off + n] = np.frombuffer(data, dtype=self.buffers[s.id].dtype)
        return {"count": n}, b""

    def _op_read(self, f, data):
        s = self._spec(f["buffer"])
        n, off = f["count"], f["offset"]
        if n * s.wire_bytes > P.MAX_DATA:
            raise _DevError(P.ErrorCode.BAD_LENGTH, n)
        if off + n > s.depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, s.depth))
        return {}, self.buffers[s.id][off: off + n].tobytes()

    def _op_quantize(self, f, data):
        if not self.config.quantize:     # no QUANTIZE engine built
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        fmt = self._slot(f["slot"], 0)
        if f["rounding"] >= len(ROUNDING_MODES):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, 7)
        fmt = fmt.replace(rounding=ROUNDING_MODES[f["rounding"]], seed=f["seed"])
        man_s, exp_s = self._operand_specs(f["dst"])
        self._check_flags(f["flags"], P.QuantizeFlag, 2)
        exponent = None
        if f["flags"] & P.QuantizeFlag.STATIC_EXP:
            if not fmt.emin <= f["exp_code"] - fmt.exp_bias <= fmt.emax:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT,
                                P.REQUESTS[P.Op.QUANTIZE].index("exp_code"))
            exponent = f["exp_code"] - fmt.exp_bias
        rows, cols, src = f["rows"], f["cols"], f["src_offset"]
        lay = self._layout_fits((rows, cols), fmt)
        fp_in = self._by_kind(P.BufferKind.FP32, "fp_in")
        if src + rows * cols > fp_in.depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(src, fp_in.depth))
        n = lay.num_blocks * lay.block_size
        ret = bool(f["flags"] & P.QuantizeFlag.RETURN)
        if ret and n * man_s.wire_bytes + lay.num_blocks * exp_s.wire_bytes > P.MAX_DATA:
            raise _DevError(P.ErrorCode.BAD_LENGTH, n)
        x = self.buffers[fp_in.id][src: src + rows * cols].view(np.float32).reshape(rows, cols)
        q = quantize(x, fmt, nonfinite="flag", exponent=exponent)
        _fold_stats(self._qstats, x)
        codes, man = q.stream()
        self.buffers[man_s.id][:n] = man.reshape(-1)
        self.buffers[exp_s.id][: lay.num_blocks] = codes
        bad = np.flatnonzero(q.invalid.reshape(-1))
        out = b""
        if ret:
            out = (codes.astype(self.buffers[exp_s.id].dtype).tobytes()
                   + man.reshape(-1).astype(self.buffers[man_s.id].dtype).tobytes())
        return {"n_invalid": len(bad),
                "first_invalid": int(bad[0]) if len(bad) else P.NO_INDEX}, out

    def _load(self, buf: int, slot: int, rows: int, cols: int, which: int,
              field_no: int) -> BFPTensor:
        fmt = self._slot(slot, field_no)
        man_s, exp_s = self._operand_specs(buf)
        lay = self._layout_fits((rows, cols), fmt)
        n = lay.num_blocks * lay.block_size
        man = self.buffers[man_s.id][:n]
        codes = self.buffers[exp_s.id][: lay.num_blocks].astype(np.int64)
        big = np.flatnonzero(np.abs(man.astype(np.int32)) > fmt.mmax)
        if len(big):
            raise _DevError(P.ErrorCode.DATA_RANGE, big[0])
        big = np.flatnonzero(codes > fmt.exp_invalid_code)
        if len(big):
            raise _DevError(P.ErrorCode.DATA_RANGE, big[0])
        return BFPTensor.from_stream(fmt, (rows, cols), codes, man.reshape(lay.num_blocks, -1))

    def _op_gemm(self, f, data):
        cfg = self.config
        flags = f["flags"]
        self._check_flags(flags, P.GemmFlag, 2)
        G = P.GemmFlag
        a = self._load(f["a"], f["slot_a"], f["a_rows"], f["a_cols"], 0, 3)
        b = self._load(f["b"], f["slot_b"], f["b_rows"], f["b_cols"], 1, 4)
        if not flags & G.ALLOW_INVALID:
            for which, t in ((0, a), (1, b)):
                bad = np.flatnonzero(t.invalid.reshape(-1))
                if len(bad):
                    raise _DevError(P.ErrorCode.INVALID_DATA, (which << 31) | int(bad[0]))
        if flags & G.TRANS_A:
            a = a.T
        if flags & G.TRANS_B:
            b = b.T
        try:
            L = k_block_length(a, b)
        except ValueError:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, 5) from None
        M, K = a.shape
        N = b.shape[1]
        lay_a, lay_b = a.layout, b.layout
        Mp, Np = lay_a.padded[0], lay_b.padded[1]
        out_s = self._by_kind(P.BufferKind.FP32, "out")
        if flags & G.STORE and f["out_offset"] + M * N > out_s.depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(f["out_offset"], out_s.depth))
        acc_meta = (Mp, Np, lay_a.block[0], lay_b.block[1], a.fmt.frac_bits, b.fmt.frac_bits)
        accumulate = bool(flags & G.ACCUMULATE)
        if accumulate and (self._acc is None or self._acc_meta != acc_meta):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, 2)
        k_total = (self._k_total if accumulate else 0) + K
        if k_total > cfg.k_max:
            raise _DevError(P.ErrorCode.K_OVERFLOW, k_total)

        gm, gn = lay_a.grid[0], lay_b.grid[1]
        if flags & G.EXT_EREF:
            eref_s = self._by_kind(P.BufferKind.EREF, "eref")
            if gm + gn > eref_s.depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, gm + gn)
            codes = self.buffers[eref_s.id][: gm + gn].astype(np.int64)
            row = codes[:gm] - a.fmt.exp_bias
            col = codes[gm:] - b.fmt.exp_bias
            lo = -(1 << 14)
            own_r = np.where(a.invalid, lo, a.exponents.astype(np.int64)).max(axis=1)
            own_c = np.where(b.invalid, lo, b.exponents.astype(np.int64)).max(axis=0)
            if np.any(row < own_r) or np.any(col < own_c):
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, 6)
            a, b = _with_reference_block(a, b, row, col, L)
        _, acc, e_ref = bfp_matmul(a, b, guard_bits=cfg.guard_bits, return_acc=True)
        bad = (np.repeat(a.invalid.any(axis=1), lay_a.block[0])[:, None]
               | np.repeat(b.invalid.any(axis=0), lay_b.block[1])[None, :])
        if accumulate:
            if not np.array_equal(e_ref, self._acc_eref):
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, 6)
            self._acc = self._acc + acc
            self._acc_bad = self._acc_bad | bad
        else:
            self._acc, self._acc_eref, self._acc_bad = acc, e_ref, bad
            self._acc_meta = acc_meta
        self._k_total = k_total
        if flags & G.STORE:
            y = _acc_to_f32(self._acc, self._acc_eref, cfg.guard_bits, acc_meta[4],
                            acc_meta[5], self._acc_bad)[:M, :N]
            off = f["out_offset"]
            self.buffers[out_s.id][off: off + M * N] = y.reshape(-1).view(np.uint32)
            _fold_stats(self._stats, y)
        return {"k_total": k_total}, b""

    def _op_read_stats(self, f, data):
        if not self.config.stats:        # no statistics engine built
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        S = P.StatsFlag
        self._check_flags(f["flags"], S, 0)
        if (f["flags"] & S.QUANTIZE_INPUT) and (f["flags"] & S.INT_OUTPUT):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, 0)
        which = ("_qstats" if f["flags"] & S.QUANTIZE_INPUT else
                 "_istats" if f["flags"] & S.INT_OUTPUT else "_stats")
        count, nonfin, lo, hi = getattr(self, which)
        if not count:
            lo = hi = 0
        elif which == "_istats":                   # int32 words
            lo, hi = lo & 0xFFFFFFFF, hi & 0xFFFFFFFF
        else:                                      # binary32 bit patterns of the keys
            lo, hi = _key_bits(lo), _key_bits(hi)
        out = {"count": count, "n_nonfinite": nonfin, "min": lo, "max": hi}
        if f["flags"] & P.StatsFlag.CLEAR:
            setattr(self, which, _empty_stats())
        return out, b""

    def _op_reset(self, f, data):
        for back in self._backing:
            back[GUARD_ELEMENTS: len(back) - GUARD_ELEMENTS] = 0
        self._reset_state()
        return {}, b""

    def _op_session(self, f, data):
        self.session = f["token"]
        return {}, b""

    def _op_bitlayer(self, f, data):
        """``y = x @ W.T`` over the top ``layers`` of W's ``bits`` bit-planes
        (:func:`hbfp_hw.bitlayers.matmul`): W (rows, cols) from ``bl.w`` (per row, its
        planes sign plane first, each ``ceil(cols / lanes)`` words; bit ``l`` of word
        ``c`` is column ``c * lanes + l``, bits past ``cols`` ignored), x (batch, cols)
        from ``bl.x``, y (batch, rows) into ``bl.y`` (int32)."""
        from hbfp_hw.bitlayers import matmul as bl_matmul
        lay = P.REQUESTS[P.Op.BITLAYER]
        lanes = P.bitlayer_lanes(self.config)
        if not lanes:
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        bits, layers = f["bits"], f["layers"]
        rows, cols, batch = f["rows"], f["cols"], f["batch"]
        if not 1 <= bits <= P.BITLAYER_BITS_MAX:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("bits"))
        if not 1 <= layers <= bits:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("layers"))
        if rows == 0:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("rows"))
        if not 1 <= cols <= P.bitlayer_k_max(self.config):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("cols"))
        if batch == 0:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("batch"))
        self._check_flags(f["flags"], P.BitLayerFlag, lay.index("flags"))
        chunks = -(-cols // lanes)
        ws, xs, ys = (self._by_kind(k, n) for k, n in ((P.BufferKind.PLANES, "bl.w"),
                                                        (P.BufferKind.INT, "bl.x"),
                                                        (P.BufferKind.INT, "bl.y")))
        for off, n, sp in ((f["w_offset"], rows * bits * chunks, ws),
                           (f["x_offset"], batch * cols, xs),
                           (f["y_offset"], batch * rows, ys)):
            if off + n > sp.depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, sp.depth))
        words = self.buffers[ws.id][f["w_offset"]: f["w_offset"] + rows * bits * chunks]
        words = words.astype(np.int64).reshape(rows, bits, chunks)
        lane_bits = (words[..., None] >> np.arange(lanes)) & 1       # (rows, q, c, lane)
        planes = lane_bits.reshape(rows, bits, chunks * lanes)[:, ::-1, :cols]
        planes = np.ascontiguousarray(planes.transpose(1, 0, 2)).astype(np.uint8)
        x = self.buffers[xs.id][f["x_offset"]: f["x_offset"] + batch * cols]
        y = bl_matmul(x.astype(np.int64).reshape(batch, cols), planes, layers).reshape(-1)
        dst = slice(f["y_offset"], f["y_offset"] + batch * rows)
        if f["flags"] & P.BitLayerFlag.ACCUMULATE:        # int32 words, wrapping
            y = y + self.buffers[ys.id][dst].astype(np.int64)
        y32 = y.astype(np.int32)
        self.buffers[ys.id][dst] = y32
        if f["flags"] & P.BitLayerFlag.TRACK:
            _fold_ints(self._istats, y32)
        return {}, b""

    def _op_luq_gemm(self, f, data):
        """``y = a @ b`` by :func:`hbfp_hw.luq.luq_matmul`: ``a`` (rows, k) LUQ codes from
        ``luq.a`` (sample-major: code ``(s, i, kk)`` at ``a_offset + (s * rows + i) * k
        + kk``, bits 3..0), scale ``alpha`` (FP32 bits: 0 or positive normal), ``samples``
        SMP samples, flag ``A_INVALID``; ``b`` (k, cols) the BFP operand in operand
        buffer ``b`` (slot ``slot_b``: ``tile x tile`` blocks); FP32 ``y`` (rows, cols)
        row-major into ``out``."""
        from hbfp_hw.luq import LUQTensor, luq_matmul
        cfg = self.config
        lay = P.REQUESTS[P.Op.LUQ_GEMM]
        if not P.luq_lanes(cfg):
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        self._check_flags(f["flags"], P.LuqGemmFlag, lay.index("flags"))
        man_s, exp_s = self._operand_specs(f["b"])
        if f["slot_b"] not in P.luq_slots(cfg):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("slot_b"))
        S = f["samples"]
        if S not in P.LUQ_SAMPLES:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("samples"))
        M, K, N = f["rows"], f["k"], f["cols"]
        for name in ("rows", "k", "cols"):
            if f[name] == 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(name))
        if K > cfg.k_max:
            raise _DevError(P.ErrorCode.K_OVERFLOW, K)
        ab = f["alpha"]
        if ab and (ab >> 31 or not 1 <= (ab >> 23) & 0xFF <= 254):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("alpha"))
        fmt, T = cfg.formats[f["slot_b"]], cfg.tile
        nblk = -(-K // T) * -(-N // T)
        n = nblk * T * T
        if n > cfg.operand_depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, n)
        a_s = self._by_kind(P.BufferKind.LUQ_CODES, "luq.a")
        out_s = self._by_kind(P.BufferKind.FP32, "out")
        for off, cnt, sp in ((f["a_offset"], S * M * K, a_s), (f["out_offset"], M * N, out_s)):
            if off + cnt > sp.depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, sp.depth))
        man = self.buffers[man_s.id][:n]
        big = np.flatnonzero(np.abs(man.astype(np.int32)) > fmt.mmax)
        if len(big):
            raise _DevError(P.ErrorCode.DATA_RANGE, big[0])
        codes = self.buffers[exp_s.id][:nblk].astype(np.int64)
        big = np.flatnonzero(codes > fmt.exp_invalid_code)
        if len(big):
            raise _DevError(P.ErrorCode.DATA_RANGE, big[0])
        b = BFPTensor.from_stream(fmt, (K, N), codes, man.reshape(nblk, -1))
        c = self.buffers[a_s.id][f["a_offset"]: f["a_offset"] + S * M * K] & 0xF
        alpha = float(np.array([ab], np.uint32).view(np.float32)[0])
        a = LUQTensor(P.luq_format(cfg, samples=S), (M, K),
                      c.astype(np.uint8).reshape(S, M, K), alpha, 0.0,
                      invalid=bool(f["flags"] & P.LuqGemmFlag.A_INVALID))
        y = luq_matmul(a, b, guard_bits=cfg.guard_bits)
        off = f["out_offset"]
        self.buffers[out_s.id][off: off + M * N] = y.reshape(-1).view(np.uint32)
        return {}, b""

    def _op_luq_quantize(self, f, data):
        """``count`` FP32 elements of ``fp_in`` from ``src_offset`` -> LUQ codes into
        ``luq.a`` from ``dst_offset`` by :func:`hbfp_hw.luq.luq_quantize` (the device's
        :func:`~hbfp_hw.protocol.luq_format`, generators reseeded from ``seed`` unless
        ``CONTINUE``; the scale from this chunk's ``max|x|`` or, with ``MAX_ABS``, from the
        ``max_abs`` field). NaN/Inf: INVALID_DATA (first index), nothing written."""
        from hbfp_hw.luq import luq_quantize
        cfg = self.config
        lay = P.REQUESTS[P.Op.LUQ_QUANTIZE]
        L = P.luq_lanes(cfg)
        if not L:
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        flags = f["flags"]
        self._check_flags(flags, P.LuqQuantizeFlag, lay.index("flags"))
        n = f["count"]
        if n == 0:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("count"))
        mb = f["max_abs"]
        if flags & P.LuqQuantizeFlag.MAX_ABS and (mb >> 31 or (mb >> 23) & 0xFF == 255):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("max_abs"))
        fp_in = self._by_kind(P.BufferKind.FP32, "fp_in")
        a_s = self._by_kind(P.BufferKind.LUQ_CODES, "luq.a")
        for off, sp in ((f["src_offset"], fp_in), (f["dst_offset"], a_s)):
            if off + n > sp.depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, sp.depth))
        src = f["src_offset"]
        x = self.buffers[fp_in.id][src: src + n].view(np.float32)
        bad = np.flatnonzero(~np.isfinite(x))
        if len(bad):
            raise _DevError(P.ErrorCode.INVALID_DATA, bad[0])
        if not flags & P.LuqQuantizeFlag.CONTINUE:
            self._luq_seed, self._luq_pos = f["seed"], 0
        pos = self._luq_pos
        m = None
        if flags & P.LuqQuantizeFlag.MAX_ABS:
            m = float(np.array([mb], np.uint32).view(np.float32)[0])
        # element t of the chunk is element pos + t of the generators' stream
        q = luq_quantize(np.concatenate([np.zeros(pos, np.float32), x]),
                         P.luq_format(cfg, seed=self._luq_seed), max_abs=m)
        self.buffers[a_s.id][f["dst_offset"]: f["dst_offset"] + n] = q.codes[0, pos:]
        self._luq_pos = pos + -(-n // L) * L
        f32 = np.array([q.alpha, q.max_abs], np.float32).view(np.uint32)
        return {"alpha": int(f32[0]), "max_abs": int(f32[1]),
                "saturated": q.saturated}, b""

    def _op_sparse_gemm(self, f, data):
        """N:M sparse GEMM from the compressed weight in ``sp.*``
        (:func:`hbfp_hw.sparsity.sparse_matmul` / ``sparse_matmul_t``): the weight
        ``[w_rows, w_cols]`` is ``Tr x Tc`` tiles of ``M x M`` (the dimensions padded to
        ``tile``), tile ``tr * Tc + tc`` at ``w_offset`` (in tiles) of ``sp.man`` /
        ``sp.idx``: ``M`` rows of ``N`` kept mantissas and their in-tile columns (low
        ``log2 M`` bits of each ``sp.idx`` element); its block exponent codes (format
        ``slot_w``, ``tile x tile`` blocks, row-major) at ``e_offset`` of ``sp.exp``.
        X (forward, ``batch x w_cols``) or dY (``TRANSPOSE``, ``batch x w_rows``) in
        operand buffer ``x`` (format ``slot_x``, block-stream order, as QUANTIZE stores
        it). FP32 result ``batch x w_rows`` (``X Wᵀ``) or ``batch x w_cols`` (``dY W``)
        row-major into ``out`` at ``out_offset``. Mantissas and codes are used as stored
        (no range checks; an invalid block's outputs are NaN); with ``TRANSPOSE`` every
        tile must name each column exactly ``N`` times, ``N`` distinct columns per row
        (else DATA_RANGE, detail: the tile)."""
        from hbfp_hw.sparsity import SparseBFPWeight, sparse_matmul, sparse_matmul_t
        cfg = self.config
        lay = P.REQUESTS[P.Op.SPARSE_GEMM]
        if not P.sparse_lanes(cfg):
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        n, m = P.sparse_nm(cfg)
        S, T = n * m, cfg.tile
        flags = f["flags"]
        self._check_flags(flags, P.SparseFlag, lay.index("flags"))
        trans = bool(flags & P.SparseFlag.TRANSPOSE)
        if f["x"] >= cfg.operand_buffers:
            raise _DevError(P.ErrorCode.BAD_BUFFER, f["x"])
        for name in ("slot_x", "slot_w"):
            if f[name] >= len(cfg.formats) or cfg.block_2d(f[name]) != (T, T):
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(name))
        for name in ("batch", "w_rows", "w_cols"):
            if f[name] == 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(name))
        kname = "w_rows" if trans else "w_cols"
        if f[kname] > cfg.k_max:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(kname))
        B, O, I = f["batch"], f["w_rows"], f["w_cols"]
        K, N = (O, I) if trans else (I, O)
        gb, gk, go, gi = (-(-v // T) for v in (B, K, O, I))
        if gb * gk * T * T > cfg.operand_depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, gb * gk * T * T)
        man_s, idx_s = self._by_kind(P.BufferKind.SPARSE, "sp.man"), \
            self._by_kind(P.BufferKind.SPARSE, "sp.idx")
        exp_s = self._by_kind(P.BufferKind.SPARSE_EXP, "sp.exp")
        out_s = self._by_kind(P.BufferKind.FP32, "out")
        tr, tc = go * T // m, gi * T // m
        lim = man_s.depth // S
        for off, cnt, depth in ((f["w_offset"], tr * tc, lim), (f["e_offset"], go * gi,
                                                                  exp_s.depth),
                                (f["out_offset"], B * N, out_s.depth)):
            if off + cnt > depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, depth))
        w0 = f["w_offset"] * S
        mans = self.buffers[man_s.id][w0: w0 + tr * tc * S].astype(np.int64)
        idx = self.buffers[idx_s.id][w0: w0 + tr * tc * S].astype(np.int64) & (m - 1)
        idx = idx.reshape(tr * tc, m, n)
        if trans:
            cnt = (idx[..., None] == np.arange(m)).sum(axis=(1, 2))        # per column
            dup = np.zeros(len(idx), bool)
            for a in range(n):
                for b in range(a + 1, n):
                    dup |= (idx[:, :, a] == idx[:, :, b]).any(axis=1)
            bad = np.flatnonzero((cnt != n).any(axis=1) | dup)
            if len(bad):
                raise _DevError(P.ErrorCode.DATA_RANGE, bad[0])
        fw, fx = cfg.formats[f["slot_w"]], cfg.formats[f["slot_x"]]
        codes = self.buffers[exp_s.id][f["e_offset"]: f["e_offset"] + go * gi]
        codes = codes.astype(np.int64).reshape(go, gi)
        sw = SparseBFPWeight(fw, (O, I), n, m, "transposable", mans.reshape(tr, tc, m, n),
                             idx.reshape(tr, tc, m, n).astype(np.uint8),
                             codes - fw.exp_bias, codes == fw.exp_invalid_code)
        xman_s, xexp_s = self._operand_specs(f["x"])
        xl = block_layout((B, K), fx)
        xm = self.buffers[xman_s.id][: gb * gk * T * T].astype(np.int64)
        xc = self.buffers[xexp_s.id][: gb * gk].astype(np.int64).reshape(gb, gk)
        xq = BFPTensor(fx, (B, K), xl.from_stream(xm.reshape(gb * gk, T * T)),
                       xc - fx.exp_bias, xc == fx.exp_invalid_code)
        fn = sparse_matmul_t if trans else sparse_matmul
        y = fn(xq, sw, guard_bits=cfg.guard_bits)
        off = f["out_offset"]
        self.buffers[out_s.id][off: off + B * N] = y.reshape(-1).view(np.uint32)
        return {}, b""

    def _op_conv(self, f, data):
        """HyperBlock convolution (``hbfp_hw.conv``) over ``tile x tile`` blocks: mode 0
        forward (a: X, b: W), 1 dX (a: dY, b: W), 2 dW (a: dY, b: X); the operands are
        4-D conv tensors in block-stream order (``BFPTensor.stream()`` of ``conv_format``
        tensors), padding blocks are never stored. The padded output tiles go to
        ``out`` (layout: :func:`hbfp_hw.protocol.conv_plan`). Clears the GEMM
        accumulators (a following ACCUMULATE is BAD_ARGUMENT 2)."""
        from hbfp_hw.conv import (bfp_conv2d, bfp_conv2d_input_grad, bfp_conv2d_weight_grad,
                                  conv_format)
        cfg, T = self.config, self.config.tile
        idx = P.REQUESTS[P.Op.CONV].index
        if not P.conv_built(cfg):
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        mode = f["mode"]
        if mode >= len(P.CONV_MODES):
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, idx("mode"))
        ok = _conv_slots(cfg)
        for name in ("slot_a", "slot_b"):
            if f[name] >= len(cfg.formats):
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, idx(name))
            if f[name] not in ok:
                raise _DevError(P.ErrorCode.UNSUPPORTED, idx(name))
        for name in ("a", "b"):
            if f[name] >= cfg.operand_buffers:
                raise _DevError(P.ErrorCode.BAD_BUFFER, f[name])
        for name in ("n", "c", "h", "w", "o", "kh", "kw"):
            if f[name] == 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, idx(name))
        for name in ("stride_h", "stride_w"):
            if f[name] not in P.CONV_STRIDES:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, idx(name))
        for name in ("dil_h", "dil_w"):
            if f[name] == 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, idx(name))
        for ax, k in (("h", "kh"), ("w", "kw")):
            if f[ax] + 2 * f[f"pad_{ax}"] - f[f"dil_{ax}"] * (f[k] - 1) - 1 < 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, idx(k))
        stride, pad = (f["stride_h"], f["stride_w"]), (f["pad_h"], f["pad_w"])
        dil = (f["dil_h"], f["dil_w"])
        pl = P.conv_plan(mode, f["n"], f["c"], f["h"], f["w"], f["o"], f["kh"], f["kw"],
                         stride, pad, dil, T)
        for nb in (pl["blocks_a"], pl["blocks_b"]):
            if nb * T * T > cfg.operand_depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, nb * T * T)
        if pl["nk"] * T > cfg.k_max:
            raise _DevError(P.ErrorCode.K_OVERFLOW, pl["nk"] * T)
        out_s = self._by_kind(P.BufferKind.FP32, "out")
        n_out, off = pl["mt"] * pl["nt"] * T * T, f["out_offset"]
        if off + n_out > out_s.depth:
            raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, out_s.depth))
        gn, gc, go, ho, wo = (pl[k] for k in ("gn", "gc", "go", "ho", "wo"))
        h, w, kh, kw = f["h"], f["w"], f["kh"], f["kw"]
        x_shape, w_shape = (gn * T, gc * T, h, w), (go * T, gc * T, kh, kw)
        y_shape = (gn * T, go * T, ho, wo)
        shapes = ((x_shape, w_shape), (y_shape, w_shape), (y_shape, x_shape))[mode]
        ops = []
        for which, shape in enumerate(shapes):
            fmt = conv_format(cfg.formats[f[("slot_a", "slot_b")[which]]], T, T)
            man_s, exp_s = self._operand_specs(f["ab"[which]])
            nb = pl[("blocks_a", "blocks_b")[which]]
            man = self.buffers[man_s.id][: nb * T * T]
            codes = self.buffers[exp_s.id][:nb].astype(np.int64)
            big = np.flatnonzero(np.abs(man.astype(np.int32)) > fmt.mmax)
            if len(big):
                raise _DevError(P.ErrorCode.DATA_RANGE, big[0])
            big = np.flatnonzero(codes > fmt.exp_invalid_code)
            if len(big):
                raise _DevError(P.ErrorCode.DATA_RANGE, big[0])
            ops.append(BFPTensor.from_stream(fmt, shape, codes, man.reshape(nb, -1)))
        geo = dict(stride=stride, padding=pad, dilation=dil, guard_bits=cfg.guard_bits)
        if mode == 0:
            y = bfp_conv2d(ops[0], ops[1], **geo)                    # (Np, Op, ho, wo)
            y = y.reshape(gn, T, go * T, ho, wo).transpose(0, 3, 4, 1, 2)
        elif mode == 1:
            y = bfp_conv2d_input_grad(ops[0], ops[1], (h, w), **geo)  # (Np, Cp, h, w)
            y = y.reshape(gn, T, gc * T, h, w).transpose(0, 3, 4, 1, 2)
        else:
            y = bfp_conv2d_weight_grad(ops[0], ops[1], (kh, kw), **geo)   # (Op, Cp, kh, kw)
            y = y.reshape(go * T, gc, T, kh, kw).transpose(0, 1, 3, 4, 2)
        y = np.ascontiguousarray(y).reshape(-1)
        self.buffers[out_s.id][off: off + n_out] = y.view(np.uint32)
        _fold_stats(self._stats, y)
        self._acc = self._acc_eref = self._acc_bad = self._acc_meta = None
        self._k_total = 0
        return {}, b""

    def _op_mls_gemm(self, f, data):
        """Exact MLS GEMM (:func:`hbfp_hw.mls.mls_matmul`) of A ``(rows, K)`` and B
        ``(K, cols)``, ``K = groups * group_words * mls_lanes``, both grouped along K with
        groups of ``group_words`` words. A's codes are read from ``mls.a`` row by row
        (word ``(i * groups + kb) * group_words + w``), B's from ``mls.b`` stored as Bᵀ
        (``cols`` rows, same layout); group shifts from ``mls.ga`` (``rows x groups``) and
        ``mls.gb`` (``cols x groups``, i.e. Bᵀ); tensor exponents are the int16 fields
        ``exp_a`` / ``exp_b``. Only the low ``element_bits`` of a code and the low
        ``group_bits`` of a shift are used. The FP32 results (row-major) go to ``out``."""
        from hbfp_hw.mls import MLSTensor, mls_matmul
        lay = P.REQUESTS[P.Op.MLS_GEMM]
        lanes = P.mls_lanes(self.config)
        if not lanes:
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        for name in ("rows", "cols", "groups", "group_words"):
            if f[name] == 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(name))
        rows, cols, groups, gw = f["rows"], f["cols"], f["groups"], f["group_words"]
        if groups * gw * lanes > P.MLS_K_MAX:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("groups"))
        texp = {}
        for name in ("exp_a", "exp_b"):
            texp[name] = _i16(f[name])
            if not P.MLS_TEXP_RANGE[0] <= texp[name] <= P.MLS_TEXP_RANGE[1]:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(name))
        rowlen = groups * gw
        out_s = self._by_kind(P.BufferKind.FP32, "out")
        specs = {n: self._by_kind(k, n) for k, n in (
            (P.BufferKind.MLS_CODES, "mls.a"), (P.BufferKind.MLS_CODES, "mls.b"),
            (P.BufferKind.MLS_SHIFTS, "mls.ga"), (P.BufferKind.MLS_SHIFTS, "mls.gb"))}
        for off, n, sp in ((f["a_offset"], rows * rowlen, specs["mls.a"]),
                           (f["b_offset"], cols * rowlen, specs["mls.b"]),
                           (f["ga_offset"], rows * groups, specs["mls.ga"]),
                           (f["gb_offset"], cols * groups, specs["mls.gb"]),
                           (f["y_offset"], rows * cols, out_s)):
            if off + n > sp.depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, sp.depth))
        fmt = P.mls_format(self.config).replace(group_size=gw * lanes)
        K = rowlen * lanes

        def codes(name, off, n):
            w = self.buffers[specs[name].id][off: off + n * rowlen].astype(np.int64)
            c = (w[:, None] >> (8 * np.arange(lanes))) & ((1 << fmt.element_bits) - 1)
            return c.reshape(n, K).astype(np.uint16)

        def shifts(name, off, n):
            g = self.buffers[specs[name].id][off: off + n * groups] & fmt.gmax
            return g.reshape(n, groups).astype(np.uint8)
        a = MLSTensor(fmt, (rows, K), texp["exp_a"], shifts("mls.ga", f["ga_offset"], rows),
                      codes("mls.a", f["a_offset"], rows))
        bt = MLSTensor(fmt, (cols, K), texp["exp_b"], shifts("mls.gb", f["gb_offset"], cols),
                       codes("mls.b", f["b_offset"], cols))
        y = mls_matmul(a, bt.T)
        off = f["y_offset"]
        self.buffers[out_s.id][off: off + rows * cols] = y.reshape(-1).view(np.uint32)
        return {}, b""

    def _op_mls_quantize(self, f, data):
        """MLS quantization (:meth:`hbfp_hw.mls.MLSFormat.quantize_array` with
        ``tensor_exp=texp``) of the ``rows x cols`` FP32 tensor at ``src_offset`` of
        ``fp_in`` in :func:`hbfp_hw.protocol.mls_format`, groups of ``MLS_QUANT_GROUP``
        along rows (zero padded), ``rounding`` 0 nearest even / 1 stochastic from ``seed``.
        Codes go to ``mls.a`` (``dst`` 0) or ``mls.b`` (1) at ``codes_offset`` in the
        MLS_GEMM layout (``group_words = MLS_QUANT_GROUP / mls_lanes``), group shifts to
        ``mls.ga`` / ``mls.gb`` at ``g_offset``. A NaN/Inf element: INVALID_DATA, detail
        its index in the tensor (nothing written)."""
        lay = P.REQUESTS[P.Op.MLS_QUANTIZE]
        lanes = P.mls_lanes(self.config)
        if not lanes:
            raise _DevError(P.ErrorCode.UNSUPPORTED, 0)
        if f["dst"] > 1:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("dst"))
        for name in ("rows", "cols"):
            if f[name] == 0:
                raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index(name))
        t = _i16(f["texp"])
        if not P.MLS_TEXP_RANGE[0] <= t <= P.MLS_TEXP_RANGE[1]:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("texp"))
        if f["rounding"] > 1:
            raise _DevError(P.ErrorCode.BAD_ARGUMENT, lay.index("rounding"))
        rows, cols, src = f["rows"], f["cols"], f["src_offset"]
        Lq = P.MLS_QUANT_GROUP
        groups = -(-cols // Lq)
        side = "ab"[f["dst"]]
        fp_in = self._by_kind(P.BufferKind.FP32, "fp_in")
        cs = self._by_kind(P.BufferKind.MLS_CODES, f"mls.{side}")
        gs = self._by_kind(P.BufferKind.MLS_SHIFTS, f"mls.g{side}")
        for off, n, sp in ((src, rows * cols, fp_in),
                           (f["codes_offset"], rows * groups * (Lq // lanes), cs),
                           (f["g_offset"], rows * groups, gs)):
            if off + n > sp.depth:
                raise _DevError(P.ErrorCode.OUT_OF_RANGE, max(off, sp.depth))
        x = self.buffers[fp_in.id][src: src + rows * cols].view(np.float32).reshape(rows, cols)
        bad = np.flatnonzero(~np.isfinite(x.reshape(-1)))
        if len(bad):
            raise _DevError(P.ErrorCode.INVALID_DATA, int(bad[0]))
        fmt = P.mls_format(self.config).replace(
            rounding=("nearest_even", "stochastic")[f["rounding"]], seed=f["seed"])
        q = fmt.quantize_array(x, tensor_exp=t)
        c = q.codes.astype(np.int64).reshape(-1, lanes)
        words = (c << (8 * np.arange(lanes))).sum(axis=1)
        off = f["codes_offset"]
        self.buffers[cs.id][off: off + len(words)] = words
        off = f["g_offset"]
        self.buffers[gs.id][off: off + rows * groups] = q.group_shift.reshape(-1)
        return {}, b""


def _i16(v: int) -> int:
    """A u16 field as int16 (two's complement)."""
    return v - (1 << 16) if v & 0x8000 else v


def _conv_slots(config: AcceleratorConfig) -> list[int]:
    """Format slots CONV computes: the MAC array's ``tile x tile`` slots."""
    from hbfp_hw.gateware.top import tile_slots
    return tile_slots(config)


def _with_reference_block(a: BFPTensor, b: BFPTensor, row: np.ndarray, col: np.ndarray,
                          L: int) -> tuple[BFPTensor, BFPTensor]:
    """Append one all-zero K block whose exponents are the reference exponents.

    Zero mantissas add nothing to any accumulator, and the golden model's reference
    exponent (row max of ``a`` plus column max of ``b``) becomes exactly ``row + col``.
    The exponents are widened to int64: a reference code up to 65535 minus the bias
    does not fit the int16 exponents of a quantized tensor (it used to wrap).
    """
    Mp, Kp = a.layout.padded
    Np = b.layout.padded[1]
    am = np.concatenate([a.mantissas, np.zeros((Mp, L), a.mantissas.dtype)], axis=1)
    ae = np.concatenate([a.exponents.astype(np.int64), row.astype(np.int64)[:, None]], axis=1)
    ai = np.concatenate([a.invalid, np.zeros((ae.shape[0], 1), bool)], axis=1)
    bm = np.concatenate([b.mantissas, np.zeros((L, Np), b.mantissas.dtype)], axis=0)
    be = np.concatenate([b.exponents.astype(np.int64), col.astype(np.int64)[None, :]], axis=0)
    bi = np.concatenate([b.invalid, np.zeros((1, be.shape[1]), bool)], axis=0)
    return (BFPTensor(a.fmt, (a.shape[0], Kp + L), am, ae, ai),
            BFPTensor(b.fmt, (Kp + L, b.shape[1]), bm, be, bi))


def _acc_to_f32(acc: np.ndarray, e_ref: np.ndarray, guard_bits: int, fa: int, fb: int,
                bad: np.ndarray) -> np.ndarray:
    """Step 4 and 5 of :mod:`hbfp_hw.gemm`: accumulator -> FP32 (flush, RNE, NaN)."""
    return acc_to_fp32(acc, e_ref - guard_bits - fa - fb, bad)


# READ_STATS order: the binary32 patterns compared through the order-preserving key of
# ``hbfp_hw.gateware.range_tracker.float_key`` (a total order: -0.0 < +0.0), so the
# device's range tracker and this model agree whatever the order of the outputs.
def _f32_keys(y: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(y, dtype=np.float32).view(np.int32)
    return np.where(b < 0, b ^ np.int32(0x7FFFFFFF), b)


def _key_f32(key: int) -> float:
    b = key ^ 0x7FFFFFFF if key < 0 else key
    return float(np.array([b], dtype=np.int32).view(np.float32)[0])


def _key_bits(key: int) -> int:
    """The binary32 bit pattern (unsigned 32-bit word) of an order-preserving key."""
    return (key ^ 0x7FFFFFFF if key < 0 else key) & 0xFFFFFFFF


def _fold_ints(st: list, y: np.ndarray) -> None:
    """Fold int32 words into ``st`` as the device's integer RangeTracker does (every
    word counted, the counter saturating at 32 bits)."""
    if not y.size:
        return
    st[0] = min(st[0] + int(y.size), 0xFFFFFFFF)
    st[2] = min(st[2], int(y.min()))
    st[3] = max(st[3], int(y.max()))


def _empty_stats() -> list:
    """count, non-finite count, min key, max key (no element yet)."""
    return [0, 0, 1 << 31, -(1 << 31) - 1]


def _fold_stats(st: list, y: np.ndarray) -> None:
    """Fold the binary32 elements ``y`` into ``st`` as the device's RangeTracker does:
    finite elements (subnormals and signed zeros as they are, by their bit patterns)
    counted and ranged, NaN/Inf only counted; counters saturate at 32 bits."""
    bits = np.ascontiguousarray(y, dtype=np.float32).reshape(-1).view(np.uint32)
    fin = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    n_fin = int(fin.sum())
    st[0] = min(st[0] + n_fin, 0xFFFFFFFF)
    st[1] = min(st[1] + int(bits.size - n_fin), 0xFFFFFFFF)
    if n_fin:
        keys = _f32_keys(bits[fin].view(np.float32))
        st[2] = min(st[2], int(keys.min()))
        st[3] = max(st[3], int(keys.max()))
