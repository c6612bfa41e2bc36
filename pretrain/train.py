"""The training loop: build, then step, evaluate, log and save.

    trainer = Trainer(load_config("configs/demo.yaml"))
    try:
        result = trainer.train()
    finally:
        trainer.close()

Order of construction (each step only needs what the previous ones built):
validate the config against the world size -> process groups and parallel
state -> tokenizer -> model -> DeepSpeed engine (ZeRO, AdamW, LR schedule,
clipping, accumulation) -> resume from a checkpoint -> datasets, from the
resumed sample position -> loggers.

A run folder holds one run: started again with the same command, it resumes
from its newest complete checkpoint (pretrain/checkpoint.py) with the same
batches and, at the same layout, bitwise the same results as if it had never
stopped. SIGTERM / SIGUSR1 save and exit with code 75 (pretrain/signals.py).
A step whose loss or gradient norm is not finite changes nothing and is
counted; `train.max_skipped_steps` of them in a row stop the run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from data_prep.errors import DataError
from mesh_model.config import ConfigError
from mesh_model.flops import flops_per_token as token_flops
from mesh_model.model import build_model
from mesh_model.params import count_parameters
from pretrain import checkpoint as ckpt
from pretrain import faults
from pretrain.config import RunConfig
from pretrain.cpu_shim import cuda_literals_unmapped
from pretrain.data import build_datasets, check_prefixes, micro_batches, parse_blend
from pretrain.distributed import check_parallel_sizes, destroy_distributed, init_distributed
from mesh_model.unrolled import partition, unrolled_ops
from pretrain.engine import build_engine
from pretrain.mfu import model_flops_per_device, peak_flops
from pretrain.pipeline import (
    ReplicatedCoreGrads, ScheduleModel, check_pipeline_config, check_virtual_pipeline, run_schedule,
)
from pretrain.sequence_parallel import SequenceParallelGrads, check_sequence_parallel
from pretrain.signals import REQUEUE_EXIT_CODE, StopRequests, signal_name


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    steps: int
    train_losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    """[{"step": s, "loss": l, "ppl": p}, ...], including step 0 (before training)."""
    run_dir: str = ""
    checkpoint: Optional[str] = None
    """The last checkpoint this process saved."""
    start_step: int = 0
    """Steps already done when this process started (resumed runs)."""
    resumed_from: Optional[str] = None
    skipped_steps: int = 0
    """Steps without an update (non-finite loss or gradient norm), over the whole run."""
    interrupted: Optional[str] = None
    """The signal that stopped the run early (a checkpoint was saved), if any."""

    @property
    def exit_code(self) -> int:
        return REQUEUE_EXIT_CODE if self.interrupted else 0

    @property
    def final_eval(self) -> Optional[dict]:
        return self.evals[-1] if self.evals else None


def gradient_accumulation_steps(config: RunConfig, dp_size: int) -> int:
    per_step = config.train.micro_batch_size * dp_size
    if config.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {config.train.micro_batch_size} x {dp_size}"
        )
    return config.train.global_batch_size // per_step


def check_startup(config: RunConfig, world_size: int) -> None:
    """Everything that can be checked before any process group, model or data exists."""
    dp = check_parallel_sizes(world_size, config.parallel.tensor, config.parallel.pipeline)
    gradient_accumulation_steps(config, dp)
    check_pipeline_config(config.parallel.zero_stage, config.parallel.pipeline, config.model.untie_embeddings)
    check_virtual_pipeline(config.parallel.virtual_pipeline)
    if config.parallel.pipeline > 1:  # the cut must be valid before any process starts
        partition(unrolled_ops(config.model.split), config.parallel.pipeline, config.parallel.pipeline_layout or None)
    if config.model.num_attention_heads % config.parallel.tensor:
        raise ConfigError(
            f"parallel.tensor={config.parallel.tensor} does not divide "
            f"model.num_attention_heads={config.model.num_attention_heads}"
        )
    tp = config.parallel.tensor
    if config.model.padded_vocab_size % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide the padded vocabulary {config.model.padded_vocab_size} "
            f"(model.vocab_size={config.model.vocab_size} padded to a multiple of "
            f"model.make_vocab_size_divisible_by={config.model.make_vocab_size_divisible_by}); make that a multiple of {tp}"
        )
    if config.model.ffn_size % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide the FFN width {config.model.ffn_size}")
    check_sequence_parallel(config.parallel.sequence_parallel, tp, config.model.seq_length)
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no GPU is visible; use train.device=cpu or auto")
    if not Path(config.data.tokenizer).is_file():
        raise DataError(
            f"data.tokenizer={config.data.tokenizer} does not exist; train one with "
            "`mesh data train-tokenizer` or point at an existing .model / tokenizer.json"
        )
    check_prefixes(parse_blend(config.data.train)[0], "data.train")
    check_prefixes(parse_blend(config.data.valid)[0], "data.valid")
    run_dir = Path(config.logging.run_dir)
    resume = config.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise ConfigError(f"checkpoint.resume={resume} is not a checkpoint directory")
    if (run_dir / "config.yaml").exists() and resume == "none":
        raise ConfigError(
            f"logging.run_dir={run_dir} already holds a run and checkpoint.resume=none; choose a new "
            "logging.run_dir, or resume it with checkpoint.resume=auto (nothing is overwritten)"
        )
    if (run_dir / "config.yaml").exists() and resume == "auto":
        checkpoint_dir = Path(config.checkpoint.dir or run_dir / "checkpoints")
        if not any(info.complete for info in ckpt.list_checkpoints(checkpoint_dir)):
            raise ConfigError(
                f"logging.run_dir={run_dir} already holds a run but {checkpoint_dir} has no complete "
                "checkpoint to resume from; choose a new logging.run_dir (nothing is overwritten)"
            )


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_startup(config, world_size)
        self.run_dir = Path(config.logging.run_dir)
        self.checkpoint_dir = Path(config.checkpoint.dir or self.run_dir / "checkpoints")
        self.ctx = None
        self.wandb_run = None
        self.metrics_file = None
        self.stop_requests = StopRequests()
        self.resume_report: Optional[ckpt.LoadReport] = None
        self.counters = {"step": 0, "consumed_samples": 0, "skipped_steps": 0}
        self.pending_save: Optional[ckpt.PendingSave] = None
        # train() reads the fault hook; callers that only setup() and train_step() (bench) get none.
        self._nan_steps, self._poison_step = frozenset(), False

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        from data_prep.tokenizer import load_tokenizer

        cfg = self.config
        self.ctx = init_distributed(
            tensor_parallel=cfg.parallel.tensor,
            pipeline_parallel=cfg.parallel.pipeline,
            seed=cfg.train.seed,
            device=cfg.train.device,
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.grad_accum = gradient_accumulation_steps(cfg, self.dp_size)
        self.is_logger = self.ctx.rank == 0

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.padded_vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{cfg.model.vocab_size} (padded {cfg.model.padded_vocab_size}); set "
                f"model.vocab_size={self.tokenizer.vocab_size}"
            )

        params_dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        self.pipelined = cfg.parallel.pipeline > 1
        layout = cfg.parallel.pipeline_layout or None
        self.model = build_model(
            cfg.model,
            tensor_parallel=cfg.parallel.tensor,
            pipeline_parallel=cfg.parallel.pipeline,
            pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
            pipeline_layout=layout,
            params_dtype=params_dtype,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        # Before the engine and any other gradient hook: they must see the TP-summed gradient.
        self.sp_grads = SequenceParallelGrads(self.model) if cfg.parallel.sequence_parallel else None
        self.replicated = ReplicatedCoreGrads(self.model, cfg.parallel.pipeline, layout) if self.pipelined else None
        self.param_report = count_parameters(self.model)
        total_steps = cfg.train.steps
        self.engine, self.scheduler = build_engine(
            self.model,
            lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr,
            weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            warmup_steps=max(1, round(cfg.optim.warmup_fraction * total_steps)),
            total_steps=total_steps,
            grad_clip=cfg.optim.grad_clip,
            micro_batch_size=cfg.train.micro_batch_size,
            # With a pipeline the schedule accumulates over micro-batches itself.
            grad_accum_steps=1 if self.pipelined else self.grad_accum,
            zero_stage=cfg.parallel.zero_stage,
            bf16=cfg.train.bf16,
            external_accumulation=self.pipelined,
        )
        if self.pipelined:
            self.schedule_model = ScheduleModel(self.engine, self.model.config)
            # gloo: batched isend/irecv gives wrong results (platform facts); NCCL batches fine.
            self.model.config.batch_p2p_comm = self.ctx.backend != "gloo"
        self.device = self.ctx.device
        self._resume()

        datasets = build_datasets(
            cfg.data,
            self.tokenizer,
            seq_length=cfg.model.seq_length,
            seed=cfg.train.seed,
            train_samples=total_steps * cfg.train.global_batch_size,
            valid_samples=cfg.train.eval_batches * cfg.train.micro_batch_size * self.dp_size,
            cache_dir=cfg.data.cache_dir or str(self.run_dir / "data_cache"),
        )
        self.train_data = datasets.train
        self.valid_data = datasets.valid
        self.train_batches = micro_batches(
            self.train_data,
            micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            start_sample=self.counters["consumed_samples"],
            num_workers=cfg.data.num_workers,
        )
        self._setup_logging()

    def _resume(self) -> None:
        """Chooses the checkpoint to start from (rank 0 decides, everyone loads it)."""
        cfg = self.config.checkpoint
        decision = [None]
        if self.ctx.rank == 0:
            decision[0] = self._choose_checkpoint(cfg.resume)
        torch.distributed.broadcast_object_list(decision, src=0)
        path, passed_over, error = decision[0]
        if error:
            raise ckpt.CheckpointError(error)
        if path is None:
            return
        report = ckpt.load(Path(path), engine=self.engine, scheduler=self.scheduler,
                           zero_stage=self.config.parallel.zero_stage, model_config=self.config.model)
        self.resume_report = report
        self.resume_notes = passed_over
        self.counters.update(report.counters)

    def _choose_checkpoint(self, resume: str) -> tuple[Optional[str], list[str], Optional[str]]:
        verify = self.config.checkpoint.verify_checksums
        if resume == "none":
            return None, [], None
        if resume != "auto":
            problems = ckpt.verify(resume, verify)
            if problems:
                return None, [], f"checkpoint.resume={resume}: {problems[0]}"
            return resume, [], None
        info, passed_over = ckpt.choose_resume(self.checkpoint_dir, verify)
        if info is None and passed_over:
            return None, passed_over, (
                f"no loadable checkpoint in {self.checkpoint_dir}: " + "; ".join(passed_over)
            )
        return (str(info.path) if info else None), passed_over, None

    def _setup_logging(self) -> None:
        if not self.is_logger:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        step = self.counters["step"]
        if not (self.run_dir / "config.yaml").exists():
            self.config.save(self.run_dir / "config.yaml")
        elif self.resume_report is not None:
            # The first config stays; a resumed segment's config is kept beside it.
            self.config.save(self.run_dir / f"config.resumed-step{step:07d}.yaml")
        (self.run_dir / "INTERRUPTED").unlink(missing_ok=True)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if self.config.logging.wandb_mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(
                project=self.config.logging.wandb_project,
                dir=str(self.run_dir),
                mode=self.config.logging.wandb_mode,
                config=self.config.to_dict(),
                name=self.run_dir.name,
                id=run_id,
                resume="allow",
            )
        if self.resume_report is not None:
            report = self.resume_report
            why = "checkpoint.resume" if self.config.checkpoint.resume != "auto" else "the newest complete checkpoint"
            self.log_line(f"resuming from {report.path} at step {step} ({why}"
                          f"{', checksums verified' if self.config.checkpoint.verify_checksums else ''})")
            for line in self.resume_notes:
                self.log_line(f"  passed over {line}")
            for note in report.notes:
                self.log_line(f"  note: {note}")
            # Rows after this one supersede earlier rows of the same steps (trained again after a crash).
            self.metrics_file.write(json.dumps({"step": step, "event": "resumed", "checkpoint": str(report.path)}) + "\n")
        report = self.param_report
        self.log_line(
            f"model: {self.config.model.variant} {self.config.model.split}, "
            f"{report.total:,} parameters on this rank ({report.non_embedding:,} non-embedding, "
            f"{report.routers:,} in routers) | world {self.ctx.world_size} = "
            f"TP {self.config.parallel.tensor} x PP {self.config.parallel.pipeline} x DP {self.dp_size}, "
            f"ZeRO {self.config.parallel.zero_stage}, grad accumulation {self.grad_accum}, "
            f"device {self.device}, {'bf16' if self.config.train.bf16 else 'fp32'}"
        )

    # ----------------------------------------------------------------- steps
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward_loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token loss over the micro-batch's unmasked tokens."""
        batch = self._to_device(batch)
        per_token = self.engine(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
        )
        return self._loss(per_token, batch)

    def _loss(self, per_token: torch.Tensor, batch: dict) -> torch.Tensor:
        loss = masked_mean(per_token, batch)
        if self._poison_step:  # test hook: MESH_TRAIN_NAN_STEPS
            loss = loss * float("nan")
        return loss

    def _scheduled_loss(self, batches, num_microbatches: int, forward_only: bool) -> torch.Tensor:
        """Pipeline: megatron's schedule over `num_microbatches`; the mean loss on every stage."""
        return run_schedule(
            self.schedule_model,
            self.model,
            (self._to_device(batch) for batch in batches),
            num_microbatches=num_microbatches,
            seq_length=self.config.model.seq_length,
            micro_batch_size=self.config.train.micro_batch_size,
            loss_from_batch=self._loss,
            forward_only=forward_only,
        )

    def _data_parallel_mean(self, value: torch.Tensor) -> float:
        if self.dp_size > 1:
            torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value = value / self.dp_size
        return float(value)

    def train_step(self, step: int = 0) -> float:
        """One optimizer step over the global batch; returns the mean loss (all DP ranks)."""
        self.engine.train()
        self._poison_step = step in self._nan_steps
        if self.pipelined:
            mean = self._scheduled_loss(self.train_batches, self.grad_accum, forward_only=False)
            self.replicated.all_reduce()
            self.engine.step()
            return self._data_parallel_mean(mean)
        total = torch.zeros((), device=self.device)
        with cuda_literals_unmapped():  # CPU: the shim's per-call mapping is not needed here (cpu_shim.py)
            for _ in range(self.grad_accum):
                loss = self.forward_loss(next(self.train_batches))
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                total += loss.detach()
        return self._data_parallel_mean(total / self.grad_accum)

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        if self.valid_data is None:
            return None
        self.engine.eval()
        batches = micro_batches(
            self.valid_data,
            micro_batch_size=self.config.train.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        count = self.config.train.eval_batches
        if self.pipelined:
            mean = self._scheduled_loss(batches, count, forward_only=True)
        else:
            with cuda_literals_unmapped():
                mean = torch.stack([self.forward_loss(batch) for _, batch in zip(range(count), batches)]).mean()
        loss = self._data_parallel_mean(mean)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def save_checkpoint(self, step: int, reason: str = "", background: bool = False) -> str:
        """Saves this step; with ``background`` the files are written while training goes on
        and the checkpoint is committed later (:meth:`finish_pending_save`)."""
        self.finish_pending_save()
        self.pending_save = ckpt.begin_save(
            self.checkpoint_dir, step, engine=self.engine, scheduler=self.scheduler,
            zero_stage=self.config.parallel.zero_stage, run_config=self.config,
            counters=dict(self.counters), rank0_extra={"reason": reason}, background=background,
        )
        path = self.pending_save.path
        if not background:
            self.finish_pending_save()
        return str(path)

    def finish_pending_save(self) -> None:
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return
        path = ckpt.finish_save(pending)
        if self.is_logger:
            cfg = self.config.checkpoint
            removed = ckpt.prune(self.checkpoint_dir, cfg.keep_last, cfg.keep_every, cfg.log_spaced,
                                 protect=pending.step)
            meta = ckpt.read_meta(path)
            how = ", written in the background" if meta["asynchronous"] else ""
            self.log_line(f"step {pending.step:>6}: checkpoint {path} ({meta['reason']}, "
                          f"{meta['save_seconds']:.1f} s{how})" + (f"; removed {', '.join(removed)}" if removed else ""))

    def _save_due(self, step: int, time_due: bool) -> str:
        """Why the checkpoint of this step is due ("" if it is not)."""
        cfg = self.config.checkpoint
        if cfg.save_interval and step % cfg.save_interval == 0:
            return f"every {cfg.save_interval} steps"
        if cfg.log_spaced and step & (step - 1) == 0:
            return "log-spaced"
        if time_due:
            return f"{cfg.save_interval_minutes:g} minutes since the last save"
        if step == self.config.train.steps and cfg.save_at_end:
            return "end of training"
        return ""

    def _agree(self, time_due: bool, out_of_time: bool) -> tuple[int, bool, bool, bool]:
        """(signal number or 0, time_due, out_of_time, a background save still writing) as any
        rank saw them, agreed by all ranks with one small all-reduce per step: clocks, signals
        and disks differ between ranks."""
        writing = self.pending_save is not None and not self.pending_save.written()
        flags = torch.tensor([float(self.stop_requests.received or 0), float(time_due), float(out_of_time),
                              float(writing)], device=self.device)
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return int(flags[0].item()), bool(flags[1].item()), bool(flags[2].item()), bool(flags[3].item())

    # ----------------------------------------------------------------- logging
    def log_line(self, text: str) -> None:
        if self.is_logger:
            from tqdm import tqdm

            tqdm.write(text)

    def log_metrics(self, step: int, metrics: dict) -> None:
        if not self.is_logger:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    # ----------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        from tqdm import tqdm

        self.setup()
        cfg = self.config.train
        tokens_per_step = self.config.train.global_batch_size * self.config.model.seq_length
        flops_per_token = token_flops(self.config.model).total
        peak = peak_flops(self.device, self.config.logging.peak_tflops)
        first = self.counters["step"]
        result = TrainResult(steps=cfg.steps, run_dir=str(self.run_dir), start_step=first,
                             resumed_from=str(self.resume_report.path) if self.resume_report else None,
                             skipped_steps=self.counters["skipped_steps"])
        self._nan_steps = faults.nan_steps()
        self._poison_step = False

        def run_eval(step: int) -> None:
            evaluation = self.evaluate()
            if evaluation is None:
                return
            result.evals.append({"step": step, **evaluation})
            self.log_metrics(step, {"valid/loss": evaluation["loss"], "valid/ppl": evaluation["ppl"]})
            self.log_line(f"step {step:>6}: validation loss {evaluation['loss']:.4f}, perplexity {evaluation['ppl']:.2f}")

        if first == 0:
            run_eval(0)
        self.stop_requests.install()
        progress = tqdm(range(first + 1, cfg.steps + 1), desc="train", unit="step", initial=first, total=cfg.steps,
                        disable=not (self.is_logger and self.config.logging.progress_bar), dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        last_save = started = time.monotonic()
        skip_streak = 0
        for step in progress:
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step(step)
            self.counters["step"] = step
            self.counters["consumed_samples"] += cfg.global_batch_size
            result.train_losses.append(loss)
            if self.engine.was_step_applied():
                skip_streak = 0
            else:
                skip_streak += 1
                self.counters["skipped_steps"] += 1
                result.skipped_steps = self.counters["skipped_steps"]
                norm = self.engine.get_global_grad_norm()
                norm_text = f"{float(norm):.4g}" if norm is not None else "n/a"
                self.log_line(f"step {step:>6}: loss {loss:.4g}, gradient norm {norm_text}: "
                              f"not finite, update skipped ({skip_streak} in a row, "
                              f"train.max_skipped_steps={cfg.max_skipped_steps})")
                self.log_metrics(step, {"train/skipped_steps": self.counters["skipped_steps"]})
                if skip_streak >= cfg.max_skipped_steps:
                    self.finish_pending_save()
                    latest = ckpt.choose_resume(self.checkpoint_dir, checksums=False)[0]
                    raise TrainingDiverged(
                        f"{skip_streak} consecutive steps ({step - skip_streak + 1}-{step}) had a non-finite loss "
                        f"or gradient norm, stopping (train.max_skipped_steps={cfg.max_skipped_steps}); the last "
                        f"complete checkpoint is {latest.path if latest else 'none'}: lower optim.lr or "
                        "check the data, then resume from it"
                    )
            window_tokens += tokens_per_step
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if step % cfg.log_interval == 0 or step == cfg.steps:
                grad_norm = self.engine.get_global_grad_norm()
                device_flops = model_flops_per_device(flops_per_token, tokens_per_s, self.ctx.world_size)
                self.log_metrics(step, {
                    "train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "train/tokens": step * tokens_per_step,
                    "train/tflops_per_device": device_flops / 1e12,
                    **({"train/mfu": device_flops / peak} if peak else {}),
                })
                window_start, window_tokens = time.perf_counter(), 0
            faults.step_delay()
            minutes = self.config.checkpoint.save_interval_minutes
            out_of_time = bool(cfg.max_minutes) and time.monotonic() - started >= 60 * cfg.max_minutes
            signum, time_due, out_of_time, writing = self._agree(
                bool(minutes) and time.monotonic() - last_save >= 60 * minutes, out_of_time)
            if self.pending_save is not None and not writing:
                self.finish_pending_save()  # every rank's files are written: commit
            stop_here = step == cfg.stop_after_step and step != cfg.steps
            if signum:
                reason = f"{signal_name(signum)} received"
            elif out_of_time:
                reason = f"train.max_minutes={cfg.max_minutes:g} reached"
            elif stop_here:
                reason = f"train.stop_after_step={step}"
            else:
                reason = self._save_due(step, time_due)
            if reason:
                ends_run = bool(signum or out_of_time or stop_here or step == cfg.steps)
                background = self.config.checkpoint.async_save and not ends_run
                result.checkpoint = self.save_checkpoint(step, reason, background=background)
                last_save = time.monotonic()
            if signum or out_of_time:
                result.interrupted = signal_name(signum) if signum else "train.max_minutes"
                self._write_interrupted(step, result)
                break
            if stop_here:
                self.log_line(f"stopped after step {step} (train.stop_after_step); run again without it to continue")
                break
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.steps:
                run_eval(step)
        progress.close()
        self.finish_pending_save()
        if self.counters["step"] == cfg.steps and result.interrupted is None:
            run_eval(cfg.steps)
        if self.is_logger:
            write_loss_plot(self.run_dir, result)
        return result

    def _write_interrupted(self, step: int, result: TrainResult) -> None:
        """run_dir/INTERRUPTED tells launchers (torchrun hides the workers' exit codes) to requeue."""
        if not self.is_logger:
            return
        (self.run_dir / "INTERRUPTED").write_text(json.dumps(
            {"signal": result.interrupted, "step": step, "checkpoint": result.checkpoint,
             "exit_code": REQUEUE_EXIT_CODE}) + "\n")
        self.log_line(f"stopped by {result.interrupted} after step {step}; checkpoint {result.checkpoint}; "
                      f"exit code {REQUEUE_EXIT_CODE}: run the same command to resume")

    def close(self) -> None:
        self.stop_requests.restore()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.ctx is not None:
            destroy_distributed()


def masked_mean(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean of the per-token loss [b, s] over the tokens the loss mask keeps."""
    mask = batch["loss_mask"].to(per_token.dtype)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def write_loss_plot(run_dir: Path, result: TrainResult) -> Optional[Path]:
    """run_dir/loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(result.start_step + 1, result.start_step + len(result.train_losses) + 1)
    ax.plot(steps, result.train_losses, label="train loss", lw=1)
    if result.evals:
        ax.plot([e["step"] for e in result.evals], [e["loss"] for e in result.evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(config: RunConfig) -> TrainResult:
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
