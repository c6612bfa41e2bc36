"""Checkpoints: one directory per step, loadable at any parallel layout, complete only once its metadata is.

    checkpoints/
      latest                      "step0000200", replaced atomically after each complete save
      step0000200/
        state/tp00-pp00-dp00.pt   a share of the fp32 weights and Adam moments (see below)
        rng/rank00000.pt          python, numpy, torch and model-parallel RNG states of one rank
        config.yaml               the resolved run config
        meta.json                 written last: step and sample counters, layout, LR schedule,
                                  where every tensor is, and every file's size and sha256

Why not DeepSpeed's own ``save_checkpoint``: it stores ZeRO's flat optimizer
partitions, whose layout depends on the data-parallel size and ZeRO stage, so a
run could only resume at the layout that wrote it. Here every tensor is stored
whole over data parallel (assembled with DeepSpeed's public ``safe_get_full_*``
API, which works at every ZeRO stage), per tensor-parallel shard, under
mesh_model's layout-invariant parameter names (core layer k is ``core.layers.k``
on every pipeline stage that holds a copy). So a checkpoint loads:

* at any DP size and ZeRO stage, weights and optimizer state alike, and bitwise
  exactly at the same layout;
* at another TP size: shards are concatenated along megatron's
  ``partition_dim`` and re-split (the padded vocabulary does not depend on TP);
* at another PP layout: each stage picks the parameters it holds.

Within the DP group of one (TP, PP) rank, parameter i is written by DP rank
``i % DP``, so the bytes are spread over all ranks. A pipeline-replicated core
layer is written once, by its first holder; a TP-replicated parameter (norms,
routers, row-parallel biases) by TP rank 0.

Crash safety: state files go into the step directory first; rank 0 writes
``meta.json`` (temporary name, fsync, rename) only after every rank reported its
files with their sizes and checksums, then moves ``latest``. A directory without
``meta.json`` is an interrupted save: it is never loaded, and the next save of
that step replaces it. Resume takes the newest complete checkpoint that
verifies, and says which one it chose and why it passed over newer ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

FORMAT = "mesh-checkpoint"
FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step(\d{7,})$")

# ModelConfig fields that do not change any parameter's shape or meaning: they
# may differ between the run that saved and the run that resumes.
_FREE_MODEL_FIELDS = {"recompute", "init_seed", "init_method_std", "router_init_std",
                      "hidden_dropout", "attention_dropout", "seq_length"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used: incomplete, damaged, or for another model."""


def step_dir_name(step: int) -> str:
    return f"step{step:07d}"


# ============================================================================ on disk
@dataclass
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    problem: str = ""
    """Why it is not complete, or empty."""
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def layout(self) -> str:
        lay = self.meta.get("layout", {})
        if not lay:
            return "?"
        return f"TP{lay['tensor']} PP{lay['pipeline']} DP{lay['data']} ZeRO{lay['zero_stage']}"


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint directory, or CheckpointError saying what is wrong with it."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META} (the save was interrupted; this checkpoint is incomplete)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} metadata file")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {meta.get('version')}, this tool reads version {FORMAT_VERSION}"
        )
    return meta


