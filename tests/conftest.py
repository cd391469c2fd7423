"""Shared pytest fixtures: seeded RNGs whose seed is printed (and shown on failure)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from hbfp_hw.sim.runner import setup_verilator_env

setup_verilator_env()


def _seed_for(request) -> int:
    env = os.environ.get("HBFP_SEED")
    if env is not None:
        return int(env)
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def seed(request) -> int:
    """A per-test seed (stable per test id; override with HBFP_SEED=N)."""
    s = _seed_for(request)
    print(f"[seed] {request.node.nodeid}: HBFP_SEED={s}")
    return s


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """``np.random.default_rng(seed)``; the seed is printed so failures can be replayed."""
    return np.random.default_rng(seed)
