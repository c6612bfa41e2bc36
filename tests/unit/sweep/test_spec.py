"""The sweep file: grid resolution, run ids, budgets, rules, and one-line errors naming the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mesh_model.config import ConfigError
from mesh_model.flops import flops_per_token
from mesh_model.params import report_for
from sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[3]
DEMO = str(REPO / "configs" / "demo.yaml")


def tiny_sizes():
    return [{"name": f"d{d}", "config": DEMO,
             "overrides": {"model.hidden_size": d, "model.num_attention_heads": 2}} for d in (32, 64)]


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def base_spec(tmp_path: Path, **changes) -> dict:
    spec = {
        "root": str(tmp_path / "runs"),
        "grid": {"sizes": tiny_sizes(), "variants": ["base", "mesh"], "tokens": ["2N", "64K"], "seeds": [1, 2]},
        "overrides": {"model.seq_length": 64, "train.micro_batch_size": 8, "train.global_batch_size": 8},
        "slurm": {"nodes": 1, "gpus_per_node": 2},
    }
    spec.update(changes)
    return spec


def test_grid_resolves_every_point_with_stable_ids_and_accounting(tmp_path):
    sweep = load_sweep(write(tmp_path, base_spec(tmp_path)))
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    assert sweep.slurm == {"nodes": 1, "gpus_per_node": 2}
    ids = [r.run_id for r in sweep.runs]
    assert ids[:4] == ["d32.base.t2n.s1", "d32.base.t2n.s2", "d32.base.t64k.s1", "d32.base.t64k.s2"]
    assert len(set(ids)) == len(ids)
    # Loading again gives the same ids and folders (a resubmitted sweep finds its runs).
    assert [(r.run_id, r.run_dir) for r in load_sweep(write(tmp_path, base_spec(tmp_path))).runs] == \
           [(r.run_id, r.run_dir) for r in sweep.runs]

    run = sweep.run("d64.mesh.t2n.s2")
    assert run.run_dir == tmp_path / "runs" / "d64.mesh.t2n.s2"
    assert run.config.logging.run_dir == str(run.run_dir)
    assert (run.config.model.hidden_size, run.config.model.variant, run.config.train.seed) == (64, "mesh", 2)
    report = report_for(run.config.model)
    assert (run.params_non_embedding, run.params_total) == (report.non_embedding, report.total)
    # 2 tokens per non-embedding parameter, rounded up to whole steps of 8 x 64 tokens.
    assert run.steps == math.ceil(2 * report.non_embedding / 512)
    assert run.tokens == run.steps * 512 >= 2 * report.non_embedding
    assert run.flops == flops_per_token(run.config.model).total * run.tokens
    fixed = sweep.run("d32.base.t64k.s1")
    assert (fixed.tokens, fixed.steps) == (64_000 // 512 * 512 + 512 * (64_000 % 512 > 0), math.ceil(64_000 / 512))


def test_overrides_reproduce_the_resolved_config(tmp_path):
    """What `mesh train CONFIG overrides...` would build is exactly the run's config."""
    from pretrain.config import load_config

    for run in load_sweep(write(tmp_path, base_spec(tmp_path))).runs[::5]:
        assert load_config(run.config_path, run.overrides).to_dict() == run.config.to_dict()


def test_rules_table_and_power_law(tmp_path):
    spec = base_spec(tmp_path, rules={
        "optim.lr": {"d32": 3e-3, "d64": 2e-3},
        "train.global_batch_size": {"power_law": {"scale": 8, "exponent": 1.0, "reference": "1.0e5"}},
    })
    spec["overrides"].update({"optim.min_lr": 1e-5, "train.micro_batch_size": 1})
    sweep = load_sweep(write(tmp_path, spec))
    small, large = sweep.run("d32.base.t64k.s1"), sweep.run("d64.base.t64k.s1")
    assert (small.config.optim.lr, large.config.optim.lr) == (3e-3, 2e-3)
    for run in (small, large):  # 8 x N / 1e5, rounded to an integer batch
        assert run.config.train.global_batch_size == round(float(f"{8 * run.params_non_embedding / 1e5:.4g}"))
    assert small.config.train.global_batch_size < large.config.train.global_batch_size


