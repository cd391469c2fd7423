"""Formal proofs of the stream interfaces (SymbiYosys through YoWASP, solver yices).

What each test proves, and how, is listed in docs/formal.md. Every property kind also
has a mutation test: the same proof on a deliberately broken unit must fail.
"""

from __future__ import annotations

import pytest
from amaranth.hdl import Assert, Assume, ResetSignal, Signal, signed
from amaranth.lib import data, wiring

from formal import BeatFlow, FormalHarness, HoldUntil, prove
from formal.mutants import ChangePayload, DropBeat, DropValid, DuplicateBeat, MergeValid
from formal.streams import fire
from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import BFPFormat
from hbfp_hw.gateware.cmd_decoder import FrameDecoder
from hbfp_hw.gateware.executor import Executor
from hbfp_hw.gateware.mac_array import MacArray
from hbfp_hw.gateware.pe import PE, ctrl_layout
from hbfp_hw.gateware.quantizer import Quantizer
from hbfp_hw.gateware.range_tracker import RangeTracker
from hbfp_hw.gateware.top import ENGINES
from hbfp_hw.gateware.uart import UartRx, UartTx
from hbfp_hw.sim.engine_bench import standalone

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

# ---- configurations -------------------------------------------------------------------
#: Quantizer: 4-element blocks, 2 lanes (2 beats per block, 3 banks), 4-bit mantissas.
QCFG = QuantizerConfig(format=BFPFormat(man_bits=4, exp_bits=8, block_shape=(4,)), lanes=2)
#: Smallest MAC array: one PE, 2x2 tiles, 2 lanes, 4-bit mantissas, K up to 8.
MCFG = MacArrayConfig(rows=1, cols=1, lanes=2, tile=2, man_bits_a=4, man_bits_b=4,
                      exp_bits=4, k_max=8)
#: The MAC array whose accumulator is proven in the default run: MCFG with 2-bit
#: mantissas (10 s; MCFG itself takes about a minute and runs in the sweep).
ACC_CFG = MCFG.replace(man_bits_a=2, man_bits_b=2)
#: Accelerator with one 2x2-tile HBFP4 slot, a 1x1 array and small buffers: the engines.
ACFG = AcceleratorConfig(
    formats=(BFPFormat(man_bits=4, exp_bits=4, block_shape=(2, 2), block_axes=(-2, -1),
                       name="HBFP4T2"),),
    array_rows=1, array_cols=1, tile=2, operand_buffers=2, operand_depth=16,
    input_depth=16, output_depth=16, k_max=8, name="formal")
#: FSM of each engine (``m.FSM(name=...)``).
ENGINE_FSM = {"buffer_io": "bufio", "stats": "stats", "quantize": "quantize", "gemm": "gemm",
              "bitlayer": "bitlayer", "mls": "mls", "sparse": "sparse", "luq": "luq"}
ENGINE_NAMES = list(ENGINE_FSM)


def run(factory, tmp_path, name, **kw):
    return prove(factory, name=name, workdir=tmp_path, **kw)


def assert_pass(r):
    assert r.passed, r.report()


def assert_fails_with(r, text: str):
    """The proof must fail, and ``text`` must be among the failed properties."""
    assert not r.passed, f"the mutant passed: {r.report()}"
    assert any(text in f for f in r.failures), r.report()


# ---- quantizer ------------------------------------------------------------------------
def quantizer_occupancy(sub=None):
    """Beats held by the quantizer: complete blocks in busy banks, minus the beats of the
    bank being read that already left it, plus the partial block being written, plus
    the valid stages of the read pipeline (``valid`` is bit 0 of the control struct)."""
    def occ(top):
        g = lambda n: top.internal(n, sub=sub)  # noqa: E731
        busy, B = g("busy"), QCFG.beats_per_block
        return (B * sum(busy[k] for k in range(len(busy))) - g("rbeat") + g("wbeat")
                + sum(g(f"c{k}")[0] for k in range(1, 5)))
    return occ


