"""MeSH router statistics on held-out data: the training-time statistics (mesh_model/router_stats.py),
collected over the analysed sequences by the world-size-1 model."""

from __future__ import annotations

from contextlib import contextmanager

from mesh_model.router_stats import RouterStatistics


@contextmanager
def observed(model):
    """Yields the RouterStatistics that every forward pass of `model` inside the block adds to
    (None for a model without MeSH routers)."""
    recurrence = getattr(model, "recurrence", None)
    if recurrence is None or not hasattr(recurrence, "statistics"):
        yield None
        return
    stats = RouterStatistics.for_model(model.model_config)
    recurrence.statistics = stats
    try:
        yield stats
    finally:
        recurrence.statistics = None
