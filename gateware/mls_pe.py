"""MLS MAC (processing element): the exact arithmetic of :func:`hbfp_hw.mls.mls_matmul`.

One PE computes one output of an MLS GEMM, ``lanes`` element pairs per cycle. A group
pair (``L = group_len`` elements of a row of ``A`` and of a column of ``B``, with their
group shifts ``ga``, ``gb``) takes ``L / lanes`` beats; an output takes ``K / L`` group
pairs. Datapath (every stage registered)::

    s0  input registers: codes, group shifts, control; shift = gmax_a + gmax_b - ga - gb
    s1  per lane: decode (sign, (M+1)-bit significand, element shift sh), unsigned
        significand product (shift-add, LUTs), << (sh_a + sh_b), sign applied
    s2  adder tree over the lanes -> partial sum
    s3  group-pair sum  P = (first beat of the pair ? 0 : P) + partial sum  (exact)
    s4  aligned = P << shift  (exact, on the pair's last beat)
    s5  acc = (first pair of the output ? 0 : acc) + aligned;  done on the last pair

``acc`` is the exact integer accumulator of the golden model (``mls_matmul(...,
return_acc=True)``); the tensor scales are applied once, in FP32, outside the PE
(:func:`hbfp_hw.mls.round_to_fp32`). Bubbles (``ctrl.valid = 0``) may appear between
any two beats.
"""

from __future__ import annotations

import json
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw.mls import MLSFormat, mls_accumulator_bits

__all__ = ["MLSPE", "mls_pe_ctrl_layout", "generate"]


def mls_pe_ctrl_layout(fmt: MLSFormat) -> data.StructLayout:
    return data.StructLayout({"valid": 1, "first_k": 1, "last_k": 1, "first": 1,
                              "last": 1})


def _umul(a, b, a_bits: int, b_bits: int):
    """Unsigned ``a * b`` as explicit shift-add partial products (LUTs, never a $mul)."""
    acc = None
    for i in range(b_bits):
        t = Mux(b[i], a, 0) << i
        acc = t if acc is None else acc + t
    return acc[:a_bits + b_bits]


def _tree(values):
    while len(values) > 1:
        nxt = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
        if len(values) % 2:
            nxt.append(values[-1])
        values = nxt
    return values[0]


