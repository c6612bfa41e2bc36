"""Process groups and megatron-core parallel state for one process: init / destroy, the
DeepSpeed mpu adapter, RNG seeding and activation recompute under the CPU shim.

Single process (world size 1), on the CPU when there is no GPU (the GPU path of
these tests is written but was not run).
"""

from __future__ import annotations

import os

import pytest
import torch

from pretrain.parallel.distributed import MegatronMPU, destroy_distributed, init_distributed
from pretrain.parallel.plan import data_parallel_size
from tests.support.models import gpt_batch, tiny_gpt
from tests.unit.pretrain.conftest import LAUNCH_VARS, plan


# ---------------------------------------------------------------- validation
def test_indivisible_world_size_is_a_one_line_value_error():
    assert data_parallel_size(8, 2, 2) == 2
    assert data_parallel_size(1, 1, 1) == 1
    with pytest.raises(ValueError) as err:
        data_parallel_size(6, 4, 1)
    message = str(err.value)
    assert "\n" not in message
    assert "world size 6" in message
    assert "parallel.tensor (4)" in message and "parallel.pipeline (1)" in message
    with pytest.raises(ValueError, match=r"parallel.tensor \(2\) x parallel.pipeline \(2\)"):
        data_parallel_size(6, 2, 2)
    with pytest.raises(ValueError, match="positive"):
        data_parallel_size(4, 0, 1)


def test_init_rejects_bad_layout_before_initialising_anything(single_process_env):
    import torch.distributed as dist
    from megatron.core import parallel_state

    with pytest.raises(ValueError, match=r"world size 1 is not divisible by parallel.tensor \(2\)"):
        init_distributed(plan(tensor=2), seed=0)
    assert not dist.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    assert not any(name in os.environ for name in LAUNCH_VARS)  # defaults rolled back


# ---------------------------------------------------------------- init / destroy
def test_init_destroy_single_process_repeatedly(single_process_env):
    import torch.distributed as dist
    from megatron.core import parallel_state

    for _ in range(2):
        ctx = init_distributed(plan(), seed=7)
        try:
            assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.data_parallel_size) == (0, 1, 0, 1)
            assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
            if not torch.cuda.is_available():
                assert ctx.device == torch.device("cpu") and ctx.backend == "gloo"
                assert os.environ["DS_ACCELERATOR"] == "cpu"
            assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
            with pytest.raises(RuntimeError, match="already initialised"):
                init_distributed(plan(), seed=7)
            first = torch.rand(3)
        finally:
            destroy_distributed()
        assert not dist.is_initialized()
        assert not parallel_state.model_parallel_is_initialized()
        assert not any(name in os.environ for name in LAUNCH_VARS)
    destroy_distributed()  # harmless when nothing is initialised
    # Seeding is deterministic: the same seed gives the same default stream.
    ctx = init_distributed(plan(), seed=7)
    try:
        assert torch.equal(torch.rand(3), first)
    finally:
        destroy_distributed()


def test_mpu_adapter_over_parallel_state(dist_ctx):
    mpu = MegatronMPU(dist_ctx.groups)
    # DeepSpeed ignores model parallelism for an mpu that has this.
    assert not hasattr(mpu, "initialize_sequence_parallel")
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_model_parallel_rank() == 0
    assert mpu.get_data_parallel_world_size() == 1 and mpu.get_data_parallel_rank() == 0
    assert mpu.get_data_parallel_group_ranks() == [0]
    assert mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_tensor_model_parallel_src_rank() == 0
    assert mpu.get_pipeline_model_parallel_world_size() == 1
    assert mpu.get_pipeline_model_parallel_rank() == 0


# ---------------------------------------------------------------- CPU shim


def test_model_parallel_rng_tracker_is_seeded(dist_ctx):
    from megatron.core import tensor_parallel

    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    # Each tracker has its own stream; data-parallel gets the plain seed.
    assert not torch.equal(states["data-parallel-rng"], states["model-parallel-rng"])
    if not torch.cuda.is_available():  # the shim backs the trackers by the CPU generator
        assert torch.equal(states["data-parallel-rng"], torch.Generator().manual_seed(1234).get_state())


def test_activation_recompute_with_dropout_matches_plain_backward(dist_ctx):
    """tensor_parallel.checkpoint replays the RNG states (shim-backed) and runs its
    recompute inside backward, where the device mapping must still be active."""
    from megatron.core import tensor_parallel

    tokens, positions, labels = gpt_batch(0)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(99)
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        model = tiny_gpt(hidden_dropout=0.1, attention_dropout=0.1, **(extra if recompute else {}))
        model.train()
        model(tokens, positions, None, labels=labels).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


# ---------------------------------------------------------------- LR schedule
