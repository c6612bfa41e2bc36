"""`mesh eval lm-eval`: lm-eval-harness on a converted model, the paper's task list by default.

The paper (MeSH, Sec. 4) reports 0-shot and 5-shot accuracy on LAMBADA (OpenAI and standard),
PIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge and SciQ: acc_norm for PIQA, HellaSwag,
ARC and SciQ, acc for the others. Their data sets come from the Hugging Face hub; on a machine
without network they must already be in the local cache, which is checked before anything runs.
Local task definitions (`--include-path DIR` with task YAMLs, e.g. `dataset_path: json`) run
offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

PAPER_METRICS = {
    "lambada_openai": "acc", "lambada_standard": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm",
    "winogrande": "acc", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "sciq": "acc_norm",
}
PAPER_TASKS = tuple(PAPER_METRICS)
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


class MissingDatasets(FileNotFoundError):
    pass


def task_manager(include_path: Optional[str]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def _task_config(manager, name: str) -> dict:
    import yaml

    entry = manager.task_index.get(name)
    if entry is None:
        raise FileNotFoundError(f"lm-eval has no task {name!r}; check the name (`lm_eval ls tasks`) or pass "
                                "--include-path with its YAML")
    cfg = dict(entry.cfg or {})
    path = Path(entry.yaml_path) if entry.yaml_path else None
    while "dataset_path" not in cfg and cfg.get("include") and path is not None:
        path = path.parent / cfg.pop("include")
        base = yaml.safe_load(path.read_text()) or {}
        cfg = {**base, **cfg}
    return cfg


def _cached(dataset: str) -> bool:
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return hub.is_dir() or (datasets_cache / dataset.replace("/", "___")).is_dir()


def missing_datasets(manager, tasks: list[str]) -> list[str]:
    """'task (dataset)' for each task whose hub data set is not in the local cache."""
    missing = []
    for name in tasks:
        dataset = _task_config(manager, name).get("dataset_path")
        if dataset and dataset not in _LOCAL_BUILDERS and not _cached(dataset):
            missing.append(f"{name} ({dataset})")
    return missing


def run(folder: Path, tasks: list[str], fewshots: list[int], *, include_path: Optional[str] = None,
        limit: Optional[float] = None, batch_size: int = 8, device: str = "cpu", download: bool = False,
        dtype: str = "float32", log_samples: bool = False) -> dict:
    """{num_fewshot: lm-eval's results dict}; MissingDatasets (one line) before anything runs."""
    if not download:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    manager = task_manager(include_path)
    missing = [] if download else missing_datasets(manager, tasks)
    if missing:
        raise MissingDatasets(
            f"not in the local Hugging Face cache: {', '.join(missing)}; run with network access and --download "
            "once, or copy a cache that has them (HF_HOME), or pick other --tasks")
    import lm_eval

    out = {}
    for shots in fewshots:
        out[shots] = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(folder), "trust_remote_code": True, "backend": "causal",
                                    "dtype": dtype},
            tasks=list(tasks), num_fewshot=shots, batch_size=batch_size, device=device, limit=limit,
            task_manager=manager, log_samples=log_samples, bootstrap_iters=0)
    return out


def summary(results: dict) -> list[dict]:
    """One row per (task, shots): the paper's metric for its tasks, acc (and acc_norm) for others."""
    rows = []
    for shots, result in sorted(results.items()):
        for task, metrics in sorted(result["results"].items()):
            names = [PAPER_METRICS[task]] if task in PAPER_METRICS else [
                m for m in ("acc", "acc_norm") if f"{m},none" in metrics]
            for metric in names:
                value = metrics.get(f"{metric},none")
                if value is not None:
                    rows.append({"task": task, "shots": shots, "metric": metric, "value": float(value),
                                 "stderr": metrics.get(f"{metric}_stderr,none")})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | shots | metric | value |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['shots']} | {r['metric']} | {100 * r['value']:.2f} |" for r in rows]
    for shots in sorted({r["shots"] for r in rows}):
        values = [r["value"] for r in rows if r["shots"] == shots]
        lines.append(f"| **average** | {shots} | | {100 * sum(values) / len(values):.2f} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table, raw = out_dir / "lm_eval.md", out_dir / "lm_eval.json"
    table.write_text(markdown_table(rows))
    raw.write_text(json.dumps({"summary": rows, "results": {str(k): v["results"] for k, v in results.items()}},
                              indent=1, default=str) + "\n")
    return table, raw
