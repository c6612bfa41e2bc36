"""The memory estimate against what the real code holds: saved-for-backward bytes of real models
(every variant family, with and without recompute, fp32 and bf16, whole and cut into pipeline
stages) within 10%, parameters per stage exactly, and model state against the real DeepSpeed
engine; and the big configs' declared layouts fit 80 GB."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mesh_model.model import ModelParallelism, build_model
from mesh_model.params import count_parameters
from pretrain.config import load_config
from pretrain.memory_estimate import GIB, estimate_memory
from pretrain.memory_measure import (live_storages, measure_engine, record_reduction_buckets,
                                     stage_activation_bytes)

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "demo.yaml"
TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64", "train.micro_batch_size=4",
        "train.global_batch_size=16", "train.device=cpu"]
BF16 = ["train.bf16=true", "parallel.zero_stage=1"]


@pytest.mark.parametrize("overrides", [
    ["model.variant=vanilla", "model.layer_split=6"],
    ["model.variant=base"],
    ["model.variant=mesh"],
    ["model.variant=mesh", "model.recompute=[core]"],
    ["model.variant=base", "model.recompute=[prelude,core,coda]"],
    ["model.variant=mesh", *BF16],
    ["model.variant=vanilla", "model.layer_split=6", "model.recompute=[prelude]", *BF16],
    ["model.variant=residual+anchor"],
    ["model.variant=dynamic_combination", "model.recompute=[core@1]"],
], ids=lambda o: ",".join(x.split("=")[1] for x in o if not x.startswith(("train.", "parallel."))) + ("-bf16" if BF16[0] in o else ""))
def test_activation_estimate_matches_saved_tensor_bytes(model_parallel, overrides):
    config = load_config(DEMO, TINY + overrides)
    estimated = estimate_memory(config, 1).worst.activation_bytes_per_microbatch
    measured = stage_activation_bytes(config)
    assert estimated == pytest.approx(measured, rel=0.10), (estimated, measured)


def test_recompute_estimates_bracket_the_configured_one(model_parallel):
    stage = estimate_memory(load_config(DEMO, TINY + ["model.recompute=[core]"]), 1).worst
    assert stage.activation_bytes_full_recompute < stage.activation_bytes_per_microbatch < stage.activation_bytes_no_recompute
    # The configured estimate is what a model without the setting and one with it measure.
    plain = stage_activation_bytes(load_config(DEMO, TINY))
    assert stage.activation_bytes_no_recompute == pytest.approx(plain, rel=0.10)


@pytest.mark.parametrize("overrides", [
    ["parallel.pipeline=2"],
    ["parallel.pipeline=2", "model.variant=base"],
    ["parallel.pipeline=3", "model.layer_split=1+2R3+1", "model.num_layers=8"],
])
def test_every_pipeline_stage_parameters_exactly_and_activations_within_10_percent(model_parallel, overrides):
    config = load_config(DEMO, TINY + overrides)
    estimate = estimate_memory(config, config.parallel.pipeline)
    for stage in estimate.stages:
        built = build_model(config.model, ModelParallelism.stage(config.model, config.parallel.pipeline, stage.stage),
                            use_transformer_engine=False)
        assert stage.parameters == count_parameters(built).total
        measured = stage_activation_bytes(config, stage.stage)
        assert stage.activation_bytes_per_microbatch == pytest.approx(measured, rel=0.10), (stage.stage, measured)
    # 1F1B: the first stage holds one micro-batch per stage in flight, the last one.
    assert [s.in_flight for s in estimate.stages] == list(range(config.parallel.pipeline, 0, -1))


@pytest.mark.parametrize("zero, bf16", [(0, False), (1, True), (3, True)])
def test_model_state_matches_the_deepspeed_engine(single_process_env, zero, bf16):
    """Parameters, gradients, fp32 master weights, Adam moments and DeepSpeed's own buffers: every
    live tensor's bytes after a backward pass (after a first step, so Adam's state exists)."""
    from pretrain.parallel.distributed import destroy_distributed, init_distributed
    from pretrain.parallel.plan import ParallelPlan

    config = load_config(DEMO, TINY + [f"parallel.zero_stage={zero}", f"train.bf16={bf16}",
                                       "train.micro_batch_size=2", "train.global_batch_size=2", "model.seq_length=32"])
    plan = ParallelPlan.build(config, 1)
    ctx = init_distributed(plan, seed=1234)
    try:
        measured = measure_engine(config, plan, ctx.groups).model_state
    finally:
        destroy_distributed()
    estimate = estimate_memory(config, 1).worst
    assert estimate.model_state_bytes == pytest.approx(measured, rel=0.01), (estimate.model_state_bytes, measured)


def test_zero1_reduction_bucket_is_at_most_the_ranks_gradients(single_process_env):
    """DeepSpeed allocates its whole reduction bucket at every ZeRO-1/2 backward; capped at the
    rank's parameters it is 4 P bytes here (fp32), not DeepSpeed's default 2e9, it is released
    by the end of the backward, and the estimate's transient holds it."""
    from pretrain.engine import build_engine
    from pretrain.parallel.distributed import destroy_distributed, init_distributed
    from pretrain.parallel.plan import ParallelPlan

    config = load_config(DEMO, TINY + ["parallel.zero_stage=1", "train.micro_batch_size=2",
                                       "train.global_batch_size=2", "model.seq_length=32"])
    plan = ParallelPlan.build(config, 1)
    ctx = init_distributed(plan, seed=1234)
    try:
        model = build_model(config.model, plan.model_parallelism)
        engine, _ = build_engine(model, plan=plan, groups=ctx.groups, optim=config.optim, total_steps=2, bf16=False)
        buckets = record_reduction_buckets(engine.optimizer)
        tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(32).unsqueeze(0).expand(2, -1)
        engine.backward(engine(tokens, positions, None, labels=tokens).mean())
        parameters = sum(p.numel() for p in model.parameters())
        assert [nbytes for _, nbytes in buckets] == [4 * parameters]
        assert not buckets & live_storages().keys()
        del engine, model
    finally:
        destroy_distributed()
    estimate = estimate_memory(config, 1).worst
    assert estimate.parameters == parameters and estimate.transient_bytes >= 4 * parameters


@pytest.mark.parametrize("path, world", [("configs/pythia-6.9b/mesh.yaml", 32), ("configs/pythia-12b/mesh.yaml", 32),
                                         ("configs/pythia-6.9b/mesh.yaml", 8), ("configs/pythia-12b/mesh.yaml", 16)])
def test_big_configs_fit_80_gb_at_their_declared_layout(path, world):
    config = load_config(REPO / path)
    estimate = estimate_memory(config, world)
    assert estimate.fits(80e9) and not estimate.fits(estimate.total_bytes - 1)
    worst = estimate.worst
    assert 8 * GIB < estimate.total_bytes < 40 * GIB  # a multi-billion model: neither trivial nor absurd
    assert worst.parameters * config.parallel.tensor > 3e9
    table = estimate.describe()
    for row in ("parameters", "gradients", "optimizer", "activations", "no recompute", "total"):
        assert row in table
    assert f"TP {config.parallel.tensor} x PP 1 x DP {world // config.parallel.tensor}" in table


def test_layout_errors_are_the_plans_one_line_errors():
    from mesh_model.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by parallel.tensor"):
        estimate_memory(load_config(REPO / "configs/pythia-12b/mesh.yaml"), 12)
