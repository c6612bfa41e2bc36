"""The MeSH language model: embedding -> prelude -> loop(core) -> coda -> head.

    tokens [b, s]
      -> VocabParallelEmbedding, * sqrt(h)            h_emb   [s, b, h]
      -> prelude (L_pre GPT-NeoX layers)              p       [s, b, h]
      -> recurrence over the shared core block         h(N)    [s, b, h]
         (N_loop applications of L_core layers; how the state is carried
          between loops is the variant, see recurrence.py; an unshared
          split `4+8x2+4` runs its own core copy per loop instead)
      -> coda (L_coda layers) -> final LayerNorm
      -> ColumnParallelLinear head (untied)           logits  [s, b, V/tp]
      -> vocab-parallel cross entropy                 loss    [b, s]

A vanilla model is the same class with only a prelude (no core, no coda).

Layout follows megatron-core's `GPTModel`: activations are [s, b, h], the
model is a `LanguageModule`, every projection is a megatron-core column/row
parallel linear inside `SelfAttention` / `MLP`, and `pre_process` /
`post_process` are the only pipeline switches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mesh_model.config import ModelConfig
from mesh_model.layer import default_backend, neox_layer_spec
from mesh_model.recurrence import RecurrentState, build_recurrence
from mesh_model.seeding import seeded
from mesh_model.unrolled import PipelineCut, pack, packed_width, unpack


def build_transformer_config(
    config: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_cpu_initialization: Optional[bool] = None,
) -> TransformerConfig:
    """The megatron-core TransformerConfig for a ModelConfig.

    `num_layers` is the *compute* depth of the unrolled graph, so megatron-core's
    scaled init gives the output projections std / sqrt(2 * N_compute), as in the
    paper. Fusions that need CUDA kernels are off; they are GPU-only optimisations.
    """
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=config.compute_depth,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.ffn_size,
        kv_channels=config.head_dim,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        layernorm_epsilon=config.layernorm_epsilon,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        init_method_std=config.init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        attention_backend=AttnBackend.auto if on_gpu else AttnBackend.local,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
    )


class LayerStack(MegatronModule):
    """The layers of one block (prelude, core or coda) that this pipeline stage runs.

    Layers are keyed by their index in the block (`layers.3`), not by their
    position on this stage, so parameter names are the same at every parallel
    layout. Each layer is initialised from its own seed (`init_seed` and its
    layer number), so its initial weights do not depend on which stage builds it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        indices: Iterable[int],
        first_layer_number: int,
        init_seed: int,
    ):
        super().__init__(config=config)
        self.layers = nn.ModuleDict()
        for i in indices:
            layer_number = first_layer_number + i
            with seeded(init_seed, layer_number):
                self.layers[str(i)] = build_module(layer_spec, config=config, layer_number=layer_number)


