"""End-to-end: the Device API against the golden model, on every device URL.

Every test takes ``url`` from :data:`URLS`: ``emulate://`` (the golden device model) and
``sim://`` (the accelerator RTL in Amaranth's simulator, :data:`SIM_SMALL`: SMALL's
formats and buffers on a 2x2 MAC array). The simulator runs ~1k clocks/s, so sim:// is
opened once per test process and its tests use small shapes; what needs features the
RTL answers ``UNSUPPORTED`` is skipped on sim:// with the reason. GEMMs on every slot
(HBFP8, HBFP4, MXINT8) and K split over several GEMMs (``EXT_EREF`` + ``ACCUMULATE``) run
on both.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import hbfp_hw.host as host
from hbfp_hw import protocol as P
from hbfp_hw.config.accelerator import AcceleratorConfig
from hbfp_hw.formats import HBFP4, HBFP8, MXINT8
from hbfp_hw.gemm import bfp_matmul
from hbfp_hw.manifest import write_manifest
from hbfp_hw.quantize import NonFiniteBlockError, quantize

URLS = ["emulate://", "sim://"]

#: Small buffers so modest shapes already need tiling and K splits.
SMALL = AcceleratorConfig(formats=(HBFP8, HBFP4, MXINT8), operand_depth=2048,
                          input_depth=1024, output_depth=512, k_max=2048)
#: The sim:// build: same formats and buffers, a 2x2 MAC array (simulation speed).
SIM_SMALL = SMALL.replace(array_rows=2, array_cols=2, name="hbfp_sim_small")
_SIM: dict = {}


@pytest.fixture(params=URLS)
def url(request) -> str:
    return request.param


#: ``url`` for tests whose sim:// run takes minutes and whose RTL behaviour the frame-level
#: tests of the top cover: sim:// only in the sweep (``make sweep``).
SIM_IN_SWEEP = pytest.mark.parametrize(
    "url", ["emulate://", pytest.param("sim://", marks=pytest.mark.sweep)])


def _cfg(url):
    return SIM_SMALL if url == "sim://" else SMALL


def _open(url, cfg=None, **kw):
    if url == "sim://":
        assert cfg is None and not kw, "sim:// tests share one device (SIM_SMALL)"
        if "dev" not in _SIM:   # opened once per process: INFO alone is ~6 k clocks
            _SIM["dev"] = host.open("sim://", config=SIM_SMALL)
        return contextlib.nullcontext(_SIM["dev"])
    return host.open(url, config=cfg or SMALL, **kw)


def _emulate_only(url, why):
    if url == "sim://":
        pytest.skip(f"sim:// (RTL, ~1k clocks/s): {why}")


def _rand(rng, shape, scale_spread=True):
    x = rng.standard_normal(shape).astype(np.float32)
    if scale_spread:  # different magnitudes per row block exercise the exponents
        x *= np.exp2(rng.integers(-20, 20, size=(shape[0], 1))).astype(np.float32)
    return x


@SIM_IN_SWEEP
def test_info_matches_config(url):
    with _open(url) as dev:
        info = dev.info()
        assert info["hash"] == P.device_hash(_cfg(url)).hex()
        assert dev.config == _cfg(url)
        assert info["protocol"]["opcodes"]["GEMM"] == P.Op.GEMM


@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (19, 32), (37, 53), (100, 90)])
@pytest.mark.parametrize("fmt", [HBFP8, HBFP4, MXINT8.replace(rounding="stochastic", seed=7)])
def test_quantize_bit_exact(url, rng, shape, fmt):
    if shape[0] * shape[1] > 1000 or (shape == (19, 32) and fmt != HBFP8):
        _emulate_only(url, "small shapes only (larger ones: several QUANTIZE tiles)")
    x = _rand(rng, shape)
    with _open(url) as dev:
        if fmt.rounding == "stochastic" and x.size > SMALL.input_depth:
            with pytest.raises(ValueError, match="stochastic"):
                dev.quantize(x, fmt)
            return
        q = dev.quantize(x, fmt)
    assert q.equal(quantize(x, fmt))


def _static_exp_input(rng, shape):
    """Normal values spread over ~2**-23 .. 2**22 per row, some zeros."""
    x = _rand(rng, shape)
    if x.size > 1:
        x.flat[rng.integers(0, x.size, x.size // 7)] = 0.0
    return x


@pytest.mark.parametrize("shape", [(1, 1), (19, 32), (37, 53), (100, 90)])
@pytest.mark.parametrize("fmt", [HBFP8, HBFP4, MXINT8.replace(rounding="stochastic", seed=3)])
@SIM_IN_SWEEP
def test_quantize_static_exponent_bit_exact(url, rng, shape, fmt):
    """Device.quantize(exponent=E) == quantize(x, fmt, exponent=E), one E for every
    tile: E far below the data (most elements saturate), inside it, far above it
    (most round to 0) and the range ends; a tensor with NaN blocks flagged."""
    if shape[0] * shape[1] > 700:
        _emulate_only(url, "small shapes only (larger ones: several QUANTIZE tiles)")
    x = _static_exp_input(rng, shape)
    if fmt.rounding == "stochastic" and x.size > SMALL.input_depth:
        return  # one random stream per QUANTIZE: covered by test_quantize_bit_exact
    amax = int(np.floor(np.log2(np.abs(x).max())))
    exps = sorted({fmt.emin, fmt.emax, amax, amax - 9, amax + 5,
                   int(rng.integers(fmt.emin, fmt.emax + 1))})
    if url == "sim://":
        exps = exps[1:4]
    with _open(url) as dev:
        for e in exps:
            q = dev.quantize(x, fmt, exponent=e)
            ref = quantize(x, fmt, exponent=e)
            assert q.equal(ref), f"exponent={e}"
            assert np.all(q.exponents == e)
        xn = x.copy()
        xn.flat[rng.integers(0, x.size)] = np.nan
        ref = quantize(xn, fmt, nonfinite="flag", exponent=amax)
        assert dev.quantize(xn, fmt, exponent=amax, nonfinite="flag").equal(ref)
        assert ref.invalid.any() and np.all(ref.exponents[~ref.invalid] == amax)
        with pytest.raises(NonFiniteBlockError):
            dev.quantize(xn, fmt, exponent=amax)


def test_quantize_static_exponent_argument_errors(url, rng):
    with _open(url) as dev:
        x = _rand(rng, (4, 4))
        for bad in (HBFP8.emin - 1, HBFP8.emax + 1):
            with pytest.raises(ValueError, match=r"exponent=.* out of range; accepted range "
                                                 rf"is \[{HBFP8.emin}, {HBFP8.emax}\]"):
                dev.quantize(x, HBFP8, exponent=bad)
        for bad in (1.5, True, "3"):
            with pytest.raises(ValueError, match=r"exponent=.* is not an integer .*an int in "
                                                 rf"\[{HBFP8.emin}, {HBFP8.emax}\]"):
                dev.quantize(x, HBFP8, exponent=bad)
        q = dev.quantize(x, HBFP8, exponent=np.int64(-3))   # numpy integers accepted
        assert q.equal(quantize(x, HBFP8, exponent=-3))


def test_read_stats_quantize_input(url, rng):
    """source="quantize": the FP32 elements of every QUANTIZE (tensor elements only,
    not the block padding), as ordered by their binary32 keys (-0.0 < +0.0, subnormals
    as they are); clear empties only that record; RESET both."""
    shape = (9, 13) if url == "sim://" else (37, 53)   # partial blocks: padding
    x = _rand(rng, shape)
    x[0, 0], x[1, 1], x[2, 2] = -0.0, 0.0, np.float32(-1e-40)
    x[3, 3] = np.nan
    x2 = -np.abs(_rand(rng, shape)) * np.float32(1e3)
    x2[0, 0] = np.inf
    with _open(url) as dev:
        dev.reset()
        dev.quantize(x, nonfinite="flag")
        dev.quantize(x2, nonfinite="flag", exponent=5)
        st = dev.read_stats(source="quantize")
        both = np.concatenate([x.ravel(), x2.ravel()])
        fin = both[np.isfinite(both)]
        assert st["count"] == fin.size and st["n_nonfinite"] == 2
        assert st["min"] == fin.min() and st["max"] == fin.max()
        assert dev.read_stats(source="quantize", clear=True) == st
        assert dev.read_stats(source="quantize")["count"] == 0
        # only -0.0 and a negative subnormal: min is the subnormal, max is -0.0
        z = np.full((2, 3), -0.0, np.float32)
        z[1, 2] = np.float32(-1e-40)
        dev.quantize(z)
        st = dev.read_stats(source="quantize")
        assert (st["count"], st["n_nonfinite"]) == (6, 0)
        assert np.float32(st["min"]) == np.float32(-1e-40)
        assert np.signbit(st["max"]) and st["max"] == 0.0
        # the GEMM record is separate: a matmul leaves the quantize record alone ...
        g0 = dev.read_stats()
        assert g0["count"] == 0
        dev.matmul(_rand(rng, (4, 4)), _rand(rng, (4, 4)), quantize_on="host")
        assert dev.read_stats(source="quantize") == st
        assert dev.read_stats(clear=True)["count"] == 16
        assert dev.read_stats(source="quantize")["count"] == 6
        dev.reset()
        assert dev.read_stats(source="quantize")["count"] == 0
        assert dev.read_stats(source="gemm")["count"] == 0
        for bad in ("GEMM", "quant", None, 1):
            with pytest.raises(ValueError, match=r"source=.*accepted values are 'gemm', "
                                                 r"'quantize'"):
                dev.read_stats(source=bad)


@SIM_IN_SWEEP
def test_matmul_random_shapes_incl_larger_than_buffers(url, rng):
    shapes = [(1, 1, 1), (16, 16, 16)]
    if url == "sim://":   # one output tile; then two output tiles, K over two blocks
        shapes += [(int(rng.integers(1, 17)), int(rng.integers(1, 33)), int(rng.integers(17, 33)))]
    else:
        shapes += [(3, 5, 7), (40, 70, 30)]
        shapes += [tuple(int(v) for v in rng.integers(1, 120, 3)) for _ in range(3)]
        shapes += [(70, 600, 20), (130, 40, 150)]   # K split (16*608 > 2048) / many tiles
    with _open(url) as dev:
        for M, K, N in shapes:
            a, b = _rand(rng, (M, K)), _rand(rng, (K, N))
            y = dev.matmul(a, b)
            ref = bfp_matmul(quantize(a, HBFP8), quantize(b, HBFP8))
            assert y.dtype == np.float32 and y.shape == (M, N)
            assert np.array_equal(y, ref), (M, K, N)


@SIM_IN_SWEEP
def test_matmul_k_split_bit_exact(url, rng):
    """K longer than one on-chip GEMM holds: the driver splits K over GEMMs with the
    whole-K reference exponents in ``eref`` and ACCUMULATE; bit-identical to the unsplit
    golden GEMM (so sim:// and emulate:// give the same bits), NaN rows carried over."""
    cfg = _cfg(url)
    M, K, N = 32, 200, 16
    assert K > cfg.operand_depth // HBFP8.block_shape[0]   # more than one GEMM's K
    a, b = _rand(rng, (M, K)), _rand(rng, (K, N))
    b *= np.exp2(rng.integers(-12, 12, size=(K, 1))).astype(np.float32)   # K-varying
    a[5, 50] = np.nan                         # an invalid block in the first K chunk
    a_q = quantize(a, HBFP8, nonfinite="flag")
    b_q = quantize(b, HBFP8)
    with _open(url) as dev:
        y = dev.matmul_q(a_q, b_q, allow_invalid=True)
    ref = bfp_matmul(a_q, b_q)
    assert y.shape == (M, N)
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    assert np.isnan(y[:16]).all() and np.isfinite(y[16:]).all()


@pytest.mark.parametrize("fa,fb", [(HBFP8, HBFP4), (HBFP4, HBFP4)])
@SIM_IN_SWEEP
def test_matmul_q_mixed_formats_and_orientations(url, rng, fa, fb):
    if fa is HBFP8:
        _emulate_only(url, "HBFP8 x HBFP4 on the RTL: tests/test_accelerator_slots.py")
    M, K, N, P_ = (50, 80, 30, 200) if url == "emulate://" else (20, 40, 12, 24)
    a_q = quantize(_rand(rng, (M, K)), fa)
    b_q = quantize(_rand(rng, (N, K)), fb).T            # stored (N, K), used transposed
    c_q = quantize(_rand(rng, (K, P_)), fb)
    with _open(url) as dev:
        assert np.array_equal(dev.matmul_q(a_q, b_q), bfp_matmul(a_q, b_q))
        assert np.array_equal(dev.matmul_q(a_q.T.T, c_q), bfp_matmul(a_q, c_q))
        assert np.array_equal(dev.matmul_q(c_q.T, a_q.T), bfp_matmul(c_q.T, a_q.T))


def test_matmul_q_mxint8_rows_and_columns(url, rng):
    _emulate_only(url, "MXINT8 on the RTL: test_matmul_mxint8_blocks_both_operands_along_k "
                       "and tests/test_accelerator_slots.py")
    M, K, N = (20, 100, 40) if url == "emulate://" else (4, 70, 3)
    a_q = quantize(_rand(rng, (M, K)), MXINT8)                       # blocks along K
    b_q = quantize(_rand(rng, (N, K)), MXINT8).T                     # (K, N) along K
    with _open(url) as dev:
        assert np.array_equal(dev.matmul_q(a_q, b_q), bfp_matmul(a_q, b_q))


@pytest.mark.parametrize("where", ["device", "host"])
def test_matmul_mxint8_blocks_both_operands_along_k(url, rng, where):
    """``matmul(a, b, MXINT8, MXINT8)``: a blocked along K as stored, b quantized
    transposed (its 1-D blocks along K), as MX defines."""
    if where == "host":
        _emulate_only(url, "the host-quantized path is the same GEMM frame as matmul_q")
    M, K, N = (20, 100, 40) if url == "emulate://" else (3, 64, 2)
    a, b = _rand(rng, (M, K)), _rand(rng, (K, N))
    ref = bfp_matmul(quantize(a, MXINT8), quantize(np.ascontiguousarray(b.T), MXINT8).T)
    with _open(url) as dev:
        y = dev.matmul(a, b, MXINT8, MXINT8, quantize_on=where)
        assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
        with pytest.raises(ValueError, match=r"a's block length along K \(32, format MXINT8\) "
                                             r"differs from b's \(16, format HBFP8\)"):
            dev.matmul(a, b, MXINT8, HBFP8)


@pytest.mark.parametrize("B,I,O", [(9, 16, 14), (20, 40, 30), (64, 96, 48)])
@SIM_IN_SWEEP
def test_train_step_trio(url, rng, B, I, O):
    if B > 16:
        _emulate_only(url, "single-tile trio only")
    x, w, dy = _rand(rng, (B, I)), _rand(rng, (O, I), False), _rand(rng, (B, O))
    xq, wq, dyq = (quantize(t, HBFP8) for t in (x, w, dy))
    with _open(url) as dev:
        y, dx, dw = dev.train_step(x, w, dy)
    assert np.array_equal(y, bfp_matmul(xq, wq.T))
    assert np.array_equal(dx, bfp_matmul(dyq, wq))
    assert np.array_equal(dw, bfp_matmul(dyq.T, xq))


def test_train_step_quantizes_each_operand_once(url, rng):
    _emulate_only(url, "counts the commands inside the emulator")
    with _open(url, cfg=AcceleratorConfig.default()) as dev:
        emu = dev.transport.device
        dev.train_step(_rand(rng, (32, 48)), _rand(rng, (16, 48)), _rand(rng, (32, 16)))
        assert emu.counters["QUANTIZE"] == 3 and emu.counters["GEMM"] == 3
        # operands never travel back: only 3 results come back besides INFO
        assert dev.link["payload_rx"] == 4 * (32 * 16 + 32 * 48 + 16 * 48)


@SIM_IN_SWEEP
def test_read_stats_and_reset(url, rng):
    M, K, N = (5, 9, 6) if url == "sim://" else (24, 40, 24)
    a, b = _rand(rng, (M, K)), _rand(rng, (K, N))
    with _open(url) as dev:
        dev.reset()
        y1 = dev.matmul(a, b)
        y2 = dev.matmul(-a, b)
        st = dev.read_stats(clear=True)
        both = np.concatenate([y1.ravel(), y2.ravel()])
        assert st["count"] == both.size and st["n_nonfinite"] == 0
        assert st["min"] == both.min() and st["max"] == both.max()
        assert dev.read_stats()["count"] == 0
        dev.matmul(a, b)
        dev.reset()
        assert dev.read_stats()["count"] == 0


def test_nonfinite_named(url, rng):
    _emulate_only(url, "multi-tile shapes (invalid blocks over sim:// are checked frame by "
                       "frame in test_accelerator_top and by test_nonfinite_small)")
    x = _rand(rng, (40, 40))
    x[21, 37] = np.nan
    with _open(url) as dev:
        with pytest.raises(NonFiniteBlockError, match=r"tensor 'a' holds NaN or Inf in block "
                                                      r"\(1, 2\)") as ei:
            dev.matmul(x, _rand(rng, (40, 8)))
        assert ei.value.block_index == (1, 2) and ei.value.tensor == "a"
        with pytest.raises(NonFiniteBlockError, match=r"tensor 'w'"):
            dev.train_step(_rand(rng, (8, 40)), x, _rand(rng, (8, 40)))
        big = _rand(rng, (100, 100))
        big[90, 5] = np.inf
        with pytest.raises(NonFiniteBlockError, match=r"block \(5, 0\)"):
            dev.quantize(big, name="big")
        q = dev.quantize(big, nonfinite="flag")
        assert q.equal(quantize(big, HBFP8, nonfinite="flag"))
        y = dev.matmul(x, _rand(rng, (40, 8)), nonfinite="flag")
        ref = bfp_matmul(quantize(x, HBFP8, nonfinite="flag"),
                         quantize(_rand(np.random.default_rng(0), (40, 8)), HBFP8))
        assert np.isnan(y[16:32]).all() and not np.isnan(y[:16]).any()
        assert np.isnan(ref[16:32]).all()


@SIM_IN_SWEEP
def test_nonfinite_small(url, rng):
    """NaN/Inf blocks flagged by the device's quantizer: named, or computed as NaN."""
    x = _rand(rng, (20, 12))
    x[17, 3] = np.inf
    w = _rand(rng, (12, 5))
    with _open(url) as dev:
        with pytest.raises(NonFiniteBlockError, match=r"tensor 'a' holds NaN or Inf in block "
                                                      r"\(1, 0\)") as ei:
            dev.matmul(x, w)
        assert ei.value.block_index == (1, 0)
        y = dev.matmul(x, w, nonfinite="flag")
    ref = bfp_matmul(quantize(x, HBFP8, nonfinite="flag"), quantize(w, HBFP8))
    assert np.isnan(y[16:]).all() and not np.isnan(y[:16]).any()
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))


