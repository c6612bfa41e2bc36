"""Fixtures of the pretrain unit tests: a world of one process, and its parallel plan."""

from __future__ import annotations

import pytest

from pretrain.config import ParallelConfig, RunConfig, TrainConfig
from pretrain.parallel.distributed import destroy_distributed, init_distributed
from pretrain.parallel.plan import ParallelPlan

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MICRO_BATCH, GRAD_ACCUM = 2, 2


def plan(tensor: int = 1, pipeline: int = 1, world_size: int = 1, zero_stage: int = 1) -> ParallelPlan:
    """The parallel plan of a run at this layout, with micro-batches of 2 and 2 accumulation steps."""
    config = RunConfig(parallel=ParallelConfig(tensor=tensor, pipeline=pipeline, zero_stage=zero_stage),
                       train=TrainConfig(micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH * GRAD_ACCUM))
    return ParallelPlan.build(config, world_size)


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables: init_distributed must fill in a world of one."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
def dist_ctx(single_process_env):
    ctx = init_distributed(plan(), seed=1234)
    try:
        yield ctx
    finally:
        destroy_distributed()


