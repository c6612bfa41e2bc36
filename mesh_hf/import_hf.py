"""`mesh convert from-hf`: a Hugging Face model folder -> a training checkpoint to continue from.

Two kinds of folder are read:
* transformers' own GPTNeoXForCausalLM (a Pythia checkpoint on disk, for example): a vanilla
  model with `model.scale_embeddings=false`, since GPT-NeoX does not scale its embeddings (the
  function is kept exactly);
* a folder written by `mesh convert hf` (MeshForCausalLM): the same model it came from.

`--split` (with `--variant`) builds a recursive model from a GPT-NeoX folder instead, and
`--layer-map` says which source layers initialise which target layers:

    --split 4+8R2+4 --variant mesh --layer-map prelude=0-3,core=4-11,coda=20-23

gives prelude layers 0-3 from source layers 0-3, the shared core's 8 layers from source layers
4-11 and the coda from source layers 20-23 (an unshared `x` core needs L_core x N_loop source
layers, loop by loop). The embedding, the final norm and the head come from the source; what the
source does not have (MeSH routers, learned coefficients) starts from the model's own
initialisation (`model.init_seed`).

The checkpoint is at step 0 with no optimizer state: `mesh train OUT/config.yaml
checkpoint.resume=OUT ...` starts a fresh optimizer and LR schedule from these weights. Its
tensors are split into `--tensor` TP shards; pipeline stages pick their layers at load, so any
pipeline layout loads it (`--pipeline` only sets the written config's parallel.pipeline).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from mesh_hf import names
from mesh_hf.output_folder import check_output_dir, written_whole
from mesh_model.config import ConfigError, ModelConfig, parse_layer_split
from pretrain.checkpoint import format as ckpt

SUPPORTED = ("GPTNeoXForCausalLM", "MeshForCausalLM")


# ============================================================================ reading the folder
def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED:
        raise ConfigError(f"{folder}: architecture {architecture} is not supported; mesh convert from-hf reads "
                          "GPTNeoXForCausalLM (e.g. Pythia) and folders written by `mesh convert hf`")
    return config


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder} has no model.safetensors(.index.json) or pytorch_model.bin")


def hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, one file at a time."""
    for path in weight_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path} (named by the index) is missing")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
            except SafetensorError as err:
                raise ckpt.CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def model_config_of(hf: dict, split: Optional[str], variant: Optional[str]) -> ModelConfig:
    """The training ModelConfig of an HF config (with a recursive split when asked for)."""
    architecture = hf["architectures"][0]
    vocab = int(hf["vocab_size"])
    rope = hf.get("rope_parameters") or {}
    values = dict(
        hidden_size=int(hf["hidden_size"]), num_attention_heads=int(hf["num_attention_heads"]),
        vocab_size=vocab, make_vocab_size_divisible_by=128 if vocab % 128 == 0 else 1,
        seq_length=int(hf.get("max_position_embeddings", 2048)), ffn_hidden_size=int(hf["intermediate_size"]),
        layernorm_epsilon=float(hf.get("layer_norm_eps", 1e-5)),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
        rotary_percent=float(hf.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))),
        rotary_base=int(hf.get("rotary_emb_base", rope.get("rope_theta", 10000))),
    )
    if architecture == "GPTNeoXForCausalLM":
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (the stack's layers use exact gelu)")
        if not hf.get("attention_bias", True):
            raise ConfigError("attention_bias=false is not supported (the stack's layers have biases)")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type={rope['rope_type']!r} is not supported (plain rotary only)")
        depth = int(hf["num_hidden_layers"])
        values.update(scale_embeddings=False, layer_split=split or str(depth), variant=variant or
                      ("vanilla" if split is None else "mesh"))
        if split is None and variant not in (None, "vanilla"):
            raise ConfigError(f"--variant {variant} needs --split (the recursive layer split, e.g. 4+8R2+4)")
    else:
        if split or variant:
            raise ConfigError("--split / --variant apply to GPT-NeoX folders; a `mesh convert hf` folder "
                              "converts back to the model it came from")
        kind = "R" if hf.get("shared_core", True) else "x"
        multiplier = float(hf.get("embedding_multiplier", 1.0))
        scaled = multiplier != 1.0
        if scaled and not math.isclose(multiplier, math.sqrt(values["hidden_size"]), rel_tol=1e-12):
            raise ConfigError(f"embedding_multiplier={multiplier} is neither 1 nor sqrt(hidden_size)")
        values.update(scale_embeddings=scaled, variant=hf["variant"],
                      layer_split=f"{hf['prelude_layers']}+{hf['core_layers']}{kind}{hf['num_loops']}+"
                                  f"{hf['coda_layers']}" if hf["num_loops"] else str(hf["prelude_layers"]))
        if hf["variant"] == "mesh":
            values["buffer_slots"] = int(hf["buffer_slots"])
    return ModelConfig(**values)


# ============================================================================ the layer map
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_layer_map(text: str, model: ModelConfig, source_layers: int) -> dict[str, list[int]]:
    """'prelude=0-3,core=4-11,coda=20-23' -> {"prelude": [0..3], "core": [...], "coda": [...]},
    checked against the target's block sizes and the source's layer count."""
    split = model.split
    sizes = {"prelude": split.prelude, "core": split.unique_core_layers, "coda": split.coda}
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        block, _, ranges = part.partition("=")
        block = block.strip()
        if block not in sizes:
            raise ConfigError(f"--layer-map entry {part!r}: the blocks are prelude, core and coda")
        layers: list[int] = []
        for piece in ranges.split("+"):
            m = _RANGE.match(piece.strip())
            if not m:
                raise ConfigError(f"--layer-map entry {part!r}: write source layers as A-B or A (joined by +)")
            low, high = int(m.group(1)), int(m.group(2) or m.group(1))
            if high < low:
                raise ConfigError(f"--layer-map entry {part!r}: range {low}-{high} is empty")
            layers.extend(range(low, high + 1))
        missing = [i for i in layers if i >= source_layers]
        if missing:
            raise ConfigError(f"--layer-map names source layer {missing[0]} but the source has layers "
                              f"0-{source_layers - 1}")
        out[block] = layers
    for block, size in sizes.items():
        if len(out.get(block, [])) != size:
            raise ConfigError(f"--layer-map gives {len(out.get(block, []))} source layers for {block}, "
                              f"the split {split} needs {size}")
    return out


def _target_names(name: str, layer_map: Optional[dict[str, list[int]]]) -> list[str]:
    """Training names a source tensor initialises (a source layer may feed several targets)."""
    train_name = names.from_hf(name)
    if layer_map is None:
        return [train_name]
    index = names.native_layer_index(name)
    if index is None:
        return [train_name]
    rest = train_name.split(".", 3)[3]  # prelude.layers.I.<rest>
    return [f"{block}.layers.{k}.{rest}" for block, layers in layer_map.items()
            for k, source in enumerate(layers) if source == index]


# ============================================================================ TP split rule
def tp_partition_dim(name: str) -> Optional[int]:
    """megatron's partition_dim of a training parameter (None: replicated over TP): column-parallel
    (QKV, FC1: weight and bias) and the vocab-parallel embedding and head split dim 0, row-parallel
    weights (proj, FC2) dim 1. tests/unit/mesh_hf checks this against the built model."""
    if name in (names.EMBEDDING, names.OUTPUT):
        return 0
    if re.search(r"\.(self_attention\.linear_qkv|mlp\.linear_fc1)\.(weight|bias)$", name):
        return 0
    if re.search(r"\.(self_attention\.linear_proj|mlp\.linear_fc2)\.weight$", name):
        return 1
    return None


def expected_names(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{training name: shape} of every parameter of `model`, without building it."""
    h, f, v = model.hidden_size, model.ffn_size, model.padded_vocab_size
    layer = {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
             "pre_mlp_layernorm.weight": (h,), "pre_mlp_layernorm.bias": (h,),
             "self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
             "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
             "mlp.linear_fc1.weight": (f, h), "mlp.linear_fc1.bias": (f,),
             "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,)}
    split = model.split
    out = {names.EMBEDDING: (v, h), "final_layernorm.weight": (h,), "final_layernorm.bias": (h,)}
    if model.untie_embeddings:
        out[names.OUTPUT] = (v, h)
    for block, count in (("prelude", split.prelude), ("core", split.unique_core_layers), ("coda", split.coda)):
        for i in range(count):
            out.update({f"{block}.layers.{i}.{k}": s for k, s in layer.items()})
    return out


def fresh_recurrence_tensors(model: ModelConfig) -> dict[str, torch.Tensor]:
    """The recurrence's parameters (routers, coefficients) at the model's own initialisation."""
    from mesh_model.recurrence import build_recurrence

    recurrence = build_recurrence(model)
    if recurrence is None:
        return {}
    return {f"recurrence.{k}": v.detach().clone() for k, v in recurrence.named_parameters()}


# ============================================================================ writing
def write_checkpoint(tensors: dict[str, torch.Tensor], model: ModelConfig, out: Path, tensor_parallel: int,
                     pipeline_parallel: int, tokenizer: Optional[Path], source: Path,
                     adam_moments: bool = False) -> Path:
    """A step-0 checkpoint (no optimizer state) in pretrain/checkpoint's format, TP-sharded.
    `adam_moments` adds zero Adam moments beside each tensor, as a training checkpoint has them
    (the conversion benchmark reads checkpoints of training's size)."""
    from pretrain.config import RunConfig
    from pretrain.state import TrainState

    with written_whole(out) as tmp:
        shards: list[dict] = [{} for _ in range(tensor_parallel)]
        index = {}
        for name in sorted(tensors):
            value = tensors[name].to(torch.float32).contiguous()
            dim = tp_partition_dim(name)
            if dim is not None and value.shape[dim] % tensor_parallel:
                raise ConfigError(f"--tensor {tensor_parallel} does not divide {name} dimension {dim} "
                                  f"({value.shape[dim]})")
            ranks = range(tensor_parallel) if dim is not None else [0]
            for r in ranks:
                part = value.chunk(tensor_parallel, dim)[r].clone() if dim is not None else value
                shards[r][name] = {"param": part}
                if adam_moments:
                    shards[r][name].update({key: torch.zeros_like(part) for key in ckpt.ADAM_KEYS})
            index[name] = ckpt.TensorRecord(shape=list(value.shape), tp_dim=dim,
                                            tp_size=tensor_parallel if dim is not None else 1,
                                            shards={str(r): ckpt.state_file_name(r, 0, 0) for r in ranks})
        files = {}
        for r, shard in enumerate(shards):
            rel = ckpt.state_file_name(r, 0, 0)
            files[rel] = ckpt.save_file(shard, tmp / rel)
            shard.clear()
        config = RunConfig()
        config.model = model
        config.parallel.tensor, config.parallel.pipeline = tensor_parallel, pipeline_parallel
        tmp.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / tokenizer.name)
            if _has_default_eod(tokenizer):  # data_prep's HF tokenizer ends documents with <|endoftext|>
                config.data.tokenizer = str((out / tokenizer.name).resolve())
        config.save(tmp / "config.yaml")
        files["config.yaml"] = ckpt.bytes_record((tmp / "config.yaml").read_bytes())
        if tokenizer is not None:
            files[tokenizer.name] = ckpt.bytes_record((tmp / tokenizer.name).read_bytes())
        meta = ckpt.CheckpointMeta(
            step=0, counters=TrainState().state_dict(), adam_step=1.0 if adam_moments else None, scheduler={}, engine={},
            layout={"tensor": tensor_parallel, "pipeline": pipeline_parallel, "data": 1, "zero_stage": 1},
            model=model.to_dict(), reason=f"converted from {source}", tensors=index, files=files,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__, converted_from=str(source))
        ckpt.atomic_write_text(tmp / ckpt.META, meta.to_json())
    return out


def _has_default_eod(tokenizer_json: Path) -> bool:
    from data_prep.tokenizer import DEFAULT_EOD_TOKEN

    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_json)).token_to_id(DEFAULT_EOD_TOKEN) is not None
    except Exception:  # tokenizers raises a bare Exception on a file it cannot read
        return False