def inspect_dir(path: Path) -> CheckpointInfo:
    match = _STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else -1
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        return CheckpointInfo(path, step, False, str(err).split(": ", 1)[-1])
    return CheckpointInfo(path, int(meta["step"]), True, "", meta)


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Every step directory under ``root``, oldest first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted((inspect_dir(p) for p in dirs), key=lambda info: info.step)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | Path, checksums: bool = True) -> list[str]:
    """Problems of one checkpoint (empty if none): metadata, missing files, sizes, sha256."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        return [str(err)]
    problems = []
    for rel, expected in sorted(meta.get("files", {}).items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{file}: {size} bytes, the metadata says {expected['bytes']} (truncated or damaged)")
        elif checksums and _sha256(file) != expected["sha256"]:
            problems.append(f"{file}: sha256 differs from the metadata (damaged)")
    return problems


def choose_resume(root: str | Path, checksums: bool = True) -> tuple[Optional[CheckpointInfo], list[str]]:
    """The newest complete checkpoint that verifies, and one line per newer one passed over."""
    passed_over = []
    for info in reversed(list_checkpoints(root)):
        if not info.complete:
            passed_over.append(f"{info.name}: {info.problem}")
            continue
        problems = verify(info.path, checksums)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            passed_over.append(f"{info.name}: {problems[0]}{more}")
            continue
        return info, passed_over
    return None, passed_over


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A file wrapper that counts and hashes what torch.save writes (no second read)."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save_file(obj: Any, path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": writer.bytes, "sha256": writer.digest.hexdigest()}


def _bytes_entry(data: bytes) -> dict:
    """The metadata's record of a file written from memory: size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_cache(path: Path):
    """A loader of a checkpoint's files by relative name; each file is read once."""
    cache: dict[str, Any] = {}

    def file(rel: str) -> Any:
        if rel not in cache:
            cache[rel] = _load_file(path / rel)
        return cache[rel]

    return file


def _load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # torch raises RuntimeError / pickle errors / zipfile errors
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})") from None


# ============================================================================ retention
def retained_steps(steps: Iterable[int], keep_last: int, keep_every: int, keep_log_spaced: bool) -> set[int]:
    """Which complete checkpoints the policy keeps: the last ``keep_last``, every
    ``keep_every``-th step, and with ``keep_log_spaced`` the powers of two (Pythia's
    early checkpoints, for scaling-law studies)."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    if keep_log_spaced:
        keep |= {s for s in steps if s > 0 and s & (s - 1) == 0}
    return keep


def prune(root: Path, keep_last: int, keep_every: int, keep_log_spaced: bool, protect: int) -> list[str]:
    """Deletes what the policy does not keep; returns what it removed.

    Interrupted saves older than the newest complete checkpoint are removed too
    (they can never be loaded). ``protect`` (the step just saved) always stays.
    """
    infos = list_checkpoints(root)
    complete = [i for i in infos if i.complete]
    keep = retained_steps([i.step for i in complete], keep_last, keep_every, keep_log_spaced) | {protect}
    newest = max((i.step for i in complete), default=-1)
    removed = []
    for info in infos:
        stale = not info.complete and info.step < newest
        if (info.complete and info.step not in keep) or stale:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.name)
    return removed


# ============================================================================ engine state
def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that holds the optimizer state (DeepSpeed wraps it at ZeRO >= 1)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def adam_step_count(engine) -> Optional[float]:
    steps = {float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s}
    if not steps:
        return None
    if len(steps) > 1:
        raise RuntimeError(f"optimizer state has different step counts {sorted(steps)}")
    return steps.pop()


def _materialize_adam_state(engine, step: float) -> None:
    """Creates AdamW's per-parameter state (zeros) so it can be overwritten from a checkpoint.

    torch creates it lazily at the first step, in exactly this form: a float32
    scalar step count and zero moments shaped like the (flat, partitioned at
    ZeRO >= 1) fp32 parameters the optimizer steps.
    """
    base = _base_optimizer(engine)
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
    _link_optimizer_views(engine)


def _link_optimizer_views(engine) -> None:
    """DeepSpeed internals (0.19.8): at ZeRO 1/2 each parameter's view into the flat
    optimizer state is linked once, lazily, at a step; when that first step found no
    state yet (it is created inside the step), the views stay missing. Relink."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _full_states(engine, zero_stage: int, param: torch.nn.Parameter, with_moments: bool) -> dict[str, torch.Tensor]:
    """fp32 weight and Adam moments of this rank's TP shard of ``param``, whole over DP.

    Collective over the DP group at ZeRO >= 1.
    """
    if zero_stage == 0:
        out = {"param": param.detach().float().clone()}
        state = _base_optimizer(engine).state.get(param, {})
        if with_moments:
            out.update({k: state[k].detach().clone() for k in ADAM_KEYS})
        return out
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    shape = tuple(getattr(param, "ds_shape", param.shape))
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
        base_state = _base_optimizer(engine).state.get(param)
        for key in ADAM_KEYS:
            if key in states and base_state is not None:
                base_state[key].copy_(states[key])
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if zero_stage == 3:
        import deepspeed

        # Every DP rank holds the same full value, so any rank may "modify".
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank(group=engine.optimizer.dp_process_group) == 0:
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


