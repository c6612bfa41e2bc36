"""Process group, megatron-core model parallelism and seeding for one training process.

One process per device (GPU, or CPU "device" on machines without a GPU). The
launcher (torchrun, or an sbatch script that exports them from SLURM's
variables) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A
plain ``python`` process without them is a world of one: defaults are filled
in, because DeepSpeed otherwise falls back to MPI discovery (and fails without
mpi4py).

Typical use::

    plan = ParallelPlan.build(config, world_size, rank)
    ctx = init_distributed(plan, seed=1234)
    try:
        ...  # build model, engine (pretrain.engine.build_engine), train
    finally:
        destroy_distributed()

This is the only module that reads megatron-core's global ``parallel_state``:
it creates the groups, checks them against the plan's coordinates once, and
hands them out in :class:`ProcessGroups` (and to DeepSpeed through
:class:`MegatronMPU`). Everything else takes the plan and the groups.
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

from pretrain.parallel.plan import ParallelPlan

__all__ = [
    "DistributedContext",
    "MegatronMPU",
    "ProcessGroups",
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
class ProcessGroups:
    """This rank's process groups, as megatron-core created them."""

    tensor: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    data: dist.ProcessGroup
    model: dist.ProcessGroup
    """TP x PP: DeepSpeed's "model parallel" group."""
    pipeline_ranks: tuple[int, ...]
    """Global ranks of this rank's pipeline, stage 0 first."""
    tensor_src_rank: int
    """Global rank of TP rank 0 in this rank's TP group."""

    @property
    def pipeline_last_rank(self) -> int:
        return self.pipeline_ranks[-1]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    data_parallel_size: int
    device: torch.device
    backend: str
    plan: ParallelPlan
    groups: ProcessGroups


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


def _resolve_device(device_type: str, local_rank: int) -> torch.device:
    """The plan's device type (checked against this machine when the plan was built) on this rank."""
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _restore_env() -> None:
    for name, value in list(_filled_env.items()):
        if os.environ.get(name) == value:
            del os.environ[name]
        del _filled_env[name]


def init_distributed(plan: ParallelPlan, seed: int, timeout_s: float | None = None) -> DistributedContext:
    """Initialises torch.distributed, megatron-core parallel state and all RNGs for ``plan``.

    Args:
        plan: the layout (built for this process's RANK and WORLD_SIZE).
        seed: seeds python, numpy and torch, and megatron's model-parallel RNG
            tracker (``model_parallel_cuda_manual_seed``: TP ranks get distinct
            streams for tensor-parallel regions).
        timeout_s: collective timeout, in seconds, of the process group and of
            megatron's parallel groups; default $MESH_DIST_TIMEOUT_S, else 1800.
            A rank blocked in a collective whose peer died or hangs fails
            after this long (gloo raises; NCCL's watchdog aborts), so the
            launcher ends the job instead of waiting.

    Environment: reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
    If neither RANK nor WORLD_SIZE is set, a single process is assumed and the
    missing ones are set (MASTER_ADDR=127.0.0.1, MASTER_PORT a free port);
    :func:`destroy_distributed` removes them again. On CPU it also sets
    DS_ACCELERATOR=cpu, applies :func:`pretrain.compat.apply_cpu_shim`, and,
    when several ranks share the machine and OMP_NUM_THREADS is unset, divides
    the cores between them (torch.set_num_threads).

    Backend: nccl on CUDA, gloo on CPU.

    Raises:
        ValueError: for a launcher environment that does not match the plan (before
            anything is initialised), an unusable device or an incomplete environment.
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
        if (rank, world_size) != (plan.rank, plan.world_size):
            raise ValueError(
                f"the parallel plan is for rank {plan.rank} of {plan.world_size} but the launcher "
                f"says RANK={rank} WORLD_SIZE={world_size}"
            )
        torch_device = _resolve_device(plan.device_type, local_rank)
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
        from pretrain.compat import apply_cpu_shim

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
            tensor_model_parallel_size=plan.tensor,
            pipeline_model_parallel_size=plan.pipeline,
            # megatron creates its groups (TP, PP, DP, ...) with their own timeout;
            # without this they keep its 30-minute default.
            distributed_timeout_minutes=timeout_s / 60,
        )
        groups = _groups_matching(plan)
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
        data_parallel_size=plan.data,
        device=torch_device,
        backend=backend,
        plan=plan,
        groups=groups,
    )


def _groups_matching(plan: ParallelPlan) -> ProcessGroups:
    """megatron's groups for this rank, after checking that its coordinates are the plan's."""
    from megatron.core import parallel_state as ps

    actual = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
    if actual != (plan.tp_rank, plan.pp_rank, plan.dp_rank):
        raise RuntimeError(
            f"megatron-core placed rank {plan.rank} at (tp, pp, dp) = {actual}, the plan at "
            f"{(plan.tp_rank, plan.pp_rank, plan.dp_rank)}: its rank order is not the plan's"
        )
    return ProcessGroups(
        tensor=ps.get_tensor_model_parallel_group(),
        pipeline=ps.get_pipeline_model_parallel_group(),
        data=ps.get_data_parallel_group(),
        model=ps.get_model_parallel_group(),
        pipeline_ranks=tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
        tensor_src_rank=ps.get_tensor_model_parallel_src_rank(),
    )


# --------------------------------------------------------------------------- DeepSpeed's view
class MegatronMPU:
    """DeepSpeed's ``mpu=`` view of megatron-core's process groups.

    DeepSpeed's "model parallel" group is everything that is not data parallel:
    the TP x PP group. megatron-core has ``get_model_parallel_group`` but no rank /
    world-size functions for it, so ``parallel_state`` cannot be passed to DeepSpeed directly.

    Deliberately NOT defined: ``initialize_sequence_parallel`` (DeepSpeed 0.19.8
    treats an mpu that has it as a Ulysses sequence-parallel unit and then ignores
    model parallelism entirely: the data-parallel group becomes None and the grad
    norm is no longer reduced over TP) and the ``get_sequence_parallel_*``
    functions (megatron's sequence parallelism is a TP detail; DeepSpeed's is a
    data-sharding dimension, which we do not use).
    """

    def __init__(self, groups: ProcessGroups):
        self.groups = groups

    # TP x PP ("model parallel" in DeepSpeed's vocabulary)
    def get_model_parallel_group(self):
        return self.groups.model

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.groups.model)

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.groups.model)

    # data parallel
    def get_data_parallel_group(self):
        return self.groups.data

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.groups.data)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(group=self.groups.data)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.groups.data)

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self.groups.tensor

    def get_tensor_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.groups.tensor)

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.groups.tensor)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.tensor_src_rank

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self.groups.pipeline

    def get_pipeline_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.groups.pipeline)

    def get_pipeline_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.groups.pipeline)


def destroy_distributed() -> None:
    """Undoes :func:`init_distributed`; safe to call when nothing is initialised.

    Destroys megatron's parallel state and the process group, drops DeepSpeed's
    cached references to the process groups, and removes the environment variables init_distributed filled in.
    The CPU shim stays applied (it is process-wide and idempotent).
    """
    global _saved_num_threads
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    from pretrain.compat import release_deepspeed_groups

    release_deepspeed_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
    _restore_env()
    if _saved_num_threads is not None:
        torch.set_num_threads(_saved_num_threads)
        _saved_num_threads = None
