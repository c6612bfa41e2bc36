"""Distributed/engine infrastructure of pretrain/: CPU shim, init/destroy, DeepSpeed engine.

Single process (world size 1), on the CPU when there is no GPU (the GPU path of
these tests is written but was not run). The first DeepSpeed engine of a machine
JIT-builds DeepSpeed's shm communication op (~30-50 s, cached afterwards under
TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.distributed import check_parallel_sizes, destroy_distributed, init_distributed
from pretrain.engine import MegatronMPU, build_engine, default_no_decay, lr_at_step, param_groups

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# The tiny model of the equivalence test.
HIDDEN, LAYERS, HEADS, SEQ, VOCAB = 64, 2, 4, 32, 128
MICRO_BATCH, GRAD_ACCUM, STEPS = 2, 2, 4
OPTIM = dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=STEPS)
GRAD_CLIP = 0.5  # below the tiny model's gradient norm (~1.7-2.4): clipping is active every step


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables: init_distributed must fill in a world of one."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
def dist_ctx(single_process_env):
    ctx = init_distributed(tensor_parallel=1, pipeline_parallel=1, seed=1234)
    try:
        yield ctx
    finally:
        destroy_distributed()


# ---------------------------------------------------------------- validation
def test_indivisible_world_size_is_a_one_line_value_error():
    assert check_parallel_sizes(8, 2, 2) == 2
    assert check_parallel_sizes(1, 1, 1) == 1
    with pytest.raises(ValueError) as err:
        check_parallel_sizes(6, 4, 1)
    message = str(err.value)
    assert "\n" not in message
    assert "world size 6" in message
    assert "parallel.tensor (4)" in message and "parallel.pipeline (1)" in message
    with pytest.raises(ValueError, match=r"parallel.tensor \(2\) x parallel.pipeline \(2\)"):
        check_parallel_sizes(6, 2, 2)
    with pytest.raises(ValueError, match="positive"):
        check_parallel_sizes(4, 0, 1)


def test_init_rejects_bad_layout_before_initialising_anything(single_process_env):
    import torch.distributed as dist
    from megatron.core import parallel_state

    with pytest.raises(ValueError, match=r"world size 1 is not divisible by parallel.tensor \(2\)"):
        init_distributed(tensor_parallel=2, pipeline_parallel=1, seed=0)
    assert not dist.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    assert not any(name in os.environ for name in LAUNCH_VARS)  # defaults rolled back


# ---------------------------------------------------------------- init / destroy
def test_init_destroy_single_process_repeatedly(single_process_env):
    import torch.distributed as dist
    from megatron.core import parallel_state

    for _ in range(2):
        ctx = init_distributed(tensor_parallel=1, pipeline_parallel=1, seed=7)
        try:
            assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.data_parallel_size) == (0, 1, 0, 1)
            assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
            if not torch.cuda.is_available():
                assert ctx.device == torch.device("cpu") and ctx.backend == "gloo"
                assert os.environ["DS_ACCELERATOR"] == "cpu"
            assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
            with pytest.raises(RuntimeError, match="already initialised"):
                init_distributed(tensor_parallel=1, pipeline_parallel=1, seed=7)
            first = torch.rand(3)
        finally:
            destroy_distributed()
        assert not dist.is_initialized()
        assert not parallel_state.model_parallel_is_initialized()
        assert not any(name in os.environ for name in LAUNCH_VARS)
    destroy_distributed()  # harmless when nothing is initialised
    # Seeding is deterministic: the same seed gives the same default stream.
    ctx = init_distributed(tensor_parallel=1, pipeline_parallel=1, seed=7)
    try:
        assert torch.equal(torch.rand(3), first)
    finally:
        destroy_distributed()


def test_mpu_adapter_over_parallel_state(dist_ctx):
    mpu = MegatronMPU()
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
def test_cpu_shim_not_applied_with_a_gpu():
    """In a fresh interpreter that believes it has a GPU, the shim patches nothing."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed,"
        " torch.cuda.get_rng_state)\n"
        "from pretrain.cpu_shim import apply_cpu_shim, is_cpu_shim_applied\n"
        "assert apply_cpu_shim() is False and apply_cpu_shim() is False\n"
        "assert not is_cpu_shim_applied()\n"
        "assert originals == (torch.cuda.current_device, torch.cuda.synchronize,"
        " torch.cuda.manual_seed, torch.cuda.get_rng_state)\n"
        "assert torch._C._len_torch_function_stack() == 0\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without a GPU")
