"""The parallel plan: how one run is laid out over its processes, built and validated once.

    plan = ParallelPlan.build(config, world_size=4, rank=1)
    plan.tensor, plan.pipeline, plan.data            # 2 x 1 x 2
    plan.tp_rank, plan.pp_rank, plan.dp_rank         # this rank's coordinates
    plan.grad_accum                                  # micro-batches per optimizer step and DP rank
    plan.cut.stage_ops(plan.pp_rank)                 # this stage's share of the unrolled program

It is made from the run config and the world size before any process group,
model or data exists, so a layout that cannot work fails in the launcher with
one line. Every start-up rule that involves more than one config section lives
here (rules of a single section stay in that section's dataclass in
pretrain/config.py); nothing else re-checks them. The model builder, the
pipeline schedule, the engine and checkpoint save/load read the layout from
the plan only.

Coordinates follow megatron-core's rank order ("tp-cp-ep-dp-pp", context and
expert parallel of size 1): rank = tp_rank + TP * (dp_rank + DP * pp_rank);
pretrain/parallel/distributed.py checks them against megatron's groups once,
right after it creates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mesh_model.config import ConfigError
from mesh_model.model import ModelParallelism
from mesh_model.unrolled import PipelineCut

if TYPE_CHECKING:
    from pretrain.config import RunConfig

INTERLEAVED_UNSUPPORTED = (
    "megatron-core's interleaved schedule sends one fixed [s, b, hidden] tensor between all model chunks "
    "(it refuses adjust_tensor_shapes_fn), but a recursive model's stages exchange its packed recurrence "
    "state, whose width changes from cut to cut (hidden, plus h_emb, h(t) and the B MeSH slots while they "
    "are live); and with several chunks per rank one core layer can land twice on the same rank"
)
"""Why parallel.virtual_pipeline > 1 is refused. What interleaving would take: (1) one shape
for every boundary, by padding the packed state to the widest cut (up to B + 2 times the p2p
volume where only the hidden state is live) or by megatron's `variable_seq_lengths` shape
exchange before every message; (2) several model chunks per rank behind one DeepSpeed engine;
(3) replicated core layers tracked per (rank, chunk), sharing one weight when two chunks of a
rank hold the same layer (1+2R2+1 on PP=2 x 3 chunks puts core.0 of both loops on rank 1)."""


@dataclass(frozen=True)
class ParallelPlan:
    world_size: int
    rank: int
    tensor: int
    pipeline: int
    data: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    zero_stage: int
    micro_batch_size: int
    """Sequences per forward/backward on one DP rank."""
    global_batch_size: int
    grad_accum: int
    """Micro-batches per optimizer step on one DP rank."""
    sequence_parallel: bool
    device_type: str
    """"cuda" or "cpu" (train.device=auto resolved on this machine)."""
    cut: PipelineCut
    """The unrolled program cut into `pipeline` stages, and what each boundary carries."""

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, config: "RunConfig", world_size: int, rank: int = 0) -> "ParallelPlan":
        """The plan of `config` at `world_size` processes, seen from `rank`.

        Raises ConfigError (one line naming the fields) for any layout that cannot work.
        """
        par, train, model = config.parallel, config.train, config.model
        data = data_parallel_size(world_size, par.tensor, par.pipeline)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside the world of {world_size} processes")
        grad_accum = gradient_accumulation_steps(train.global_batch_size, train.micro_batch_size, data)
        _check_pipeline(par.pipeline, par.zero_stage, par.virtual_pipeline, model.untie_embeddings)
        _check_tensor_parallel(par.tensor, model)
        _check_sequence_parallel(par.sequence_parallel, par.tensor, model.seq_length)
        cut = PipelineCut.of(model, par.pipeline, par.pipeline_layout or None)
        tp_rank, dp_rank, pp_rank = rank % par.tensor, rank // par.tensor % data, rank // (par.tensor * data)
        return cls(
            world_size=world_size, rank=rank, tensor=par.tensor, pipeline=par.pipeline, data=data,
            tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank, zero_stage=par.zero_stage,
            micro_batch_size=train.micro_batch_size, global_batch_size=train.global_batch_size,
            grad_accum=grad_accum, sequence_parallel=par.sequence_parallel,
            device_type=_device_type(train.device), cut=cut,
        )

    def for_rank(self, rank: int) -> "ParallelPlan":
        """The same plan seen from another rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} processes")
        t, d = self.tensor, self.data
        return dataclasses.replace(self, rank=rank, tp_rank=rank % t, dp_rank=rank // t % d, pp_rank=rank // (t * d))

    # ------------------------------------------------------------------ views
    @property
    def pipelined(self) -> bool:
        return self.pipeline > 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline - 1

    @property
    def model_parallelism(self) -> ModelParallelism:
        """What the model builder needs: TP degree, this stage of the cut, sequence parallel."""
        return ModelParallelism(tensor=self.tensor, pipeline_rank=self.pp_rank, cut=self.cut,
                                sequence_parallel=self.sequence_parallel)

    @property
    def engine_accumulation(self) -> int:
        """Micro-batches the DeepSpeed engine accumulates itself: with a pipeline the
        schedule runs them, and the engine only steps."""
        return 1 if self.pipelined else self.grad_accum

    def sizes(self) -> dict:
        """The layout as a checkpoint records it."""
        return {"tensor": self.tensor, "pipeline": self.pipeline, "data": self.data, "zero_stage": self.zero_stage}

    def describe(self) -> str:
        return (f"world {self.world_size} = TP {self.tensor} x PP {self.pipeline} x DP {self.data}, "
                f"ZeRO {self.zero_stage}, grad accumulation {self.grad_accum}"
                + (", sequence parallel" if self.sequence_parallel else ""))


# ---------------------------------------------------------------------- rules
def data_parallel_size(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> int:
    """The data-parallel size of a layout; ConfigError (a ValueError, one line) if it does not divide."""
    for name, value in (("parallel.tensor", tensor_parallel), ("parallel.pipeline", pipeline_parallel),
                        ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    model_parallel = tensor_parallel * pipeline_parallel
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor ({tensor_parallel}) x "
            f"parallel.pipeline ({pipeline_parallel}) = {model_parallel}; launch a multiple of "
            f"{model_parallel} processes"
        )
    return world_size // model_parallel


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}"
        )
    return global_batch_size // per_step


