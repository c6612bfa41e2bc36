"""Measured memory, the reference that pretrain/memory_estimate.py is checked against (on CPU).

- `saved_activations`: the bytes autograd keeps for backward during one forward pass,
  seen through `torch.autograd.graph.saved_tensors_hooks`. A tensor counts by its storage, once
  (a view of a saved tensor, or one tensor saved by two ops, holds no more memory), and
  parameters do not count (they are the model's state, not activations).
- `live_tensor_bytes`: the bytes of every tensor reachable from Python, by unique storage (the
  model's parameters and gradients, and DeepSpeed's flat buffers, master weights and Adam
  moments, which are all Python-held tensors).
- `engine_model_state_bytes`: `live_tensor_bytes` of a real DeepSpeed engine after two training
  steps (so Adam's state exists), at a plan's layout.
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


def engine_model_state_bytes(config, plan, groups) -> int:
    """Bytes the model and its DeepSpeed engine hold after a backward pass (parameters, gradients,
    fp32 master weights, Adam moments, DeepSpeed's buffers), measured on a real engine built for
    `plan` (the caller has initialised its process groups) over two steps of random tokens."""
    from mesh_model.model import build_model
    from pretrain.engine import build_engine

    bf16 = config.train.bf16
    before = live_tensor_bytes()
    model = build_model(config.model, plan.model_parallelism, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    engine, _ = build_engine(model, plan=plan, groups=groups, optim=config.optim, total_steps=4, bf16=bf16)
    b, s = config.train.micro_batch_size, config.model.seq_length
    device = next(model.parameters()).device
    tokens = torch.randint(0, config.model.vocab_size, (b, s), device=device)
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    for step in range(2):
        loss = engine(tokens, positions, None, labels=tokens).mean()
        engine.backward(loss)
        del loss
        if step == 0:
            engine.step()
    measured = live_tensor_bytes() - before
    del engine, model
    return measured
