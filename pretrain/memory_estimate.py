"""Per-GPU memory of a run before it starts: model state, activations, and whether it fits.

    estimate = estimate_memory(config, world_size=32)
    estimate.total_bytes, estimate.fits(80e9)
    print(estimate.describe())

The layout (TP x PP x DP, the pipeline cut, micro-batches per step) comes from
`ParallelPlan.build`; every pipeline stage is estimated and the worst one is reported.

Model state, per GPU, for the P parameters of its stage and tensor rank (p = 2 bytes with
train.bf16, else 4; DP the data-parallel size; DeepSpeed 0.19.8's ZeRO optimizer):

| ZeRO | parameters | gradients  | optimizer (fp32 master + Adam m, v) | buffers            |
|------|------------|------------|-------------------------------------|--------------------|
| 0    | p P        | p P        | 8 P (torch AdamW state)             |                    |
| 1    | p P        | p P        | 12 P / DP                           |                    |
| 2    | p P        | p P / DP   | 12 P / DP                           |                    |
| 3    | p P / DP   | p P / DP   | 12 P / DP                           | p x bucket         |

(measured on the real engine after a backward pass, when gradients and Adam moments are both
live). The bucket is DeepSpeed's gradient-reduction bucket, min(5e8, P) elements
(pretrain/engine.reduce_bucket_elements sets reduce_bucket_size so). On top, transient: the
step's fp32 gradient partition (4 P / DP) with that bucket (ZeRO 0-2 stage gradients in it
during backward), or for ZeRO-3 the parameters gathered for the layer being computed.

Activations: the bytes autograd saves for backward in one micro-batch's forward pass, counted
op by op from what this implementation saves (pretrain/memory_measure.py measures it;
tests/unit/pretrain/test_memory_estimate.py checks the two agree within 10%). Per token, with
h the hidden size, f the FFN width, t = TP, a the heads, p the activation bytes:

- a GPT-NeoX layer: its input, the two LayerNorm outputs (3 h, replicated over TP unless
  sequence parallel), the QKV output (3 h / t), rotated q and k (2 h / t), the attention output
  (h / t), fc1's output and GeLU's (2 f / t): p (3 h + (6 h + 2 f) / t); plus fp32 LayerNorm
  statistics (16 bytes) and the attention's log-sum-exp (4 a / t bytes);
- a recomputed layer (model.recompute): only its input, p h (its activations are rebuilt, one
  layer at a time, during backward: the transient row);
- MeSH, per router step (N_loop + 1 of them): the new buffer (B h) and the written value (h),
  and the two routers' softmax outputs (B each, fp32 and in p);
- the head: the final LayerNorm's input and output (2 h), the fp32 softmax of the cross entropy
  (4 V / t bytes, V the padded vocabulary), the targets (9 bytes); the embedding: the token ids;
- a learned combination: f_core's output, which the coefficient multiplies (h per loop), and for
  the dynamic one its 3 fp32 coefficients per token.

With the 1F1B schedule stage k holds up to min(PP - k, micro-batches per step) micro-batches
in flight (the first stage the most), each with the tensor it received and the one it sent.
A fixed reserve covers the CUDA context, NCCL and the allocator's fragmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mesh_model.config import ModelConfig
from pretrain.engine import reduce_bucket_elements

if TYPE_CHECKING:
    from pretrain.config import RunConfig

GIB = 2**30
RESERVE_BYTES = 2 * GIB
"""CUDA context (~0.5-1 GiB), NCCL buffers and caching-allocator fragmentation."""
ZERO3_PREFETCH_ELEMENTS = 50_000_000
"""DeepSpeed's default stage3_prefetch_bucket_size."""


@dataclass(frozen=True)
class StageMemory:
    stage: int
    parameters: int
    """Parameters held by one GPU of this stage (its tensor-parallel shard)."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    """DeepSpeed's persistent flat buffers (ZeRO-3's reduction bucket)."""
    activation_bytes_per_microbatch: int
    """With the config's model.recompute."""
    activation_bytes_no_recompute: int
    activation_bytes_full_recompute: int
    """Every layer recomputed (model.recompute: [prelude, core, coda])."""
    in_flight: int
    """Micro-batches whose activations this stage holds at once (1F1B)."""
    transient_bytes: int
    """The largest short-lived buffer on top: one layer rebuilt in backward, the logits' gradient,
    or the optimizer step's fp32 gradient partition with the reduction bucket (whichever is largest)."""
    layers: int

    @property
    def model_state_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.buffer_bytes

    @property
    def activation_bytes(self) -> int:
        return self.activation_bytes_per_microbatch * self.in_flight

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activation_bytes + self.transient_bytes + RESERVE_BYTES


