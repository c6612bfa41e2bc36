"""Writing safetensors files one tensor at a time, sharded above a size limit.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. A model folder
is written here from tensors that arrive one by one (read from a checkpoint's memory-mapped
state files), so the format is written directly: an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes in header order.
Shapes and dtypes are known before any tensor is read (from the checkpoint's metadata), so
the header comes first and each tensor is written and released as it arrives; peak memory is
one tensor. The files are read back by the safetensors library in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def shard(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets a file of its own)."""
    shards, current, size = [], [], 0
    for plan in plans:
        if current and size + plan.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(plan)
        size += plan.nbytes
    if current:
        shards.append(current)
    return shards


def _header(plans: list[TensorPlan], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for plan in plans:
        header[plan.name] = {"dtype": DTYPE_NAMES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte alignment of the data, as the library writes it
    return struct.pack("<Q", len(text)) + text


def write_weights(out_dir: Path, plans: list[TensorPlan], tensor_of: Callable[[TensorPlan], torch.Tensor],
                  max_shard_bytes: int, metadata: dict[str, str], progress: Iterable | None = None) -> list[str]:
    """Writes model.safetensors (or model-0000k-of-0000n.safetensors + the index); returns the file names.
    `tensor_of(plan)` returns the tensor, already of `plan.dtype` and `plan.shape`."""
    groups = shard(plans, max_shard_bytes)
    names = [SINGLE_FILE] if len(groups) == 1 else [
        f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for file_name, group in zip(names, groups):
        with open(out_dir / file_name, "wb") as f:
            f.write(_header(group, metadata))
            for plan in group:
                tensor = tensor_of(plan)
                if tuple(tensor.shape) != plan.shape or tensor.dtype != plan.dtype:
                    raise ValueError(f"{plan.name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"planned {plan.shape} {plan.dtype}")
                # Raw bytes without a copy: reinterpret as uint8 (works for bf16, which numpy lacks).
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del tensor
                if progress is not None:
                    progress.update(1)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in plans)},
                 "weight_map": {p.name: file_name for file_name, group in zip(names, groups) for p in group}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
