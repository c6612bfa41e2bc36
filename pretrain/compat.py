"""Every use of library internals, in one place: megatron-core 0.16.1, DeepSpeed 0.19.8, torch 2.x.

What this stack relies on beyond those libraries' documented APIs (private
attributes, version-specific behaviour, workarounds) is here and nowhere else,
so an upgrade of a pinned version is checked against this one file:

* megatron-core on CPU: :func:`apply_cpu_shim` (hard-coded CUDA calls mapped to
  the CPU) and :func:`cuda_literals_unmapped`.
* megatron-core's schedules: :class:`ScheduleModel` (how the schedule finds the
  model config), :func:`set_p2p_batching` (batched p2p is wrong under gloo).
* DeepSpeed's engine: :func:`install_zero0_grad_norm` (the ZeRO-0 fp32 clipping
  norm and its missing non-finite-step skip), :func:`release_deepspeed_groups`.
* DeepSpeed's optimizer internals used by checkpoints: :func:`base_optimizer`,
  :func:`materialize_adam_state`, :func:`link_optimizer_views` (the ZeRO-1/2
  "optimizer views linked" flag), :func:`zero_dp_group`, :func:`engine_counters`.
* DeepSpeed's parameter attributes: ``ds_pipe_replicated`` (a pipeline replica,
  left out of the gradient norm) and ``ds_shape`` (the full shape at ZeRO-3).

On a version change: rerun tests/unit/pretrain/test_engine.py (engine vs torch
AdamW, ZeRO 0/1), tests/integration/test_resume.py (bitwise resume at ZeRO
0-3) and tests/integration/test_dist_equivalence.py.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode, redispatch_function

PINNED = {"megatron-core": "0.16.1", "deepspeed": "0.19.8"}
"""The versions whose internals this module was written against (pyproject.toml pins them)."""


# ============================================================================ megatron-core on CPU
# megatron-core hard-codes CUDA in a few places that the pretraining stack
# reaches even with TransformerConfig(use_cpu_initialization=True): the
# model-parallel RNG tracker, scratch buffers allocated on
# torch.cuda.current_device(), literal device="cuda" tensors (the causal mask,
# the schedules' token counter) and Tensor.cuda() (tied embeddings with pipeline
# parallelism). On a machine without a GPU these raise "Torch not compiled with
# CUDA enabled". apply_cpu_shim patches exactly those entry points so that
# "CUDA" means "CPU"; it does nothing when a GPU is available. Each patch was
# checked to be necessary by removing it (see the comment on each). Known limit:
# a TorchFunctionMode lives on a per-thread stack, so the device="cuda" mapping
# is active in the thread that applied the shim (and in autograd), not in
# threads started independently later.

_CPU = torch.device("cpu")
_lock = threading.Lock()
_applied = False
_mode: "_CudaToCpuMode | None" = None

# The one message of megatron's RNG tracker that is a false alarm on CPU (see below).
_RNG_FALSE_ALARM = "CPU RNG state changed within GPU RNG context"


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects literal CUDA placements to the CPU.

    * ``device="cuda"`` / ``device=torch.device("cuda")`` keyword arguments of any
      torch function become ``device="cpu"``;
    * ``Tensor.cuda()`` returns the tensor itself (it is already on the CPU).
    """

    # Python-level functions whose bodies run arbitrary user code (autograd
    # Functions' backward, e.g. megatron's activation-recompute CheckpointFunction).
    # While a mode handles a call torch pops it off the stack, so these are
    # re-dispatched with the mode pushed again; otherwise the recompute forward
    # inside backward would see real "cuda" and fail.
    _KEEP_ACTIVE = (torch.Tensor.backward, torch.autograd.backward)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func in self._KEEP_ACTIVE:
            with self:
                return redispatch_function(func, types, args, kwargs)
        return func(*args, **kwargs)


