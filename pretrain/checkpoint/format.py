"""The checkpoint format: one directory per step, loadable at any parallel layout, complete only once its metadata is.

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

This module owns the format (typed metadata, reading, verifying, listing,
retention, resharding, consolidation); the collective protocol that writes and
loads it in a running job is pretrain/checkpoint/protocol.py. It imports neither
torch.distributed nor DeepSpeed.

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
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

FORMAT = "mesh-checkpoint"
FORMAT_VERSION = 2
"""2: meta.json carries the sha256 of its own canonical content (`meta_sha256`). Version 1
(without it) is still read; its metadata is not protected against edits."""
READABLE_VERSIONS = (1, 2)
META = "meta.json"
LATEST = "latest"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step(\d{7,})$")
_SET_ASIDE_DIR = re.compile(r"^step(\d{7,})\.(replaced|interrupted)-(\d+)$")

# ModelConfig fields that do not change any parameter's shape or meaning: they
# may differ between the run that saved and the run that resumes.
_FREE_MODEL_FIELDS = {"recompute", "init_seed", "init_method_std", "router_init_std",
                      "hidden_dropout", "attention_dropout", "seq_length"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used: incomplete, damaged, or for another model."""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def step_dir_name(step: int) -> str:
    return f"step{step:07d}"


def is_step_dir_name(name: str) -> bool:
    return bool(_STEP_DIR.match(name))


def is_checkpoint_dir(path: Path) -> bool:
    """A step directory, complete or not: it has meta.json or state/, or a step directory's name."""
    return (path / META).exists() or (path / "state").is_dir() or is_step_dir_name(path.name)


def holds_checkpoints(path: Path) -> bool:
    """A run folder (it has checkpoints/) or a checkpoints folder (it has step directories)."""
    return (path / "checkpoints").is_dir() or any(is_step_dir_name(p.name) for p in path.glob("step*"))


def resolve_checkpoint(path: str | Path) -> Path:
    """What a user means by a checkpoint path: a step directory itself; a checkpoints folder or a
    run folder (one holding checkpoints/) its newest complete checkpoint. One-line error otherwise."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path  # complete or not (its own error says which)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint, checkpoints folder or run folder")
    complete = [info for info in list_checkpoints(root) if info.complete]
    if not complete:
        raise CheckpointError(f"{root}: holds no complete checkpoint (`mesh ckpt list {root}`)")
    return complete[-1].path


def state_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """A rank's share of the tensors, relative to the step directory."""
    return f"state/tp{tp_rank:02d}-pp{pp_rank:02d}-dp{dp_rank:02d}.pt"


def rng_file_name(rank: int) -> str:
    return f"rng/rank{rank:05d}.pt"


# ============================================================================ metadata
@dataclass
class FileRecord:
    bytes: int
    sha256: str


@dataclass
class TensorRecord:
    """Where one tensor's states are: its full shape and, per TP shard, the state file."""

    shape: list[int]
    tp_dim: Optional[int]
    """The dimension TP splits it along (megatron's partition_dim); None if replicated over TP."""
    tp_size: int
    shards: dict[str, str]
    """{TP rank (as text): state file}."""


