"""Pipeline parallelism against the single-process run: real torchrun, gloo, DeepSpeed.

Each layout trains the same tiny model for 5 optimizer steps on the same global
batches (fp32, clipping active) and is compared with the world-size-1 run:
per-step losses to 1e-5 relative; the final parameters to 1e-5 relative as one
vector, and per tensor to 1e-5 relative with a 1e-6 RMS floor (Adam turns
round-off in near-zero gradients into isolated differences around 1e-6, which a
per-element relative check would flag); and DeepSpeed's gradient norm at every
step to 1e-5 (replicated core layers counted once; clipping is active, so a
miscount would change the parameters too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32",
    "train.steps=5", "train.micro_batch_size=2", "train.global_batch_size=8",
    "optim.grad_clip=0.5", "logging.wandb_mode=disabled", "logging.progress_bar=false",
    "checkpoint.save_at_end=false", "data.valid=[]", "train.eval_interval=0", "train.log_interval=1",
]


def launch(nproc: int, out: Path, overrides: list[str], data: Path, timeout: int = 300) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MESH_DIST_TIMEOUT_S="120")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max-restarts", "0",
        str(REPO / "tests" / "dist_worker.py"), "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out),
        *TINY, f"data.tokenizer={data / 'tokenizer.model'}", f"data.train=[{data / 'train_text_document'}]",
        f"logging.run_dir={out.with_suffix('')}", *overrides,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(out)


_references: dict[tuple, dict] = {}


def reference(model_overrides: tuple[str, ...], data: Path, tmp: Path) -> dict:
    if model_overrides not in _references:
        _references[model_overrides] = launch(1, tmp / f"ref{len(_references)}.pt", list(model_overrides), data)
    return _references[model_overrides]


def assert_equivalent(ref: dict, run: dict) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0)
    assert set(run["params"]) == set(ref["params"])
    names = sorted(ref["params"])
    flat_ref = torch.cat([ref["params"][n].flatten() for n in names])
    flat_run = torch.cat([run["params"][n].flatten() for n in names])
    assert (flat_run - flat_ref).norm() / flat_ref.norm() < 1e-5, "whole-model parameters differ"
    for name in names:
        expected, got = ref["params"][name], run["params"][name]
        # Per tensor: 1e-5 relative, with a floor of 1e-6 RMS per element. Adam answers
        # round-off in near-zero gradients (key biases on non-rotary dims, router
        # biases the softmax barely feels) with steps of that size; a real error in
        # the numbers is orders of magnitude larger after 5 steps.
        allowed = 1e-5 * expected.norm() + 1e-6 * expected.numel() ** 0.5
        assert (got - expected).norm() <= allowed, f"{name}: |diff| {(got - expected).norm():.2e} > {allowed:.2e}"
    assert run["replica_max_abs_diff"] == 0.0, "pipeline replicas of a core layer diverged"


@pytest.mark.parametrize(
    "name,nproc,model,parallel",
    [
        # 1+2R2+1 in 2 stages: both core layers run on both stages (one loop each).
        ("mesh-pp2", 2, ("model.layer_split=1+2R2+1", "model.num_layers=6"), ["parallel.pipeline=2"]),
        # 3 stages of 2 layers: core.0 and core.1 are each replicated on two stages.
        ("mesh-pp3", 3, ("model.layer_split=1+2R2+1", "model.num_layers=6"), ["parallel.pipeline=3"]),
        # An explicit layout, 4 stages, the MeSH buffer crossing three boundaries.
        ("mesh-pp4", 4, ("model.layer_split=1+2R2+1", "model.num_layers=6"),
         ["parallel.pipeline=4", "parallel.pipeline_layout=[1,2,2,1]"]),
        ("mesh-pp2-dp2", 4, ("model.layer_split=1+2R2+1", "model.num_layers=6"), ["parallel.pipeline=2"]),
        ("anchor_emb-pp3", 3, ("model.layer_split=1+2R2+1", "model.num_layers=6", "model.variant=anchor_emb"),
         ["parallel.pipeline=3"]),
        ("residual-pp2", 2, ("model.layer_split=1+2R2+1", "model.num_layers=6", "model.variant=residual"),
         ["parallel.pipeline=2"]),
    ],
)
def test_pipeline_matches_single_process(demo_data, tmp_path_factory, name, nproc, model, parallel):
    tmp = tmp_path_factory.getbasetemp()
    ref = reference(model, demo_data, tmp)
    run = launch(nproc, tmp / f"{name}.pt", [*model, *parallel], demo_data)
    assert run["layout"]["pp"] == int(parallel[0].split("=")[1])
    assert_equivalent(ref, run)


def test_pipeline_refuses_zero2_before_starting(demo_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mesh_cli", "train", str(REPO / "configs" / "demo.yaml"), *TINY,
         "parallel.pipeline=2", "parallel.zero_stage=2", f"data.tokenizer={demo_data / 'tokenizer.model'}",
         f"data.train=[{demo_data / 'train_text_document'}]", f"logging.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, WORLD_SIZE="2"), cwd=REPO,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "parallel.zero_stage=1" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
