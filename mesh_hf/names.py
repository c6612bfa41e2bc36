"""Parameter names: the training checkpoint's (mesh_model's layout-invariant names) and the
Hugging Face ones, both ways.

Training name                                      Hugging Face name (custom / native GPT-NeoX)
embedding.word_embeddings.weight                   model.embed_in.weight / gpt_neox.embed_in.weight
{prelude,core,coda}.layers.I.input_layernorm.*     model.{block}.I.input_layernorm.* / gpt_neox.layers.I...
  ...pre_mlp_layernorm.*                           ...post_attention_layernorm.*
  ...self_attention.linear_qkv.*                   ...attention.query_key_value.*
  ...self_attention.linear_proj.*                  ...attention.dense.*
  ...mlp.linear_fc1.* / mlp.linear_fc2.*           ...mlp.dense_h_to_4h.* / mlp.dense_4h_to_h.*
final_layernorm.*                                  model.final_layer_norm.* / gpt_neox.final_layer_norm.*
output_layer.weight                                lm_head.weight / embed_out.weight
recurrence.*                                       model.recurrence.* (custom only)

megatron's fused QKV rows (per head [q | k | v]) and its non-interleaved partial rotary are
GPT-NeoX's own layout, so every tensor maps one to one with no reordering. A vanilla model's
layers are all "prelude" layers (mesh_model builds a plain stack as a prelude-only program).
"""

from __future__ import annotations

import re

LAYER_PARTS = {
    "input_layernorm": "input_layernorm",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "self_attention.linear_qkv": "attention.query_key_value",
    "self_attention.linear_proj": "attention.dense",
    "mlp.linear_fc1": "mlp.dense_h_to_4h",
    "mlp.linear_fc2": "mlp.dense_4h_to_h",
}
_LAYER_PARTS_BACK = {hf: ours for ours, hf in LAYER_PARTS.items()}
_TRAIN_LAYER = re.compile(r"^(prelude|core|coda)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CUSTOM_LAYER = re.compile(r"^model\.(prelude|core|coda)\.(\d+)\.(.+)\.(weight|bias)$")
_NATIVE_LAYER = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)$")

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"

# Buffers some GPT-NeoX checkpoints carry (older transformers saved them): not parameters.
NATIVE_BUFFERS = re.compile(r"\.(attention\.(bias|masked_bias)|attention\.rotary_emb\.inv_freq)$")


def to_hf(name: str, native: bool) -> str:
    """The Hugging Face name of a training parameter (native: GPTNeoXForCausalLM)."""
    if name == EMBEDDING:
        return "gpt_neox.embed_in.weight" if native else "model.embed_in.weight"
    if name == OUTPUT:
        return "embed_out.weight" if native else "lm_head.weight"
    if name.startswith("final_layernorm."):
        return ("gpt_neox." if native else "model.") + "final_layer_norm." + name.rsplit(".", 1)[1]
    if m := _TRAIN_LAYER.match(name):
        block, index, part, kind = m.groups()
        if part not in LAYER_PARTS:
            raise KeyError(f"no Hugging Face name for {name!r}")
        if native:
            if block != "prelude":
                raise KeyError(f"{name!r}: a native GPT-NeoX model has no {block} block")
            return f"gpt_neox.layers.{index}.{LAYER_PARTS[part]}.{kind}"
        return f"model.{block}.{index}.{LAYER_PARTS[part]}.{kind}"
    if name.startswith("recurrence.") and not native:
        return "model." + name
    raise KeyError(f"no Hugging Face name for {name!r}")


def from_hf(name: str) -> str:
    """The training name of a Hugging Face parameter (custom or native naming)."""
    if name in ("gpt_neox.embed_in.weight", "model.embed_in.weight"):
        return EMBEDDING
    if name in ("embed_out.weight", "lm_head.weight"):
        return OUTPUT
    for prefix in ("gpt_neox.final_layer_norm.", "model.final_layer_norm."):
        if name.startswith(prefix):
            return "final_layernorm." + name[len(prefix):]
    if m := _NATIVE_LAYER.match(name):
        index, part, kind = m.groups()
        return f"prelude.layers.{index}.{_part_back(name, part)}.{kind}"
    if m := _CUSTOM_LAYER.match(name):
        block, index, part, kind = m.groups()
        return f"{block}.layers.{index}.{_part_back(name, part)}.{kind}"
    if name.startswith("model.recurrence."):
        return name[len("model."):]
    raise KeyError(f"no training name for Hugging Face tensor {name!r}")


def _part_back(name: str, part: str) -> str:
    if part not in _LAYER_PARTS_BACK:
        raise KeyError(f"no training name for Hugging Face tensor {name!r}")
    return _LAYER_PARTS_BACK[part]


def native_layer_index(name: str) -> int | None:
    """I of gpt_neox.layers.I.*, else None."""
    m = _NATIVE_LAYER.match(name)
    return int(m.group(1)) if m else None
