"""Process group, megatron-core model parallelism and seeding for one training process.

One process per device (GPU, or CPU "device" on machines without a GPU). The
launcher (torchrun, or an sbatch script that exports them from SLURM's
variables) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A
plain ``python`` process without them is a world of one: defaults are filled
in, because DeepSpeed otherwise falls back to MPI discovery (and fails without
mpi4py).

Typical use::

    ctx = init_distributed(tensor_parallel=2, pipeline_parallel=1, seed=1234)
    try:
        ...  # build model, engine (pretrain.engine.build_engine), train
    finally:
        destroy_distributed()
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mesh_model.config import ConfigError

__all__ = [
    "DistributedContext",
    "check_parallel_sizes",
    "collective_timeout_s",
    "destroy_distributed",
    "init_distributed",
]

DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "MESH_DIST_TIMEOUT_S"
"""Environment variable that overrides the collective timeout (seconds) when
``init_distributed`` is not given one. Tests set it low (e.g. 60) so that a rank
that dies or hangs fails the job within a minute instead of half an hour."""

# Environment variables init_distributed filled in itself (single process); removed
# again by destroy_distributed so that a later init starts from the same state.
_filled_env: dict[str, str] = {}
# Torch intra-op thread count before init_distributed changed it (None: unchanged).
_saved_num_threads: int | None = None


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    data_parallel_size: int
    device: torch.device
    backend: str


def check_parallel_sizes(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> int:
    """Validates the parallel layout and returns the data-parallel size.

    Raises:
        ConfigError (a ValueError): (one line) if a size is not positive or ``world_size`` is not
            divisible by ``tensor_parallel * pipeline_parallel``.
    """
    for name, value in (
        ("tensor_parallel", tensor_parallel),
        ("pipeline_parallel", pipeline_parallel),
        ("world size", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    model_parallel = tensor_parallel * pipeline_parallel
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor ({tensor_parallel}) x "
            f"parallel.pipeline ({pipeline_parallel}) = {model_parallel}; launch a multiple of "
            f"{model_parallel} processes"
        )
    return world_size // model_parallel


def collective_timeout_s(timeout_s: float | None = None) -> float:
    """The collective timeout: ``timeout_s`` if given, else $MESH_DIST_TIMEOUT_S, else 1800."""
    if timeout_s is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return float(DEFAULT_TIMEOUT_S)
        try:
            timeout_s = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s} s")
    return float(timeout_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _read_launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment, filling single-process defaults."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        defaults = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
        for name, value in defaults.items():
            if name not in os.environ:
                os.environ[name] = value
                _filled_env[name] = value
    missing = [n for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise ValueError(
            f"incomplete launcher environment: {', '.join(missing)} not set "
            "(launch with torchrun, or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
        )
    if "LOCAL_RANK" not in os.environ:
        # A single-node launcher that sets only RANK: local rank == rank.
        os.environ["LOCAL_RANK"] = os.environ["RANK"]
        _filled_env["LOCAL_RANK"] = os.environ["RANK"]
    rank, world_size, local_rank = (_env_int(n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def _resolve_device(device: str, local_rank: int) -> torch.device:
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda":
        if not cuda:
            raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        return torch.device("cuda", local_rank)
    if device == "cpu":
        if cuda:
            # megatron-core allocates on torch.cuda.current_device() regardless of the
            # model's device; mixing would fail deep inside a forward pass.
            raise ValueError(
                "device='cpu' on a machine with a GPU is not supported; hide the GPUs "
                "(CUDA_VISIBLE_DEVICES=) to train on the CPU"
            )
        return torch.device("cpu")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def _restore_env() -> None:
    for name, value in list(_filled_env.items()):
        if os.environ.get(name) == value:
            del os.environ[name]
        del _filled_env[name]


def init_distributed(
    tensor_parallel: int,
    pipeline_parallel: int,
    seed: int,
    device: str = "auto",
    timeout_s: float | None = None,
) -> DistributedContext:
    """Initialises torch.distributed, megatron-core parallel state and all RNGs.

    Args:
        tensor_parallel: tensor-model-parallel size (TP).
        pipeline_parallel: pipeline-model-parallel size (PP).
        seed: seeds python, numpy and torch, and megatron's model-parallel RNG
            tracker (``model_parallel_cuda_manual_seed``: TP ranks get distinct
            streams for tensor-parallel regions).
        device: "auto" (CUDA if available, else CPU), "cuda" or "cpu".
        timeout_s: collective timeout, in seconds, of the process group and of
            megatron's parallel groups; default $MESH_DIST_TIMEOUT_S, else 1800.
            A rank blocked in a collective whose peer died or hangs fails
            after this long (gloo raises; NCCL's watchdog aborts), so the
            launcher ends the job instead of waiting.

    Environment: reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
    If neither RANK nor WORLD_SIZE is set, a single process is assumed and the
    missing ones are set (MASTER_ADDR=127.0.0.1, MASTER_PORT a free port);
    :func:`destroy_distributed` removes them again. On CPU it also sets
    DS_ACCELERATOR=cpu, applies :func:`pretrain.cpu_shim.apply_cpu_shim`, and,
    when several ranks share the machine and OMP_NUM_THREADS is unset, divides
    the cores between them (torch.set_num_threads).

    Backend: nccl on CUDA, gloo on CPU.

    Raises:
        ValueError: for a world size not divisible by TP x PP (before anything is
            initialised), an unusable device or an incomplete launcher environment.
        RuntimeError: if torch.distributed or megatron's parallel state is
            already initialised.
    """
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    if dist.is_initialized() or parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "torch.distributed / megatron parallel state is already initialised; "
            "call destroy_distributed() first"
        )
    timeout_s = collective_timeout_s(timeout_s)
    try:
        rank, world_size, local_rank = _read_launch_env()
        data_parallel_size = check_parallel_sizes(world_size, tensor_parallel, pipeline_parallel)
        torch_device = _resolve_device(device, local_rank)
    except Exception:
        _restore_env()
        raise

    global _saved_num_threads
    if torch_device.type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(torch_device)
    else:
        backend = "gloo"
        # DeepSpeed would detect its CPU accelerator anyway; setting it explicitly
        # silences the detection warning (effective if deepspeed is imported later).
        os.environ["DS_ACCELERATOR"] = "cpu"
        from pretrain.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing cores with torch's default thread count oversubscribe
            # badly (a 70 ms step became 1.4-3 s with 2 ranks on 2 cores).
            _saved_num_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            # megatron creates its groups (TP, PP, DP, ...) with their own timeout;
            # without this they keep its 30-minute default.
            distributed_timeout_minutes=timeout_s / 60,
        )
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        mcore_tp.model_parallel_cuda_manual_seed(seed)
    except BaseException:
        destroy_distributed()
        raise

    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        data_parallel_size=data_parallel_size,
        device=torch_device,
        backend=backend,
    )


def destroy_distributed() -> None:
    """Undoes :func:`init_distributed`; safe to call when nothing is initialised.

    Destroys megatron's parallel state and the process group, drops DeepSpeed's
    cached references to the process groups, and removes the environment variables init_distributed filled in.
    The CPU shim stays applied (it is process-wide and idempotent).
    """
    global _saved_num_threads
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    from pretrain.engine import release_deepspeed_groups

    release_deepspeed_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
    _restore_env()
    if _saved_num_threads is not None:
        torch.set_num_threads(_saved_num_threads)
        _saved_num_threads = None
