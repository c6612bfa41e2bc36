"""MeSH recursive transformers for Hugging Face `transformers`: the whole model in one file.

This file ships inside every model folder that `mesh convert hf` writes for a recursive model,
and loads with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It imports only torch and transformers, so it is also the shortest complete reference of the
model: read it top to bottom. Shapes are [batch b, sequence s, hidden h] throughout.

    tokens [b, s]
      -> embed_in * embedding_multiplier                       h_emb [b, s, h]
      -> prelude: L_pre GPT-NeoX layers                        p     [b, s, h]
      -> N_loop applications of the core block (L_core layers), with the state passed between
         loops by the variant (MeshRecurrence below)           h(N)  [b, s, h]
      -> coda: L_coda layers -> final_layer_norm -> lm_head   logits [b, s, V]

The variants (the MeSH paper's Table 1 and 4), with f = the core block:

    base            h(t+1) = f(h(t))
    residual        h(t+1) = f(h(t)) + h(t)
    anchor          h(t+1) = f(h(t)) + h0          (h0 = p, the prelude output)
    anchor_emb      h(t+1) = f(h(t)) + h_emb       (the paper's anchor*)
    a+b             the sum of the supplements a, b (e.g. residual+anchor+anchor_emb)
    static_combination   h(t+1) = a1 f(h(t)) + a2 h0 + a3 h_emb, three learned scalars per loop
    dynamic_combination  the same, with a(t) = (1, 1, 0) + W_t h(t) + b_t per token
    mesh            a buffer M of B slots [B, b, s, h]:
                      M_0 = h_emb, M_1.. = 0
                      step 0:   M += w_write_0(p) * p            h(0)   = sum_k w_read_0(p)_k M_k
                      loop t:   M += w_write_t+1(h(t)) * f(h(t))  h(t+1) = sum_k w_read_t+1(h(t))_k M_k
                    every router is Linear(h -> B) + softmax over the slots (in fp32), per token.

A core written `4+8x2+4` (lowercase x) has its own copy of the core block per loop: loop t
runs core layers t*L_core .. t*L_core + L_core - 1.

The KV cache: every (loop, layer) call is its own cache layer, numbered in the unrolled order
(prelude 0..L_pre-1, then loop 0's core layers, loop 1's, ..., then the coda), so
`num_hidden_layers` is the unrolled depth L_pre + N_loop * L_core + L_coda. The routers and
the combinations act per token, so caching the attention keys and values is exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

SUPPLEMENTS = ("residual", "anchor", "anchor_emb")


class MeshConfig(PretrainedConfig):
    """A GPT-NeoX-style model whose middle block loops `num_loops` times."""

    model_type = "mesh_recursive"

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        prelude_layers: int = 4,
        core_layers: int = 4,
        num_loops: int = 2,
        coda_layers: int = 4,
        shared_core: bool = True,
        variant: str = "mesh",
        buffer_slots: Optional[int] = 5,
        layer_norm_eps: float = 1e-5,
        rotary_pct: float = 0.25,
        rotary_emb_base: int = 10000,
        max_position_embeddings: int = 2048,
        use_parallel_residual: bool = True,
        embedding_multiplier: float = 1.0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.prelude_layers = prelude_layers
        self.core_layers = core_layers
        self.num_loops = num_loops
        self.coda_layers = coda_layers
        self.shared_core = shared_core
        self.variant = variant
        self.buffer_slots = buffer_slots
        self.layer_norm_eps = layer_norm_eps
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.max_position_embeddings = max_position_embeddings
        self.use_parallel_residual = use_parallel_residual
        self.embedding_multiplier = embedding_multiplier
        # The unrolled depth: what generate() allocates cache layers for.
        kwargs["num_hidden_layers"] = prelude_layers + num_loops * core_layers + coda_layers
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def layer_split(self) -> str:
        kind = "R" if self.shared_core else "x"
        return f"{self.prelude_layers}+{self.core_layers}{kind}{self.num_loops}+{self.coda_layers}"


# ============================================================================ one layer
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Partial rotary embeddings on the first `rotary_pct` of each head's dims (not interleaved)."""

    def __init__(self, config: MeshConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        self.dim = int(head_dim * config.rotary_pct)
        self.base = config.rotary_emb_base

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed per call (dim/2 numbers), not kept as a buffer: nothing to initialise on load.
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float, device=position_ids.device) / self.dim
        freqs = position_ids[..., None].float() / self.base**exponents  # [b, s, dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, dim]: broadcast over heads
        return angles.cos(), angles.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [b, heads, s, head_dim]: rotate the first `dim` channels, pass the rest."""
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        rot = (rot.float() * cos + rotate_half(rot.float()) * sin).to(x.dtype)
        return torch.cat((rot, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: MeshConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # Per head [q | k | v] rows: the layout of megatron-core's fused QKV and of GPT-NeoX.
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, rotary: RotaryEmbedding, cos, sin, mask, cache: Optional[Cache], cache_index: int):
        b, s, h = x.shape
        qkv = self.query_key_value(x).view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [b, heads, s, head_dim]
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        if cache is not None:  # k, v grow to [b, heads, past + s, head_dim]
            k, v = cache.update(k, v, cache_index)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, heads, s, head_dim]
        return self.dense(out.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, config: MeshConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    """A GPT-NeoX layer. Parallel residual: y = x + attn(ln1(x)) + mlp(ln2(x))."""

    def __init__(self, config: MeshConfig):
        super().__init__()
        self.parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, rotary, cos, sin, mask, cache, cache_index):
        attn = self.attention(self.input_layernorm(x), rotary, cos, sin, mask, cache, cache_index)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


# ============================================================================ the recurrence
class MeshRecurrence(nn.Module):
    """How the state passes between loops: the variants of the module docstring, in one place."""

    def __init__(self, config: MeshConfig):
        super().__init__()
        self.variant, self.num_loops = config.variant, config.num_loops
        h = config.hidden_size
        if self.variant == "vanilla":
            return  # no loop
        if self.variant == "mesh":
            self.slots = config.buffer_slots
            # Step 0 is the transitional cycle after the prelude; step t+1 follows loop t.
            self.routers = nn.ModuleDict({
                "write": nn.ModuleDict({str(t): nn.Linear(h, self.slots) for t in range(self.num_loops + 1)}),
                "read": nn.ModuleDict({str(t): nn.Linear(h, self.slots) for t in range(self.num_loops + 1)}),
            })
        elif self.variant == "static_combination":
            self.coefficients = nn.ParameterDict(
                {str(t): nn.Parameter(torch.tensor([1.0, 1.0, 0.0])) for t in range(self.num_loops)})
        elif self.variant == "dynamic_combination":
            self.coefficient_maps = nn.ModuleDict({str(t): nn.Linear(h, 3) for t in range(self.num_loops)})
        else:
            self.supplements = () if self.variant == "base" else tuple(self.variant.split("+"))
            unknown = [name for name in self.supplements if name not in SUPPLEMENTS]
            if unknown:
                raise ValueError(f"unknown variant {self.variant!r}")

    def route(self, step: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write and read weights [b, s, B] of router step `step` (softmax in fp32)."""
        write = torch.softmax(self.routers["write"][str(step)](query).float(), dim=-1).to(query.dtype)
        read = torch.softmax(self.routers["read"][str(step)](query).float(), dim=-1).to(query.dtype)
        return write, read

    def mesh_step(self, step: int, buffer: torch.Tensor, query: torch.Tensor, value: torch.Tensor):
        """M_k += w_write_k * value; returns (M, sum_k w_read_k M_k). buffer [B, b, s, h]."""
        write, read = self.route(step, query)
        buffer = buffer + write.permute(2, 0, 1).unsqueeze(-1) * value.unsqueeze(0)
        return buffer, (buffer * read.permute(2, 0, 1).unsqueeze(-1)).sum(dim=0)

    def forward(self, p: torch.Tensor, h_emb: torch.Tensor, core, states: Optional[list] = None) -> torch.Tensor:
        """p, h_emb [b, s, h] -> h(N) [b, s, h]; `core(t, h)` runs the core block of loop t.
        `states`, if a list, receives h(0) .. h(N)."""
        h0 = p
        if self.variant == "mesh":
            buffer = torch.cat([h_emb.unsqueeze(0), h_emb.new_zeros((self.slots - 1, *h_emb.shape))])
            buffer, h = self.mesh_step(0, buffer, query=p, value=p)
        else:
            h = p
        if states is not None:
            states.append(h)
        for t in range(self.num_loops):
            f = core(t, h)  # f_core(h(t))
            if self.variant == "mesh":
                buffer, h = self.mesh_step(t + 1, buffer, query=h, value=f)
            elif self.variant in ("static_combination", "dynamic_combination"):
                if self.variant == "static_combination":
                    a = self.coefficients[str(t)].to(h.dtype)  # [3]
                else:
                    a = h.new_tensor([1.0, 1.0, 0.0]) + self.coefficient_maps[str(t)](h)  # [b, s, 3]
                h = a[..., 0:1] * f + a[..., 1:2] * h0 + a[..., 2:3] * h_emb
            else:
                supplement = {"residual": h, "anchor": h0, "anchor_emb": h_emb}
                for name in self.supplements:
                    f = f + supplement[name]
                h = f
            if states is not None:
                states.append(h)
        return h