def test_bad_input_errors(url, rng):
    with _open(url) as dev:
        with pytest.raises(TypeError, match="dtype complex64"):
            dev.matmul(np.ones((4, 4), np.complex64), np.ones((4, 4)))
        with pytest.raises(TypeError, match="dtype <U1"):
            dev.quantize(np.array([["a"]]))
        with pytest.raises(ValueError, match=r"shape mismatch: a is \(4, 5\), b is \(4, 5\)"):
            dev.matmul(np.ones((4, 5)), np.ones((4, 5)))
        with pytest.raises(ValueError, match=r"must be 2-D, got shape \(3,\)"):
            dev.matmul(np.ones(3), np.ones((3, 1)))
        with pytest.raises(ValueError, match=r"shape mismatch: x"):
            dev.train_step(np.ones((4, 5)), np.ones((3, 5)), np.ones((4, 4)))
        if url != "sim://":  # the driver quantizes both operands (128 QUANTIZEs, 170 kB)
            # before it checks k_max: ~8 min in the simulator
            with pytest.raises(ValueError, match=r"K=4096 exceeds the device's k_max=2048"):
                dev.matmul(np.ones((1, 4096)), np.ones((4096, 1)))
        with pytest.raises(ValueError, match=r"K=4096 exceeds the device's k_max=2048"):
            dev.matmul_q(quantize(np.ones((1, 4096)), HBFP8),
                         quantize(np.ones((4096, 1)), HBFP8))
        with pytest.raises(TypeError, match="must be a BFPTensor"):
            dev.matmul_q(np.ones((2, 2)), np.ones((2, 2)))
        with pytest.raises(host.FormatMismatchError, match="does not implement format"):
            dev.quantize(np.ones((4, 4)), HBFP8.replace(man_bits=6))
        with pytest.raises(host.FormatMismatchError, match="matches no device format slot"):
            q6 = quantize(np.ones((16, 16)), HBFP8.replace(man_bits=6))
            dev.matmul_q(q6, q6)
        with pytest.raises(ValueError, match="nonfinite='x'"):
            dev.quantize(np.ones((2, 2)), nonfinite="x")


