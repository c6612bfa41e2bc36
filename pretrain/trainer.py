"""The training loop: build, then step, log, maybe evaluate, maybe save, stop.

    trainer = Trainer(load_config("configs/demo.yaml"))
    try:
        result = trainer.train()
    finally:
        trainer.close()

Construction, in order (each part only needs what the ones before it built):
preflight and the parallel plan -> process groups and parallel state ->
tokenizer -> model -> DeepSpeed engine (ZeRO, AdamW, LR schedule, clipping,
accumulation) -> checkpoint manager, which resumes from a checkpoint -> datasets,
from the resumed sample position -> metrics logger.

A run folder holds one run: started again with the same command, it resumes
from its newest complete checkpoint with the same batches and, at the same
layout, bitwise the same results as if it had never stopped. SIGTERM / SIGUSR1
save and exit with code 75. A step whose loss or gradient norm is not finite
changes nothing and is counted; `train.max_skipped_steps` of them in a row stop
the run.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mesh_model.config import ConfigError
from mesh_model.flops import flops_per_token as token_flops
from mesh_model.model import build_model
from mesh_model.params import count_parameters
from mesh_model.router_stats import RouterStatistics, flat_metrics
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.compat import ScheduleModel, cuda_literals_unmapped, set_p2p_batching
from pretrain.config import RunConfig
from pretrain.data import build_datasets, micro_batches
from pretrain.engine import build_engine
from pretrain.errors import TrainingDiverged
from pretrain.hooks import TrainHooks
from pretrain.library_warnings import optional_fast_paths
from pretrain.metrics import (MetricsLogger, Throughput, memory_metrics, parameter_report_dict, write_loss_plot,
                              write_router_plot)
from pretrain.mfu import model_flops_per_device, peak_flops
from pretrain.parallel.distributed import destroy_distributed, init_distributed
from pretrain.parallel.schedule import ReplicatedCoreGrads, run_schedule
from pretrain.parallel.sequence_parallel import SequenceParallelGrads
from pretrain.preflight import preflight
from pretrain.run_folder import RunFolder
from pretrain.run_lock import RunLock
from pretrain.state import TrainState



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
    exit_code: int = 0
    """0, or the stop's code: 75 (requeue: SIGTERM, SIGUSR1, train.max_minutes), 130 (SIGINT)."""

    @property
    def final_eval(self) -> Optional[dict]:
        return self.evals[-1] if self.evals else None


