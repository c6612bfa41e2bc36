"""Small builders shared by the tests: the tiny debug model flavour and its inputs, and a tiny
megatron-core GPTModel for the engine and parallel-state tests."""

from __future__ import annotations

import torch


def tiny_model_config(**overrides):
    """The debug flavour every model test uses: seconds on CPU."""
    from mesh_model.config import ModelConfig

    values = dict(
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=96,
        seq_length=16,
        layer_split="1+2R2+1",
        variant="mesh",
        make_vocab_size_divisible_by=32,
    )
    values.update(overrides)
    return ModelConfig(**values)


def causal_inputs(batch: int, seq: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    return tokens, positions, mask


# A tiny megatron-core GPTModel (the engine-vs-AdamW reference model).
GPT_HIDDEN, GPT_LAYERS, GPT_HEADS, GPT_SEQ, GPT_VOCAB = 64, 2, 4, 32, 128


def device() -> torch.device:
    # The CPU when there is no GPU; init_distributed(device="auto") picks the same.
    return torch.device("cuda", torch.cuda.currentdevice()) if torch.cuda.is_available() else torch.device("cpu")


def tiny_gpt(**config_overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    values = dict(
        # The local spec's attention. (megatron exports NVTE_*_ATTN for the chosen
        # backend and asserts on a mismatch, so tests in one process must agree.)
        attention_backend=AttnBackend.local,
        num_layers=GPT_LAYERS,
        hidden_size=GPT_HIDDEN,
        num_attention_heads=GPT_HEADS,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    values.update(config_overrides)
    model = GPTModel(
        TransformerConfig(**values), get_gpt_layer_local_spec(), vocab_size=GPT_VOCAB, max_sequence_length=GPT_SEQ
    )
    return model.to(device())


def gpt_batch(seed: int, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, GPT_VOCAB, (batch, GPT_SEQ), generator=generator)
    labels = torch.randint(0, GPT_VOCAB, (batch, GPT_SEQ), generator=generator)
    positions = torch.arange(GPT_SEQ).unsqueeze(0).expand(batch, -1)
    return tokens.to(device()), positions.to(device()), labels.to(device())