def test_manifest_mismatch_is_reported(url, tmp_path):
    _emulate_only(url, "opens two more devices (INFO vs manifest is host logic; the RTL's "
                       "INFO hash is checked by test_info_matches_config)")
    good = write_manifest(tmp_path / "good.json", kind="accelerator", top="hbfp_top",
                          config=SMALL.to_dict(), ports={}, extra=P.manifest_extra(SMALL))
    with host.open(url, manifest=good) as dev:
        assert dev.config == SMALL
    other = SMALL.replace(k_max=1024)
    bad = write_manifest(tmp_path / "other.json", kind="accelerator", top="hbfp_top",
                         config=other.to_dict(), ports={}, extra=P.manifest_extra(other))
    with pytest.raises(host.ConfigMismatchError, match=r"k_max \(expected 1024, device 2048\)"):
        host.open(url, config=SMALL, manifest=bad)


def test_urls_errors():
    with pytest.raises(ValueError, match="accepted schemes are emulate://, sim://, serial://"):
        host.open("tcp://localhost")
    with pytest.raises(host.TransportError, match=r"cannot open serial port "
                                                  r"'/dev/does-not-exist-hbfp'"):
        host.open("serial:///dev/does-not-exist-hbfp?baud=3000000")
    with pytest.raises(ValueError, match="baud='fast' is not an integer"):
        host.open("serial:///dev/ttyUSB0?baud=fast")
    try:
        import hbfp_hw.gateware.sim_device as top  # noqa: F401
        has_sim = hasattr(top, "sim_transport")
    except ModuleNotFoundError:
        has_sim = False
    if not has_sim:
        with pytest.raises(RuntimeError, match=r"sim:// needs"):
            host.open("sim://")


