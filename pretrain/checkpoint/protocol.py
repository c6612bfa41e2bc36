"""The collective checkpoint protocol: every rank of a running job saves and loads together.

The format is pretrain/checkpoint/format.py; this module moves a DeepSpeed
engine's state into and out of it:

* Every tensor is stored whole over data parallel (assembled with DeepSpeed's
  public ``safe_get_full_*`` API, which works at every ZeRO stage), per
  tensor-parallel shard, under mesh_model's layout-invariant parameter names.
* Within the DP group of one (TP, PP) rank, parameter i is written by DP rank
  ``i % DP``, so the bytes are spread over all ranks. A pipeline-replicated core
  layer is written once, by its first holder; a TP-replicated parameter (norms,
  routers, row-parallel biases) by TP rank 0.
* :func:`begin_save` captures the state at the step (collective) and writes this
  rank's files, in a background thread if asked; :func:`finish_save` waits for
  them, then rank 0 writes meta.json (last) and moves ``latest``.
* :func:`load` reshards on the fly: TP shards are concatenated and re-split,
  each pipeline stage picks its tensors; RNG states are restored only at the
  same layout.

The layout comes from the parallel plan; DeepSpeed's optimizer internals from
pretrain/compat.py.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from pretrain import compat
from pretrain.checkpoint.format import (
    ADAM_KEYS, LATEST, META, CheckpointError, CheckpointMeta, FileRecord, TensorRecord, atomic_write_text,
    bytes_record, check_model_compatible, choose_resume, file_cache, inspect_dir, load_file, read_meta, reshard,
    rng_file_name, save_file, state_file_name, step_dir_name,
)

if TYPE_CHECKING:
    from pretrain.parallel.plan import ParallelPlan

SavePoint = Callable[[str, int, Path, int], None]
"""A callback at a named point of saving: (point, step, checkpoint dir, rank). Points:
"files" (this rank's state files written, the metadata not yet), "meta" (the metadata
written, ``latest`` not yet moved). Tests use it to kill a rank inside a save."""


def _no_save_point(point: str, step: int, path: Path, rank: int) -> None:
    return None


# ============================================================================ engine state
def _full_states(engine, zero_stage: int, param: torch.nn.Parameter, with_moments: bool) -> dict[str, torch.Tensor]:
    """fp32 weight and Adam moments of this rank's TP shard of ``param``, whole over DP.

    Collective over the DP group at ZeRO >= 1.
    """
    if zero_stage == 0:
        out = {"param": param.detach().float().clone()}
        state = compat.base_optimizer(engine).state.get(param, {})
        if with_moments:
            out.update({k: state[k].detach().clone() for k in ADAM_KEYS})
        return out
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    shape = compat.full_shape(param)
    # Each call assembles a fresh buffer (zeros + the DP reduction), so no copy is needed
    # to keep it while training goes on.
    out = {"param": safe_get_full_fp32_param(param).reshape(shape).cpu()}
    if with_moments:
        for key in ADAM_KEYS:
            out[key] = safe_get_full_optimizer_state(param, key).reshape(shape).cpu()
    return out


def _set_states(engine, zero_stage: int, param: torch.nn.Parameter, states: dict[str, torch.Tensor]) -> None:
    value = states["param"]
    if zero_stage == 0:
        param.data.copy_(value.to(param.dtype))
        base_state = compat.base_optimizer(engine).state.get(param)
        for key in ADAM_KEYS:
            if key in states and base_state is not None:
                base_state[key].copy_(states[key])
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if zero_stage == 3:
        import deepspeed

        # Every DP rank holds the same full value, so any rank may "modify".
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank(group=compat.zero_dp_group(engine)) == 0:
                param.data.copy_(value.to(param.dtype))
    else:
        param.data.copy_(value.to(param.dtype))
    safe_set_full_fp32_param(param, value.to(torch.float32))
    for key in ADAM_KEYS:
        if key in states:
            safe_set_full_optimizer_state(param, states[key], key)


def _is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ============================================================================ failures
class CheckpointSaveError(CheckpointError):
    """A save that failed on some rank (no space, read-only, permission, I/O error): its partial
    files are removed, the last complete checkpoint is intact."""


_ERRNO_TEXT = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "I/O error",
}


def describe_os_error(err: BaseException) -> str:
    """'no space left on device (writing /x/y)' for an OSError; the error itself otherwise."""
    if isinstance(err, OSError) and err.errno is not None:
        what = _ERRNO_TEXT.get(err.errno, err.strerror or os.strerror(err.errno))
        where = f" ({err.filename})" if err.filename else ""
        return f"{what}{where}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def _raise_if_any_failed(error: Optional[BaseException], root: Path, path: Path) -> None:
    """Collective: every rank learns whether any rank failed; then all raise the same one line,
    after rank 0 removed the partial save."""
    failed = [None] * dist.get_world_size()
    dist.all_gather_object(failed, describe_os_error(error) if error is not None else None)
    problems = [(r, e) for r, e in enumerate(failed) if e]
    if not problems:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    rank, first = problems[0]
    others = f" (and {len(problems) - 1} more rank(s))" if len(problems) > 1 else ""
    latest = choose_resume(root, checksums=False)[0] if root.is_dir() else None
    raise CheckpointSaveError(
        f"saving checkpoint {path.name} failed: {first} on rank {rank}{others}; partial files removed; "
        f"the last complete checkpoint {latest.path if latest else '(none)'} is intact: free space or fix "
        "the folder, then run the same command to resume"
    )


# ============================================================================ save
@dataclass
class PendingSave:
    """A save whose state is captured in memory; its files may still be being written."""

    root: Path
    path: Path
    step: int
    plan: "ParallelPlan"
    started: float
    meta: Optional[CheckpointMeta]
    """Rank 0: meta.json but the files and tensors (captured at the step); None elsewhere."""
    config_text: str
    index: dict[str, TensorRecord]
    save_point: SavePoint = _no_save_point
    files: dict[str, FileRecord] = field(default_factory=dict)
    error: Optional[BaseException] = None
    thread: Optional[threading.Thread] = None

    def written(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


def save(root: Path, step: int, **kwargs) -> Path:
    """Writes the checkpoint of ``step`` (collective: every rank calls it). Returns its path."""
    return finish_save(begin_save(root, step, **kwargs))


def _rank_coordinates(plan: "ParallelPlan") -> dict:
    return {**plan.sizes(), "tp_rank": plan.tp_rank, "pp_rank": plan.pp_rank, "dp_rank": plan.dp_rank,
            "rank": plan.rank}


def begin_save(
    root: Path,
    step: int,
    *,
    engine,
    scheduler,
    plan: "ParallelPlan",
    run_config,
    counters: dict,
    reason: str = "",
    background: bool = False,
    tokenizer_sha256: Optional[str] = None,
    save_point: SavePoint = _no_save_point,
) -> PendingSave:
    """Captures this step's state (collective) and writes this rank's files, in a background
    thread with ``background``; :func:`finish_save` completes the checkpoint.

    ``counters``: the training state (step, consumed samples, skipped steps...),
    stored in the metadata and handed back by :func:`load`.
    """
    root = Path(root)
    path = root / step_dir_name(step)
    error = None
    if plan.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                # Only reachable for an interrupted save of this step, or a run resumed
                # from an older checkpoint that passes this step again: set the old one aside.
                old = inspect_dir(path)
                kind = "replaced" if old.complete else "interrupted"
                aside = path.with_name(f"{path.name}.{kind}-{int(time.time())}")
                os.replace(path, aside)
                if not old.complete:
                    shutil.rmtree(aside, ignore_errors=True)
            (path / "state").mkdir(parents=True)
            (path / "rng").mkdir()
        except OSError as err:
            error = err
    _raise_if_any_failed(error, root, path)  # also the barrier: no rank writes before the folder exists
    started = time.perf_counter()

    # This rank's share of the tensors (collective over DP for every parameter), as copies:
    # training may go on while they are written.
    named = list(engine.module.named_parameters())
    owned = [
        (name, p) for name, p in named
        if not compat.is_pipeline_replica(p) and (plan.tp_rank == 0 or _is_tp_sharded(p))
    ]
    adam_step = compat.adam_step_count(engine)
    if adam_step is not None:
        compat.link_optimizer_views(engine)
    shard: dict[str, dict] = {}
    index: dict[str, TensorRecord] = {}
    state_file = state_file_name(plan.tp_rank, plan.pp_rank, plan.dp_rank)
    for i, (name, param) in enumerate(owned):
        states = _full_states(engine, plan.zero_stage, param, adam_step is not None)
        if i % plan.data != plan.dp_rank:
            continue
        sharded = _is_tp_sharded(param)
        shard[name] = states
        full_shape = list(states["param"].shape)
        if sharded:
            full_shape[param.partition_dim] *= plan.tensor
        index[name] = TensorRecord(
            shape=full_shape,
            tp_dim=param.partition_dim if sharded else None,
            tp_size=plan.tensor if sharded else 1,
            shards={str(plan.tp_rank if sharded else 0): state_file},
        )
    rng = {"layout": _rank_coordinates(plan), "state": _rng_state()}
    meta = None
    if plan.rank == 0:
        meta = CheckpointMeta(
            step=step,
            counters=dict(counters),
            adam_step=adam_step,
            scheduler=_scheduler_state(scheduler),
            engine=compat.engine_counters(engine),
            layout=plan.sizes(),
            model=run_config.model.to_dict(),
            reason=reason,
            environment=environment(),
            tokenizer_sha256=tokenizer_sha256,
        )
    pending = PendingSave(root, path, step, plan, started, meta, _config_text(run_config), index, save_point)

    def write() -> None:
        try:
            if shard:
                pending.files[state_file] = save_file(shard, path / state_file)
            rng_file = rng_file_name(plan.rank)
            pending.files[rng_file] = save_file(rng, path / rng_file)
            save_point("files", step, path, plan.rank)
        except BaseException as err:  # reported by finish_save, on the main thread
            pending.error = err

    if background:
        pending.thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        pending.thread.start()
    else:
        write()
    return pending


def finish_save(pending: PendingSave) -> Path:
    """Waits for this rank's files, then rank 0 writes meta.json and moves ``latest`` (collective)."""
    if pending.thread is not None:
        pending.thread.join()
    _raise_if_any_failed(pending.error, pending.root, pending.path)
    rank = pending.plan.rank
    reports = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((pending.files, pending.index), reports, dst=0)
    if rank == 0:
        meta = pending.meta
        for rank_files, rank_index in reports:
            meta.files.update(rank_files)
            for name, entry in rank_index.items():
                if name in meta.tensors:
                    meta.tensors[name].shards.update(entry.shards)
                else:
                    meta.tensors[name] = entry
        meta.files["config.yaml"] = bytes_record(pending.config_text.encode())
        meta.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta.save_seconds = round(time.perf_counter() - pending.started, 3)
        meta.asynchronous = pending.thread is not None
        meta.torch = torch.__version__
        error = None
        try:
            (pending.path / "config.yaml").write_text(pending.config_text)
            atomic_write_text(pending.path / META, meta.to_json())
            pending.save_point("meta", pending.step, pending.path, rank)
            atomic_write_text(pending.root / LATEST, pending.path.name + "\n")
        except OSError as err:
            error = err
    else:
        error = None
    _raise_if_any_failed(error, pending.root, pending.path)
    return pending.path