def _check_pipeline(pipeline: int, zero_stage: int, virtual_pipeline: int, untie_embeddings: bool) -> None:
    if pipeline > 1 and zero_stage != 1:
        raise ConfigError(
            f"parallel.pipeline={pipeline} needs parallel.zero_stage=1 (got {zero_stage}): DeepSpeed "
            "does not partition gradients across pipeline stages (ZeRO-2/3), and ZeRO-0 with a "
            "pipeline is untested"
        )
    if pipeline > 1 and not untie_embeddings:
        raise ConfigError("model.untie_embeddings=false is not supported with parallel.pipeline > 1")
    if virtual_pipeline != 1:
        raise ConfigError(
            f"parallel.virtual_pipeline={virtual_pipeline}: interleaved pipeline stages are not supported: "
            + INTERLEAVED_UNSUPPORTED
        )


def _check_tensor_parallel(tp: int, model) -> None:
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide model.num_attention_heads={model.num_attention_heads}"
        )
    if model.padded_vocab_size % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide the padded vocabulary {model.padded_vocab_size} "
            f"(model.vocab_size={model.vocab_size} padded to a multiple of "
            f"model.make_vocab_size_divisible_by={model.make_vocab_size_divisible_by}); make that a multiple of {tp}"
        )
    if model.ffn_size % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide the FFN width {model.ffn_size}")


def _check_sequence_parallel(enabled: bool, tensor: int, seq_length: int) -> None:
    if not enabled:
        return
    if tensor < 2:
        raise ConfigError(
            "parallel.sequence_parallel=true needs parallel.tensor >= 2 (it splits the sequence over "
            "the tensor-parallel ranks)"
        )
    if seq_length % tensor:
        raise ConfigError(
            f"parallel.sequence_parallel=true needs model.seq_length={seq_length} to be a multiple of "
            f"parallel.tensor={tensor}"
        )


def _device_type(device: str) -> str:
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError("train.device='cuda' but no GPU is visible; use train.device=cpu or auto")
    if device == "cpu" and cuda:
        # megatron-core allocates on torch.cuda.current_device() regardless of the
        # model's device; mixing would fail deep inside a forward pass.
        raise ConfigError(
            "train.device='cpu' on a machine with a GPU is not supported; hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to train on the CPU"
        )
    return "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
