"""A converted model trains under torch.distributed DDP (gloo, 2 processes on localhost):
after N steps both ranks hold identical weights, and two runs are bit-identical."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hbfp_hw import HBFP4
    from hbfp_hw.host.torch import convert
    from hbfp_hw.host.train import load_digits_split

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)                       # the same initial weights on every rank
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        convert(model, HBFP4, grad_stochastic=True, seed=7)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        xtr, ytr, _, _ = load_digits_split()
        rng = np.random.default_rng(100 + rank)    # each rank its own shard of batches
        losses = []
        for _ in range(STEPS):
            idx = rng.choice(len(xtr), 32, replace=False)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(torch.from_numpy(xtr[idx])),
                                               torch.from_numpy(ytr[idx]))
            loss.backward()
            opt.step()
            losses.append(float(loss))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        np.savez(f"{out}_{rank}.npz", weights=flat, losses=np.array(losses))
        # tear down in order: the DDP reducer (it holds the process group's pending
        # work) before the group, and both ranks done before either destroys it; a rank
        # whose gloo threads outlive the group aborts now and then ("terminate called
        # without an active exception", SIGABRT)
        del ddp, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # results saved and the group destroyed: leave without running the C++ static
    # destructors, where gloo's threads still abort a rank now and then
    os._exit(0)


def _run(tmp_path, tag: str) -> list[dict]:
    import torch.multiprocessing as mp
    out = str(tmp_path / tag)
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [dict(np.load(f"{out}_{r}.npz")) for r in range(2)]


def test_ddp_two_ranks_identical_and_reproducible(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    a = _run(tmp_path, "a")
    # the ranks saw different batches, yet hold the same (all-reduced) weights
    assert not np.array_equal(a[0]["losses"], a[1]["losses"])
    assert np.array_equal(a[0]["weights"].view(np.uint32), a[1]["weights"].view(np.uint32))
    # and the weights moved from the initialisation
    torch.manual_seed(0)
    from torch import nn
    init = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    w0 = torch.cat([p.detach().reshape(-1) for p in init.parameters()]).numpy()
    assert np.abs(a[0]["weights"] - w0).max() > 1e-3
    b = _run(tmp_path, "b")
    for r in range(2):
        assert np.array_equal(a[r]["weights"].view(np.uint32), b[r]["weights"].view(np.uint32))
        assert np.array_equal(a[r]["losses"], b[r]["losses"])
