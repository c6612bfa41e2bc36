"""End-to-end: the demo corpus, tokenizer and shards, then real training through DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_mesh(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    return subprocess.run([sys.executable, "-m", "mesh_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_demo_training_learns(demo_data, tmp_path):
    """The demo MeSH model: training loss falls and held-out perplexity ends far below its start."""
    run_dir = tmp_path / "run"
    result = run_mesh(
        "demo", "--data-dir", str(demo_data), "--run-dir", str(run_dir),
        "train.steps=40", "train.eval_interval=20", "train.eval_batches=4", "train.log_interval=5",
        "logging.wandb_mode=offline", "logging.progress_bar=false", "logging.peak_tflops=0.5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    # Throughput in model FLOPs: F_token x tokens/s on one process, and MFU against the given peak.
    from mesh_model.flops import flops_per_token
    from pretrain.config import load_config

    token_flops = flops_per_token(load_config(run_dir / "config.yaml").model).total
    rows = [m for m in metrics if "train/loss" in m]
    for row in rows:
        assert row["train/tflops_per_device"] == pytest.approx(row["train/tokens_per_s"] * token_flops / 1e12)
        assert row["train/mfu"] == pytest.approx(row["train/tflops_per_device"] / 0.5)
    train = [row["train/loss"] for row in rows]
    valid = [m for m in metrics if "valid/ppl" in m]
    assert [v["step"] for v in valid] == [0, 20, 40]
    assert train[-1] < train[0] - 1.0, train
    assert valid[-1]["valid/ppl"] < 0.25 * valid[0]["valid/ppl"], valid
    assert "validation perplexity" in result.stdout
    # The run folder has what the README promises.
    for name in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "step0000040").is_dir()
    # The COMPLETE marker summarises the finished run for launchers and sweeps.
    import json
    complete = json.loads((run_dir / "COMPLETE").read_text())
    assert complete["step"] == 40 and complete["tokens"] == 40 * 16 * 128
    assert complete["valid_loss"] == pytest.approx(valid[-1]["valid/loss"])
    assert complete["checkpoint"].endswith("step0000040") and complete["segment_seconds"] > 0
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"


def test_train_refuses_an_existing_run_dir(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {}\n")
    result = run_mesh("demo", "--data-dir", str(demo_data), "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
    assert (run_dir / "config.yaml").read_text() == "model: {}\n"


def test_missing_shards_are_a_clear_error(tmp_path):
    result = run_mesh("train", "configs/demo.yaml", f"data.train=[{tmp_path}/nothing]",
                      f"data.tokenizer={tmp_path}/tok.model", f"logging.run_dir={tmp_path}/run", timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "tok.model" in errors[0], result.stderr[-2000:]
