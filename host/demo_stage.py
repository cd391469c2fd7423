"""``make demo`` stage: the accelerator RTL (sim://) against the golden device (emulate://).

Generates the default accelerator (Verilog + manifest), quantizes two tensors on the
device (the RTL quantizer, nearest-even and stochastic), then runs a small HyperBlock GEMM
workload (forward, dX, dW of a linear layer from operands quantized once) through the
top in the Amaranth simulator and through the emulator, and prints bit-exactness,
simulated cycles, wall time, and the link-limited bound of the 3 Mbaud serial link.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run"]


def run(args=None) -> None:
    from hbfp_hw.config.accelerator import AcceleratorConfig
    from hbfp_hw.gateware.sim_device import SIM_CONFIG, SimTransport
    from hbfp_hw.gateware.top import generate
    from hbfp_hw.host.device import Device
    from hbfp_hw.host.emulator import Emulator
    from hbfp_hw.host.transport import LoopbackTransport
    from hbfp_hw.quantize import quantize

    print("\n== accelerator: generated RTL (sim://) vs golden device (emulate://) ==")
    out = Path(tempfile.mkdtemp(prefix="hbfp_accel_"))
    t0 = time.perf_counter()
    v, man = generate(AcceleratorConfig.default(), out)
    print(f"generated the default accelerator: {v} ({v.stat().st_size // 1024} KiB), "
          f"{man.name} in {time.perf_counter() - t0:.1f} s")

    cfg = SIM_CONFIG
    fmt = cfg.formats[0]
    print(f"sim:// configuration: {cfg.array_rows}x{cfg.array_cols} array, {fmt.name} "
          f"({cfg.tile}x{cfg.tile} tiles), clock {cfg.clock_hz / 1e6:.0f} MHz")
    rng = np.random.default_rng(2024)
    Bt, In, Ot = 16, 24, 16
    x = rng.standard_normal((Bt, In)).astype(np.float32)
    w = (rng.standard_normal((Ot, In)) * 0.1).astype(np.float32)
    dy = (rng.standard_normal((Bt, Ot)) * 1e-3).astype(np.float32)
    xq, wq, dyq = (quantize(t, fmt) for t in (x, w, dy))
    gemms = [("Y = X.W^T", xq, wq.T), ("dX = dY.W", dyq, wq), ("dW = dY^T.X", dyq.T, xq)]

    tr = SimTransport(cfg)
    t0 = time.perf_counter()
    sim = Device(tr, timeout=0.0, expected_config=cfg)
    emu = Device(LoopbackTransport(Emulator(cfg)), timeout=0.0, expected_config=cfg)
    print(f"opened both devices (INFO checked against the config): sim {tr.cycles} cycles, "
          f"{time.perf_counter() - t0:.1f} s")
    all_ok = True
    # QUANTIZE on the device: FP32 into fp_in, the RTL quantizer, BFP back
    for name, t, f in (("X", x, fmt), ("dY", dy, fmt.replace(rounding="stochastic", seed=99))):
        c0 = tr.cycles
        qs = sim.quantize(t, f)
        ok = qs.equal(emu.quantize(t, f)) and qs.equal(quantize(t, f))
        all_ok &= ok
        print(f"  quantize {name:3s} {t.shape} {f.rounding:13s} on the RTL quantizer: "
              f"bit-exact {'yes' if ok else 'NO'} ({tr.cycles - c0} cycles)")
    c0, w0, b0 = tr.cycles, tr.sim_seconds, sim.link["bytes_tx"] + sim.link["bytes_rx"]
    macs = 0
    for name, a, b in gemms:
        ys = sim.matmul_q(a, b)
        ye = emu.matmul_q(a, b)
        ok = np.array_equal(ys.view(np.uint32), ye.view(np.uint32))
        all_ok &= ok
        macs += a.shape[0] * a.shape[1] * b.shape[1]
        print(f"  {name:12s} {a.shape} x {b.shape}: bit-exact {'yes' if ok else 'NO'}")
    cyc = tr.cycles - c0
    wall = tr.sim_seconds - w0
    nbytes = sim.link["bytes_tx"] + sim.link["bytes_rx"] - b0
    st_s, st_e = sim.read_stats(), emu.read_stats()
    print(f"  READ_STATS identical: {'yes' if st_s == st_e else 'NO'} ({st_s})")
    print(f"workload: {macs} MACs, {nbytes} bytes on the link, {cyc} clock cycles "
          f"(byte port: 1 byte/clock) = {cyc / cfg.clock_hz * 1e6:.1f} us at "
          f"{cfg.clock_hz / 1e6:.0f} MHz -> {macs / (cyc / cfg.clock_hz) / 1e6:.1f} MMAC/s; "
          f"simulated in {wall:.1f} s ({cyc / max(wall, 1e-9):.0f} cycles/s)")
    rate = AcceleratorConfig.default().link_bytes_per_second
    t_link = nbytes / rate
    print(f"link-limited bound at {AcceleratorConfig.default().baud_rate / 1e6:.0f} Mbaud "
          f"8N1 ({rate / 1e3:.0f} kB/s): {t_link * 1e3:.2f} ms for these {nbytes} bytes -> "
          f"{macs / t_link / 1e6:.2f} MMAC/s (the serial link, not the array, bounds "
          f"small GEMMs)")
    print(f"sim:// vs emulate:// bit-exact: {'yes' if all_ok else 'NO'}")
    if not all_ok:
        raise SystemExit("sim:// and emulate:// disagree")