def test_cpu_shim_applies_once_and_maps_cuda_to_cpu():
    import logging

    from megatron.core.tensor_parallel import random as mcore_random

    from pretrain.cpu_shim import apply_cpu_shim, is_cpu_shim_applied

    assert apply_cpu_shim() is True and is_cpu_shim_applied()
    patched = (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        torch.cuda.manual_seed,
        torch.cuda.get_rng_state,
        mcore_random._get_cuda_rng_state,
        mcore_random._set_cuda_rng_state,
    )
    modes = torch._C._len_torch_function_stack()
    filters = len(logging.getLogger(mcore_random.__name__).filters)
    assert apply_cpu_shim() is True  # idempotent: nothing is re-patched or stacked
    assert patched == (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        torch.cuda.manual_seed,
        torch.cuda.get_rng_state,
        mcore_random._get_cuda_rng_state,
        mcore_random._set_cuda_rng_state,
    )
    assert torch._C._len_torch_function_stack() == modes >= 1
    assert len(logging.getLogger(mcore_random.__name__).filters) == filters

    assert torch.ones(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.zeros(2).cuda().device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without a GPU")
def test_cuda_literal_mapping_can_be_suspended():
    """The trainer's non-pipelined step runs without the per-call device mapping (it costs
    ~7% of a small CPU step); inside, a literal CUDA device fails loudly, and the mapping
    is back afterwards, also after an exception. The other patches stay in effect."""
    from pretrain.cpu_shim import apply_cpu_shim, cuda_literals_unmapped

    apply_cpu_shim()
    modes = torch._C._len_torch_function_stack()
    with cuda_literals_unmapped():
        assert torch._C._len_torch_function_stack() == modes - 1
        assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
        with pytest.raises((AssertionError, RuntimeError)):
            torch.ones(2, device="cuda")
    with pytest.raises(ValueError):
        with cuda_literals_unmapped():
            raise ValueError("inside")
    assert torch._C._len_torch_function_stack() == modes
    assert torch.ones(2, device="cuda").device.type == "cpu"


def _device() -> torch.device:
    # The CPU when there is no GPU; init_distributed(device="auto") picks the same.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _tiny_gpt(**config_overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    values = dict(
        # The local spec's attention. (megatron exports NVTE_*_ATTN for the chosen
        # backend and asserts on a mismatch, so tests in one process must agree.)
        attention_backend=AttnBackend.local,
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    values.update(config_overrides)
    model = GPTModel(
        TransformerConfig(**values), get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ
    )
    return model.to(_device())


def _batch(seed: int, batch: int = MICRO_BATCH):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    return tokens.to(_device()), positions.to(_device()), labels.to(_device())


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

    tokens, positions, labels = _batch(0)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(99)
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        model = _tiny_gpt(hidden_dropout=0.1, attention_dropout=0.1, **(extra if recompute else {}))
        model.train()
        model(tokens, positions, None, labels=labels).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


# ---------------------------------------------------------------- LR schedule
def test_lr_schedule_warmup_then_cosine_to_min_lr():
    peak, floor, total = 3e-4, 3e-5, 1000  # the paper: 1% warmup, decay to 10% of peak
    warmup = total // 100
    lrs = [lr_at_step(s, lr=peak, min_lr=floor, warmup_steps=warmup, total_steps=total) for s in range(total)]
    # Linear warmup: the first update is already non-zero, update `warmup` is the peak.
    for s in range(warmup):
        assert lrs[s] == pytest.approx(peak * (s + 1) / warmup, rel=1e-12)
    assert lrs[warmup - 1] == pytest.approx(peak)
    # Cosine: strictly decreasing, half-way at the midpoint, exactly min_lr at the last update.
    decay = lrs[warmup - 1 :]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    mid = warmup - 1 + (total - warmup) // 2
    assert lrs[mid] == pytest.approx((peak + floor) / 2, rel=1e-9)
    assert lrs[-1] == pytest.approx(floor, rel=1e-12)
    # Past the end it stays at the floor.
    assert lr_at_step(total + 50, lr=peak, min_lr=floor, warmup_steps=warmup, total_steps=total) == pytest.approx(floor)
    # The formula at one point of the decay.
    s = 700
    progress = (s + 1 - warmup) / (total - warmup)
    assert lrs[s] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    # No warmup: starts at the peak.
    assert lr_at_step(0, lr=peak, min_lr=floor, warmup_steps=0, total_steps=total) == pytest.approx(peak, rel=1e-5)


def test_weight_decay_groups_exempt_biases_and_norms(dist_ctx):
    model = _tiny_gpt()
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "embedding.word_embeddings.weight" in decayed
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in decayed
    assert "decoder.layers.0.input_layernorm.weight" in exempt
    assert "decoder.final_layernorm.bias" in exempt
    assert "decoder.layers.0.mlp.linear_fc1.bias" in exempt
    assert all(default_no_decay(n, p) == (n in exempt) for n, p in model.named_parameters())
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


# ---------------------------------------------------------------- engine vs plain PyTorch
def _reference_training(model, batches):
    """Plain PyTorch: AdamW with the same groups and schedule, mean loss over micro-batches."""
    optimizer = torch.optim.AdamW(
        param_groups(model, OPTIM["weight_decay"]), lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"]
    )
    losses, norms = [], []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step, **SCHEDULE)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(GRAD_ACCUM):
            tokens, positions, labels = batches[step][micro]
            loss = model(tokens, positions, None, labels=labels).mean()
            (loss / GRAD_ACCUM).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
        optimizer.step()
        losses.append(total / GRAD_ACCUM)
    return losses, norms


