"""The training run's configuration: typed sections, YAML presets, dotted overrides.

    mesh train configs/demo.yaml train.steps=50 optim.lr=1e-3 model.variant=base

Every section is a dataclass validated when built, so a bad value fails before
any process group, model or data is created, with one line naming the field.
The resolved config is written into every run folder (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mesh_model.config import SEED_RANGE, ConfigError, ModelConfig, check_finite_fields, check_number, read_yaml_mapping


@dataclass
class DataConfig:
    tokenizer: str = ""
    """A sentencepiece .model or a Hugging Face tokenizer.json."""
    train: list[str] = field(default_factory=list)
    """Megatron .bin/.idx prefixes. Alternate weights and prefixes for a blend:
    ["0.7", "pile_cc", "0.3", "github"]; plain prefixes are blended by size."""
    valid: list[str] = field(default_factory=list)
    """Held-out prefixes for validation loss / perplexity."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its sample indices (default: <run_dir>/data_cache)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (>= 0; 0: load in the training process)."""
    verify_checksums: bool = False
    """Also check each shard's sha256 against its manifest at start-up; reads every byte. Without
    it the start-up check reads each .idx and the .bin's size only (pretrain/data.py)."""

    def validate(self) -> None:
        if not self.tokenizer:
            raise ConfigError("data.tokenizer is empty; point it at a tokenizer .model or tokenizer.json")
        if not self.train:
            raise ConfigError("data.train is empty; give at least one .bin/.idx prefix")
        check_number("data.num_workers", self.num_workers, integer=True, ge=0)