# ============================================================================ save / load
@dataclass
class Layout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int

    @classmethod
    def current(cls, zero_stage: int) -> "Layout":
        from megatron.core import parallel_state as ps

        return cls(
            tensor=ps.get_tensor_model_parallel_world_size(),
            pipeline=ps.get_pipeline_model_parallel_world_size(),
            data=ps.get_data_parallel_world_size(),
            zero_stage=zero_stage,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            rank=dist.get_rank(),
        )

    def sizes(self) -> dict:
        return {"tensor": self.tensor, "pipeline": self.pipeline, "data": self.data, "zero_stage": self.zero_stage}


@dataclass
class PendingSave:
    """A save whose state is captured in memory; its files may still be being written."""

    root: Path
    path: Path
    step: int
    layout: Layout
    started: float
    meta: dict
    """Rank 0: everything of meta.json but the files and tensors (captured at the step)."""
    index: dict
    files: dict = field(default_factory=dict)
    error: Optional[BaseException] = None
    thread: Optional[threading.Thread] = None

    def written(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


def save(root: Path, step: int, **kwargs) -> Path:
    """Writes the checkpoint of ``step`` (collective: every rank calls it). Returns its path."""
    return finish_save(begin_save(root, step, **kwargs))


def begin_save(
    root: Path,
    step: int,
    *,
    engine,
    scheduler,
    zero_stage: int,
    run_config,
    counters: dict,
    rank0_extra: Optional[dict] = None,
    background: bool = False,
) -> PendingSave:
    """Captures this step's state (collective) and writes this rank's files, in a background
    thread with ``background``; :func:`finish_save` completes the checkpoint.

    ``counters``: the trainer's progress (step, consumed samples, skipped steps...),
    stored in the metadata and handed back by :func:`load`.
    """
    from pretrain import faults

    layout = Layout.current(zero_stage)
    root = Path(root)
    path = root / step_dir_name(step)
    if layout.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # Only reachable for an interrupted save of this step, or a run resumed
            # from an older checkpoint that passes this step again: set the old one aside.
            old = inspect_dir(path)
            aside = path.with_name(f"{path.name}.{'replaced' if old.complete else 'interrupted'}-{int(time.time())}")
            os.replace(path, aside)
            if not old.complete:
                shutil.rmtree(aside, ignore_errors=True)
        (path / "state").mkdir(parents=True)
        (path / "rng").mkdir()
    dist.barrier()
    started = time.perf_counter()

    # This rank's share of the tensors (collective over DP for every parameter), as copies:
    # training may go on while they are written.
    named = list(engine.module.named_parameters())
    owned = [
        (name, p) for name, p in named
        if not getattr(p, "ds_pipe_replicated", False) and (layout.tp_rank == 0 or _is_tp_sharded(p))
    ]
    has_moments = adam_step_count(engine) is not None
    if has_moments:
        _link_optimizer_views(engine)
    shard: dict[str, dict] = {}
    index: dict[str, dict] = {}
    state_file = f"state/tp{layout.tp_rank:02d}-pp{layout.pp_rank:02d}-dp{layout.dp_rank:02d}.pt"
    for i, (name, param) in enumerate(owned):
        states = _full_states(engine, zero_stage, param, has_moments)
        if i % layout.data != layout.dp_rank:
            continue
        sharded = _is_tp_sharded(param)
        shard[name] = states
        full_shape = list(states["param"].shape)
        if sharded:
            full_shape[param.partition_dim] *= layout.tensor
        index[name] = {
            "shape": full_shape,
            "tp_dim": param.partition_dim if sharded else None,
            "tp_size": layout.tensor if sharded else 1,
            "shards": {str(layout.tp_rank if sharded else 0): state_file},
        }
    rng = {"layout": dataclasses.asdict(layout), "state": _rng_state()}
    meta = {}
    if layout.rank == 0:
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "counters": dict(counters),
            "adam_step": adam_step_count(engine),
            "scheduler": _scheduler_state(scheduler),
            "engine": {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "skipped_steps")},
            "layout": layout.sizes(),
            "model": run_config.model.to_dict(),
            "config_text": _config_text(run_config),
            **(rank0_extra or {}),
        }
    pending = PendingSave(root, path, step, layout, started, meta, index)

    def write() -> None:
        try:
            if shard:
                pending.files[state_file] = _save_file(shard, path / state_file)
            rng_file = f"rng/rank{layout.rank:05d}.pt"
            pending.files[rng_file] = _save_file(rng, path / rng_file)
            faults.pause_point("files", step, path, layout.rank)
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
    from pretrain import faults

    if pending.thread is not None:
        pending.thread.join()
    failed = [None] * dist.get_world_size()
    dist.all_gather_object(failed, repr(pending.error) if pending.error else None)
    errors = [f"rank {r}: {e}" for r, e in enumerate(failed) if e]
    if errors:
        raise CheckpointError(f"{pending.path}: saving failed ({'; '.join(errors)}); the previous checkpoint is intact")
    layout = pending.layout
    reports = [None] * dist.get_world_size() if layout.rank == 0 else None
    dist.gather_object((pending.files, pending.index), reports, dst=0)
    if layout.rank == 0:
        all_files, tensors = {}, {}
        for rank_files, rank_index in reports:
            all_files.update(rank_files)
            for name, entry in rank_index.items():
                if name in tensors:
                    tensors[name]["shards"].update(entry["shards"])
                else:
                    tensors[name] = entry
        meta = dict(pending.meta)
        config_text = meta.pop("config_text")
        (pending.path / "config.yaml").write_text(config_text)
        all_files["config.yaml"] = _bytes_entry(config_text.encode())
        meta.update({
            "tensors": dict(sorted(tensors.items())),
            "files": dict(sorted(all_files.items())),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "save_seconds": round(time.perf_counter() - pending.started, 3),
            "asynchronous": pending.thread is not None,
            "torch": torch.__version__,
        })
        _atomic_write_text(pending.path / META, json.dumps(meta, indent=1) + "\n")
        faults.pause_point("meta", pending.step, pending.path, layout.rank)
        _atomic_write_text(pending.root / LATEST, pending.path.name + "\n")
    dist.barrier()
    return pending.path


