"""Diagnostics end to end: router statistics while training (every sink, DP=2 and PP=2 against one
process) and `mesh analyze` on real checkpoints (every field, --compare, other layouts, bad input).

Two launches per module: world size 1 trains the MeSH (with statistics every step, and without),
base and vanilla models (3 steps each, checkpoint at the end), world size 2 the same MeSH run at DP=2, at PP=2 and at TP=2 with sequence
parallelism.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from analysis.report import FIELDS
from pretrain.checkpoint import format as ckpt
from tests.support.harness import Run, run_plan
from tests.support.wandb_records import read_run

pytestmark = pytest.mark.slow

STATS = ["train.steps=3", "logging.router_stats_interval=1", "checkpoint.save_at_end=true"]
MESH = [*STATS, "logging.wandb_mode=offline", "logging.tensorboard=true"]
# Router statistics of DP=2 / PP=2 / TP=2+SP against one process: step 1 starts from the same
# weights (the sums differ in order only); steps 2-3 add the layouts' parameter round-off.
# Measured on the 2-core machine: at most 6e-8 relative.
STATS_RTOL, STATS_ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("diagnostics")
    single = run_plan(1, [Run("mesh", MESH), Run("mesh_off", ["train.steps=3"]),
                          Run("base", [*STATS, "model.variant=base"]),
                          Run("vanilla", [*STATS, "model.variant=vanilla", "model.layer_split=6"])],
                      demo_data, work / "w1")
    parallel = run_plan(2, [Run("mesh_dp2", STATS), Run("mesh_pp2", [*STATS, "parallel.pipeline=2"]),
                            Run("mesh_tp2_sp", [*STATS, "parallel.tensor=2", "parallel.sequence_parallel=true"])],
                        demo_data, work / "w2")
    runs = {name: work / "w1" / name for name in single} | {name: work / "w2" / name for name in parallel}
    runs["results"] = single
    return runs


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def router_metrics(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in metric_rows(run_dir):
        values = {k: v for k, v in row.items() if k.startswith("router/")}
        if values:
            out.setdefault(row["step"], {}).update(values)
    return out


def checkpoint_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step0000003"


def test_router_statistics_memory_and_config_reach_every_sink(runs):
    run_dir = runs["mesh"]
    stats = router_metrics(run_dir)
    assert sorted(stats) == [1, 2, 3]
    names = set(stats[3])
    for step in ("transitional", "loop1", "loop2"):
        for kind in ("write", "read"):
            base = f"router/{step}/{kind}"
            assert {f"{base}/entropy", f"{base}/entropy_fraction", f"{base}/effective_slots"} <= names
            weights = [stats[3][f"{base}/weight/slot{b}"] for b in range(5)]
            assert sum(weights) == pytest.approx(1.0, abs=1e-6)  # fp32 softmax per token
            assert 0 < stats[3][f"{base}/entropy"] <= math.log(5) + 1e-9
            assert stats[3][f"{base}/entropy_fraction"] == pytest.approx(stats[3][f"{base}/entropy"] / math.log(5))
            assert 1 <= stats[3][f"{base}/effective_slots"] <= 5 + 1e-9
    assert all(stats[3][f"router/buffer/slot{b}_norm"] > 0 for b in range(5))

    rows = metric_rows(run_dir)
    info = [r for r in rows if r.get("event") == "run_info"]
    assert len(info) == 1 and info[0]["config"]["logging"]["router_stats_interval"] == 1
    assert info[0]["parameters"]["this_rank"]["routers"] == 3 * 2 * (64 * 5 + 5)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["memory/rss_mib"] > 50 and r["memory/peak_rss_mib"] >= r["memory/rss_mib"] * 0.9 for r in train)
    assert train[-1]["train/samples"] == 24 and train[-1]["train/skipped_steps"] == 0

    # wandb's offline run file holds the same numbers and the config with the parameter report.
    wandb_run = read_run(run_dir)
    logged = {}
    for row in wandb_run["history"]:
        logged.setdefault(row["_step"], {}).update(row)
    for step in (1, 2, 3):
        for name, value in stats[step].items():
            assert logged[step][name] == pytest.approx(value, rel=1e-12), name
    assert logged[3]["train/loss"] == pytest.approx(train[-1]["train/loss"], rel=1e-12)
    assert "memory/rss_mib" in logged[3]
    assert wandb_run["config"]["model"]["variant"] == "mesh"
    assert wandb_run["config"]["parameters"] == info[0]["parameters"]

    # TensorBoard, read with its own EventAccumulator.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in ("train/loss", "memory/rss_mib", "router/loop2/read/effective_slots", "router/buffer/slot0_norm"):
        assert name in scalars, name
    tb = events.Scalars("router/loop1/write/entropy")
    assert [e.step for e in tb] == [1, 2, 3]
    assert [e.value for e in tb] == pytest.approx([stats[s]["router/loop1/write/entropy"] for s in (1, 2, 3)],
                                                  rel=1e-6)
    texts = [tag for tag in events.Tags()["tensors"] if tag.startswith(("config", "parameters"))]
    assert len(texts) == 2, events.Tags()

    plot = run_dir / "router.png"
    import matplotlib.image

    assert plot.stat().st_size > 10_000 and matplotlib.image.imread(plot).ndim == 3


def test_collecting_statistics_changes_nothing_in_training(runs):
    """The same run with statistics every step and without: bitwise the same losses and weights."""
    on, off = runs["results"]["mesh"], runs["results"]["mesh_off"]
    assert router_metrics(runs["mesh_off"]) == {}
    assert on["losses"] == off["losses"] and len(on["losses"]) == 3
    assert all(torch.equal(on["params"][name], off["params"][name]) for name in off["params"])


def test_a_variant_without_routers_logs_no_statistics_and_says_so(runs):
    assert router_metrics(runs["base"]) == {}
    lines = (runs["base"].parent / "torchrun.log").read_text()
    assert "logging.router_stats_interval=1 has no effect: variant base has no MeSH routers" in lines


@pytest.mark.parametrize("layout", ["mesh_dp2", "mesh_pp2", "mesh_tp2_sp"])
def test_reduced_router_statistics_equal_the_single_process_ones(runs, layout):
    """DP=2: each rank sees half of the global batch; PP=2: the routers live on two stages;
    TP=2 with sequence parallelism: each TP rank routes half of every sequence's positions."""
    reference, parallel = router_metrics(runs["mesh"]), router_metrics(runs[layout])
    assert sorted(parallel) == sorted(reference) == [1, 2, 3]
    worst = max(abs(parallel[s][n] - v) / abs(v) for s in reference for n, v in reference[s].items() if v)
    print(f"\n{layout}: router statistics within {worst:.1e} (relative) of one process")
    for step in reference:
        assert set(parallel[step]) == set(reference[step])
        for name, value in reference[step].items():
            assert parallel[step][name] == pytest.approx(value, rel=STATS_RTOL, abs=STATS_ATOL), (layout, step, name)


