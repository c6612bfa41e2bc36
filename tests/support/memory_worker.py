"""Measured memory of each rank at a parallel layout, under torchrun (for test_memory_estimate_dist).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/support/memory_worker.py OUT.json CONFIG \\
        LAYOUT_OVERRIDES [section.field=value ...]

LAYOUT_OVERRIDES: comma-separated overrides of the layout (parallel.tensor=2). The plan at the
world size and pretrain/memory_measure.measure_engine on the rank's real DeepSpeed engine.
Rank r writes OUT.json.r: [{"overrides", "rank", "activations", "model_state",
"reduction_bucket"}]. (One layout per launch: a second engine in the same processes
hung in a collective here.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import load_config  # noqa: E402
from pretrain.memory_measure import measure_engine  # noqa: E402
from pretrain.parallel.distributed import destroy_distributed, init_distributed  # noqa: E402
from pretrain.parallel.plan import ParallelPlan  # noqa: E402


def main() -> int:
    out, config_path, layouts, *common = sys.argv[1:]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    results = []
    for layout in layouts.split(";"):
        overrides = [*common, *[o for o in layout.split(",") if o]]
        config = load_config(config_path, overrides)
        plan = ParallelPlan.build(config, world, rank)
        ctx = init_distributed(plan, seed=1234)
        try:
            measured = measure_engine(config, plan, ctx.groups)
            results.append({"overrides": overrides, "rank": rank, **dataclasses.asdict(measured)})
        finally:
            destroy_distributed()
    Path(f"{out}.{rank}").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
