"""One training run (or several) under torchrun, for the distributed-equivalence tests.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node N --max-restarts 0 tests/support/dist_worker.py \\
        --config configs/demo.yaml --out OUT.pt [--record-grads] section.field=value ...

Builds the run config (YAML + dotted overrides), trains it with
``pretrain.trainer.Trainer`` exactly as ``mesh train`` does, then gathers the
FULL parameters onto rank 0, which saves (``torch.save``)::

    {"losses": [mean loss of each optimizer step],
     "grad_norms": [DeepSpeed's global grad norm of each logged step (metrics.jsonl;
                    log every step with train.log_interval=1)],
     "params": {name: full fp32 tensor},
     "replica_max_abs_diff": largest difference between copies of one parameter on
                             several ranks (DP replicas, pipeline duplicates): 0.0 expected,
     "layout": {"world", "tp", "pp", "dp", "zero", "bf16", "variant"},
     "train_s": seconds to build the Trainer and train,
     # only with --record-grads:
     "grads": {name: full fp32 gradient of optimizer step 1, before clipping},
     "norm_parts": [{"sharded_sq", "replicated_sq"} per step]}

``--plan PLAN.json`` trains several runs one after the other in the same
processes (a list of ``{"out": PATH, "overrides": [...], "record_grads": bool}``;
the command-line overrides apply to every run, before the run's own). Each
torchrun launch costs 10-20 s of imports on a 2-core machine; a plan pays
them once.

Gathering (layout-invariant by construction: parameter names do not depend on
the layout):
* ZeRO-3: the engine's module parameters are partitioned over data-parallel
  ranks; ``deepspeed.zero.GatheredParameters`` materialises them.
* Tensor parallel: a parameter with megatron's ``tensor_model_parallel=True``
  is a shard; the shards are concatenated along its ``partition_dim`` in
  TP-rank order (column-parallel and vocab-parallel weights: dim 0,
  row-parallel: dim 1). Every other parameter is replicated over TP and must be
  bit-identical on all TP ranks (checked: MeSH routers, norms, row-parallel
  biases).
* Pipeline / data parallel: every rank contributes its names; rank 0 takes the
  union. A name held by several ranks (DP replicas; core layers present on
  several pipeline stages) must agree within ``--replica-atol`` (default 0:
  bit-identical); the largest difference is reported.

Gradients (``--record-grads``, PP=1): a hook on every parameter sums the
gradient autograd produces over the micro-batches of a step (DeepSpeed has
already scaled the loss by 1/grad_accum), before any reduction or clipping;
the sum is averaged over the data-parallel group, which is the gradient of the
global batch. Per step, its squared L2 norm is split into TP-sharded parameters
(summed over TP ranks) and TP-replicated ones (counted once). The gradient of
step 1 is gathered like the parameters.

Test hooks (environment variables, read only by this script; library code is
not touched):
* ``MESH_TEST_FAIL_RANK=r`` with ``MESH_TEST_FAIL_STEP=k``: global rank r
  raises RuntimeError at the start of optimizer step k (1-based; 0 = right
  after setup, before any step).
* ``MESH_TEST_HANG_RANK=r`` with ``MESH_TEST_FAIL_STEP=k``: rank r sleeps
  forever instead; the other ranks then block in a collective until the
  collective timeout (``MESH_DIST_TIMEOUT_S``) ends them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pretrain.hooks import TrainHooks  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--out", help="where rank 0 writes the result (torch.save)")
    parser.add_argument("--plan", help="JSON list of runs [{\"out\": PATH, \"overrides\": [...], "
                        "\"record_grads\": bool}] trained one after the other in this launch")
    parser.add_argument("--record-grads", action="store_true",
                        help="also save the step-1 gradient and the per-step norm split (PP=1)")
    parser.add_argument("--replica-atol", type=float, default=0.0,
                        help="allowed difference between copies of one parameter on several ranks")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.plan is None):
        parser.error("give exactly one of --out and --plan")
    return args


# --------------------------------------------------------------------------- test hooks
def fault_trigger():
    """A callable(step) that raises / hangs on the rank and at the step the environment names."""
    fail_rank = os.environ.get("MESH_TEST_FAIL_RANK")
    hang_rank = os.environ.get("MESH_TEST_HANG_RANK")
    if fail_rank is None and hang_rank is None:
        return lambda step: None
    at_step = int(os.environ.get("MESH_TEST_FAIL_STEP", "1"))
    rank = int(os.environ.get("RANK", "0"))

    def trigger(step: int) -> None:
        if step != at_step:
            return
        if fail_rank is not None and rank == int(fail_rank):
            raise RuntimeError(f"injected failure on rank {rank} at step {step} (MESH_TEST_FAIL_RANK)")
        if hang_rank is not None and rank == int(hang_rank):
            print(f"rank {rank}: injected hang at step {step} (MESH_TEST_HANG_RANK)", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)

    return trigger


# --------------------------------------------------------------------------- gradients
def is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


class GradRecorder:
    """Per optimizer step: the gradient of the global batch, before reduction or clipping."""

    def __init__(self, module: torch.nn.Module):
        self.params = dict(module.named_parameters())
        self.sums: dict[str, torch.Tensor] = {}
        self.norm_parts: list[dict] = []
        self.first_step: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            if param.requires_grad:
                param.register_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(grad):
            g = grad.detach().float()
            self.sums[name] = self.sums[name] + g if name in self.sums else g.clone()
            return grad

        return hook

    def end_step(self) -> None:
        from megatron.core import parallel_state

        dp = parallel_state.get_data_parallel_world_size()
        names = sorted(self.sums)  # the same names on every rank of a DP group
        if dp > 1:
            for name in names:
                dist.all_reduce(self.sums[name], group=parallel_state.get_data_parallel_group())
                self.sums[name] /= dp
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for name in names:
            square = self.sums[name].double().square().sum()
            if is_tp_sharded(self.params[name]):
                sharded += square
            else:
                replicated += square
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
        self.norm_parts.append({"sharded_sq": float(sharded), "replicated_sq": float(replicated)})
        if not self.first_step:
            self.first_step = self.sums
        self.sums = {}


class WorkerHooks(TrainHooks):
    """The test hooks of a run: fault injection by step count, gradient recording."""

    def __init__(self):
        self.trigger = fault_trigger()
        self.steps_here = 0  # steps this process ran (a resumed run starts past step 1)
        self.recorder = None

    def started(self) -> None:
        self.trigger(0)

    def before_step(self, step: int) -> None:
        self.steps_here += 1
        self.trigger(self.steps_here)

    def after_step(self, step: int) -> None:
        if self.recorder is not None:
            self.recorder.end_step()


# --------------------------------------------------------------------------- gathering
def _gather_tp(param, value: torch.Tensor, check_replicas: bool) -> torch.Tensor:
    """The full tensor of one parameter (or its gradient) from this rank's TP group."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return value
    pieces = [torch.empty_like(value) for _ in range(tp)]
    dist.all_gather(pieces, value.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if is_tp_sharded(param):
        return torch.cat(pieces, dim=param.partition_dim)
    if check_replicas:
        for rank, piece in enumerate(pieces[1:], start=1):
            if not torch.equal(piece, pieces[0]):
                diff = (piece - pieces[0]).abs().max().item()
                raise AssertionError(f"a TP-replicated parameter differs between TP ranks 0 and {rank} "
                                     f"(max {diff:.3e})")
    return pieces[0]


def local_full_parameters(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """{name: full fp32 tensor} of the parameters this rank's model holds (collective
    over the DP group at ZeRO-3 and over the TP group)."""
    named = list(engine.module.named_parameters())  # the same order on every rank of a TP group
    if zero_stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    else:
        context = contextlib.nullcontext()
    out = {}
    with context:
        for name, param in named:
            full = _gather_tp(param, param.detach().float().clone(), check_replicas=True)
            out[name] = full.cpu()
    return out


def local_full_grads(recorder: GradRecorder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(recorder.first_step):
        # TP-replicated gradients are computed independently on each TP rank and
        # may differ in round-off; TP rank 0's copy is kept.
        out[name] = _gather_tp(recorder.params[name], recorder.first_step[name], check_replicas=False).cpu()
    return out


def gather_to_rank0(local: dict[str, torch.Tensor], replica_atol: float):
    """Union over all ranks; copies of one name must agree. Returns (params, max diff) on rank 0."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return None, None
    merged: dict[str, torch.Tensor] = {}
    worst = 0.0
    for rank, part in enumerate(gathered):
        for name, value in part.items():
            if name not in merged:
                merged[name] = value
                continue
            if merged[name].shape != value.shape:
                raise AssertionError(f"{name}: shape {tuple(value.shape)} on rank {rank}, "
                                     f"{tuple(merged[name].shape)} elsewhere")
            diff = (merged[name] - value).abs().max().item()
            worst = max(worst, diff)
            if diff > replica_atol:
                raise AssertionError(f"{name}: the copy on rank {rank} differs by {diff:.3e} "
                                     f"(> --replica-atol {replica_atol})")
    return dict(sorted(merged.items())), worst


def read_grad_norms(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]


# --------------------------------------------------------------------------- main
def run_one(config_path: str, overrides: list[str], out: str, record_grads: bool, replica_atol: float) -> None:
    from megatron.core import parallel_state

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    config = load_config(config_path, overrides)
    hooks = WorkerHooks()
    started = time.perf_counter()
    trainer = Trainer(config, hooks)
    try:
        if record_grads:
            if config.parallel.pipeline != 1:
                raise RuntimeError("--record-grads supports PP=1 layouts only")
            hooks.recorder = GradRecorder(trainer.engine.module)
        result = trainer.train()
        train_s = time.perf_counter() - started
        params, replica_diff = gather_to_rank0(
            local_full_parameters(trainer.engine, config.parallel.zero_stage), replica_atol
        )
        grads = norm_parts = None
        if hooks.recorder is not None:
            grads, _ = gather_to_rank0(local_full_grads(hooks.recorder), float("inf"))
            norm_parts = hooks.recorder.norm_parts
        if dist.get_rank() == 0:
            payload = {
                "losses": list(result.train_losses),
                "grad_norms": read_grad_norms(Path(result.run_dir)),
                "params": params,
                "replica_max_abs_diff": replica_diff,
                "grads": grads,
                "norm_parts": norm_parts,
                "train_s": train_s,
                "layout": {
                    "world": dist.get_world_size(),
                    "tp": parallel_state.get_tensor_model_parallel_world_size(),
                    "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                    "dp": parallel_state.get_data_parallel_world_size(),
                    "zero": config.parallel.zero_stage,
                    "bf16": config.train.bf16,
                    "variant": config.model.variant,
                },
            }
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(payload, tmp)
            os.replace(tmp, path)
    finally:
        trainer.close()


def separate_store_namespaces() -> list:
    """Several runs in one torchrun launch: each run gets its own key namespace in
    the launcher's TCP store.

    torchrun's agent hosts one TCPStore for the whole launch and ``env://``
    connects to it. Process-group names restart after ``destroy_process_group``,
    so a second run would read the first run's (stale) gloo addresses from the
    store and fail to connect. torch internals (2.x): the env:// handler gets its
    store from ``torch.distributed.rendezvous._create_c10d_store``; wrapping that
    in a PrefixStore per run keeps the runs apart. Test harness only.
    """
    # (`import torch.distributed.rendezvous as m` would give the function of that name)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    run_index = [0]
    create = rendezvous._create_c10d_store

    def create_prefixed(*args, **kwargs):
        return dist.PrefixStore(f"mesh-test-run-{run_index[0]}/", create(*args, **kwargs))

    rendezvous._create_c10d_store = create_prefixed
    return run_index


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan is None:
        runs = [{"out": args.out}]
    else:
        runs = json.loads(Path(args.plan).read_text())
    run_index = separate_store_namespaces() if len(runs) > 1 else [0]
    for index, run in enumerate(runs):
        run_index[0] = index
        run_one(
            args.config,
            [*args.overrides, *run.get("overrides", [])],
            run["out"],
            bool(run.get("record_grads", args.record_grads)),
            float(run.get("replica_atol", args.replica_atol)),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
