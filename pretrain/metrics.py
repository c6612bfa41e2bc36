"""Everything a run reports goes through one MetricsLogger.

Outputs (logging rank only; every other rank's logger is silent):
* lines of text, written above the progress bar (tqdm);
* the progress bar itself;
* ``metrics.jsonl`` in the run folder, one row per logged step;
* wandb (offline by default; `logging.wandb_mode`), resuming one run id across restarts;
* TensorBoard event files under ``tensorboard/`` (`logging.tensorboard`, off by default);
* ``loss.png`` at the end of a segment, and ``router.png`` (MeSH router statistics) whenever
  new ones were logged.

The run's resolved config and parameter report go to every sink once per segment
(:meth:`MetricsLogger.log_run_info`): metrics.jsonl as an ``"event": "run_info"`` row, wandb's
run config, TensorBoard text. A new output is a new branch in :meth:`MetricsLogger.log` (and its
set-up in ``__init__``); nothing else in the stack writes metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Optional

import torch

from pretrain.run_folder import RunFolder


class MetricsLogger:
    def __init__(self, config, folder: RunFolder, enabled: bool, resumed_at: Optional[int] = None):
        self.config = config
        self.folder = folder
        self.enabled = enabled
        self.metrics_file = None
        self.wandb_run = None
        self.tensorboard = None
        if not enabled:
            return
        self.metrics_file = open(folder.metrics_file, "a", buffering=1)
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # After a resume, TensorBoard drops the earlier segment's events of the steps trained
            # again (a crash after the checkpoint), as metrics.jsonl's "resumed" row tells readers to.
            purge = None if resumed_at is None else resumed_at + 1
            self.tensorboard = SummaryWriter(log_dir=str(folder.path / "tensorboard"), flush_secs=30,
                                             purge_step=purge)
        if config.logging.wandb_mode != "disabled":
            import wandb

            id_file = folder.path / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(
                project=config.logging.wandb_project,
                dir=str(folder.path),
                mode=config.logging.wandb_mode,
                config=config.to_dict(),
                name=folder.path.name,
                id=run_id,
                resume="allow",
            )

    def line(self, text: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(text)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, global_step=step)

    def log_run_info(self, step: int, config: dict, parameters: dict) -> None:
        """The resolved config and the parameter report, once per segment, to every sink."""
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, "event": "run_info", "config": config,
                                            "parameters": parameters}) + "\n")
        if self.wandb_run is not None:  # the config is already the run's config (wandb.init)
            self.wandb_run.config.update({"parameters": parameters}, allow_val_change=True)
        if self.tensorboard is not None:
            import yaml

            # Markdown code blocks keep the YAML's indentation in TensorBoard's text tab.
            self.tensorboard.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", step)
            self.tensorboard.add_text("parameters", "```\n" + json.dumps(parameters, indent=1) + "\n```", step)

    def mark_resumed(self, step: int, checkpoint: str) -> None:
        """Rows after this one supersede earlier rows of the same steps (trained again after a crash)."""
        if self.enabled:
            self.metrics_file.write(json.dumps({"step": step, "event": "resumed", "checkpoint": checkpoint}) + "\n")

    def progress(self, first: int, last: int):
        """The progress bar over steps first+1 .. last."""
        from tqdm import tqdm

        return tqdm(range(first + 1, last + 1), desc="train", unit="step", initial=first, total=last,
                    disable=not (self.enabled and self.config.logging.progress_bar), dynamic_ncols=True)

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This process's memory, MiB: allocated and peak allocated tensors on a GPU (torch's caching
    allocator; the peak since the process started), resident set size (current and peak) on CPU."""
    mib = 1024 * 1024
    if device.type == "cuda":
        return {"memory/allocated_mib": torch.cuda.memory_allocated(device) / mib,
                "memory/peak_allocated_mib": torch.cuda.max_memory_allocated(device) / mib}
    import resource

    import psutil

    # ru_maxrss is in KiB on Linux.
    return {"memory/rss_mib": psutil.Process().memory_info().rss / mib,
            "memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def parameter_report_dict(report) -> dict:
    """A mesh_model.params.ParameterReport as plain numbers (non_embedding included)."""
    return {**dataclasses.asdict(report), "non_embedding": report.non_embedding}


class Throughput:
    """Tokens per second over the steps since the last logged one."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)


def write_loss_plot(folder: RunFolder, start_step: int, train_losses: list[float], evals: list[dict]):
    """loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(start_step + 1, start_step + len(train_losses) + 1)
    ax.plot(steps, train_losses, label="train loss", lw=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder.path / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_router_plot(folder: RunFolder, step: int, summary: dict):
    """router.png next to loss.png: mean weight per (router step, slot), write and read, of `step`."""
    from analysis.plots import router_heatmap_figure

    fig = router_heatmap_figure([(f"step {step}", summary)])
    path = folder.path / "router.png"
    tmp = path.with_name(".router.png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    tmp.replace(path)  # a reader never sees a half-written plot
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
