"""Launching tests/support/dist_worker.py under torchrun and comparing its results.

Used by tests/test_dist_equivalence.py and tests/test_dist_failures.py; the
tolerances below are the ones docs/parallelism.md documents.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "support" / "dist_worker.py"
CONFIG = REPO / "configs" / "demo.yaml"

# The tiny model every equivalence run trains: demo.yaml's MeSH 1+2R2+1 at d=64,
# 5 optimizer steps of 8 sequences x 32 tokens, clipping active at every step
# (the gradient norm is ~0.8-0.95 against a clip of 0.5), logged every step.
#
# Adam's eps is 1e-5 instead of 1e-8 (in the reference and the parallel run alike).
# With eps far below every gradient, Adam moves each element by about lr * sign(m),
# whatever the gradient's size: (1) a gradient that is wrong by a constant factor
# (a replicated parameter counted twice, a missing 1/DP) gives the same parameters,
# and (2) an element whose gradient passes through round-off level moves by a
# fraction of a whole step decided by round-off. Measured with eps=1e-8 on the
# residual variant at TP=2: losses equal to 2e-7, step-1 gradients to 3e-7 per
# tensor, yet output_layer.weight[78, 7] ends 4.5e-4 (0.22 of a step) apart and the
# whole model 1.8e-5; with eps=1e-5 the whole model agrees to 2.4e-8.
TINY = [
    "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32",
    "train.steps=5", "train.micro_batch_size=2", "train.global_batch_size=8",
    "optim.grad_clip=0.5", "optim.eps=1e-5", "train.log_interval=1", "train.eval_interval=0", "data.valid=[]",
    "logging.wandb_mode=disabled", "logging.progress_bar=false", "checkpoint.save_at_end=false",
]

# Per-step losses and DeepSpeed's gradient norms: relative.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-5
# Final parameters: the whole model as one vector to PARAM_RTOL relative; each tensor
# to PARAM_RTOL relative plus PARAM_RMS_FLOOR per element (RMS). Adam normalises every
# element's step to about the learning rate (2e-3 here) whatever the gradient's size,
# so round-off in near-zero gradients (attention key biases, whose gradient is exactly
# zero in exact arithmetic; MeSH write-router biases, whose gradient is a cancellation
# at near-uniform routing) becomes a parameter difference of up to ~2e-7 absolute,
# also between two single-process runs that only sum in a different order (measured:
# ZeRO-0 vs ZeRO-1 at world size 1). 1e-6 is 5e-4 of one peak-LR step.
PARAM_RTOL = 1e-5
PARAM_RMS_FLOOR = 1e-6
# The step-1 gradient, per tensor: GRAD_RTOL relative to the tensor's own norm plus
# GRAD_RTOL of the whole gradient's RMS per element. The floor matters only for
# tensors whose gradient is many orders below the rest (router biases, ~1e-5 of the
# global norm, where summation order alone moves them by ~3e-5 relative).
GRAD_RTOL = 1e-5
# bf16 runs (ZeRO-1) against fp32, BF16_STEPS steps: every step's loss within
# BF16_LOSS_ATOL nats. Measured on the 2-core machine: at most ~1.3e-3 nats over the
# first 12 steps (0.03 after 40 steps, as bf16 rounding of the weights accumulates),
# so this holds for short runs only (docs/parallelism.md, "bf16").
BF16_STEPS = 12
BF16_LOSS_ATOL = 0.02


def data_overrides(data: Path) -> list[str]:
    return [f"data.tokenizer={data / 'tokenizer.model'}", f"data.train=[{data / 'train_text_document'}]"]


def tiny_config(data: Path, *overrides: str):
    """The TINY run config on the demo corpus in `data`, then `overrides` (in-process checks)."""
    from pretrain.config import load_config

    return load_config(CONFIG, [*TINY, *data_overrides(data), *overrides])


@dataclass
class Run:
    """One training run of a plan. `overrides` come after TINY and the data overrides."""

    name: str
    overrides: list[str]
    record_grads: bool = False
    extra: dict = field(default_factory=dict)


class LaunchError(AssertionError):
    pass


def launch_env(timeout_s: int = 120, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MESH_DIST_TIMEOUT_S=str(timeout_s),
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    for name in ("MESH_TEST_FAIL_RANK", "MESH_TEST_HANG_RANK", "MESH_TEST_FAIL_STEP"):
        env.pop(name, None)
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], *, env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc --max-restarts 0 ARGS`, output to `log`; never hangs past `timeout`."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max-restarts", "0",
        "--monitor-interval", "0.5", *args,
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        try:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    timeout=timeout, text=True)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"torchrun did not finish within {timeout:.0f} s; log {log}:\n{tail(log)}") from None
    result.elapsed_s = time.monotonic() - started
    result.log = log
    return result


def tail(log: Path, chars: int = 6000) -> str:
    text = log.read_text(errors="replace")
    # Drop the known warnings so the tail shows the error.
    lines = [l for l in text.splitlines() if "warn" not in l.lower() and "return func(" not in l]
    return "\n".join(lines)[-chars:]


def run_plan(nproc: int, runs: list[Run], data: Path, workdir: Path, timeout: Optional[float] = None) -> dict[str, dict]:
    """Trains `runs` one after the other in one torchrun launch; returns {name: result dict}."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan = []
    for run in runs:
        plan.append({
            "out": str(workdir / f"{run.name}.pt"),
            "overrides": [*run.overrides, f"logging.run_dir={workdir / run.name}"],
            "record_grads": run.record_grads,
        })
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    if timeout is None:
        timeout = 120 + 60 * len(runs) * max(1, nproc // 2)
    result = torchrun(
        nproc,
        [str(WORKER), "--config", str(CONFIG), "--plan", str(plan_path), *TINY, *data_overrides(data)],
        env=launch_env(), timeout=timeout, log=workdir / "torchrun.log",
    )
    if result.returncode != 0:
        raise LaunchError(f"torchrun exited with {result.returncode} after {result.elapsed_s:.0f} s; "
                          f"log {result.log}:\n{tail(result.log)}")
    return {run.name: torch.load(workdir / f"{run.name}.pt") for run in runs}


# --------------------------------------------------------------------------- comparison
def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def compare(ref: dict, run: dict) -> dict:
    """Measured differences of `run` against the single-process `ref` (see assert_equivalent)."""
    names = sorted(ref["params"])
    if sorted(run["params"]) != names:
        missing = set(names) ^ set(run["params"])
        raise AssertionError(f"the parameter names differ from the reference: {sorted(missing)[:10]}")
    report = {
        "steps": len(ref["losses"]),
        "loss_max_rel": max(_rel(a, b) for a, b in zip(run["losses"], ref["losses"])),
        "grad_norm_max_rel": max(_rel(a, b) for a, b in zip(run["grad_norms"], ref["grad_norms"])),
    }
    if len(run["losses"]) != len(ref["losses"]) or len(run["grad_norms"]) != len(ref["grad_norms"]):
        raise AssertionError("the runs have different numbers of steps / logged grad norms")
    flat_ref = torch.cat([ref["params"][n].flatten() for n in names])
    flat_run = torch.cat([run["params"][n].flatten() for n in names])
    report["params_rel"] = ((flat_run - flat_ref).norm() / flat_ref.norm()).item()
    worst_ratio, worst_name, worst_rel = 0.0, "", 0.0
    for name in names:
        expected, got = ref["params"][name], run["params"][name]
        diff = (got - expected).norm().item()
        allowed = PARAM_RTOL * expected.norm().item() + PARAM_RMS_FLOOR * math.sqrt(expected.numel())
        worst_rel = max(worst_rel, diff / max(expected.norm().item(), 1e-30))
        if diff / allowed > worst_ratio:
            worst_ratio, worst_name = diff / allowed, name
    report.update(param_tensor_max_rel=worst_rel, param_worst_ratio=worst_ratio, param_worst=worst_name)
    if ref.get("grads") and run.get("grads"):
        grad_names = sorted(ref["grads"])
        total = torch.cat([ref["grads"][n].flatten() for n in grad_names])
        rms = (total.norm() / math.sqrt(total.numel())).item()
        ratio, name_at, rel_max = 0.0, "", 0.0
        for name in grad_names:
            expected, got = ref["grads"][name], run["grads"][name]
            diff = (got - expected).norm().item()
            allowed = GRAD_RTOL * (expected.norm().item() + rms * math.sqrt(expected.numel()))
            rel_max = max(rel_max, diff / max(expected.norm().item(), 1e-30))
            if diff / allowed > ratio:
                ratio, name_at = diff / allowed, name
        report.update(grad_tensor_max_rel=rel_max, grad_worst_ratio=ratio, grad_worst=name_at)
    return report


def assert_bf16_close_to_fp32(bf16: dict, fp32: dict, label: str) -> list[float]:
    """The bf16 criterion of docs/parallelism.md: BF16_STEPS finite losses that fall,
    each within BF16_LOSS_ATOL nats of the fp32 run's loss at the same step, and
    finite gradient norms. Returns the per-step gaps (printed with `label`)."""
    assert bf16["layout"]["bf16"] and not fp32["layout"]["bf16"], (bf16["layout"], fp32["layout"])
    losses = bf16["losses"]
    assert len(losses) == BF16_STEPS == len(fp32["losses"]), (len(losses), len(fp32["losses"]))
    assert all(math.isfinite(l) for l in losses), losses
    assert losses[-1] < losses[0] - 0.3, losses  # it trains
    gaps = [abs(a - b) for a, b in zip(losses, fp32["losses"])]
    print(f"\n{label}: max |loss gap| {max(gaps):.2e} nats; per step " + " ".join(f"{g:.1e}" for g in gaps))
    assert max(gaps) <= BF16_LOSS_ATOL, gaps
    assert all(math.isfinite(g) for g in bf16["grad_norms"]), bf16["grad_norms"]
    return gaps


def assert_equivalent(ref: dict, run: dict, label: str = "") -> dict:
    """The equivalence criterion of docs/parallelism.md; returns the measured report."""
    report = compare(ref, run)
    where = f"{label}: " if label else ""
    assert report["steps"] >= 5, f"{where}only {report['steps']} steps"
    assert report["loss_max_rel"] <= LOSS_RTOL, (
        f"{where}losses differ by {report['loss_max_rel']:.2e} relative:\n{run['losses']}\n{ref['losses']}")
    assert report["grad_norm_max_rel"] <= GRAD_NORM_RTOL, (
        f"{where}grad norms differ by {report['grad_norm_max_rel']:.2e} relative:\n"
        f"{run['grad_norms']}\n{ref['grad_norms']}")
    assert report["params_rel"] <= PARAM_RTOL, f"{where}parameters differ by {report['params_rel']:.2e} (whole model)"
    assert report["param_worst_ratio"] <= 1.0, (
        f"{where}parameter {report['param_worst']} is {report['param_worst_ratio']:.2f}x over its tolerance")
    if "grad_worst_ratio" in report:
        assert report["grad_worst_ratio"] <= 1.0, (
            f"{where}gradient of {report['grad_worst']} is {report['grad_worst_ratio']:.2f}x over its tolerance")
    assert run["replica_max_abs_diff"] == 0.0, f"{where}copies of a parameter differ between ranks"
    return report