def environment() -> dict:
    """What changes float round-off between two runs of the same layout: the thread count and the
    library versions (a resume is bitwise exact only when they are the same)."""
    import importlib.metadata
    import platform

    def version(name: str) -> Optional[str]:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "deepspeed": version("deepspeed"),
            "megatron_core": version("megatron-core"), "python": platform.python_version()}


def environment_notes(saved: dict) -> list[str]:
    """One note if the saving run's threads or versions differ from this process's."""
    if not saved:
        return []
    current = environment()
    changed = [f"{key} {saved.get(key)} -> {current.get(key)}" for key in current
               if key in saved and saved.get(key) != current.get(key)]
    if not changed:
        return []
    return [f"this run differs from the one that saved ({', '.join(changed)}): the resume is exact only "
            "to float round-off, not bitwise"]


def _config_text(run_config) -> str:
    import yaml

    return yaml.safe_dump(run_config.to_dict(), sort_keys=False)


def _scheduler_state(scheduler) -> dict:
    import json

    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # functools.partial objects: rebuilt from the config
    return json.loads(json.dumps(state, default=float))


# ============================================================================ load
@dataclass
class LoadReport:
    path: Path
    counters: dict
    notes: list[str]
    restored_optimizer: bool
    restored_rng: bool


def load(path: Path, *, engine, scheduler, plan: "ParallelPlan", model_config) -> LoadReport:
    """Loads a checkpoint into an engine built for the plan's layout (collective)."""
    meta = read_meta(path)
    notes = check_model_compatible(meta, model_config, path) + environment_notes(meta.environment)
    saved = meta.layout
    same_layout = all(saved[k] == getattr(plan, k) for k in ("tensor", "pipeline", "data"))

    # Optimizer state must exist before it can be overwritten.
    if meta.adam_step is not None:
        compat.materialize_adam_state(engine, float(meta.adam_step))

    file = file_cache(path)
    for name, param in engine.module.named_parameters():
        entry = meta.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{path / META}: no tensor {name!r} (a different model or a damaged checkpoint)")
        local_shape = list(compat.full_shape(param))
        states = _assemble(path, name, entry, file, plan.tensor, plan.tp_rank, _is_tp_sharded(param),
                           getattr(param, "partition_dim", None))
        if list(states["param"].shape) != local_shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(states['param'].shape)} here, "
                f"the model needs {local_shape} (a different model)"
            )
        _set_states(engine, plan.zero_stage, param, states)
    del file  # the state files' memory maps

    # LR schedule and engine counters; the group LRs follow the restored schedule.
    sched = scheduler.state_dict()
    sched.update(meta.scheduler)
    scheduler.load_state_dict(sched)
    for group, lr in zip(compat.base_optimizer(engine).param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    compat.restore_engine_counters(engine, meta.engine)

    restored_rng = False
    rng_path = path / rng_file_name(plan.rank)
    if same_layout and rng_path.is_file():
        _set_rng_state(load_file(rng_path)["state"])
        restored_rng = True
    else:
        notes.append(
            f"layout changed (checkpoint TP{saved['tensor']} PP{saved['pipeline']} DP{saved['data']}, "
            f"now TP{plan.tensor} PP{plan.pipeline} DP{plan.data}): weights and optimizer state "
            "resharded, RNG states re-seeded from train.seed"
        )
    dist.barrier()
    return LoadReport(path, dict(meta.counters), notes, meta.adam_step is not None, restored_rng)


def _assemble(path: Path, name: str, entry: TensorRecord, file, tp_size: int, tp_rank: int, sharded: bool,
              partition_dim) -> dict:
    """This rank's TP shard of one tensor's states, from the shards the checkpoint has."""
    if (entry.tp_dim is not None) != sharded or (sharded and entry.tp_dim != partition_dim):
        raise CheckpointError(f"{path}: tensor {name!r} is split differently than this model's (a different model)")
    return reshard(path, name, entry, file, tp_size, tp_rank)