class MLSPE(wiring.Component):
    """One MLS MAC with ``lanes`` multipliers.

    Parameters
    ----------
    fmt : MLSFormat — element/group widths of both operands
    lanes : int — element pairs per cycle, in ``[1, 64]``, dividing ``group_len``
    group_len : int — group length ``L`` along K
    k_max : int — largest K (sizes the accumulator)

    Ports
    -----
    a, b : In(ArrayLayout(unsigned(element_bits), lanes)) — element codes
    ga, gb : In(unsigned(group_bits)) — the group shifts of the current group pair
    ctrl : In(:func:`mls_pe_ctrl_layout`)
    acc : Out(signed(acc_bits)); done : Out(1) — high for one cycle when ``acc`` holds a
    finished output
    """

    def __init__(self, fmt: MLSFormat, *, lanes: int = 4, group_len: int = 16,
                 k_max: int = 256):
        if not isinstance(fmt, MLSFormat):
            raise TypeError(f"fmt must be an MLSFormat, got {type(fmt).__name__}")
        if not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise ValueError(f"lanes={lanes!r} is out of range; accepted range is [1, 64]")
        if not isinstance(group_len, int) or group_len < 1 or group_len % lanes:
            raise ValueError(f"group_len={group_len!r} must be a positive multiple of "
                             f"lanes={lanes}")
        self.fmt, self.lanes, self.group_len, self.k_max = fmt, lanes, group_len, k_max
        self.acc_bits = mls_accumulator_bits(fmt, fmt, group_len, k_max)
        self.psum_bits = (group_len * fmt.vmax * fmt.vmax).bit_length() + 1
        eb = fmt.element_bits
        super().__init__({
            "a": In(data.ArrayLayout(unsigned(eb), lanes)),
            "b": In(data.ArrayLayout(unsigned(eb), lanes)),
            "ga": In(unsigned(fmt.group_bits)),
            "gb": In(unsigned(fmt.group_bits)),
            "ctrl": In(mls_pe_ctrl_layout(fmt)),
            "acc": Out(signed(self.acc_bits)),
            "done": Out(1),
        })

    #: clocks from an input beat to the accumulator update it ends
    latency = 6

    def elaborate(self, platform):
        m = Module()
        fmt, P = self.fmt, self.lanes
        M, E = fmt.man_bits, fmt.exp_bits
        G = 2 * fmt.gmax
        cl = mls_pe_ctrl_layout(fmt)
        eb = fmt.element_bits

        # s0
        a0 = Signal(data.ArrayLayout(unsigned(eb), P))
        b0 = Signal(data.ArrayLayout(unsigned(eb), P))
        c0 = Signal(cl)
        s0 = Signal(range(G + 1))
        m.d.sync += [a0.eq(self.a), b0.eq(self.b), c0.eq(self.ctrl),
                     s0.eq(G - self.ga - self.gb)]

        # s1: decode, multiply, shift, sign
        tw = 2 * (M + 1) + 2 * fmt.max_elem_shift + 1
        terms = []
        for lane in range(P):
            fields = []
            for x in (a0[lane], b0[lane]):
                mant = x[:M] if M else 0
                ec = x[M:M + E]
                sig = Signal(M + 1, name=f"sig{len(fields)}_{lane}")
                sh = Signal(range(fmt.max_elem_shift + 1), name=f"sh{len(fields)}_{lane}")
                m.d.comb += [sig.eq(Mux(ec != 0, (1 << M) | mant, mant)),
                             sh.eq(Mux(ec != 0, ec - 1, 0))]
                fields.append((x[M + E], sig, sh))
            (sa, siga, sha), (sb, sigb, shb) = fields
            prod = _umul(siga, sigb, M + 1, M + 1) << (sha + shb)
            t = Signal(signed(tw), name=f"term{lane}")
            m.d.sync += t.eq(Mux(sa ^ sb, -prod, prod))
            terms.append(t)
        c1, s1 = Signal(cl), Signal(range(G + 1))
        m.d.sync += [c1.eq(c0), s1.eq(s0)]

        # s2: adder tree
        psum = Signal(signed(self.psum_bits))
        c2, s2 = Signal(cl), Signal(range(G + 1))
        m.d.sync += [psum.eq(_tree(terms)), c2.eq(c1), s2.eq(s1)]

        # s3: exact group-pair sum
        pr = Signal(signed(self.psum_bits))
        c3, s3 = Signal(cl), Signal(range(G + 1))
        with m.If(c2.valid):
            m.d.sync += pr.eq(Mux(c2.first_k, psum, pr + psum))
        m.d.sync += [c3.eq(c2), s3.eq(s2)]

        # s4: align by the group shifts (exact left shift)
        aligned = Signal(signed(self.acc_bits))
        c4 = Signal(cl)
        m.d.sync += [aligned.eq(pr << s3), c4.eq(c3)]

        # s5: accumulate
        acc = Signal(signed(self.acc_bits))
        done = Signal()
        upd = c4.valid & c4.last_k
        with m.If(upd):
            m.d.sync += acc.eq(Mux(c4.first, 0, acc) + aligned)
        m.d.sync += done.eq(upd & c4.last)
        m.d.comb += [self.acc.eq(acc), self.done.eq(done)]
        return m


def generate(fmt: MLSFormat, out_dir, *, lanes: int = 4, group_len: int = 16,
             k_max: int = 256, name: str = "mls_pe") -> tuple[Path, Path]:
    """Write ``<name>.v`` and ``<name>.json`` (configuration, widths)."""
    pe = MLSPE(fmt, lanes=lanes, group_len=group_len, k_max=k_max)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vpath = out / f"{name}.v"
    vpath.write_text(verilog.convert(pe, name=name, emit_src=False))
    mpath = out / f"{name}.json"
    mpath.write_text(json.dumps({
        "kind": "mls_pe", "top": name, "verilog": vpath.name, "format": fmt.to_dict(),
        "lanes": lanes, "group_len": group_len, "k_max": k_max, "acc_bits": pe.acc_bits,
        "latency_cycles": MLSPE.latency}, indent=2))
    return vpath, mpath
