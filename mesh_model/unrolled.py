"""The unrolled compute graph of a recursive model, and how pipeline stages cut it.

A `4+8R2+4` model is, as a program, a straight line of operations:

    layer prelude.0 .. layer prelude.3
    begin                                   (recurrence: after the prelude)
    loop_start 0, layer core.0 .. core.7, loop_end 0
    loop_start 1, layer core.0 .. core.7, loop_end 1
    layer coda.0 .. layer coda.3

With an unshared core (`4+8x2+4`, the paper's vanilla+mesh) the program is the
same, but loop t runs its own copy of the core: its layer i is the distinct
module `core.<t * L_core + i>` (loop 1 above runs core.8 .. core.15), with its
own layer number and init seed. The recurrence events (the MeSH buffer and
routers) sit at the same block boundaries either way.

The single-process model runs the whole list. Pipeline parallelism cuts it
into contiguous stages by layer count (evenly, or by an explicit layout); an
event belongs to the stage of the layer before it (stage 0 if none). A shared
core layer whose loops fall on several stages exists on each of them as a
replica of the same weights; the trainer sums their gradients across those
stages. Unshared core layers run once each, so they are never replicas.

What crosses a stage boundary is the `RecurrentState`: the hidden state plus
whichever recurrence fields are still needed after the cut (h_emb, h0, h(t),
the MeSH buffer). `live_fields` works that out from the events' declared
uses/definitions, and `pack`/`unpack` put them into the one [s, b, K*h]
tensor that megatron's p2p communication sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mesh_model.config import ConfigError, LayerSplit, ModelConfig
from mesh_model.recurrence import EventFields, RecurrentState, recurrence_fields


@dataclass(frozen=True)
class Op:
    kind: str  # "layer" | "begin" | "loop_start" | "loop_end"
    block: Optional[str] = None  # layers: "prelude" | "core" | "coda"
    index: Optional[int] = None  # layers: index within the block (unshared core: t * L_core + i)
    loop: Optional[int] = None  # core layers and loop events: the loop number

    def __str__(self) -> str:
        if self.kind == "layer":
            return f"{self.block}.{self.index}" + (f"@{self.loop}" if self.loop is not None else "")
        return self.kind + (f" {self.loop}" if self.loop is not None else "")


def unrolled_ops(split: LayerSplit) -> list[Op]:
    ops = [Op("layer", "prelude", i) for i in range(split.prelude)]
    if split.is_recursive:
        ops.append(Op("begin"))
        for t in range(split.loops):
            ops.append(Op("loop_start", loop=t))
            first = 0 if split.shared else t * split.core  # unshared: loop t has its own copy
            ops.extend(Op("layer", "core", first + i, loop=t) for i in range(split.core))
            ops.append(Op("loop_end", loop=t))
        ops.extend(Op("layer", "coda", i) for i in range(split.coda))
    return ops


def stage_layer_counts(num_layers: int, stages: int, layout: Optional[Sequence[int]] = None) -> list[int]:
    """Layers per stage: `layout` if given (validated), else as even as possible (earlier stages +1)."""
    if layout:
        if len(layout) != stages or sum(layout) != num_layers or min(layout) < 1:
            raise ConfigError(
                f"parallel.pipeline_layout={list(layout)} must have {stages} entries (one per stage), "
                f"each >= 1, summing to the {num_layers} layers of the unrolled graph"
            )
        return list(layout)
    if num_layers < stages:
        raise ConfigError(
            f"parallel.pipeline={stages} stages but the unrolled graph has only {num_layers} layers"
        )
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def partition(ops: list[Op], stages: int, layout: Optional[Sequence[int]] = None) -> list[range]:
    """Op index ranges, one per stage. Events go with the layer before them."""
    num_layers = sum(op.kind == "layer" for op in ops)
    counts = stage_layer_counts(num_layers, stages, layout)
    bounds, seen, stage = [0], 0, 0
    for i, op in enumerate(ops):
        if op.kind != "layer":
            continue
        if seen == counts[stage]:  # this layer opens the next stage
            bounds.append(i)
            stage, seen = stage + 1, 0
        seen += 1
    bounds.append(len(ops))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def live_fields(ops: list[Op], boundary: int, fields: Optional[EventFields]) -> list[str]:
    """Recurrence fields that must cross a cut made just before ops[boundary]:
    defined earlier, and read later before being redefined."""
    if fields is None:
        return []
    used_at = {k: set(v[0]) for k, v in fields.items()}
    defined_at = {k: set(v[1]) for k, v in fields.items()}
    defined_at["start"] = {"embeddings"}
    events_before = ["start"] + [op.kind for op in ops[:boundary] if op.kind != "layer"]
    available = set().union(*(defined_at.get(e, set()) for e in events_before))
    live = []
    for name in ("embeddings", "anchor", "loop_input", "buffer"):
        if name not in available:
            continue
        for op in ops[boundary:]:
            if op.kind == "layer":
                continue
            if name in used_at[op.kind]:
                live.append(name)
                break
            if name in defined_at[op.kind]:
                break
    return live


@dataclass(frozen=True)
class PipelineCut:
    """The unrolled program of one model cut into pipeline stages, computed once.

    Everything a stage needs to know about the cut: its ops, which recurrence
    fields it receives and sends, and which stages hold each core layer (a core
    layer on several stages is a replica whose gradients are summed across them).
    """

    program: tuple[Op, ...]
    stages: tuple[range, ...]
    fields: Optional[EventFields]
    """The recurrence's {event: (uses, defines)}; None for a non-recursive model."""

    @classmethod
    def of(cls, config: ModelConfig, stages: int = 1, layout: Optional[Sequence[int]] = None) -> "PipelineCut":
        """Raises ConfigError (one line) for a layout that does not fit the program."""
        program = unrolled_ops(config.split)
        return cls(tuple(program), tuple(partition(program, stages, layout or None)), recurrence_fields(config))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_ops(self, stage: int) -> list[Op]:
        return [self.program[i] for i in self.stages[stage]]

    def recv_fields(self, stage: int) -> list[str]:
        """Recurrence fields packed beside the hidden state into what `stage` receives."""
        return [] if stage == 0 else live_fields(list(self.program), self.stages[stage].start, self.fields)

    def send_fields(self, stage: int) -> list[str]:
        last = stage == self.num_stages - 1
        return [] if last else live_fields(list(self.program), self.stages[stage].stop, self.fields)

    def core_holders(self) -> dict[int, tuple[int, ...]]:
        """{core layer index: the stages that run it}, for every core layer."""
        holders: dict[int, set[int]] = {}
        for stage, ops in enumerate(self.stages):
            for i in ops:
                op = self.program[i]
                if op.kind == "layer" and op.block == "core":
                    holders.setdefault(op.index, set()).add(stage)
        return {index: tuple(sorted(s)) for index, s in sorted(holders.items())}

    def replicated_stage_sets(self) -> list[tuple[int, ...]]:
        """The distinct sets of (two or more) stages that share a core layer."""
        return sorted({s for s in self.core_holders().values() if len(s) > 1})


