"""Everything a run reports goes through one MetricsLogger.

Outputs (logging rank only; every other rank's logger is silent):
* lines of text, written above the progress bar (tqdm);
* the progress bar itself;
* ``metrics.jsonl`` in the run folder, one row per logged step;
* wandb (offline by default; `logging.wandb_mode`), resuming one run id across restarts;
* ``loss.png`` at the end of a segment.

A new output is a new branch in :meth:`MetricsLogger.log` (and its set-up in
``__init__``); nothing else in the stack writes metrics.
"""

from __future__ import annotations

import json
import secrets
import time

from pretrain.run_folder import RunFolder


class MetricsLogger:
    def __init__(self, config, folder: RunFolder, enabled: bool):
        self.config = config
        self.folder = folder
        self.enabled = enabled
        self.metrics_file = None
        self.wandb_run = None
        if not enabled:
            return
        self.metrics_file = open(folder.metrics_file, "a", buffering=1)
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
