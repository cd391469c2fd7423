"""The executor's answers that do not come from an engine, against the emulator byte for
byte: a bad CRC right after an answer with a wide detail (the error frame's detail is the
frame's length only), the executor's own errors (UNKNOWN_OPCODE, BAD_LENGTH) and their
replays, a replay after a bad CRC, and an engine's answer replayed after them; through
``sim://`` (one byte per clock) and with random input gaps and output back-pressure."""

from __future__ import annotations

import pytest
import numpy as np
from test_fuzz_rtl import CFG, IDLE, _both, compare, run_amaranth

from hbfp_hw import protocol as P
from hbfp_hw.gateware import board as BD
from hbfp_hw.gateware.sim_device import SimTransport
from hbfp_hw.host.emulator import Emulator


def _frames() -> list[bytes]:
    wr = P.REQUESTS[P.Op.WRITE]
    big = P.encode_frame(1, P.Op.WRITE, wr.pack(b"\x01", buffer=1, offset=0x12345678))
    bad = bytearray(big)
    bad[-2] ^= 0x5A                     # a CRC byte (the frame ends with the delimiter)
    rd = P.encode_frame(2, P.Op.READ, P.REQUESTS[P.Op.READ].pack(buffer=1, offset=0, count=8))
    unknown = P.encode_frame(3, 0x7E, b"\x00\x01")
    short = P.encode_frame(4, P.Op.READ, b"\x01\x00")
    ok = P.encode_frame(5, P.Op.WRITE, wr.pack(b"\x02\x03", buffer=1, offset=4))
    return [big, bytes(bad), big, unknown, bytes(bad), unknown, short, short, rd,
            bytes(bad), ok, bytes(bad), ok, rd, short]


@pytest.mark.parametrize("cfg", [CFG, BD.board_config("icebreaker")[0]],
                         ids=["sim", "icebreaker"])
def test_executor_answers_match_the_emulator(cfg):
    emu = Emulator(cfg)
    sim = SimTransport(cfg, idle_cycles=IDLE, progress=False)
    for k, fr in enumerate(_frames()):
        compare(f"frame {k}: {fr.hex()}", *_both(sim, emu, fr))


class _Burst:
    def __init__(self, frame: bytes) -> None:
        self.pieces = [frame]


def test_executor_answers_with_stalls(seed):
    """The same frames with random input gaps and output back-pressure."""
    emu = Emulator(CFG)
    bursts = [(_Burst(fr), emu.feed(fr) + emu.idle()) for fr in _frames()]
    got, _, _ = run_amaranth(CFG, bursts, [], np.random.default_rng(seed))
    for k, ((burst, want), g) in enumerate(zip(bursts, got)):
        compare(f"HBFP_SEED={seed} frame {k}", g, want, burst)
