"""The training loop: build, then step, evaluate, log and save.

    trainer = Trainer(load_config("configs/demo.yaml"))
    try:
        result = trainer.train()
    finally:
        trainer.close()

Order of construction (each step only needs what the previous ones built):
validate the config against the world size -> process groups and parallel
state -> tokenizer -> model -> DeepSpeed engine (ZeRO, AdamW, LR schedule,
clipping, accumulation) -> datasets -> loggers.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from data_prep.errors import DataError
from mesh_model.config import ConfigError
from mesh_model.model import build_model
from mesh_model.params import count_parameters
from pretrain.config import RunConfig
from pretrain.data import build_datasets, check_prefixes, micro_batches, parse_blend
from pretrain.distributed import check_parallel_sizes, destroy_distributed, init_distributed
from mesh_model.unrolled import partition, unrolled_ops
from pretrain.engine import build_engine
from pretrain.pipeline import ReplicatedCoreGrads, ScheduleModel, check_pipeline_config, run_schedule


@dataclass
class TrainResult:
    steps: int
    train_losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    """[{"step": s, "loss": l, "ppl": p}, ...], including step 0 (before training)."""
    run_dir: str = ""
    checkpoint: Optional[str] = None

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
    if (run_dir / "config.yaml").exists():
        raise ConfigError(
            f"logging.run_dir={run_dir} already holds a run; choose a new logging.run_dir "
            "(nothing is overwritten)"
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
        )
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
            num_workers=cfg.data.num_workers,
        )
        self._setup_logging()

    def _setup_logging(self) -> None:
        if not self.is_logger:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.run_dir / "config.yaml")
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if self.config.logging.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=self.config.logging.wandb_project,
                dir=str(self.run_dir),
                mode=self.config.logging.wandb_mode,
                config=self.config.to_dict(),
                name=self.run_dir.name,
            )
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
        return masked_mean(per_token, batch)

    def _scheduled_loss(self, batches, num_microbatches: int, forward_only: bool) -> torch.Tensor:
        """Pipeline: megatron's schedule over `num_microbatches`; the mean loss on every stage."""
        return run_schedule(
            self.schedule_model,
            self.model,
            (self._to_device(batch) for batch in batches),
            num_microbatches=num_microbatches,
            seq_length=self.config.model.seq_length,
            micro_batch_size=self.config.train.micro_batch_size,
            loss_from_batch=masked_mean,
            forward_only=forward_only,
        )

    def _data_parallel_mean(self, value: torch.Tensor) -> float:
        if self.dp_size > 1:
            torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value = value / self.dp_size
        return float(value)

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns the mean loss (all DP ranks)."""
        self.engine.train()
        if self.pipelined:
            mean = self._scheduled_loss(self.train_batches, self.grad_accum, forward_only=False)
            self.replicated.all_reduce()
            self.engine.step()
            return self._data_parallel_mean(mean)
        total = torch.zeros((), device=self.device)
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
            mean = torch.stack([self.forward_loss(batch) for _, batch in zip(range(count), batches)]).mean()
        loss = self._data_parallel_mean(mean)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def save_checkpoint(self, step: int) -> str:
        tag = f"step{step:07d}"
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag)
        if self.is_logger:
            self.config.save(self.checkpoint_dir / tag / "config.yaml")
        return str(self.checkpoint_dir / tag)

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
        result = TrainResult(steps=cfg.steps, run_dir=str(self.run_dir))

        def run_eval(step: int) -> None:
            evaluation = self.evaluate()
            if evaluation is None:
                return
            result.evals.append({"step": step, **evaluation})
            self.log_metrics(step, {"valid/loss": evaluation["loss"], "valid/ppl": evaluation["ppl"]})
            self.log_line(f"step {step:>6}: validation loss {evaluation['loss']:.4f}, perplexity {evaluation['ppl']:.2f}")

        run_eval(0)
        progress = tqdm(range(1, cfg.steps + 1), desc="train", unit="step",
                        disable=not (self.is_logger and self.config.logging.progress_bar), dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        for step in progress:
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step()
            result.train_losses.append(loss)
            window_tokens += tokens_per_step
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if step % cfg.log_interval == 0 or step == cfg.steps:
                grad_norm = self.engine.get_global_grad_norm()
                self.log_metrics(step, {
                    "train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "train/tokens": step * tokens_per_step,
                })
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.steps:
                run_eval(step)
        progress.close()
        run_eval(cfg.steps)
        if self.config.checkpoint.save_at_end:
            result.checkpoint = self.save_checkpoint(cfg.steps)
            self.log_line(f"checkpoint: {result.checkpoint}")
        if self.is_logger:
            write_loss_plot(self.run_dir, result)
        return result

    def close(self) -> None:
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
    ax.plot(range(1, len(result.train_losses) + 1), result.train_losses, label="train loss", lw=1)
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
