"""scripts/replication_results.py: the replication's tables come from the collected rows, and an
ordering is called only when the paired t interval over the seeds excludes zero."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import replication_results as results  # noqa: E402


def rows(size: str, variant: str, losses: dict[int, float]) -> list[dict]:
    """A run's final row per seed, and an earlier evaluation that must not count."""
    out = []
    for seed, loss in losses.items():
        common = {"run_id": f"{size}.{variant}.t1k.s{seed}", "size": size, "variant": variant, "seed": seed,
                  "parameters": 1000, "parameters_total": 2000, "tokens_per_s": 10.0 * seed}
        out.append({**common, "tokens": 500, "loss": 9.0, "final": False})
        out.append({**common, "tokens": 1000, "loss": loss, "final": True})
    return out


def test_summary_uses_final_rows_and_seed_statistics():
    groups = results.summarise({"rows": rows("d128", "mesh", {1: 5.0, 2: 5.2, 3: 5.1})})
    mesh = groups["d128.mesh"]
    assert mesh["seeds"] == 3 and mesh["loss_mean"] == pytest.approx(5.1)
    assert mesh["loss_std"] == pytest.approx(0.1)  # sample standard deviation
    assert mesh["ppl_mean"] == pytest.approx((math.exp(5.0) + math.exp(5.2) + math.exp(5.1)) / 3)
    assert mesh["tokens_per_s_mean"] == pytest.approx(20.0)


def test_orderings_are_paired_by_seed_and_called_only_outside_the_t_interval():
    # mesh is 0.05 below base on every seed, while the seeds themselves differ by 0.3: paired, it holds
    data = rows("d128", "mesh", {1: 5.00, 2: 5.30, 3: 5.15}) + rows("d128", "base", {1: 5.05, 2: 5.35, 3: 5.21})
    # anchor is below base on average but not consistently: not resolved
    data += rows("d128", "anchor", {1: 4.95, 2: 5.40, 3: 5.20})
    checks = {c["claim"]: c for c in results.check_claims(results.summarise({"rows": data}), "d128")}
    mesh = checks["mesh < base"]
    assert mesh["difference"] == pytest.approx(-0.0533, abs=1e-4) and mesh["verdict"] == "holds"
    low, high = mesh["interval95"]
    assert low < mesh["difference"] < high < 0
    anchor = checks["anchor < base"]
    assert anchor["verdict"].startswith("not resolved") and anchor["interval95"][0] < 0 < anchor["interval95"][1]
    assert "mesh < vanilla" not in checks  # no vanilla runs: no claim made


def test_a_single_seed_is_never_called():
    data = rows("d256", "mesh", {1: 4.8}) + rows("d256", "base", {1: 5.0})
    (check,) = [c for c in results.check_claims(results.summarise({"rows": data}), "d256") if c["claim"] == "mesh < base"]
    assert check["interval95"] is None and check["verdict"] == "not resolved (leans holds)"
