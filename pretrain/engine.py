"""DeepSpeed engine over a megatron-core model: optimizer, LR schedule, ZeRO.

Training-step contract (what :func:`build_engine` configures DeepSpeed for)::

    for micro_batch in the plan.grad_accum micro-batches of one optimizer step:
        loss = engine(...)  # mean loss of this micro-batch
        engine.backward(loss)  # DeepSpeed scales by 1 / grad_accum
        engine.step()  # optimizer + LR scheduler only at the accumulation boundary

so the gradient of one optimizer step is the mean of the micro-batch gradients,
clipped to ``optim.grad_clip`` (global L2 norm over the model-parallel group), followed
by AdamW with the LR of :func:`lr_at_step`. With a pipeline the schedule runs the
micro-batches and the engine only steps (pretrain/parallel/schedule.py).

Grad-norm caveat (read from DeepSpeed 0.19.8's source): parameters replicated
across tensor-parallel ranks are counted once (checked: TP=2 gives the
single-process norm at ZeRO 0-3, the distributed-equivalence tests). At ZeRO 3
DeepSpeed decides "replicated, count here" by the TP x PP rank, so with
pipeline parallelism the non-tensor-parallel parameters of later stages would
be left out of the norm; ZeRO 1/2 use the TP rank, and so does the ZeRO-0
clipping installed from pretrain/compat.py, which also skips non-finite steps
as ZeRO 1-3 do. Everything here that depends on DeepSpeed internals is in
pretrain/compat.py.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from pretrain.config import OptimConfig
    from pretrain.parallel.distributed import ProcessGroups
    from pretrain.parallel.plan import ParallelPlan

__all__ = ["build_engine", "default_no_decay", "deepspeed_config", "lr_at_step", "param_groups"]

# DeepSpeed prints a throughput/LR line every `steps_per_print` optimizer steps.
_NEVER = 2**62


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


# --------------------------------------------------------------- DeepSpeed config
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size."""


def reduce_bucket_elements(rank_parameters: int) -> int:
    """The ZeRO gradient-reduction bucket for a rank holding `rank_parameters` (its tensor and
    pipeline shard): DeepSpeed's default, but never more than those parameters. ZeRO 1/2
    allocate the whole bucket at every backward (ZeRO-3 once, up front) whatever the model's
    size, so at the default a small model's rank stages 2 GB of fp32 for a fraction of that in
    gradients; a bucket larger than all of them only wastes memory."""
    return max(1, min(DEEPSPEED_REDUCE_BUCKET_ELEMENTS, int(rank_parameters)))


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    grad_clip: float,
    zero_stage: int,
    bf16: bool,
    reduce_bucket_size: int = DEEPSPEED_REDUCE_BUCKET_ELEMENTS,
    external_accumulation: bool = False,
) -> dict:
    """The DeepSpeed config dict :func:`build_engine` uses (optimizer and scheduler
    are passed as objects, not configured here). The values were validated with the
    run config and the parallel plan."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        # 0 disables clipping.
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": int(reduce_bucket_size)},
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
    plan: "ParallelPlan",
    groups: "ProcessGroups",
    optim: "OptimConfig",
    total_steps: int,
    bf16: bool,
    no_decay_filter: Callable[[str, torch.nn.Parameter], bool] = default_no_decay,
):
    """Wraps ``model`` in a DeepSpeed engine; returns ``(engine, scheduler)``.

    * Optimizer: ``torch.optim.AdamW(optim.lr, (optim.beta1, optim.beta2), optim.eps)``
      with two parameter groups, ``optim.weight_decay`` for matrices and 0 for what
      ``no_decay_filter`` exempts (default: :func:`default_no_decay`, biases and norm weights).
    * Schedule: :func:`lr_at_step` (linear warmup over ``optim.warmup_fraction`` of
      ``total_steps``, at least one step, then cosine to ``optim.min_lr``) as a
      ``torch.optim.lr_scheduler.LambdaLR`` that DeepSpeed steps after every
      optimizer step (not after micro-steps).
    * ``optim.grad_clip`` > 0: clip the global gradient L2 norm; 0 disables.
    * From the plan: micro-batch size, accumulation (1 with a pipeline, whose schedule
      accumulates), ZeRO stage. ``bf16`` (ZeRO >= 1, see RunConfig.validate) keeps fp32
      master weights in the ZeRO optimizer (the caller builds the model in bf16).

    Requires :func:`pretrain.parallel.distributed.init_distributed` first (``groups``).
    """
    from pretrain.compat import install_zero0_grad_norm
    from pretrain.parallel.distributed import MegatronMPU

    config = deepspeed_config(
        micro_batch_size=plan.micro_batch_size,
        grad_accum_steps=plan.engine_accumulation,
        grad_clip=optim.grad_clip,
        zero_stage=plan.zero_stage,
        bf16=bf16,
        reduce_bucket_size=reduce_bucket_elements(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        external_accumulation=plan.pipelined,
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

    schedule = dict(lr=optim.lr, min_lr=optim.min_lr, total_steps=total_steps,
                    warmup_steps=max(1, round(optim.warmup_fraction * total_steps)))
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay, no_decay_filter), lr=optim.lr, betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_lr_factor, **schedule))
    engine, _, _, engine_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=MegatronMPU(groups),
        config=config,
    )
    if plan.zero_stage == 0 and not bf16:
        install_zero0_grad_norm(engine)
    return engine, engine_scheduler


def reapply_lr_schedule(engine, scheduler, lr: float) -> None:
    """After loading a checkpoint: the schedule continues at the saved step with this run's
    peak ``lr`` (the scheduler's own state would keep the saving run's), and the optimizer's
    group LRs follow. With an unchanged config this recomputes exactly the saved LRs."""
    from pretrain.compat import base_optimizer

    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    values = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(base_optimizer(engine).param_groups, values):
        group["lr"] = value
    scheduler._last_lr = values  # torch's LRScheduler keeps what get_last_lr() returns here
