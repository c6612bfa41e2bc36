"""Parameter counts against the paper, every shipped config, and bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mesh_model.config import ConfigError, ModelConfig
from mesh_model.params import analytic_non_embedding, load_model_config, report_for
from pretrain.config import load_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in SWEEPS)  # run configs


# ------------------------------------------------------------------ paper's Table 5 (1.4B)

@pytest.mark.parametrize(
    "config_file,non_embedding,routers",
    [
        ("pythia-1.4b/vanilla.yaml", 1_208_602_624, 0),
        ("pythia-1.4b/base.yaml", 805_736_448, 0),
        ("pythia-1.4b/mesh.yaml", 805_797_918, 61_470),
    ],
)
def test_table5_parameter_counts(config_file, non_embedding, routers):
    report = report_for(load_model_config(CONFIGS / config_file))
    assert report.non_embedding == non_embedding
    assert report.routers == routers


def test_mesh_params_cli_prints_table5(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mesh_cli", "params", str(CONFIGS / "pythia-1.4b/mesh.yaml")],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "805,797,918" in out and "61,470" in out


@pytest.mark.parametrize("size,d,layers", [("160m", 768, 12), ("410m", 1024, 24)])
@pytest.mark.parametrize("variant", ["vanilla", "mesh"])
def test_small_pythia_counts_follow_the_layer_formula(size, d, layers, variant):
    config = load_model_config(CONFIGS / f"pythia-{size}/{variant}.yaml")
    report = report_for(config)
    unique = layers if variant == "vanilla" else config.split.unique_layers
    expected = unique * (12 * d * d + 13 * d) + 2 * d  # + final LayerNorm
    if variant == "mesh":
        b = config.buffer_slots
        expected += (config.split.loops + 1) * 2 * (d * b + b)
    assert report.non_embedding == expected == analytic_non_embedding(config)
    assert report.embedding == 2 * 50304 * d  # untied input embedding and output head


# ------------------------------------------------------------------ shipped configs

def test_configs_cover_the_paper():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    for size in ("160m", "410m", "1b", "1.4b"):
        for variant in ("vanilla", "base", "residual", "anchor", "anchor_emb", "mesh"):
            assert f"pythia-{size}/{variant}.yaml" in names
    for size in ("2.8b", "6.9b", "12b"):
        assert f"pythia-{size}/mesh.yaml" in names
    assert "demo.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_parses_and_validates(path):
    config = load_config(path)
    assert config.model.num_layers == config.model.compute_depth
    if config.model.variant == "mesh":
        assert config.model.buffer_slots == config.model.split.loops + 3


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_sweep_file_resolves(path):
    from sweep.spec import load_sweep

    assert load_sweep(path).runs


def test_paper_splits():
    assert str(load_model_config(CONFIGS / "pythia-160m/mesh.yaml").split) == "2+4R2+2"
    assert str(load_model_config(CONFIGS / "pythia-410m/mesh_3+6R3+3.yaml").split) == "3+6R3+3"
    assert str(load_model_config(CONFIGS / "pythia-1b/mesh.yaml").split) == "3+5R2+3"


# ------------------------------------------------------------------ bad configs

@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"num_attention_heads": 5}, "model.num_attention_heads"),
        ({"layer_split": "1+2R0+1"}, "model.layer_split"),
        ({"buffer_slots": 1}, "model.buffer_slots"),
        ({"layer_split": "1+2R2+1", "num_layers": 7}, "model.num_layers"),
        ({"variant": "transformer-xl"}, "model.variant"),
        ({"layer_split": "1+2y2+1"}, "model.layer_split"),  # (1+2x2+1 is now vanilla+mesh's unshared core)
        ({"variant": "vanilla"}, "model.layer_split"),
        ({"variant": "base", "buffer_slots": 4}, "model.buffer_slots"),
    ],
)
def test_bad_model_configs_name_the_field(overrides, field):
    values = dict(hidden_size=64, num_attention_heads=4, vocab_size=100, seq_length=16,
                  layer_split="1+2R2+1", variant="mesh")
    values.update(overrides)
    with pytest.raises(ConfigError) as err:
        ModelConfig(**values)
    message = str(err.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.global_batch_size=10", "train.global_batch_size"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("train.stepz=3", "train.stepz"),
        ("model.num_attention_heads=7", "model.num_attention_heads"),
        ("train.steps=many", "train.steps"),
    ],
)
def test_bad_run_configs_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert field in str(err.value)


def test_overrides_are_typed():
    config = load_config(CONFIGS / "demo.yaml", ["train.steps=7", "optim.lr=1e-3", "model.variant=base"])
    assert config.train.steps == 7 and config.optim.lr == 1e-3 and config.model.variant == "base"
    assert config.model.buffer_slots is None


def test_bad_config_fails_fast_on_the_command_line(tmp_path):
    """One line on stderr, exit code 2, and nothing created (no run directory)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "mesh_cli", "train", str(CONFIGS / "demo.yaml"),
         "model.num_attention_heads=7", f"logging.run_dir={run_dir}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "model.num_attention_heads" in lines[0]
    assert not run_dir.exists()