def quantizer_invariants(sub=None):
    """Bank bookkeeping of the block buffer: busy banks are those from the read bank up
    to the write bank, addresses match (bank, beat), a bank is read only when busy and
    its exponent final, the write bank is not busy while partly written."""
    def check(m, top, dut):
        g = lambda n: top.internal(n, sub=sub)  # noqa: E731
        B = QCFG.beats_per_block
        busy, expok = g("busy"), g("expok")
        NB = len(busy)
        rbank, rbeat, wbank, wbeat = g("rbank"), g("rbeat"), g("wbank"), g("wbeat")
        nbusy = sum(busy[k] for k in range(NB))
        span = (wbank - rbank + NB) % NB
        m.d.comb += [
            Assert((rbeat == 0) | (busy.bit_select(rbank, 1) & expok.bit_select(rbank, 1)),
                   "quantizer: reading a bank that is not complete"),
            Assert((wbeat == 0) | ~busy.bit_select(wbank, 1),
                   "quantizer: writing a busy bank"),
            Assert((expok & ~busy) == 0, "quantizer: exponent final on an idle bank"),
            Assert(g("waddr") == wbank * B + wbeat, "quantizer: write address"),
            Assert(g("raddr") == rbank * B + rbeat, "quantizer: read address"),
            Assert((rbank < NB) & (wbank < NB), "quantizer: bank index"),
            Assert((span == nbusy) | ((nbusy == NB) & (span == 0)),
                   "quantizer: busy banks counted from rbank to wbank"),
        ]
        for k in range(NB):
            m.d.comb += Assert(busy[k] == ((((k - rbank + NB) % NB) < span) | (nbusy == NB)),
                               "quantizer: busy banks are those from rbank to wbank")
    return check


def quantizer_flow(sub=None):
    return BeatFlow("i", "o", max_in_flight=Quantizer(QCFG).banks * QCFG.beats_per_block + 4,
                    occupancy=quantizer_occupancy(sub))


def test_quantizer_stream_rules(tmp_path):
    assert_pass(run(lambda: Quantizer(QCFG), tmp_path, "quantizer_streams", depth=4))


def test_quantizer_beats_conserved(tmp_path):
    assert_pass(run(lambda: Quantizer(QCFG), tmp_path, "quantizer_flow", depth=10,
                    stream_rules=False, payloads=False, flows=[quantizer_flow()],
                    checks=[quantizer_invariants()]))


@pytest.mark.sweep
def test_quantizer_beats_drain_bmc(tmp_path):
    """Black-box form of beat conservation (no internals): from reset, after 16 quiet
    cycles every complete block has left."""
    q = Quantizer(QCFG)
    flow = BeatFlow("i", "o", max_in_flight=q.banks * q.beats + 4, drain=16,
                    granule=q.beats)
    assert_pass(run(lambda: Quantizer(QCFG), tmp_path, "quantizer_drain", mode="bmc",
                    depth=24, stream_rules=False, payloads=False, flows=[flow],
                    timeout=1800))


# ---- MAC array ------------------------------------------------------------------------
def test_mac_array_stream_rules(tmp_path):
    assert_pass(run(lambda: MacArray(MCFG), tmp_path, "mac_array_streams", depth=3))


