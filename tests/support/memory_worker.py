"""Measured memory of each rank at a parallel layout, under torchrun (for test_memory_estimate_dist).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/support/memory_worker.py OUT.json CONFIG \\
        LAYOUT_OVERRIDES [section.field=value ...]

LAYOUT_OVERRIDES: comma-separated overrides of the layout (parallel.tensor=2). The plan at the
world size, the rank's model, the bytes its first forward pass saves for backward
(pretrain/memory_measure.py) and the live bytes of the real DeepSpeed engine after the second
backward pass (after a first step). Rank r writes OUT.json.r: [{"overrides", "rank",
"activations", "model_state"}]. (One layout per launch: a second engine in the same processes
hung in a collective here.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh_model.model import build_model  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engine import build_engine  # noqa: E402
from pretrain.memory_measure import live_tensor_bytes, saved_activations  # noqa: E402
from pretrain.parallel.distributed import destroy_distributed, init_distributed  # noqa: E402
from pretrain.parallel.plan import ParallelPlan  # noqa: E402


def measure(config, plan, ctx) -> dict:
    bf16 = config.train.bf16
    b, s = plan.micro_batch_size, config.model.seq_length
    generator = torch.Generator().manual_seed(plan.dp_rank)
    tokens = torch.randint(0, config.model.vocab_size, (b, s), generator=generator)
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)

    before = live_tensor_bytes()
    model = build_model(config.model, plan.model_parallelism, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    engine, _ = build_engine(model, plan=plan, groups=ctx.groups, optim=config.optim, total_steps=4, bf16=bf16)
    activations = None
    for step in range(2):
        saved = saved_activations(lambda e=engine: e(tokens, positions, None, labels=tokens),
                                  exclude=list(engine.module.parameters()))
        if activations is None:
            activations = saved.bytes
        loss = saved.output.mean()
        del saved
        engine.backward(loss)
        del loss
        if step == 0:
            engine.step()
    state = live_tensor_bytes() - before
    del engine, model
    return {"activations": activations, "model_state": state}


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
            results.append({"overrides": overrides, "rank": rank, **measure(config, plan, ctx)})
        finally:
            destroy_distributed()
    Path(f"{out}.{rank}").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
