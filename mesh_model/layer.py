"""The GPT-NeoX (Pythia) layer on megatron-core submodules, and its ModuleSpecs.

megatron-core's own `TransformerLayer` is sequential-residual
(x -> x + attn(ln(x)) -> _ + mlp(ln(_))). GPT-NeoX uses the *parallel* residual

    y = x + attn(ln1(x)) + mlp(ln2(x))

so this module provides a small layer class over the same submodules
(`SelfAttention`, `MLP`, the column/row parallel linears, the norm), built from a
`ModuleSpec` exactly the way megatron-core builds its own layers. Attention and
the parallel linears are megatron-core's; nothing here re-implements them.

Two specs:
- local: megatron-core's column/row parallel linears, with core attention on torch's
  fused `scaled_dot_product_attention` (mesh_model/attention.py; megatron's own
  `DotProductAttention` materialises the score matrix) and a torch LayerNorm that
  supports sequence parallelism (megatron's wrapped torch norm refuses it). Works
  everywhere, including CPU.
- Transformer Engine: the norms fused into `TELayerNormColumnParallelLinear` for QKV
  and FC1, and TE's fused attention. Chosen automatically when TE is importable.
  Fusing ln1 into QKV and ln2 into FC1 is exactly right for a parallel-residual
  layer, since both branches read the layer input x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mesh_model.attention import SDPAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401  # pylint: disable=unused-import

        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass
class NeoXLayerSubmodules:
    """What a GPT-NeoX layer is made of. Identity defaults, like megatron-core's."""

    input_layernorm: Union[ModuleSpec, type] = IdentityOp
    self_attention: Union[ModuleSpec, type] = IdentityOp
    pre_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp
    mlp: Union[ModuleSpec, type] = IdentityOp


class NeoXLayer(MegatronModule):
    """One GPT-NeoX layer: [s, b, h] -> [s, b, h].

    `layer_number` is 1-based and unique across the unrolled graph's distinct
    layers; megatron-core's attention uses it only for optional QK scaling.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: NeoXLayerSubmodules,
        layer_number: int = 1,
        parallel_residual: bool = True,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.parallel_residual = parallel_residual
        norm_kwargs = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

        # [Attention branch] ln1 -> self-attention (QKV column-parallel, proj row-parallel)
        self.input_layernorm = build_module(submodules.input_layernorm, **norm_kwargs)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        # [MLP branch] ln2 -> fc1 (column-parallel) -> GeLU -> fc2 (row-parallel)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, **norm_kwargs)
        self.mlp = build_module(submodules.mlp, config=config)

    def _branch_output(self, output_and_bias: tuple[torch.Tensor, Optional[torch.Tensor]]):
        # megatron's row-parallel linears return their bias separately (skip_bias_add) so a
        # fused bias-dropout-add can consume it; here the add is explicit.
        output, bias = output_and_bias
        if bias is not None:
            output = output + bias
        if self.config.sequence_parallel and self.training and self.config.hidden_dropout > 0:
            # Each TP rank holds different tokens: draw the mask from its own stream
            # (without sequence parallelism the stream is shared, as the state is replicated).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.dropout(output, p=self.config.hidden_dropout, training=True)
        return F.dropout(output, p=self.config.hidden_dropout, training=self.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        attention = self._branch_output(
            self.self_attention(
                self.input_layernorm(hidden_states), attention_mask, rotary_pos_emb=rotary_pos_emb
            )
        )
        if self.parallel_residual:
            mlp = self._branch_output(self.mlp(self.pre_mlp_layernorm(hidden_states)))
            return hidden_states + attention + mlp
        hidden_states = hidden_states + attention
        return hidden_states + self._branch_output(self.mlp(self.pre_mlp_layernorm(hidden_states)))


def neox_layer_spec(backend: BackendSpecProvider, parallel_residual: bool = True) -> ModuleSpec:
    """A GPT-NeoX layer spec for a megatron-core backend (local or Transformer Engine)."""
    fused_norm = backend.fuse_layernorm_and_linear()
    # With TE the norms live inside the QKV / FC1 linears, so the layer's own norms are identity.
    layer_norm = IdentityOp if fused_norm else backend.layer_norm()
    column_linear = (
        backend.column_parallel_layer_norm_linear() if fused_norm else backend.column_parallel_linear()
    )
    return ModuleSpec(
        module=NeoXLayer,
        params={"parallel_residual": parallel_residual},
        submodules=NeoXLayerSubmodules(
            input_layernorm=layer_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            pre_mlp_layernorm=layer_norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=column_linear, linear_fc2=backend.row_parallel_linear()
                ),
            ),
        ),
    )


class LayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm, built from megatron's norm arguments (as `WrappedTorchNorm` does).

    Under sequence parallelism each TP rank normalises only its slice of the
    sequence, so the weight and bias get partial gradients; they are marked
    `sequence_parallel` (megatron's attribute, also set by its fused and TE norms)
    and the trainer sums their gradients over the TP group
    (pretrain/parallel/sequence_parallel.py).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "LayerNorm":
            raise ValueError(f"mesh_model.layer.LayerNorm is a LayerNorm, not {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


class MeshLocalSpecProvider(LocalSpecProvider):
    """megatron's local backend with SDPA core attention and a sequence-parallel-aware norm."""

    def core_attention(self) -> type:
        return SDPAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        norm = super().layer_norm(rms_norm=rms_norm, for_qk=for_qk)
        # apex's FusedLayerNorm (when installed) already supports sequence parallelism.
        return LayerNorm if norm is WrappedTorchNorm and not rms_norm else norm


def default_backend(use_transformer_engine: Optional[bool] = None) -> BackendSpecProvider:
    """TE when it is importable and a GPU is present (or when asked for), else local."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return MeshLocalSpecProvider()