def _engine_training(engine, batches):
    losses, norms, lrs = [], [], []
    for step in range(STEPS):
        lrs.append(engine.get_lr()[0])  # the LR this optimizer step will use
        total = 0.0
        for micro in range(GRAD_ACCUM):
            tokens, positions, labels = batches[step][micro]
            loss = engine(tokens, positions, None, labels=labels).mean()
            engine.backward(loss)  # DeepSpeed divides by GRAD_ACCUM
            engine.step()  # optimizer only at the accumulation boundary
            total += loss.item()
        losses.append(total / GRAD_ACCUM)
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms, lrs


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_engine_matches_plain_pytorch_adamw(dist_ctx, zero_stage):
    model = _tiny_gpt()
    # GPTModel holds process groups, which copy.deepcopy cannot copy: a second
    # instance gets a deep copy of the first one's weights instead.
    reference = _tiny_gpt()
    reference.load_state_dict(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    batches = [[_batch(100 * step + micro) for micro in range(GRAD_ACCUM)] for step in range(STEPS)]

    engine, scheduler = build_engine(
        model,
        **OPTIM,
        warmup_steps=SCHEDULE["warmup_steps"],
        total_steps=STEPS,
        grad_clip=GRAD_CLIP,
        micro_batch_size=MICRO_BATCH,
        grad_accum_steps=GRAD_ACCUM,
        zero_stage=zero_stage,
        bf16=False,
    )
    assert engine.gradient_accumulation_steps() == GRAD_ACCUM
    ds_losses, ds_norms, ds_lrs = _engine_training(engine, batches)
    ref_losses, ref_norms = _reference_training(reference, batches)

    assert min(ref_norms) > GRAD_CLIP  # clipping was active in every step
    assert ds_lrs == pytest.approx([lr_at_step(s, **SCHEDULE) for s in range(STEPS)], rel=1e-12)
    assert scheduler.get_last_lr()[0] == pytest.approx(SCHEDULE["min_lr"])  # stepped once per optimizer step
    assert ds_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ds_norms == pytest.approx(ref_norms, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    trained = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    expected = torch.cat([q.detach().flatten() for q in reference.parameters()])
    assert ((trained - expected).norm() / expected.norm()).item() < 1e-5
    # Element-wise: 1e-5 relative, plus an absolute floor of 1e-6 (0.1% of one
    # update at lr=1e-3) for the attention key biases. Softmax is invariant to
    # them, so their gradient is pure round-off and Adam turns it into values of
    # ~5e-7 that differ between any two float implementations (measured: up to
    # 2.5e-7 apart here; every other parameter agrees to ~1e-7 relative).
    for (name, p), (_, q) in zip(engine.module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_build_engine_rejects_bf16_without_zero(dist_ctx):
    with pytest.raises(ValueError, match="bf16 needs zero_stage >= 1"):
        build_engine(
            _tiny_gpt(),
            **OPTIM,
            warmup_steps=1,
            total_steps=2,
            grad_clip=1.0,
            micro_batch_size=1,
            grad_accum_steps=1,
            zero_stage=0,
            bf16=True,
        )