# ----------------------------------------------------------------------------- mesh analyze
def analyze(args: list[str], capsys) -> tuple[int, str, str]:
    from mesh_cli.main import main

    code = main(["analyze", *args, "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def analysis_data(demo_data):
    return str(demo_data / "val_text_document")


def test_analyze_writes_every_field_and_non_empty_plots(runs, analysis_data, capsys):
    # A run folder means its newest checkpoint; the output goes next to its checkpoints by default.
    code, stdout, _ = analyze([str(runs["mesh"]), "--data", analysis_data, "-n", "6"], capsys)
    assert code == 0, stdout
    out = runs["mesh"] / "analysis" / "step0000003"
    report = json.loads((out / "analysis.json").read_text())
    assert report["sequences"] == 6 and report["seq_length"] == 32
    (result,) = report["checkpoints"]
    assert set(FIELDS) <= set(result)
    assert result["label"] == "mesh 1+2R2+1" and result["step"] == 3
    assert result["states"] == ["h_emb", "h0", "loop1", "loop2", "output"]
    assert list(result["skew"]["blocks"]) == ["prelude", "loop1", "loop2", "coda"]
    assert list(result["skew"]["layers"]) == ["prelude.0", "core.0@loop1", "core.1@loop1", "core.0@loop2",
                                              "core.1@loop2", "coda.0"]
    for value in [*result["skew"]["blocks"].values(), *result["skew"]["layers"].values()]:
        assert 0 < value["mean"] < 2 and value["std"] >= 0
    for kernel in ("linear", "rbf"):
        matrix = torch.tensor(result["cka"][kernel])
        assert matrix.shape == (5, 5)
        assert torch.allclose(matrix.diagonal(), torch.ones(5, dtype=matrix.dtype))
        assert torch.allclose(matrix, matrix.T) and (matrix > 0).all() and (matrix <= 1 + 1e-9).all()
    for name in result["states"]:
        curve = result["spectrum"][name]["mean"]
        assert len(curve) == 32 and curve[0] == 1.0 and curve == sorted(curve, reverse=True)
    routers = result["routers"]
    assert routers["steps"] == ["transitional", "loop1", "loop2"] and routers["tokens"] == [6 * 32] * 3
    assert result["not_applicable"] == []
    import matplotlib.image

    for name in ("skew.png", "cka.png", "spectrum.png", "routers.png"):
        assert (out / name).stat().st_size > 10_000 and matplotlib.image.imread(out / name).ndim == 3
    assert "skew per block: prelude" in stdout


def test_compare_overlays_base_and_mesh(runs, analysis_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, _ = analyze([str(checkpoint_of(runs["base"])), "--compare", str(checkpoint_of(runs["mesh"])),
                               "--data", analysis_data, "-n", "4", "--out", str(out)], capsys)
    assert code == 0
    results = json.loads((out / "analysis.json").read_text())["checkpoints"]
    assert [r["label"] for r in results] == ["base 1+2R2+1", "mesh 1+2R2+1"]
    base, mesh = results
    assert base["routers"] is None and base["not_applicable"] == ["router statistics: variant base has no MeSH routers"]
    assert "not applicable: router statistics" in stdout
    assert base["states"] == mesh["states"]
    from analysis import plots

    entries = [(r["label"], r) for r in results]
    skew_fig = plots.skew_figure(entries)
    assert [t.get_text() for t in skew_fig.axes[0].get_legend().get_texts()] == ["base 1+2R2+1", "mesh 1+2R2+1"]
    spectrum_fig = plots.spectrum_figure(entries)
    assert len(spectrum_fig.axes[0].get_lines()) == 2  # one curve per variant in every state's panel
    assert len(plots.cka_figure(entries).axes) == 2 * 2 + 1  # a row per variant, linear and RBF, colour bar
    for name in ("skew.png", "cka.png", "spectrum.png", "routers.png"):
        assert (out / name).stat().st_size > 10_000


def numbers(result: dict) -> dict:
    """The numeric content of one result, flattened."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, list) and value and not isinstance(value[0], str):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        elif isinstance(value, float):
            flat[prefix] = value

    for key in ("skew", "cka", "spectrum", "routers"):
        walk(key, result[key])
    return flat


def analyze_in_process(checkpoint: Path, tokens):
    from megatron.core import tensor_parallel

    from analysis.checkpoint import load
    from analysis.report import analyze as run_analysis
    from mesh_model.params import single_process_model_parallel
    from pretrain.compat import apply_cpu_shim

    apply_cpu_shim()
    with single_process_model_parallel():
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        return run_analysis(load(checkpoint), tokens, batch_size=4)


@pytest.fixture(scope="module")
def tokens(analysis_data):
    from analysis.heldout import sequences

    return sequences(analysis_data, 4, 32)


def test_a_tp2_checkpoint_gives_the_numbers_of_world_size_1(runs, tokens, tmp_path):
    from pretrain.checkpoint.cli import convert_layout

    source = checkpoint_of(runs["mesh"])
    tp2 = convert_layout(source, tmp_path / "step0000003", tensor=2)
    assert ckpt.read_meta(tp2).layout["tensor"] == 2
    assert len(list((tp2 / "state").glob("tp01-*.pt"))) == 1
    a, b = numbers(analyze_in_process(source, tokens)), numbers(analyze_in_process(tp2, tokens))
    assert a.keys() == b.keys() and len(a) > 100
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]


def test_a_pp2_checkpoint_gives_the_numbers_of_world_size_1(runs, tokens):
    """Trained at PP=2 (core layers split over two stages, each router step on its stage) and at
    world size 1: the same weights up to the layouts' round-off, so the same diagnostics."""
    assert ckpt.read_meta(checkpoint_of(runs["mesh_pp2"])).layout["pipeline"] == 2
    a = numbers(analyze_in_process(checkpoint_of(runs["mesh"]), tokens))
    b = numbers(analyze_in_process(checkpoint_of(runs["mesh_pp2"]), tokens))
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: abs(a[k] - b[k]) / (abs(a[k]) + 1e-6))
    print(f"\nPP=2 vs world size 1: worst {worst} {a[worst]:.6g} vs {b[worst]:.6g}")
    assert abs(a[worst] - b[worst]) <= 1e-5 * abs(a[worst]) + 1e-7, (worst, a[worst], b[worst])


def test_a_non_recursive_checkpoint_gets_the_diagnostics_that_apply(runs, analysis_data, tmp_path, capsys):
    code, stdout, _ = analyze([str(runs["vanilla"]), "--data", analysis_data, "-n", "3", "--out",
                               str(tmp_path / "v")], capsys)
    assert code == 0
    (result,) = json.loads((tmp_path / "v" / "analysis.json").read_text())["checkpoints"]
    assert result["states"] == ["h_emb", "output"]
    assert list(result["skew"]["blocks"]) == ["layers"]
    assert list(result["skew"]["layers"]) == [f"prelude.{i}" for i in range(6)]
    assert result["routers"] is None
    assert [n.split(":")[0] for n in result["not_applicable"]] == [
        "loop stagnation", "per-block skew of prelude / loops / coda", "router statistics"]
    assert stdout.count("not applicable:") == 3
    assert not (tmp_path / "v" / "routers.png").exists() and (tmp_path / "v" / "cka.png").exists()


def test_bad_input_is_one_line(runs, analysis_data, tmp_path, capsys):
    mesh = str(checkpoint_of(runs["mesh"]))
    code, _, err = analyze([mesh, "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and err.count("\n") == 1 and "has no" in err and "nothing.bin" in err, err
    assert not (tmp_path / "a").exists()

    damaged = tmp_path / "damaged" / "step0000003"
    shutil.copytree(mesh, damaged)
    victim = sorted((damaged / "state").glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    code, _, err = analyze([str(damaged), "--data", analysis_data, "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and err.count("\n") == 1 and "truncated or damaged" in err, err

    code, _, err = analyze([str(tmp_path / "no-run"), "--data", analysis_data], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such checkpoint" in err, err

    out = tmp_path / "c"
    assert analyze([mesh, "--data", analysis_data, "-n", "2", "--out", str(out)], capsys)[0] == 0
    before = (out / "analysis.json").read_bytes()
    code, _, err = analyze([mesh, "--data", analysis_data, "-n", "3", "--out", str(out)], capsys)
    assert code == 2 and "already holds analysis.json" in err and err.count("\n") == 1
    assert (out / "analysis.json").read_bytes() == before
