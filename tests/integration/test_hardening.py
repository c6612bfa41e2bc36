"""Careless and hostile use, one test per fault class, on real `mesh train` processes.

Every test checks that what the user sees is one line, that nothing already written is lost
(the previous checkpoint verifies and a later run resumes from it), and the exit code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pretrain.checkpoint import format as ckpt
from pretrain.signals import SAVE_FAILED_EXIT_CODE, USER_INTERRUPT_EXIT_CODE
from tests.support.harness import tail
from tests.support.processes import finish, logged_steps, start, train_cmd, wait_for

pytestmark = pytest.mark.slow


def error_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("mesh train: error:")]


def one_error(log: Path) -> str:
    lines = error_lines(log)
    assert len(lines) == 1, f"expected one error line:\n{tail(log)}"
    assert "Traceback" not in log.read_text(), tail(log)
    return lines[0]


def complete_steps(root: Path) -> list[int]:
    return [i.step for i in ckpt.list_checkpoints(root) if i.complete]


# ------------------------------------------------------------------ 3. one run per run folder
def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_holder_is_taken_over(demo_data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    cmd = train_cmd(run_dir, demo_data, 1, "train.steps=40", "checkpoint.save_interval=2")
    first = start(cmd, log, MESH_TRAIN_STEP_DELAY="0.5")
    wait_for(lambda: logged_steps(run_dir) >= 2, first, log)
    second_log = tmp_path / "second.log"
    assert finish(start(cmd, second_log), second_log) == 2
    message = one_error(second_log)
    assert f"logging.run_dir={run_dir} is in use by another run (pid {first.pid} on host " in message, message
    assert f"lock {run_dir / '.lock'}" in message
    assert first.poll() is None  # the first run was not disturbed
    # kill -9: the kernel drops the lock; the next start takes it over and says whose it was.
    wait_for(lambda: len(complete_steps(run_dir / "checkpoints")) >= 1, first, log)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third_log = tmp_path / "third.log"
    assert finish(start(train_cmd(run_dir, demo_data, 1, "train.steps=6"), third_log), third_log) == 0, tail(third_log)
    text = third_log.read_text()
    assert f"took over the lock {run_dir / '.lock'} of pid {first.pid} on host" in text, tail(third_log)
    assert "which is no longer running" in text and "resuming from" in text
    assert (run_dir / ".lock").read_text() == ""  # a clean exit leaves no holder


# ------------------------------------------------------------------ 4. config changes on resume
def test_config_changes_on_resume_are_applied_and_reported_or_refused(demo_data, tmp_path):
    from pretrain.engine import lr_at_step

    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    base = ["train.steps=6", "optim.lr=2e-3", "checkpoint.save_interval=3"]
    assert finish(start(train_cmd(run_dir, demo_data, 1, *base, "train.stop_after_step=3"), log), log) == 0, tail(log)
    # A changed seed (the data order) is refused, naming the field; nothing is written.
    refused_log = tmp_path / "refused.log"
    assert finish(start(train_cmd(run_dir, demo_data, 1, *base, "train.seed=99"), refused_log), refused_log) == 2
    message = one_error(refused_log)
    assert "cannot resume with a changed train.seed (1234 in the checkpoint, 99 now" in message, message
    assert complete_steps(run_dir / "checkpoints") == [3]
    # A changed peak LR is applied from the saved step on, and said in one line.
    changed = [*base[:1], "optim.lr=1e-3", *base[2:]]
    assert finish(start(train_cmd(run_dir, demo_data, 1, *changed), log), log) == 0, tail(log)
    assert "config change: optim.lr: 0.002 -> 0.001 (applied: the LR schedule follows the new peak" in log.read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lr_at_4 = [r["train/lr"] for r in rows if r.get("step") == 4 and "train/lr" in r][-1]
    # Step 4 is the optimizer update with index 3; warmup is max(1, round(1% of 6)) = 1 step, and
    # configs/demo.yaml sets min_lr=2e-4.
    assert lr_at_4 == pytest.approx(lr_at_step(3, lr=1e-3, min_lr=2e-4, warmup_steps=1, total_steps=6), rel=1e-12)


def test_every_config_field_has_a_resume_policy():
    from pretrain.config import RunConfig
    from pretrain.resume_policy import POLICY

    sections = {s.name: getattr(RunConfig(), s.name) for s in dataclasses.fields(RunConfig) if s.name != "model"}
    fields = {f"{name}.{f.name}" for name, section in sections.items() for f in dataclasses.fields(section)}
    assert fields - set(POLICY) == set(), "classify these fields in pretrain/resume_policy.py"
    assert set(POLICY) - fields == set(), "these policy entries name no config field"


# ------------------------------------------------------------------ 5. a full or read-only disk
def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}): needs root")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_save_on_a_full_disk_fails_cleanly_and_the_run_recovers(demo_data, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "14m")  # one or two TINY checkpoints fit, not six
    try:
        run_dir, log = tmp_path / "run", tmp_path / "train.log"
        args = ["train.steps=6", "checkpoint.save_interval=1", "checkpoint.keep_last=0", f"checkpoint.dir={disk}"]
        assert finish(start(train_cmd(run_dir, demo_data, 1, *args), log), log) == SAVE_FAILED_EXIT_CODE, tail(log)
        message = one_error(log)
        assert "no space left on device" in message and "partial files removed" in message, message
        saved = complete_steps(disk)
        assert saved and ckpt.verify(disk / ckpt.step_dir_name(saved[-1])) == []
        assert f"the last complete checkpoint {disk / ckpt.step_dir_name(saved[-1])} is intact" in message
        assert [i.name for i in ckpt.list_checkpoints(disk) if not i.complete] == []  # no partial save left
        # Again on the still-full disk: the same clean line, nothing half-written left behind.
        again = tmp_path / "again.log"
        assert finish(start(train_cmd(run_dir, demo_data, 1, *args), again), again) == SAVE_FAILED_EXIT_CODE
        assert "no space left on device" in one_error(again)
        assert complete_steps(disk) == saved and not [p for p in disk.iterdir() if p.stat().st_size == 0 and p.is_file()]
        assert not [p for p in run_dir.iterdir() if p.is_file() and p.stat().st_size == 0 and p.name != ".lock"]
        # Space freed (the tmpfs grown): the same command resumes and finishes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = tmp_path / "done.log"
        assert finish(start(train_cmd(run_dir, demo_data, 1, *args[:1], "checkpoint.save_interval=0",
                                      "checkpoint.save_at_end=true", f"checkpoint.dir={disk}",
                                      "checkpoint.keep_last=1"), done), done) == 0, tail(done)
        assert f"resuming from {disk / ckpt.step_dir_name(saved[-1])}" in done.read_text()
        assert complete_steps(disk) == [6]
    finally:
        _umount(disk)


def test_a_read_only_checkpoint_folder_is_refused_up_front_and_mid_run(demo_data, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        run_dir, log = tmp_path / "run", tmp_path / "train.log"
        args = ["train.steps=8", "checkpoint.save_interval=2", f"checkpoint.dir={disk}"]
        proc = start(train_cmd(run_dir, demo_data, 1, *args), log, MESH_TRAIN_STEP_DELAY="0.7")
        wait_for(lambda: complete_steps(disk) == [2], proc, log)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert finish(proc, log) == SAVE_FAILED_EXIT_CODE, tail(log)
        message = one_error(log)
        assert "read-only file system" in message and f"{disk / 'step0000002'} is intact" in message, message
        assert ckpt.verify(disk / "step0000002") == []
        # A start on the read-only folder is refused before anything runs.
        refused = tmp_path / "refused.log"
        assert finish(start(train_cmd(run_dir, demo_data, 1, *args), refused), refused) == SAVE_FAILED_EXIT_CODE
        message = one_error(refused)
        assert f"checkpoint.dir={disk} cannot be written (read-only file system" in message, message
        assert "step      1" not in refused.read_text()
    finally:
        _umount(disk)


# ------------------------------------------------------------------ 6-7. metadata checksum, set-aside copies
def test_an_edited_meta_json_fails_verification(demo_data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    assert finish(start(train_cmd(run_dir, demo_data, 1, "train.steps=2", "checkpoint.save_interval=1"), log),
                  log) == 0, tail(log)
    newest = run_dir / "checkpoints" / "step0000002"
    meta = json.loads((newest / "meta.json").read_text())
    meta["counters"]["consumed_samples"] = 0  # would silently restart the data order
    (newest / "meta.json").write_text(json.dumps(meta, indent=1))
    problems = ckpt.verify(newest)
    assert len(problems) == 1 and "does not match its own sha256 (meta_sha256): edited or damaged" in problems[0]
    chosen, passed_over = ckpt.choose_resume(run_dir / "checkpoints")
    assert chosen.name == "step0000001" and "step0000002" in passed_over[0]
    from mesh_cli.main import main

    assert main(["ckpt", "verify", str(run_dir / "checkpoints")]) == 1


def test_set_aside_checkpoints_are_counted_listed_and_pruned(demo_data, tmp_path, capsys):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    assert finish(start(train_cmd(run_dir, demo_data, 1, "train.steps=2", "checkpoint.save_interval=1"), log),
                  log) == 0, tail(log)
    root = run_dir / "checkpoints"
    for t in (100, 200, 300):
        shutil.copytree(root / "step0000001", root / f"step0000001.replaced-{t}")
    from mesh_cli.main import main

    assert main(["ckpt", "list", str(root)]) == 0
    out = capsys.readouterr().out
    assert "set aside: 3 directories (step0000001.replaced-100, step0000001.replaced-200, " in out
    assert "MiB; `mesh ckpt prune" in out
    # Retention counts them: keep_set_aside=2 removes the oldest one at the next commit.
    removed = ckpt.prune(root, keep_last=3, keep_every=0, keep_log_spaced=False, protect=2, keep_set_aside=2)
    assert removed == ["step0000001.replaced-100"]
    assert main(["ckpt", "prune", str(root), "--set-aside"]) == 0
    assert ckpt.list_set_aside(root) == [] and complete_steps(root) == [1, 2]


# ------------------------------------------------------------------ 8. Ctrl-C during evaluation
def test_ctrl_c_during_evaluation_saves_and_exits_130(demo_data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    args = ["train.steps=6", "train.eval_interval=2", "train.eval_batches=2", f"data.valid=[{demo_data / 'val_text_document'}]"]
    proc = start(train_cmd(run_dir, demo_data, 1, *args), log, MESH_EVAL_DELAY="3")
    wait_for(lambda: "[faults] evaluating at step 2" in log.read_text(), proc, log)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    assert finish(proc, log) == USER_INTERRUPT_EXIT_CODE, tail(log)
    text = log.read_text()
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, tail(log)
    assert "stopped by SIGINT after step 2; checkpoint" in text and "exit code 130" in text
    assert complete_steps(run_dir / "checkpoints") == [2]
    assert ckpt.read_meta(run_dir / "checkpoints" / "step0000002").reason == "SIGINT received"
    resumed = tmp_path / "resumed.log"
    assert finish(start(train_cmd(run_dir, demo_data, 1, *args), resumed), resumed) == 0, tail(resumed)
    assert "resuming from" in resumed.read_text() and "step0000002" in resumed.read_text()


# ------------------------------------------------------------------ 9. threads and versions
def test_a_different_thread_count_is_recorded_and_reported_on_resume(demo_data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    args = ["train.steps=4", "checkpoint.save_interval=2"]
    assert finish(start(train_cmd(run_dir, demo_data, 1, *args, "train.stop_after_step=2"), log, OMP_NUM_THREADS="1"),
                  log) == 0, tail(log)
    environment = ckpt.read_meta(run_dir / "checkpoints" / "step0000002").environment
    assert environment["threads"] == 1 and environment["torch"] and environment["deepspeed"] == "0.19.8"
    assert environment["megatron_core"] == "0.16.1"
    assert finish(start(train_cmd(run_dir, demo_data, 1, *args), log, OMP_NUM_THREADS="2"), log) == 0, tail(log)
    assert ("note: this run differs from the one that saved (threads 1 -> 2): the resume is exact only to "
            "float round-off, not bitwise") in log.read_text()
