"""The training state, the checkpoint metadata's typed round trip, and the start-up output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint.format import CheckpointError, CheckpointMeta, FileRecord, TensorRecord
from pretrain.state import TrainState

REPO = Path(__file__).resolve().parents[3]


def test_train_state_round_trip_and_advance():
    state = TrainState()
    state.advance(global_batch_size=16, applied=True)
    state.advance(global_batch_size=16, applied=False)
    assert state.state_dict() == {"step": 2, "consumed_samples": 32, "skipped_steps": 1}
    assert state.tokens(seq_length=128) == 32 * 128
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state
    with pytest.raises(ValueError, match="unknown training-state fields"):
        again.load_state_dict({"step": 1, "epoch": 3})


def test_checkpoint_meta_round_trip(tmp_path):
    meta = CheckpointMeta(
        step=7, counters={"step": 7, "consumed_samples": 56, "skipped_steps": 0}, adam_step=7.0,
        scheduler={"last_epoch": 7}, engine={"global_steps": 7}, model={"hidden_size": 32},
        layout={"tensor": 2, "pipeline": 1, "data": 1, "zero_stage": 1}, reason="every 7 steps",
        tensors={"w": TensorRecord(shape=[4, 2], tp_dim=0, tp_size=2, shards={"0": "a.pt", "1": "b.pt"})},
        files={"a.pt": FileRecord(10, "ab" * 32)},
    )
    data = json.loads(meta.to_json())
    assert list(data)[:3] == ["format", "version", "step"]  # the order of the file
    assert CheckpointMeta.from_dict(data, tmp_path) == meta
    assert meta.layout_text() == "TP2 PP1 DP1 ZeRO1"
    del data["counters"]
    with pytest.raises(CheckpointError, match="metadata lacks counters"):
        CheckpointMeta.from_dict(data, tmp_path)


def test_commands_start_without_library_noise():
    """megatron-core's import-time notices are filtered at one place (pretrain/library_warnings.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "mesh_cli", "params", str(REPO / "configs" / "demo.yaml")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Transformer Engine" not in out.stderr and "Apex" not in out.stderr, out.stderr
    assert "deprecated" not in out.stderr, out.stderr
    assert out.stdout.splitlines()[0].startswith("model")


def test_the_fast_paths_line_says_what_is_missing():
    from pretrain.library_warnings import optional_fast_paths

    line = optional_fast_paths()
    assert "\n" not in line and line.startswith("optional fast paths")


def test_read_jsonl_skips_a_torn_line_and_a_missing_file_has_no_rows(tmp_path):
    from pretrain.run_folder import RunFolder, read_jsonl

    assert read_jsonl(tmp_path / "absent.jsonl") == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo')
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert RunFolder(tmp_path).metrics() == [{"step": 1}, {"step": 2}]
