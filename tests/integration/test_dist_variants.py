"""The paper's extra state-passing schemes (Table 4) against the single-process run, and a few
training steps of each: real torchrun, gloo, DeepSpeed, the harness and tolerances of the other
equivalence tests (tests/support/harness.py).

A fixed combination (anchor+anchor_emb: h(t+1) = f_core(h(t)) + h0 + h_emb) and the learnable
dynamic combination (a Linear(h -> 3) per loop: trainable parameters in the recurrence, replicated
over TP, on the stage that runs its loop under PP) at TP=2, PP=2 and DP=2 with ZeRO-2.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.harness import BF16_STEPS, Run, assert_bf16_close_to_fp32, assert_equivalent, run_plan

pytestmark = pytest.mark.slow

SPLIT = ["model.layer_split=1+2R2+1", "model.num_layers=6"]
VARIANTS = {"fixed": "anchor+anchor_emb", "dynamic": "dynamic_combination"}
LAYOUTS = {
    "tp2": ["parallel.tensor=2", "parallel.zero_stage=1"],
    "pp2": ["parallel.pipeline=2", "parallel.zero_stage=1"],
    "dp2-zero2": ["parallel.zero_stage=2"],
}
TRAINED = ["residual+anchor", "residual+anchor+anchor_emb", "anchor+anchor_emb", "static_combination",
           "dynamic_combination"]


@pytest.fixture(scope="module")
def results(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-variants")
    single = [Run(f"{key}-ref", [f"model.variant={variant}", *SPLIT, "parallel.zero_stage=1"])
              for key, variant in VARIANTS.items()]
    single += [Run(f"train-{variant}", [f"model.variant={variant}", *SPLIT, "train.steps=8"]) for variant in TRAINED]
    single.append(Run("train-vanilla_mesh", ["model.variant=mesh", "model.layer_split=1+2x2+1", "model.num_layers=6",
                                             "train.steps=8"]))
    # Stop after step 3 and resume: bitwise the uninterrupted run (the recurrence's own parameters included).
    for key, variant, split in (("dynamic", "dynamic_combination", "1+2R2+1"), ("unshared", "mesh", "1+2x2+1")):
        common = [f"model.variant={variant}", f"model.layer_split={split}", "model.num_layers=6", "train.steps=6"]
        single += [Run(f"{key}-full", common), Run(f"{key}-first", [*common, "train.stop_after_step=3"]),
                   Run(f"{key}-resumed", [*common, f"checkpoint.resume={root / 'world1' / f'{key}-first'}"
                                                   "/checkpoints/step0000003"])]
    # bf16 (ZeRO-1, fp32 master weights) against fp32, for the variant with parameters in the recurrence.
    long = ["model.variant=dynamic_combination", *SPLIT, "parallel.zero_stage=1", f"train.steps={BF16_STEPS}"]
    single += [Run("dynamic-fp32-long", long), Run("dynamic-bf16", [*long, "train.bf16=true"])]
    out = run_plan(1, single, demo_data, root / "world1")
    out.update(run_plan(2, [Run(f"{key}-{layout}", [f"model.variant={variant}", *SPLIT, *overrides])
                            for key, variant in VARIANTS.items() for layout, overrides in LAYOUTS.items()],
                        demo_data, root / "world2"))
    return out


@pytest.mark.parametrize("key", list(VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_variant_matches_single_process(results, key, layout):
    run = results[f"{key}-{layout}"]
    assert run["layout"]["variant"] == VARIANTS[key]
    report = assert_equivalent(results[f"{key}-ref"], run, f"{VARIANTS[key]} {layout}")
    print(f"\n{VARIANTS[key]} {layout}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in report.items()))


def test_learned_coefficients_are_trained_and_stay_identical_on_every_rank(results):
    """The dynamic maps start at zero; after training they moved, and every copy of them
    (TP replicas, DP replicas) is bit-identical (checked while gathering)."""
    for layout in LAYOUTS:
        run = results[f"dynamic-{layout}"]
        maps = {n: p for n, p in run["params"].items() if "coefficient_maps" in n}
        assert maps and all(p.abs().sum() > 0 for p in maps.values()), layout
        assert run["replica_max_abs_diff"] == 0.0


@pytest.mark.parametrize("variant", [*TRAINED, "vanilla_mesh"])
def test_a_few_steps_of_training_lower_the_loss(results, variant):
    losses = results[f"train-{variant}"]["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("key", ["dynamic", "unshared"])
def test_stop_and_resume_is_bitwise_exact(results, key):
    full, resumed = results[f"{key}-full"], results[f"{key}-resumed"]
    assert len(resumed["losses"]) == 3 and resumed["losses"] == full["losses"][3:]
    assert resumed["params"].keys() == full["params"].keys()
    assert all(torch.equal(full["params"][n], resumed["params"][n]) for n in full["params"])


def test_bf16_trains_close_to_fp32(results):
    assert_bf16_close_to_fp32(results["dynamic-bf16"], results["dynamic-fp32-long"], "dynamic_combination bf16")
