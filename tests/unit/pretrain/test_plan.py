"""The parallel plan: sizes, coordinates, the pipeline cut, and the start-up rules it owns."""

from __future__ import annotations

import pytest

from mesh_model.config import ConfigError
from pretrain.config import ParallelConfig, RunConfig, TrainConfig
from pretrain.parallel.plan import ParallelPlan
from pretrain.parallel.schedule import pipelines
from tests.support.models import tiny_model_config


def config(tensor=1, pipeline=1, zero_stage=1, micro=2, global_batch=16, split="1+2R2+1", **parallel):
    return RunConfig(
        model=tiny_model_config(layer_split=split),
        parallel=ParallelConfig(tensor=tensor, pipeline=pipeline, zero_stage=zero_stage, **parallel),
        train=TrainConfig(micro_batch_size=micro, global_batch_size=global_batch),
    )


def test_sizes_and_batch_split():
    plan = ParallelPlan.build(config(tensor=2, pipeline=2), world_size=8)
    assert (plan.tensor, plan.pipeline, plan.data) == (2, 2, 2)
    assert plan.grad_accum == 16 // (2 * 2) and plan.engine_accumulation == 1  # the schedule accumulates
    assert ParallelPlan.build(config(), world_size=2).engine_accumulation == 4
    assert plan.sizes() == {"tensor": 2, "pipeline": 2, "data": 2, "zero_stage": 1}
    assert "TP 2 x PP 2 x DP 2" in plan.describe()


def test_coordinates_follow_megatron_rank_order():
    """tp fastest, then dp, then pp (megatron-core's tp-cp-ep-dp-pp); every (tp, pp, dp) once."""
    plan = ParallelPlan.build(config(tensor=2, pipeline=2), world_size=8)
    coords = [(p.tp_rank, p.pp_rank, p.dp_rank) for p in (plan.for_rank(r) for r in range(8))]
    assert coords[:4] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    assert coords[4] == (0, 1, 0)
    assert len(set(coords)) == 8
    # Each pipeline lists one rank per stage, stage 0 first, and the pipelines cover the world.
    lines = pipelines(plan)
    assert sorted(r for line in lines for r in line) == list(range(8))
    for line in lines:
        assert [plan.for_rank(r).pp_rank for r in line] == [0, 1]


def test_pipeline_cut_boundaries_and_replicated_core_layers():
    # 1+2R2+1: prelude.0 | core.0 core.1 (loop 0) | core.0 core.1 (loop 1) | coda.0  -> 6 layers, 2 stages
    plan = ParallelPlan.build(config(pipeline=2), world_size=2)
    cut = plan.cut
    layers = [[str(op) for op in cut.stage_ops(s) if op.kind == "layer"] for s in range(2)]
    assert layers == [["prelude.0", "core.0@0", "core.1@0"], ["core.0@1", "core.1@1", "coda.0"]]
    assert cut.send_fields(0) == cut.recv_fields(1) and "buffer" in cut.send_fields(0)
    assert cut.recv_fields(0) == [] and cut.send_fields(1) == []
    holders = cut.core_holders()
    assert holders == {0: (0, 1), 1: (0, 1)}  # each core layer runs on both stages: replicas
    assert cut.replicated_stage_sets() == [(0, 1)]
    view = plan.for_rank(1).model_parallelism
    assert view.pipeline_rank == 1 and view.cut is cut and view.tensor == 1


def test_the_plan_owns_the_layout_rules():
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel.tensor \(2\)"):
        ParallelPlan.build(config(tensor=2), world_size=3)
    with pytest.raises(ConfigError, match="parallel.pipeline_layout"):
        ParallelPlan.build(config(pipeline=2, pipeline_layout=[5, 2]), world_size=2)
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size x data-parallel size = 2 x 3"):
        ParallelPlan.build(config(global_batch=16), world_size=3)
    with pytest.raises(ConfigError, match="rank 4 is outside the world of 4"):
        ParallelPlan.build(config(), world_size=4, rank=4)
