"""A checkpoint of any parallel layout as one world-size-1 mesh_model, in this process, without
DeepSpeed: pretrain/checkpoint/format.py verifies it and merges its TP shards (`consolidate`);
the model is rebuilt from the ModelConfig in its metadata.

The caller provides megatron's parallel state at world size 1 (`single_process_model_parallel`,
which the CLI opens once for all checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mesh_model.config import ModelConfig
from mesh_model.model import MeshLanguageModel, build_model
from pretrain.checkpoint import format as ckpt


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: ckpt.CheckpointMeta
    config: ModelConfig
    model: MeshLanguageModel

    @property
    def label(self) -> str:
        """What --compare calls it: the variant and its layer split."""
        return f"{self.config.variant} {self.config.split}"


def resolve(path: str | Path) -> Path:
    """A step directory; a checkpoints folder or a run folder mean their newest complete checkpoint."""
    return ckpt.resolve_checkpoint(path)


def load(path: str | Path, verify_checksums: bool = True) -> LoadedCheckpoint:
    """The checkpoint's weights in a fresh world-size-1 fp32 model (eval mode). A damaged or
    incomplete checkpoint is one CheckpointError line."""
    path = resolve(path)
    meta = ckpt.read_meta(path)
    problems = ckpt.verify(path, checksums=verify_checksums)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ckpt.CheckpointError(f"{problems[0]}{more}; `mesh ckpt verify {path.parent}` lists them")
    config = ModelConfig.from_dict(meta.model)
    weights = ckpt.consolidate(path)
    model = build_model(config, use_transformer_engine=False)
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - set(weights))
    if missing:
        raise ckpt.CheckpointError(f"{path}: lacks {len(missing)} parameters of its own model config "
                                   f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; damaged)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = weights[name]
            if value.shape != param.shape:
                raise ckpt.CheckpointError(f"{path}: {name} has shape {list(value.shape)}, its model config "
                                           f"says {list(param.shape)} (damaged)")
            param.copy_(value)
    return LoadedCheckpoint(path, meta, config, model.eval())
