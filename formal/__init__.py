"""Formal proofs of the gateware's stream interfaces (SymbiYosys through YoWASP).

:mod:`formal.streams` builds a harness around any ``wiring.Component`` (stream rules on
every ``stream.Signature`` member, beat conservation, payload-hold contracts, custom
checks) and runs it with ``yowasp-sby`` (:func:`formal.streams.prove`);
:mod:`formal.mutants` holds deliberately broken wrappers that show each property kind
can fail. See ``docs/formal.md``.
"""

from .streams import (BeatFlow, FormalHarness, FormalToolError, HoldUntil, ProofResult,
                      StreamPort, prove, stream_ports)

__all__ = ["BeatFlow", "FormalHarness", "FormalToolError", "HoldUntil", "ProofResult",
           "StreamPort", "prove", "stream_ports"]