def pack(state: RecurrentState, names: Sequence[str]) -> torch.Tensor:
    """[s, b, K*h]: the hidden state, then each named field (the buffer as B*h)."""
    parts = [state.hidden]
    for name in names:
        value = getattr(state, name)
        if name == "buffer":  # [B, s, b, h] -> [s, b, B*h]
            slots, s, b, h = value.shape
            value = value.permute(1, 2, 0, 3).reshape(s, b, slots * h)
        parts.append(value)
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def unpack(packed: torch.Tensor, names: Sequence[str], hidden_size: int, num_slots: int = 0) -> RecurrentState:
    widths = [hidden_size] + [hidden_size * (num_slots if n == "buffer" else 1) for n in names]
    pieces = torch.split(packed, widths, dim=-1)
    state = RecurrentState(hidden=pieces[0])
    for name, value in zip(names, pieces[1:]):
        if name == "buffer":  # [s, b, B*h] -> [B, s, b, h]
            s, b, _ = value.shape
            value = value.reshape(s, b, num_slots, hidden_size).permute(2, 0, 1, 3)
        setattr(state, name, value)
    return state


def packed_width(names: Sequence[str], hidden_size: int, num_slots: int = 0) -> int:
    return hidden_size * (1 + sum(num_slots if n == "buffer" else 1 for n in names))
