"""`mesh convert hf`: a training checkpoint (any TP / PP / DP layout) -> a Hugging Face model folder.

    OUTDIR/
      config.json               GPTNeoXConfig (vanilla) or MeshConfig (recursive, with auto_map)
      generation_config.json
      model.safetensors         or model-0000k-of-0000n.safetensors + model.safetensors.index.json
      modeling_mesh.py          recursive models only: the model's code (trust_remote_code=True)
      tokenizer.json, tokenizer_config.json
      README.md                 the model card

A vanilla model becomes transformers' own GPTNeoXForCausalLM: its sqrt(h) embedding scale is
folded into the embedding weights (a lookup and a multiply commute, so this is exact). A
recursive model keeps the scale as `embedding_multiplier` in its config, so converting back
gives the checkpoint's tensors bit for bit.

The checkpoint is read through pretrain/checkpoint/format.py only (no process group, no
DeepSpeed), one tensor at a time: TP shards are joined per tensor and written straight into the
safetensors file, and the memory maps of the state files are dropped every few hundred MB, so
the peak memory stays near the weights' size however large the checkpoint's optimizer state is.
The folder is written under a temporary name and renamed when complete: a failure leaves
nothing behind.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mesh_hf import names
from mesh_hf.output_folder import check_output_dir, written_whole
from mesh_hf.weights_file import TensorPlan, write_weights
from mesh_model.config import ConfigError, ModelConfig
from mesh_model.params import EMBEDDING_PREFIXES, ROUTER_MARKER
from pretrain.checkpoint import format as ckpt
from pretrain.run_folder import RunFolder

MODELING_FILE = Path(__file__).with_name("modeling_mesh.py")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_RELEASE_EVERY_BYTES = 256 * 2**20


@dataclass
class ExportReport:
    out_dir: Path
    native: bool
    """True: GPTNeoXForCausalLM, no custom code."""
    files: list[str]
    parameters: int
    step: int


def is_native(model: ModelConfig) -> bool:
    """Whether transformers' own GPTNeoXForCausalLM is this model: vanilla, and the embedding
    scale can be folded (with tied embeddings the head would be scaled too)."""
    return model.variant == "vanilla" and (model.untie_embeddings or not model.scale_embeddings)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class _TensorReader:
    """Full (TP-joined) fp32 tensors of a checkpoint by name, with the state files' memory maps
    dropped every _RELEASE_EVERY_BYTES, so pages already read do not stay mapped."""

    def __init__(self, path: Path, meta: ckpt.CheckpointMeta):
        self.path, self.meta = path, meta
        self.file, self.since_release = ckpt.file_cache(path), 0

    def __call__(self, name: str) -> torch.Tensor:
        tensor = ckpt.reshard(self.path, name, self.meta.tensors[name], self.file, tp_size=1, tp_rank=0)["param"]
        self.since_release += tensor.numel() * tensor.element_size()
        if self.since_release > _RELEASE_EVERY_BYTES:
            self.file, self.since_release = ckpt.file_cache(self.path), 0
        return tensor


def hf_config(model: ModelConfig, special_ids: dict, dtype: torch.dtype):
    """The transformers config object of the converted model."""
    common = dict(vocab_size=model.padded_vocab_size, hidden_size=model.hidden_size,
                  num_attention_heads=model.num_attention_heads, intermediate_size=model.ffn_size,
                  max_position_embeddings=model.seq_length, layer_norm_eps=model.layernorm_epsilon,
                  use_parallel_residual=model.parallel_residual, tie_word_embeddings=not model.untie_embeddings,
                  bos_token_id=special_ids.get("bos_token_id"), eos_token_id=special_ids.get("eos_token_id"),
                  pad_token_id=special_ids.get("pad_token_id"))
    if is_native(model):
        from transformers import GPTNeoXConfig

        config = GPTNeoXConfig(num_hidden_layers=model.compute_depth, hidden_act="gelu",
                               rotary_pct=model.rotary_percent, rotary_emb_base=model.rotary_base,
                               attention_bias=True, **common)
        config.architectures = ["GPTNeoXForCausalLM"]
    else:
        from mesh_hf.modeling_mesh import MeshConfig

        split = model.split
        config = MeshConfig(prelude_layers=split.prelude, core_layers=split.core, num_loops=split.loops,
                            coda_layers=split.coda, shared_core=split.shared, variant=model.variant,
                            buffer_slots=model.buffer_slots, rotary_pct=model.rotary_percent,
                            rotary_emb_base=model.rotary_base,
                            embedding_multiplier=math.sqrt(model.hidden_size) if model.scale_embeddings else 1.0,
                            **common)
        config.architectures = ["MeshForCausalLM"]
        config.auto_map = {"AutoConfig": "modeling_mesh.MeshConfig",
                           "AutoModelForCausalLM": "modeling_mesh.MeshForCausalLM"}
    config.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    return config


def _tokenizer_path(checkpoint: Path, meta: ckpt.CheckpointMeta, given: Optional[str]) -> str:
    from data_prep.tokenizer import file_sha256

    if given:
        path = given
    else:
        from pretrain.config import load_config

        path = load_config(checkpoint / "config.yaml").data.tokenizer
        if not path:
            raise ConfigError(f"{checkpoint / 'config.yaml'} names no data.tokenizer; pass --tokenizer PATH")
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path} (from {'--tokenizer' if given else checkpoint / 'config.yaml'}) "
                                "does not exist; pass --tokenizer PATH")
    if meta.tokenizer_sha256 and file_sha256(path) != meta.tokenizer_sha256:
        raise ConfigError(f"tokenizer {path} is not the one this checkpoint was trained with (sha256 differs from "
                          f"{meta.tokenizer_sha256[:12]}...); pass --tokenizer with the training tokenizer")
    return path


def final_validation(checkpoint: Path, step: int) -> Optional[dict]:
    """The last validation loss logged at or before `step`, from the run folder holding the
    checkpoint (runs/NAME/checkpoints/stepN -> runs/NAME/metrics.jsonl), if there is one."""
    folder = RunFolder(checkpoint.parent.parent)
    if checkpoint.parent.name != "checkpoints":
        return None
    last = None
    for row in folder.metrics():
        if "valid/loss" in row and row.get("step", math.inf) <= step:
            last = {"step": row["step"], "loss": row["valid/loss"], "ppl": row.get("valid/ppl")}
    return last


def parameter_counts(meta: ckpt.CheckpointMeta) -> dict:
    sizes = {name: math.prod(entry.shape) for name, entry in meta.tensors.items()}
    embedding = sum(n for name, n in sizes.items() if name.startswith(EMBEDDING_PREFIXES))
    return {"total": sum(sizes.values()), "embedding": embedding,
            "non_embedding": sum(sizes.values()) - embedding,
            "routers": sum(n for name, n in sizes.items() if ROUTER_MARKER in name)}


def model_card(model: ModelConfig, meta: ckpt.CheckpointMeta, counts: dict, validation: Optional[dict],
               native: bool, checkpoint: Path) -> str:
    tokens = meta.counters.get("consumed_samples", 0) * model.seq_length
    valid = (f"{validation['loss']:.4f} (perplexity {validation['ppl']:.2f}) at step {validation['step']}"
             if validation else "not recorded next to the checkpoint")
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"PATH\"{'' if native else ', trust_remote_code=True'})\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    code = ("transformers' own `GPTNeoXForCausalLM` (no custom code; the sqrt(d) embedding scale is folded into "
            "the embedding weights)" if native else
            "`MeshForCausalLM`, whose code ships in this folder (`modeling_mesh.py`: pure PyTorch + transformers); "
            "load it with `trust_remote_code=True`")
    rows = [("variant", model.variant), ("layer split", str(model.split)),
            ("unrolled depth", str(model.compute_depth)), ("hidden size", str(model.hidden_size)),
            ("attention heads", str(model.num_attention_heads)), ("vocabulary (padded)", str(model.padded_vocab_size)),
            ("context length", str(model.seq_length))]
    if model.variant == "mesh":
        rows.append(("buffer slots B", str(model.buffer_slots)))
    rows += [("parameters", f"{counts['total']:,} ({counts['non_embedding']:,} non-embedding)"),
             ("training step", str(meta.step)), ("training tokens", f"{tokens:,}"),
             ("final validation loss", valid), ("trained at", meta.layout_text())]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# {model.variant} {model.split} ({counts['total'] / 1e6:.1f}M parameters)\n\n"
            "A MeSH-family language model pretrained with mesh-pretrain and converted by `mesh convert hf` "
            f"from `{checkpoint}`.\n\n| | |\n|---|---|\n{table}\n\n"
            f"The model is {code}.\n\n```python\n{load}\n```\n\n"
            "Generate with the project's CLI: `mesh generate PATH \"prompt\"`; perplexity: `mesh eval ppl PATH --data ...`.\n")


def export(checkpoint: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
           tokenizer: Optional[str] = None, progress: bool = True) -> ExportReport:
    checkpoint, out_dir = ckpt.resolve_checkpoint(checkpoint), Path(out_dir)
    check_output_dir(out_dir, overwrite)
    problems = ckpt.verify(checkpoint, checksums=True)
    if problems:
        raise ckpt.CheckpointError(f"{problems[0]} (run `mesh ckpt verify {checkpoint}`; nothing was written)")
    meta = ckpt.read_meta(checkpoint)
    model = ModelConfig.from_dict(meta.model)
    native = is_native(model)
    tokenizer_path = _tokenizer_path(checkpoint, meta, tokenizer)

    hf_names = {name: names.to_hf(name, native) for name in meta.tensors}
    order = sorted(meta.tensors, key=lambda name: _natural_key(hf_names[name]))
    plans = [TensorPlan(hf_names[name], tuple(meta.tensors[name].shape), dtype) for name in order]
    train_name = {hf_names[name]: name for name in order}
    read = _TensorReader(checkpoint, meta)
    fold = math.sqrt(model.hidden_size) if native and model.scale_embeddings else None

    def tensor_of(plan: TensorPlan) -> torch.Tensor:
        name = train_name[plan.name]
        tensor = read(name)
        if fold is not None and name == names.EMBEDDING:
            tensor = tensor * fold  # exact in effect: embed(x) * s == (E * s)[x]
        return tensor.to(dtype)

    from tqdm import tqdm

    with written_whole(out_dir) as tmp:

        special = _write_tokenizer(tokenizer_path, tmp, model.seq_length)
        with tqdm(total=len(plans), desc="tensors", unit="tensor", disable=not progress, leave=False) as bar:
            files = write_weights(tmp, plans, tensor_of, max_shard_bytes,
                                  {"format": "pt", "mesh_checkpoint_step": str(meta.step)}, bar)
        config = hf_config(model, special, dtype)
        config.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        GenerationConfig(**{k: v for k, v in special.items() if v is not None}).save_pretrained(str(tmp))
        if not native:
            shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        counts = parameter_counts(meta)
        (tmp / "README.md").write_text(model_card(model, meta, counts, final_validation(checkpoint, meta.step),
                                                  native, checkpoint))
    return ExportReport(out_dir, native, files, counts["total"], meta.step)


def _write_tokenizer(path: str, out_dir: Path, max_length: int) -> dict:
    from mesh_hf.tokenizer_files import write_tokenizer

    return write_tokenizer(path, out_dir, max_length)
