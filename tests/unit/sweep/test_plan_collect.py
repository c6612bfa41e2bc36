"""`mesh sweep plan` (GPU-hours from a throughput) and `collect` (validation rows, final flags,
run status) over run folders in the trainer's own format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mesh_cli.main import main
from pretrain.run_folder import RunFolder
from sweep.collect import FINISHED, INTERRUPTED, NOT_STARTED, RUNNING, collect, write_collection
from sweep.plan import plan_rows, plan_table
from sweep.spec import load_sweep

DEMO = str(Path(__file__).resolve().parents[3] / "configs" / "demo.yaml")


@pytest.fixture
def sweep_file(tmp_path):
    spec = {
        "root": str(tmp_path / "runs"),
        "grid": {"sizes": [{"name": f"d{d}", "config": DEMO, "overrides": {"model.hidden_size": d,
                                                                            "model.num_attention_heads": 2}}
                           for d in (32, 64)],
                 "variants": ["mesh"], "tokens": ["4K", "8K"]},
        "overrides": {"model.seq_length": 64, "train.micro_batch_size": 8, "train.global_batch_size": 8},
        "slurm": {"nodes": 2, "gpus_per_node": 4},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_scales_the_throughput_by_flops_per_token(sweep_file):
    sweep = load_sweep(sweep_file)
    rows = {r["run_id"]: r for r in plan_rows(sweep, tokens_per_s=1000.0, devices=8)}
    small, large = sweep.runs[0], sweep.runs[-1]  # the smallest run is the reference
    assert rows[small.run_id]["device_hours"] == pytest.approx(small.tokens / 1000.0 / 3600 * 8)
    # At equal FLOP/s a run with twice the FLOPs per token takes twice as long per token.
    ratio = large.flops_per_token / small.flops_per_token
    assert rows[large.run_id]["device_hours"] == pytest.approx(large.tokens / (1000.0 / ratio) / 3600 * 8)
    table = plan_table(sweep, tokens_per_s=1000.0)
    assert "8 GPU(s) per run" in table and small.run_id in table and f"{large.params_total:,}" in table
    assert "--tokens-per-s" in plan_table(sweep)  # without a throughput: how to get GPU-hours
    # A CPU sweep (no GPUs, CPU ranks) is charged in cores: 2 nodes x 2 ranks x 3 cores = 12 per run.
    sweep.slurm.update(gpus_per_node=0, procs_per_node=2, cpus_per_task=3)
    cpu = plan_table(sweep, tokens_per_s=1000.0)
    assert "core-hours:" in cpu and "12 core(s) per run" in cpu and "GPU" not in cpu


def test_plan_cli_and_its_errors(sweep_file, tmp_path, capsys):
    assert main(["sweep", "plan", str(sweep_file), "--tokens-per-s", "5e3"]) == 0
    assert "GPU-hours:" in capsys.readouterr().out
    assert main(["sweep", "plan", str(sweep_file), "--tokens-per-s", "-1"]) == 2
    assert "--tokens-per-s=-1.0 must be > 0" in capsys.readouterr().err
    missing = tmp_path / "nope.yaml"
    assert main(["sweep", "plan", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml" in err


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_collect_reports_rows_finals_and_status(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    done, resumed, stopped, _ = sweep.runs
    # A finished run: evaluations at 0, 4 and its last step, then COMPLETE.
    write_metrics(done.run_dir, [{"step": 0, "valid/loss": 8.3}, {"step": 2, "train/loss": 7.0, "train/tokens_per_s": 900.0},
                                 {"step": 4, "valid/loss": 6.0}, {"step": done.steps, "valid/loss": 5.5}])
    RunFolder(done.run_dir).mark_complete({"step": done.steps, "tokens": done.tokens, "valid_loss": 5.5,
                                           "segment_seconds": 12.5})
    # A resumed run re-evaluated step 4 after its restart: the later row wins; it is not finished yet.
    write_metrics(resumed.run_dir, [{"step": 4, "valid/loss": 6.9}, {"step": 4, "valid/loss": 6.7}])
    # A run stopped by a signal.
    write_metrics(stopped.run_dir, [{"step": 2, "valid/loss": 7.1}])
    RunFolder(stopped.run_dir).mark_interrupted("SIGUSR1", 2, None, 75)
    (stopped.run_dir / "metrics.jsonl").open("a").write('{"step": 3, "valid/lo')  # torn last line

    collection = collect(sweep)
    status = {r.run_id: r for r in collection.runs}
    assert [status[r.run_id].status for r in sweep.runs] == [FINISHED, RUNNING, INTERRUPTED, NOT_STARTED]
    assert status[done.run_id].final_loss == 5.5 and status[done.run_id].segment_seconds == 12.5
    rows = [r for r in collection.rows if r["run_id"] == done.run_id]
    assert [(r["step"], r["loss"], r["final"]) for r in rows] == [(0, 8.3, False), (4, 6.0, False), (done.steps, 5.5, True)]
    assert rows[1]["tokens"] == 4 * 8 * 64 and rows[1]["flops"] == rows[1]["tokens"] * done.flops_per_token
    assert rows[2]["tokens"] == done.tokens and rows[2]["tokens_per_s"] == 900.0
    assert [(r["step"], r["loss"]) for r in collection.rows if r["run_id"] == resumed.run_id] == [(4, 6.7)]
    summary = collection.summary()
    assert f"unfinished: {resumed.run_id} at step 4 of {resumed.steps}" in summary
    assert f"not started: {sweep.runs[3].run_id}" in summary

    csv_path, json_path = write_collection(collection, tmp_path / "out")
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(collection.rows) and {"run_id", "variant", "parameters", "parameters_total", "tokens",
                                                   "flops", "step", "loss", "final", "seed", "tokens_per_s"} <= set(table[0])
    saved = json.loads(json_path.read_text())
    assert [r["status"] for r in saved["runs"]] == [FINISHED, RUNNING, INTERRUPTED, NOT_STARTED]
