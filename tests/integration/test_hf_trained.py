"""Conversion of checkpoints that real multi-process training wrote (TP=2 and PP=2), and
lm-eval-harness end to end, offline, on a converted model with a local task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.support.harness import Run, run_plan
from tests.support.hf import load_hf, training_logits

pytestmark = pytest.mark.slow
LAYOUTS = {"tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """{layout: final checkpoint} of two training steps of the TINY MeSH model at TP=2 and PP=2."""
    work = tmp_path_factory.mktemp("hf-trained")
    runs = [Run(name, [*overrides, "train.steps=2", "checkpoint.save_at_end=true"]) for name, overrides in LAYOUTS.items()]
    run_plan(2, runs, demo_data, work)
    return {name: work / name / "checkpoints" / "step0000002" for name in LAYOUTS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoints_saved_at_tp2_and_pp2_convert_with_the_training_models_logits(layout, trained, model_parallel,
                                                                                  tmp_path):
    from mesh_hf.export import export
    from mesh_model.config import ModelConfig
    from mesh_model.model import build_model
    from pretrain.checkpoint import format as ckpt

    checkpoint = trained[layout]
    meta = ckpt.read_meta(checkpoint)
    assert meta.layout[{"tp2": "tensor", "pp2": "pipeline"}[layout]] == 2
    export(checkpoint, tmp_path / "hf", progress=False)
    model = build_model(ModelConfig.from_dict(meta.model)).eval()
    model.load_state_dict(ckpt.consolidate(checkpoint))
    hf, _ = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits
    assert (logits - training_logits(model, ids)).abs().max().item() < 1e-5


def _local_task(folder):
    """A 30-item multiple-choice task lm-eval reads from local JSON (no network)."""
    items = []
    for i in range(30):
        a, b = i % 7 + 1, i % 5 + 2
        choices = [str(a + b + d) for d in (0, 1, 3)]
        items.append({"question": f"def add():\n    return {a} + {b}  # =", "choices": choices, "answer": 0})
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "mesh_local_mc.yaml").write_text(
        "task: mesh_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n    validation: {data}\n"
        "output_type: multiple_choice\ntest_split: test\nvalidation_split: validation\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return items


def test_lm_eval_runs_offline_on_a_converted_model(trained, tmp_path):
    from mesh_hf import lm_eval_runner as runner
    from mesh_hf.export import export

    export(trained["tp2"], tmp_path / "hf", progress=False)
    (tmp_path / "tasks").mkdir()
    items = _local_task(tmp_path / "tasks")
    results = runner.run(tmp_path / "hf", ["mesh_local_mc"], [0], include_path=str(tmp_path / "tasks"),
                         batch_size=4, log_samples=True)
    rows = runner.summary(results)
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"} and all(0 <= r["value"] <= 1 for r in rows)
    table, raw = runner.write(rows, results, tmp_path / "out")
    assert "mesh_local_mc" in table.read_text() and json.loads(raw.read_text())["summary"] == rows

    # lm-eval's log-likelihood of one item's answer equals the model's, computed directly.
    sample = results[0]["samples"]["mesh_local_mc"][0]
    reported = float(sample["resps"][0][0][0])
    hf, tokenizer = load_hf(tmp_path / "hf")
    context, continuation = items[sample["doc_id"]]["question"], " " + items[sample["doc_id"]]["choices"][0]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    target = whole[len(context_ids):]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([whole]), use_cache=False).logits[0].float(), dim=-1)
    direct = sum(logprobs[len(context_ids) - 1 + k, token].item() for k, token in enumerate(target))
    assert math.isclose(reported, direct, abs_tol=1e-4), (reported, direct)


def test_lm_eval_names_missing_datasets_in_one_line(trained, tmp_path, monkeypatch):
    from mesh_hf import lm_eval_runner as runner

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache" / "datasets"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(runner.MissingDatasets) as err:
        runner.run(tmp_path, ["piqa", "arc_easy"], [0])
    message = str(err.value)
    assert "\n" not in message and "piqa (baber/piqa)" in message and "arc_easy (allenai/ai2_arc)" in message
