"""Sequence parallelism (megatron's, a tensor-parallel detail) in the training loop.

With `parallel.sequence_parallel=true` (TP > 1) the residual stream between the
column- and row-parallel linears is split along the sequence: each TP rank holds
s / TP positions for the norms, dropout, residual adds and the MeSH recurrence
(buffer writes and reads, routers). The embedding reduce-scatters into that
layout, the column-parallel linears (QKV, fc1, the output head) all-gather it,
the row-parallel ones (attention output, fc2) reduce-scatter back to it
(mesh_model/model.py, megatron-core's layers).

Parameters applied in the split region are replicated over TP but each rank
only sees its own tokens, so their gradients are partial sums: the LayerNorms,
the row-parallel linears' biases and the MeSH routers. Those carry megatron's
`sequence_parallel = True` attribute (set by megatron's linears and norms, and
by mesh_model for its own norm and the routers). megatron sums them over TP in
its `finalize_model_grads`; this stack steps with DeepSpeed instead, so
:class:`SequenceParallelGrads` does it with a hook on each such parameter: the
hook all-reduces the gradient over the TP group as autograd produces it, before
it is accumulated into `.grad` and before any of DeepSpeed's own gradient hooks
run. That makes it independent of the ZeRO stage, of gradient accumulation and
of the pipeline schedule (the gradient of a sum is the sum of the gradients, so
summing per micro-batch equals summing once per step).

After the hook every TP rank holds the same, full gradient for those
parameters; they are not marked tensor-parallel, so DeepSpeed's gradient norm
(and the ZeRO-0 clipping in pretrain/compat.py) counts them once, on TP rank 0,
like every other TP-replicated parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist



def sequence_parallel_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]


class SequenceParallelGrads:
    """Sums the gradients of `sequence_parallel` parameters over the TP group, in backward."""

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup):
        self.group = group
        params = sequence_parallel_parameters(model)
        self.names = [name for name, _ in params]
        self.handles = [param.register_hook(self._all_reduce) for _, param in params]

    def _all_reduce(self, grad: torch.Tensor) -> torch.Tensor:
        # A copy: autograd may hand the hook a tensor that is also used elsewhere.
        grad = grad.clone()
        dist.all_reduce(grad, group=self.group)
        return grad

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
