"""Pipeline parallelism against the single-process run: real torchrun, gloo, DeepSpeed.

Same tiny model, data, steps and criterion as tests/test_dist_equivalence.py
(tests/parallel/harness.py): per-step losses and DeepSpeed's gradient norm to
1e-5 relative (clipping is active, so a replicated core layer counted twice in
the norm would change the parameters too), the final parameters to 1e-5
relative, and pipeline replicas of a core layer bit-identical.

The recursive model 1+2R2+1 unrolls to 6 layers; cut into 2, 3 or 4 stages,
each core layer runs on two stages (one per loop) and the MeSH buffer crosses
the stage boundaries inside and between the loops. TP=2 x PP=2 runs the
tensor-parallel layers inside each stage (4 processes). bf16 with PP=2 (the
packed state crosses the boundary in bf16; fp32 master weights in ZeRO-1) is
held to the bf16 tolerance of the fp32 single-process run, as in
tests/test_dist_equivalence.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.harness import (
    BF16_STEPS, CONFIG, REPO, TINY, Run, assert_bf16_close_to_fp32, assert_equivalent, data_overrides, run_plan,
)

pytestmark = pytest.mark.slow

SPLIT = ["model.layer_split=1+2R2+1", "model.num_layers=6", "parallel.zero_stage=1"]
MESH = ["model.variant=mesh", *SPLIT]
REFERENCES = {
    "mesh": MESH,
    "anchor_emb": ["model.variant=anchor_emb", *SPLIT],
    "residual": ["model.variant=residual", *SPLIT],
    # vanilla+mesh: unshared core copies (no replicas across stages, no cross-stage gradient sum).
    "vanilla_mesh": ["model.variant=mesh", "model.layer_split=1+2x2+1", *SPLIT[1:]],
    "mesh-fp32-long": MESH + [f"train.steps={BF16_STEPS}"],
}
# name -> (world size, overrides, reference)
LAYOUTS = {
    "mesh-pp2": (2, MESH + ["parallel.pipeline=2"], "mesh"),
    "residual-pp2": (2, REFERENCES["residual"] + ["parallel.pipeline=2"], "residual"),
    "vanilla_mesh-pp2": (2, REFERENCES["vanilla_mesh"] + ["parallel.pipeline=2"], "vanilla_mesh"),
    "mesh-pp3": (3, MESH + ["parallel.pipeline=3"], "mesh"),
    "anchor_emb-pp3": (3, REFERENCES["anchor_emb"] + ["parallel.pipeline=3"], "anchor_emb"),
    "mesh-pp4-layout": (4, MESH + ["parallel.pipeline=4", "parallel.pipeline_layout=[1,2,2,1]"], "mesh"),
    "mesh-pp2-dp2": (4, MESH + ["parallel.pipeline=2"], "mesh"),
    "mesh-tp2-pp2": (4, MESH + ["parallel.tensor=2", "parallel.pipeline=2"], "mesh"),
    "mesh-tp2-sp-pp2": (4, MESH + ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"],
                        "mesh"),
}
# bf16 runs: name -> (world size, overrides, fp32 reference); compared within BF16_LOSS_ATOL.
BF16 = {
    "mesh-pp2-bf16": (2, MESH + ["parallel.pipeline=2", f"train.steps={BF16_STEPS}", "train.bf16=true"],
                      "mesh-fp32-long"),
}


@pytest.fixture(scope="module")
def pipeline_results(demo_data, tmp_path_factory):
    """One torchrun launch per world size, run lazily; {run name: result}."""
    root = tmp_path_factory.mktemp("dist-pipeline")
    results: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in results:
            world = 1 if name in REFERENCES else {**LAYOUTS, **BF16}[name][0]
            if world == 1:
                runs = [Run(n, o) for n, o in REFERENCES.items()]
            else:
                runs = [Run(n, o) for n, (w, o, _) in {**LAYOUTS, **BF16}.items() if w == world]
            results.update(run_plan(world, runs, demo_data, root / f"world{world}"))
        return results[name]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_single_process(pipeline_results, layout):
    world, overrides, reference = LAYOUTS[layout]
    run = pipeline_results(layout)

    def size(name: str) -> int:
        return next((int(o.split("=")[1]) for o in overrides if o.startswith(f"parallel.{name}=")), 1)

    tensor, pipeline = size("tensor"), size("pipeline")
    assert (run["layout"]["tp"], run["layout"]["pp"]) == (tensor, pipeline)
    assert run["layout"]["dp"] == world // (tensor * pipeline)
    report = assert_equivalent(pipeline_results(reference), run, layout)
    print(f"\n{layout}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in report.items()))


def test_bf16_pipeline_trains_close_to_fp32(pipeline_results):
    """bf16 at PP=2 against the fp32 single-process run: the losses stay within the
    bf16 tolerance at every step, they fall, and the core-layer replicas on the two
    stages stay bit-identical (checked while gathering)."""
    _, _, reference = BF16["mesh-pp2-bf16"]
    bf16 = pipeline_results("mesh-pp2-bf16")
    assert bf16["layout"]["pp"] == 2
    assert_bf16_close_to_fp32(bf16, pipeline_results(reference), "bf16 PP=2 vs fp32 single process")
    assert bf16["replica_max_abs_diff"] == 0.0


def test_pipeline_refuses_zero2_before_starting(demo_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mesh_cli", "train", str(CONFIG), *TINY, *data_overrides(demo_data),
         "parallel.pipeline=2", "parallel.zero_stage=2", f"logging.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, WORLD_SIZE="2"), cwd=REPO,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "parallel.zero_stage=1" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