@dataclass(frozen=True)
class MemoryEstimate:
    layout: str
    micro_batch_size: int
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: (s.total_bytes, -s.stage))

    @property
    def total_bytes(self) -> int:
        """Per-GPU bytes of the most loaded pipeline stage."""
        return self.worst.total_bytes

    def fits(self, gpu_bytes: float) -> bool:
        return self.total_bytes <= gpu_bytes

    def describe(self) -> str:
        w = self.worst
        gib = lambda n: f"{n / GIB:9.2f} GiB"  # noqa: E731
        rows = [
            (f"memory per GPU ({self.layout}; worst stage {w.stage} of {len(self.stages)}, {w.layers} layers, "
             f"{w.parameters:,} parameters)", ""),
            ("parameters", gib(w.parameter_bytes)),
            ("gradients", gib(w.gradient_bytes)),
            ("optimizer (fp32 master + Adam moments)", gib(w.optimizer_bytes)),
            ("DeepSpeed buffers (ZeRO-3 reduction bucket)", gib(w.buffer_bytes)),
            (f"activations: {w.in_flight} micro-batch(es) of {self.micro_batch_size} in flight", gib(w.activation_bytes)),
            ("  per micro-batch, with the config's recompute", gib(w.activation_bytes_per_microbatch)),
            ("  per micro-batch, no recompute", gib(w.activation_bytes_no_recompute)),
            ("  per micro-batch, every layer recomputed", gib(w.activation_bytes_full_recompute)),
            ("transient (largest of: a layer rebuilt, logits gradient, optimizer step)", gib(w.transient_bytes)),
            ("reserve (CUDA context, NCCL, fragmentation)", gib(RESERVE_BYTES)),
            ("total", gib(w.total_bytes)),
        ]
        width = max(len(k) for k, _ in rows[1:])
        lines = [rows[0][0]] + [f"  {k:<{width}}  {v}" for k, v in rows[1:]]
        if len(self.stages) > 1:
            lines.append("  per stage (total): " + ", ".join(f"{s.stage}: {s.total_bytes / GIB:.2f} GiB"
                                                         for s in self.stages))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- parameters


def layer_parameters(model: ModelConfig, tensor: int) -> int:
    """One GPT-NeoX layer's parameters on one TP rank: QKV and fc1 (weights and biases) and the
    output projections' weights are split over TP; their biases and the LayerNorms are not."""
    h, f = model.hidden_size, model.ffn_size
    split = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h
    return split // tensor + h + h + 4 * h