@dataclass
class OptimConfig:
    lr: float = 6e-4
    """Peak learning rate (> 0)."""
    min_lr: Optional[float] = None
    """Default: 10% of lr (the paper decays to 10% of peak); in [0, lr]."""
    weight_decay: float = 0.01
    """AdamW weight decay (>= 0)."""
    beta1: float = 0.9
    """AdamW betas, each in [0, 1)."""
    beta2: float = 0.95
    eps: float = 1e-8
    """AdamW epsilon (> 0)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (>= 0)."""
    warmup_fraction: float = 0.01
    """Fraction of train.steps of linear warmup, in [0, 1)."""

    def validate(self) -> None:
        check_number("optim.lr", self.lr, gt=0)
        if self.min_lr is None:
            self.min_lr = 0.1 * self.lr
        check_number("optim.min_lr", self.min_lr, ge=0, le=self.lr, note="at most optim.lr")
        for name in ("beta1", "beta2", "warmup_fraction"):
            check_number(f"optim.{name}", getattr(self, name), ge=0, lt=1)
        check_number("optim.eps", self.eps, gt=0)
        for name in ("grad_clip", "weight_decay"):
            check_number(f"optim.{name}", getattr(self, name), ge=0)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0-3) for optimizer state / gradients / parameters."""
    pipeline_layout: list[int] = field(default_factory=list)
    """Layers of the unrolled graph per pipeline stage, e.g. [7, 6, 6, 5]; empty = even."""
    sequence_parallel: bool = False
    """megatron sequence parallelism (needs tensor >= 2): norms, dropout, residual and the
    MeSH recurrence work on seq_length / tensor positions per TP rank (pretrain/parallel/sequence_parallel.py)."""
    virtual_pipeline: int = 1
    """Model chunks per pipeline rank (megatron's interleaved 1F1B). Only 1 is supported;
    pretrain/parallel/plan.py (INTERLEAVED_UNSUPPORTED) says why."""

    def validate(self) -> None:
        for name in ("tensor", "pipeline", "virtual_pipeline"):
            check_number(f"parallel.{name}", getattr(self, name), integer=True, ge=1)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.pipeline_layout):
            raise ConfigError(
                f"parallel.pipeline_layout={self.pipeline_layout} must hold integers >= 1 (layers per stage)"
            )


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per forward/backward per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and accumulation."""
    seed: int = 1234
    """Seeds python, numpy and torch and megatron's data order; in [0, 2**32 - 1] (numpy's range)."""
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu or cuda."""
    bf16: bool = False
    eval_interval: int = 50
    eval_batches: int = 8
    """Validation micro-batches per evaluation (each rank)."""
    log_interval: int = 10
    stop_after_step: int = 0
    """Save and stop after this step, as if the run ended there (0: run to train.steps); the
    schedule and data order stay those of the full run, so a later start continues exactly."""
    max_minutes: float = 0.0
    """Save and exit with code 75 (requeue) once this much wall time has passed, e.g. before
    a cluster's time limit (0: no limit)."""
    max_skipped_steps: int = 5
    """Steps with a non-finite loss or gradient norm are skipped (no update); this many in a
    row stop the run, keeping the last good checkpoint."""

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "eval_batches", "log_interval",
                     "max_skipped_steps"):
            check_number(f"train.{name}", getattr(self, name), integer=True, ge=1)
        check_number("train.eval_interval", self.eval_interval, integer=True, ge=0, note="0 = only at the end")
        check_number("train.stop_after_step", self.stop_after_step, integer=True, ge=0, note="0 = run to train.steps")
        check_number("train.max_minutes", self.max_minutes, ge=0, note="0 = no limit")
        check_number("train.seed", self.seed, integer=True, **SEED_RANGE)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r} must be auto, cpu or cuda")
        if self.stop_after_step < 0 or self.max_minutes < 0:
            raise ConfigError("train.stop_after_step and train.max_minutes must be >= 0")
        if self.eval_interval < 0:
            raise ConfigError(f"train.eval_interval={self.eval_interval} must be >= 0 (0 = only at the end)")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Default: <run_dir>/checkpoints."""
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end and on a signal)."""
    save_interval_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0: off)."""
    save_at_end: bool = True
    keep_last: int = 3
    """Complete checkpoints kept, newest first (0: keep all)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, forever (0: none)."""
    keep_set_aside: int = 2
    """Checkpoint directories set aside instead of overwritten (``stepN.replaced-T``: a complete
    checkpoint that a resumed run passed again) kept, newest first; older ones are removed by
    retention (`mesh ckpt list` shows their size, `mesh ckpt prune --set-aside` removes them all)."""
    log_spaced: bool = False
    """Also save and keep steps 1, 2, 4, 8, ... (Pythia's early checkpoints, for scaling-law studies)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in `dir` if there is one; none: refuse a
    run folder that already holds a run; or a checkpoint directory to start from."""
    verify_checksums: bool = True
    """Check every file's sha256 before resuming from a checkpoint."""
    async_save: bool = False
    """Write periodic checkpoints in a background thread while training goes on (the state is
    copied to host memory at the step first); the checkpoint is committed once every rank's files
    are written. Saves that end the run are always completed before exit."""

    def validate(self) -> None:
        for name in ("save_interval", "keep_last", "keep_every", "keep_set_aside"):
            check_number(f"checkpoint.{name}", getattr(self, name), integer=True, ge=0)
        check_number("checkpoint.save_interval_minutes", self.save_interval_minutes, ge=0)
        if not self.resume:
            raise ConfigError("checkpoint.resume is empty; use auto, none or a checkpoint directory")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    wandb_mode: str = "offline"
    """offline (default: logs locally, sync later with `wandb sync`), online or disabled."""
    wandb_project: str = "mesh-pretrain"
    progress_bar: bool = True
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device, for train/mfu. Default: the dense bf16 peak looked up
    from the GPU's name (pretrain/mfu.py); on CPU no MFU is logged."""
    tensorboard: bool = False
    """Also write every logged metric, the config and the parameter report as TensorBoard
    events under <run_dir>/tensorboard (`tensorboard --logdir <run_dir>/tensorboard`)."""
    router_stats_interval: Optional[int] = None
    """MeSH models: every N optimizer steps, collect the router statistics (entropy, mean weight
    per slot, effective slots, buffer slot norms; docs/diagnostics.md) over that step's tokens on
    all ranks, log them as router/... and redraw router.png. 0 or null: off (no cost)."""

    def validate(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb_mode={self.wandb_mode!r} must be offline, online or disabled")
        if self.peak_tflops is not None:
            check_number("logging.peak_tflops", self.peak_tflops, gt=0, note="TFLOP/s of one device")
        if self.router_stats_interval is not None:
            check_number("logging.router_stats_interval", self.router_stats_interval, integer=True, ge=0,
                         note="steps between router statistics; 0 = off")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "RunConfig":
        """Each section checks itself (ModelConfig on construction). The one rule between
        sections that needs no world size is here; the others, which depend on the layout,
        are in pretrain/parallel/plan.py."""
        for section in (self.data, self.optim, self.parallel, self.train, self.checkpoint, self.logging):
            section.validate()
        for f in dataclasses.fields(self):  # the catch-all: no section may hold a NaN or an infinity
            check_finite_fields(f.name, getattr(self, f.name))
        if self.train.bf16 and self.parallel.zero_stage == 0:
            # DeepSpeed 0.19.8: bf16 without ZeRO selects its legacy FP16_UnfusedOptimizer, which
            # accumulates gradients in bf16 and runs one zero-gradient optimizer.step() at
            # construction; with AdamW that advances the bias-correction step count and applies
            # weight decay once, so every update is off (measured: first update ~0.74x the fp32 one).
            raise ConfigError(
                "train.bf16=true needs parallel.zero_stage >= 1 (DeepSpeed's ZeRO-0 bf16 path "
                "accumulates gradients in bf16 and mis-steps AdamW once at start-up)"
            )
        return self

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = section.to_dict() if isinstance(section, ModelConfig) else dataclasses.asdict(section)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- loading

_SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _section_class(name: str) -> type:
    hints = typing.get_type_hints(RunConfig)
    return hints[name]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to a field's declared type, or fail naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r} must be a list")
        return [_coerce(v, args[0] if args else str, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={value!r} must be true or false")
    if annotation in (int, float, str):
        if annotation is not str and isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be of type {annotation.__name__}, not a boolean")
        if annotation is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if annotation is str and not isinstance(value, str):
            return str(value)
        if isinstance(value, annotation) and not isinstance(value, bool):
            return value
        try:
            if annotation is int:
                return int(str(value).replace("_", ""))
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be of type {annotation.__name__}") from None
    return value


def _build_section(name: str, values: dict) -> Any:
    cls = _section_class(name)
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(f'{name}.{u}' for u in unknown)}; "
            f"known {name} fields: {', '.join(sorted(fields))}"
        )
    coerced = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    return cls(**coerced)


def parse_overrides(overrides: list[str]) -> dict:
    """["train.steps=10", "model.variant=base"] -> {"train": {"steps": "10"}, ...}."""
    nested: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. train.steps=10)")
        section, name = parts
        if section not in _SECTIONS:
            raise ConfigError(
                f"override {item!r}: unknown section '{section}'; sections: {', '.join(_SECTIONS)}"
            )
        nested.setdefault(section, {})[name] = yaml.safe_load(value) if value.strip() else ""
    return nested


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> RunConfig:
    """Reads a YAML preset, applies dotted overrides, validates everything."""
    data = read_yaml_mapping(path) if path is not None else {}
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(_SECTIONS)}")
    for section, values in parse_overrides(overrides or []).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        data[section].update(values)
    sections = {name: _build_section(name, data.get(name, {})) for name in _SECTIONS}
    return RunConfig(**sections).validate()
