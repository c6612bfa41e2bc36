"""Model FLOPs per token: the numerator of model FLOPs utilisation (MFU).

    F_token = 6 * N_compute + 12 * L_compute * s * d

N_compute is the parameters applied to every token: each compute layer of the
unrolled program (a core layer counts once per loop, since its weights do the
work N_loop times; an unshared core `4+8x2+4` has one copy per loop, the same
count), the MeSH routers (one write/read pair per step, N_loop + 1
steps), the final norm and the output head. The input embedding is a lookup,
not a matmul, so it is left out. 6 = 2 FLOPs per multiply-add x (forward +
2 x backward). The second term is attention's two s x s matmuls (scores and
weighted values): per token and layer 2 x s x d multiply-adds, x 2 FLOPs, x 3
for forward + backward. It counts the whole s x s square, as the PaLM paper's
accounting does, although causal kernels skip about half of it; that keeps MFU
comparable with what other stacks report.

Approximations, all small at real sizes: bias and LayerNorm parameters are
counted at 6 FLOPs per token like weights although their work is elementwise
(0.08% of F_token for Pythia-160M MeSH, 0.04% for 1.4B; a few % on toy shapes); the MeSH buffer's soft
reads and writes (B multiply-adds per element of h, per step), softmaxes and
activations are not counted. tests/unit/mesh_model/test_flops.py checks that the matmul part,
F_token - 6 x vector_params, is exactly what torch's FLOP counter counts in a
real forward + backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh_model.config import ModelConfig


@dataclass(frozen=True)
class TokenFlops:
    matrix_params: int  # weights of the matmuls applied per token (loops unrolled)
    vector_params: int  # biases and norm weights applied per token (elementwise work)
    attention: int  # 12 * L_compute * s * d

    @property
    def n_compute(self) -> int:
        return self.matrix_params + self.vector_params

    @property
    def dense(self) -> int:
        return 6 * self.n_compute

    @property
    def total(self) -> int:
        return self.dense + self.attention


def layer_params(config: ModelConfig) -> tuple[int, int]:
    """One GPT-NeoX layer as (matrix, vector) parameters: QKV + output projection and
    fc1 + fc2 weights; their biases and the two LayerNorms."""
    d, f = config.hidden_size, config.ffn_size
    matrices = 3 * d * d + d * d + d * f + f * d
    vectors = 3 * d + d + f + d + 2 * 2 * d
    return matrices, vectors


def router_params(config: ModelConfig) -> tuple[int, int]:
    """MeSH: N_loop + 1 (write, read) pairs of Linear(d -> B); the dynamic combination: one
    Linear(d -> 3) per loop; the static combination: 3 scalars per loop; (0, 0) otherwise."""
    loops = config.split.loops
    if config.variant == "dynamic_combination":
        return loops * 3 * config.hidden_size, loops * 3
    if config.variant == "static_combination":
        return 0, loops * 3
    if config.variant != "mesh":
        return 0, 0
    routers = (loops + 1) * 2
    return routers * config.hidden_size * config.buffer_slots, routers * config.buffer_slots


def flops_per_token(config: ModelConfig) -> TokenFlops:
    depth = config.split.compute_depth
    layer_matrices, layer_vectors = layer_params(config)
    router_matrices, router_vectors = router_params(config)
    head = config.padded_vocab_size * config.hidden_size  # the output layer (no bias)
    final_norm = 2 * config.hidden_size
    return TokenFlops(
        matrix_params=layer_matrices * depth + router_matrices + head,
        vector_params=layer_vectors * depth + router_vectors + final_norm,
        attention=12 * depth * config.seq_length * config.hidden_size,
    )
