"""Deliberately broken wrappers: each property kind of :mod:`formal.streams` must fail on
one of them (a property that cannot fail proves nothing).

Every mutant is a ``wiring.Component`` with the signature of the component it wraps
and passes every port through, except on one stream (or value) where it injects a
bug:

* :class:`DropValid`: withdraws ``valid`` every other cycle while ``ready`` is low;
* :class:`ChangePayload`: flips payload bit 0 every other cycle (``while_idle``: only
  while ``valid`` is low, which the stream rules allow but :class:`HoldUntil` does not);
* :class:`DropBeat`: takes every second beat from the unit without presenting it;
* :class:`DuplicateBeat`: presents every beat twice;
* :class:`MergeValid`: raises ``valid`` of stream ``dst`` whenever ``src`` is valid
  (two receivers selected at once).
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from .streams import resolve

__all__ = ["Mutant", "DropValid", "ChangePayload", "DropBeat", "DuplicateBeat",
           "MergeValid"]


class Mutant(wiring.Component):
    """Pass-through of ``dut`` except the members listed by :meth:`overrides`."""

    def __init__(self, dut: wiring.Component, stream: str) -> None:
        self.dut, self.stream = dut, stream
        super().__init__(dut.signature)

    def overrides(self) -> set:
        """Dotted member paths the mutation drives itself (default: the stream's)."""
        return {f"{self.stream}.{n}" for n in ("valid", "ready", "payload")}

    def mutate(self, m: Module, mine, theirs) -> None:
        raise NotImplementedError

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        skip = self.overrides()
        for (path, member, mine), (_, _, theirs) in zip(self.signature.flatten(self),
                                                        dut.signature.flatten(dut)):
            if ".".join(map(str, path)) in skip:
                continue
            mine, theirs = Value.cast(mine), Value.cast(theirs)
            if isinstance(mine, Const) or isinstance(theirs, Const):
                continue
            if member.flow == Out:
                m.d.comb += mine.eq(theirs)
            else:
                m.d.comb += theirs.eq(mine)
        self.mutate(m, resolve(self, self.stream), resolve(dut, self.stream))
        return m


def _toggle(m: Module) -> Signal:
    t = Signal(name="mutant_toggle")
    m.d.sync += t.eq(~t)
    return t


class DropValid(Mutant):
    """Output stream ``stream``: ``valid`` withdrawn every other cycle while not ready."""

    def mutate(self, m, mine, theirs):
        t = _toggle(m)
        m.d.comb += [mine.valid.eq(theirs.valid & ~(t & ~mine.ready)),
                     mine.payload.eq(theirs.payload), theirs.ready.eq(mine.ready)]


class ChangePayload(Mutant):
    """Output stream ``stream``: payload bit 0 flipped every other cycle (``while_idle``:
    only in cycles where ``valid`` is low)."""

    def __init__(self, dut, stream: str, *, while_idle: bool = False) -> None:
        self.while_idle = while_idle
        super().__init__(dut, stream)

    def mutate(self, m, mine, theirs):
        t = _toggle(m)
        flip = t & ~Value.cast(theirs.valid) if self.while_idle else t
        p = Value.cast(theirs.payload)
        m.d.comb += [mine.valid.eq(theirs.valid), theirs.ready.eq(mine.ready),
                     Value.cast(mine.payload).eq(p ^ flip)]


class DropBeat(Mutant):
    """Output stream ``stream``: every second beat is taken from the unit and never
    presented (the stream rules still hold on what is presented)."""

    def mutate(self, m, mine, theirs):
        skip = Signal(name="mutant_skip")
        m.d.comb += mine.payload.eq(theirs.payload)
        with m.If(skip):
            m.d.comb += [mine.valid.eq(0), theirs.ready.eq(1)]
        with m.Else():
            m.d.comb += [mine.valid.eq(theirs.valid), theirs.ready.eq(mine.ready)]
        with m.If(theirs.valid & theirs.ready):
            m.d.sync += skip.eq(~skip)


class DuplicateBeat(Mutant):
    """Output stream ``stream``: every beat is presented a second time after its
    handshake (valid held, payload stable, so the stream rules still hold)."""

    def mutate(self, m, mine, theirs):
        again = Signal(name="mutant_again")
        held = Signal(len(Value.cast(theirs.payload)), name="mutant_held")
        with m.If(again):
            m.d.comb += [mine.valid.eq(1), Value.cast(mine.payload).eq(held),
                         theirs.ready.eq(0)]
            with m.If(mine.ready):
                m.d.sync += again.eq(0)
        with m.Else():
            m.d.comb += [mine.valid.eq(theirs.valid), mine.payload.eq(theirs.payload),
                         theirs.ready.eq(mine.ready)]
            with m.If(theirs.valid & mine.ready):
                m.d.sync += [again.eq(1), held.eq(theirs.payload)]


class MergeValid(Mutant):
    """``dst.valid`` is also raised whenever ``src.valid`` is (both output streams)."""

    def __init__(self, dut, src: str, dst: str) -> None:
        self.src = src
        super().__init__(dut, dst)

    def overrides(self) -> set:
        return {f"{self.stream}.valid"}

    def mutate(self, m, mine, theirs):
        src = resolve(self.dut, self.src)
        m.d.comb += mine.valid.eq(theirs.valid | src.valid)