class MeshLanguageModel(LanguageModule):
    """A GPT-NeoX language model whose middle block may loop, with MeSH or a fixed recurrence.

    With pipeline parallelism each stage builds this class for its share of the
    unrolled program (see unrolled.py): `cut` is the program cut into stages,
    `pipeline_rank` picks the share; the first stage embeds, the last one has the head.
    """

    def __init__(
        self,
        config: TransformerConfig,
        model_config: ModelConfig,
        backend: Optional[BackendSpecProvider] = None,
        cut: Optional[PipelineCut] = None,
        pipeline_rank: int = 0,
    ):
        super().__init__(config=config)
        backend = backend or default_backend()
        cut = cut or PipelineCut.of(model_config)
        self.model_config = model_config
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask for
        self.pre_process = pipeline_rank == 0
        self.post_process = pipeline_rank == cut.num_stages - 1
        self.share_embeddings_and_output_weights = not model_config.untie_embeddings
        layer_spec = neox_layer_spec(backend, model_config.parallel_residual)
        split, seed = model_config.split, model_config.init_seed

        # This stage's share of the unrolled program, and what crosses its boundaries.
        self.ops = cut.stage_ops(pipeline_rank)
        self.recurrence = None
        if split.is_recursive:
            router_steps = sorted(
                {0 for op in self.ops if op.kind == "begin"}
                | {op.loop + 1 for op in self.ops if op.kind == "loop_end"}
            )
            self.recurrence = build_recurrence(model_config, router_steps)
            # Under sequence parallelism the routers see only this TP rank's tokens:
            # their gradients are partial sums, to be summed over TP like the norms'.
            for param in self.recurrence.parameters():
                param.sequence_parallel = config.sequence_parallel
        self.recv_fields = cut.recv_fields(pipeline_rank)
        self.send_fields = cut.send_fields(pipeline_rank)

        if self.pre_process:
            with seeded(seed, -1):
                self.embedding = LanguageModelEmbedding(
                    config=config,
                    vocab_size=model_config.padded_vocab_size,
                    max_sequence_length=model_config.seq_length,
                    position_embedding_type="rope",
                )
        self.embedding_scale = math.sqrt(model_config.hidden_size) if model_config.scale_embeddings else 1.0
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=model_config.head_dim,
            rotary_percent=model_config.rotary_percent,
            rotary_base=model_config.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )

        # Layer numbers are unique per *distinct* layer: prelude 1.., core next (every copy of
        # an unshared core: index t * L_core + i), coda last.
        def block_indices(block: str) -> list[int]:
            return sorted({op.index for op in self.ops if op.kind == "layer" and op.block == block})

        self.prelude = LayerStack(config, layer_spec, block_indices("prelude"), 1, seed)
        self.core = LayerStack(config, layer_spec, block_indices("core"), 1 + split.prelude, seed)
        self.coda = LayerStack(config, layer_spec, block_indices("coda"), 1 + split.prelude + split.unique_core_layers,
                               seed)

        if self.post_process:
            self.final_layernorm = build_module(
                backend.layer_norm(),
                config=config,
                hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )
            with seeded(seed, -2):
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size,
                    model_config.padded_vocab_size,
                    config=config,
                    init_method=config.init_method,
                    bias=False,
                    skip_bias_add=False,
                    gather_output=False,
                    skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights,
                )
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()

    # ------------------------------------------------------------------ pipeline
    def set_input_tensor(self, input_tensor) -> None:
        """Receives the previous pipeline stage's packed state (megatron schedule API)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def packed_width(self, which: str) -> int:
        """Last-dim width of the tensor this stage receives ("recv") or sends ("send")."""
        names = self.recv_fields if which == "recv" else self.send_fields
        return packed_width(names, self.model_config.hidden_size, self.model_config.buffer_slots or 0)

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings h_emb, [s, b, h], scaled by sqrt(h) as in the paper's setup."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)
        return embeddings * self.embedding_scale if self.embedding_scale != 1.0 else embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        trace: Optional[list] = None,
    ) -> torch.Tensor:
        """Per-token loss [b, s] when `labels` are given, else logits [b, s, V/tp].

        A stage that is not the last returns its packed state instead. `trace`, if a
        list, collects the recurrence's intermediate states (diagnostics, tests).
        """
        if self.pre_process:
            embeddings = self.embed(input_ids, position_ids)
            state = RecurrentState(hidden=embeddings, embeddings=embeddings)
        else:
            state = unpack(self.input_tensor, self.recv_fields, self.model_config.hidden_size,
                           self.model_config.buffer_slots or 0)
        state.trace = trace
        # With sequence parallelism this rank holds s / TP positions of the residual
        # stream, but attention runs on the whole (all-gathered) sequence.
        sequence_length = state.hidden.shape[0]
        if self.config.sequence_parallel:
            sequence_length *= self.config.tensor_model_parallel_size
        rotary_pos_emb = self.rotary_pos_emb(sequence_length)

        # The unrolled program: layers of prelude / core (once per loop) / coda, and the
        # recurrence events between them (see unrolled.py and recurrence.py).
        for op in self.ops:
            if op.kind == "layer":
                layer = getattr(self, op.block).layers[str(op.index)]
                if self.training and self.model_config.recomputes(op.block, op.loop):
                    # Keep only this layer's input; rerun it in backward (RNG restored).
                    state.hidden = tensor_parallel.checkpoint(
                        lambda h, m, r, layer=layer: layer(h, m, rotary_pos_emb=r),
                        False, state.hidden, attention_mask, rotary_pos_emb,
                    )
                else:
                    state.hidden = layer(state.hidden, attention_mask, rotary_pos_emb=rotary_pos_emb)
            elif op.kind == "begin":
                self.recurrence.begin(state)
            elif op.kind == "loop_start":
                self.recurrence.loop_start(op.loop, state)
            else:
                self.recurrence.loop_end(op.loop, state)

        if not self.post_process:
            return pack(state, self.send_fields)
        hidden = self.final_layernorm(state.hidden)
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=output_weight)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


@dataclass(frozen=True)
class ModelParallelism:
    """How one rank's model is laid out: its tensor-parallel degree, its pipeline stage
    of the cut program, and megatron's sequence parallelism. The training stack's
    parallel plan provides it (`ParallelPlan.model_parallelism`); the default is one
    whole model in one process."""

    tensor: int = 1
    pipeline_rank: int = 0
    cut: Optional[PipelineCut] = None
    """None: the whole program on one stage."""
    sequence_parallel: bool = False

    @classmethod
    def stage(cls, config: ModelConfig, pipeline: int, rank: int, layout: Optional[list[int]] = None,
              **kwargs) -> "ModelParallelism":
        """Stage `rank` of `config`'s program cut into `pipeline` stages."""
        return cls(pipeline_rank=rank, cut=PipelineCut.of(config, pipeline, layout), **kwargs)


def build_model(
    model_config: ModelConfig,
    parallelism: ModelParallelism = ModelParallelism(),
    *,
    params_dtype: torch.dtype = torch.float32,
    use_transformer_engine: Optional[bool] = None,
) -> MeshLanguageModel:
    """Builds this rank's model (its pipeline stage) on the current parallel state.

    With `parallelism.sequence_parallel` (TP > 1): megatron's sequence parallelism. The
    residual stream, norms, dropout and the MeSH recurrence work on s / TP positions per
    rank; the column-parallel linears all-gather the sequence and the row-parallel
    ones reduce-scatter it. Parameters that then see only part of the tokens are
    marked `sequence_parallel`; their gradients must be summed over TP
    (pretrain/parallel/sequence_parallel.py does it for training).
    """
    cut = parallelism.cut or PipelineCut.of(model_config)
    transformer_config = build_transformer_config(
        model_config,
        tensor_parallel=parallelism.tensor,
        pipeline_parallel=cut.num_stages,
        params_dtype=params_dtype,
        sequence_parallel=parallelism.sequence_parallel,
    )
    return MeshLanguageModel(
        transformer_config,
        model_config,
        backend=default_backend(use_transformer_engine),
        cut=cut,
        pipeline_rank=parallelism.pipeline_rank,
    )
