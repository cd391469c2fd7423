"""The accelerator top: byte stream -> frame decoder -> command executor -> buffers ->
MAC array -> response encoder (Amaranth 0.5). See ``docs/accelerator.md``.

Everything protocol-related (opcodes, field offsets, error codes, buffer map, CRC) comes
from :mod:`hbfp_hw.protocol`; every width from the :class:`AcceleratorConfig`. The
command semantics are those of the golden device model
(:class:`hbfp_hw.host.emulator.Emulator`), checked field by field in the same order so
error frames carry the same code and detail.

What the RTL implements and what it answers with ``UNSUPPORTED`` is listed in
:data:`UNSUPPORTED` / :func:`unsupported` (also returned by INFO under the
``"gateware"`` key, outside the hashed device description). QUANTIZE streams ``fp_in``
through one :class:`~hbfp_hw.gateware.quantizer.Quantizer` per format slot into the
operand buffers (see ``docs/accelerator.md``).

Ports
-----
``i`` / ``o``: byte streams (``stream.Signature(8)``) to and from the host.
``busy``: high while a command executes or a response is being sent.
:class:`UartAccelerator` wraps the top with the UART PHY for boards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.back import verilog
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.config.mac_array import MacArrayConfig
from hbfp_hw.config.quantizer import QuantizerConfig
from hbfp_hw.formats import ROUNDING_MODES, BFPFormat

from .cmd_decoder import FrameDecoder, crc32_byte_matrix
from .mac_array import MacArray, carry_bits, ref_exponent_limit
from .quantizer import Quantizer
from .range_tracker import RangeTracker

__all__ = ["Accelerator", "UartAccelerator", "UNSUPPORTED", "unsupported", "gemm_slots",
           "quant_lanes", "quant_rounding", "info_blob",
           "mac_config", "generate", "register_cli"]

G = P.GemmFlag
#: Features of the protocol the gateware answers with ``ErrorCode.UNSUPPORTED``
#: (configuration-dependent gaps are added by :func:`unsupported`).
UNSUPPORTED = {
    "ops": [],
    "gemm_flags": [],
    "gemm_slots": "only format slots whose format is the MAC array's (square tile x tile "
                  "HyperBlock blocks, man_bits_max, exp_bits_max); others: detail 3 / 4",
}

#: The "no valid block" row/column maximum of the golden model (``hbfp_hw.gemm``).
_NO_EXP = -(1 << 14)

_INFO_FIXED = P.RESPONSES[P.Op.INFO].header_size  # version, hash, total


def mac_config(cfg: AcceleratorConfig) -> MacArrayConfig:
    """The MAC array configuration of an accelerator (tile = ``cfg.tile``)."""
    T = cfg.tile
    lanes = next(n for n in (4, 2, 1) if T % n == 0)
    return MacArrayConfig(rows=cfg.array_rows, cols=cfg.array_cols, lanes=lanes, tile=T,
                          man_bits_a=cfg.man_bits_max, man_bits_b=cfg.man_bits_max,
                          exp_bits=cfg.exp_bits_max, k_max=cfg.k_max,
                          guard_bits=cfg.guard_bits, mapping="dsp")


def gemm_slots(cfg: AcceleratorConfig) -> list[int]:
    """Format slots the MAC array computes with (bit-exactly as the golden model)."""
    mc = mac_config(cfg)
    ref = mc.format_a()
    out = []
    for i, f in enumerate(cfg.formats):
        if (cfg.block_2d(i) == (cfg.tile, cfg.tile) and f.man_bits == ref.man_bits
                and f.exp_bits == ref.exp_bits and f.exp_bias == ref.exp_bias
                and f.exp_invalid_code == ref.exp_invalid_code and f.emin == ref.emin
                and f.emax == ref.emax):
            out.append(i)
    return out


def quant_lanes(fmt: BFPFormat) -> tuple[int, bool]:
    """Quantizer lanes for a format slot and whether stochastic rounding can be built.

    Stochastic rounding draws element ``n`` of the block stream from generator
    ``n % fmt.sr_lanes``, so the unit needs ``lanes = sr_lanes`` (a divisor of the block
    size, at most the unit's lane limit); other slots get one lane and no stochastic mode.
    """
    from hbfp_hw.config.quantizer import LANES_RANGE
    L = fmt.sr_lanes
    if L <= LANES_RANGE[1] and fmt.block_size % L == 0:
        return L, True
    return 1, False


def quant_rounding(cfg: AcceleratorConfig, runtime_rounding: bool = True) -> list[list[int]]:
    """Rounding modes (indices in ``ROUNDING_MODES``) QUANTIZE implements, per slot."""
    out = []
    for f in cfg.formats:
        _, sto = quant_lanes(f)
        modes = range(len(ROUNDING_MODES)) if runtime_rounding else [f.rounding_code]
        out.append([r for r in modes if sto or ROUNDING_MODES[r] != "stochastic"])
    return out


def accumulator_capacity(cfg: AcceleratorConfig) -> int:
    """Outputs (padded to whole tiles) whose accumulators the top keeps between GEMMs.

    A GEMM whose padded ``M x N`` exceeds it runs as usual but keeps no accumulators;
    ``ACCUMULATE`` onto it is answered ``UNSUPPORTED`` (detail 2) after every emulator
    check passed. The host driver's K-split tiles never exceed ``output_depth``.
    """
    return cfg.output_depth


def unsupported(cfg: AcceleratorConfig, runtime_rounding: bool = True) -> dict:
    """:data:`UNSUPPORTED` plus the QUANTIZE rounding modes missing for ``cfg``."""
    out = dict(UNSUPPORTED)
    out["gemm_accumulate"] = (f"ACCUMULATE onto a GEMM whose padded M*N exceeds "
                              f"{accumulator_capacity(cfg)} outputs: detail 2")
    miss = {str(i): [ROUNDING_MODES[r] for r in range(len(ROUNDING_MODES)) if r not in ok]
            for i, ok in enumerate(quant_rounding(cfg, runtime_rounding))}
    miss = {k: v for k, v in miss.items() if v}
    if miss:
        out["quantize_rounding"] = miss   # slot -> modes answered UNSUPPORTED (detail 7)
    return out


def info_blob(cfg: AcceleratorConfig, runtime_rounding: bool = True) -> bytes:
    """INFO's answer stream: fixed fields then the canonical description JSON.

    The JSON is the device description plus a ``"gateware"`` key (the unsupported
    features); the hash covers the description only, so it equals the manifest's.
    """
    desc = P.device_description(cfg)
    desc["gateware"] = {"unsupported": unsupported(cfg, runtime_rounding),
                        "gemm_slots": gemm_slots(cfg)}
    js = P.canonical_json(desc)
    fixed = P.RESPONSES[P.Op.INFO].pack(version=P.PROTOCOL_VERSION,
                                        hash=P.device_hash(cfg), total=len(js))
    return fixed + js


def _cmul(x, c: int):
    """``x * c`` for a constant ``c >= 0`` as a sum of shifts (no multiplier cell)."""
    terms = [x << i for i in range(c.bit_length()) if (c >> i) & 1]
    if not terms:
        return Const(0, 1)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _in_range(x, lo: int, hi: int):
    """``lo <= x <= hi`` for an unsigned ``x`` (no constant-true compare for lo = 0)."""
    return (x <= hi) if lo <= 0 else ((x >= lo) & (x <= hi))


def _crc_next(m: Module, crc: Signal, byte) -> Signal:
    out = Signal(32)
    for j, (sm, bm) in enumerate(crc32_byte_matrix()):
        acc = Const(0, 1)
        for i in range(32):
            if sm >> i & 1:
                acc = acc ^ crc[i]
        for i in range(8):
            if bm >> i & 1:
                acc = acc ^ byte[i]
        m.d.comb += out[j].eq(acc)
    return out


class Accelerator(wiring.Component):
    """The accelerator top for ``config`` with a plain byte-stream host port.

    Parameters
    ----------
    config
        The :class:`AcceleratorConfig` (``tile`` a power of two dividing
        ``operand_depth``).
    idle_cycles
        Partial-frame timeout in clocks (default: the protocol's
        ``IDLE_TIMEOUT_BYTES`` byte times at the config's baud rate and clock).
    runtime_rounding
        Build every rounding mode into each slot's quantizer (QUANTIZE's ``rounding``
        field selects it, as in the emulator). ``False`` builds only the slot format's
        own mode; other modes are answered ``UNSUPPORTED`` (detail 7).
    primitives
        Passed to :class:`~hbfp_hw.gateware.mac_array.MacArray`: ``None`` (portable
        ``a * b``) or ``"ecp5"`` (``MULT18X18D`` instances with their input, pipeline and
        output registers; the board build uses it on ECP5). Same cycle behaviour.
    """

    def __init__(self, config: AcceleratorConfig | None = None, *,
                 idle_cycles: int | None = None, runtime_rounding: bool = True,
                 primitives: str | None = None) -> None:
        cfg = config or AcceleratorConfig.default()
        if not isinstance(cfg, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, got {type(cfg).__name__}")
        T = cfg.tile
        if T & (T - 1) or cfg.operand_depth % T:
            raise ValueError(f"tile={T} must be a power of two dividing operand_depth="
                             f"{cfg.operand_depth} for the accelerator top")
        self.config = cfg
        self.mac = mac_config(cfg)
        self.specs = P.buffer_map(cfg)
        self.runtime_rounding = bool(runtime_rounding)
        self.primitives = primitives
        self.info = info_blob(cfg, self.runtime_rounding)
        self.quant = []
        for f in cfg.formats:
            lanes, _ = quant_lanes(f)
            self.quant.append(QuantizerConfig(format=f, lanes=lanes,
                                              runtime_rounding=self.runtime_rounding,
                                              static_exponent=True))
        if idle_cycles is None:
            idle_cycles = P.IDLE_TIMEOUT_BYTES * 10 * cfg.clock_hz // cfg.baud_rate
        self.idle_cycles = idle_cycles
        super().__init__({"i": In(stream.Signature(8)), "o": Out(stream.Signature(8)),
                          "busy": Out(1)})

    # ------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        cfg, specs, mc = self.config, self.specs, self.mac
        T = cfg.tile
        tsh = T.bit_length() - 1
        nbuf = len(specs)
        rom_id = nbuf  # the INFO ROM is "buffer" nbuf for the response encoder

        # ---- frame decoder and request staging -------------------------------------
        m.submodules.dec = dec = FrameDecoder(idle_cycles=self.idle_cycles)
        state_idle = Signal()
        m.d.comb += [dec.i.payload.eq(self.i.payload),
                     dec.i.valid.eq(self.i.valid & state_idle),
                     self.i.ready.eq(dec.i.ready & state_idle),
                     dec.o.ready.eq(1)]
        HDR = max(L.header_size for L in P.REQUESTS.values())
        hdr = Signal(8 * HDR)
        pcount = Signal(16)
        pcrc = Signal(32, init=0xFFFFFFFF)
        pcrc_n = _crc_next(m, pcrc, dec.o.payload)
        m.submodules.stage = stage = memory.Memory(shape=8, depth=P.MAX_PAYLOAD, init=[])
        st_w = stage.write_port()
        st_r = stage.read_port()
        m.d.comb += [st_w.addr.eq(pcount), st_w.data.eq(dec.o.payload),
                     st_w.en.eq(dec.o.valid)]
        with m.If(dec.o.valid):
            m.d.sync += [pcount.eq(pcount + 1), pcrc.eq(pcrc_n)]
            for k in range(HDR):
                with m.If(pcount == k):
                    m.d.sync += hdr[8 * k: 8 * k + 8].eq(dec.o.payload)
        with m.If(dec.frame_ok | dec.frame_bad | dec.abort | dec.oversize):
            m.d.sync += [pcount.eq(0), pcrc.eq(0xFFFFFFFF)]
        # the header of the frame being executed
        seq = Signal(8)
        opc = Signal(8)
        length = Signal(16)
        fcrc = Signal(32)

        def fld(op: P.Op, name: str):
            lay = P.REQUESTS[op]
            off = lay.offsets()[name]
            size = next(f.size for f in lay.fields if f.name == name)
            return hdr[8 * off: 8 * (off + size)]

        # ---- buffers ----------------------------------------------------------------
        mems, rps, wps = [], [], []
        rd_elem = Signal(32)   # element address presented to the read ports
        rd_word = Signal(32)   # word address for the mantissa buffers
        for s in specs:
            w = 8 * s.wire_bytes
            if s.kind == P.BufferKind.MANTISSA:
                mem = memory.Memory(shape=unsigned(w * T), depth=s.depth // T, init=[])
                wp = mem.write_port(granularity=w)
                rp = mem.read_port()
                m.d.comb += rp.addr.eq(rd_word)
            else:
                mem = memory.Memory(shape=unsigned(w), depth=s.depth, init=[])
                wp = mem.write_port()
                rp = mem.read_port()
                m.d.comb += rp.addr.eq(rd_elem)
            m.submodules[f"buf_{s.name.replace('.', '_')}"] = mem
            mems.append(mem)
            rps.append(rp)
            wps.append(wp)
        m.submodules.info_rom = rom = memory.Memory(shape=8, depth=len(self.info),
                                                    init=list(self.info))
        rom_r = rom.read_port()
        m.d.comb += rom_r.addr.eq(rd_elem)
        lane = Signal(tsh if tsh else 1)  # lane of a mantissa element being read

        def elem_data(i: int):
            s = specs[i]
            if s.kind == P.BufferKind.MANTISSA:
                w = 8 * s.wire_bytes
                words = [rps[i].data[w * k: w * (k + 1)] for k in range(T)]
                sel = Signal(w, name=f"lane_{i}")
                with m.Switch(lane):
                    for k in range(T):
                        with m.Case(k):
                            m.d.comb += sel.eq(words[k])
                return sel
            return rps[i].data

        # per-buffer constants selected by a run-time id
        def by_id(idx, values: list[int], width: int, name: str):
            out = Signal(width, name=name)
            with m.Switch(idx):
                for k, v in enumerate(values):
                    with m.Case(k):
                        m.d.comb += out.eq(v)
            return out

        man_ids = [s.id for s in specs if s.kind == P.BufferKind.MANTISSA]
        exp_ids = [s.id for s in specs if s.kind == P.BufferKind.EXPONENT]
        out_spec = next(s for s in specs if s.name == "out")
        man_spec, exp_spec = specs[man_ids[0]], specs[exp_ids[0]]
        mw, ew = 8 * man_spec.wire_bytes, 8 * exp_spec.wire_bytes

        # ---- response descriptor (and the replay record) ------------------------------
        r_seq = Signal(8)
        r_op = Signal(8)
        r_fix = Signal(128)
        r_nfix = Signal(5)
        r_src = Signal(range(nbuf + 1))
        r_addr = Signal(32)
        r_count = Signal(16)
        r_src0 = Signal(range(nbuf + 1))   # first data segment (from element 0), if any
        r_c0 = Signal(16)
        r_len = Signal(16)
        desc = Cat(r_seq, r_op, r_fix, r_nfix, r_src, r_addr, r_count, r_src0, r_c0, r_len)
        saved = Signal(len(desc))
        last_valid = Signal()
        last_key = Signal(8 + 8 + 16 + 32)

        def respond(op: int, fix=None, nfix: int = 0, src=None, addr=0, count=0,
                    info=False, wire_bytes=1, src0=None, count0=0, wire_bytes0=1):
            """Fixed fields, then ``count0`` elements of ``src0`` from element 0 (INFO:
            the ROM's fixed fields), then ``count`` elements of ``src`` from ``addr``."""
            if info:
                src0, count0, wire_bytes0 = rom_id, _INFO_FIXED, 1
            stmts = [r_seq.eq(seq), r_op.eq(op), r_nfix.eq(nfix),
                     r_addr.eq(addr), r_count.eq(count),
                     r_src.eq(src if src is not None else 0),
                     r_src0.eq(src0 if src0 is not None else 0),
                     r_c0.eq(count0 if src0 is not None else 0),
                     r_fix.eq(fix if fix is not None else 0)]
            ln = nfix
            if src0 is not None:
                ln = ln + count0 * wire_bytes0
            if src is not None:
                ln = ln + count * wire_bytes
            stmts.append(r_len.eq(ln))
            m.d.sync += stmts
            m.next = "SEND"

        # An error registers its code and detail and answers from the ERROR state one
        # cycle later: the checks then end in these 40 bits instead of in the enables of
        # the whole response descriptor (a critical path of the board build).
        err_bits = {f.name: 8 * f.size for f in P.ERROR_LAYOUT.fields}
        e_code = Signal(err_bits["code"])
        e_detail = Signal(err_bits["detail"])

        def error(code: P.ErrorCode, detail):
            if isinstance(detail, int):
                detail = Const(detail, len(e_detail))
            dw = len(e_detail)      # zero-extended, then truncated to the field
            m.d.sync += [e_code.eq(int(code)), e_detail.eq(Cat(detail, Const(0, dw))[:dw])]
            m.next = "ERROR"

        def error_state():
            with m.State("ERROR"):
                respond(P.ERROR_OPCODE, fix=Cat(e_code, opc, e_detail),
                        nfix=P.ERROR_LAYOUT.header_size)

        # ---- statistics ---------------------------------------------------------------
        # one range tracker watches the stored GEMM outputs (drain -> out buffer), the
        # other the FP32 tensor elements QUANTIZE reads from fp_in (READ_STATS flag
        # QUANTIZE_INPUT); RESET clears both
        m.submodules.stats = stats = RangeTracker(width=32, lanes=1, fp32=True,
                                                  count_bits=32)
        m.submodules.qstats = qstats = RangeTracker(width=32, lanes=1, fp32=True,
                                                    count_bits=32)
        st_clear = Signal()
        qst_clear = Signal()
        # the clears are registered: the executor's state decode then ends in two
        # flops instead of running into the trackers' counter adders (a critical path
        # of the board build); no element reaches a tracker while READ_STATS or RESET
        # executes, so clearing one clock later changes nothing
        st_clear_r = Signal()
        qst_clear_r = Signal()
        m.d.sync += [st_clear_r.eq(st_clear), qst_clear_r.eq(qst_clear)]
        m.d.comb += [stats.clear.eq(st_clear_r), stats.o.ready.eq(1),
                     qstats.clear.eq(qst_clear_r), qstats.o.ready.eq(1)]

        # ---- MAC array ----------------------------------------------------------------
        m.submodules.mac = mac = MacArray(mc, primitives=self.primitives, ext_eref=True,
                                           carry=True)

        # ---- GEMM operands (registered at dispatch) ----------------------------------
        g_flags = Signal(8)
        g_a = Signal(8)
        g_b = Signal(8)
        nb_a = Signal(32)   # blocks of the stored operands
        nb_b = Signal(32)
        gM = Signal(16)
        gN = Signal(16)
        gK = Signal(16)
        mt = Signal(16)     # output tile grid and K tiles
        nt = Signal(16)
        nk = Signal(16)
        g_off = Signal(32)
        ta = g_flags[0]
        tb = g_flags[1]
        store_f = (g_flags & int(G.STORE)) != 0
        acc_f = (g_flags & int(G.ACCUMULATE)) != 0
        ext_f = (g_flags & int(G.EXT_EREF)) != 0

        # ---- accumulator state kept between GEMMs (ACCUMULATE / EXT_EREF) -------------
        # The emulator's acc meta reduces to the output tile grid (mt, nt): every GEMM
        # slot has tile x tile blocks and the MAC array's mantissa width.
        acc_valid = Signal()    # a GEMM completed since RESET
        acc_mt = Signal(16)
        acc_nt = Signal(16)
        k_tot = Signal(32)      # K accumulated so far
        k_new = Signal(32)      # K total after this GEMM
        g_fit = Signal()        # this GEMM's accumulators fit the accumulator buffer
        # reference exponents (unbiased) per row block of A and column block of B, two
        # banks: ``rbank`` holds the stored GEMM's, ``~rbank`` this GEMM's
        eref_spec = next(s for s in specs if s.kind == P.BufferKind.EREF)
        RW = 8 * eref_spec.wire_bytes + 2
        mg_bits = max(1, (max(1, cfg.operand_depth // (T * T)) - 1).bit_length())
        m.submodules.refm = refm = memory.Memory(shape=signed(RW), depth=4 << mg_bits,
                                                 init=[])
        ref_w = refm.write_port()
        ref_r1 = refm.read_port()   # this GEMM's bank
        ref_r2 = refm.read_port()   # the stored bank
        rbank = Signal()

        def ref_addr(bank, which, idx):
            return Cat(idx[:mg_bits], which, bank)

        # accumulator buffer: one word per output beat of the MAC array
        CB = carry_bits(mc)
        acc_cap = accumulator_capacity(cfg)
        m.submodules.accm = accm = memory.Memory(
            shape=unsigned(mc.cols * CB + 1), depth=max(1, -(-acc_cap // mc.cols)), init=[])
        acc_w = accm.write_port()
        acc_r = accm.read_port()

        # ---- shared read address control ---------------------------------------------
        ea = Signal(32)        # response encoder element address
        ea_next = Signal(32)
        sc = Signal(32)        # scan address
        sc_next = Signal(32)
        sq_word = Signal(32)   # sequencer addresses
        sq_elem = Signal(32)
        q_rd = Signal(32)      # QUANTIZE: fp_in element address
        mode = Signal(2)       # 0: encoder, 1: scan (and G_OWN/G_REF), 2: sequencer, 3: quantize
        m.d.comb += [ea_next.eq(ea), sc_next.eq(sc)]
        m.d.sync += [ea.eq(ea_next), sc.eq(sc_next)]
        with m.Switch(mode):
            with m.Case(0):
                m.d.comb += [rd_elem.eq(ea_next), rd_word.eq(ea_next >> tsh),
                             lane.eq(ea)]
            with m.Case(1):
                m.d.comb += [rd_elem.eq(sc_next), rd_word.eq(sc_next)]
            with m.Case(2):
                m.d.comb += [rd_elem.eq(sq_elem), rd_word.eq(sq_word)]
            with m.Case(3):
                m.d.comb += [rd_elem.eq(q_rd)]

        # ---- command executor ---------------------------------------------------------
        # READ / WRITE buffer id and its constants, registered in DECODE from the header
        # (both requests carry ``buffer`` first), so EXEC's bounds checks start from
        # registers instead of a header field -> id -> constant lookup chain
        assert (P.REQUESTS[P.Op.READ].offsets()["buffer"]
                == P.REQUESTS[P.Op.WRITE].offsets()["buffer"])
        b_hdr = fld(P.Op.WRITE, "buffer")
        b_id = Signal(8)
        b_vals = {"b_wb": [s.wire_bytes for s in specs],
                  "b_depth": [s.depth for s in specs],
                  "b_writable": [int(s.writable) for s in specs],
                  "b_wsh": [s.wire_bytes.bit_length() - 1 for s in specs]}
        b_wb, b_depth, b_writable, b_wsh = (Signal(range(max(v) + 1), name=k)
                                            for k, v in b_vals.items())
        c_nobuf, c_off_gt, c_wlen_bad, c_w_oob, c_rlen_bad, c_r_oob = (
            Signal(name=f"c_{k}") for k in ("nobuf", "off_gt", "wlen_bad", "w_oob",
                                              "rlen_bad", "r_oob"))
        c_dlen = Signal.like(length, name="c_dlen")   # payload bytes of a WRITE
        c_n = Signal.like(length, name="c_n")         # its elements
        b_consts = [b_id.eq(b_hdr)] + [
            reg.eq(by_id(b_hdr, b_vals[reg.name], len(reg), f"{reg.name}_c"))
            for reg in (b_wb, b_depth, b_writable, b_wsh)]
        w_off = Signal(32)
        w_n = Signal(32)
        w_e = Signal(32)
        w_bi = Signal(2)
        w_acc = Signal(32)
        clr = Signal(32)
        max_depth = max(s.depth for s in specs)
        k_cnt = Signal(8)  # generic small counter (scan phase)

        op_valid = Signal()
        len_ok = Signal()
        m.d.comb += op_valid.eq(0)
        with m.Switch(opc):
            for op in P.Op:
                with m.Case(int(op)):
                    lay = P.REQUESTS[op]
                    m.d.comb += op_valid.eq(1)
                    if lay.data:
                        m.d.comb += len_ok.eq(length >= lay.header_size)
                    else:
                        m.d.comb += len_ok.eq(length == lay.header_size)

        # write-port defaults: element write from w_* or clearing
        wr_en = Signal()
        wr_data = Signal(32)
        wr_addr = Signal(32)
        clearing = Signal()
        # QUANTIZE results: one mantissa (and at a block's end its exponent code) per clock
        q_dst = Signal(8)
        q_men = Signal()
        q_maddr = Signal(32)
        q_mdata = Signal(mw)
        q_een = Signal()
        q_eaddr = Signal(32)
        q_edata = Signal(ew)
        for i, s in enumerate(specs):
            wp = wps[i]
            if s.kind == P.BufferKind.MANTISSA:
                qsel = q_men & (q_dst == s.operand)
                m.d.comb += [wp.addr.eq(Mux(clearing, clr,
                                            Mux(qsel, q_maddr >> tsh, wr_addr >> tsh))),
                             wp.data.eq(Mux(clearing, 0,
                                            Mux(qsel, q_mdata.replicate(T),
                                                wr_data[:8 * s.wire_bytes].replicate(T))))]
                with m.If(clearing):
                    m.d.comb += wp.en.eq(Mux(clr < s.depth // T, (1 << T) - 1, 0))
                with m.Elif(qsel):
                    m.d.comb += wp.en.eq(1 << q_maddr[:tsh] if tsh else 1)
                with m.Elif(wr_en & (b_id == i)):
                    m.d.comb += wp.en.eq(1 << wr_addr[:tsh] if tsh else 1)
            elif s.kind == P.BufferKind.EXPONENT:
                qsel = q_een & (q_dst == s.operand)
                m.d.comb += [wp.addr.eq(Mux(clearing, clr, Mux(qsel, q_eaddr, wr_addr))),
                             wp.data.eq(Mux(clearing, 0, Mux(qsel, q_edata, wr_data)))]
                m.d.comb += wp.en.eq(Mux(clearing, clr < s.depth,
                                         qsel | (wr_en & (b_id == i))))
            else:
                m.d.comb += [wp.addr.eq(Mux(clearing, clr, wr_addr)),
                             wp.data.eq(Mux(clearing, 0, wr_data))]
                if s.name == "out":
                    continue  # driven by the GEMM drain below
                m.d.comb += wp.en.eq(Mux(clearing, clr < s.depth, wr_en & (b_id == i)))
        out_wp = wps[out_spec.id]
        drain_en = Signal()
        drain_addr = Signal(32)
        drain_data = Signal(32)
        with m.If(clearing):
            m.d.comb += out_wp.en.eq(clr < out_spec.depth)
        with m.Else():
            m.d.comb += [out_wp.en.eq(drain_en), out_wp.addr.eq(drain_addr),
                         out_wp.data.eq(drain_data)]

        # scan machinery (GEMM operand checks)
        scan_buf = Signal(8)    # operand buffer index
        scan_kind = Signal(2)   # 0 mantissa range, 1 exponent range, 2 invalid flag
        scan_n = Signal(32)
        scan_which = Signal()
        man_word = Signal(mw * T)
        exp_code = Signal(ew)
        with m.Switch(scan_buf):
            for k in range(cfg.operand_buffers):
                with m.Case(k):
                    m.d.comb += [man_word.eq(rps[man_ids[k]].data),
                                 exp_code.eq(rps[exp_ids[k]].data)]
        mref = mc.format_a()
        man_bad = Signal(T)
        for k in range(T):
            v = man_word[mw * k: mw * (k + 1)].as_signed()
            if mref.mmax >= 2 ** (mw - 1) - 1:   # only the most negative code is out
                m.d.comb += man_bad[k].eq(v == -(2 ** (mw - 1)))
            else:
                m.d.comb += man_bad[k].eq((v > mref.mmax) | (v < -mref.mmax))
        man_bad_lane = Signal(range(T + 1))
        for k in reversed(range(T)):
            with m.If(man_bad[k]):
                m.d.comb += man_bad_lane.eq(k)
        exp_range_bad = (exp_code > mref.exp_invalid_code if mref.exp_invalid_code < 2 ** ew - 1
                         else Const(0))
        exp_inv = exp_code == mref.exp_invalid_code
        chk_v = Signal()                    # registered check of one scanned element
        chk_bad = Signal()
        chk_sc = Signal(32)
        chk_lane = Signal(range(T + 1))
        slots_ok = gemm_slots(cfg)

        def slot_supported(slot):
            return Cat(*[slot == s for s in slots_ok]).any() if slots_ok else Const(0)

        seq_done = Signal()
        drain_done = Signal()
        seq_start = Signal()

        # ---- reference exponents (states G_OWN, G_REF) --------------------------------
        # G_OWN: every exponent code of A (row block major) then of B (column block
        # major), one per clock; the running maximum over valid blocks (_NO_EXP if none)
        # of each row/column block goes to this GEMM's bank.
        x_init, x_go, x_done = Signal(), Signal(), Signal()
        x_which, x_i, x_k = Signal(), Signal(16), Signal(16)
        p_v, p_which, p_i, p_first, p_last = (Signal(), Signal(), Signal(16), Signal(),
                                              Signal())
        # x_blk: the code's block index Mux(x_which, Mux(tb, i * nk + k, k * nt + i),
        # Mux(ta, k * mt + i, i * nk + k)), kept incrementally (x_bi: its value at k = 0)
        x_blk = Signal(32)
        x_bi = Signal(32)
        x_sk = Mux(x_which, Mux(tb, 1, nt), Mux(ta, mt, 1))   # stride of k
        x_si = Mux(x_which, Mux(tb, nk, 1), Mux(ta, 1, nk))   # stride of i
        m.d.sync += [p_v.eq(x_go), p_which.eq(x_which), p_i.eq(x_i), p_first.eq(x_k == 0),
                     p_last.eq(x_k == nk - 1)]
        with m.If(x_go):
            with m.If(x_k == nk - 1):
                m.d.sync += x_k.eq(0)
                with m.If(x_i == Mux(x_which, nt, mt) - 1):
                    m.d.sync += [x_i.eq(0), x_bi.eq(0), x_blk.eq(0)]
                    with m.If(x_which):
                        m.d.sync += x_done.eq(1)
                    with m.Else():
                        m.d.sync += x_which.eq(1)
                with m.Else():
                    m.d.sync += [x_i.eq(x_i + 1), x_bi.eq(x_bi + x_si),
                                 x_blk.eq(x_bi + x_si)]
            with m.Else():
                m.d.sync += [x_k.eq(x_k + 1), x_blk.eq(x_blk + x_sk)]
        x_code = Signal(ew)
        with m.Switch(Mux(p_which, g_b, g_a)):
            for k in range(cfg.operand_buffers):
                with m.Case(k):
                    m.d.comb += x_code.eq(rps[exp_ids[k]].data)
        x_e, x_run, x_mx = (Signal(signed(RW), name=f"x_{n}") for n in ("e", "run", "mx"))
        x_base = Mux(p_first, _NO_EXP, x_run)
        m.d.comb += [x_e.eq(x_code - mref.exp_bias),
                     x_mx.eq(Mux((x_code != mref.exp_invalid_code) & (x_e > x_base), x_e,
                                 x_base))]
        with m.If(p_v):
            m.d.sync += x_run.eq(x_mx)
        # G_REF: per row block of A then column block of B, read the eref code, this
        # GEMM's own maximum and the stored reference; the reference is the code minus
        # the bias (EXT_EREF; below the own maximum: BAD_ARGUMENT 6) or the own maximum.
        # ACCUMULATE: e_ref[i, j] = row[i] + col[j] must equal the stored one for all
        # (i, j), i.e. row[i] - row_old[i] == d and col[j] - col_old[j] == -d.
        y_go, y_done = Signal(), Signal()
        y_which, y_i = Signal(), Signal(16)
        q_v, q_which, q_i, q_first = Signal(), Signal(), Signal(16), Signal()
        y_elem = Signal(32)
        m.d.comb += y_elem.eq(Mux(y_which, mt + y_i, y_i))
        m.d.sync += [q_v.eq(y_go), q_which.eq(y_which), q_i.eq(y_i),
                     q_first.eq(~y_which & (y_i == 0))]
        with m.If(y_go):
            with m.If(y_i == Mux(y_which, nt, mt) - 1):
                m.d.sync += y_i.eq(0)
                with m.If(y_which):
                    m.d.sync += y_done.eq(1)
                with m.Else():
                    m.d.sync += y_which.eq(1)
            with m.Else():
                m.d.sync += y_i.eq(y_i + 1)
        with m.If(x_init):
            m.d.sync += [x_which.eq(0), x_i.eq(0), x_k.eq(0), x_done.eq(0), x_bi.eq(0),
                         x_blk.eq(0),
                         y_which.eq(0), y_i.eq(0), y_done.eq(0)]
        # one register stage after the reads (u_*): the new reference, the own maximum
        # and the difference to the stored reference; the checks and the write use them
        y_own, y_new = Signal(signed(RW)), Signal(signed(RW))
        y_diff, y_d0 = Signal(signed(RW + 2)), Signal(signed(RW + 2))
        y_same = Signal()
        u_v, u_which, u_i, u_first = Signal(), Signal(), Signal(16), Signal()
        u_own, u_new, u_diff = Signal(signed(RW)), Signal(signed(RW)), Signal(signed(RW + 2))
        m.d.comb += [ref_r2.addr.eq(ref_addr(rbank, y_which, y_i)),
                     y_own.eq(ref_r1.data),
                     y_new.eq(Mux(ext_f, rps[eref_spec.id].data - mref.exp_bias, y_own)),
                     y_diff.eq(y_new - ref_r2.data),
                     y_same.eq(u_first | (u_diff == Mux(u_which, -y_d0, y_d0)))]
        m.d.sync += [u_v.eq(q_v), u_which.eq(q_which), u_i.eq(q_i), u_first.eq(q_first),
                     u_own.eq(y_own), u_new.eq(y_new), u_diff.eq(y_diff)]
        with m.If(u_v & u_first):
            m.d.sync += y_d0.eq(u_diff)
        m.d.comb += [ref_w.en.eq((p_v & p_last) | u_v),
                     ref_w.addr.eq(Mux(p_v, ref_addr(~rbank, p_which, p_i),
                                       ref_addr(~rbank, u_which, u_i))),
                     ref_w.data.eq(Mux(p_v, x_mx, u_new))]

        # ---- QUANTIZE engine (fp_in -> slot quantizer -> operand buffer) ---------------
        QF = lambda name: fld(P.Op.QUANTIZE, name)  # noqa: E731
        fp_id = next(s.id for s in specs if s.name == "fp_in")
        fp_depth = specs[fp_id].depth
        q_slot = Signal(8)
        q_rnd = Signal(2)
        q_seed = Signal(32)
        q_rok = Signal()          # the rounding mode is built for the slot
        q_sen = Signal()          # STATIC_EXP: static shared exponent code q_scode
        q_scode = Signal(len(QF("exp_code")))
        q_cok = Signal()          # q_scode lies in the slot format's code range
        q_bh = Signal(16)         # block rows / cols / size of the slot's format
        q_bw = Signal(16)
        q_bsz = Signal(32)
        q_gr = Signal(17)         # block grid
        q_gc = Signal(17)
        q_nb = Signal(34)         # blocks, elements
        q_n = Signal(64)
        q_init = Signal()         # Q_INIT: counters to 0, reseed
        q_run = Signal()          # Q_RUN: feeding and draining
        # feed: element position in block-stream order (block row/col origin, offsets)
        q_r0, q_c0, q_r, q_c = (Signal(17, name=f"q_{n}") for n in ("r0", "c0", "r", "c"))
        n_r0, n_c0, n_r, n_c = (Signal(17, name=f"qn_{n}") for n in ("r0", "c0", "r", "c"))
        q_fdone = Signal()
        f_ready = Signal()        # the selected quantizer's input gatherer takes an element
        f_valid = Signal()
        f_data = Signal(32)
        f_cap = Signal()
        q_rows, q_cols = QF("rows"), QF("cols")
        pad = Signal()
        m.d.comb += [pad.eq(((q_r0 + q_r) >= q_rows) | ((q_c0 + q_c) >= q_cols)),
                     f_valid.eq(q_run & ~q_fdone),
                     f_data.eq(Mux(pad, 0, rps[fp_id].data)),
                     f_cap.eq(f_valid & f_ready),
                     n_r0.eq(q_r0), n_c0.eq(q_c0), n_r.eq(q_r), n_c.eq(q_c)]
        # the quantize-input tracker sees every tensor element taken from fp_in (not
        # the padding), registered like the GEMM tracker's input
        m.d.sync += [qstats.i.valid.eq(f_cap & ~pad), qstats.i.payload[0].eq(rps[fp_id].data)]
        m.d.sync += [q_r0.eq(n_r0), q_c0.eq(n_c0), q_r.eq(n_r), q_c.eq(n_c)]
        # fp_in address src_offset + (r0 + r) * cols + c0 + c, kept incrementally (no
        # multiply on the read-address path): q_a of the element (r0 + r, c0 + c), q_ln of
        # (r0 + r, c0), q_bk of (r0, c0), q_sp of (r0, 0); q_bhc = bh * cols.
        q_a, q_ln, q_bk, q_sp = (Signal(32, name=f"q_{n}") for n in ("a", "ln", "bk", "sp"))
        q_bhc = Signal(32)
        n_a, n_ln, n_bk, n_sp = (Signal(32, name=f"qn_{n}") for n in ("a", "ln", "bk", "sp"))
        m.d.comb += [n_a.eq(q_a), n_ln.eq(q_ln), n_bk.eq(q_bk), n_sp.eq(q_sp), q_rd.eq(n_a)]
        m.d.sync += [q_a.eq(n_a), q_ln.eq(n_ln), q_bk.eq(n_bk), q_sp.eq(n_sp)]
        with m.If(q_init):
            m.d.comb += [n_r0.eq(0), n_c0.eq(0), n_r.eq(0), n_c.eq(0)]
            m.d.comb += [n_a.eq(QF("src_offset")), n_ln.eq(QF("src_offset")),
                         n_bk.eq(QF("src_offset")), n_sp.eq(QF("src_offset"))]
            m.d.sync += q_fdone.eq(0)
        with m.Elif(f_cap):
            with m.If(q_c == q_bw - 1):
                m.d.comb += n_c.eq(0)
                with m.If(q_r == q_bh - 1):
                    m.d.comb += n_r.eq(0)
                    with m.If(q_c0 + q_bw >= q_cols):
                        m.d.comb += n_c0.eq(0)
                        with m.If(q_r0 + q_bh >= q_rows):
                            m.d.sync += q_fdone.eq(1)
                            m.d.comb += [n_a.eq(q_sp), n_ln.eq(q_sp), n_bk.eq(q_sp)]
                        with m.Else():
                            m.d.comb += n_r0.eq(q_r0 + q_bh)
                            m.d.comb += [n_a.eq(q_sp + q_bhc), n_ln.eq(q_sp + q_bhc),
                                         n_bk.eq(q_sp + q_bhc), n_sp.eq(q_sp + q_bhc)]
                    with m.Else():
                        m.d.comb += n_c0.eq(q_c0 + q_bw)
                        m.d.comb += [n_a.eq(q_bk + q_bw), n_ln.eq(q_bk + q_bw),
                                     n_bk.eq(q_bk + q_bw)]
                with m.Else():
                    m.d.comb += n_r.eq(q_r + 1)
                    m.d.comb += [n_a.eq(q_ln + q_cols), n_ln.eq(q_ln + q_cols)]
            with m.Else():
                m.d.comb += n_c.eq(q_c + 1)
                m.d.comb += n_a.eq(q_a + 1)
        # drain: one element per clock from the selected quantizer's output serialiser
        d_valid = Signal()
        d_man = Signal(signed(mw))
        d_exp = Signal(ew)
        d_inv = Signal()
        d_blast = Signal()        # last element of a block
        q_on = Signal(34)
        q_ob = Signal(34)
        q_ninv = Signal(32)
        q_finv = Signal(32)
        m.d.comb += [q_maddr.eq(q_on), q_mdata.eq(d_man), q_eaddr.eq(q_ob), q_edata.eq(d_exp)]
        with m.If(q_init):
            m.d.sync += [q_on.eq(0), q_ob.eq(0), q_ninv.eq(0), q_finv.eq(P.NO_INDEX)]
        with m.Elif(q_run & d_valid):
            m.d.comb += q_men.eq(1)
            m.d.sync += q_on.eq(q_on + 1)
            with m.If(d_blast):
                m.d.comb += q_een.eq(1)
                m.d.sync += q_ob.eq(q_ob + 1)
                with m.If(d_inv):
                    m.d.sync += q_ninv.eq(q_ninv + 1)
                    with m.If(q_ninv == 0):
                        m.d.sync += q_finv.eq(q_ob)
        q_ok = quant_rounding(cfg, self.runtime_rounding)

        def cdiv(x, d: int):
            if d & (d - 1) == 0:
                return (x + d - 1) >> (d.bit_length() - 1)
            return (x + d - 1) // d

        m.d.comb += state_idle.eq(0)
        enc_states = self._encoder(m, r_seq, r_op, r_fix, r_nfix, r_src, r_addr, r_count,
                                   r_src0, r_c0, r_len, ea, ea_next, elem_data, rom_r, nbuf, specs)
        with m.FSM(name="exec"):
            with m.State("IDLE"):
                m.d.comb += state_idle.eq(1)
                with m.If(dec.frame_ok):
                    m.d.sync += [seq.eq(dec.seq), opc.eq(dec.opcode), length.eq(dec.length),
                                 fcrc.eq(pcrc)]
                    m.next = "DECODE"
                with m.Elif(dec.frame_bad):
                    m.d.sync += [r_seq.eq(dec.seq), r_op.eq(P.ERROR_OPCODE),
                                 r_fix.eq(Cat(Const(int(P.ErrorCode.BAD_CRC), 8),
                                              dec.opcode, dec.length, Const(0, 16))),
                                 r_nfix.eq(P.ERROR_LAYOUT.header_size), r_c0.eq(0),
                                 r_count.eq(0), r_len.eq(P.ERROR_LAYOUT.header_size)]
                    m.next = "SEND_NOSAVE"
            with m.State("DECODE"):
                m.d.sync += b_consts
                key = Cat(seq, opc, length, fcrc)
                with m.If(last_valid & (key == last_key)):
                    m.d.sync += desc.eq(saved)
                    m.next = "SEND_NOSAVE"
                with m.Else():
                    m.d.sync += [last_valid.eq(1), last_key.eq(key)]
                    with m.If(~op_valid):
                        error(P.ErrorCode.UNKNOWN_OPCODE, opc)
                    with m.Elif(~len_ok):
                        error(P.ErrorCode.BAD_LENGTH, length)
                    with m.Else():
                        m.next = "CHECK"
            # READ / WRITE bounds checks from the registered buffer constants, registered
            # themselves: EXEC's response registers are then enabled from flags
            assert (P.REQUESTS[P.Op.READ].offsets()["offset"]
                    == P.REQUESTS[P.Op.WRITE].offsets()["offset"])
            with m.State("CHECK"):
                off = fld(P.Op.WRITE, "offset")
                dlen = Signal.like(length, name="dlen")
                n_w = Signal.like(length, name="n_w")
                m.d.comb += [dlen.eq(length - P.REQUESTS[P.Op.WRITE].header_size),
                             n_w.eq(dlen >> b_wsh)]
                n_r = fld(P.Op.READ, "count")
                m.d.sync += [c_nobuf.eq(b_id >= nbuf), c_off_gt.eq(off > b_depth),
                             c_dlen.eq(dlen), c_n.eq(n_w),
                             c_wlen_bad.eq(((dlen & (b_wb - 1)) != 0) | (dlen > P.MAX_DATA)),
                             c_w_oob.eq(off + n_w > b_depth),
                             c_rlen_bad.eq((n_r << b_wsh) > P.MAX_DATA),
                             c_r_oob.eq(off + n_r > b_depth)]
                m.next = "EXEC"
            with m.State("EXEC"):
                with m.Switch(opc):
                    with m.Case(P.Op.INFO):
                        off = fld(P.Op.INFO, "offset")
                        total = len(self.info) - _INFO_FIXED
                        with m.If(off > total):
                            error(P.ErrorCode.OUT_OF_RANGE, off)
                        with m.Else():
                            rest = Signal(32)
                            m.d.comb += rest.eq(total - off)
                            respond(P.Op.INFO | P.RESPONSE_FLAG, src=rom_id,
                                    addr=off + _INFO_FIXED,
                                    count=Mux(rest > P.MAX_DATA, P.MAX_DATA, rest), info=True)
                    with m.Case(P.Op.WRITE):
                        off = fld(P.Op.WRITE, "offset")
                        with m.If(c_nobuf | ~b_writable):
                            error(P.ErrorCode.BAD_BUFFER, b_id)
                        with m.Elif(c_wlen_bad):
                            error(P.ErrorCode.BAD_LENGTH, c_dlen)
                        with m.Elif(c_w_oob):
                            error(P.ErrorCode.OUT_OF_RANGE, Mux(c_off_gt, off, b_depth))
                        with m.Else():
                            m.d.sync += [w_off.eq(off), w_n.eq(c_n), w_e.eq(0), w_bi.eq(0),
                                         w_acc.eq(0)]
                            m.d.comb += st_r.addr.eq(P.REQUESTS[P.Op.WRITE].header_size)
                            m.next = "WCOPY"
                    with m.Case(P.Op.READ):
                        off = fld(P.Op.READ, "offset")
                        n = fld(P.Op.READ, "count")
                        with m.If(c_nobuf):
                            error(P.ErrorCode.BAD_BUFFER, b_id)
                        with m.Elif(c_rlen_bad):
                            error(P.ErrorCode.BAD_LENGTH, n)
                        with m.Elif(c_r_oob):
                            error(P.ErrorCode.OUT_OF_RANGE, Mux(c_off_gt, off, b_depth))
                        with m.Else():
                            respond(P.Op.READ | P.RESPONSE_FLAG, src=b_id, addr=off,
                                    count=n, wire_bytes=b_wb)
                    with m.Case(P.Op.READ_STATS):
                        fl = fld(P.Op.READ_STATS, "flags")
                        s_q = (fl & int(P.StatsFlag.QUANTIZE_INPUT)).any()
                        s_clr = (fl & int(P.StatsFlag.CLEAR)).any()
                        with m.If((fl & (0xFF & ~P.flag_mask(P.StatsFlag))) != 0):
                            error(P.ErrorCode.BAD_ARGUMENT, 0)
                        with m.Else():
                            respond(P.Op.READ_STATS | P.RESPONSE_FLAG,
                                    fix=Mux(s_q, Cat(qstats.count, qstats.n_nonfinite,
                                                     qstats.min, qstats.max),
                                            Cat(stats.count, stats.n_nonfinite, stats.min,
                                                stats.max)),
                                    nfix=P.RESPONSES[P.Op.READ_STATS].header_size)
                            m.d.comb += [st_clear.eq(s_clr & ~s_q), qst_clear.eq(s_clr & s_q)]
                    with m.Case(P.Op.RESET):
                        m.d.sync += clr.eq(0)
                        m.next = "CLEAR"
                    with m.Case(P.Op.QUANTIZE):
                        m.next = "Q_CHECK"
                    with m.Case(P.Op.GEMM):
                        m.next = "G_PRE"
                        m.d.sync += g_flags.eq(fld(P.Op.GEMM, "flags"))
            # -- WRITE: staged payload -> buffer ------------------------------------
            with m.State("WCOPY"):
                hs = P.REQUESTS[P.Op.WRITE].header_size
                byte = st_r.data
                # present the next staged byte address (data of this cycle = addr of last)
                nxt = Signal(16)
                m.d.comb += [nxt.eq(hs + (w_e << b_wsh) + w_bi + 1), st_r.addr.eq(nxt)]
                full = Signal(32)
                m.d.comb += full.eq(Mux(b_wb == 1, byte,
                                        Mux(b_wb == 2, Cat(w_acc[:8], byte),
                                            Cat(w_acc[:24], byte))))
                with m.If(w_e == w_n):
                    respond(P.Op.WRITE | P.RESPONSE_FLAG, fix=w_n,
                            nfix=P.RESPONSES[P.Op.WRITE].header_size)
                with m.Else():
                    for k in range(3):
                        with m.If(w_bi == k):
                            m.d.sync += w_acc[8 * k: 8 * k + 8].eq(byte)
                    with m.If(w_bi == b_wb - 1):
                        m.d.comb += [wr_en.eq(1), wr_addr.eq(w_off + w_e), wr_data.eq(full)]
                        m.d.sync += [w_e.eq(w_e + 1), w_bi.eq(0)]
                    with m.Else():
                        m.d.sync += w_bi.eq(w_bi + 1)
            # -- RESET: clear every buffer, the statistics and the record -------------
            with m.State("CLEAR"):
                m.d.comb += clearing.eq(1)
                m.d.sync += clr.eq(clr + 1)
                with m.If(clr == max_depth - 1):
                    m.d.comb += [st_clear.eq(1), qst_clear.eq(1)]
                    m.d.sync += [acc_valid.eq(0), k_tot.eq(0)]
                    respond(P.Op.RESET | P.RESPONSE_FLAG)
            # -- GEMM -------------------------------------------------------------------
            fl = fld(P.Op.GEMM, "flags")
            allowed = 0
            for f in G:
                allowed |= int(f)
            # blocks of both operands, registered before the checks (no multiply in the
            # check path)
            nb_ab = [Signal(32, name=f"nb_{name}") for name in "ab"]
            with m.State("G_PRE"):
                for which, name in enumerate("ab"):
                    rows = fld(P.Op.GEMM, f"{name}_rows")
                    cols = fld(P.Op.GEMM, f"{name}_cols")
                    m.d.sync += nb_ab[which].eq(((rows + T - 1) >> tsh)
                                                * ((cols + T - 1) >> tsh))
                m.next = "G_CHECK_A"
            for which, (st, nxt_state) in enumerate((("G_CHECK_A", "G_CHECK_B"),
                                                      ("G_CHECK_B", "G_SCAN_INIT"))):
                name = "ab"[which]
                slot = fld(P.Op.GEMM, f"slot_{name}")
                buf = fld(P.Op.GEMM, name)
                rows = fld(P.Op.GEMM, f"{name}_rows")
                cols = fld(P.Op.GEMM, f"{name}_cols")
                nb = nb_ab[which]
                with m.State(st):
                    with m.If((which == 0) & ((fl & ~allowed & 0xFF) != 0)):
                        error(P.ErrorCode.BAD_ARGUMENT, 2)
                    with m.Elif(slot >= len(cfg.formats)):
                        error(P.ErrorCode.BAD_ARGUMENT, 3 + which)
                    with m.Elif(~slot_supported(slot)):
                        error(P.ErrorCode.UNSUPPORTED, 3 + which)
                    with m.Elif(buf >= cfg.operand_buffers):
                        error(P.ErrorCode.BAD_BUFFER, buf)
                    with m.Elif((rows == 0) | (cols == 0)):
                        error(P.ErrorCode.BAD_ARGUMENT, 0)
                    with m.Elif((nb << (2 * tsh)) > cfg.operand_depth):
                        error(P.ErrorCode.OUT_OF_RANGE, nb << (2 * tsh))
                    with m.Elif(nb > cfg.exponent_depth):
                        error(P.ErrorCode.OUT_OF_RANGE, nb)
                    with m.Else():
                        m.d.sync += [(nb_a if which == 0 else nb_b).eq(nb)]
                        m.next = nxt_state
            with m.State("G_SCAN_INIT"):
                m.d.sync += [g_a.eq(fld(P.Op.GEMM, "a")), g_b.eq(fld(P.Op.GEMM, "b")),
                             k_cnt.eq(0), g_off.eq(fld(P.Op.GEMM, "out_offset"))]
                m.d.comb += x_init.eq(1)
                m.next = "G_SCAN_SET"
            # scan phases: A mantissas, A codes, B mantissas, B codes, A invalid, B invalid
            with m.State("G_SCAN_SET"):
                m.d.comb += sc_next.eq(0)
                m.d.comb += mode.eq(1)
                m.d.sync += chk_v.eq(0)
                with m.Switch(k_cnt):
                    for ph, (which, kind) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1),
                                                        (0, 2), (1, 2))):
                        with m.Case(ph):
                            nbx = nb_a if which == 0 else nb_b
                            m.d.sync += [scan_buf.eq(g_a if which == 0 else g_b),
                                         scan_kind.eq(kind), scan_which.eq(which),
                                         scan_n.eq(nbx << tsh if kind == 0 else nbx)]
                            if kind == 2:
                                with m.If(g_flags & int(G.ALLOW_INVALID)):
                                    m.d.sync += scan_n.eq(0)
                    with m.Default():
                        m.next = "G_SHAPE0"
                with m.If(k_cnt < 6):
                    m.next = "G_SCAN"
            # The check of element ``sc`` is registered (``chk_*``) and acted on in the
            # next cycle: the buffer read, the operand select and the per-lane range
            # compares end in a register instead of in the error response's enables.
            # Elements are still checked in order (the first bad one is reported); a
            # phase ends one cycle after its last read.
            with m.State("G_SCAN"):
                m.d.comb += mode.eq(1)
                m.d.sync += [chk_v.eq(sc != scan_n), chk_sc.eq(sc),
                             chk_lane.eq(man_bad_lane)]
                with m.Switch(scan_kind):
                    for kind, bad in enumerate((man_bad.any(), exp_range_bad, exp_inv)):
                        with m.Case(kind):
                            m.d.sync += chk_bad.eq(bad)
                with m.If(chk_v & chk_bad):
                    with m.Switch(scan_kind):
                        with m.Case(0):
                            error(P.ErrorCode.DATA_RANGE, (chk_sc << tsh) + chk_lane)
                        with m.Case(1):
                            error(P.ErrorCode.DATA_RANGE, chk_sc)
                        with m.Case(2):
                            error(P.ErrorCode.INVALID_DATA, Cat(chk_sc[:31], scan_which))
                with m.Elif(sc == scan_n):
                    m.d.comb += sc_next.eq(sc)
                    with m.If(~chk_v):
                        m.d.sync += k_cnt.eq(k_cnt + 1)
                        m.d.comb += sc_next.eq(0)
                        m.next = "G_SCAN_SET"
                with m.Else():
                    m.d.comb += sc_next.eq(sc + 1)
            a_rows, a_cols = fld(P.Op.GEMM, "a_rows"), fld(P.Op.GEMM, "a_cols")
            b_rows, b_cols = fld(P.Op.GEMM, "b_rows"), fld(P.Op.GEMM, "b_cols")
            Ka = Mux(ta, a_rows, a_cols)
            Kb = Mux(tb, b_cols, b_rows)
            M = Mux(ta, a_cols, a_rows)
            N = Mux(tb, b_rows, b_cols)
            mn = Signal(32)                   # M * N and the padded output, registered
            mnp = Signal(32 + 2 * tsh)
            mt_c, nt_c = Signal(16), Signal(16)
            ktot_c = Signal(32)
            m.d.comb += [mt_c.eq((M + T - 1) >> tsh), nt_c.eq((N + T - 1) >> tsh),
                         ktot_c.eq(Mux(acc_f, k_tot, 0) + Ka)]
            with m.State("G_SHAPE0"):
                m.d.sync += [mn.eq(M * N), mnp.eq((mt_c * nt_c) << (2 * tsh))]
                m.next = "G_SHAPE"
            with m.State("G_SHAPE"):
                with m.If(Ka != Kb):
                    error(P.ErrorCode.BAD_ARGUMENT, 5)
                with m.Elif(store_f & (g_off + mn > out_spec.depth)):
                    error(P.ErrorCode.OUT_OF_RANGE,
                          Mux(g_off > out_spec.depth, g_off, out_spec.depth))
                with m.Elif(acc_f & (~acc_valid | (acc_mt != mt_c) | (acc_nt != nt_c))):
                    error(P.ErrorCode.BAD_ARGUMENT, 2)
                with m.Elif(ktot_c > cfg.k_max):
                    error(P.ErrorCode.K_OVERFLOW, ktot_c)
                with m.Elif(ext_f & (mt_c + nt_c > eref_spec.depth)):
                    error(P.ErrorCode.OUT_OF_RANGE, mt_c + nt_c)
                with m.Else():
                    m.d.sync += [gM.eq(M), gN.eq(N), gK.eq(Ka), k_new.eq(ktot_c),
                                 mt.eq(mt_c), nt.eq(nt_c), nk.eq((Ka + T - 1) >> tsh),
                                 g_fit.eq(mnp <= acc_cap)]
                    m.next = "G_OWN"
            # reference exponents: own row maxima of A / column maxima of B (golden
            # ``_row_col_max``), one exponent code per clock, into this GEMM's bank
            with m.State("G_OWN"):
                m.d.comb += [mode.eq(1), sc_next.eq(x_blk), x_go.eq(~x_done)]
                with m.If(x_done & ~p_v):
                    m.next = "G_REF"
            # this GEMM's references (eref buffer or own), checks against own maxima and
            # (ACCUMULATE) against the stored references: e_ref[i, j] must be unchanged
            with m.State("G_REF"):
                m.d.comb += [mode.eq(1), sc_next.eq(y_elem), y_go.eq(~y_done)]
                with m.If(y_done & ~q_v & ~u_v):
                    m.next = "G_GO"
                with m.If(u_v & ext_f & (u_new < u_own)):
                    error(P.ErrorCode.BAD_ARGUMENT, 6)
                with m.Elif(u_v & acc_f & ~y_same):
                    error(P.ErrorCode.BAD_ARGUMENT, 6)
            with m.State("G_GO"):
                with m.If(acc_f & ~g_fit):
                    error(P.ErrorCode.UNSUPPORTED, 2)
                with m.Elif(store_f | g_fit):
                    m.d.comb += seq_start.eq(1)
                    m.next = "G_RUN"
                with m.Else():
                    m.next = "G_DONE"
            with m.State("G_RUN"):
                m.d.comb += mode.eq(2)
                with m.If(seq_done & drain_done):
                    m.next = "G_DONE"
            with m.State("G_DONE"):
                respond(P.Op.GEMM | P.RESPONSE_FLAG, fix=k_new,
                        nfix=P.RESPONSES[P.Op.GEMM].header_size)
                m.d.sync += [acc_valid.eq(1), acc_mt.eq(mt), acc_nt.eq(nt), k_tot.eq(k_new)]
                with m.If(~acc_f):
                    m.d.sync += rbank.eq(~rbank)
            # -- QUANTIZE ---------------------------------------------------------------
            with m.State("Q_CHECK"):   # per-slot constants and grid (slot checked next)
                rnd = QF("rounding")
                with m.Switch(QF("slot")):
                    for k, f in enumerate(cfg.formats):
                        bh, bw = cfg.block_2d(k)
                        with m.Case(k):
                            m.d.sync += [q_bh.eq(bh), q_bw.eq(bw), q_bsz.eq(f.block_size),
                                         q_gr.eq(cdiv(q_rows, bh)), q_gc.eq(cdiv(q_cols, bw)),
                                         q_bhc.eq(_cmul(q_cols, bh)),
                                         q_rok.eq(Cat(*[rnd == r for r in q_ok[k]]).any()
                                                  if q_ok[k] else 0),
                                         q_cok.eq(_in_range(QF("exp_code"),
                                                            f.emin + f.exp_bias,
                                                            f.emax + f.exp_bias))]
                m.d.sync += [q_slot.eq(QF("slot")), q_rnd.eq(rnd[:2]), q_seed.eq(QF("seed")),
                             q_dst.eq(QF("dst")), q_scode.eq(QF("exp_code")),
                             q_sen.eq((QF("flags") & int(P.QuantizeFlag.STATIC_EXP)).any())]
                m.next = "Q_SIZE1"
            # sizes for the checks, one registered step each (no wide multiply in the
            # check path): blocks and the tensor's element count, then the elements
            # (blocks x the slot's constant block size) and the RETURN answer's bytes
            nb = Signal(34)
            n = Signal(64)
            q_rc = Signal(32)
            src_end = Signal(34)
            ret_bytes = Signal(64)
            with m.State("Q_SIZE1"):
                m.d.sync += [nb.eq(q_gr * q_gc), q_rc.eq(q_rows * q_cols)]
                m.next = "Q_SIZE2"
            with m.State("Q_SIZE2"):
                with m.Switch(q_slot):
                    for k, f in enumerate(cfg.formats):
                        with m.Case(k):
                            m.d.sync += n.eq(_cmul(nb, f.block_size))
                m.d.sync += src_end.eq(QF("src_offset") + q_rc)
                m.next = "Q_SIZE3"
            with m.State("Q_SIZE3"):
                m.d.sync += ret_bytes.eq(_cmul(n, man_spec.wire_bytes)
                                         + _cmul(nb, exp_spec.wire_bytes))
                m.next = "Q_CHECK2"
            q_exp_field = P.REQUESTS[P.Op.QUANTIZE].index("exp_code")
            with m.State("Q_CHECK2"):   # the emulator's checks, in its order
                src = QF("src_offset")
                with m.If(QF("slot") >= len(cfg.formats)):
                    error(P.ErrorCode.BAD_ARGUMENT, 0)
                with m.Elif(QF("rounding") >= len(ROUNDING_MODES)):
                    error(P.ErrorCode.BAD_ARGUMENT, 7)
                with m.Elif(QF("dst") >= cfg.operand_buffers):
                    error(P.ErrorCode.BAD_BUFFER, QF("dst"))
                with m.Elif((QF("flags") & (0xFF & ~P.flag_mask(P.QuantizeFlag))) != 0):
                    error(P.ErrorCode.BAD_ARGUMENT, 2)
                with m.Elif(q_sen & ~q_cok):
                    error(P.ErrorCode.BAD_ARGUMENT, q_exp_field)
                with m.Elif((q_rows == 0) | (q_cols == 0)):
                    error(P.ErrorCode.BAD_ARGUMENT, 0)
                with m.Elif(n > cfg.operand_depth):
                    error(P.ErrorCode.OUT_OF_RANGE, n[:32])
                with m.Elif(nb > cfg.exponent_depth):
                    error(P.ErrorCode.OUT_OF_RANGE, nb[:32])
                with m.Elif(src_end > fp_depth):
                    error(P.ErrorCode.OUT_OF_RANGE, Mux(src > fp_depth, src, fp_depth))
                with m.Elif((QF("flags") & int(P.QuantizeFlag.RETURN)).any()
                            & (ret_bytes > P.MAX_DATA)):
                    error(P.ErrorCode.BAD_LENGTH, n[:32])
                with m.Elif(~q_rok):
                    error(P.ErrorCode.UNSUPPORTED, 7)
                with m.Else():
                    m.d.sync += [q_nb.eq(nb), q_n.eq(n)]
                    m.next = "Q_INIT"
            with m.State("Q_INIT"):
                m.d.comb += [mode.eq(3), q_init.eq(1)]
                m.next = "Q_RUN"
            with m.State("Q_RUN"):
                m.d.comb += [mode.eq(3), q_run.eq(1)]
                with m.If(q_ob == q_nb):
                    m.next = "Q_DONE"
            with m.State("Q_DONE"):
                fix = Cat(q_ninv, q_finv)
                nfix = P.RESPONSES[P.Op.QUANTIZE].header_size
                with m.Switch(q_dst):
                    for k in range(cfg.operand_buffers):
                        with m.Case(k):
                            with m.If((QF("flags") & int(P.QuantizeFlag.RETURN)).any()):
                                respond(P.Op.QUANTIZE | P.RESPONSE_FLAG, fix=fix, nfix=nfix,
                                        src0=exp_ids[k], count0=q_nb[:16],
                                        wire_bytes0=exp_spec.wire_bytes,
                                        src=man_ids[k], addr=0, count=q_n[:16],
                                        wire_bytes=man_spec.wire_bytes)
                            with m.Else():
                                respond(P.Op.QUANTIZE | P.RESPONSE_FLAG, fix=fix, nfix=nfix)
            error_state()
            # -- response encoder ---------------------------------------------------------
            for st, save in (("SEND", True), ("SEND_NOSAVE", False)):
                with m.State(st):
                    if save:
                        m.d.sync += saved.eq(desc)
                    m.d.sync += [ea.eq(Mux(r_c0 != 0, 0, r_addr))]
                    m.next = "E_HDR"
            enc_states(m)

        # ---- slot quantizers: element stream <-> lanes-wide beats -------------------
        for k, qcfg in enumerate(self.quant):
            qz = Quantizer(qcfg)
            m.submodules[f"quant{k}"] = qz
            L = qcfg.lanes
            sel = q_slot == k
            beat = Signal(32 * L, name=f"q{k}_beat")
            full = Signal(name=f"q{k}_full")
            li = Signal(range(max(L, 2)), name=f"q{k}_li")
            ol = Signal(range(max(L, 2)), name=f"q{k}_ol")
            m.d.comb += [qz.i.payload.eq(beat), qz.i.valid.eq(full)]
            with m.If(full & qz.i.ready):
                m.d.sync += full.eq(0)
            with m.If(sel):
                m.d.comb += f_ready.eq(~full | qz.i.ready)
            with m.If(sel & f_cap):
                if L == 1:
                    m.d.sync += [beat.eq(f_data), full.eq(1)]
                else:
                    m.d.sync += beat.word_select(li, 32).eq(f_data)
                    with m.If(li == L - 1):
                        m.d.sync += [li.eq(0), full.eq(1)]
                    with m.Else():
                        m.d.sync += li.eq(li + 1)
            if qcfg.runtime_rounding:
                m.d.comb += qz.rounding.eq(q_rnd)
            if qcfg.has_stochastic:
                m.d.comb += [qz.seed.eq(q_seed), qz.reseed.eq(q_init & sel)]
            if qcfg.static_exponent:
                m.d.comb += [qz.static_en.eq(q_sen),
                             qz.static_code.eq(q_scode[:qcfg.exp_bits])]
            po = qz.o.payload
            lane_last = (ol == L - 1) if L > 1 else Const(1)
            m.d.comb += qz.o.ready.eq(lane_last)
            with m.If(qz.o.valid):
                if L > 1:
                    m.d.sync += ol.eq(Mux(lane_last, 0, ol + 1))
            with m.If(sel):
                m.d.comb += [d_valid.eq(qz.o.valid), d_exp.eq(po.exp), d_inv.eq(po.invalid),
                             d_blast.eq(po.last & lane_last)]
                with m.Switch(ol if L > 1 else Const(0)):
                    for j in range(L):
                        with m.Case(j):
                            m.d.comb += d_man.eq(po.man[j])

        # ---- GEMM sequencer: operand beats to the MAC array -------------------------
        it = Signal(16)
        jt = Signal(16)
        kk = Signal(16)
        rr = Signal(range(T + 1))
        sph = Signal(2)  # 0 A headers, 1 B headers, 2 A rows, 3 B rows
        issued = Signal()
        running = Signal()
        # block indices Mux(ta, kk * mt + it, it * nk + kk) / Mux(tb, jt * nk + kk,
        # kk * nt + jt), kept incrementally (a_bs / b_bs: their values at kk = 0)
        blk_a = Signal(32)
        blk_b = Signal(32)
        a_bs = Signal(32)
        b_bs = Signal(32)
        ska, skb = Mux(ta, mt, 1), Mux(tb, 1, nt)   # strides of kk
        sia, sjb = Mux(ta, 1, nk), Mux(tb, nk, 1)   # strides of it / jt
        is_b = sph[0]
        blk = Mux(is_b, blk_b, blk_a)
        m.d.comb += [sq_elem.eq(blk), sq_word.eq((blk << tsh) + rr)]
        # this GEMM's reference exponent of the job's row / column block (G_REF reads
        # the same port outside G_RUN); clamped to the largest value that matters
        in_seq = Signal()
        m.d.comb += [in_seq.eq(mode == 2),
                     ref_r1.addr.eq(Mux(in_seq, ref_addr(~rbank, is_b, Mux(is_b, jt, it)),
                                        ref_addr(~rbank, y_which, y_i)))]
        r_lim = ref_exponent_limit(mc)
        ref_val = Mux(ref_r1.data > r_lim, r_lim, ref_r1.data)
        hdr_last = Mux(ext_f, nk, nk - 1)   # EXT_EREF: one reference header beat more
        op_man = Signal(mw * T)
        op_exp = Signal(ew)
        op_buf = Mux(is_b, g_b, g_a)
        with m.Switch(op_buf):
            for k in range(cfg.operand_buffers):
                with m.Case(k):
                    m.d.comb += [op_man.eq(rps[man_ids[k]].data),
                                 op_exp.eq(rps[exp_ids[k]].data)]
        with m.If(seq_start):
            m.d.sync += [it.eq(0), jt.eq(0), kk.eq(0), rr.eq(0), sph.eq(0), issued.eq(0),
                         running.eq(1), blk_a.eq(0), blk_b.eq(0), a_bs.eq(0), b_bs.eq(0)]
        kk_inc = [kk.eq(kk + 1), blk_a.eq(blk_a + ska), blk_b.eq(blk_b + skb)]
        kk_zero = [kk.eq(0), blk_a.eq(a_bs), blk_b.eq(b_bs)]
        m.d.comb += seq_done.eq(~running)
        # one register stage per operand stream between the sequencer (buffer reads,
        # reference clamp) and the MAC array's front end (header exponent logic)
        up_ready = []
        for port, which in ((mac.a, 0), (mac.b, 1)):
            p = Signal(port.payload.shape(), name=f"seq_{'ab'[which]}")
            m.d.comb += [p.exp.eq(op_exp), p.transpose.eq(tb if which else ta),
                         p.header.eq(~sph[1]), p.last.eq(kk == nk - 1),
                         p.ref.eq(ext_f & ~sph[1] & (kk == nk)), p.eref.eq(ref_val)]
            for k in range(T):
                m.d.comb += p.data[k].eq(op_man[mw * k: mw * k + mc.man_bits_a])
            p_r = Signal(port.payload.shape(), name=f"seq_{'ab'[which]}_r")
            v_r = Signal(name=f"seq_{'ab'[which]}_valid")
            rdy = Signal(name=f"seq_{'ab'[which]}_ready")
            m.d.comb += [rdy.eq(~v_r | port.ready), port.valid.eq(v_r),
                         port.payload.eq(p_r)]
            with m.If(rdy):
                m.d.sync += [v_r.eq(running & issued & (is_b == which)), p_r.eq(p)]
            up_ready.append(rdy)
        accepted = Mux(is_b, up_ready[1], up_ready[0]) & issued & running
        with m.If(running & ~issued):
            m.d.sync += issued.eq(1)
        with m.If(accepted):
            m.d.sync += issued.eq(0)
            with m.If(~sph[1]):  # header beats
                with m.If(kk == hdr_last):
                    m.d.sync += [*kk_zero, sph.eq(sph + 1)]
                with m.Else():
                    m.d.sync += kk_inc
            with m.Else():
                with m.If(rr == T - 1):
                    m.d.sync += rr.eq(0)
                    with m.If(sph == 2):
                        m.d.sync += sph.eq(3)
                    with m.Elif(kk != nk - 1):
                        m.d.sync += [sph.eq(2), *kk_inc]
                    with m.Else():
                        m.d.sync += [sph.eq(0), *kk_zero]
                        with m.If(jt == nt - 1):
                            m.d.sync += [jt.eq(0), b_bs.eq(0), blk_b.eq(0)]
                            with m.If(it == mt - 1):
                                m.d.sync += running.eq(0)
                            with m.Else():
                                m.d.sync += [it.eq(it + 1), a_bs.eq(a_bs + sia),
                                             blk_a.eq(a_bs + sia)]
                        with m.Else():
                            m.d.sync += [jt.eq(jt + 1), b_bs.eq(b_bs + sjb),
                                         blk_b.eq(b_bs + sjb)]
                with m.Else():
                    m.d.sync += rr.eq(rr + 1)

        # ---- output drain: MAC results -> out buffer + statistics -------------------
        R, C = mc.rows, mc.cols
        d_it = Signal(16)
        d_jt = Signal(16)
        d_rg = Signal(range(T // R + 1))
        d_cg = Signal(range(T // C + 1))
        d_r = Signal(range(R + 1))
        d_c = Signal(range(C + 1))
        d_run = Signal()
        # out row address g_off + di * gN (di below), kept incrementally: d_ra of the row
        # (it, rg, r), d_rb of (it, rg, 0), d_ib of (it, 0, 0)
        d_ra, d_rb, d_ib = Signal(32), Signal(32), Signal(32)
        with m.If(seq_start):
            m.d.sync += [d_it.eq(0), d_jt.eq(0), d_rg.eq(0), d_cg.eq(0), d_r.eq(0),
                         d_c.eq(0), d_run.eq(1), d_ra.eq(g_off), d_rb.eq(g_off),
                         d_ib.eq(g_off)]
        m.d.comb += drain_done.eq(~d_run)
        di = Signal(16)
        dj = Signal(16)
        gNR = _cmul(gN, R)        # row address steps of rg and it
        gNT = gN << tsh
        m.d.comb += [di.eq((d_it << tsh) + d_rg * R + d_r), dj.eq((d_jt << tsh) + d_cg * C + d_c)]
        val = Signal(32)
        with m.Switch(d_c):
            for k in range(C):
                with m.Case(k):
                    m.d.comb += val.eq(mac.o.payload.data[k])
        in_range = (di < gM) & (dj < gN) & store_f   # out and statistics: STORE only
        m.d.comb += [drain_addr.eq(d_ra + dj), drain_data.eq(val)]
        # registered into the tracker (READ_STATS comes frames later; the drain's
        # handshake logic no longer runs into the tracker's counters and compares)
        m.d.sync += [stats.i.valid.eq(d_run & mac.o.valid & in_range),
                     stats.i.payload[0].eq(val)]
        with m.If(d_run & mac.o.valid):
            with m.If(in_range):
                m.d.comb += drain_en.eq(1)
            with m.If(d_c == C - 1):
                m.d.comb += mac.o.ready.eq(1)
                m.d.sync += d_c.eq(0)
                with m.If(d_r == R - 1):
                    m.d.sync += [d_r.eq(0), d_ra.eq(d_rb)]
                    with m.If(d_cg == T // C - 1):
                        m.d.sync += d_cg.eq(0)
                        with m.If(d_rg == T // R - 1):
                            m.d.sync += [d_rg.eq(0), d_ra.eq(d_ib), d_rb.eq(d_ib)]
                            with m.If(d_jt == nt - 1):
                                m.d.sync += d_jt.eq(0)
                                with m.If(d_it == mt - 1):
                                    m.d.sync += d_run.eq(0)
                                with m.Else():
                                    m.d.sync += [d_it.eq(d_it + 1), d_ra.eq(d_ib + gNT),
                                                 d_rb.eq(d_ib + gNT), d_ib.eq(d_ib + gNT)]
                            with m.Else():
                                m.d.sync += d_jt.eq(d_jt + 1)
                        with m.Else():
                            m.d.sync += [d_rg.eq(d_rg + 1), d_ra.eq(d_rb + gNR),
                                         d_rb.eq(d_rb + gNR)]
                    with m.Else():
                        m.d.sync += d_cg.eq(d_cg + 1)
                with m.Else():
                    m.d.sync += [d_r.eq(d_r + 1), d_ra.eq(d_ra + gN)]
            with m.Else():
                m.d.sync += d_c.eq(d_c + 1)
        # accumulators kept between GEMMs: read back (ACCUMULATE) and written per beat
        ac_rd = Signal(32)
        ac_wr = Signal(32)
        with m.If(seq_start):
            m.d.sync += [ac_rd.eq(0), ac_wr.eq(0)]
        with m.Else():
            with m.If(mac.cin_take):
                m.d.sync += ac_rd.eq(ac_rd + 1)
            with m.If(mac.acc_o_valid):
                m.d.sync += ac_wr.eq(ac_wr + 1)
        m.d.comb += [acc_r.addr.eq(ac_rd), acc_w.addr.eq(ac_wr),
                     acc_w.en.eq(mac.acc_o_valid & g_fit),
                     acc_w.data.eq(Cat(*[mac.acc_o[c] for c in range(C)], mac.acc_o_nan)),
                     mac.cin_nan.eq(acc_f & acc_r.data[-1])]
        for c in range(C):
            m.d.comb += mac.cin[c].eq(Mux(acc_f, acc_r.data[c * CB:(c + 1) * CB].as_signed(), 0))
        m.d.comb += self.busy.eq(~state_idle)
        return m

    # ------------------------------------------------------------------------------
    def _encoder(self, m, r_seq, r_op, r_fix, r_nfix, r_src, r_addr, r_count, r_src0, r_c0,
                 r_len,
                 ea, ea_next, elem_data, rom_r, nbuf, specs):
        """Response encoder: set-up now, returns a function adding its FSM states."""
        crc = Signal(32)
        byte = Signal(8)
        crc_n = _crc_next(m, crc, byte)
        idx = Signal(16)
        bi = Signal(2)
        rem = Signal(17)
        seg = Signal()
        src_wb = Signal(3)
        src_byte = Signal(8)
        with m.Switch(Mux(seg, r_src, r_src0)):
            for i, s in enumerate(specs):
                with m.Case(i):
                    d = elem_data(i)
                    m.d.comb += src_wb.eq(s.wire_bytes)
                    m.d.comb += src_byte.eq(d.word_select(bi, 8) if s.wire_bytes > 1 else d)
            with m.Case(nbuf):
                m.d.comb += [src_wb.eq(1), src_byte.eq(rom_r.data)]
        take = self.o.ready
        hdr_bytes = Cat(Const(P.SYNC[0], 8), Const(P.SYNC[1], 8), r_len, r_seq, r_op)
        return lambda m: self._encoder_states(m, locals_=dict(
            crc=crc, byte=byte, crc_n=crc_n, idx=idx, bi=bi, rem=rem, seg=seg, src_wb=src_wb,
            src_byte=src_byte, take=take, hdr_bytes=hdr_bytes, r_c0=r_c0,
            r_count=r_count, r_fix=r_fix, r_nfix=r_nfix, r_addr=r_addr, ea=ea,
            ea_next=ea_next))

    def _encoder_states(self, m, locals_):
        crc, byte, crc_n, idx, bi, rem, seg, src_wb, src_byte, take, hdr_bytes = (
            locals_[k] for k in ("crc", "byte", "crc_n", "idx", "bi", "rem", "seg", "src_wb",
                                 "src_byte", "take", "hdr_bytes"))
        r_c0, r_count, r_fix, r_nfix, r_addr, ea, ea_next = (
            locals_[k] for k in ("r_c0", "r_count", "r_fix", "r_nfix", "r_addr", "ea",
                                 "ea_next"))
        with m.State("E_HDR"):
            m.d.comb += [byte.eq(hdr_bytes.word_select(idx[:3], 8)), self.o.valid.eq(1),
                         self.o.payload.eq(byte)]
            with m.If(take):
                with m.If(idx >= 2):
                    m.d.sync += crc.eq(crc_n)
                with m.Else():
                    m.d.sync += crc.eq(0xFFFFFFFF)
                m.d.sync += idx.eq(idx + 1)
                with m.If(idx == 5):
                    m.d.sync += [idx.eq(0), seg.eq(r_c0 == 0), bi.eq(0),
                                 rem.eq(Mux(r_c0 != 0, r_c0, r_count))]
                    m.next = "E_FIX"
        with m.State("E_FIX"):
            m.d.comb += [byte.eq(r_fix.word_select(idx[:4], 8)), self.o.payload.eq(byte)]
            with m.If(idx == r_nfix):
                m.d.sync += idx.eq(0)
                m.next = "E_DATA"
            with m.Else():
                m.d.comb += self.o.valid.eq(1)
                with m.If(take):
                    m.d.sync += [crc.eq(crc_n), idx.eq(idx + 1)]
        with m.State("E_DATA"):
            m.d.comb += [byte.eq(src_byte), self.o.payload.eq(byte)]
            with m.If(rem == 0):
                with m.If(~seg):
                    m.d.sync += [seg.eq(1), rem.eq(r_count)]
                    m.d.comb += ea_next.eq(r_addr)
                with m.Else():
                    m.next = "E_CRC"
            with m.Else():
                m.d.comb += self.o.valid.eq(1)
                with m.If(take):
                    m.d.sync += crc.eq(crc_n)
                    with m.If(bi == src_wb - 1):
                        m.d.sync += [bi.eq(0), rem.eq(rem - 1)]
                        m.d.comb += ea_next.eq(ea + 1)
                    with m.Else():
                        m.d.sync += bi.eq(bi + 1)
        with m.State("E_CRC"):
            final = crc ^ 0xFFFFFFFF
            m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(final.word_select(idx[:2], 8))]
            with m.If(take):
                m.d.sync += idx.eq(idx + 1)
                with m.If(idx == P.CRC_BYTES - 1):
                    m.d.sync += idx.eq(0)
                    m.next = "IDLE"


# ---------------------------------------------------------------------------------------
# Board wrapper, generation, CLI
# ---------------------------------------------------------------------------------------
class UartAccelerator(wiring.Component):
    """The top behind the UART PHY (``rx``/``tx`` pins), for boards.

    A 64-byte receive FIFO absorbs the bytes arriving while the executor is busy (the
    host sends the next request only after the answer, so this is slack, not flow
    control).
    """

    def __init__(self, config: AcceleratorConfig | None = None, *,
                 primitives: str | None = None) -> None:
        from .uart import uart_divisor
        self.config = config or AcceleratorConfig.default()
        self.primitives = primitives
        self.divisor = uart_divisor(self.config.clock_hz, self.config.baud_rate)
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1), "busy": Out(1)})

    def elaborate(self, platform):
        from .uart import UartRx, UartTx
        m = Module()
        m.submodules.core = core = Accelerator(self.config, primitives=self.primitives)
        m.submodules.urx = urx = UartRx(self.divisor)
        m.submodules.utx = utx = UartTx(self.divisor)
        m.submodules.rxq = q = fifo.SyncFIFOBuffered(width=8, depth=64)
        m.d.comb += [urx.rx.eq(self.rx), self.tx.eq(utx.tx), self.busy.eq(core.busy),
                     q.w_data.eq(urx.o.payload), q.w_en.eq(urx.o.valid),
                     urx.o.ready.eq(q.w_rdy),
                     core.i.payload.eq(q.r_data), core.i.valid.eq(q.r_rdy),
                     q.r_en.eq(core.i.ready)]
        wiring.connect(m, core.o, utx.i)
        return m


def generate(config: AcceleratorConfig, outdir: str | Path, *, uart: bool = False,
             name: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.v`` and ``<name>.json`` (manifest with the device description)."""
    from hbfp_hw.manifest import write_manifest
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = name or f"{config.name}_accel"
    top = UartAccelerator(config) if uart else Accelerator(config)
    text = verilog.convert(top, name=name, emit_src=False)
    vpath = outdir / f"{name}.v"
    vpath.write_text(text)
    mpath = write_manifest(outdir / f"{name}.json", kind="accelerator", top=name,
                           config=config.to_dict(), ports=_port_map(uart),
                           extra=P.manifest_extra(config))
    return vpath, mpath


def _port_map(uart: bool) -> dict:
    if uart:
        return {"rx": {"dir": "in", "width": 1}, "tx": {"dir": "out", "width": 1},
                "busy": {"dir": "out", "width": 1}}
    return {"i": {"dir": "in", "stream": 8}, "o": {"dir": "out", "stream": 8},
            "busy": {"dir": "out", "width": 1}}


def _cli_generate(args) -> int:
    import json
    if args.config:
        src = Path(args.config)
        d = json.loads(src.read_text()) if src.exists() else json.loads(args.config)
        cfg = AcceleratorConfig.from_dict(d.get("config", d))
    else:
        from .sim_device import SIM_CONFIG
        cfg = SIM_CONFIG if args.sim else AcceleratorConfig.default()
    v, mf = generate(cfg, args.output, uart=args.uart, name=args.name)
    print(f"wrote {v} and {mf} (device hash {P.device_hash(cfg).hex()[:16]}...)")
    return 0


def register_cli(subparsers, generate_subparsers) -> None:
    p = generate_subparsers.add_parser(
        "accelerator", help="the accelerator top (byte-stream port, or UART with --uart)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="AcceleratorConfig JSON (file or literal; a manifest "
                                    "works too); default: the default accelerator")
    p.add_argument("--sim", action="store_true", help="use the small sim:// configuration")
    p.add_argument("--uart", action="store_true", help="wrap the top in the UART PHY")
    p.add_argument("--name", default=None, help="top module name")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=_cli_generate)
