"""Kill and resume: a run killed at any point and started again gives byte-identical output.

Each test runs the real CLI in a subprocess. ``MESH_DATA_CRASH_AT`` (see
data_prep/tokenization/faults.py) makes the run SIGKILL itself at a chosen point, one test
kills a live run from outside, one stops it with Ctrl-C. The rerun is always
the same command, and its output is compared byte for byte with an
uninterrupted run made in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.outputs.manifest import load_manifest
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus
from data_prep.tokenizer import load_tokenizer
from tests.support.data import (
    REPO,
    pile_docs,
    read_documents,
    run_cli,
    sentencepiece_model,
    shard_files,
    stable_manifest,
    write_jsonl,
    write_zst,
)

pytestmark = pytest.mark.slow

OPTIONS = dict(split_by_set=True, val_fraction=0.1, shard_bytes=8 * 1024, chunk_bytes=1024)
CLI_OPTIONS = ["--split-by-set", "--val-fraction", "0.1", "--shard-size", "8KiB", "--chunk-size", "1KiB",
               "--no-fsync", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_inputs")
    docs = pile_docs(360)
    return [write_zst(root / "a.jsonl.zst", docs[:240]), write_jsonl(root / "b.jsonl", docs[240:])]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """An uninterrupted run: its shard bytes and manifest."""
    out = tmp_path_factory.mktemp("reference") / "pile"
    manifest = tokenize_corpus(inputs, load_tokenizer(sentencepiece_model()), out, TokenizeOptions(**OPTIONS),
                               progress=False)
    files = shard_files(out.parent)
    assert len(files) > 20, "enough shards for crashes to land between finalizations"
    return files, manifest


def _command(inputs, out, workers=1, interval="0"):
    return ["tokenize", "--input", *inputs, "--tokenizer", sentencepiece_model(), "--out", str(out),
            "--workers", str(workers), "--checkpoint-interval", interval, *CLI_OPTIONS]


def _assert_same_as_reference(out: Path, reference, sessions: int) -> None:
    files, manifest = reference
    assert shard_files(out.parent) == files
    resumed = load_manifest(f"{out}.manifest.json")
    assert stable_manifest(resumed) == stable_manifest(manifest)
    assert len(resumed["sessions"]) == sessions
    leftovers = [p.name for p in out.parent.iterdir() if not p.name.endswith((".bin", ".idx", ".manifest.json"))]
    assert leftovers == [], "no partial, lengths or progress files after completion"


def _assert_no_incomplete_shard_under_final_names(folder: Path) -> None:
    """Every .bin has its .idx and opens as a complete megatron dataset."""
    for bin_file in folder.glob("*.bin"):
        assert bin_file.with_suffix(".idx").is_file(), bin_file
        documents = read_documents(str(bin_file)[: -len(".bin")])
        assert documents and all(len(d) for d in documents)


@pytest.mark.parametrize("crash", ["appended:7", "finalized:2", "commit:5", "committed:9", "finalized:6",
                                   "manifests:1"])
def test_resume_after_kill_at_each_point(inputs, reference, tmp_path, crash):
    out = tmp_path / "pile"
    crashed = run_cli(*_command(inputs, out), env={"MESH_DATA_CRASH_AT": crash})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert Path(f"{out}.progress.json").is_file()
    assert not Path(f"{out}.manifest.json").exists()
    _assert_no_incomplete_shard_under_final_names(tmp_path)

    resumed = run_cli(*_command(inputs, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as_reference(out, reference, sessions=2)


def test_resume_after_two_kills_with_other_worker_counts(inputs, reference, tmp_path):
    out = tmp_path / "pile"
    assert run_cli(*_command(inputs, out, workers=2), env={"MESH_DATA_CRASH_AT": "appended:10"}).returncode == -9
    assert run_cli(*_command(inputs, out, workers=1), env={"MESH_DATA_CRASH_AT": "appended:15"}).returncode == -9
    resumed = run_cli(*_command(inputs, out, workers=3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as_reference(out, reference, sessions=3)


def _start(inputs, out, workers, delay):
    env = dict(os.environ, PYTHONPATH=str(REPO), MESH_DATA_CHUNK_DELAY=str(delay))
    return subprocess.Popen([sys.executable, "-m", "data_prep.cli", "data", *_command(inputs, out, workers, "0.2")],
                            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_progress(out: Path, process, min_chunk: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be interrupted"
        try:
            state = json.loads(Path(f"{out}.progress.json").read_text())
        except (OSError, ValueError):
            state = None
        if state and state["next_chunk"] >= min_chunk and any(g["shards"] for g in state["groups"].values()):
            return state
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_kill_9_from_outside_mid_run(inputs, reference, tmp_path):
    import psutil

    out = tmp_path / "pile"
    process = _start(inputs, out, workers=2, delay=0.03)
    _wait_for_progress(out, process, min_chunk=40)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "a pool of worker processes"
    os.kill(process.pid, signal.SIGKILL)  # the parent only, as a node's OOM killer or `kill -9 PID` would
    process.communicate()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "workers exit when their parent dies"
    _assert_no_incomplete_shard_under_final_names(tmp_path)

    resumed = run_cli(*_command(inputs, out, workers=1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as_reference(out, reference, sessions=2)


def test_ctrl_c_saves_progress_and_the_rerun_finishes(inputs, reference, tmp_path):
    out = tmp_path / "pile"
    process = _start(inputs, out, workers=1, delay=0.03)
    state = _wait_for_progress(out, process, min_chunk=20)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "rerun the same command" in err
    saved = json.loads(Path(f"{out}.progress.json").read_text())
    assert saved["next_chunk"] >= state["next_chunk"]

    resumed = run_cli(*_command(inputs, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as_reference(out, reference, sessions=2)


def test_resume_refuses_changed_inputs_or_options(inputs, tmp_path):
    out = tmp_path / "pile"
    assert run_cli(*_command(inputs, out), env={"MESH_DATA_CRASH_AT": "appended:5"}).returncode == -9
    other = run_cli(*[a if a != "8KiB" else "16KiB" for a in _command(inputs, out)])
    assert other.returncode == 2 and "unfinished run with other inputs or options" in other.stderr
    assert other.stderr.strip().count("\n") == 0
    fresh = run_cli(*[a if a != "8KiB" else "16KiB" for a in _command(inputs, out)], "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert len(load_manifest(f"{out}.manifest.json")["sessions"]) == 1
