"""Core attention on torch's `scaled_dot_product_attention`, for the local layer spec.

megatron-core's local `DotProductAttention` materialises the [b * heads, s, s]
score matrix (baddbmm, mask fill, softmax, bmm, and the same again in backward).
On CPU that is most of the gap between this stack and a plain PyTorch model
(docs/parallelism.md, "Benchmark"): torch's SDPA dispatches to a fused
flash-attention kernel on CPU (and on CUDA) that never stores the scores and
skips the masked upper triangle of a causal mask.

`SDPAttention` is a drop-in for `DotProductAttention` in a `SelfAttention`
spec: same constructor arguments, same [s, b, heads, head_dim] inputs and
[s, b, heads * head_dim] output, no parameters (so checkpoints are unchanged).
`tests/unit/mesh_model/test_attention.py` checks it against `DotProductAttention`, forward and
backward, at TP 1.

Masking: for the causal mask type the causal pattern is applied by the kernel
(`is_causal=True`) and the attention_mask tensor is not read, the same contract
as Transformer Engine's attention on the GPU spec. The training data
(`pretrain/data.py`) builds exactly that mask (no per-document reset), so the
two are the same computation. Any other mask type uses the mask tensor
(megatron's convention: True = masked out).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """softmax(q k^T * scale [+ mask]) v over [s, b, n, d] tensors, one fused call."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if config.window_size is not None:
            raise ValueError("SDPAttention does not support sliding-window attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        # megatron's query-key layer scaling divides the scale by the layer number and
        # multiplies it back inside an fp32 softmax (an fp16 overflow guard); the product
        # is the plain 1/sqrt(d), which is what the fused kernel applies in fp32 anyway.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d] as views; the kernel takes strided inputs.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=self.heads_per_partition != self.groups_per_partition,
            )

        if dropout_p > 0.0:
            # Heads are split over TP ranks: each needs its own dropout stream. (megatron's
            # DotProductAttention skips the fork under sequence parallelism because its
            # TransformerBlock already runs inside it; this model has no such block.)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)
