"""Bit-serial bit-layer GEMM unit (PrecisionBatching), bit-exact with
:func:`hbfp_hw.bitlayers.matmul`.

The unit holds weights as 1-bit planes in a block RAM and computes ``y = x @ W.T`` over
the top ``layers`` planes of W, one plane per pass: per clock it reads one plane word
(``lanes`` weight bits of one output row) and the matching ``lanes`` activations, ANDs
them (a 1-bit weight selects its activation) and sums them in a balanced adder tree;
an accumulator adds the partial sums of a plane and, at the start of each lower plane,
doubles first (Horner's rule, MSB plane first, the sign plane subtracted)::

    acc = 0
    for q in 0 .. layers-1:            # plane i = bits-1-q, sign plane first
        acc = 2*acc + c_i * sum_c sum_l plane_i[o, c*lanes + l] * x[c*lanes + l]
    y[o] = acc << (bits - layers)

so a GEMM takes ``rows * layers * chunks`` compute clocks (``chunks = ceil(K / lanes)``):
time proportional to the layer count, which is a field of every command.

Ports (``lib.stream`` unless noted)
-----------------------------------
``w_wr`` (In, ``ready`` always 1)
    ``{addr, data}``: writes one plane word. Word ``base + (o*bits + q)*chunks + c``
    holds bit ``bits-1-q`` of the weights ``W[o, c*lanes : (c+1)*lanes]`` (lane ``l`` in
    data bit ``l``; lanes past K are 0): per output row its planes sign plane first, so
    a run over the top ``layers`` planes reads consecutive words.
``cmd`` (In)
    ``{base, rows, chunks, bits, layers, batch}``: one GEMM of ``batch`` activation rows
    against ``rows`` output rows. ``1 <= layers <= bits <= bits_max``, ``chunks <=
    chunks_max``, ``rows, batch >= 1`` (the unit does not check them: the host and the
    accelerator engine do).
``x`` (In)
    ``chunks`` beats per activation row, each ``lanes`` signed ``act_bits`` values
    (activations narrower than ``act_bits`` are sign-extended). Taken at the start of
    every activation row.
``o`` (Out)
    ``batch * rows`` signed results in row-major order (``y[b, o]``), through an 8-deep
    FIFO; the sequencer only starts an output row when its result has a FIFO slot, so
    back-pressure never loses a result.

Timing (no gaps on ``x``, ``o`` always ready): a command takes
:func:`command_cycles` clocks from its ``cmd`` handshake to its last ``o`` beat.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hbfp_hw.manifest import check_verilog_identifier, write_manifest

__all__ = ["BitSerialConfig", "BitSerialGemm", "command_cycles", "pack_planes",
           "pack_x", "generate", "PIPE_LATENCY", "OUT_FIFO_DEPTH"]

#: Clocks from the last read issue of an output row to its ``o`` beat (read, adder-tree
#: register, accumulator, shift register, the FIFO's registered output), without the
#: optional mid-tree register.
PIPE_LATENCY = 5
OUT_FIFO_DEPTH = 8


def _check(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name}={v!r}; accepted range is integers in [{lo}, {hi}]")


@dataclass(frozen=True)
class BitSerialConfig:
    """Build parameters of :class:`BitSerialGemm`.

    lanes: weight bits (and activations) per clock, a power of two in [2, 256];
    act_bits: activation width in [2, 32]; bits_max: weight planes per row in [1, 16];
    w_depth: plane-memory words (power of two in [16, 2**20]); chunks_max: activation
    words per row, ``K <= lanes * chunks_max`` (power of two in [1, 1024]);
    rows_bits / batch_bits: widths of the command's ``rows`` / ``batch`` counts;
    tree_pipe: a register in the middle of the adder tree (one more clock of latency).
    """

    lanes: int = 32
    act_bits: int = 16
    bits_max: int = 8
    w_depth: int = 4096
    chunks_max: int = 8
    rows_bits: int = 12
    batch_bits: int = 12
    tree_pipe: bool = False

    def __post_init__(self):
        _check("lanes", self.lanes, 2, 256)
        _check("act_bits", self.act_bits, 2, 32)
        _check("bits_max", self.bits_max, 1, 16)
        _check("w_depth", self.w_depth, 16, 1 << 20)
        _check("chunks_max", self.chunks_max, 1, 1024)
        _check("rows_bits", self.rows_bits, 1, 24)
        _check("batch_bits", self.batch_bits, 1, 24)
        for n in ("lanes", "w_depth", "chunks_max"):
            v = getattr(self, n)
            if v & (v - 1):
                raise ValueError(f"{n}={v}; accepted values are powers of two")

    def replace(self, **kw) -> "BitSerialConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BitSerialConfig":
        return cls(**d)

    @property
    def k_max(self) -> int:
        return self.lanes * self.chunks_max

    @property
    def addr_bits(self) -> int:
        return max(1, (self.w_depth - 1).bit_length())

    @property
    def acc_bits(self) -> int:
        """Result width: ``|y| <= k_max * 2**(act_bits-1) * 2**(bits_max-1)``."""
        return self.act_bits + self.bits_max + math.ceil(math.log2(self.k_max)) + 1

    @property
    def latency(self) -> int:
        return PIPE_LATENCY + int(self.tree_pipe)


def command_cycles(cfg: BitSerialConfig, *, rows: int, chunks: int, layers: int,
                   batch: int = 1) -> int:
    """Clocks of one command, from its ``cmd`` handshake to its last ``o`` beat (both
    counted), with ``x`` always valid and ``o`` always ready: the ``cmd`` clock, per
    activation row ``chunks`` load clocks and ``rows * layers * chunks`` compute clocks,
    then the pipeline latency."""
    return batch * (chunks + rows * layers * chunks) + cfg.latency + 1


def pack_planes(planes, chunks: int | None = None, lanes: int = 32) -> list[int]:
    """Plane-memory words of a :func:`hbfp_hw.bitlayers.decompose` result
    ``(bits, out, in)`` in the unit's layout (from word 0: add ``base`` to address)."""
    import numpy as np
    p = np.asarray(planes, dtype=np.int64)
    bits, rows, k = p.shape
    chunks = chunks if chunks is not None else -(-k // lanes)
    if k > chunks * lanes:
        raise ValueError(f"K={k} does not fit chunks={chunks} x lanes={lanes}")
    pad = np.zeros((bits, rows, chunks * lanes), dtype=np.int64)
    pad[:, :, :k] = p
    weights = 1 << np.arange(lanes, dtype=object)
    words = []
    for o in range(rows):
        for q in range(bits):
            for c in range(chunks):
                seg = pad[bits - 1 - q, o, c * lanes:(c + 1) * lanes].astype(object)
                words.append(int((seg * weights).sum()))
    return words


def pack_x(x_row, chunks: int, lanes: int, act_bits: int) -> list[int]:
    """The ``x`` beats of one activation row (signed ints, zero-padded to
    ``chunks * lanes``)."""
    vals = [int(v) for v in x_row] + [0] * (chunks * lanes - len(x_row))
    if len(vals) != chunks * lanes:
        raise ValueError(f"activation row of {len(x_row)} does not fit {chunks} x {lanes}")
    mask = (1 << act_bits) - 1
    lim = 1 << (act_bits - 1)
    words = []
    for c in range(chunks):
        w = 0
        for lane in range(lanes):
            v = vals[c * lanes + lane]
            if not -lim <= v < lim:
                raise ValueError(f"activation {v} is outside the {act_bits}-bit range "
                                 f"[{-lim}, {lim - 1}]")
            w |= (v & mask) << (lane * act_bits)
        words.append(w)
    return words


def _cmd_layout(cfg: BitSerialConfig) -> data.StructLayout:
    return data.StructLayout({
        "base": unsigned(cfg.addr_bits),
        "rows": unsigned(cfg.rows_bits),
        "chunks": unsigned(max(1, cfg.chunks_max.bit_length())),
        "bits": unsigned(max(1, cfg.bits_max.bit_length())),
        "layers": unsigned(max(1, cfg.bits_max.bit_length())),
        "batch": unsigned(cfg.batch_bits),
    })


def _tree(m: Module, terms: list, reg_level: int | None, name: str):
    """Balanced adder tree; registers the partial sums after level ``reg_level``."""
    level = 0
    while len(terms) > 1:
        nxt = []
        for i in range(0, len(terms) - 1, 2):
            nxt.append(terms[i] + terms[i + 1])
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
        level += 1
        if reg_level is not None and level == reg_level:
            regs = []
            for j, t in enumerate(terms):
                r = Signal(signed(len(t)), name=f"{name}_l{level}_{j}")
                m.d.sync += r.eq(t)
                regs.append(r)
            terms = regs
    return terms[0]


class BitSerialGemm(wiring.Component):
    """The bit-serial GEMM unit (see the module docstring)."""

    def __init__(self, cfg: BitSerialConfig = BitSerialConfig()):
        self.cfg = cfg
        super().__init__({
            "w_wr": In(stream.Signature(data.StructLayout({
                "addr": unsigned(cfg.addr_bits), "data": unsigned(cfg.lanes)}))),
            "cmd": In(stream.Signature(_cmd_layout(cfg))),
            "x": In(stream.Signature(data.ArrayLayout(signed(cfg.act_bits), cfg.lanes))),
            "o": Out(stream.Signature(signed(cfg.acc_bits))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        L = cfg.lanes
        m.submodules.wmem = wmem = Memory(shape=unsigned(L), depth=cfg.w_depth, init=[])
        m.submodules.xmem = xmem = Memory(shape=unsigned(L * cfg.act_bits),
                                          depth=cfg.chunks_max, init=[])
        wwp, wrp = wmem.write_port(), wmem.read_port()
        xwp, xrp = xmem.write_port(), xmem.read_port()
        m.d.comb += [wwp.addr.eq(self.w_wr.payload.addr), wwp.data.eq(self.w_wr.payload.data),
                     wwp.en.eq(self.w_wr.valid), self.w_wr.ready.eq(1)]

        # ---- output FIFO and row credits
        m.submodules.ofifo = ofifo = fifo.SyncFIFOBuffered(width=cfg.acc_bits,
                                                           depth=OUT_FIFO_DEPTH)
        m.d.comb += [self.o.valid.eq(ofifo.r_rdy), self.o.payload.eq(ofifo.r_data),
                     ofifo.r_en.eq(self.o.ready)]
        inflight = Signal(range(OUT_FIFO_DEPTH + 2))
        start_row = Signal()
        push = Signal()
        m.d.sync += inflight.eq(inflight + start_row - push)
        credit = Signal()
        m.d.comb += credit.eq(ofifo.level + inflight < OUT_FIFO_DEPTH)

        # ---- command registers and sequencer
        c = self.cmd.payload
        rows, chunks = Signal.like(c.rows), Signal.like(c.chunks)
        layers, batch = Signal.like(c.layers), Signal.like(c.batch)
        shift = Signal(range(cfg.bits_max + 1))
        stride = Signal(cfg.addr_bits + 1)
        row_addr, addr = Signal(cfg.addr_bits), Signal(cfg.addr_bits)
        base_addr = Signal(cfg.addr_bits)
        o_i, b_i = Signal.like(c.rows), Signal.like(c.batch)
        q_i, c_i = Signal.like(c.layers), Signal.like(c.chunks)
        xc = Signal.like(c.chunks)

        issue = Signal()
        first, newplane, sign, last = Signal(), Signal(), Signal(), Signal()
        m.d.comb += [wrp.addr.eq(addr), xrp.addr.eq(c_i)]

        with m.FSM(name="seq"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [rows.eq(c.rows), chunks.eq(c.chunks), layers.eq(c.layers),
                                 batch.eq(c.batch), shift.eq(c.bits - c.layers),
                                 stride.eq(c.bits * c.chunks), row_addr.eq(c.base),
                                 addr.eq(c.base), base_addr.eq(c.base), o_i.eq(0),
                                 b_i.eq(0), xc.eq(0)]
                    m.next = "LOADX"
            with m.State("LOADX"):
                m.d.comb += [self.busy.eq(1), self.x.ready.eq(1),
                             xwp.addr.eq(xc), xwp.data.eq(self.x.payload.as_value()),
                             xwp.en.eq(self.x.valid)]
                with m.If(self.x.valid):
                    m.d.sync += xc.eq(xc + 1)
                    with m.If(xc == chunks - 1):
                        m.d.sync += [xc.eq(0), q_i.eq(0), c_i.eq(0)]
                        m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.busy.eq(1)
                at_row_start = (q_i == 0) & (c_i == 0)
                m.d.comb += [
                    issue.eq(~at_row_start | credit),
                    start_row.eq(issue & at_row_start),
                    first.eq(at_row_start), newplane.eq(c_i == 0), sign.eq(q_i == 0),
                    last.eq((q_i == layers - 1) & (c_i == chunks - 1)),
                ]
                with m.If(issue):
                    m.d.sync += [addr.eq(addr + 1), c_i.eq(c_i + 1)]
                    with m.If(c_i == chunks - 1):
                        m.d.sync += [c_i.eq(0), q_i.eq(q_i + 1)]
                    with m.If(last):
                        nxt = row_addr + stride
                        m.d.sync += [q_i.eq(0), o_i.eq(o_i + 1), row_addr.eq(nxt),
                                     addr.eq(nxt)]
                        with m.If(o_i == rows - 1):
                            # the next activation row restarts at the command's first row
                            m.d.sync += [o_i.eq(0), b_i.eq(b_i + 1), row_addr.eq(base_addr),
                                         addr.eq(base_addr)]
                            with m.If(b_i == batch - 1):
                                m.next = "IDLE"
                            with m.Else():
                                m.next = "LOADX"

        # ---- pipeline: tags travel with the reads
        tag = data.StructLayout({"v": 1, "first": 1, "newplane": 1, "sign": 1, "last": 1,
                                 "shift": unsigned(len(shift))})
        s1 = Signal(tag)
        m.d.sync += [s1.v.eq(issue), s1.first.eq(first), s1.newplane.eq(newplane),
                     s1.sign.eq(sign), s1.last.eq(last), s1.shift.eq(shift)]
        # stage 1: read data -> AND + adder tree
        xs = xrp.data
        terms = []
        for lane in range(L):
            xv = xs[lane * cfg.act_bits:(lane + 1) * cfg.act_bits].as_signed()
            terms.append(Mux(wrp.data[lane], xv, Const(0, signed(cfg.act_bits))))
        reg_level = max(1, math.ceil(math.log2(L) / 2)) if cfg.tree_pipe else None
        tsum = _tree(m, terms, reg_level, "tree")
        if cfg.tree_pipe:
            s1b = Signal(tag)
            m.d.sync += s1b.eq(s1)
            s1 = s1b
        s2 = Signal(tag)
        psum = Signal(signed(cfg.act_bits + L.bit_length()))
        m.d.sync += [s2.eq(s1), psum.eq(tsum)]
        # stage 2: Horner accumulation, sign plane subtracted
        acc = Signal(signed(cfg.acc_bits))
        v = Mux(s2.sign, -psum, psum)
        acc_next = Signal(signed(cfg.acc_bits))
        m.d.comb += acc_next.eq(Mux(s2.first, v, Mux(s2.newplane, (acc << 1) + v, acc + v)))
        with m.If(s2.v):
            m.d.sync += acc.eq(acc_next)
        # stage 3: final shift by the dropped planes, into the FIFO
        s3v, s3acc = Signal(), Signal(signed(cfg.acc_bits))
        s3sh = Signal.like(shift)
        m.d.sync += [s3v.eq(s2.v & s2.last), s3acc.eq(acc_next), s3sh.eq(s2.shift)]
        res = Signal(signed(cfg.acc_bits))
        m.d.comb += [res.eq(s3acc << s3sh), push.eq(s3v),
                     ofifo.w_en.eq(s3v), ofifo.w_data.eq(res)]
        return m


def generate(cfg: BitSerialConfig, out_dir, *, name: str = "bitserial"):
    """Write ``<name>.v`` and ``<name>.json`` (manifest, kind ``bitserial``)."""
    check_verilog_identifier(name, "name")
    dut = BitSerialGemm(cfg)
    text = verilog.convert(dut, name=name, emit_src=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vpath = out / f"{name}.v"
    vpath.write_text(text)
    lay = _cmd_layout(cfg)
    ports = {"cmd_payload": {n: {"offset": f.offset, "width": f.width} for n, f in lay},
             "x_payload": {"lanes": cfg.lanes, "lane_width": cfg.act_bits},
             "w_wr_payload": {"addr": {"offset": 0, "width": cfg.addr_bits},
                              "data": {"offset": cfg.addr_bits, "width": cfg.lanes}},
             "o_payload": {"width": cfg.acc_bits}}
    mpath = write_manifest(out / f"{name}.json", kind="bitserial", top=name,
                           config=cfg.to_dict(), ports=ports, verilog=vpath,
                           latency_cycles=cfg.latency)
    return vpath, mpath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate the bit-serial GEMM unit's Verilog")
    ap.add_argument("-o", "--out", default="out/bitserial")
    ap.add_argument("--lanes", type=int, default=BitSerialConfig.lanes)
    ap.add_argument("--act-bits", type=int, default=BitSerialConfig.act_bits)
    ap.add_argument("--bits-max", type=int, default=BitSerialConfig.bits_max)
    ap.add_argument("--w-depth", type=int, default=BitSerialConfig.w_depth)
    ap.add_argument("--chunks-max", type=int, default=BitSerialConfig.chunks_max)
    ap.add_argument("--tree-pipe", action="store_true")
    a = ap.parse_args(argv)
    cfg = BitSerialConfig(lanes=a.lanes, act_bits=a.act_bits, bits_max=a.bits_max,
                          w_depth=a.w_depth, chunks_max=a.chunks_max, tree_pipe=a.tree_pipe)
    v, j = generate(cfg, a.out)
    print(v)
    print(j)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
