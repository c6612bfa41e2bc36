"""Router statistics (mesh_model/router_stats.py) on hand-made logits, and collected from a real model."""

from __future__ import annotations

import math

import pytest
import torch

from mesh_model.model import build_model
from mesh_model.router_stats import RouterStatistics, flat_metrics, token_entropy
from tests.support.models import causal_inputs, tiny_model_config

SLOTS = 5


def test_uniform_logits_give_entropy_log_b_and_b_effective_slots():
    stats = RouterStatistics(num_steps=1, num_slots=SLOTS)
    uniform = torch.full((7, 3, SLOTS), 0.25)
    stats.add_routers(0, uniform, uniform)
    summary = stats.summary()
    for kind in ("write", "read"):
        assert summary[kind]["entropy"][0] == pytest.approx(math.log(SLOTS), rel=1e-6)
        assert summary[kind]["entropy_fraction"][0] == pytest.approx(1.0, rel=1e-6)
        assert summary[kind]["effective_slots"][0] == pytest.approx(SLOTS, rel=1e-6)
        assert summary[kind]["mean_weight"][0] == pytest.approx([1 / SLOTS] * SLOTS, rel=1e-6)
    assert summary["tokens"] == [21]


def test_one_hot_logits_give_entropy_zero_and_one_effective_slot():
    stats = RouterStatistics(num_steps=2, num_slots=SLOTS)
    one_hot = torch.full((4, 2, SLOTS), float("-inf"))
    one_hot[..., 3] = 0.0  # every token: all weight on slot 3
    stats.add_routers(1, one_hot, one_hot)
    summary = stats.summary()
    assert summary["tokens"] == [0, 8]
    for kind in ("write", "read"):
        assert summary[kind]["entropy"][1] == 0.0
        assert summary[kind]["effective_slots"][1] == pytest.approx(1.0, abs=1e-12)
        assert summary[kind]["mean_weight"][1] == [0.0, 0.0, 0.0, 1.0, 0.0]
    # Step 0 saw nothing: it is left out of the scalar metrics.
    assert not any(name.startswith("router/transitional") for name in flat_metrics(summary))


def test_one_hot_tokens_on_different_slots_are_zero_entropy_but_many_effective_slots():
    stats = RouterStatistics(num_steps=1, num_slots=4)
    logits = torch.full((4, 4), float("-inf"))
    logits[torch.arange(4), torch.arange(4)] = 0.0  # token i -> slot i
    stats.add_routers(0, logits, torch.zeros(4, 4))
    summary = stats.summary()
    assert summary["write"]["entropy"][0] == 0.0
    assert summary["write"]["effective_slots"][0] == pytest.approx(4.0, rel=1e-12)


def test_hand_computed_mixture_and_accumulation_over_micro_batches():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, SLOTS, generator=generator) * 2
    whole = RouterStatistics(1, SLOTS)
    whole.add_routers(0, logits, -logits)
    parts = RouterStatistics(1, SLOTS)
    for piece in logits.split(2, dim=1):  # two micro-batches of 2 sequences
        parts.add_routers(0, piece, -piece)
    w = torch.softmax(logits.double(), dim=-1)
    entropy = -(w * w.log()).sum(-1).mean()
    mean = w.reshape(-1, SLOTS).mean(0)
    effective = math.exp(-(mean * mean.log()).sum())
    for summary in (whole.summary(), parts.summary()):
        assert summary["write"]["entropy"][0] == pytest.approx(float(entropy), rel=1e-6)
        assert summary["write"]["mean_weight"][0] == pytest.approx(mean.tolist(), rel=1e-6)
        assert summary["write"]["effective_slots"][0] == pytest.approx(effective, rel=1e-6)


def test_token_entropy_matches_the_definition():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    p = torch.softmax(logits, -1)
    assert torch.allclose(token_entropy(logits), -(p * p.log()).sum(-1))


def test_statistics_collected_from_a_model_match_its_trace(model_parallel):
    """The model's own router weights (its trace) give the same numbers, and collecting changes nothing."""
    config = tiny_model_config(buffer_slots=SLOTS)
    model = build_model(config).eval()
    tokens, positions, mask = causal_inputs(3, config.seq_length, config.vocab_size)
    trace: list = []
    with torch.no_grad():
        plain = model(tokens, positions, mask, trace=trace)
        stats = RouterStatistics.for_model(config)
        model.recurrence.statistics = stats
        observed = model(tokens, positions, mask)
        model.recurrence.statistics = None
    assert torch.equal(plain, observed)
    summary = stats.summary()
    steps = config.split.loops + 1
    assert summary["steps"] == ["transitional"] + [f"loop{t}" for t in range(1, steps)]
    assert summary["tokens"] == [3 * config.seq_length] * steps
    for entry in trace:
        k = entry["step"]
        for kind in ("write", "read"):
            w = entry[kind].double().reshape(-1, SLOTS)
            assert summary[kind]["mean_weight"][k] == pytest.approx(w.mean(0).tolist(), rel=1e-5)
            entropy = -(w * w.log()).sum(-1).mean()
            assert summary[kind]["entropy"][k] == pytest.approx(float(entropy), rel=1e-5)
    last = trace[-1]["buffer"].double()  # [B, s, b, h] after the final write
    norms = last.norm(dim=-1).reshape(SLOTS, -1).mean(1)
    assert summary["slot_norm"] == pytest.approx(norms.tolist(), rel=1e-5)
    metrics = flat_metrics(summary)
    assert metrics["router/loop2/read/effective_slots"] == summary["read"]["effective_slots"][2]
    assert metrics[f"router/buffer/slot{SLOTS - 1}_norm"] == summary["slot_norm"][-1]

