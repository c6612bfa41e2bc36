"""Measured memory, the reference that pretrain/memory_estimate.py is checked against (on CPU).

- `saved_activations`: the bytes autograd keeps for backward during one forward pass,
  seen through `torch.autograd.graph.saved_tensors_hooks`. A tensor counts by its storage, once
  (a view of a saved tensor, or one tensor saved by two ops, holds no more memory), and
  parameters do not count (they are the model's state, not activations).
- `stage_activation_bytes`: `saved_activations` of one micro-batch through a pipeline stage,
  with what the stage received and sent.
- `live_storages`: every tensor storage reachable from Python, once (the model's parameters and
  gradients, and DeepSpeed's flat buffers, master weights and Adam moments, which are all
  Python-held tensors).
- `measure_engine`: a real DeepSpeed engine at a plan's layout over two training steps: its
  first forward's saved activations and the live storages it added after the second backward
  (so Adam's state exists), with ZeRO's per-backward reduction bucket told apart.
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


def stage_activation_bytes(config, stage: int = 0) -> int:
    """Saved-for-backward bytes of one micro-batch of random tokens through pipeline `stage` of
    `config`'s model (one process, no engine), plus what a pipeline stage also holds until its
    backward: the activations it received and the ones it sent."""
    from mesh_model.model import ModelParallelism, build_model

    pipeline = config.parallel.pipeline
    dtype = torch.bfloat16 if config.train.bf16 else torch.float32
    model = build_model(config.model, ModelParallelism.stage(config.model, pipeline, stage),
                        use_transformer_engine=False, params_dtype=dtype).to(dtype)  # as DeepSpeed casts it
    model.train()
    b, s = config.train.micro_batch_size, config.model.seq_length
    tokens = torch.randint(0, config.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    held = []
    if stage > 0:
        received = torch.randn(s, b, model.packed_width("recv"), dtype=dtype, requires_grad=True)
        model.set_input_tensor(received)
        held.append(received)
    saved = saved_activations(lambda: model(tokens, positions, None, labels=tokens), exclude=list(model.parameters()))
    if stage < pipeline - 1:
        held.append(saved.output)
    return saved.with_tensors(*held)


def live_storages() -> dict[tuple[int, int], int]:
    """Every tensor storage reachable through Python objects, once each: {(data_ptr, nbytes): nbytes}."""
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
    return seen


def live_tensor_bytes() -> int:
    """Bytes of all tensor storages reachable through Python objects (each storage once)."""
    return sum(live_storages().values())


@dataclass(frozen=True)
class EngineMemory:
    """What one rank of a real DeepSpeed engine holds, in bytes."""

    activations: int
    """Saved for backward by the first micro-batch's forward pass (parameters excluded)."""
    model_state: int
    """Live after the second backward pass (after a first step, so Adam's state exists):
    parameters, gradients, fp32 master weights, Adam moments, DeepSpeed's persistent buffers."""
    reduction_bucket: int
    """ZeRO 1/2's gradient-reduction bucket from that backward, when something still held it
    as it was measured (usually 0: DeepSpeed releases it at the backward's end; once, in CI, one
    rank of two still held it). Transient, so it is kept out of `model_state`."""


def record_reduction_buckets(optimizer) -> set[tuple[int, int]]:
    """Storage keys of the buckets ZeRO 1/2 allocate at each backward (`setup_buckets`), added
    to the returned set as they are made; empty for ZeRO 0 and 3 (whose bucket is persistent)."""
    keys: set[tuple[int, int]] = set()
    setup = getattr(optimizer, "setup_buckets", None)
    if setup is None:
        return keys

    def recording_setup(*args, **kwargs):
        result = setup(*args, **kwargs)
        for bucket in optimizer.ipg_buckets.values():
            keys.update(_storage_key(t) for t in bucket.buffer)
        return result

    optimizer.setup_buckets = recording_setup
    return keys


def measure_engine(config, plan, groups) -> EngineMemory:
    """Builds the model and its DeepSpeed engine for `plan` (the caller has initialised its
    process groups) and runs two steps of random tokens (seeded by the data-parallel rank),
    measuring the first forward pass's saved tensors and the state after the second backward."""
    from mesh_model.model import build_model
    from pretrain.engine import build_engine

    bf16 = config.train.bf16
    before = live_tensor_bytes()
    model = build_model(config.model, plan.model_parallelism, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    engine, _ = build_engine(model, plan=plan, groups=groups, optim=config.optim, total_steps=4, bf16=bf16)
    buckets = record_reduction_buckets(engine.optimizer)
    b, s = plan.micro_batch_size, config.model.seq_length
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(plan.dp_rank)
    tokens = torch.randint(0, config.model.vocab_size, (b, s), generator=generator).to(device)
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    activations = None
    for step in range(2):
        buckets.clear()  # only the last backward's bucket can still be live at the end
        saved = saved_activations(lambda e=engine: e(tokens, positions, None, labels=tokens),
                                  exclude=list(engine.module.parameters()))
        if activations is None:
            activations = saved.bytes
        loss = saved.output.mean()
        del saved
        engine.backward(loss)
        del loss
        if step == 0:
            engine.step()
    after = live_storages()
    bucket = sum(n for key, n in after.items() if key in buckets)
    del engine, model
    return EngineMemory(activations=activations, model_state=sum(after.values()) - before - bucket,
                        reduction_bucket=bucket)
