"""What a job asks SLURM for, checked before anything is submitted.

One dataclass serves `mesh slurm submit` (filled from its flags) and a sweep file's `slurm:`
section (filled from a mapping, an unknown or bad field named in the error).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from mesh_model.config import ConfigError

GIB = 1024**3

# SLURM's --time forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
# --array index lists: 1-3, 1-3%1, 1,4,7, 0-15:4%2
_ARRAY = re.compile(r"^\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?$")


@dataclass
class SlurmResources:
    nodes: int = 1
    gpus_per_node: int = 8
    """GPUs per node; 0 on a CPU-only cluster (the ranks then use gloo on the CPU)."""
    procs_per_node: Optional[int] = None
    """Training processes per node; defaults to gpus_per_node (one rank per GPU)."""
    cpus_per_task: Optional[int] = None
    """CPUs of the one srun task per node (its torchrun and every rank under it); default:
    8 per GPU, or one per process on a CPU-only cluster."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    """Wall-time limit in SLURM's form (minutes, HH:MM:SS, D-HH:MM:SS); None = the partition's."""
    constraint: Optional[str] = None
    exclusive: bool = False
    mem: Optional[str] = None
    """Memory per node (SLURM's --mem, e.g. 200G); None = the cluster's default."""
    signal_seconds: int = 120
    """SIGUSR1 reaches the batch shell this long before the time limit (--signal=B:USR1@S): the
    ranks save and the job requeues itself. Must leave time for a checkpoint save."""
    requeue: bool = True
    """Requeue the job when its ranks stopped for a signal or train.max_minutes (INTERRUPTED)."""
    array: Optional[str] = None
    """A chain of time-limited jobs over one run, e.g. 1-10%1 (one after another)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU; a job whose estimate does not fit is refused."""
    job_name: Optional[str] = None
    sbatch: list[str] = field(default_factory=list)
    """Further #SBATCH lines passed through as written, e.g. "--reservation=big" or "--mail-type=END"."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def gpu_bytes(self) -> int:
        return int(self.gpu_memory_gb * GIB)

    @property
    def task_cpus(self) -> int:
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return 8 * self.gpus_per_node if self.gpus_per_node else self.ranks_per_node

    def validate(self) -> None:
        def positive(name: str, value: Any, zero_ok: bool = False) -> None:
            low = 0 if zero_ok else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"slurm.{name}={value!r} must be an integer >= {low}")

        positive("nodes", self.nodes)
        positive("gpus_per_node", self.gpus_per_node, zero_ok=True)
        if self.procs_per_node is not None:
            positive("procs_per_node", self.procs_per_node)
        if self.cpus_per_task is not None:
            positive("cpus_per_task", self.cpus_per_task)
        positive("signal_seconds", self.signal_seconds, zero_ok=True)
        if self.ranks_per_node < 1:
            raise ConfigError("slurm.gpus_per_node=0 needs slurm.procs_per_node >= 1 (training processes per "
                              "node on a CPU-only cluster)")
        if self.gpus_per_node and self.procs_per_node not in (None, self.gpus_per_node):
            raise ConfigError(f"slurm.procs_per_node={self.procs_per_node} must equal slurm.gpus_per_node="
                              f"{self.gpus_per_node} (one training process per GPU)")
        if self.time is not None and not _TIME.match(str(self.time)):
            raise ConfigError(f"slurm.time={self.time!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
        if self.array is not None and not _ARRAY.match(str(self.array)):
            raise ConfigError(f"slurm.array={self.array!r} is not a SLURM index list (e.g. 1-4%1)")
        if isinstance(self.gpu_memory_gb, bool) or not isinstance(self.gpu_memory_gb, (int, float)) \
                or not self.gpu_memory_gb > 0:
            raise ConfigError(f"slurm.gpu_memory_gb={self.gpu_memory_gb!r} must be a number > 0 (GB of one GPU)")
        for name in ("partition", "account", "qos", "constraint", "mem", "job_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "\n" in value):
                raise ConfigError(f"slurm.{name}={value!r} must be a non-empty single-line string")
        if not isinstance(self.exclusive, bool) or not isinstance(self.requeue, bool):
            raise ConfigError("slurm.exclusive and slurm.requeue must be true or false")
        if not isinstance(self.sbatch, list) or any(not isinstance(s, str) or "\n" in s for s in self.sbatch):
            raise ConfigError(f"slurm.sbatch={self.sbatch!r} must be a list of single-line #SBATCH options")
        for line in self.sbatch:
            if not line.strip().startswith("-"):
                raise ConfigError(f"slurm.sbatch entry {line!r} must be an sbatch option such as --mail-type=END")

    @classmethod
    def from_mapping(cls, values: dict, where: str = "slurm") -> "SlurmResources":
        """From a sweep file's section; an unknown field or a wrong type is one line naming it."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a mapping of resource fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]} is not a resource field; known: {', '.join(sorted(known))}")
        values = dict(values)
        if isinstance(values.get("sbatch"), str):
            values["sbatch"] = [values["sbatch"]]
        if "time" in values and isinstance(values["time"], int) and not isinstance(values["time"], bool):
            values["time"] = str(values["time"])
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(str(err).replace("slurm.", f"{where}.", 1)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
