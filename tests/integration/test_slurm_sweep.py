"""`mesh sweep submit | status` as one job array on the real local SLURM cluster, then
`collect` and `fit` on what it trained: configs/sweeps/tiny.yaml (three widths x two variants x
two budgets = 12 runs of 16-32 steps, one CPU rank each)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.harness import REPO, launch_env
from tests.support.slurm_cluster import wait_for_job

pytestmark = pytest.mark.slow

TINY_SWEEP = REPO / "configs" / "sweeps" / "tiny.yaml"
CPU = ["--gpus-per-node", "0", "--procs-per-node", "1", "--cpus-per-task", "1"]


def mesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh_cli", *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300)


def sweep_file(tmp_path: Path, data: Path, **changes) -> Path:
    spec = yaml.safe_load(TINY_SWEEP.read_text())
    spec["root"] = str(tmp_path / "sweep")
    spec["overrides"].update({"data.tokenizer": str(data / "tokenizer.model"),
                              "data.train": [str(data / "train_text_document")],
                              "data.valid": [str(data / "val_text_document")]})
    spec.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_jobs() -> list[str]:
    """The queue's sweep jobs (the other SLURM tests' jobs have other names)."""
    done = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if " sweep-" in line]


def submitted_array(stdout: str) -> str:
    assert "submitted array " in stdout, stdout
    return stdout.split("submitted array ")[1].split()[0]


def test_sweep_as_a_job_array_then_collect_fit_resubmit(slurm_cluster, demo_data, tmp_path):
    path = sweep_file(tmp_path, demo_data)
    root = tmp_path / "sweep"
    started = time.monotonic()
    done = mesh("sweep", "submit", str(path), *CPU)
    assert done.returncode == 0, done.stderr
    array_id = submitted_array(done.stdout)
    assert "(0-11): 12 run(s) to train" in done.stdout
    status = mesh("sweep", "status", str(path)).stdout
    assert status.count(f" {array_id}_") == 12  # every run knows its array task

    tasks = wait_for_job(array_id, timeout=420, log=root / "slurm" / f"array-{array_id}_0.log")
    wall = time.monotonic() - started
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 12
    runs = sorted(p for p in root.iterdir() if (p / "COMPLETE").exists())
    assert len(runs) == 12
    training = sum(json.loads((p / "COMPLETE").read_text())["segment_seconds"] for p in runs)
    print(f"sweep wall {wall:.1f} s, training {training:.1f} s over 12 runs")  # docs/slurm.md: the overhead
    status = mesh("sweep", "status", str(path)).stdout
    assert status.splitlines()[-1] == "12/12 runs complete; 12 COMPLETED", status

    collected = mesh("sweep", "collect", str(path))
    assert collected.returncode == 0, collected.stderr
    csv = root / "results.csv"
    assert csv.exists() and len(csv.read_text().splitlines()) > 12
    fitted = mesh("sweep", "fit", str(csv), "--bootstrap", "20", "--out", str(tmp_path / "fit"))
    assert fitted.returncode == 0, fitted.stderr
    for variant in ("base", "mesh"):
        assert any(line.strip().startswith(variant) and "alpha = " in line and "[" in line
                   for line in fitted.stdout.splitlines()), fitted.stdout
    for plot in ("loss_vs_parameters.png", "loss_vs_flops.png"):
        assert (tmp_path / "fit" / plot).stat().st_size > 1000

    # a finished sweep submits nothing
    again = mesh("sweep", "submit", str(path), *CPU)
    assert again.returncode == 0 and "nothing to submit" in again.stdout and "submitted" not in again.stdout
    assert len((root / "slurm" / "jobs.jsonl").read_text().splitlines()) == 1

    # delete one run's result: exactly that one is trained again
    from sweep.spec import load_sweep

    run_ids = [run.run_id for run in load_sweep(path).runs]  # array task i = the sweep's run i
    index = 5
    lost = root / run_ids[index]
    shutil.rmtree(lost)
    rerun = mesh("sweep", "submit", str(path), *CPU)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({index}): 1 run(s) to train, 11 already complete" in rerun.stdout
    rerun_id = submitted_array(rerun.stdout)
    tasks = wait_for_job(rerun_id, timeout=180)
    assert len(tasks) == 1 and tasks[0]["JobState"] == "COMPLETED" and tasks[0]["ArrayTaskId"] == str(index)
    assert (lost / "COMPLETE").exists()


@pytest.mark.parametrize("change, message", [
    ({"grid": {"sizes": [], "variants": ["base"], "tokens": ["8K"]}}, "grid.sizes"),
    ({"grid": {"sizes": ["no-such-size"], "tokens": ["8K"]}}, "no-such-size"),
    ({"overrides": {"train.no_such_field": 1}}, "no_such_field"),
    ({"slurm": {"nodes": 1, "gpu": 1}}, "slurm.gpu is not a resource field"),
    ({"slurm": {"nodes": 1, "gpus_per_node": 0, "procs_per_node": 3}}, "data-parallel size = 8 x 3"),
    ({"slurm": {"nodes": 1, "gpus_per_node": 0, "procs_per_node": 1, "time": "later"}}, "slurm.time='later'"),
])
def test_bad_sweep_files_are_one_line_and_submit_nothing(slurm_cluster, demo_data, tmp_path, capsys,
                                                         change, message):
    """In-process (`mesh` is the same function): nothing reaches sbatch, no run folder appears."""
    from mesh_cli.main import main

    spec = yaml.safe_load(TINY_SWEEP.read_text())
    if "overrides" in change:
        change = {"overrides": {**spec["overrides"], **change["overrides"]}}
    if "slurm" not in change:
        change["slurm"] = {"nodes": 1, "gpus_per_node": 0, "procs_per_node": 1}
    path = sweep_file(tmp_path, demo_data, **change)
    jobs_before = sweep_jobs()
    assert main(["sweep", "submit", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "sweep").exists()
    assert sweep_jobs() == jobs_before