def import_hf(folder: Path, out: Path, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
              split: Optional[str] = None, variant: Optional[str] = None, layer_map: Optional[str] = None,
              overwrite: bool = False) -> tuple[Path, ModelConfig, list[str]]:
    """Returns (checkpoint, its model config, notes)."""
    folder, out = Path(folder), Path(out)
    check_output_dir(out, overwrite)
    hf = read_hf_config(folder)
    if split is not None:
        parse_layer_split(split)  # one-line error for a malformed split, before anything is read
    model = model_config_of(hf, split, variant)
    native = hf["architectures"][0] == "GPTNeoXForCausalLM"
    mapping = None
    if native and model.split.is_recursive:
        if not layer_map:
            raise ConfigError(f"--split {split} needs --layer-map (which source layers initialise the prelude, "
                              "core and coda), e.g. prelude=0-3,core=4-11,coda=20-23")
        mapping = parse_layer_map(layer_map, model, int(hf["num_hidden_layers"]))
    elif layer_map:
        raise ConfigError("--layer-map applies with --split (a recursive target built from a GPT-NeoX folder)")
    expected = expected_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in hf_tensors(folder):
        if names.NATIVE_BUFFERS.search(name):
            continue
        try:
            targets = _target_names(name, mapping)
        except KeyError as err:
            raise ConfigError(f"{folder}: {err.args[0]}; the folder is not a GPT-NeoX / MeSH model this stack knows")
        for target in targets:
            tensors[target] = value
    notes = []
    tensors.update({k: v for k, v in fresh_recurrence_tensors(model).items() if k not in tensors})
    for name, shape in expected.items():
        if name not in tensors:
            raise ConfigError(f"{folder} lacks the weights of {name} (a damaged or incomplete folder?)")
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, the config implies {shape}")
    unused = sorted(set(tensors) - set(expected) - {k for k in tensors if k.startswith("recurrence.")})
    if unused:
        raise ConfigError(f"{folder}: weights {unused[:3]} do not belong to the model its config describes")
    if mapping:
        notes.append(f"initialised {model.split} from source layers " +
                     ", ".join(f"{b} {v[0]}-{v[-1]}" if v else f"{b} none" for b, v in mapping.items()) +
                     ("; routers / coefficients from the model's own init" if model.variant != "base" else ""))
    tokenizer = folder / "tokenizer.json"
    write_checkpoint(tensors, model, out, tensor_parallel, pipeline_parallel,
                     tokenizer if tokenizer.is_file() else None, folder)
    return out, model, notes
