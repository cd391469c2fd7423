"""Online min/max of a stream: the statistics unit of in-hindsight range estimation.

:class:`RangeTracker` sits on an output stream (pass-through, no added latency, no
effect on the handshake) and keeps the minimum and maximum of every element that is
*transferred* (``valid & ready``) since the last ``clear``, plus the number of beats.
The host reads them after a tensor has streamed out (READ_STATS) and folds them into
the EMA that fixes the next step's quantization range (:mod:`hbfp_hw.host.ranges`).

Elements are either signed integers (e.g. accumulator words) or IEEE-754 binary32 bit
patterns (the MAC array's FP32 outputs). Floats are compared through the order-
preserving key ``k = b ^ 0x7FFFFFFF if b < 0 else b`` (``b`` the bits as a signed
int32), so ``-0.0 < +0.0``. Non-finite elements (NaN, +-Inf) are not folded into the
range; they are counted in ``n_nonfinite``. ``count`` counts the finite elements. This is
exactly what the READ_STATS answer holds (``count, n_nonfinite, min, max``; min = max =
0 while ``count`` is 0), as the host emulator (:mod:`hbfp_hw.host.emulator`) computes it.

Clear: ``clear`` empties the statistics at the next clock edge; an element transferred
in the same cycle as ``clear`` is the first element of the new window (nothing is lost
between reading and clearing).

Integration (for the accelerator top): connect ``i`` to the producer's output stream
and ``o`` to the consumer (the FP32 converter's output towards the output buffer), drive
``clear`` from READ_STATS with the CLEAR flag (and from RESET), and return ``count``,
``n_nonfinite``, ``min`` and ``max`` in the READ_STATS answer.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["RangeTracker", "float_key"]


def float_key(bits: int) -> int:
    """The order-preserving signed key of a binary32 bit pattern (software mirror)."""
    b = bits - (1 << 32) if bits & 0x80000000 else bits
    return b ^ 0x7FFFFFFF if b < 0 else b


class RangeTracker(wiring.Component):
    """Pass-through stream monitor with online min/max.

    Parameters
    ----------
    width : int
        Element width in bits (2..64); must be 32 for ``fp32``.
    lanes : int
        Elements per beat (1..64); the payload is an array of ``lanes`` elements.
    fp32 : bool
        Elements are binary32 bit patterns (else signed integers).
    count_bits : int
        Width of the saturating element counters (1..48).

    Ports
    -----
    i : In(stream)  observed input, ``payload`` an array of ``lanes`` elements
    o : Out(stream) the same stream, passed through combinationally
    clear : In(1)   empty the statistics
    min, max : Out(width) extreme elements (raw encoding: signed int or float bits)
    seen : Out(1)   at least one finite element since the last clear
    count : Out(count_bits) finite elements transferred since the last clear (saturating)
    n_nonfinite : Out(count_bits) NaN/Inf elements since the last clear (fp32 only)
    """

    def __init__(self, *, width: int = 32, lanes: int = 1, fp32: bool = False,
                 count_bits: int = 32):
        if not isinstance(width, int) or not 2 <= width <= 64:
            raise ValueError(f"width={width!r} is out of range; accepted range is [2, 64]")
        if not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise ValueError(f"lanes={lanes!r} is out of range; accepted range is [1, 64]")
        if fp32 and width != 32:
            raise ValueError(f"width={width} with fp32=True; binary32 elements are 32 bits")
        if not isinstance(count_bits, int) or not 1 <= count_bits <= 48:
            raise ValueError(
                f"count_bits={count_bits!r} is out of range; accepted range is [1, 48]")
        self.width = width
        self.lanes = lanes
        self.fp32 = bool(fp32)
        self.count_bits = count_bits
        elem = 32 if fp32 else signed(width)
        layout = data.ArrayLayout(elem, lanes)
        super().__init__({
            "i": In(stream.Signature(layout)),
            "o": Out(stream.Signature(layout)),
            "clear": In(1),
            "min": Out(elem), "max": Out(elem),
            "seen": Out(1),
            "count": Out(count_bits), "n_nonfinite": Out(count_bits),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.width
        kshape = signed(W)
        kmax, kmin = (1 << (W - 1)) - 1, -(1 << (W - 1))

        m.d.comb += [self.o.payload.eq(self.i.payload), self.o.valid.eq(self.i.valid),
                     self.i.ready.eq(self.o.ready)]
        fire = Signal()
        m.d.comb += fire.eq(self.i.valid & self.o.ready)

        # per-lane keys (NaN lanes get the neutral element of each reduction)
        lo_keys, hi_keys, nans = [], [], []
        for n in range(self.lanes):
            e = self.i.payload[n]
            raw = Signal(kshape, name=f"raw{n}")
            m.d.comb += raw.eq(e.as_signed() if self.fp32 else e)
            key = Signal(kshape, name=f"key{n}")
            nan = Signal(name=f"nan{n}")
            if self.fp32:
                m.d.comb += [
                    key.eq(Mux(raw < 0, raw ^ 0x7FFFFFFF, raw)),
                    nan.eq(raw[23:31] == 0xFF),          # NaN or +-Inf
                ]
            else:
                m.d.comb += [key.eq(raw), nan.eq(0)]
            lo_k = Signal(kshape, name=f"lo_k{n}")
            hi_k = Signal(kshape, name=f"hi_k{n}")
            m.d.comb += [lo_k.eq(Mux(nan, kmax, key)), hi_k.eq(Mux(nan, kmin, key))]
            lo_keys.append(lo_k)
            hi_keys.append(hi_k)
            nans.append(nan)

        def tree(vals, pick_lo: bool):
            level = 0
            while len(vals) > 1:
                nxt = []
                for j in range(0, len(vals) - 1, 2):
                    a, b = vals[j], vals[j + 1]
                    r = Signal(kshape, name=f"{'lo' if pick_lo else 'hi'}_t{level}_{j}")
                    m.d.comb += r.eq(Mux((a < b) if pick_lo else (a > b), a, b))
                    nxt.append(r)
                if len(vals) % 2:
                    nxt.append(vals[-1])
                vals = nxt
                level += 1
            return vals[0]

        beat_lo, beat_hi = tree(lo_keys, True), tree(hi_keys, False)
        cbits = self.count_bits
        n_bad = Signal(range(self.lanes + 1))
        m.d.comb += n_bad.eq(sum(nans))
        n_good = Signal(range(self.lanes + 1))
        m.d.comb += n_good.eq(self.lanes - n_bad)
        cmax = (1 << cbits) - 1

        def sat_add(c, n):
            t = Signal(cbits + 8)
            m.d.comb += t.eq(c + n)
            return Mux(t > cmax, cmax, t)

        lo_r = Signal(kshape, init=kmax)
        hi_r = Signal(kshape, init=kmin)
        cnt, bad = Signal(cbits), Signal(cbits)
        # the state the current beat is folded into: empty when clearing
        lo_b = Signal(kshape)
        hi_b = Signal(kshape)
        cnt_b, bad_b = Signal(cbits), Signal(cbits)
        m.d.comb += [
            lo_b.eq(Mux(self.clear, kmax, lo_r)), hi_b.eq(Mux(self.clear, kmin, hi_r)),
            cnt_b.eq(Mux(self.clear, 0, cnt)), bad_b.eq(Mux(self.clear, 0, bad)),
        ]
        with m.If(fire):
            m.d.sync += [
                lo_r.eq(Mux(beat_lo < lo_b, beat_lo, lo_b)),
                hi_r.eq(Mux(beat_hi > hi_b, beat_hi, hi_b)),
                cnt.eq(sat_add(cnt_b, n_good)),
                bad.eq(sat_add(bad_b, n_bad)),
            ]
        with m.Else():
            m.d.sync += [lo_r.eq(lo_b), hi_r.eq(hi_b), cnt.eq(cnt_b), bad.eq(bad_b)]

        seen = cnt != 0
        if self.fp32:
            m.d.comb += [
                self.min.eq(Mux(seen, Mux(lo_r < 0, lo_r ^ 0x7FFFFFFF, lo_r), 0)),
                self.max.eq(Mux(seen, Mux(hi_r < 0, hi_r ^ 0x7FFFFFFF, hi_r), 0)),
            ]
        else:
            m.d.comb += [self.min.eq(Mux(seen, lo_r, 0)), self.max.eq(Mux(seen, hi_r, 0))]
        m.d.comb += [self.seen.eq(seen), self.count.eq(cnt), self.n_nonfinite.eq(bad)]
        return m
