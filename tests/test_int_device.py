"""The integer mode on the device (hbfp_hw.host.int_gemm): integer GEMMs and a PTQ model
deployed to emulate:// and sim://, bit-identical to the golden integer GEMM
(hbfp_hw.intgemm.int_linear / int_conv2d, themselves checked in test_intgemm.py)."""

from __future__ import annotations

import numpy as np
import pytest

from hbfp_hw import host
from hbfp_hw.host import int_gemm
from hbfp_hw.intgemm import IntFormat, int_conv2d, int_linear, quantize_int


def _same(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def _full_range(rng, shape, fmt):
    """Codes spanning [0, L] (both ends present), as an IntTensor of ``fmt``."""
    L = 2**fmt.bits - 1
    x = rng.uniform(-1, 1, shape)
    kw = {"lo": -1.0, "hi": 1.0} if fmt.kind == "asymmetric" else {"alpha": 1.0}
    t = quantize_int(x, fmt, **kw)
    t.q.flat[0], t.q.flat[1] = 0, L
    return t


@pytest.fixture(scope="module")
def emu():
    return host.open("emulate://")


@pytest.mark.parametrize("w_fmt,a_fmt,path", [
    (IntFormat(4, "symmetric", axis=0), IntFormat(4, "unsigned"), (5, 1, 0)),
    (IntFormat(7, "symmetric"), IntFormat(15, "symmetric"), (8, 1, 0)),
    (IntFormat(8, "symmetric", axis=0), IntFormat(8, "asymmetric"), (8, 2, 1)),
    (IntFormat(8, "asymmetric"), IntFormat(8, "unsigned"), (8, 1, None)),
    (IntFormat(2, "asymmetric"), IntFormat(3, "symmetric"), (3, 1, 0)),
])
def test_int_linear_on_emulate(emu, rng, w_fmt, a_fmt, path):
    """Every weight path (sent as is; re-centred with the ones row, symmetric and
    integer zero point) against the golden GEMM, with K over one command's k_max."""
    K = 2 * 8 * emu.config.bitlayer_lanes + 5
    a = _full_range(rng, (7, K), a_fmt)
    w = _full_range(rng, (9, K), w_fmt)
    bits, s, t = int_gemm.weight_operand(w)[1:]
    assert (bits, s) == path[:2] and (t == path[2] if path[2] is not None else t != 0)
    y, acc, S = int_gemm.int_linear(emu, a, w, return_acc=True)
    y0, acc0, S0 = int_linear(a, w, return_acc=True)
    assert np.array_equal(acc, acc0) and _same(S, S0) and _same(y, y0)


def test_int_conv2d_on_emulate(emu, rng):
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    a = quantize_int(x, IntFormat(8, "asymmetric"), lo=x.min(), hi=x.max())
    wq = quantize_int(w, IntFormat(8, "symmetric", axis=0))
    for stride, padding in ((1, 0), (2, 1)):
        assert _same(int_gemm.int_conv2d(emu, a, wq, stride=stride, padding=padding),
                     int_conv2d(a, wq, stride=stride, padding=padding))


def test_int_errors(emu, rng):
    a = quantize_int(rng.standard_normal((2, 4)), IntFormat(16, "symmetric"))
    w = quantize_int(rng.standard_normal((3, 4)), IntFormat(8, "symmetric"))
    with pytest.raises(ValueError, match=r"activations of 16 bits .* accepted activation "
                                         r"bits are \[2, 15\]"):
        int_gemm.int_linear(emu, a, w)
    w9 = _full_range(rng, (3, 4), IntFormat(9, "symmetric"))
    a8 = quantize_int(rng.standard_normal((2, 4)), IntFormat(8, "symmetric"))
    with pytest.raises(ValueError, match=r"weights of 9 bits .* accepted weight bits are "
                                         r"\[2, 8\]"):
        int_gemm.int_linear(emu, a8, w9)


def test_ptq_model_deployed_bit_identical(rng):
    """A LAPQ-quantized MLP (W8A8: the weights take the re-centred path with the ones
    row) gives the same logits on the golden GEMM, emulate:// and sim://;
    lapq(backend=URL) returns the deployed model."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from hbfp_hw import ptq
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 3)).eval()
    x = rng.standard_normal((64, 6)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    q = ptq.lapq(model, x, y, w_bits=8, a_bits=8, p_grid=(2.0, 3.0, 4.0),
                 powell_options={"maxiter": 1})
    assert int_gemm.weight_operand(q[2].wq)[2:] == (2, 1)
    xs = torch.from_numpy(x[:4])
    with torch.no_grad():
        ref = q(xs)
        on_emu = ptq.deploy(q, "emulate://")(xs)
        dq = ptq.lapq(model, x, y, w_bits=8, a_bits=8, p_grid=(2.0, 3.0, 4.0),
                      powell_options={"maxiter": 1}, backend="sim://")
        on_sim = dq(xs)
    assert dq.ptq_info["device"] == "sim://" and q.ptq_info.get("device") is None
    assert torch.equal(on_emu, ref) and torch.equal(on_sim, ref)
    assert ptq.deploy(dq, "emulate").ptq_info["device"] == "emulate"


def test_tracked_int_gemm_on_emulate(emu, rng):
    """tracked_acc: the device's final integer sums (K chunks accumulated in bl.y, the
    zero-point term folded into extra K columns) and the integer-output statistics
    READ_STATS INT_OUTPUT reports equal the golden sums and their min/max."""
    from hbfp_hw.host.torch_int import quantize_weight
    from hbfp_hw.intgemm import _golden_acc
    K = 2 * 8 * emu.config.bitlayer_lanes + 5
    a = quantize_int(rng.standard_normal((5, K)), IntFormat(8, "asymmetric"))
    ca = a.operand()[0]
    for w in (quantize_weight(rng.standard_normal((6, K))),                  # fits 8 planes
              quantize_int(rng.standard_normal((6, K)) + 0.5, IntFormat(8, "asymmetric")),
              _full_range(rng, (6, K), IntFormat(8, "symmetric"))):         # 2q - 255
        x, wd, bits = int_gemm.augmented_operands(ca, w, 8)
        assert bits == 8 and np.array_equal(x @ wd.T, ca @ w.operand()[0].T)
        acc, st = int_gemm.tracked_acc(emu, ca, w, 8)
        g = _golden_acc(ca, w, 8)
        assert np.array_equal(acc, g) and st == (g.min(), g.max(), g.size)
        assert emu.read_stats(source="int")["count"] == 0        # cleared after reading
    big = quantize_int(rng.standard_normal((2, 4)), IntFormat(15, "asymmetric"))
    with pytest.raises(ValueError, match=r"activations of 15 bits times the weight step 2"):
        int_gemm.augmented_operands(big.operand()[0], _full_range(
            rng, (3, 4), IntFormat(8, "symmetric")), 15)
    with pytest.raises(ValueError, match=r"accumulator of 3\d bits .* exceeds 32 bits"):
        int_gemm.tracked_acc(emu, np.zeros((1, 70000), np.int64),
                             quantize_weight(np.ones((1, 70000))), 8)
    with pytest.raises(ValueError, match=r"source='ints'; accepted values are"):
        emu.read_stats(source="ints")


@pytest.mark.sweep
def test_top_tracked_bitlayer_and_int_stats_frames_identical():
    """The top over sim:// against the emulator frame by frame: BITLAYER with every
    flag combination (and an undefined flag bit), READ_STATS INT_OUTPUT with and without
    CLEAR, both sources at once (BAD_ARGUMENT), the bl.y words read back, RESET."""
    from hbfp_hw import protocol as P
    from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
    from hbfp_hw.host.emulator import Emulator
    cfg = SIM_CONFIG.replace(formats=SIM_CONFIG.formats[:1], name="hbfp_sim_int")
    B = {s.name: s for s in P.buffer_map(cfg)}
    emu, sim = Emulator(cfg), SimTransport(cfg)
    rng = np.random.default_rng(11)
    lanes = P.bitlayer_lanes(cfg)
    ws, xs, ys = B["bl.w"], B["bl.x"], B["bl.y"]
    words = rng.integers(0, 1 << lanes, ws.depth).astype("<u2")
    x = rng.integers(-2**15, 2**15, xs.depth).astype("<i2")
    x[:2] = [-2**15, 2**15 - 1]

    def req(op, seq, data=b"", **f):
        return P.encode_frame(seq, op, P.REQUESTS[op].pack(data, **f))
    F, S = P.BitLayerFlag, P.StatsFlag
    frames = [req(P.Op.WRITE, 1, words.tobytes(), buffer=ws.id, offset=0),
              req(P.Op.WRITE, 2, x.tobytes(), buffer=xs.id, offset=0)]
    base = dict(bits=8, layers=8, rows=3, cols=lanes + 3, batch=2, w_offset=0, x_offset=0,
                y_offset=4)
    seq = 3
    plan = [(F.TRACK, 0), (F.ACCUMULATE, S.INT_OUTPUT), (F.ACCUMULATE | F.TRACK,
                                                         S.INT_OUTPUT | S.CLEAR),
            (0, S.INT_OUTPUT), (F.ACCUMULATE | F.TRACK, S.INT_OUTPUT | S.QUANTIZE_INPUT),
            (0x04, S.INT_OUTPUT), (F.TRACK, S.INT_OUTPUT)]
    for bl_flags, st_flags in plan:
        frames += [req(P.Op.BITLAYER, seq, **base, flags=int(bl_flags)),
                   req(P.Op.READ_STATS, seq + 1, flags=int(st_flags)),
                   req(P.Op.READ, seq + 2, buffer=ys.id, offset=0, count=12)]
        seq += 3
    frames += [req(P.Op.RESET, seq), req(P.Op.READ_STATS, seq + 1, flags=int(S.INT_OUTPUT))]
    answers = []
    for fr in frames:
        sim.write(fr)
        e, s = emu.feed(fr), sim.read(0.0)
        assert e and s == e, f"request {fr[:12].hex()}: sim {s[:40].hex()} != emu {e[:40].hex()}"
        answers.append(e)
    # the statistics answered are those of the words the TRACK commands wrote
    st = P.RESPONSES[P.Op.READ_STATS]
    body = [P.split_answer(P.decode_frame(a)[2])[1] for a in answers]
    first = st.unpack(body[3])[0]                                   # after TRACK
    y1 = np.frombuffer(body[4], "<i4")[4:10]
    assert first["count"] == 0                                     # read without INT_OUTPUT
    after = st.unpack(body[6])[0]                                   # ACCUMULATE, no TRACK
    lo, hi = np.array([after["min"], after["max"]], np.uint32).view(np.int32)
    assert after["count"] == 6 and (lo, hi) == (y1.min(), y1.max())
