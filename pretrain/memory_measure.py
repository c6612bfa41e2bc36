"""Measured memory, the reference that pretrain/memory_estimate.py is checked against (on CPU).

- `saved_activations`: the bytes autograd keeps for backward during one forward pass,
  seen through `torch.autograd.graph.saved_tensors_hooks`. A tensor counts by its storage, once
  (a view of a saved tensor, or one tensor saved by two ops, holds no more memory), and
  parameters do not count (they are the model's state, not activations).
- `live_tensor_bytes`: the bytes of every tensor reachable from Python, by unique storage (the
  model's parameters and gradients, and DeepSpeed's flat buffers, master weights and Adam
  moments, which are all Python-held tensors).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


@dataclass
class SavedTensors:
    """The storages autograd saved for backward in one forward pass, and that pass's output."""

    storages: dict[tuple[int, int], int]
    output: torch.Tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def with_tensors(self, *tensors: torch.Tensor) -> int:
        """Bytes of the saved storages together with those of `tensors` (each storage once): a
        pipeline stage also holds what it received and what it sent until its backward."""
        storages = dict(self.storages)
        for tensor in tensors:
            key = _storage_key(tensor)
            storages[key] = key[1]
        return sum(storages.values())


def saved_activations(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> SavedTensors:
    """What `forward()` saves for backward. Tensors sharing a storage with one of `exclude`
    (the parameters) are left out. The output is kept so the caller can run backward (or drop
    it, which frees the graph)."""
    excluded = {_storage_key(t) for t in exclude}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor):
        if tensor.device.type != "meta":
            key = _storage_key(tensor)
            if key not in excluded:
                seen[key] = key[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return SavedTensors(seen, output)


def live_tensor_bytes() -> int:
    """Bytes of all tensor storages reachable through Python objects (each storage once)."""
    gc.collect()
    seen: dict[tuple[int, int], int] = {}
    for obj in gc.get_objects():
        try:
            # type(), not isinstance(): the latter reads __class__, which some deprecated
            # torch objects answer with a warning.
            if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
                key = _storage_key(obj)
                seen[key] = key[1]
        except (ReferenceError, RuntimeError):  # a dead weak proxy, or a tensor without storage
            continue
    return sum(seen.values())