def _config_text(run_config) -> str:
    import yaml

    return yaml.safe_dump(run_config.to_dict(), sort_keys=False)


def _scheduler_state(scheduler) -> dict:
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # functools.partial objects: rebuilt from the config
    return json.loads(json.dumps(state, default=float))


def check_model_compatible(meta: dict, model_config, where: Path) -> list[str]:
    """Raises if the checkpoint is for a different model shape; returns notes on harmless differences."""
    saved = meta.get("model", {})
    current = model_config.to_dict()
    notes, conflicts = [], []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) == current.get(key):
            continue
        text = f"model.{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
        (notes if key in _FREE_MODEL_FIELDS else conflicts).append(text)
    if conflicts:
        raise CheckpointError(
            f"{where / META}: written for a different model ({'; '.join(conflicts)}); "
            "resume with the model config it was trained with, or start a new run"
        )
    return notes


@dataclass
class LoadReport:
    path: Path
    counters: dict
    notes: list[str]
    restored_optimizer: bool
    restored_rng: bool


def load(path: Path, *, engine, scheduler, zero_stage: int, model_config) -> LoadReport:
    """Loads a checkpoint into an engine built for the current layout (collective)."""
    layout = Layout.current(zero_stage)
    meta = read_meta(path)
    notes = check_model_compatible(meta, model_config, path)
    saved = meta["layout"]
    same_layout = all(saved[k] == getattr(layout, k) for k in ("tensor", "pipeline", "data"))

    # Optimizer state must exist before it can be overwritten.
    adam_step = meta.get("adam_step")
    if adam_step is not None:
        _materialize_adam_state(engine, float(adam_step))

    file = _file_cache(path)
    tensors = meta["tensors"]
    for name, param in engine.module.named_parameters():
        entry = tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{path / META}: no tensor {name!r} (a different model or a damaged checkpoint)")
        local_shape = list(getattr(param, "ds_shape", param.shape))
        states = _assemble(path, name, entry, file, layout.tensor, layout.tp_rank, _is_tp_sharded(param),
                           getattr(param, "partition_dim", None))
        if list(states["param"].shape) != local_shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(states['param'].shape)} here, "
                f"the model needs {local_shape} (a different model)"
            )
        _set_states(engine, zero_stage, param, states)
    del file  # the state files' memory maps

    # LR schedule and engine counters; the group LRs follow the restored schedule.
    sched = scheduler.state_dict()
    sched.update(meta["scheduler"])
    scheduler.load_state_dict(sched)
    for group, lr in zip(_base_optimizer(engine).param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    for key, value in meta.get("engine", {}).items():
        setattr(engine, key, value)

    restored_rng = False
    rng_path = path / f"rng/rank{layout.rank:05d}.pt"
    if same_layout and rng_path.is_file():
        _set_rng_state(_load_file(rng_path)["state"])
        restored_rng = True
    else:
        notes.append(
            f"layout changed (checkpoint TP{saved['tensor']} PP{saved['pipeline']} DP{saved['data']}, "
            f"now TP{layout.tensor} PP{layout.pipeline} DP{layout.data}): weights and optimizer state "
            "resharded, RNG states re-seeded from train.seed"
        )
    dist.barrier()
    return LoadReport(path, dict(meta["counters"]), notes, adam_step is not None, restored_rng)


def _assemble(path: Path, name: str, entry: dict, file, tp_size: int, tp_rank: int, sharded: bool,
              partition_dim) -> dict:
    """This rank's TP shard of one tensor's states, from the shards the checkpoint has."""
    if (entry["tp_dim"] is not None) != sharded or (sharded and entry["tp_dim"] != partition_dim):
        raise CheckpointError(f"{path}: tensor {name!r} is split differently than this model's (a different model)")
    return _reshard(path, name, entry, file, tp_size, tp_rank)


def _reshard(path: Path, name: str, entry: dict, file, tp_size: int, tp_rank: int) -> dict:
    """Shard ``tp_rank`` of ``tp_size`` of one tensor's states (whole if it is not TP-split)."""
    saved_dim = entry["tp_dim"]

    def shard_states(saved_rank: int) -> dict:
        rel = entry["shards"].get(str(saved_rank))
        if rel is None:
            raise CheckpointError(f"{path / META}: tensor {name!r} lacks its TP shard {saved_rank} (damaged metadata)")
        data = file(rel)
        if name not in data:
            raise CheckpointError(f"{path / rel}: has no tensor {name!r} (damaged)")
        return data[name]

    if saved_dim is None:
        return shard_states(0)
    saved_tp = entry["tp_size"]
    if saved_tp == tp_size:
        return shard_states(tp_rank)
    pieces = [shard_states(r) for r in range(saved_tp)]
    out = {}
    for key in pieces[0]:
        full = torch.cat([p[key] for p in pieces], dim=saved_dim)
        # A slice of a larger tensor is copied, so the whole does not stay alive behind it.
        out[key] = full.chunk(tp_size, dim=saved_dim)[tp_rank].clone() if tp_size > 1 else full
    return out


# ============================================================================ offline tools
def consolidate(path: Path, with_optimizer: bool = False) -> dict[str, torch.Tensor]:
    """{name: full fp32 tensor} of a checkpoint, all TP shards merged (one process, no GPU)."""
    meta = read_meta(path)
    file = _file_cache(path)
    out: dict[str, torch.Tensor] = {}
    for name, entry in meta["tensors"].items():
        states = _reshard(path, name, entry, file, tp_size=1, tp_rank=0)
        keys = ["param", *(ADAM_KEYS if with_optimizer and "exp_avg" in states else ())]
        for key in keys:  # copies: independent of the (memory-mapped) state files
            out[name if key == "param" else f"{name}#{key}"] = states[key].clone()
    return out
