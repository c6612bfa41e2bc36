"""Paired comparisons for benchmarks on a noisy machine.

A ratio of two medians moves by ~10% from run to run on a shared 2-core VM, so
benchmarks compare variants in pairs taken close together in time (the same
round-robin block, or the same A/B launch pair) and report the geometric mean of
the per-pair ratios with a 95% interval: a t-interval on the log ratios
(scipy.stats.t), which is symmetric on the scale where timing noise is.
"""

from __future__ import annotations

import math
from typing import Sequence


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], confidence: float = 0.95) -> dict:
    """{"ratio", "low", "high", "pairs"}: geometric mean of numerator_i / denominator_i and its interval."""
    import numpy as np
    from scipy import stats

    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need pairs of equal, non-zero length, got {len(numerator)} and {len(denominator)}")
    logs = np.log(np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float))
    mean = float(logs.mean())
    if len(logs) < 2:
        return {"ratio": math.exp(mean), "low": None, "high": None, "pairs": len(logs)}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs)))
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half), "pairs": len(logs)}


def format_ratio(r: dict) -> str:
    if r["low"] is None:
        return f"{r['ratio']:.3f} (1 pair)"
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] ({r['pairs']} pairs)"