def stage_parameters(model: ModelConfig, ops, tensor: int, first: bool, last: bool) -> int:
    """Parameters of one pipeline stage on one TP rank: its distinct layers (a shared core layer
    run by two loops of this stage is one module), routers or coefficients of its events, the
    embedding (first stage) and final norm + head (last stage)."""
    h = model.hidden_size
    layers = {(op.block, op.index) for op in ops if op.kind == "layer"}
    total = len(layers) * layer_parameters(model, tensor)
    steps = [0 for op in ops if op.kind == "begin"] + [op.loop + 1 for op in ops if op.kind == "loop_end"]
    loop_ends = [op for op in ops if op.kind == "loop_end"]
    if model.variant == "mesh":
        slots = model.buffer_slots
        total += len(steps) * 2 * (h * slots + slots)
    elif model.variant == "static_combination":
        total += 3 * len(loop_ends)
    elif model.variant == "dynamic_combination":
        total += 3 * (h + 1) * len(loop_ends)
    vocab = model.padded_vocab_size
    if first:
        total += vocab * h // tensor
    if last:
        total += 2 * h + (vocab * h // tensor if model.untie_embeddings or not first else 0)
    return total


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Shape:
    tokens: int  # s x b of one micro-batch
    h: int
    f: int
    heads: int
    vocab: int
    tensor: int
    sequence_parallel: bool
    p: int  # activation bytes


def _layer_bytes(x: _Shape) -> int:
    replicated = 3 * x.h if not x.sequence_parallel else 3 * x.h // x.tensor
    split = (6 * x.h + 2 * x.f) // x.tensor
    per_token = x.p * (replicated + split) + 16 + 4 * x.heads // x.tensor
    return x.tokens * per_token


def _recomputed_layer_bytes(x: _Shape) -> int:
    width = x.h // x.tensor if x.sequence_parallel else x.h
    return x.tokens * x.p * width


def _residual_width(x: _Shape) -> int:
    """Elements per token of one [s, b, h] tensor of the residual stream on this TP rank."""
    return x.h // x.tensor if x.sequence_parallel else x.h


def stage_activation_bytes(model: ModelConfig, ops, x: _Shape, first: bool, last: bool,
                           recompute: list[str]) -> int:
    """Saved-for-backward bytes of one micro-batch's forward pass through a stage."""
    recomputes = lambda op: op.block in recompute or (op.loop is not None and f"{op.block}@{op.loop}" in recompute)  # noqa: E731
    total = 0
    for op in ops:
        if op.kind == "layer":
            total += _recomputed_layer_bytes(x) if recomputes(op) else _layer_bytes(x)
    width = _residual_width(x)
    steps = [op for op in ops if op.kind in ("begin", "loop_end")]
    loop_ends = [op for op in ops if op.kind == "loop_end"]
    if model.variant == "mesh":
        slots = model.buffer_slots
        total += len(steps) * x.tokens * (x.p * (slots + 1) * width + 2 * slots * (4 + (x.p if x.p != 4 else 0)))
    elif model.variant in ("static_combination", "dynamic_combination"):
        # a1 f_core(h(t)) keeps f_core's output; h0 and h_emb are saved once, as layer inputs anyway;
        # the dynamic coefficients are 3 fp32 numbers per token.
        extra = 3 * 4 if model.variant == "dynamic_combination" else 0
        total += len(loop_ends) * x.tokens * (x.p * width + extra)
    if first:
        total += x.tokens * 8  # the token ids
    if last:
        total += x.tokens * (2 * x.p * width + 4 * x.vocab // x.tensor + 9 + 8)
    return total


def _boundary_width(model: ModelConfig, names: list[str]) -> int:
    """Elements per token (x h) of the packed state a stage sends or receives."""
    slots = model.buffer_slots or 0
    return 1 + sum(slots if n == "buffer" else 1 for n in names)


# ----------------------------------------------------------------------------- the estimate


def _model_state(parameters: int, zero: int, data: int, p: int) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer state, DeepSpeed's persistent buffers) in bytes.
    Measured on DeepSpeed 0.19.8 after a backward pass (the peak of model state: gradients
    and Adam moments both live), tests/unit/pretrain/test_memory_estimate.py."""
    partition = -(-parameters // data)  # ceil
    if zero == 0:
        return p * parameters, p * parameters, 8 * parameters, 0
    if zero == 1:
        return p * parameters, p * parameters, 12 * partition, 0
    if zero == 2:
        return p * parameters, p * partition, 12 * partition, 0
    # ZeRO-3 allocates its gradient-reduction bucket (reduce_bucket_size elements) up front.
    return p * partition, p * partition, 12 * partition, p * reduce_bucket_elements(parameters)


def estimate_memory(config: "RunConfig", world_size: int) -> MemoryEstimate:
    """The per-GPU estimate of `config` on `world_size` processes (ConfigError if the layout
    cannot work, as `ParallelPlan.build` says)."""
    from pretrain.parallel.plan import ParallelPlan

    # The plan's layout rules only; the device of this machine does not matter here.
    probe = dataclasses.replace(config, train=dataclasses.replace(config.train, device="auto"))
    plan = ParallelPlan.build(probe, world_size)
    model = config.model
    p = 2 if config.train.bf16 else 4
    shape = _Shape(tokens=plan.micro_batch_size * model.seq_length, h=model.hidden_size, f=model.ffn_size,
                   heads=model.num_attention_heads, vocab=model.padded_vocab_size, tensor=plan.tensor,
                   sequence_parallel=plan.sequence_parallel, p=p)
    everything = ["prelude", "core", "coda"]
    stages = []
    cut = plan.cut
    for k in range(cut.num_stages):
        ops = cut.stage_ops(k)
        first, last = k == 0, k == cut.num_stages - 1
        parameters = stage_parameters(model, ops, plan.tensor, first, last)
        param_b, grad_b, optim_b, buffers_b = _model_state(parameters, plan.zero_stage, plan.data, p)
        boundary = 0
        if not first:
            # What arrives is kept whole for backward; the first layer's input is a view of it.
            boundary += _boundary_width(model, cut.recv_fields(k)) - (ops[0].kind == "layer")
        if not last:
            boundary += _boundary_width(model, cut.send_fields(k))
        boundary_bytes = shape.tokens * p * _residual_width(shape) * boundary
        acts = {key: stage_activation_bytes(model, ops, shape, first, last, recompute) + boundary_bytes
                for key, recompute in (("config", model.recompute), ("none", []), ("all", everything))}
        layers = sum(op.kind == "layer" for op in ops)
        # The optimizer step's fp32 gradient partition and the reduction bucket (ZeRO 0-2), or
        # the parameters ZeRO-3 gathers for the layer being computed (its bucket is in buffers).
        partition = -(-parameters // plan.data)
        if plan.zero_stage == 3:
            step = 4 * partition + p * min(parameters, layer_parameters(model, plan.tensor) + ZERO3_PREFETCH_ELEMENTS)
        else:
            step = (4 * partition if plan.zero_stage else 0) + p * reduce_bucket_elements(parameters)
        rebuilt = _layer_bytes(shape) if any(model.recomputes(op.block, op.loop) for op in ops if op.kind == "layer") else 0
        logits_grad = shape.tokens * 4 * shape.vocab // shape.tensor if last else 0
        stages.append(StageMemory(
            stage=k, parameters=parameters, parameter_bytes=param_b, gradient_bytes=grad_b, optimizer_bytes=optim_b,
            activation_bytes_per_microbatch=acts["config"], activation_bytes_no_recompute=acts["none"],
            activation_bytes_full_recompute=acts["all"], in_flight=min(cut.num_stages - k, plan.grad_accum),
            buffer_bytes=buffers_b, transient_bytes=max(rebuilt, logits_grad, step), layers=layers,
        ))
    layout = (f"TP {plan.tensor} x PP {plan.pipeline} x DP {plan.data}, ZeRO {plan.zero_stage}, "
              f"{'bf16' if config.train.bf16 else 'fp32'}" + (", sequence parallel" if plan.sequence_parallel else ""))
    return MemoryEstimate(layout=layout, micro_batch_size=plan.micro_batch_size, stages=stages)
