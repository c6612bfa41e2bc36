"""The memory estimate (pretrain/memory_estimate.py) against what the real code holds.

    python bench/memory_estimate.py            # CPU: tiny configs x two layouts, a markdown table
    python bench/memory_estimate.py --gpu      # CUDA: Pythia-160M and 410M MeSH, max_memory_allocated

CPU table (no timing, so any machine will do): for each small config (vanilla, base and mesh,
and mesh with the core recomputed) at two layouts (one stage; two pipeline stages, every stage
measured), the estimated and measured

- activations: bytes saved for backward in one micro-batch's forward pass, counted by unique
  storage through torch.autograd.graph.saved_tensors_hooks (pretrain/memory_measure.py), plus
  the tensors a pipeline stage receives and sends; the worst stage;
- model state: parameters + gradients + optimizer state, every live tensor of the real DeepSpeed
  engine after a backward pass (after a first step, so Adam's moments exist), at world size 1
  (model state depends on the layout only through P and DP, which the formula divides by).

GPU (one CUDA device, world size 1): trains two steps of the 160M and 410M MeSH configs with
random tokens (micro-batch 4, seq 2048, bf16, ZeRO-1) and compares torch.cuda.max_memory_allocated
with the estimate's total without the fixed reserve (CUDA context and fragmentation are not
allocations).

Results: bench/results/memory_estimate-<date>.json and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.config import load_config  # noqa: E402
from pretrain.memory_estimate import RESERVE_BYTES, estimate_memory  # noqa: E402
from pretrain.memory_measure import measure_engine, stage_activation_bytes  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
SMALL = ["model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64", "train.micro_batch_size=4",
         "train.global_batch_size=16", "train.device=cpu"]
CONFIGS = {
    "vanilla 6 layers, d=64": ["model.variant=vanilla", "model.layer_split=6"],
    "base 1+2R2+1, d=64": ["model.variant=base"],
    "mesh 1+2R2+1, d=64": ["model.variant=mesh"],
    "mesh 1+2R2+1, d=64, recompute core": ["model.variant=mesh", "model.recompute=[core]"],
    "mesh 1+2R2+1, d=128, bf16": ["model.variant=mesh", "model.hidden_size=128", "train.bf16=true"],
}
LAYOUTS = {"PP 1": ["parallel.pipeline=1"], "PP 2": ["parallel.pipeline=2"]}


def cpu_table() -> list[dict]:
    from mesh_model.params import single_process_model_parallel
    from megatron.core import tensor_parallel
    from pretrain.compat import apply_cpu_shim
    from pretrain.parallel.distributed import destroy_distributed, init_distributed
    from pretrain.parallel.plan import ParallelPlan

    apply_cpu_shim()
    rows = []
    for name, overrides in CONFIGS.items():
        zero = ["parallel.zero_stage=1"]
        for layout, extra in LAYOUTS.items():
            config = load_config(DEMO, SMALL + overrides + zero + extra)
            estimate = estimate_memory(config, config.parallel.pipeline)
            with single_process_model_parallel():
                tensor_parallel.model_parallel_cuda_manual_seed(1234)
                measured = [stage_activation_bytes(config, k) for k in range(config.parallel.pipeline)]
            per_stage = [(s.activation_bytes_per_microbatch, m) for s, m in zip(estimate.stages, measured)]
            worst = max(range(len(per_stage)), key=lambda i: per_stage[i][1])
            rows.append({"config": name, "layout": layout, "quantity": "activations / micro-batch (worst stage)",
                         "estimate": per_stage[worst][0], "measured": per_stage[worst][1]})
        # Model state at world size 1 (ZeRO-1 here; the unit tests cover ZeRO 0 and 3 too).
        config = load_config(DEMO, SMALL + overrides + zero + ["train.micro_batch_size=2", "train.global_batch_size=2"])
        plan = ParallelPlan.build(config, 1)
        ctx = init_distributed(plan, seed=1234)
        try:
            measured_state = measure_engine(config, plan, ctx.groups).model_state
        finally:
            destroy_distributed()
        rows.append({"config": name, "layout": "world 1, ZeRO 1", "quantity": "parameters + gradients + optimizer",
                     "estimate": estimate_memory(config, 1).worst.model_state_bytes, "measured": measured_state})
    return rows


def gpu_table() -> list[dict]:
    from pretrain.parallel.distributed import destroy_distributed, init_distributed
    from pretrain.parallel.plan import ParallelPlan

    rows = []
    for path in ("configs/pythia-160m/mesh.yaml", "configs/pythia-410m/mesh.yaml"):
        config = load_config(REPO / path, ["train.micro_batch_size=4", "train.global_batch_size=4", "train.device=cuda"])
        plan = ParallelPlan.build(config, 1)
        ctx = init_distributed(plan, seed=1234)
        try:
            torch.cuda.reset_peak_memory_stats()
            state = measure_engine(config, plan, ctx.groups).model_state
            peak = torch.cuda.max_memory_allocated()
        finally:
            destroy_distributed()
        estimate = estimate_memory(config, 1)
        rows.append({"config": path, "layout": "world 1, ZeRO 1, bf16, micro-batch 4", "quantity": "peak allocated",
                     "estimate": estimate.total_bytes - RESERVE_BYTES, "measured": peak})
        rows.append({"config": path, "layout": "world 1, ZeRO 1, bf16", "quantity": "parameters + gradients + optimizer",
                     "estimate": estimate.worst.model_state_bytes, "measured": state})
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | layout | quantity | estimate (MiB) | measured (MiB) | estimate / measured |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['layout']} | {r['quantity']} | {r['estimate'] / 2**20:.2f} | "
                     f"{r['measured'] / 2**20:.2f} | {r['estimate'] / r['measured']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the CUDA comparison (160M and 410M, max_memory_allocated)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON result")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device visible", file=sys.stderr)
        return 2
    rows = gpu_table() if args.gpu else cpu_table()
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"bench": "memory_estimate", "mode": "gpu" if args.gpu else "cpu", "date": stamp,
              "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name() if args.gpu else platform.processor() or "cpu", "rows": rows}
    path = out / f"memory_estimate-{'gpu-' if args.gpu else ''}{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
