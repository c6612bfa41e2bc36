"""`mesh sweep submit` up to sbatch: which runs go into the array, and the resources it asks for
(no cluster: dry runs, and runs marked COMPLETE by the run folder's own code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh_cli.main import main
from pretrain.run_folder import RunFolder
from sweep.spec import load_sweep
from sweep.submit import index_ranges

TINY_SWEEP = Path(__file__).resolve().parents[3] / "configs" / "sweeps" / "tiny.yaml"
CPU = ["--gpus-per-node", "0", "--procs-per-node", "1", "--cpus-per-task", "1"]


@pytest.mark.parametrize("indices, text", [([0], "0"), ([0, 1, 2], "0-2"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
                                           ([3, 5, 7], "3,5,7")])
def test_index_ranges(indices, text):
    assert index_ranges(indices) == text


def _sweep(tmp_path: Path, slurm: dict | None = None) -> Path:
    spec = yaml.safe_load(TINY_SWEEP.read_text())
    spec["root"] = str(tmp_path / "sweep")
    if slurm is not None:
        spec["slurm"] = slurm
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _complete(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    RunFolder(run_dir).mark_complete({"step": 16, "tokens": 8192, "valid_loss": 7.0, "segment_seconds": 1.0})


def test_dry_run_leaves_out_complete_runs_and_throttles(tmp_path, capsys):
    path = _sweep(tmp_path)
    runs = load_sweep(path).runs
    for i in (0, 1, 6):
        _complete(Path(runs[i].run_dir))
    assert main(["sweep", "submit", str(path), *CPU, "--max-parallel", "3", "--time", "10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=2-5,7-11%3" in out and "#SBATCH --time=10" in out
    assert "# 9 of 12 runs to train: array 2-5,7-11%3" in out
    # the table covers every run, so array task i is run i
    assert out.count(str(tmp_path / "sweep") + "/") >= 24
    assert 'RUN_DIR=${RUN_DIRS[$INDEX]}' in out
    assert not (tmp_path / "sweep" / "slurm").exists() and not Path(runs[2].run_dir).exists()


def test_a_finished_sweep_submits_nothing(tmp_path, capsys):
    path = _sweep(tmp_path)
    for run in load_sweep(path).runs:
        _complete(Path(run.run_dir))
    assert main(["sweep", "submit", str(path), *CPU]) == 0
    assert "all 12 runs of sweep tiny are complete; nothing to submit" in capsys.readouterr().out
    assert not (tmp_path / "sweep" / "slurm").exists()


GPU_FILE = {"nodes": 1, "gpus_per_node": 1}  # a sweep file that asks for a GPU per node


@pytest.mark.parametrize("slurm, flags, message", [
    (None, ["--max-parallel", "0"], "--max-parallel=0 must be >= 1"),
    (GPU_FILE, [], "train.device=cpu but --gpus-per-node 1"),  # the file asks for a GPU, the runs train on the CPU
    (None, ["--gpus-per-node", "0", "--procs-per-node", "3"],
     "run d32.base.t8k.s1: train.global_batch_size=8 is not a multiple of train.micro_batch_size x data-parallel"),
    (GPU_FILE, ["--gpus-per-node", "0"], "slurm.gpus_per_node=0 needs slurm.procs_per_node"),
])
def test_impossible_sweep_requests(tmp_path, capsys, slurm, flags, message):
    path = _sweep(tmp_path, slurm)
    assert main(["sweep", "submit", str(path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "sweep").exists()
