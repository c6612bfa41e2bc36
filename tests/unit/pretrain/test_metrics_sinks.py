"""MetricsLogger's sinks in one process: metrics.jsonl, the offline wandb run file and TensorBoard
hold the same metrics, the config and the parameter report; router.png is drawn from a summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mesh_model.router_stats import RouterStatistics, flat_metrics
from pretrain.config import load_config
from pretrain.metrics import MetricsLogger, memory_metrics, write_router_plot
from pretrain.run_folder import RunFolder
from tests.support.wandb_records import read_run

DEMO = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"


def router_summary() -> dict:
    stats = RouterStatistics(3, 5)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        stats.add_routers(step, torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator))
    stats.add_buffer(torch.randn(5, 8, 16, generator=generator))
    return stats.summary()


def test_every_sink_holds_the_metrics_config_and_parameters(tmp_path):
    config = load_config(DEMO, [f"logging.run_dir={tmp_path / 'run'}", "logging.wandb_mode=offline",
                                "logging.tensorboard=true"])
    folder = RunFolder.of(config)
    folder.path.mkdir(parents=True)
    summary = router_summary()
    router = flat_metrics(summary)
    memory = memory_metrics(torch.device("cpu"))
    assert memory["memory/rss_mib"] > 10 and memory["memory/peak_rss_mib"] >= memory["memory/rss_mib"] * 0.9
    logger = MetricsLogger(config, folder, enabled=True)
    parameters = {"this_rank": {"total": 10, "routers": 2}}
    try:
        logger.log_run_info(0, config.to_dict(), parameters)
        logger.log(1, {"train/loss": 5.0, "train/grad_norm": None, **memory})
        logger.log(2, {"train/loss": 4.5, **router})
    finally:
        logger.close()

    rows = [json.loads(line) for line in folder.metrics_file.read_text().splitlines()]
    assert rows[0] == {"step": 0, "event": "run_info", "config": config.to_dict(), "parameters": parameters}
    assert rows[2]["router/loop2/read/effective_slots"] == summary["read"]["effective_slots"][2]

    wandb_run = read_run(folder.path)
    by_step = {row["_step"]: row for row in wandb_run["history"]}
    assert by_step[1]["train/loss"] == 5.0 and by_step[1]["memory/rss_mib"] == memory["memory/rss_mib"]
    assert all(by_step[2][name] == pytest.approx(value, rel=1e-12) for name, value in router.items())
    assert wandb_run["config"]["parameters"] == parameters
    assert wandb_run["config"]["logging"]["tensorboard"] is True

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder.path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 5.0), (2, 4.5)]
    assert "train/grad_norm" not in events.Tags()["scalars"]  # None is not a number to plot
    assert events.Scalars("router/buffer/slot4_norm")[0].value == pytest.approx(summary["slot_norm"][4], rel=1e-6)
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "router_stats_interval" in config_text and "variant: mesh" in config_text


def test_a_disabled_logger_writes_nothing(tmp_path):
    config = load_config(DEMO, [f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=true"])
    folder = RunFolder.of(config)
    logger = MetricsLogger(config, folder, enabled=False)  # every rank but the logging one
    logger.log_run_info(0, config.to_dict(), {})
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert not folder.path.exists()


def test_router_plot_is_written_next_to_loss_png(tmp_path):
    folder = RunFolder(tmp_path)
    path = write_router_plot(folder, 7, router_summary())
    import matplotlib.image

    assert path == tmp_path / "router.png" and matplotlib.image.imread(path).ndim == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_a_resumed_segment_replaces_the_tensorboard_events_it_trains_again(tmp_path):
    """Crash after step 4 with the checkpoint at step 2: the resumed segment trains 3 and 4 again,
    and TensorBoard keeps only those (metrics.jsonl marks the resume instead)."""
    config = load_config(DEMO, [f"logging.run_dir={tmp_path / 'run'}", "logging.wandb_mode=disabled",
                                "logging.tensorboard=true"])
    folder = RunFolder.of(config)
    folder.path.mkdir(parents=True)
    first = MetricsLogger(config, folder, enabled=True)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": float(step)})
    first.close()
    resumed = MetricsLogger(config, folder, enabled=True, resumed_at=2)
    for step in (3, 4):
        resumed.log(step, {"train/loss": 10.0 + step})
    resumed.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Each segment writes its own event file; the accumulator reads them in order and purges.
    files = sorted((folder.path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = EventAccumulator(str(folder.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
