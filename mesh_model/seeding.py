"""Per-module initialisation seeds, so initial weights do not depend on the parallel layout."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded(init_seed: int, key: int):
    """Initialise one module from its own seed, leaving the global RNG as it was.

    Keys: layer number (>= 1) for layers, -1 the embedding, -2 the output head,
    -(1000 + step) the MeSH routers of one step.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed * 100_003 + key)
        yield
