"""Pipeline parallelism: megatron-core's 1F1B schedule driving one DeepSpeed engine per stage.

Design (see also mesh_model/unrolled.py):
- Each pipeline rank builds the model for its share of the unrolled program.
  A recursive model's core layers can land on several stages (one loop on
  stage 1, the next on stage 2): those are replicas of the same weights.
- megatron-core's schedule owns forward and backward over the micro-batches
  (it divides each micro-batch loss by their number); the DeepSpeed engine only
  steps: it runs with gradient_accumulation_steps=1 and
  `managed_gradient_accumulation: false`, so gradients stay local until
  `engine.step()`, which all-reduces them over data parallel and applies AdamW.
- Before that step, each replicated core layer's gradients are summed over the
  stages that hold it (the same treatment megatron gives an embedding tied
  between the first and last stage), so the replicas stay identical; a test
  checks that they do. For the gradient norm (clipping), every replica but the
  one on the first stage holding it is marked `ds_pipe_replicated`, so
  DeepSpeed counts each weight once.
- Stages exchange the packed RecurrentState: its width differs per boundary, so
  the schedule's tensor shapes are set per stage through `adjust_tensor_shapes_fn`.

Supported: ZeRO-1 (DeepSpeed's own pipeline engine also refuses ZeRO-2/3;
ZeRO-0 with PP is untested, so refused). The non-interleaved 1F1B schedule only;
`check_virtual_pipeline` refuses interleaving and says why.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mesh_model.config import ConfigError
from mesh_model.model import MeshLanguageModel
from mesh_model.unrolled import partition, unrolled_ops


def check_pipeline_config(zero_stage: int, pipeline: int, untie_embeddings: bool) -> None:
    if pipeline <= 1:
        return
    if zero_stage != 1:
        raise ConfigError(
            f"parallel.pipeline={pipeline} needs parallel.zero_stage=1 (got {zero_stage}): DeepSpeed "
            "does not partition gradients across pipeline stages (ZeRO-2/3), and ZeRO-0 with a "
            "pipeline is untested"
        )
    if not untie_embeddings:
        raise ConfigError("model.untie_embeddings=false is not supported with parallel.pipeline > 1")


INTERLEAVED_UNSUPPORTED = (
    "megatron-core's interleaved schedule sends one fixed [s, b, hidden] tensor between all model chunks "
    "(it refuses adjust_tensor_shapes_fn), but a recursive model's stages exchange its packed recurrence "
    "state, whose width changes from cut to cut (hidden, plus h_emb, h(t) and the B MeSH slots while they "
    "are live); and with several chunks per rank one core layer can land twice on the same rank"
)


def check_virtual_pipeline(virtual_pipeline: int) -> None:
    """Interleaved (virtual) pipeline stages are refused with the reason.

    What interleaving would take here: (1) one shape for every boundary, by padding
    the packed state to the widest cut (up to B + 2 times the p2p volume where only
    the hidden state is live) or by megatron's `variable_seq_lengths` shape exchange
    before every message; (2) several model chunks per rank behind one DeepSpeed
    engine; (3) replicated core layers tracked per (rank, chunk), sharing one weight
    when two chunks of a rank hold the same layer (1+2R2+1 on PP=2 x 3 chunks puts
    core.0 of both loops on rank 1), in ReplicatedCoreGrads and the norm counting.
    """
    if virtual_pipeline != 1:
        raise ConfigError(
            f"parallel.virtual_pipeline={virtual_pipeline}: interleaved pipeline stages are not supported: "
            + INTERLEAVED_UNSUPPORTED
        )


class ScheduleModel(torch.nn.Module):
    """What megatron's schedule is handed: the engine, plus the megatron config.

    megatron's `get_model_config` would otherwise find DeepSpeed's own `config`
    dict on the engine; `set_input_tensor` is found through `.module`.
    """

    def __init__(self, engine, config):
        super().__init__()
        self.module = engine
        self.config = config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class ReplicatedCoreGrads:
    """Sums each replicated core layer's gradients over the stages that hold it."""

    def __init__(self, model: MeshLanguageModel, pipeline_size: int, layout):
        program = unrolled_ops(model.model_config.split)
        stages = partition(program, pipeline_size, layout)
        holders: dict[int, set[int]] = defaultdict(set)  # core index -> stages holding it
        for stage, ops in enumerate(stages):
            for i in ops:
                if program[i].kind == "layer" and program[i].block == "core":
                    holders[program[i].index].add(stage)
        stage_sets = sorted({tuple(sorted(s)) for s in holders.values() if len(s) > 1})

        # Every rank must create every group, in the same order: enumerate all
        # pipeline groups (one per TP x DP coordinate) from every rank's view.
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        mine = dist.get_process_group_ranks(pp_group)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for pipeline_ranks in sorted({tuple(r) for r in everyone}):
            for stage_set in stage_sets:
                ranks = [pipeline_ranks[s] for s in stage_set]
                group = dist.new_group(ranks)
                if tuple(pipeline_ranks) == tuple(mine):
                    groups[stage_set] = group

        my_stage = parallel_state.get_pipeline_model_parallel_rank()
        self.synced: list[tuple[torch.nn.Parameter, dist.ProcessGroup]] = []
        for index, layer in model.core.layers.items():
            stage_set = tuple(sorted(holders[int(index)]))
            if len(stage_set) < 2:
                continue
            for param in layer.parameters():
                self.synced.append((param, groups[stage_set]))
                # Count the weight once in the gradient norm: on its first holder.
                param.ds_pipe_replicated = my_stage != stage_set[0]

    def all_reduce(self) -> None:
        for param, group in self.synced:
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)


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
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    loss_from_batch: Callable,
    forward_only: bool,
) -> torch.Tensor:
    """Forward (and backward) over the micro-batches; the mean loss, on every stage."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp not in (None, 1):  # megatron's parallel state set up for interleaving elsewhere
        raise RuntimeError(f"virtual pipeline size {vpp}: interleaved pipeline stages are not supported: "
                           + INTERLEAVED_UNSUPPORTED)
    recv_width, send_width = stage_model.packed_width("recv"), stage_model.packed_width("send")

    def adjust_shapes(recv_shapes, send_shapes):
        return ([(s, b, recv_width) for s, b, _ in recv_shapes], [(s, b, send_width) for s, b, _ in send_shapes])

    losses = get_forward_backward_func()(
        forward_step_func=make_forward_step(loss_from_batch),
        data_iterator=batches,
        model=[schedule_model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_shapes,
    )
    device = next(stage_model.parameters()).device
    mean = torch.zeros((), device=device, dtype=torch.float32)
    if parallel_state.is_pipeline_last_stage():
        mean = torch.stack([entry["loss"].float() for entry in losses]).mean()
    # The loss exists on the last stage only: share it with the whole pipeline.
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(mean, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return mean