@dataclass
class CheckpointMeta:
    """meta.json: written last, so a checkpoint is complete exactly when it has one.

    The field order is the order in the file."""

    step: int
    counters: dict
    """The training state (pretrain/state.py TrainState.state_dict())."""
    adam_step: Optional[float]
    """AdamW's step count (None before the first update)."""
    scheduler: dict
    """The LR scheduler's state_dict, without its lambdas (rebuilt from the config)."""
    engine: dict
    """DeepSpeed's own counters (pretrain/compat.py engine_counters)."""
    layout: dict
    """{"tensor", "pipeline", "data", "zero_stage"} of the run that saved."""
    model: dict
    """The ModelConfig it was trained with."""
    reason: str = ""
    """Why it was saved ("every 100 steps", "SIGTERM received", ...)."""
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    """{path relative to the step directory: size and sha256}, every file but meta.json."""
    created: str = ""
    save_seconds: float = 0.0
    asynchronous: bool = False
    torch: str = ""
    environment: dict = field(default_factory=dict)
    """What can change round-off between runs: {"threads", "torch", "deepspeed", "megatron_core",
    "python"} of the run that saved (rank 0)."""
    tokenizer_sha256: Optional[str] = None
    """The tokenizer file's sha256: a resume with another tokenizer is refused."""
    converted_from: Optional[str] = None
    """The checkpoint this one was rewritten from (`mesh ckpt convert --to layout`)."""
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        out = {"format": self.format, "version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            if f.name not in out:
                out[f.name] = getattr(self, f.name)
        out["tensors"] = {k: dataclasses.asdict(v) for k, v in sorted(self.tensors.items())}
        out["files"] = {k: dataclasses.asdict(v) for k, v in sorted(self.files.items())}
        out["meta_sha256"] = _canonical_sha256(out)
        return json.dumps(out, indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise CheckpointError(f"{where}: metadata lacks {', '.join(missing)} (damaged)")
        values = {k: v for k, v in data.items() if k in names}
        try:
            values["tensors"] = {k: TensorRecord(**v) for k, v in data.get("tensors", {}).items()}
            values["files"] = {k: FileRecord(**v) for k, v in data.get("files", {}).items()}
        except TypeError as err:
            raise CheckpointError(f"{where}: malformed tensor or file record ({err})") from None
        return cls(**values)

    def layout_text(self) -> str:
        lay = self.layout
        return f"TP{lay['tensor']} PP{lay['pipeline']} DP{lay['data']} ZeRO{lay['zero_stage']}"


def _canonical_sha256(data: dict) -> str:
    """sha256 of a metadata dict without its own checksum, in one canonical JSON spelling."""
    body = {k: v for k, v in data.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_meta(path: Path) -> CheckpointMeta:
    """meta.json of a checkpoint directory, or CheckpointError saying what is wrong with it."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META} (the save was interrupted; this checkpoint is incomplete)")
    try:
        data = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} metadata file")
    if data.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{meta_path}: format version {data.get('version')}, this tool reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if data["version"] >= 2 and data.get("meta_sha256") != _canonical_sha256(data):
        raise CheckpointError(
            f"{meta_path}: its content does not match its own sha256 (meta_sha256): edited or damaged; "
            "resume from another checkpoint"
        )
    return CheckpointMeta.from_dict(data, meta_path)


# ============================================================================ on disk
@dataclass
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    problem: str = ""
    """Why it is not complete, or empty."""
    meta: Optional[CheckpointMeta] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def interrupted(self) -> bool:
        """A save that never wrote its meta.json: never loadable, safe to delete. (A checkpoint
        whose meta.json exists but does not verify is damaged: kept, passed over.)"""
        return not self.complete and not (self.path / META).exists()

    def size_bytes(self) -> int:
        return _dir_bytes(self.path)

    def layout(self) -> str:
        return self.meta.layout_text() if self.meta else "?"


def inspect_dir(path: Path) -> CheckpointInfo:
    match = _STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else -1
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        return CheckpointInfo(path, step, False, str(err).split(": ", 1)[-1])
    return CheckpointInfo(path, int(meta.step), True, "", meta)


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Every step directory under ``root``, oldest first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted((inspect_dir(p) for p in dirs), key=lambda info: info.step)


@dataclass
class SetAside:
    """A checkpoint directory moved aside (``stepN.replaced-T``: a complete checkpoint a resumed run
    passed again; ``stepN.interrupted-T``: a partial save) instead of being overwritten."""

    path: Path
    step: int
    kind: str
    time: int

    def size_bytes(self) -> int:
        return _dir_bytes(self.path)


def list_set_aside(root: str | Path) -> list[SetAside]:
    """Set-aside checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = _SET_ASIDE_DIR.match(p.name)
        if match and p.is_dir():
            found.append(SetAside(p, int(match.group(1)), match.group(2), int(match.group(3))))
    return sorted(found, key=lambda a: (a.time, a.step))


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
    for rel, expected in sorted(meta.files.items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != expected.bytes:
            problems.append(f"{file}: {size} bytes, the metadata says {expected.bytes} (truncated or damaged)")
        elif checksums and _sha256(file) != expected.sha256:
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


# ============================================================================ files
def atomic_write_text(path: Path, text: str) -> None:
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
        self.os_error: Optional[OSError] = None

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        try:
            return self.f.write(data)
        except OSError as err:  # torch's writer turns it into a RuntimeError without the errno
            self.os_error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_file(obj: Any, path: Path) -> FileRecord:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.os_error is not None:
                raise writer.os_error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(writer.bytes, writer.digest.hexdigest())


def bytes_record(data: bytes) -> FileRecord:
    """The metadata's record of a file written from memory: size and sha256."""
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


def file_cache(path: Path):
    """A loader of a checkpoint's files by relative name; each file is read once."""
    cache: dict[str, Any] = {}

    def file(rel: str) -> Any:
        if rel not in cache:
            cache[rel] = load_file(path / rel)
        return cache[rel]

    return file


def load_file(path: Path) -> Any:
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


def prune(root: Path, keep_last: int, keep_every: int, keep_log_spaced: bool, protect: int,
          keep_set_aside: Optional[int] = None) -> list[str]:
    """Deletes what the policy does not keep; returns what it removed.

    Interrupted saves older than the newest complete checkpoint are removed too
    (they can never be loaded). ``protect`` (the step just saved) always stays.
    Set-aside directories count in retention: the newest ``keep_set_aside`` stay
    (None: all of them).
    """
    infos = list_checkpoints(root)
    complete = [i for i in infos if i.complete]
    keep = retained_steps([i.step for i in complete], keep_last, keep_every, keep_log_spaced) | {protect}
    newest = max((i.step for i in complete), default=-1)
    removed = []
    for info in infos:
        stale = info.interrupted and info.step < newest
        if (info.complete and info.step not in keep) or stale:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.name)
    if keep_set_aside is not None:
        removed += prune_set_aside(root, keep_set_aside)
    return removed


def prune_set_aside(root: Path, keep: int) -> list[str]:
    """Removes all but the newest ``keep`` set-aside directories; returns what it removed."""
    aside = list_set_aside(root)
    removed = []
    for old in aside[:max(0, len(aside) - keep)]:
        shutil.rmtree(old.path, ignore_errors=True)
        removed.append(old.path.name)
    return removed


def remove_partial_saves(root: Path) -> list[str]:
    """Removes interrupted saves (step directories without meta.json: never loadable) and the
    temporary files of interrupted metadata writes; returns what it removed."""
    root = Path(root)
    removed = []
    for info in list_checkpoints(root):
        if info.interrupted:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.name)
    for aside in list_set_aside(root):
        if aside.kind == "interrupted":
            shutil.rmtree(aside.path, ignore_errors=True)
            removed.append(aside.path.name)
    if root.is_dir():
        for tmp in root.glob(f".{LATEST}.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


# ============================================================================ compatibility
def check_model_compatible(meta: CheckpointMeta, model_config, where: Path) -> list[str]:
    """Raises if the checkpoint is for a different model shape; returns notes on harmless differences."""
    saved = meta.model
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


# ============================================================================ resharding
def reshard(path: Path, name: str, entry: TensorRecord, file, tp_size: int, tp_rank: int) -> dict:
    """Shard ``tp_rank`` of ``tp_size`` of one tensor's states (whole if it is not TP-split)."""
    saved_dim = entry.tp_dim

    def shard_states(saved_rank: int) -> dict:
        rel = entry.shards.get(str(saved_rank))
        if rel is None:
            raise CheckpointError(f"{path / META}: tensor {name!r} lacks its TP shard {saved_rank} (damaged metadata)")
        data = file(rel)
        if name not in data:
            raise CheckpointError(f"{path / rel}: has no tensor {name!r} (damaged)")
        return data[name]

    if saved_dim is None:
        return shard_states(0)
    saved_tp = entry.tp_size
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
    file = file_cache(path)
    out: dict[str, torch.Tensor] = {}
    for name, entry in meta.tensors.items():
        states = reshard(path, name, entry, file, tp_size=1, tp_rank=0)
        keys = ["param", *(ADAM_KEYS if with_optimizer and "exp_avg" in states else ())]
        for key in keys:  # copies: independent of the (memory-mapped) state files
            out[name if key == "param" else f"{name}#{key}"] = states[key].clone()
    return out