def test_size_folder_picks_the_variant_file_and_vanilla_flattens_a_split(tmp_path):
    spec = {"grid": {"sizes": ["pythia-160m"], "variants": ["vanilla", "mesh"], "tokens": ["20N"]}, "root": str(tmp_path)}
    sweep = load_sweep(write(tmp_path, spec))
    assert [r.config_path.name for r in sweep.runs] == ["vanilla.yaml", "mesh.yaml"]
    assert sweep.runs[0].run_id == "pythia-160m.vanilla.t20n.s1234"
    # On a single config file, `vanilla` turns 1+2R2+1 into the plain 6-layer stack.
    spec = {"grid": {"sizes": [DEMO], "variants": ["vanilla"], "tokens": [4096]}, "root": str(tmp_path)}
    run = load_sweep(write(tmp_path, spec)).runs[0]
    assert (run.run_id, run.config.model.layer_split, run.config.model.variant) == ("demo.vanilla.t4.096k.s1234", "6", "vanilla")


@pytest.mark.parametrize("change, message", [
    ({"grid": {"sizes": [], "tokens": ["20N"]}}, "grid.sizes: is empty"),
    ({"grid": {"sizes": ["no-such-size"], "tokens": ["20N"]}}, "grid.sizes[0]: 'no-such-size' is neither"),
    ({"grid": {"sizes": [DEMO], "tokens": ["20X"]}}, "grid.tokens[0]: '20X' is not a token budget"),
    ({"grid": {"sizes": [DEMO], "tokens": [0]}}, "grid.tokens[0]: 0: a token budget must be at least 1"),
    ({"grid": {"sizes": [DEMO], "tokens": ["-2N"]}}, "grid.tokens[0]: '-2N' is not a token budget"),
    ({"grid": {"sizes": [DEMO], "tokens": ["20N", "20n"]}}, "grid.tokens: 't20n' appears twice"),
    ({"grid": {"sizes": [DEMO], "tokens": ["2N"], "budgets": [1]}}, "grid.budgets: unknown key"),
    ({"gird": {}}, "gird: unknown key"),
    ({"grid": {"sizes": [DEMO], "tokens": ["2N"]}, "overrides": ["model.hiden_size=3"]},
     "unknown field(s) model.hiden_size"),
    ({"grid": {"sizes": [{"name": "a", "config": "missing.yaml"}], "tokens": ["2N"]}},
     "grid.sizes[0].config: config file 'missing.yaml' not found"),
    ({"grid": {"sizes": ["pythia-160m"], "variants": ["meshh"], "tokens": ["2N"]}},
     "grid.variants[0]: configs/pythia-160m has no meshh.yaml"),
    ({"grid": {"sizes": [DEMO], "variants": ["meshh"], "tokens": ["2N"]}}, "model.variant='meshh' is unknown"),
    ({"grid": {"sizes": [DEMO], "tokens": ["2N"]}, "rules": {"optim.lr": {"d32": 1e-3}}},
     "rules.optim.lr.d32: is not a size of the grid"),
    ({"grid": {"sizes": [DEMO], "tokens": ["2N"]}, "rules": {"optim.lr": 1e-3}}, "rules.optim.lr: must be a table"),
    ({"grid": {"sizes": [DEMO], "tokens": ["2N"]}, "rules": {"optim.lrr": {"demo": 1e-3}}}, "rules.optim.lrr: unknown field"),
    ({"grid": {"sizes": [DEMO], "tokens": ["2N"], "seeds": [-1]}}, "grid.seeds[0]: -1 must be an integer seed"),
])
def test_bad_sweep_files_are_one_line_errors_naming_the_key(tmp_path, change, message):
    path = write(tmp_path, {"root": str(tmp_path), **change})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    assert message in text, text


def test_a_size_can_have_its_own_seeds(tmp_path):
    """Fewer seeds at the larger size: d64 runs seeds 1 and 2, d32 the grid's 1, 2, 3."""
    sizes = tiny_sizes()
    sizes[1]["seeds"] = [1, 2]
    spec = base_spec(tmp_path)
    spec["grid"].update(sizes=sizes, variants=["mesh"], tokens=["64K"], seeds=[1, 2, 3])
    ids = [r.run_id for r in load_sweep(write(tmp_path, spec)).runs]
    assert ids == ["d32.mesh.t64k.s1", "d32.mesh.t64k.s2", "d32.mesh.t64k.s3", "d64.mesh.t64k.s1", "d64.mesh.t64k.s2"]
    sizes[1]["seeds"] = [2, 2]
    with pytest.raises(ConfigError, match=r"grid.sizes\[1\].seeds: 2 appears twice"):
        load_sweep(write(tmp_path, spec))


def test_shipped_sweep_files_resolve():
    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.runs and all(run.steps >= 1 for run in sweep.runs), path
