"""DeepSpeed engine over a megatron-core model: optimizer, LR schedule, ZeRO, mpu adapter.

Everything here that depends on DeepSpeed 0.19.8 behaviour beyond its documented
``deepspeed.initialize`` API is marked ``DeepSpeed internals`` in a comment; this is
the only module of the pipeline that touches them.

Training-step contract (what :func:`build_engine` configures DeepSpeed for)::

    for micro_batch in the grad_accum_steps micro-batches of one optimizer step:
        loss = engine(...)  # mean loss of this micro-batch
        engine.backward(loss)  # DeepSpeed scales by 1 / grad_accum_steps
        engine.step()  # optimizer + LR scheduler only at the accumulation boundary

so the gradient of one optimizer step is the mean of the micro-batch gradients,
clipped to ``grad_clip`` (global L2 norm over the model-parallel group), followed
by AdamW with the LR of :func:`lr_at_step`.

Grad-norm caveat (DeepSpeed internals, read from 0.19.8's source): parameters
replicated across tensor-parallel ranks are counted once (checked: TP=2 gives
the single-process norm at ZeRO 0-3, tests/test_dist_equivalence.py). At ZeRO 3
DeepSpeed decides "replicated, count here" by the TP x PP rank, so with
pipeline parallelism the non-tensor-parallel parameters of later stages would
be left out of the norm; ZeRO 1/2 use the TP rank, and so does the ZeRO-0
clipping this module installs (:func:`_record_zero0_grad_norm`), which
also skips non-finite steps as ZeRO 1-3 do.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = [
    "MegatronMPU",
    "build_engine",
    "default_no_decay",
    "deepspeed_config",
    "lr_at_step",
    "param_groups",
    "release_deepspeed_groups",
]

# DeepSpeed prints a throughput/LR line every `steps_per_print` optimizer steps.
_NEVER = 2**62


# --------------------------------------------------------------------------- mpu
class MegatronMPU:
    """DeepSpeed's ``mpu=`` view of megatron-core's ``parallel_state``.

    DeepSpeed's "model parallel" group is everything that is not data parallel:
    the TP x PP group. megatron-core has ``get_model_parallel_group`` but no rank /
    world-size functions for it, so it cannot be passed to DeepSpeed directly.

    Deliberately NOT defined: ``initialize_sequence_parallel`` (DeepSpeed 0.19.8
    treats an mpu that has it as a Ulysses sequence-parallel unit and then ignores
    model parallelism entirely: the data-parallel group becomes None and the grad
    norm is no longer reduced over TP) and the ``get_sequence_parallel_*``
    functions (megatron's sequence parallelism is a TP detail; DeepSpeed's is a
    data-sharding dimension, which we do not use).
    """

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    # TP x PP ("model parallel" in DeepSpeed's vocabulary)
    def get_model_parallel_group(self):
        return self._ps().get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    # data parallel
    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps().get_pipeline_model_parallel_rank()


# --------------------------------------------------------------- param groups
def default_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """The weight-decay rule: True means *no* weight decay.

    Parameters with fewer than two dimensions are exempt: biases and the
    weights/biases of LayerNorm/RMSNorm (and any other per-channel scale or
    gate vector). So is anything whose name ends in ``.bias``. Matrices
    (linear layers, embeddings, the output layer) are decayed.
    """
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    no_decay_filter: Callable[[str, torch.nn.Parameter], bool] = default_no_decay,
) -> list[dict]:
    """AdamW parameter groups: decayed params first, then exempt ones (weight_decay=0).

    Frozen parameters are left out; empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_decay_filter(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------- LR schedule
def lr_at_step(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of the optimizer update with index ``step`` (0-based).

    Linear warmup then cosine decay, counting updates u = step + 1:

    * u <= warmup_steps: ``lr * u / warmup_steps`` (the first update is already
      non-zero; update ``warmup_steps`` uses the peak);
    * after that: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
      ``p = (u - warmup_steps) / (total_steps - warmup_steps)``, clamped to 1, so
      the last update (u = total_steps) uses exactly ``min_lr`` and any step past
      the end stays there.

    The paper's setting is ``warmup_steps = 1% of total_steps``, ``min_lr = 0.1 * lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    u = step + 1
    if u <= warmup_steps:
        return lr * u / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (u - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lr_factor(step: int, **kwargs) -> float:
    return lr_at_step(step, **kwargs) / kwargs["lr"]


def _check_schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")


# --------------------------------------------------------------- DeepSpeed config
def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    grad_clip: float,
    zero_stage: int,
    bf16: bool,
    external_accumulation: bool = False,
) -> dict:
    """The DeepSpeed config dict :func:`build_engine` uses (optimizer and scheduler
    are passed as objects, not configured here)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
    if bf16 and zero_stage == 0:
        # DeepSpeed internals (0.19.8): bf16 without ZeRO selects its legacy
        # FP16_UnfusedOptimizer, which accumulates gradients in bf16 and runs one
        # zero-gradient optimizer.step() at construction; with AdamW that advances
        # the bias-correction step count and applies weight decay once, so every
        # update is off (measured: first update ~0.74x the fp32 one).
        raise ValueError("bf16 needs zero_stage >= 1 (DeepSpeed's bf16 path without ZeRO is not AdamW-exact)")
    if micro_batch_size < 1 or grad_accum_steps < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and grad_accum_steps ({grad_accum_steps}) must be >= 1"
        )
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        # 0 disables clipping.
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16)},
        # The client optimizer is torch.optim.AdamW; DeepSpeed only "tests" its own
        # optimizers with ZeRO and refuses others unless told.
        "zero_allow_untested_optimizer": True,
        # Quiet: no periodic step/LR/throughput lines, no timers.
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if external_accumulation:
        # A pipeline schedule runs forward/backward itself (already averaging over its
        # micro-batches): gradients stay local until engine.step(), which is then the
        # accumulation boundary and reduces them over data parallel once.
        config["managed_gradient_accumulation"] = False
    return config


def _ensure_torch_extensions_dir() -> None:
    # DeepSpeed JIT-compiles its CPU shm communication op (~30 s cold) whenever it
    # creates its torch backend. Pin the build cache to a stable directory (the
    # same as torch's default) unless the user chose one, so it is built once.
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(cache) / "torch_extensions")


def _model_device(model: torch.nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    return None


def build_engine(
    model: torch.nn.Module,
    *,
    lr: float,
    min_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    total_steps: int,
    grad_clip: float,
    micro_batch_size: int,
    grad_accum_steps: int,
    zero_stage: int,
    bf16: bool,
    no_decay_filter: Callable[[str, torch.nn.Parameter], bool] = default_no_decay,
    external_accumulation: bool = False,
):
    """Wraps ``model`` in a DeepSpeed engine; returns ``(engine, scheduler)``.

    * Optimizer: ``torch.optim.AdamW(lr, betas, eps)`` with two parameter
      groups, ``weight_decay`` for matrices and 0 for what ``no_decay_filter``
      exempts (default: :func:`default_no_decay`, biases and norm weights).
    * Schedule: :func:`lr_at_step` (linear warmup over ``warmup_steps``, cosine
      to ``min_lr`` at ``total_steps``) as a ``torch.optim.lr_scheduler.LambdaLR``
      that DeepSpeed steps after every optimizer step (not after micro-steps).
    * ``grad_clip`` > 0: clip the global gradient L2 norm; 0 disables.
    * ``grad_accum_steps`` micro-batches of ``micro_batch_size`` per optimizer
      step and data-parallel rank; ZeRO stage 0-3; ``bf16`` (ZeRO >= 1 only)
      keeps fp32 master weights in the ZeRO optimizer (the caller builds the
      model in bf16).
    * ``external_accumulation``: a pipeline schedule drives forward/backward;
      the engine only steps (see pretrain/pipeline.py).

    Requires :func:`pretrain.distributed.init_distributed` first (the engine uses
    its process group and megatron's parallel state through :class:`MegatronMPU`).
    """
    _check_schedule(lr, min_lr, warmup_steps, total_steps)
    config = deepspeed_config(
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        grad_clip=grad_clip,
        zero_stage=zero_stage,
        bf16=bf16,
        external_accumulation=external_accumulation,
    )
    if not dist.is_initialized():
        raise RuntimeError("build_engine needs torch.distributed; call init_distributed() first")
    _ensure_torch_extensions_dir()

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device = _model_device(model)
    accel = get_accelerator().device_name()
    if device is not None and device.type != accel:
        # DeepSpeed picks its accelerator once per process (DS_ACCELERATOR or
        # detection at first use); a CPU model under the CUDA accelerator, or the
        # reverse, fails much later with an obscure error.
        raise RuntimeError(
            f"model is on {device.type} but DeepSpeed selected the {accel!r} accelerator "
            "(import deepspeed only after init_distributed, or set DS_ACCELERATOR)"
        )

    optimizer = torch.optim.AdamW(
        param_groups(model, weight_decay, no_decay_filter), lr=lr, betas=tuple(betas), eps=eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            _lr_factor, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps
        ),
    )
    engine, _, _, engine_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=MegatronMPU(),
        config=config,
    )
    if zero_stage == 0 and not bf16:
        _record_zero0_grad_norm(engine)
    return engine, engine_scheduler


def _record_zero0_grad_norm(engine) -> None:
    """Replaces the ZeRO-0 fp32 clipping of DeepSpeed 0.19.8 and adds its missing
    non-finite-step skip (DeepSpeed internals).

    The engine clips through ``clip_fp32_gradients`` ->
    ``deepspeed.runtime.utils.clip_grad_norm_``, which (1) returns the global
    pre-clip norm but the engine drops it, so ``engine.get_global_grad_norm()``
    stays None (ZeRO 1-3 and bf16 report it), and (2) takes each parameter's
    norm with a float32 ``Tensor.norm``. On CPU that kernel accumulates
    sequentially and loses about n x 1e-11 relative on n elements (measured:
    2e-5 on the demo-tiny model's 262k-element output layer, 1e-5 on a random
    1M-element tensor), so the norm, and with it the clipping factor, was off
    by more than the 1e-5 the equivalence tests allow.

    This computes the same clipping the way ZeRO 1/2 do
    (``get_grad_norm_direct``): per-parameter norms accumulated in float64,
    tensor-parallel shards summed over the model-parallel group, parameters
    replicated over TP counted on TP rank 0 only, parameters marked
    ``ds_pipe_replicated`` skipped; then ``grad *= min(1, clip / (norm + 1e-6))``.

    Non-finite steps: ZeRO 1-3 skip an update whose gradient norm is inf/NaN
    (their ``overflow`` flag; the engine then counts ``skipped_steps`` and does
    not advance the LR schedule). Plain ZeRO-0 fp32 would apply NaNs to every
    weight. The optimizer's ``step`` is wrapped to behave like ZeRO 1-3: it
    sets ``optimizer.overflow`` and skips the update when the norm is not finite.
    """
    from deepspeed.runtime.utils import is_model_parallel_parameter

    pending: dict = {}

    def global_norm(params) -> torch.Tensor:
        mpu = engine.mpu
        tp_rank = mpu.get_tensor_model_parallel_rank() if mpu is not None else 0
        device = params[0].grad.device if params else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            if getattr(p, "ds_pipe_replicated", False):
                continue
            if tp_rank == 0 or is_model_parallel_parameter(p):
                total += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square()
        if mpu is not None and mpu.get_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=mpu.get_model_parallel_group())
        return total.sqrt().float()

    def grads():
        return [p for p in engine.module.parameters() if p.grad is not None]

    def clip_fp32_gradients():
        params = grads()
        norm = global_norm(params)
        pending["norm"] = norm
        engine._global_grad_norm = norm
        if not torch.isfinite(norm):
            return  # the step is skipped below; scaling by NaN would gain nothing
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))

    optimizer = engine.optimizer
    apply_update = optimizer.step

    def step(*args, **kwargs):
        norm = pending.pop("norm", None)
        if norm is None:  # clipping is off: the norm was not needed until now
            norm = global_norm(grads())
            engine._global_grad_norm = norm
        optimizer.overflow = not bool(torch.isfinite(norm))
        if optimizer.overflow:
            return None
        return apply_update(*args, **kwargs)

    # The LR scheduler's own step wrapper is still called inside (apply_update); tell its
    # "optimizer.step was replaced" check so.
    step._wrapped_by_lr_sched = True
    engine.clip_fp32_gradients = clip_fp32_gradients
    optimizer.step = step


# --------------------------------------------------------------- teardown
def release_deepspeed_groups() -> None:
    """Drops DeepSpeed's cached process-group references (world teardown).

    DeepSpeed internals (0.19.8): ``deepspeed.utils.groups`` keeps ``mpu`` and
    cloned/derived groups as module globals. ``deepspeed.comm.destroy_process_group``
    clears them through ``groups._release_process_group_references``; we destroy
    the process group with torch instead, so we call that helper ourselves.
    Otherwise a later ``deepspeed.initialize`` in the same process (tests) could
    reuse groups of a destroyed process group. DeepSpeed's communication backend
    object (``deepspeed.comm.comm.cdb``) is kept: it is a stateless wrapper over
    torch.distributed, and keeping it avoids reloading the shm op. No-op if
    DeepSpeed was never imported.
    """
    if "deepspeed" not in sys.modules:
        return
    from deepspeed.utils import groups

    groups._release_process_group_references(group=None)
