"""Pipeline parallelism: megatron-core's 1F1B schedule driving one DeepSpeed engine per stage.

Design (see also mesh_model/unrolled.py):
- Each pipeline rank builds the model for its share of the unrolled program
  (the plan's `cut`). A recursive model's core layers can land on several
  stages (one loop on stage 1, the next on stage 2): those are replicas of the
  same weights.
- megatron-core's schedule owns forward and backward over the micro-batches
  (it divides each micro-batch loss by their number); the DeepSpeed engine only
  steps: it runs with gradient_accumulation_steps=1 and
  `managed_gradient_accumulation: false`, so gradients stay local until
  `engine.step()`, which all-reduces them over data parallel and applies AdamW.
- Before that step, each replicated core layer's gradients are summed over the
  stages that hold it (the same treatment megatron gives an embedding tied
  between the first and last stage), so the replicas stay identical; a test
  checks that they do. For the gradient norm (clipping), every replica but the
  one on the first stage holding it is marked a pipeline replica, so DeepSpeed
  counts each weight once.
- Stages exchange the packed RecurrentState: its width differs per boundary, so
  the schedule's tensor shapes are set per stage through `adjust_tensor_shapes_fn`.

Supported: ZeRO-1 (DeepSpeed's own pipeline engine also refuses ZeRO-2/3;
ZeRO-0 with PP is untested, so refused), the non-interleaved 1F1B schedule only
(pretrain/parallel/plan.py refuses the others at start-up, and says why).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from mesh_model.model import MeshLanguageModel
from pretrain.compat import ScheduleModel, mark_pipeline_replica
from pretrain.parallel.distributed import ProcessGroups
from pretrain.parallel.plan import ParallelPlan


class ReplicatedCoreGrads:
    """Sums each replicated core layer's gradients over the stages that hold it."""

    def __init__(self, model: MeshLanguageModel, plan: ParallelPlan):
        holders = plan.cut.core_holders()
        # Every rank must create every group, in the same order: one per set of stages
        # sharing a layer, in every pipeline (one pipeline per TP x DP coordinate).
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for pipeline_ranks in pipelines(plan):
            for stage_set in plan.cut.replicated_stage_sets():
                group = dist.new_group([pipeline_ranks[s] for s in stage_set])
                if plan.rank in pipeline_ranks:
                    groups[stage_set] = group

        self.synced: list[tuple[torch.nn.Parameter, dist.ProcessGroup]] = []
        for index, layer in model.core.layers.items():
            stage_set = holders[int(index)]
            if len(stage_set) < 2:
                continue
            for param in layer.parameters():
                self.synced.append((param, groups[stage_set]))
                # Count the weight once in the gradient norm: on its first holder.
                mark_pipeline_replica(param, counted_here=plan.pp_rank == stage_set[0])

    def all_reduce(self) -> None:
        for param, group in self.synced:
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)


def pipelines(plan: ParallelPlan) -> list[tuple[int, ...]]:
    """Global ranks of every pipeline (stage 0 first), in megatron's rank order."""
    t, d = plan.tensor, plan.data
    return sorted(tuple(tp + t * (dp + d * stage) for stage in range(plan.pipeline))
                  for tp in range(t) for dp in range(d))


def make_forward_step(loss_from_batch: Callable):
    """The schedule's forward_step_func: (data_iterator, model) -> (output, loss_func)."""

    def forward_step(data_iterator: Iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])

        def loss_func(per_token: torch.Tensor):
            loss = loss_from_batch(per_token, batch)
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return output, loss_func

    return forward_step


def run_schedule(
    schedule_model: ScheduleModel,
    stage_model: MeshLanguageModel,
    batches: Iterator,
    *,
    plan: ParallelPlan,
    groups: ProcessGroups,
    num_microbatches: int,
    seq_length: int,
    loss_from_batch: Callable,
    forward_only: bool,
) -> torch.Tensor:
    """Forward (and backward) over the micro-batches; the mean loss, on every stage."""
    recv_width, send_width = stage_model.packed_width("recv"), stage_model.packed_width("send")

    def adjust_shapes(recv_shapes, send_shapes):
        return ([(s, b, recv_width) for s, b, _ in recv_shapes], [(s, b, send_width) for s, b, _ in send_shapes])

    losses = get_forward_backward_func()(
        forward_step_func=make_forward_step(loss_from_batch),
        data_iterator=batches,
        model=[schedule_model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=plan.micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_shapes,
    )
    device = next(stage_model.parameters()).device
    mean = torch.zeros((), device=device, dtype=torch.float32)
    if plan.is_last_stage:
        mean = torch.stack([entry["loss"].float() for entry in losses]).mean()
    # The loss exists on the last stage only: share it with the whole pipeline.
    dist.broadcast(mean, src=groups.pipeline_last_rank, group=groups.pipeline)
    return mean
