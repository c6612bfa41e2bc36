"""A sweep trained for real without a scheduler: each run is `mesh train CONFIG overrides...` as
the sweep resolves it; then `mesh sweep collect` and `fit` on the run folders the trainer wrote,
and `mesh sweep plan --probe` measuring the smallest run. (The SLURM job-array path:
tests/integration/test_slurm_sweep.py.)"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.spec import load_sweep
from tests.support.harness import REPO, launch_env

pytestmark = pytest.mark.slow


def sweep_file(tmp_path: Path, data: Path) -> Path:
    spec = {
        "root": str(tmp_path / "sweep"),
        "grid": {"sizes": [{"name": f"d{d}", "config": str(REPO / "configs" / "demo.yaml"),
                            "overrides": {"model.hidden_size": d, "model.num_attention_heads": 2}} for d in (16, 32, 48, 64)],
                 "variants": ["mesh"], "tokens": ["4096"], "seeds": [7]},
        "rules": {"optim.lr": {"power_law": {"scale": 3e-3, "exponent": -0.25, "reference": 1e5}}},
        "overrides": {"model.seq_length": 64, "train.micro_batch_size": 8, "train.global_batch_size": 8,
                      "train.eval_interval": 4, "train.eval_batches": 2, "train.log_interval": 2, "train.device": "cpu",
                      "logging.wandb_mode": "disabled", "logging.progress_bar": False,
                      "data.tokenizer": str(data / "tokenizer.model"), "data.train": [str(data / "train_text_document")],
                      "data.valid": [str(data / "val_text_document")]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def mesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh_cli", *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=600)


def test_train_collect_fit_and_probe(demo_data, tmp_path):
    path = sweep_file(tmp_path, demo_data)
    sweep = load_sweep(path)
    assert [r.steps for r in sweep.runs] == [8, 8, 8, 8]
    for run in sweep.runs[:3]:  # the fourth is left unstarted
        done = mesh("train", str(run.config_path), *run.overrides)
        assert done.returncode == 0, done.stderr[-2000:]

    status = mesh("sweep", "status", str(path))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == "3/4 runs complete; 3 COMPLETED, 1 NOT SUBMITTED", status.stdout

    collected = mesh("sweep", "collect", str(path))
    assert collected.returncode == 0, collected.stderr
    assert "3 finished, 1 not started" in collected.stdout and "not started: d64.mesh.t4.096k.s7" in collected.stdout
    with (tmp_path / "sweep" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    first = [r for r in rows if r["run_id"] == sweep.runs[0].run_id]
    assert [int(r["step"]) for r in first] == [0, 4, 8] and [r["final"] for r in first] == ["False", "False", "True"]
    complete = json.loads((sweep.runs[0].run_dir / "COMPLETE").read_text())
    assert float(first[-1]["loss"]) == pytest.approx(complete["valid_loss"])
    assert int(first[-1]["tokens"]) == complete["tokens"] == sweep.runs[0].tokens
    assert float(first[-1]["tokens_per_s"]) > 0 and int(first[-1]["parameters"]) == sweep.runs[0].params_non_embedding

    # Final losses: three sizes at one budget, so L(N) only.
    fitted = mesh("sweep", "fit", str(path), "--bootstrap", "10", "--grid-points", "2")
    assert fitted.returncode == 0, fitted.stderr
    assert "mesh  L(N)" in fitted.stdout and "not fitted: a size has a single token budget" in fitted.stdout
    report = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert set(report["variants"]["mesh"]["L(N)"]["coefficients"]) == {"E", "A", "alpha"}
    # With the intermediate evaluations each size has two budgets (4 and 8 steps): L(N, D) too.
    fitted = mesh("sweep", "fit", str(tmp_path / "sweep" / "results.csv"), "--all-points", "--bootstrap", "10",
                  "--grid-points", "2", "--out", str(tmp_path / "fit"))
    assert fitted.returncode == 0, fitted.stderr
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert set(report["variants"]["mesh"]["L(N,D)"]["coefficients"]) == {"E", "A", "alpha", "B", "beta"}
    for name in ("loss_vs_parameters.png", "loss_vs_flops.png"):
        assert (tmp_path / "fit" / name).stat().st_size > 10_000

    probed = mesh("sweep", "plan", str(path), "--probe", "--probe-steps", "3")
    assert probed.returncode == 0, probed.stderr
    assert "measured by a 3-step probe of d16.mesh.t4.096k.s7" in probed.stdout
    # The probe trains in a scratch folder: the sweep's run folders are untouched.
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == [r.run_id for r in sweep.runs[:3]]
