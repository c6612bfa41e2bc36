"""Shared fixtures: a tiny debug model flavour and a world-size-1 megatron parallel state."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def model_parallel():
    """megatron-core parallel state at world size 1 (with the CPU shim when no GPU)."""
    from megatron.core import tensor_parallel

    from mesh_model.params import single_process_model_parallel
    from pretrain.compat import apply_cpu_shim

    apply_cpu_shim()
    with single_process_model_parallel():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        yield


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo corpus, tokenizer and shards, built once per session (about 15 s).

    MESH_TEST_DEMO_DATA=DIR reuses an existing `mesh data prepare-demo` output instead.
    """
    from pathlib import Path

    existing = os.environ.get("MESH_TEST_DEMO_DATA")
    if existing:
        return Path(existing)
    from data_prep.demo import prepare_demo

    out = tmp_path_factory.mktemp("demo-data")
    prepare_demo(out, progress=False)
    return out
