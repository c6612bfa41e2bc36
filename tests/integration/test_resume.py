"""Exact resume, resharding, signals, kill -9 and non-finite steps, with real training processes.

Every run is the tiny equivalence model (tests/parallel/harness.py TINY) for 6
steps. "Exact" means bitwise: the same losses and the same final fp32 weights
as the run that never stopped, at the same layout. A resume at another layout
continues the loss curve within the equivalence tolerances of the parallel tests.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import format as ckpt
from pretrain.signals import REQUEUE_EXIT_CODE
from tests.support import processes
from tests.support.harness import LOSS_RTOL, PARAM_RTOL, Run, run_plan, tail
from tests.support.processes import finish, logged_steps, start, wait_for, worker_pids

pytestmark = pytest.mark.slow

STEPS = ["train.steps=6"]
LAYOUTS_1 = {"zero0": ["parallel.zero_stage=0"], "zero1": ["parallel.zero_stage=1"], "zero3": ["parallel.zero_stage=3"],
             "bf16": ["parallel.zero_stage=1", "train.bf16=true"],
             # background saves every step: each checkpoint is the state of its step, not a later one
             "zero1-async": ["parallel.zero_stage=1", "checkpoint.async_save=true", "checkpoint.save_interval=1",
                             "checkpoint.keep_last=0"]}
LAYOUTS_2 = {"dp2-zero2": ["parallel.zero_stage=2"], "tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}


def triple(name: str, overrides: list[str], work: Path) -> list[Run]:
    """Uninterrupted; stopped after step 3; resumed from that checkpoint in a new run folder."""
    return [
        Run(f"{name}-full", [*STEPS, *overrides]),
        Run(f"{name}-first", [*STEPS, *overrides, "train.stop_after_step=3"]),
        Run(f"{name}-resumed", [*STEPS, *overrides,
                                f"checkpoint.resume={work / f'{name}-full' / 'checkpoints' / 'step0000003'}"]
            if "async" in name else
            [*STEPS, *overrides, f"checkpoint.resume={work / f'{name}-first' / 'checkpoints' / 'step0000003'}"]),
    ]


@pytest.fixture(scope="module")
def plans(demo_data, tmp_path_factory):
    """Three launches: world size 1 (ZeRO 0/1/3), world size 2 (DP2 ZeRO-2, TP2, PP2, plus
    resumes of a DP1 checkpoint at DP2 and TP2), world size 1 again (a DP2 checkpoint at DP1)."""
    work = tmp_path_factory.mktemp("resume")
    one = [r for name, o in LAYOUTS_1.items() for r in triple(name, o, work)]
    results = run_plan(1, one, demo_data, work)
    dp1_ckpt = work / "zero1-first" / "checkpoints" / "step0000003"
    two = [r for name, o in LAYOUTS_2.items() for r in triple(name, o, work)]
    two += [Run("dp1-to-dp2", [*STEPS, f"checkpoint.resume={dp1_ckpt}"]),
            Run("dp1-to-tp2", [*STEPS, "parallel.tensor=2", f"checkpoint.resume={dp1_ckpt}"]),
            Run("dp1-to-pp2", [*STEPS, "parallel.pipeline=2", f"checkpoint.resume={dp1_ckpt}"])]
    results.update(run_plan(2, two, demo_data, work))
    dp2_ckpt = work / "dp2-zero2-first" / "checkpoints" / "step0000003"
    results.update(run_plan(1, [Run("dp2-to-dp1", [*STEPS, "parallel.zero_stage=2",
                                                   f"checkpoint.resume={dp2_ckpt}"])], demo_data, work))
    return work, results


def assert_bitwise(full: dict, resumed: dict, label: str) -> None:
    assert len(full["losses"]) == 6 and len(resumed["losses"]) == 3, label
    assert resumed["losses"] == full["losses"][3:], f"{label}: {resumed['losses']} vs {full['losses'][3:]}"
    assert resumed["params"].keys() == full["params"].keys()
    differing = [n for n in full["params"] if not torch.equal(full["params"][n], resumed["params"][n])]
    assert not differing, f"{label}: {len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.mark.parametrize("layout", [*LAYOUTS_1, *LAYOUTS_2])
def test_stop_and_resume_is_bitwise_exact(plans, layout):
    work, results = plans
    assert results[f"{layout}-first"]["losses"] == results[f"{layout}-full"]["losses"][:3]
    assert_bitwise(results[f"{layout}-full"], results[f"{layout}-resumed"], layout)


def test_background_saves_capture_their_own_step(plans):
    """Each asynchronously written checkpoint of the uninterrupted run is the state at its step:
    resuming from step 3's (written while steps 4+ trained) gave the bitwise result above, and
    every step's checkpoint is complete, verified and marked asynchronous."""
    work, results = plans
    root = work / "zero1-async-full" / "checkpoints"
    infos = ckpt.list_checkpoints(root)
    assert [i.step for i in infos] == [1, 2, 3, 4, 5, 6] and all(i.complete for i in infos)
    assert [i.meta.asynchronous for i in infos] == [True] * 5 + [False]  # the last one ends the run
    assert all(ckpt.verify(i.path) == [] for i in infos)
    weights = ckpt.consolidate(root / "step0000006")
    assert all(torch.equal(weights[n], v) for n, v in results["zero1-async-full"]["params"].items())
    assert results["zero1-async-full"]["losses"] == results["zero1-full"]["losses"]


