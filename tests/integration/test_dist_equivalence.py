"""Tensor and data parallelism (DeepSpeed ZeRO 0-3) against the single-process run.

Every layout trains the same tiny model (tests/parallel/harness.py: TINY) for 5
optimizer steps, fp32, same seed, same global batches (8 sequences; world size 1
reaches them by gradient accumulation), with gradient clipping active at every
step, and is compared with the world-size-1 run of the same config:

* per-step losses and DeepSpeed's per-step global gradient norm: 1e-5 relative;
* the final parameters, gathered (TP shards concatenated, ZeRO-3 partitions
  materialised): 1e-5 relative as one vector, and per tensor 1e-5 relative plus
  a 1e-6 RMS floor (harness.PARAM_RMS_FLOOR explains the floor);
* where recorded, the step-1 gradient per tensor (router gradients under TP
  and DP are compared directly, not only through Adam, which normalises their
  scale away).

Runs are grouped by world size into one torchrun launch each (a plan; the
imports cost 10-20 s per launch on 2 cores), built once per session and shared
by the tests. Numbers measured on the 2-core development machine are in
docs/parallelism.md.
"""

from __future__ import annotations

import math

import pytest

from tests.support.harness import BF16_STEPS, Run, assert_bf16_close_to_fp32, assert_equivalent, compare, run_plan

# The first test that needs a launch pays for it (up to a few minutes on a busy 2-core
# machine); every launch has its own subprocess timeout as well.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MESH = ["model.variant=mesh", "model.layer_split=1+2R2+1", "model.num_layers=6"]
VARIANT = {
    "mesh": MESH,
    "vanilla": ["model.variant=vanilla", "model.layer_split=6", "model.num_layers=6"],
    **{v: [f"model.variant={v}", "model.layer_split=1+2R2+1", "model.num_layers=6"]
       for v in ("base", "residual", "anchor", "anchor_emb")},
}
TIED = ["model.untie_embeddings=false"]
# vanilla+mesh: MeSH over unshared core copies, one per loop (no weight sharing).
VANILLA_MESH = ["model.variant=mesh", "model.layer_split=1+2x2+1", "model.num_layers=6"]


def zero(stage: int) -> list[str]:
    return [f"parallel.zero_stage={stage}"]


TP2 = ["parallel.tensor=2"]
SP = ["parallel.sequence_parallel=true"]

# World-size-1 references: name -> overrides (the same config as the parallel runs).
REFERENCES = {
    "mesh-z0": MESH + zero(0),
    "mesh-z1": MESH + zero(1),
    "mesh-z2": MESH + zero(2),
    "mesh-z3": MESH + zero(3),
    "mesh-tied-z1": MESH + TIED + zero(1),
    "vanilla-z1": VARIANT["vanilla"] + zero(1),
    "base-z2": VARIANT["base"] + zero(2),
    "residual-z1": VARIANT["residual"] + zero(1),
    "anchor-z3": VARIANT["anchor"] + zero(3),
    "anchor_emb-z1": VARIANT["anchor_emb"] + zero(1),
    "vanilla_mesh-z2": VANILLA_MESH + zero(2),
}
RECORD_GRADS = {"mesh-z0", "mesh-z1", "mesh-z3", "mesh-tied-z1"}