class Trainer:
    def __init__(self, config: RunConfig, hooks: Optional[TrainHooks] = None):
        self.config = config
        self.hooks = hooks or TrainHooks()
        self.ctx = None
        self.metrics = None
        self.checkpoints = None
        self.lock = None
        self.plan = preflight(config, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))
        self.folder = RunFolder.of(config)
        self.state = TrainState()
        self._poison = False
        self.lock_note = None
        if self.plan.rank == 0:  # one run per run folder (pretrain/run_lock.py)
            lock = RunLock(self.folder.path)
            self.lock_note = lock.acquire()
            self.lock = lock
        try:
            self.ctx = init_distributed(self.plan, seed=config.train.seed)
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        config = self.config
        self.device = self.ctx.device
        self.tokenizer = self._load_tokenizer()
        self.model = self._build_model()
        self.engine, self.scheduler = build_engine(
            self.model, plan=self.plan, groups=self.ctx.groups, optim=config.optim,
            total_steps=config.train.steps, bf16=config.train.bf16,
        )
        self.checkpoints = CheckpointManager(
            config, self.plan, self.device, engine=self.engine, scheduler=self.scheduler,
            tokenizer_sha256=self.tokenizer.sha256, log=self._log_line, save_point=self.hooks.save_point,
        )
        self.resumed = self.checkpoints.resume()
        self.resume_report = self.resumed.report
        if self.resume_report is not None:
            self.state.load_state_dict(self.resume_report.counters)
        self._build_data()
        self.flops_per_token = token_flops(config.model).total  # the MFU numerator, per trained token
        self.router_stats = self._router_statistics()
        self.router_summary = None  # (step, summary) of the latest router statistics
        self._router_plot_at: Optional[float] = None  # when router.png was last drawn
        self.peak_flops = peak_flops(self.device, config.logging.peak_tflops)
        self.metrics = self._start_logging()

    # ----------------------------------------------------------------- construction
    def _load_tokenizer(self):
        from data_prep.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.config.data.tokenizer)
        model = self.config.model
        if tokenizer.vocab_size > model.padded_vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                f"{model.vocab_size} (padded {model.padded_vocab_size}); set model.vocab_size={tokenizer.vocab_size}"
            )
        return tokenizer

    def _build_model(self):
        params_dtype = torch.bfloat16 if self.config.train.bf16 else torch.float32
        model = build_model(self.config.model, self.plan.model_parallelism, params_dtype=params_dtype)
        # Before the engine and any other gradient hook: they must see the TP-summed gradient.
        self.sp_grads = SequenceParallelGrads(model, self.ctx.groups.tensor) if self.plan.sequence_parallel else None
        self.replicated = ReplicatedCoreGrads(model, self.plan) if self.plan.pipelined else None
        if self.plan.pipelined:
            set_p2p_batching(model.config, self.ctx.backend)
        self.param_report = count_parameters(model)
        return model

    def _build_data(self) -> None:
        cfg, plan = self.config, self.plan
        datasets = build_datasets(
            cfg.data,
            self.tokenizer,
            seq_length=cfg.model.seq_length,
            seed=cfg.train.seed,
            train_samples=cfg.train.steps * cfg.train.global_batch_size,
            valid_samples=cfg.train.eval_batches * plan.micro_batch_size * plan.data,
            cache_dir=cfg.data.cache_dir or str(self.folder.path / "data_cache"),
        )
        self.train_data, self.valid_data = datasets.train, datasets.valid
        self.train_batches = micro_batches(
            self.train_data, micro_batch_size=plan.micro_batch_size, dp_rank=plan.dp_rank, dp_size=plan.data,
            start_sample=self.state.consumed_samples, num_workers=cfg.data.num_workers,
        )
        if plan.pipelined:
            self.schedule_model = ScheduleModel(self.engine, self.model.config)

    def _router_statistics(self) -> Optional[RouterStatistics]:
        """The accumulator of MeSH router statistics, on every rank (all take part in its reduction)."""
        if not self.config.logging.router_stats_interval or self.config.model.variant != "mesh":
            return None
        return RouterStatistics.for_model(self.config.model, self.device)

    def _start_logging(self) -> MetricsLogger:
        is_logger = self.plan.rank == 0
        resumed_at = self.state.step if self.resume_report is not None else None
        if is_logger:
            self.folder.write_config(self.config, resumed_at)
            self.folder.clear_markers()
        metrics = MetricsLogger(self.config, self.folder, enabled=is_logger, resumed_at=resumed_at)
        if self.lock_note:
            metrics.line(self.lock_note)
        for name in self.resumed.removed_partial:
            metrics.line(f"removed the partial save {self.folder.checkpoints / name} (never loadable)")
        if self.resume_report is not None:
            report = self.resume_report
            why = "checkpoint.resume" if self.config.checkpoint.resume != "auto" else "the newest complete checkpoint"
            metrics.line(f"resuming from {report.path} at step {self.state.step} ({why}"
                         f"{', checksums verified' if self.config.checkpoint.verify_checksums else ''})")
            for line in self.resumed.passed_over:
                metrics.line(f"  passed over {line}")
            for note in report.notes:
                metrics.line(f"  note: {note}")
            for change in self.resumed.config_changes:
                metrics.line(f"  config change: {change}")
            metrics.mark_resumed(self.state.step, str(report.path))
        metrics.line(optional_fast_paths())
        report = self.param_report
        metrics.line(
            f"model: {self.config.model.variant} {self.config.model.split}, "
            f"{report.total:,} parameters on this rank ({report.non_embedding:,} non-embedding, "
            f"{report.routers:,} in routers) | {self.plan.describe()}, "
            f"device {self.device}, {'bf16' if self.config.train.bf16 else 'fp32'}"
        )
        if self.config.logging.router_stats_interval and self.router_stats is None:
            metrics.line(f"logging.router_stats_interval={self.config.logging.router_stats_interval} has no "
                         f"effect: variant {self.config.model.variant} has no MeSH routers")
        metrics.log_run_info(self.state.step, self.config.to_dict(), {
            "this_rank": parameter_report_dict(report), "analytic_non_embedding": self._analytic_non_embedding()})
        return metrics

    def _analytic_non_embedding(self) -> Optional[int]:
        """The whole model's non-embedding parameters (closed form; None for a shape it does not cover)."""
        from mesh_model.params import analytic_non_embedding

        try:
            return analytic_non_embedding(self.config.model)
        except ValueError:
            return None

    def _log_line(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.line(text)

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
        if self._poison:  # a test's fault injection (TrainHooks.poison_step)
            loss = loss * float("nan")
        return loss

    def _scheduled_loss(self, batches, num_microbatches: int, forward_only: bool) -> torch.Tensor:
        """Pipeline: megatron's schedule over `num_microbatches`; the mean loss on every stage."""
        return run_schedule(
            self.schedule_model, self.model, (self._to_device(batch) for batch in batches),
            plan=self.plan, groups=self.ctx.groups, num_microbatches=num_microbatches,
            seq_length=self.config.model.seq_length, loss_from_batch=self._loss, forward_only=forward_only,
        )

    def _data_parallel_mean(self, value: torch.Tensor) -> float:
        if self.plan.data > 1:
            torch.distributed.all_reduce(value, group=self.ctx.groups.data)
            value = value / self.plan.data
        return float(value)

    def train_step(self, step: int = 0) -> float:
        """One optimizer step over the global batch; returns the mean loss (all DP ranks)."""
        self.engine.train()
        self._poison = self.hooks.poison_step(step)
        if self.plan.pipelined:
            mean = self._scheduled_loss(self.train_batches, self.plan.grad_accum, forward_only=False)
            self.replicated.all_reduce()
            self.engine.step()
            return self._data_parallel_mean(mean)
        total = torch.zeros((), device=self.device)
        with cuda_literals_unmapped():  # CPU: the shim's per-call mapping is not needed here (compat.py)
            for _ in range(self.plan.grad_accum):
                loss = self.forward_loss(next(self.train_batches))
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                total += loss.detach()
        return self._data_parallel_mean(total / self.plan.grad_accum)

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        if self.valid_data is None:
            return None
        self.engine.eval()
        batches = micro_batches(self.valid_data, micro_batch_size=self.plan.micro_batch_size,
                                dp_rank=self.plan.dp_rank, dp_size=self.plan.data)
        count = self.config.train.eval_batches
        if self.plan.pipelined:
            mean = self._scheduled_loss(batches, count, forward_only=True)
        else:
            with cuda_literals_unmapped():
                mean = torch.stack([self.forward_loss(batch) for _, batch in zip(range(count), batches)]).mean()
        loss = self._data_parallel_mean(mean)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    # ----------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        cfg = self.config.train
        first = self.state.step
        self.started_at = time.perf_counter()
        result = TrainResult(steps=cfg.steps, run_dir=str(self.folder.path), start_step=first,
                             resumed_from=str(self.resume_report.path) if self.resume_report else None,
                             skipped_steps=self.state.skipped_steps)
        skips = SkipGuard(cfg.max_skipped_steps, self.metrics, self.checkpoints)
        throughput = Throughput()
        self.hooks.started()
        self.checkpoints.start()  # the clock, and SIGTERM / SIGUSR1 / SIGINT are caught from here on
        progress = None
        if first == 0:
            self._evaluate_and_log(0, result)
            end = self.checkpoints.after_evaluation(0, self.state)  # a signal during it
            if end.stop:
                self._stop(end, 0, result)
                return self._finish(result, progress)
        progress = self.metrics.progress(first, cfg.steps)
        for step in progress:
            self.hooks.before_step(step)
            lr = self.scheduler.get_last_lr()[0]
            observe = self._observing_routers(step)
            loss = self.train_step(step)
            if observe:
                self._log_router_stats(step)
            applied = self.engine.was_step_applied()
            self.state.advance(cfg.global_batch_size, applied)
            result.train_losses.append(loss)
            result.skipped_steps = self.state.skipped_steps
            skips.record(step, applied, loss, self.engine.get_global_grad_norm, self.state.skipped_steps)
            tokens_per_s = throughput.add(cfg.global_batch_size * self.config.model.seq_length)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if step % cfg.log_interval == 0 or step == cfg.steps:
                self._log_step(step, loss, lr, tokens_per_s)
                throughput.reset()
            self.hooks.after_step(step)
            end = self.checkpoints.after_step(step, self.state)
            if end.stop == "stop_after_step":
                self.metrics.line(f"stopped after step {step} (train.stop_after_step); "
                                  "run again without it to continue")
                break
            if not end.stop and cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.steps:
                self._evaluate_and_log(step, result)
                end = self.checkpoints.after_evaluation(step, self.state)  # a signal during it
            if end.stop == "interrupted":
                self._stop(end, step, result)
                break
        return self._finish(result, progress)

    def _finish(self, result: TrainResult, progress) -> TrainResult:
        if progress is not None:
            progress.close()
        self.checkpoints.finish()
        result.checkpoint = self.checkpoints.last_saved
        finished = self.state.step == self.config.train.steps and result.interrupted is None
        if finished:
            self._evaluate_and_log(self.config.train.steps, result)
        if self.plan.rank == 0:
            write_loss_plot(self.folder, result.start_step, result.train_losses, result.evals)
            if self.router_summary is not None:
                write_router_plot(self.folder, *self.router_summary)
            if finished:
                self.folder.mark_complete(self._completion_summary(result))
        return result

    def _completion_summary(self, result: TrainResult) -> dict:
        final = result.evals[-1] if result.evals and result.evals[-1]["step"] == self.state.step else {}
        return {"step": self.state.step, "tokens": self.state.tokens(self.config.model.seq_length),
                "valid_loss": final.get("loss"), "valid_ppl": final.get("ppl"),
                "skipped_steps": self.state.skipped_steps, "checkpoint": result.checkpoint,
                "segment_seconds": round(time.perf_counter() - self.started_at, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _log_step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        device_flops = model_flops_per_device(self.flops_per_token, tokens_per_s, self.plan.world_size)
        self.metrics.log(step, {
            "train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "train/tokens": self.state.tokens(self.config.model.seq_length),
            "train/samples": self.state.consumed_samples,
            "train/skipped_steps": self.state.skipped_steps,
            "train/tflops_per_device": device_flops / 1e12,
            **({"train/mfu": device_flops / self.peak_flops} if self.peak_flops else {}),
            **(memory_metrics(self.device) if self.plan.rank == 0 else {}),
        })

    # ----------------------------------------------------------------- router statistics
    ROUTER_PLOT_EVERY_S = 300.0
    """router.png is redrawn at most this often during a segment (and at its end)."""

    def _observing_routers(self, step: int) -> bool:
        """Attaches the router statistics to this stage's recurrence for a step that collects them."""
        if self.router_stats is None or step % self.config.logging.router_stats_interval:
            return False
        self.router_stats.reset()
        if self.model.recurrence is not None:  # None: a non-recursive model
            self.model.recurrence.statistics = self.router_stats
        return True

    def _log_router_stats(self, step: int) -> None:
        """One SUM over all ranks (each pipeline stage holds its own router steps, each DP rank its
        tokens; TP ranks count the same tokens alike, or their shares under sequence parallelism),
        then rank 0 logs the means."""
        if self.model.recurrence is not None:
            self.model.recurrence.statistics = None
        totals = self.router_stats.totals()
        if self.plan.world_size > 1:
            torch.distributed.all_reduce(totals)
        if self.plan.rank != 0:
            return
        summary = self.router_stats.summary()
        self.metrics.log(step, flat_metrics(summary))
        self.router_summary = (step, summary)
        now = time.perf_counter()
        if self._router_plot_at is None or now - self._router_plot_at >= self.ROUTER_PLOT_EVERY_S:
            write_router_plot(self.folder, step, summary)
            self._router_plot_at = now

    def _evaluate_and_log(self, step: int, result: TrainResult) -> None:
        self.hooks.before_evaluation(step)
        evaluation = self.evaluate()
        if evaluation is None:
            return
        result.evals.append({"step": step, **evaluation})
        self.metrics.log(step, {"valid/loss": evaluation["loss"], "valid/ppl": evaluation["ppl"]})
        self.metrics.line(f"step {step:>6}: validation loss {evaluation['loss']:.4f}, "
                          f"perplexity {evaluation['ppl']:.2f}")

    def _stop(self, end, step: int, result: TrainResult) -> None:
        """A signal or the time limit stopped the run after `step` (its checkpoint is saved)."""
        result.interrupted, result.exit_code = end.interrupted_by, end.exit_code
        result.checkpoint = self.checkpoints.last_saved
        if self.plan.rank != 0:
            return
        self.folder.mark_interrupted(result.interrupted, step, result.checkpoint, result.exit_code)
        self.metrics.line(f"stopped by {result.interrupted} after step {step}; checkpoint {result.checkpoint}; "
                          f"exit code {result.exit_code}: run the same command to resume")

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.ctx is not None:
            destroy_distributed()
            self.ctx = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class SkipGuard:
    """Counts consecutive steps without an update; too many in a row stop the run."""

    def __init__(self, limit: int, metrics: MetricsLogger, checkpoints: CheckpointManager):
        self.limit, self.metrics, self.checkpoints = limit, metrics, checkpoints
        self.streak = 0

    def record(self, step: int, applied: bool, loss: float, grad_norm: Callable[[], object],
               skipped_total: int) -> None:
        """After every step; raises TrainingDiverged at the limit. ``grad_norm`` is asked only
        for a skipped step's message."""
        if applied:
            self.streak = 0
            return
        self.streak += 1
        norm = grad_norm()
        norm_text = f"{float(norm):.4g}" if norm is not None else "n/a"
        self.metrics.line(f"step {step:>6}: loss {loss:.4g}, gradient norm {norm_text}: "
                          f"not finite, update skipped ({self.streak} in a row, "
                          f"train.max_skipped_steps={self.limit})")
        self.metrics.log(step, {"train/skipped_steps": skipped_total})
        if self.streak >= self.limit:
            self.checkpoints.finish()
            latest = self.checkpoints.newest_complete()
            raise TrainingDiverged(
                f"{self.streak} consecutive steps ({step - self.streak + 1}-{step}) had a non-finite loss "
                f"or gradient norm, stopping (train.max_skipped_steps={self.limit}); the last "
                f"complete checkpoint is {latest.path if latest else 'none'}: lower optim.lr or "
                "check the data, then resume from it"
            )


def masked_mean(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean of the per-token loss [b, s] over the tokens the loss mask keeps."""
    mask = batch["loss_mask"].to(per_token.dtype)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def run(config: RunConfig, hooks: Optional[TrainHooks] = None) -> TrainResult:
    trainer = None
    try:
        trainer = Trainer(config, hooks)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