@pytest.mark.parametrize("name, reference", [("dp1-to-dp2", "zero1-full"), ("dp1-to-tp2", "zero1-full"),
                                             ("dp1-to-pp2", "zero1-full"), ("dp2-to-dp1", "dp2-zero2-full")])
def test_resume_at_another_layout_continues_the_run(plans, name, reference):
    """Weights and Adam moments resharded; same global batches, so the curve continues to
    the tolerance the parallel-equivalence tests use."""
    work, results = plans
    run, ref = results[name], results[reference]
    assert len(run["losses"]) == 3
    for got, want in zip(run["losses"], ref["losses"][3:]):
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"{name}: {run['losses']} vs {ref['losses'][3:]}"
    flat = lambda p: torch.cat([p[n].flatten() for n in sorted(p)])  # noqa: E731
    rel = ((flat(run["params"]) - flat(ref["params"])).norm() / flat(ref["params"]).norm()).item()
    assert rel <= PARAM_RTOL, f"{name}: parameters {rel:.2e} from the uninterrupted run"
    log = (work / "torchrun.log").read_text()
    assert "layout changed" in log and "RNG states re-seeded" in log


# ------------------------------------------------------------------ real processes
def train_cmd(run_dir: Path, data: Path, nproc: int, *overrides: str) -> list[str]:
    return processes.train_cmd(run_dir, data, nproc, *STEPS, *overrides)


def final_weights(run_dir: Path) -> dict:
    return ckpt.consolidate(run_dir / "checkpoints" / "step0000006")


def assert_same_weights(weights: dict, reference: dict, label: str) -> None:
    assert weights.keys() == reference.keys()
    differing = [n for n in reference if not torch.equal(weights[n], reference[n])]
    assert not differing, f"{label}: {len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"


@pytest.mark.parametrize("how", ["SIGUSR1 to one rank", "SIGTERM to all ranks"])
def test_signal_saves_exits_75_and_resumes_exactly(plans, demo_data, tmp_path, how):
    work, results = plans
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    cmd = train_cmd(run_dir, demo_data, 2, "parallel.zero_stage=2", "checkpoint.save_at_end=true")
    proc = start(cmd, log, MESH_TRAIN_STEP_DELAY="1.0", MESH_CKPT_SLOW="3")
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, log)
    workers = worker_pids(proc)
    assert len(workers) == 2, workers
    if how.startswith("SIGUSR1"):
        os.kill(workers[1], signal.SIGUSR1)
    else:
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        # ...and again while the checkpoint is being written: it must not break the save.
        wait_for(lambda: any(run_dir.glob("checkpoints/step*/.slow-rank0")), proc, log)
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
    code = finish(proc, log)
    assert code == REQUEUE_EXIT_CODE, f"exit code {code}:\n{tail(log)}"
    marker = json.loads((run_dir / "INTERRUPTED").read_text())
    assert not (run_dir / "COMPLETE").exists()
    stopped = marker["step"]
    assert 2 <= stopped < 6 and marker["signal"] == how.split()[0]
    assert ckpt.list_checkpoints(run_dir / "checkpoints")[-1].step == stopped
    assert ckpt.verify(run_dir / "checkpoints" / ckpt.step_dir_name(stopped)) == []
    if how.startswith("SIGTERM"):
        assert "received SIGTERM again: already stopping, the checkpoint save continues" in log.read_text()

    code = finish(start(cmd, log), log)
    assert code == 0, tail(log)
    assert not (run_dir / "INTERRUPTED").exists()
    complete = json.loads((run_dir / "COMPLETE").read_text())
    assert complete["step"] == 6 and complete["checkpoint"].endswith(ckpt.step_dir_name(6))
    assert f"resuming from {run_dir / 'checkpoints' / ckpt.step_dir_name(stopped)} at step {stopped}" in log.read_text()
    assert_same_weights(final_weights(run_dir), results["dp2-zero2-full"]["params"], how)