# Parallel layouts: name -> (world size, overrides, reference, record gradients).
# MeSH in every layout; each other variant at least once.
LAYOUTS = {
    "mesh-tp2-z1": (2, MESH + TP2 + zero(1), "mesh-z1", True),
    "mesh-tp2-z0": (2, MESH + TP2 + zero(0), "mesh-z0", True),
    "mesh-tp2-tied-z1": (2, MESH + TIED + TP2 + zero(1), "mesh-tied-z1", True),
    "mesh-dp2-z1": (2, MESH + zero(1), "mesh-z1", True),
    "mesh-dp2-z2": (2, MESH + zero(2), "mesh-z2", False),
    "mesh-dp2-z3": (2, MESH + zero(3), "mesh-z3", True),
    "vanilla-tp2-z1": (2, VARIANT["vanilla"] + TP2 + zero(1), "vanilla-z1", False),
    "base-dp2-z2": (2, VARIANT["base"] + zero(2), "base-z2", False),
    "residual-tp2-z1": (2, VARIANT["residual"] + TP2 + zero(1), "residual-z1", False),
    "anchor-dp2-z3": (2, VARIANT["anchor"] + zero(3), "anchor-z3", False),
    "anchor_emb-tp2-z1": (2, VARIANT["anchor_emb"] + TP2 + zero(1), "anchor_emb-z1", False),
    "vanilla_mesh-tp2-z2": (2, VANILLA_MESH + TP2 + zero(2), "vanilla_mesh-z2", False),
    "vanilla_mesh-dp2-z2": (2, VANILLA_MESH + zero(2), "vanilla_mesh-z2", False),
    "mesh-tp2dp2-z1": (4, MESH + TP2 + zero(1), "mesh-z1", True),
    "mesh-tp2dp2-z2": (4, MESH + TP2 + zero(2), "mesh-z2", False),
    "mesh-tp2dp2-z3": (4, MESH + TP2 + zero(3), "mesh-z3", True),
    # Sequence parallel: norms, routers and row-parallel biases see half the tokens
    # on each TP rank; their gradients are summed over TP (pretrain/parallel/sequence_parallel.py).
    "mesh-tp2-sp-z1": (2, MESH + TP2 + SP + zero(1), "mesh-z1", True),
    "mesh-tp2-sp-z0": (2, MESH + TP2 + SP + zero(0), "mesh-z0", True),
    "mesh-tp2-sp-tied-z1": (2, MESH + TIED + TP2 + SP + zero(1), "mesh-tied-z1", False),
    # Recomputed core layers: their backward (and so the SP gradient hook) runs once per loop.
    "mesh-tp2-sp-recompute-z1": (2, MESH + TP2 + SP + zero(1) + ["model.recompute=[core]"], "mesh-z1", False),
    "mesh-tp2dp2-sp-z2": (4, MESH + TP2 + SP + zero(2), "mesh-z2", False),
    "mesh-tp2dp2-sp-z3": (4, MESH + TP2 + SP + zero(3), "mesh-z3", True),
}

# bf16 (ZeRO-1, DP=2) against fp32 on the same layout: harness.BF16_STEPS steps,
# harness.BF16_LOSS_ATOL nats.
BF16 = {
    "mesh-dp2-z1-fp32-12": (2, MESH + zero(1) + [f"train.steps={BF16_STEPS}"]),
    "mesh-dp2-z1-bf16-12": (2, MESH + zero(1) + [f"train.steps={BF16_STEPS}", "train.bf16=true"]),
}


