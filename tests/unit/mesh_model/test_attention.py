"""SDPAttention (mesh_model/attention.py) against megatron-core's DotProductAttention.

Same inputs, same causal mask, forward output and the gradients of query, key and
value, in float64 (so the comparison is about the computation, not round-off) and
in float32 at the tolerance round-off allows. The layer spec picks SDPAttention
for the local backend; a whole model built with it matches one built with
DotProductAttention.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from mesh_model.attention import SDPAttention
from tests.support.models import causal_inputs, tiny_model_config


def attention_config(heads: int = 4, head_dim: int = 16, dtype=torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2, hidden_size=heads * head_dim, num_attention_heads=heads, kv_channels=head_dim,
        attention_dropout=0.0, masked_softmax_fusion=False, params_dtype=dtype, use_cpu_initialization=True,
    )


def run(module, q, k, v, mask, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = module(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_sdpa_matches_megatron_dot_product_attention(model_parallel, dtype, tol):
    s, b, heads, head_dim = 24, 3, 4, 16
    config = attention_config(heads, head_dim)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, heads, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    grad_out = torch.randn(s, b, heads * head_dim, generator=generator, dtype=dtype)

    reference = DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    expected = run(reference, q, k, v, mask, grad_out)
    got = run(ours, q, k, v, mask, grad_out)
    for name, e, g in zip(("output", "dq", "dk", "dv"), expected, got):
        assert g.shape == e.shape, name
        scale = e.abs().max().item()
        assert (g - e).abs().max().item() <= tol * max(scale, 1.0), (name, (g - e).abs().max().item())
    # The causal pattern is really applied: the first query sees only the first key.
    torch.testing.assert_close(got[0][0].view(b, heads, head_dim), v[0].to(got[0].dtype), rtol=tol, atol=tol)


def test_sdpa_uses_the_mask_tensor_for_a_padding_mask(model_parallel):
    """Non-causal mask types read the mask tensor (megatron: True = masked out)."""
    s, b, heads, head_dim = 8, 2, 2, 8
    config = attention_config(heads, head_dim)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, b, heads, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[:, :, :, 5:] = True  # keys 5.. are padding
    ours = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.padding)
    out = ours(q, k, v, mask, attn_mask_type=AttnMaskType.padding)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / head_dim**0.5
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    expected = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, heads * head_dim)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_local_spec_uses_sdpa_and_the_model_matches_dot_product_attention(model_parallel):
    """The same model (same seed, same weights) with either core attention: same loss and
    gradients, to float32 round-off."""
    from megatron.core.models.backends import LocalSpecProvider

    from mesh_model.layer import default_backend
    from mesh_model.model import build_transformer_config, MeshLanguageModel

    model_config = tiny_model_config()
    tokens, positions, mask = causal_inputs(2, model_config.seq_length, model_config.vocab_size)
    labels = torch.roll(tokens, -1, dims=1)
    results = []
    for backend in (default_backend(use_transformer_engine=False), LocalSpecProvider()):
        model = MeshLanguageModel(build_transformer_config(model_config), model_config, backend=backend)
        attention = model.prelude.layers["0"].self_attention.core_attention
        results.append((type(attention), model, model(tokens, positions, mask, labels=labels).mean()))
        results[-1][2].backward()
    (ours_type, ours, ours_loss), (ref_type, ref, ref_loss) = results
    assert ours_type is SDPAttention and ref_type is DotProductAttention
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-6, atol=0)
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0)  # same init
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