def test_kill_9_inside_saves_and_damaged_checkpoints_fall_back(plans, demo_data, tmp_path):
    """Two ranks. kill -9 of rank 1 after it wrote its state files (rank 0 waiting for its report),
    then of rank 0 after it wrote the metadata but before `latest` moved; then a truncated newest
    checkpoint. Every restart takes the newest complete, undamaged checkpoint, says so, and the
    run ends bitwise where the uninterrupted one did."""
    work, results = plans
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    cmd = train_cmd(run_dir, demo_data, 2, "parallel.zero_stage=2", "checkpoint.save_interval=2",
                    "checkpoint.save_at_end=true", "checkpoint.keep_last=0")
    checkpoints = run_dir / "checkpoints"

    def kill_inside(point: str, step: int, rank: int) -> None:
        proc = start(cmd, log, MESH_CKPT_PAUSE=f"{point}:{step}", MESH_CKPT_PAUSE_RANKS=str(rank))
        marker = checkpoints / ckpt.step_dir_name(step) / f".paused-rank{rank}"
        wait_for(marker.exists, proc, log)
        os.kill(worker_pids(proc)[rank], signal.SIGKILL)  # that rank only: torchrun ends the rest
        assert finish(proc, log) != 0

    kill_inside("files", 4, rank=1)
    infos = {i.step: i for i in ckpt.list_checkpoints(checkpoints)}
    assert infos[2].complete and not infos[4].complete
    assert (checkpoints / "latest").read_text().strip() == "step0000002"

    kill_inside("meta", 6, rank=0)  # resumes from 2 (passing over the partial 4), dies after 6's metadata
    text = log.read_text()
    assert f"resuming from {checkpoints / 'step0000002'} at step 2" in text
    assert "passed over step0000004: no meta.json (the save was interrupted" in text
    assert (checkpoints / "latest").read_text().strip() == "step0000004"  # not yet moved to 6
    assert [i.step for i in ckpt.list_checkpoints(checkpoints) if i.complete] == [2, 4, 6]

    victim = sorted((checkpoints / "step0000006" / "state").glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    assert finish(start(cmd, log), log) == 0, tail(log)
    text = log.read_text()
    assert f"resuming from {checkpoints / 'step0000004'} at step 4" in text
    assert f"passed over step0000006: {victim}: 1000 bytes" in text
    assert list(checkpoints.glob("step0000006.replaced-*")), "the damaged checkpoint was set aside, not deleted"
    assert_same_weights(final_weights(run_dir), results["dp2-zero2-full"]["params"], "kill -9 / fallback")


def test_non_finite_steps_are_skipped_then_the_run_stops(demo_data, tmp_path):
    # One NaN step at ZeRO-0 (the optimizer wrapper of pretrain/engine.py): no update at all.
    run_dir = tmp_path / "skip"
    log = tmp_path / "skip.log"
    cmd = train_cmd(run_dir, demo_data, 1, "parallel.zero_stage=0", "train.steps=4", "checkpoint.save_interval=1",
                    "checkpoint.keep_last=0")
    assert finish(start(cmd, log, MESH_TRAIN_NAN_STEPS="3"), log) == 0, tail(log)
    assert "step      3: loss nan, gradient norm nan: not finite, update skipped (1 in a row" in log.read_text()
    before = ckpt.consolidate(run_dir / "checkpoints" / "step0000002", with_optimizer=True)
    after = ckpt.consolidate(run_dir / "checkpoints" / "step0000003", with_optimizer=True)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the state"
    metas = [ckpt.read_meta(run_dir / "checkpoints" / ckpt.step_dir_name(s)) for s in (2, 3, 4)]
    assert [m.adam_step for m in metas] == [2.0, 2.0, 3.0]
    assert [m.counters["skipped_steps"] for m in metas] == [0, 1, 1]
    assert ckpt.consolidate(run_dir / "checkpoints" / "step0000004")["output_layer.weight"].isfinite().all()

    # Three in a row at ZeRO-1 (DeepSpeed's own skip) with max_skipped_steps=3: a clear stop.
    run_dir = tmp_path / "stop"
    log = tmp_path / "stop.log"
    # Time-based saving too: a save is due after every step.
    cmd = train_cmd(run_dir, demo_data, 1, "train.max_skipped_steps=3", "checkpoint.save_interval_minutes=1e-6")
    assert finish(start(cmd, log, MESH_TRAIN_NAN_STEPS="3,4,5"), log) == 2, tail(log)
    assert [i.step for i in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2, 3, 4]  # keep_last=3
    last = run_dir / "checkpoints" / "step0000004"
    assert ckpt.read_meta(last).reason == "1e-06 minutes since the last save"
    assert (f"mesh train: error: 3 consecutive steps (3-5) had a non-finite loss or gradient norm, stopping "
            f"(train.max_skipped_steps=3); the last complete checkpoint is {last}") in log.read_text()
    assert ckpt.verify(last) == [] and ckpt.read_meta(last).adam_step == 2.0