class _DropRngFalseAlarm(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _RNG_FALSE_ALARM


def is_cpu_shim_applied() -> bool:
    """Whether :func:`apply_cpu_shim` has patched this process."""
    return _applied


def apply_cpu_shim() -> bool:
    """Make megatron-core's hard-coded CUDA calls run on the CPU.

    Applied only when ``torch.cuda.is_available()`` is False. Idempotent: the
    patches are installed once per process; later calls change nothing.

    Returns:
        True if the shim is in effect (applied by this call or an earlier one),
        False if a GPU is available and nothing was patched.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    with _lock:
        if _applied:
            return True
        from megatron.core.tensor_parallel import random as mcore_random

        # torch.cuda.current_device(): megatron allocates scratch buffers with
        # device=torch.cuda.current_device() (GlobalMemoryBuffer used by
        # DotProductAttention, p2p shape/tensor buffers in pipeline schedules).
        # Without it the first forward fails. Returning the CPU device (not an
        # int, which torch would read as cuda:N) keeps those allocations on CPU.
        torch.cuda.current_device = lambda: _CPU

        # The model-parallel RNG tracker saves/restores the "CUDA" generator
        # through these two helpers around every fork() (dropout, weight init,
        # activation recompute). Back them by the CPU default generator; without
        # them tracker.fork() fails.
        def _get_rng_state(device="cuda", clone=False, graph_safe=False):
            return torch.get_rng_state()  # always a fresh copy

        def _set_rng_state(new_state, device=-1, graph_safe=False):
            torch.set_rng_state(new_state)

        mcore_random._get_cuda_rng_state = _get_rng_state
        mcore_random._set_cuda_rng_state = _set_rng_state

        # CudaRNGStatesTracker.add() (called by model_parallel_cuda_manual_seed)
        # reads the generator state with torch.cuda.get_rng_state(): fails
        # without a GPU.
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()

        # ... and seeds each tracker with torch.cuda.manual_seed(), which without a
        # GPU is silently queued and never run. Without this patch nothing
        # crashes, but every tracker (data-, tensor- and expert-parallel) gets
        # the same unseeded state, so the seed and per-TP-rank streams are lost.
        torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)

        # Pipeline p2p communication calls torch.cuda.synchronize() after
        # batch_isend_irecv (TransformerConfig's default batch_p2p_comm=True);
        # PP>1 schedules fail without it. Nothing is asynchronous on CPU.
        torch.cuda.synchronize = lambda device=None: None

        # Literal device="cuda" (causal mask in megatron.core.transformer.utils,
        # total_num_tokens in the schedules) and Tensor.cuda() (tied embeddings
        # with PP>1). Entered once and left on this thread's mode stack.
        global _mode
        _mode = _CudaToCpuMode()
        _mode.__enter__()

        # On CPU the tracker's states and the default generator are the same
        # generator, so its "CPU RNG state changed within GPU RNG context"
        # warning fires on every fork that draws random numbers (each dropout
        # under TP's fork, i.e. every layer of every step). Drop only that message.
        logging.getLogger(mcore_random.__name__).addFilter(_DropRngFalseAlarm())

        _applied = True
        return True


@contextlib.contextmanager
def cuda_literals_unmapped():
    """Runs the body without the ``device="cuda"`` mapping (the other patches stay).

    The mapping is a ``TorchFunctionMode``: every torch call of the thread goes
    through Python while it is active, which costs about 7% of a world-size-1
    training step of the demo model (measured: 0.477 vs 0.445 s). The
    non-pipelined training and evaluation steps never reach megatron's literal
    CUDA placements (the model always gets its attention mask, so megatron's
    default causal-mask builder is not called; `torch.cuda.current_device` is
    patched separately), so the trainer runs them inside this context. If some
    code inside does use a literal CUDA device, it fails loudly ("Torch not
    compiled with CUDA enabled"), never silently. A no-op when the shim is not
    applied (GPU) or when the mapping is not the innermost mode of this thread.
    """
    if _mode is None or torch.overrides._get_current_function_mode() is not _mode:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


# ============================================================================ megatron-core schedules
class ScheduleModel(torch.nn.Module):
    """What megatron's schedule is handed: the DeepSpeed engine, plus the megatron config.

    megatron-core's `get_model_config` would otherwise find DeepSpeed's own `config`
    dict on the engine; `set_input_tensor` is found through `.module`.
    """

    def __init__(self, engine, config):
        super().__init__()
        self.module = engine
        self.config = config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def set_p2p_batching(transformer_config, backend: str) -> None:
    """gloo: megatron's batched isend/irecv gives wrong losses, then NaN (measured with
    megatron-core 0.16.1); NCCL batches correctly."""
    transformer_config.batch_p2p_comm = backend != "gloo"


# ============================================================================ DeepSpeed: parameters
def mark_pipeline_replica(param: torch.nn.Parameter, counted_here: bool) -> None:
    """A pipeline-replicated parameter is counted in DeepSpeed's gradient norm on one stage only."""
    param.ds_pipe_replicated = not counted_here


def is_pipeline_replica(param: torch.nn.Parameter) -> bool:
    """True for a replica that another stage counts (and saves)."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape on this TP rank (ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


# ============================================================================ DeepSpeed: the engine
def engine_counters(engine) -> dict[str, int]:
    """The engine's own step and sample counters (saved, and restored on resume)."""
    return {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "skipped_steps")}


def restore_engine_counters(engine, counters: dict) -> None:
    for key, value in counters.items():
        setattr(engine, key, value)


# ============================================================================ DeepSpeed: ZeRO-0 clipping
def install_zero0_grad_norm(engine) -> None:
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
    as pipeline replicas (:func:`mark_pipeline_replica`) skipped; then ``grad *= min(1, clip / (norm + 1e-6))``.

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
            if is_pipeline_replica(p):
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



# ============================================================================ DeepSpeed: optimizer state (checkpoints)
def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that holds the optimizer state (DeepSpeed wraps it at ZeRO >= 1)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def adam_step_count(engine) -> Optional[float]:
    steps = {float(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s}
    if not steps:
        return None
    if len(steps) > 1:
        raise RuntimeError(f"optimizer state has different step counts {sorted(steps)}")
    return steps.pop()


def materialize_adam_state(engine, step: float) -> None:
    """Creates AdamW's per-parameter state (zeros) so it can be overwritten from a checkpoint.

    torch creates it lazily at the first step, in exactly this form: a float32
    scalar step count and zero moments shaped like the (flat, partitioned at
    ZeRO >= 1) fp32 parameters the optimizer steps.
    """
    base = base_optimizer(engine)
    # DeepSpeed internals (0.19.8): ZeRO-3 puts its flat fp32 partitions into the
    # param groups only while it steps them.
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    params = list(flat) if flat is not None else [p for g in base.param_groups for p in g["params"]]
    for p in params:
        base.state[p] = {
            "step": torch.tensor(step, dtype=torch.float32),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    link_optimizer_views(engine)


def link_optimizer_views(engine) -> None:
    """DeepSpeed internals (0.19.8): at ZeRO 1/2 each parameter's view into the flat
    optimizer state is linked once, lazily, at a step; when that first step found no
    state yet (it is created inside the step), the views stay missing. Relink."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()




def zero_dp_group(engine):
    """The data-parallel group the ZeRO optimizer partitions over."""
    return engine.optimizer.dp_process_group


# ============================================================================ DeepSpeed: teardown
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