@pytest.fixture(scope="session")
def dist_results(demo_data, tmp_path_factory):
    """Lazily launched plans, one per world size; {run name: result dict}."""
    root = tmp_path_factory.mktemp("dist-equivalence")
    results: dict[str, dict] = {}
    launched: set[int] = set()

    def get(name: str) -> dict:
        if name in results:
            return results[name]
        if name in REFERENCES:
            world = 1
        elif name in LAYOUTS:
            world = LAYOUTS[name][0]
        else:
            world = BF16[name][0]
        if world in launched:
            raise AssertionError(f"{name}: its launch (world size {world}) failed earlier")
        launched.add(world)
        if world == 1:
            runs = [Run(n, o, record_grads=n in RECORD_GRADS) for n, o in REFERENCES.items()]
        else:
            runs = [Run(n, o, record_grads=g) for n, (w, o, _, g) in LAYOUTS.items() if w == world]
            runs += [Run(n, o) for n, (w, o) in BF16.items() if w == world]
        results.update(run_plan(world, runs, demo_data, root / f"world{world}"))
        return results[name]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(dist_results, layout):
    world, _, reference, _ = LAYOUTS[layout]
    ref = dist_results(reference)
    run = dist_results(layout)
    assert run["layout"]["world"] == world
    assert run["layout"]["tp"] * run["layout"]["pp"] * run["layout"]["dp"] == world
    report = assert_equivalent(ref, run, layout)
    print(f"\n{layout}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in report.items()))


@pytest.mark.parametrize("layout", ["mesh-tp2-z1", "mesh-tp2-z0", "mesh-tp2-tied-z1", "mesh-tp2dp2-z1",
                                    "mesh-tp2-sp-z1", "mesh-tp2-sp-z0", "mesh-tp2dp2-sp-z3"])
def test_grad_norm_counts_tp_replicated_parameters_once(dist_results, layout):
    """DeepSpeed's global norm at TP=2 equals the single-process norm and the norm
    computed by hand with every TP-replicated parameter (norms, row-parallel biases,
    MeSH routers) counted once; counting them on both TP ranks would be far off.
    With sequence parallelism those are the parameters whose gradients are summed
    over TP first (each rank saw half the tokens)."""
    _, _, reference, _ = LAYOUTS[layout]
    ref, run = dist_results(reference), dist_results(layout)
    assert run["layout"]["tp"] == 2
    once = [math.sqrt(p["sharded_sq"] + p["replicated_sq"]) for p in run["norm_parts"]]
    twice = [math.sqrt(p["sharded_sq"] + 2 * p["replicated_sq"]) for p in run["norm_parts"]]
    for step, (ds, single, hand, double) in enumerate(zip(run["grad_norms"], ref["grad_norms"], once, twice), 1):
        assert ds == pytest.approx(single, rel=1e-5), f"step {step}: DeepSpeed {ds} vs single process {single}"
        assert hand == pytest.approx(single, rel=1e-5), f"step {step}: by hand {hand} vs single process {single}"
        # The test can tell: a double count would be off by far more than the tolerance.
        assert abs(double - single) / single > 100 * 1e-5, (step, double, single)
    # The recorded split saw the routers (replicated over TP) as well.
    assert any(n.startswith("recurrence.routers.") for n in run["grads"]), "no MeSH routers recorded"


@pytest.mark.parametrize("layout", ["mesh-tp2-z1", "mesh-tp2-sp-z1"])
def test_router_gradients_under_tensor_parallelism(dist_results, layout):
    """MeSH routers are replicated over TP: every TP rank holds the same router
    weights after training (checked bit-exactly while gathering), and the step-1
    router gradients equal the single-process ones. Under sequence parallelism each
    TP rank routes half the tokens, so this checks the TP sum of their gradients."""
    ref, run = dist_results("mesh-z1"), dist_results(layout)
    report = compare(ref, run)
    assert report["grad_worst_ratio"] <= 1.0, report
    rms_all = math.sqrt(sum(g.square().sum().item() for g in ref["grads"].values())
                        / sum(g.numel() for g in ref["grads"].values()))
    routers = [n for n in ref["grads"] if n.startswith("recurrence.routers.")]
    assert len(routers) == 2 * 2 * 3, routers  # (write, read) x (weight, bias) x (N_loop + 1)
    for name in routers:
        expected, got = ref["grads"][name], run["grads"][name]
        assert expected.norm() > 0, name
        allowed = 1e-5 * (expected.norm().item() + rms_all * math.sqrt(expected.numel()))
        assert (got - expected).norm().item() <= allowed, name
        assert (run["params"][name] - ref["params"][name]).norm() <= 1e-5 * ref["params"][name].norm() + 1e-6


def test_bf16_trains_close_to_fp32(dist_results):
    assert_bf16_close_to_fp32(dist_results("mesh-dp2-z1-bf16-12"), dist_results("mesh-dp2-z1-fp32-12"),
                              "bf16 vs fp32 (DP=2, ZeRO-1)")