# ============================================================================ the model
class MeshPreTrainedModel(PreTrainedModel):
    config_class = MeshConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def attention_mask_4d(padding_mask: Optional[torch.Tensor], batch: int, query_len: int, past: int,
                      device) -> torch.Tensor:
    """[b, 1, s, past + s] boolean, True = may attend: causal, minus padded keys.

    A padded query position keeps its own key, so its row is never empty (an all-masked row
    would give NaN, which 0-weights cannot cancel in later rows)."""
    total = past + query_len
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None].expand(batch, 1, query_len, total)
    if padding_mask is not None:
        keep = padding_mask[:, None, None, -total:].bool()
        mask = (mask & keep) | (key_pos == query_pos)[None, None]
    return mask


class MeshModel(MeshPreTrainedModel):
    """Embedding, prelude, looped core, coda, final norm: [b, s] -> [b, s, h]."""

    def __init__(self, config: MeshConfig):
        super().__init__(config)
        c = config
        self.embed_in = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rotary = RotaryEmbedding(c)
        core_copies = 1 if c.shared_core else c.num_loops
        self.prelude = nn.ModuleList(Layer(c) for _ in range(c.prelude_layers))
        self.core = nn.ModuleList(Layer(c) for _ in range(c.core_layers * core_copies))
        self.coda = nn.ModuleList(Layer(c) for _ in range(c.coda_layers))
        self.recurrence = MeshRecurrence(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, output_hidden_states=False):
        """Returns (final hidden [b, s, h], hidden states or None). The hidden states are
        (h_emb, h(0), h(1), .., h(N_loop), coda output before the final norm)."""
        c = self.config
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=input_ids.device)[None].expand(b, s)
        cos, sin = self.rotary(position_ids)
        mask = attention_mask_4d(attention_mask, b, s, past, input_ids.device)

        def run(layer: Layer, x: torch.Tensor, cache_index: int) -> torch.Tensor:
            return layer(x, self.rotary, cos, sin, mask, cache, cache_index)

        h_emb = self.embed_in(input_ids) * c.embedding_multiplier  # [b, s, h]
        x = h_emb
        for i, layer in enumerate(self.prelude):
            x = run(layer, x, i)

        def core(t: int, x: torch.Tensor) -> torch.Tensor:
            first = 0 if c.shared_core else t * c.core_layers  # unshared: loop t's own copy
            for i in range(c.core_layers):
                x = run(self.core[first + i], x, c.prelude_layers + t * c.core_layers + i)
            return x

        loop_states = [] if output_hidden_states else None
        x = self.recurrence(x, h_emb, core, loop_states) if c.num_loops else x
        coda_start = c.prelude_layers + c.num_loops * c.core_layers
        for i, layer in enumerate(self.coda):
            x = run(layer, x, coda_start + i)
        hidden_states = (h_emb, *loop_states, x) if output_hidden_states else None
        return self.final_layer_norm(x), hidden_states


class MeshForCausalLM(MeshPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_in.weight"}

    def __init__(self, config: MeshConfig):
        super().__init__(config)
        self.model = MeshModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_in

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: int = 0,
        return_dict: Optional[bool] = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()  # grows one cache layer per unrolled (loop, layer) call
        if not use_cache:
            cache = None
        output_hidden_states = bool(output_hidden_states or self.config.output_hidden_states)
        hidden, states = self.model(input_ids, attention_mask, position_ids, cache, output_hidden_states)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [b, s, V]
        loss = None
        if labels is not None:  # labels are the inputs: predict token i + 1 from position i
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=states)