def accumulator_model(cfg: MacArrayConfig):
    """Environment of one PE as the MAC array drives it, and a wide shadow of its
    accumulators.

    Assumed: mantissas within ``+-mmax``, windows in range, alignment shift 0 (the
    worst case: an arithmetic right shift never increases a magnitude), at most
    ``tile / lanes`` steps per block dot product, at most ``ceil(k_max / tile)`` K
    tiles per window between ``first_tile`` updates (the GEMM engine rejects longer
    K), no reset. The shadow takes the PE's aligned block product
    where the PE adds it (``aligned0`` with the control of stage ``c4``) and adds it in
    ``acc_bits + 8`` bits. Asserted: the shadow of every window fits the PE's
    accumulator (no overflow at ``k_max``) and the PE's accumulator equals the shadow
    (it does not wrap)."""
    W = cfg.windows
    nkb = -(-cfg.k_max // cfg.tile)
    wide = signed(cfg.acc_bits + 8)

    def check(m, top, pe):
        acc_w = len(top.acc[0])
        m.d.comb += Assume(~ResetSignal())
        c = top.ctrl
        for lane in range(cfg.lanes):
            m.d.comb += [Assume((top.a[lane] <= cfg.mmax_a) & (top.a[lane] >= -cfg.mmax_a)),
                         Assume((top.b[lane] <= cfg.mmax_b) & (top.b[lane] >= -cfg.mmax_b))]
        # shift 0: an arithmetic right shift never increases a magnitude, so the
        # unshifted products are the worst case of every alignment
        m.d.comb += [Assume(c.win < W), Assume(c.shift == 0), Assume(top.rd_win < W)]
        # at most k_steps steps per block dot product
        ksteps = Signal(range(cfg.k_steps + 1))
        with m.If(c.valid):
            m.d.comb += Assume(c.first_k | (ksteps < cfg.k_steps))
            m.d.sync += ksteps.eq(1)
            with m.If(~c.first_k):
                m.d.sync += ksteps.eq(ksteps + 1)
        # where the PE updates an accumulator: stage c4 adds aligned0
        c4 = data.View(ctrl_layout(cfg), top.internal("c4"))
        aligned = top.internal("aligned0")
        upd = c4.valid & c4.last_k
        ntiles = [Signal(range(nkb + 1), name=f"ntiles{w}") for w in range(W)]
        shadow = [Signal(wide, name=f"shadow{w}") for w in range(W)]
        lo, hi = -(1 << (acc_w - 1)), (1 << (acc_w - 1)) - 1
        for w in range(W):
            with m.If(upd & (c4.win == w)):
                m.d.comb += Assume(c4.first_tile | (ntiles[w] < nkb))
                m.d.sync += [ntiles[w].eq(1), shadow[w].eq(aligned)]
                with m.If(~c4.first_tile):
                    m.d.sync += [ntiles[w].eq(ntiles[w] + 1),
                                 shadow[w].eq(shadow[w] + aligned)]
            m.d.comb += Assert((shadow[w] >= lo) & (shadow[w] <= hi),
                               "accumulator: the exact sum exceeds the accumulator")
        sel = Signal(wide)
        with m.Switch(top.rd_win):
            for w in range(W):
                with m.Case(w):
                    m.d.comb += sel.eq(shadow[w])
        m.d.comb += Assert(top.acc[0] == sel, "accumulator: differs from the exact sum")
    return check


def accumulator_depth(cfg: MacArrayConfig) -> int:
    """A whole job of ``ceil(k_max / tile)`` K tiles on one window, through the PE."""
    return cfg.pe_latency + -(-cfg.k_max // cfg.tile) * cfg.k_steps + 3


@pytest.mark.parametrize("cfg", [
    ACC_CFG, pytest.param(MCFG, marks=pytest.mark.sweep)], ids=["man2", "man4"])
def test_mac_array_accumulator_no_overflow(tmp_path, cfg):
    assert_pass(run(lambda: PE(cfg), tmp_path, "accumulator", mode="bmc", timeout=600,
                    depth=accumulator_depth(cfg), checks=[accumulator_model(cfg)]))


# ---- range tracker, UART, frame decoder -----------------------------------------------
@pytest.mark.parametrize("fp32", [False, True], ids=["int8x2", "fp32"])
def test_range_tracker(tmp_path, fp32):
    """Stream rules and pass-through: every beat taken is passed on in the same cycle
    (beats in flight always 0)."""
    mk = (lambda: RangeTracker(width=32, lanes=1, fp32=True, count_bits=8)) if fp32 else \
        (lambda: RangeTracker(width=8, lanes=2, count_bits=8))
    assert_pass(run(mk, tmp_path, "range_tracker", depth=3,
                    flows=[BeatFlow("i", "o", 0, same_cycle=True, idle=lambda t: 1)]))


def test_uart_rx_stream_rules(tmp_path):
    assert_pass(run(lambda: UartRx(4), tmp_path, "uart_rx", depth=3))


def uart_tx_checks(divisor: int):
    """A byte is taken only while the line idles high, and the transmitter is ready
    again within 10 bit periods of taking one."""
    def check(m, top, dut):
        busy = Signal(range(10 * divisor + 2))
        with m.If(top.i.ready):
            m.d.sync += busy.eq(0)
            m.d.comb += Assert(top.tx, "uart tx: line low while idle")
        with m.Elif(busy <= 10 * divisor):
            m.d.sync += busy.eq(busy + 1)
        m.d.comb += Assert(busy <= 10 * divisor, "uart tx: busy for more than 10 bits")
    return check


def test_uart_tx(tmp_path):
    assert_pass(run(lambda: UartTx(4), tmp_path, "uart_tx", mode="bmc", depth=48,
                    checks=[uart_tx_checks(4)]))


def consumer_always_ready(m, top, dut):
    m.d.comb += Assume(top.o.ready)


def test_frame_decoder_stream_rules_as_connected(tmp_path):
    """With the consumer always ready (the executor ties ``o.ready`` high)."""
    assert_pass(run(lambda: FrameDecoder(idle_cycles=3), tmp_path, "decoder_ready",
                    depth=6, checks=[consumer_always_ready]))


def test_frame_decoder_stream_rules(tmp_path):
    assert_pass(run(lambda: FrameDecoder(idle_cycles=3), tmp_path, "decoder", mode="bmc",
                    depth=12))


# ---- engines --------------------------------------------------------------------------
def engine(name: str):
    return lambda: standalone(ACFG, name)[0]


def engine_status_invariant(name: str, sub=None):
    """The status register is valid exactly in the engine FSM's DONE state."""
    def check(m, top, dut):
        m.d.comb += Assert(top.internal("st_valid", sub=sub)
                           == top.in_state(ENGINE_FSM[name], "DONE", sub=sub),
                           "engine: status valid differs from the DONE state")
    return check


def engine_properties(name: str, sub=None) -> dict:
    """cmd/status stream rules (plus the statistics engine's sample inputs), one status
    per command, idle (cmd.ready) exactly when no command is in flight, the command held
    by the executor until its status (assumed: proven of the executor below)."""
    eng = standalone(ACFG, name)[0]
    rules = [p for p in ("cmd", "status", "sample", "gemm_sample", "quant_sample")
             if hasattr(eng, p)]
    return dict(stream_rules=rules,
                flows=[BeatFlow("cmd", "status", 1, idle=lambda t: t.cmd.ready)],
                holds=[HoldUntil("cmd", "status")],
                checks=[engine_status_invariant(name, sub)])


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine(tmp_path, name):
    assert_pass(run(engine(name), tmp_path, f"engine_{name}", depth=4,
                    **engine_properties(name)))


@pytest.mark.sweep
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_deep_bmc(tmp_path, name):
    """The same properties, every trace of 20 clocks from reset."""
    assert_pass(run(engine(name), tmp_path, f"engine_{name}_bmc", mode="bmc", depth=20,
                    timeout=3000, **engine_properties(name)))


def test_quantize_engine_sample_stream_rules(tmp_path):
    """The sample output (always ready) from reset into Q_RUN, where it pulses."""
    assert_pass(run(engine("quantize"), tmp_path, "quantize_sample", mode="bmc", depth=14,
                    stream_rules=["cmd", "sample"]))


# ---- executor-engine interface -------------------------------------------------------
EXEC_ENGINES = len(ENGINE_NAMES)


def executor():
    return Executor(ops={op: ENGINE_NAMES.index(n) for op, n in ENGINES.items()},
                    engines=EXEC_ENGINES, specs=P.buffer_map(ACFG), idle_cycles=3)


def executor_checks(sub=None):
    """Engines (environment) answer only a command they hold. Asserted: ``cmd.valid``
    for at most one engine, no command while one is outstanding, an outstanding
    command exactly while the executor WAITs on that engine (``sel``)."""
    def check(m, top, dut):
        cmds = [getattr(top, f"e{k}_cmd") for k in range(EXEC_ENGINES)]
        sts = [getattr(top, f"e{k}_status") for k in range(EXEC_ENGINES)]
        pend = [top.pending[f"e{k}_cmd"] for k in range(EXEC_ENGINES)]
        waiting = top.in_state("exec", "WAIT", sub=sub)
        sel = top.internal("sel", sub=sub)
        for k in range(EXEC_ENGINES):
            m.d.comb += [Assume(~sts[k].valid | pend[k]),
                         Assert(pend[k] == (waiting & (sel == k)),
                                "executor: outstanding command differs from WAIT")]
        m.d.comb += [
            Assert(sum(c.valid for c in cmds) <= 1, "executor: cmd valid for two engines"),
            Assert(~(sum(fire(c) for c in cmds) != 0) | (sum(pend) == 0),
                   "executor: a command while another is outstanding"),
        ]
    return check


def executor_properties(sub=None) -> dict:
    return dict(holds=[HoldUntil(f"e{k}_cmd", f"e{k}_status") for k in range(EXEC_ENGINES)],
                checks=[executor_checks(sub)])


def test_executor_engine_handshake(tmp_path):
    assert_pass(run(executor, tmp_path, "executor", depth=4, **executor_properties()))


# ---- mutation tests: every property kind must be able to fail --------------------------
def test_mutant_valid_dropped(tmp_path):
    r = run(lambda: DropValid(standalone(ACFG, "stats")[0], "status"), tmp_path,
            "mut_drop_valid", mode="bmc", depth=6)
    assert_fails_with(r, "stream status: valid dropped before ready (DUT)")


def test_mutant_payload_changed(tmp_path):
    r = run(lambda: ChangePayload(Quantizer(QCFG), "o"), tmp_path, "mut_payload",
            mode="bmc", depth=14)
    assert_fails_with(r, "stream o: payload changed while stalled (DUT)")


def test_mutant_input_assumption_needed(tmp_path):
    """Without the stream rules assumed of its input, the pass-through's output breaks
    them: the assumptions carry weight."""
    r = run(lambda: RangeTracker(width=8), tmp_path, "mut_no_assume", mode="bmc",
            depth=4, stream_rules=["o"])
    assert_fails_with(r, "stream o: valid dropped before ready (DUT)")


@pytest.mark.parametrize("mutant, text", [
    (DropBeat, "cmd -> status: idle differs from 'no beat in flight'"),
    (DuplicateBeat, "cmd -> status: output beat with none in flight"),
], ids=["lost", "duplicated"])
def test_mutant_engine_beats(tmp_path, mutant, text):
    props = engine_properties("stats", sub="dut")
    r = run(lambda: mutant(standalone(ACFG, "stats")[0], "status"), tmp_path,
            "mut_engine_beats", mode="bmc", depth=8, **props)
    assert_fails_with(r, text)


def test_mutant_quantizer_lost_beat(tmp_path):
    r = run(lambda: DropBeat(Quantizer(QCFG), "o"), tmp_path, "mut_quantizer_lost",
            mode="bmc", depth=16, stream_rules=False, payloads=False,
            flows=[quantizer_flow(sub="dut")])
    assert_fails_with(r, "i -> o: beats in flight differ from the unit's occupancy")


def test_mutant_quantizer_duplicated_beat(tmp_path):
    r = run(lambda: DuplicateBeat(Quantizer(QCFG), "o"), tmp_path, "mut_quantizer_dup",
            mode="bmc", depth=16, stream_rules=False, payloads=False,
            flows=[quantizer_flow(sub="dut")])
    assert_fails_with(r, "i -> o: beats in flight differ from the unit's occupancy")


@pytest.mark.parametrize("mutant, text", [
    (DropBeat, "lost or duplicated beat"),
    (DuplicateBeat, "more beats out than in"),
], ids=["lost", "duplicated"])
def test_mutant_drain(tmp_path, mutant, text):
    """The black-box drain check (used in the sweep) on a pass-through with a
    skid-free bug: a lost beat stays in flight, a duplicated one goes negative."""
    flow = BeatFlow("i", "o", 2, same_cycle=True, drain=2)
    r = run(lambda: mutant(RangeTracker(width=8), "o"), tmp_path, "mut_drain", mode="bmc",
            depth=8, flows=[flow])
    assert_fails_with(r, text)


def test_mutant_executor_two_engines(tmp_path):
    r = run(lambda: MergeValid(executor(), "e0_cmd", "e1_cmd"), tmp_path, "mut_two_engines",
            mode="prove", depth=4, **executor_properties(sub="dut"))
    assert_fails_with(r, "executor: cmd valid for two engines")


def test_mutant_executor_command_not_held(tmp_path):
    r = run(lambda: ChangePayload(executor(), "e2_cmd", while_idle=True), tmp_path,
            "mut_cmd_hold", mode="prove", depth=4, **executor_properties(sub="dut"))
    assert_fails_with(r, "e2_cmd: payload changed before the e2_status handshake")


def test_mutant_narrow_accumulator(tmp_path):
    """A PE whose accumulator is sized for k_max / 4 under jobs of k_max."""
    narrow = ACC_CFG.replace(k_max=ACC_CFG.k_max // 4)
    assert narrow.acc_bits < ACC_CFG.acc_bits
    r = run(lambda: PE(narrow), tmp_path, "mut_accumulator", mode="bmc",
            depth=accumulator_depth(ACC_CFG), checks=[accumulator_model(ACC_CFG)])
    assert_fails_with(r, "accumulator: the exact sum exceeds the accumulator")
    assert any("differs from the exact sum" in f for f in r.failures), r.report()


def test_harness_mirrors_dut_interface():
    """The harness's top has the DUT's ports (the proof's free inputs are the DUT's)."""
    dut = UartRx(4)
    h = FormalHarness(dut)
    h._MustUse__silence = dut._MustUse__silence = True     # inspected, not elaborated
    assert isinstance(h, wiring.Component)
    assert h.signature.members.keys() == dut.signature.members.keys()
    assert [p.name for p in h.streams] == ["o"] and h.streams[0].sends