def test_serial_transport_through_pyserial_loop():
    """The serial path end to end over pyserial's loop:// (echo): INFO times out cleanly."""
    t = host.SerialTransport("loop://", 3_000_000)
    with pytest.raises(host.LinkError, match="no valid answer after 2 retries"):
        host.Device(t, timeout=0.01, retries=2)
    t.close()


@contextlib.contextmanager
def _pty_board(config: AcceleratorConfig):
    """A stand-in board on a pseudo-terminal: the golden device model answers on the
    master side, the host opens the slave as a serial port (``serial:///dev/pts/N``)."""
    import os
    import select
    import threading
    import tty

    from hbfp_hw.host.emulator import Emulator

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    emu, stop = Emulator(config), threading.Event()

    def serve():
        while not stop.is_set():
            r, _, _ = select.select([master], [], [], 0.02)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                out = emu.feed(data)
                while out:
                    out = out[os.write(master, out):]

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        yield path
    finally:
        stop.set()
        th.join(1.0)
        os.close(master)
        os.close(slave)


def test_serial_url_through_a_pty_board(rng):
    """serial:// end to end through pyserial on a real tty (a pty pair; the device model
    answers on the master side): INFO checked against the manifest config, a tiled,
    K-split GEMM and a QUANTIZE, bit-identical to emulate://."""
    with _pty_board(SMALL) as path:
        dev = host.open(f"serial://{path}?baud=3000000", config=SMALL, timeout=2.0)
        ref = host.open("emulate://", config=SMALL)
        try:
            a = rng.standard_normal((40, 96)).astype(np.float32)
            b = rng.standard_normal((96, 24)).astype(np.float32)
            assert dev.info() == ref.info()
            y, y_ref = dev.matmul(a, b, HBFP8), ref.matmul(a, b, HBFP8)
            assert np.array_equal(y.view(np.uint32), y_ref.view(np.uint32))
            q, q_ref = dev.quantize(a, HBFP8), ref.quantize(a, HBFP8)
            assert np.array_equal(q.mantissas, q_ref.mantissas)
            assert np.array_equal(q.exponents, q_ref.exponents)
        finally:
            dev.close()
            ref.close()
        with pytest.raises(host.ConfigMismatchError):
            host.open(f"serial://{path}?baud=3000000",
                      config=SMALL.replace(k_max=1024), timeout=2.0)
