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
