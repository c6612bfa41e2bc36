"""The loop around the shared core block, and how state is carried between loops.

This is the file to read next to the paper. With p = f_pre(h_emb) the prelude
output and f_core the shared core block:

Fixed recurrences (paper Sec. 2), h(0) = p and for t = 0 .. N_loop-1:

    h(t+1) = f_core(h(t)) + h_sup(t)

    base        h_sup = 0
    residual    h_sup = h(t)
    anchor      h_sup = h0 = p           (the prelude output)
    anchor_emb  h_sup = h_emb            (the paper's anchor*)

and any sum of them (the paper's Table 4), written joined by '+': anchor+anchor_emb gives
h_sup = h0 + h_emb, residual+anchor+anchor_emb gives h(t) + h0 + h_emb.

Learned combinations (Table 4): h(t+1) = a1 f_core(h(t)) + a2 h0 + a3 h_emb, with a(t) three
trainable scalars per loop step (static_combination) or computed per token from h(t) by a small
linear map (dynamic_combination); see LearnedCombination for the choices the paper leaves open.

MeSH (paper Sec. 3): a buffer M of B slots, each [s, b, h].

    init          M_0 = h_emb, M_1..M_{B-1} = 0
    transitional  M_b += p * w^write_0(p)_b         h(0)   = sum_b M_b * w^read_0(p)_b
    loop t        hm = f_core(h(t))
                  M_b += hm * w^write_{t+1}(h(t))_b   h(t+1) = sum_b M_b * w^read_{t+1}(h(t))_b

Each router is Linear(h -> B, bias) followed by a softmax over the B slots, per
token. There are N_loop + 1 write/read pairs. Writes are additive and soft:
nothing is ever overwritten. The coda receives h(N_loop), the final read.

A recurrence is written as three events around the core block, so that the
same code runs whole (`forward`) or cut into pipeline stages (see unrolled.py):

    begin(state)          after the prelude              (MeSH: the transitional cycle)
    loop_start(t, state)  before the core, loop t        (remember h(t))
    loop_end(t, state)    after the core, loop t         (compose h(t+1))

Choices the paper leaves open, and what this implementation does:
- Router init: truncated normal (+-2 std) with std sqrt(2 / (5 h)) and zero bias
  (`ModelConfig.router_init_std` overrides the std). At init every router is close
  to uniform over the slots.
- Router softmax in fp32 (logits are upcast); the weights are then cast to the
  activation dtype so the buffer stays in the training dtype (bf16 buffers halve
  its memory; the weights are in [0, 1] where bf16 is accurate to ~3 digits).
- Slot 0 holds the embedding exactly as the prelude sees it, i.e. after the
  sqrt(h) scaling when `scale_embeddings` is on.
- No norm is inserted before the coda (the paper's parameter counts have none).
- The routers are plain `torch.nn.Linear`, replicated on every tensor-parallel
  rank: their input (the full hidden state) and the gradient reaching it are
  identical across TP ranks, so their gradients are too.

Diagnostics: with `MeshRecurrence.statistics` set to a `RouterStatistics`
(router_stats.py), every router call also adds its logits' statistics and the
last write the buffer's slot norms; unset (the default) nothing extra runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from mesh_model.config import LEARNED_COMBINATIONS, ModelConfig, fixed_supplements
from mesh_model.router_stats import RouterStatistics
from mesh_model.seeding import seeded

CoreStep = Callable[[torch.Tensor], torch.Tensor]
"""Applies the shared core block once: [s, b, h] -> [s, b, h]."""


@dataclass
class RecurrentState:
    """What flows along the unrolled graph, and across pipeline stages."""

    hidden: torch.Tensor  # [s, b, h] the current activation
    embeddings: Optional[torch.Tensor] = None  # [s, b, h] h_emb
    anchor: Optional[torch.Tensor] = None  # [s, b, h] h0 = p (anchor)
    loop_input: Optional[torch.Tensor] = None  # [s, b, h] h(t), the current loop's core input
    buffer: Optional[torch.Tensor] = None  # [B, s, b, h] the MeSH memory
    trace: Optional[list] = None  # if a list, events append their intermediate tensors


# Field names of RecurrentState that an event reads ("uses") or writes ("defines").
# unrolled.py uses them to decide what must cross a pipeline-stage boundary.
EventFields = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


class Recurrence(nn.Module):
    """Base class: the events plus the whole-loop composition."""

    num_loops: int

    def fields(self) -> EventFields:
        """{event: (fields used, fields defined)} for "begin", "loop_start", "loop_end"."""
        raise NotImplementedError

    def begin(self, state: RecurrentState) -> None:
        raise NotImplementedError

    def loop_start(self, t: int, state: RecurrentState) -> None:
        raise NotImplementedError

    def loop_end(self, t: int, state: RecurrentState) -> None:
        raise NotImplementedError

    def forward(
        self,
        prelude_output: torch.Tensor,
        embeddings: torch.Tensor,
        core_step: CoreStep,
        trace: Optional[list] = None,
    ) -> torch.Tensor:
        """The whole recurrence: begin, then N_loop x (loop_start, core, loop_end)."""
        state = RecurrentState(hidden=prelude_output, embeddings=embeddings, trace=trace)
        self.begin(state)
        for t in range(self.num_loops):
            self.loop_start(t, state)
            state.hidden = core_step(state.hidden)
            self.loop_end(t, state)
        return state.hidden


class FixedRecurrence(Recurrence):
    """base, residual, anchor, anchor_emb and their sums: h(t+1) = f_core(h(t)) + sum of the supplements.

    `variant` names the supplements joined by '+' ("anchor+anchor_emb": h(t+1) = f_core(h(t)) +
    h0 + h_emb); "base" has none.
    """

    FIELD_OF = {"residual": "loop_input", "anchor": "anchor", "anchor_emb": "embeddings"}
    """Which RecurrentState field each supplement reads."""

    def __init__(self, variant: str, num_loops: int):
        super().__init__()
        supplements = fixed_supplements(variant)
        assert supplements is not None, variant
        self.variant = variant
        self.supplements = supplements
        self.num_loops = num_loops

    @classmethod
    def fields_of(cls, variant: str) -> EventFields:
        supplements = fixed_supplements(variant)
        return {
            "begin": ((), ("anchor",) if "anchor" in supplements else ()),
            "loop_start": ((), ("loop_input",) if "residual" in supplements else ()),
            "loop_end": (tuple(cls.FIELD_OF[name] for name in supplements), ()),
        }

    def fields(self) -> EventFields:
        return self.fields_of(self.variant)

    def supplement(self, h: torch.Tensor, h0: torch.Tensor, h_emb: torch.Tensor) -> Optional[torch.Tensor]:
        """h_sup(t): the sum of the chosen supplements of h(t), h0 and h_emb (None for base)."""
        values = {"residual": h, "anchor": h0, "anchor_emb": h_emb}
        total = None
        for name in self.supplements:
            total = values[name] if total is None else total + values[name]
        return total

    def begin(self, state: RecurrentState) -> None:
        if "anchor" in self.supplements:
            state.anchor = state.hidden  # h0 = p

    def loop_start(self, t: int, state: RecurrentState) -> None:
        if "residual" in self.supplements:
            state.loop_input = state.hidden  # h(t)

    def loop_end(self, t: int, state: RecurrentState) -> None:
        for name in self.supplements:  # f_core(h(t)) + h(t) + h0 + h_emb, those that are chosen
            state.hidden = state.hidden + getattr(state, self.FIELD_OF[name])
        if state.trace is not None:
            state.trace.append({"step": t + 1, "hidden": state.hidden})


class LearnedCombination(Recurrence):
    """h(t+1) = a1 * f_core(h(t)) + a2 * h0 + a3 * h_emb, with learned coefficients per loop step.

    static_combination (after Ng & Wang 2024): a(t) = (a1, a2, a3) are three trainable scalars of
    loop step t. dynamic_combination: a(t) = a_init + W_t h(t) + b_t, computed per token from the
    loop's input h(t) by a Linear(h -> 3) of loop step t, with no activation (coefficients of either
    sign, as the static ones).

    Choices the paper leaves open: the coefficients are per loop step (not shared across loops);
    the static ones start at (1, 1, 0), i.e. the model starts as +anchor (the best single fixed
    scheme); the dynamic map starts at W = 0, b = 0 around the same (1, 1, 0), so it starts as the
    static model does. Parameters: 3 per loop (static), 3 (h + 1) per loop (dynamic).
    """

    INIT = (1.0, 1.0, 0.0)

    def __init__(self, config: ModelConfig, loops: Optional[Iterable[int]] = None):
        super().__init__()
        assert config.variant in ("static_combination", "dynamic_combination"), config.variant
        self.dynamic = config.variant == "dynamic_combination"
        self.num_loops = config.split.loops
        loops = range(self.num_loops) if loops is None else loops
        if self.dynamic:
            self.coefficient_maps = nn.ModuleDict()
            for t in loops:  # a pipeline stage builds the maps of the loops it runs
                linear = nn.Linear(config.hidden_size, 3)
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
                self.coefficient_maps[str(t)] = linear
            self.register_buffer("init", torch.tensor(self.INIT), persistent=False)
        else:
            self.coefficients = nn.ParameterDict(
                {str(t): nn.Parameter(torch.tensor(self.INIT)) for t in loops}
            )

    FIELDS: EventFields = {
        "begin": ((), ("anchor",)),
        "loop_start": ((), ("loop_input",)),
        "loop_end": (("loop_input", "anchor", "embeddings"), ()),
    }

    def fields(self) -> EventFields:
        return self.FIELDS

    def coefficients_of(self, t: int, h: torch.Tensor) -> torch.Tensor:
        """a(t): [3] (static) or [s, b, 3] (dynamic, per token from h(t) [s, b, h])."""
        if self.dynamic:
            return (self.init.to(h.dtype) + self.coefficient_maps[str(t)](h))
        return self.coefficients[str(t)].to(h.dtype)

    def begin(self, state: RecurrentState) -> None:
        state.anchor = state.hidden  # h0 = p

    def loop_start(self, t: int, state: RecurrentState) -> None:
        state.loop_input = state.hidden  # h(t): the dynamic coefficients are computed from it

    def loop_end(self, t: int, state: RecurrentState) -> None:
        a = self.coefficients_of(t, state.loop_input)
        a1, a2, a3 = a[..., 0:1], a[..., 1:2], a[..., 2:3]  # [1] or [s, b, 1]: broadcast over h
        state.hidden = a1 * state.hidden + a2 * state.anchor + a3 * state.embeddings
        if state.trace is not None:
            state.trace.append({"step": t + 1, "hidden": state.hidden, "coefficients": a})


class MeshRouters(nn.Module):
    """The (write, read) router pairs, keyed by step; step 0 is the transitional cycle.

    A pipeline stage builds only the steps it runs, so `steps` may be a subset.
    """

    def __init__(
        self, hidden_size: int, num_slots: int, steps: Iterable[int], init_std: float, init_seed: int = 0
    ):
        super().__init__()
        self.write, self.read = nn.ModuleDict(), nn.ModuleDict()
        for step in steps:
            with seeded(init_seed, -(1000 + step)):  # a step's routers init the same on any stage
                for routers in (self.write, self.read):
                    linear = nn.Linear(hidden_size, num_slots)
                    nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                    nn.init.zeros_(linear.bias)
                    routers[str(step)] = linear

    @staticmethod
    def _softmax(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1).to(dtype)

    def logits(self, step: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write and read router logits of `step` for `query` [s, b, h]: two [s, b, B] tensors."""
        key = str(step)
        return self.write[key](query), self.read[key](query)

    def forward(self, step: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write and read weights of `step` for `query` [s, b, h]: two [s, b, B] tensors."""
        write_logits, read_logits = self.logits(step, query)
        return self._softmax(write_logits, query.dtype), self._softmax(read_logits, query.dtype)


class MeshRecurrence(Recurrence):
    """The MeSH buffer and its step-wise routers around the shared core."""

    def __init__(self, config: ModelConfig, router_steps: Optional[Iterable[int]] = None):
        super().__init__()
        assert config.variant == "mesh" and config.buffer_slots is not None
        self.num_loops = config.split.loops
        self.num_slots = config.buffer_slots
        steps = range(self.num_loops + 1) if router_steps is None else router_steps
        self.routers = MeshRouters(config.hidden_size, self.num_slots, steps, config.router_std, config.init_seed)
        self.statistics: Optional[RouterStatistics] = None
        """When set, every forward pass adds its router weights and final buffer to it (router_stats.py)."""

    FIELDS: EventFields = {
        "begin": (("embeddings",), ("buffer",)),
        "loop_start": ((), ("loop_input",)),
        "loop_end": (("loop_input", "buffer"), ("buffer",)),
    }

    def fields(self) -> EventFields:
        return self.FIELDS

    def init_buffer(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, s, b, h]: slot 0 = the embeddings, the other slots zero."""
        empty = embeddings.new_zeros((self.num_slots - 1, *embeddings.shape))
        return torch.cat([embeddings.unsqueeze(0), empty], dim=0)

    @staticmethod
    def write(buffer: torch.Tensor, value: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """M_b += value * w_b for every slot b. buffer [B,s,b,h], value [s,b,h], weights [s,b,B]."""
        return buffer + weights.permute(2, 0, 1).unsqueeze(-1) * value.unsqueeze(0)

    @staticmethod
    def read(buffer: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_b M_b * w_b: [s, b, h]."""
        return (buffer * weights.permute(2, 0, 1).unsqueeze(-1)).sum(dim=0)

    def _step(self, step: int, state: RecurrentState, query: torch.Tensor, value: torch.Tensor) -> None:
        """Write `value` into the buffer and read the next hidden state, routed by `query`."""
        if self.statistics is None:
            w_write, w_read = self.routers(step, query)
        else:  # the same weights, and the logits they came from go to the statistics
            write_logits, read_logits = self.routers.logits(step, query)
            self.statistics.add_routers(step, write_logits, read_logits)
            w_write = MeshRouters._softmax(write_logits, query.dtype)
            w_read = MeshRouters._softmax(read_logits, query.dtype)
        state.buffer = self.write(state.buffer, value, w_write)
        state.hidden = self.read(state.buffer, w_read)
        if self.statistics is not None and step == self.num_loops:  # the last write of the pass
            self.statistics.add_buffer(state.buffer)
        if state.trace is not None:
            state.trace.append(
                {"step": step, "buffer": state.buffer, "hidden": state.hidden, "write": w_write, "read": w_read}
            )

    def begin(self, state: RecurrentState) -> None:
        # Transitional cycle: store the prelude output p, read the first core input h(0).
        state.buffer = self.init_buffer(state.embeddings)
        self._step(0, state, query=state.hidden, value=state.hidden)

    def loop_start(self, t: int, state: RecurrentState) -> None:
        state.loop_input = state.hidden  # h(t): both routers of this step are queried with it

    def loop_end(self, t: int, state: RecurrentState) -> None:
        self._step(t + 1, state, query=state.loop_input, value=state.hidden)


def recurrence_fields(config: ModelConfig) -> Optional[EventFields]:
    """What each event of `config.variant` reads and writes, without building it (None: vanilla)."""
    if config.variant == "vanilla":
        return None
    if config.variant == "mesh":
        return MeshRecurrence.FIELDS
    if config.variant in LEARNED_COMBINATIONS:
        return LearnedCombination.FIELDS
    return FixedRecurrence.fields_of(config.variant)


def build_recurrence(config: ModelConfig, router_steps: Optional[Iterable[int]] = None) -> Optional[Recurrence]:
    """The recurrence for `config.variant`; None for vanilla (no loop)."""
    if config.variant == "vanilla":
        return None
    if config.variant == "mesh":
        return MeshRecurrence(config, router_steps)
    if config.variant in LEARNED_COMBINATIONS:
        # Loop t's coefficients are used at its loop_end, which is router step t + 1.
        loops = None if router_steps is None else [step - 1 for step in router_steps if step >= 1]
        return LearnedCombination(config, loops)
    return FixedRecurrence(config.variant, config.split.loops)
