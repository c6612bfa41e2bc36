"""The checkpoint format on disk: completeness, checksums, damage, fallback, retention, `mesh ckpt`.

One real training run (world size 1, checkpoints at steps 2 and 4) is made per
module; every test damages its own copy.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import format as ckpt
from tests.support.harness import Run, run_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("ckpt")
    results = run_plan(1, [Run("run", ["train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=0"])],
                       demo_data, work)
    return work / "run" / "checkpoints", results["run"]


@pytest.fixture
def root(saved, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(saved[0], copy)
    return copy


def state_file(checkpoint: Path) -> Path:
    return sorted((checkpoint / "state").glob("*.pt"))[0]


def test_a_run_writes_complete_checkpoints(root):
    infos = ckpt.list_checkpoints(root)
    assert [(i.name, i.step, i.complete) for i in infos] == [("step0000002", 2, True), ("step0000004", 4, True)]
    assert (root / "latest").read_text().strip() == "step0000004"
    meta = infos[-1].meta
    assert meta.counters == {"step": 4, "consumed_samples": 32, "skipped_steps": 0}
    assert meta.adam_step == 4.0
    assert meta.layout == {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 1}
    assert set(meta.files) == {"config.yaml", "rng/rank00000.pt", "state/tp00-pp00-dp00.pt"}
    assert ckpt.verify(infos[-1].path) == []


def test_saved_weights_are_the_trained_weights(saved):
    root, result = saved
    weights = ckpt.consolidate(root / "step0000004")
    assert sorted(weights) == sorted(result["params"])
    for name, value in result["params"].items():
        assert torch.equal(weights[name], value), name
    with_moments = ckpt.consolidate(root / "step0000004", with_optimizer=True)
    assert len(with_moments) == 3 * len(weights)
    assert all(with_moments[f"{n}#exp_avg_sq"].min() >= 0 for n in weights)


def test_truncated_file_is_named_and_resume_falls_back(root):
    newest = root / "step0000004"
    victim = state_file(newest)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    problems = ckpt.verify(newest)
    assert problems == [f"{victim}: {size // 2} bytes, the metadata says {size} (truncated or damaged)"]
    chosen, passed_over = ckpt.choose_resume(root)
    assert chosen.name == "step0000002"
    assert passed_over == [f"step0000004: {problems[0]}"]
    with pytest.raises(ckpt.CheckpointError, match=f"{victim}: unreadable"):
        ckpt.load_file(victim)


def test_silent_damage_is_caught_by_the_checksum(root):
    victim = state_file(root / "step0000004")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    assert ckpt.verify(root / "step0000004", checksums=False) == []
    assert ckpt.verify(root / "step0000004") == [f"{victim}: sha256 differs from the metadata (damaged)"]
    assert ckpt.choose_resume(root)[0].name == "step0000002"


def test_missing_file_and_missing_metadata(root):
    (root / "step0000004" / "rng" / "rank00000.pt").unlink()
    assert ckpt.verify(root / "step0000004") == [f"{root / 'step0000004' / 'rng' / 'rank00000.pt'}: missing"]
    (root / "step0000004" / "meta.json").unlink()
    info = ckpt.list_checkpoints(root)[-1]
    assert not info.complete and "no meta.json" in info.problem
    chosen, passed_over = ckpt.choose_resume(root)
    assert chosen.name == "step0000002" and "interrupted" in passed_over[0]
    (root / "step0000002" / "meta.json").write_text("{not json")
    chosen, passed_over = ckpt.choose_resume(root)
    assert chosen is None and len(passed_over) == 2 and "unreadable metadata" in passed_over[1]


def test_a_different_model_is_refused_with_the_difference(root):
    from mesh_model.config import ModelConfig

    meta = ckpt.read_meta(root / "step0000004")
    same = ModelConfig.from_dict({**meta.model, "recompute": ["core"], "seq_length": 64})
    notes = ckpt.check_model_compatible(meta, same, root / "step0000004")
    assert notes == ["model.recompute: checkpoint [], config ['core']", "model.seq_length: checkpoint 32, config 64"]
    other = ModelConfig.from_dict({**meta.model, "hidden_size": 128})
    with pytest.raises(ckpt.CheckpointError, match=r"meta.json: written for a different model \(model.hidden_size: "
                                                   r"checkpoint 64, config 128\)"):
        ckpt.check_model_compatible(meta, other, root / "step0000004")


def test_retention_keeps_last_every_and_log_spaced():
    steps = [1, 2, 4, 8, 10, 16, 20, 30, 32, 40]
    assert ckpt.retained_steps(steps, keep_last=2, keep_every=0, keep_log_spaced=False) == {32, 40}
    assert ckpt.retained_steps(steps, keep_last=2, keep_every=20, keep_log_spaced=False) == {20, 32, 40}
    assert ckpt.retained_steps(steps, keep_last=1, keep_every=0, keep_log_spaced=True) == {1, 2, 4, 8, 16, 32, 40}
    assert ckpt.retained_steps(steps, keep_last=0, keep_every=0, keep_log_spaced=False) == set(steps)


def test_prune_removes_what_the_policy_drops_and_stale_partial_saves(root):
    for step in (6, 8):  # more complete checkpoints, copies of step 4 with their own step number
        target = root / ckpt.step_dir_name(step)
        shutil.copytree(root / "step0000004", target)
        # Through the format's own writer: meta.json carries a checksum of its content.
        meta = ckpt.read_meta(target)
        (target / "meta.json").write_text(dataclasses.replace(meta, step=step).to_json())
    partial = root / "step0000005"
    (partial / "state").mkdir(parents=True)
    removed = ckpt.prune(root, keep_last=2, keep_every=4, keep_log_spaced=False, protect=8)
    assert sorted(removed) == ["step0000002", "step0000005"]
    assert [i.name for i in ckpt.list_checkpoints(root)] == ["step0000004", "step0000006", "step0000008"]


def test_mesh_ckpt_list_verify_convert(root, tmp_path, capsys):
    from mesh_cli.main import main

    assert main(["ckpt", "list", str(root)]) == 0
    out = capsys.readouterr().out
    assert "step0000004 (latest)" in out and "TP1 PP1 DP1 ZeRO1" in out and "complete" in out

    assert main(["ckpt", "verify", str(root)]) == 0
    assert "step0000004: ok (3 files, sha256 checked" in capsys.readouterr().out

    fp32 = tmp_path / "model.safetensors"
    assert main(["ckpt", "convert", str(root / "step0000004"), "--to", "fp32", str(fp32)]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(fp32))
    reference = ckpt.consolidate(root / "step0000004")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert main(["ckpt", "convert", str(root / "step0000004"), "--to", "fp32", str(fp32)]) == 2
    assert "exists; choose another output or pass --overwrite" in capsys.readouterr().err

    # TP=2 shards hold the same tensors, optimizer state included.
    tp2 = tmp_path / "tp2"
    assert main(["ckpt", "convert", str(root / "step0000004"), "--to", "layout", "--tensor", "2", str(tp2)]) == 0
    meta = ckpt.read_meta(tp2)
    assert meta.layout["tensor"] == 2 and ckpt.verify(tp2) == []
    sharded = [n for n, e in meta.tensors.items() if e.tp_dim is not None]
    assert sharded and all(len(meta.tensors[n].shards) == 2 for n in sharded)
    again = ckpt.consolidate(tp2, with_optimizer=True)
    original = ckpt.consolidate(root / "step0000004", with_optimizer=True)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)

    victim = state_file(root / "step0000004")
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    assert main(["ckpt", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "step0000002: ok" in out and "step0000004: DAMAGED" in out and str(victim) in out
    assert main(["ckpt", "convert", str(root / "step0000004"), "--to", "fp32", str(tmp_path / "x.pt")]) == 2
    assert "truncated or damaged" in capsys.readouterr().err


def test_a_run_folder_is_resumed_only_from_a_checkpoint(saved, demo_data, tmp_path):
    from mesh_model.config import ConfigError
    from pretrain.preflight import preflight
    from tests.support.harness import tiny_config

    run_dir = saved[0].parent

    def config(*overrides):
        return tiny_config(demo_data, *overrides)

    preflight(config(f"logging.run_dir={run_dir}"), 1)  # holds checkpoints: resumes
    with pytest.raises(ConfigError, match="already holds a run and checkpoint.resume=none"):
        preflight(config(f"logging.run_dir={run_dir}", "checkpoint.resume=none"), 1)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(run_dir / "config.yaml", crashed / "config.yaml")
    with pytest.raises(ConfigError, match="has no complete checkpoint to resume from; choose a new logging.run_dir"):
        preflight(config(f"logging.run_dir={crashed}"), 1)
    with pytest.raises(ConfigError, match="checkpoint.resume=/nonexistent is not a checkpoint directory"):
        preflight(config(f"logging.run_dir={tmp_path / 'new'}", "checkpoint.resume=/nonexistent"), 1)
