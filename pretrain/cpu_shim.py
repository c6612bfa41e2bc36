"""CPU compatibility shim for megatron-core 0.16.1.

megatron-core hard-codes CUDA in a few places that the pretraining stack
reaches even with ``TransformerConfig(use_cpu_initialization=True)``: the
model-parallel RNG tracker, scratch buffers allocated on
``torch.cuda.current_device()``, literal ``device="cuda"`` tensors (the causal
mask, the schedules' token counter) and ``Tensor.cuda()`` (tied embeddings with
pipeline parallelism). On a machine without a GPU these raise
``AssertionError: Torch not compiled with CUDA enabled``.

:func:`apply_cpu_shim` patches exactly those entry points so that "CUDA" means
"CPU". It does nothing when ``torch.cuda.is_available()`` is True. Each patch
below was checked to be necessary by removing it and running the scenarios the
pipeline needs (GPTModel with the local layer spec, ``model_parallel_cuda_manual_seed``,
forward/backward, ``get_forward_backward_func`` with PP=1 and PP=2, and
``tensor_parallel.checkpoint`` recompute); see the comment on each patch for
what failed without it.

Known limit: a ``TorchFunctionMode`` lives on a per-thread stack, so the
``device="cuda"`` mapping is active in the thread that called
:func:`apply_cpu_shim` (and in autograd, which inherits it), not in threads
started independently later.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode, redispatch_function

__all__ = ["apply_cpu_shim", "cuda_literals_unmapped", "is_cpu_shim_applied"]

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
