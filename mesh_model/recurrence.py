"""The loop around the shared core block, and how state is carried between loops.

This is the file to read next to the paper. With p = f_pre(h_emb) the prelude
output and f_core the shared core block:

Fixed recurrences (paper Sec. 2), h(0) = p and for t = 0 .. N_loop-1:

    h(t+1) = f_core(h(t)) + h_sup(t)

    base        h_sup = 0
    residual    h_sup = h(t)
    anchor      h_sup = h0 = p           (the prelude output)
    anchor_emb  h_sup = h_emb            (the paper's anchor*)

MeSH (paper Sec. 3): a buffer M of B slots, each [s, b, h].

    init          M_0 = h_emb, M_1..M_{B-1} = 0
    transitional  M_b += p * w^write_0(p)_b         h(0)   = sum_b M_b * w^read_0(p)_b
    loop t        hm = f_core(h(t))
                  M_b += hm * w^write_{t+1}(h(t))_b   h(t+1) = sum_b M_b * w^read_{t+1}(h(t))_b

Each router is Linear(h -> B, bias) followed by a softmax over the B slots, per
token. There are N_loop + 1 write/read pairs. Writes are additive and soft:
nothing is ever overwritten. The coda receives h(N_loop), the final read.

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
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from mesh_model.config import ModelConfig

CoreStep = Callable[[torch.Tensor], torch.Tensor]
"""Applies the shared core block once: [s, b, h] -> [s, b, h]."""


class FixedRecurrence(nn.Module):
    """base / residual / anchor / anchor_emb: h(t+1) = f_core(h(t)) + h_sup(t)."""

    def __init__(self, variant: str, num_loops: int):
        super().__init__()
        assert variant in ("base", "residual", "anchor", "anchor_emb"), variant
        self.variant = variant
        self.num_loops = num_loops

    def supplement(self, h: torch.Tensor, h0: torch.Tensor, h_emb: torch.Tensor):
        return {"base": None, "residual": h, "anchor": h0, "anchor_emb": h_emb}[self.variant]

    def forward(
        self,
        prelude_output: torch.Tensor,
        embeddings: torch.Tensor,
        core_step: CoreStep,
        trace: Optional[list] = None,
    ) -> torch.Tensor:
        h0 = prelude_output
        h = h0
        for t in range(self.num_loops):
            h_sup = self.supplement(h, h0, embeddings)
            h = core_step(h) if h_sup is None else core_step(h) + h_sup
            if trace is not None:
                trace.append({"step": t + 1, "hidden": h})
        return h


class MeshRouters(nn.Module):
    """The N_loop + 1 (write, read) router pairs; pair 0 is the transitional cycle."""

    def __init__(self, hidden_size: int, num_slots: int, num_steps: int, init_std: float):
        super().__init__()
        self.write = nn.ModuleList(nn.Linear(hidden_size, num_slots) for _ in range(num_steps))
        self.read = nn.ModuleList(nn.Linear(hidden_size, num_slots) for _ in range(num_steps))
        for linear in (*self.write, *self.read):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(linear.bias)

    @staticmethod
    def _softmax(router: nn.Linear, query: torch.Tensor) -> torch.Tensor:
        logits = router(query)  # [s, b, B]
        return torch.softmax(logits.float(), dim=-1).to(query.dtype)

    def forward(self, step: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write and read weights of `step` for `query` [s, b, h]: two [s, b, B] tensors."""
        return self._softmax(self.write[step], query), self._softmax(self.read[step], query)


class MeshRecurrence(nn.Module):
    """The MeSH buffer and its step-wise routers around the shared core."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.variant == "mesh" and config.buffer_slots is not None
        self.num_loops = config.split.loops
        self.num_slots = config.buffer_slots
        self.routers = MeshRouters(
            config.hidden_size, self.num_slots, self.num_loops + 1, config.router_std
        )

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

    def forward(
        self,
        prelude_output: torch.Tensor,
        embeddings: torch.Tensor,
        core_step: CoreStep,
        trace: Optional[list] = None,
    ) -> torch.Tensor:
        buffer = self.init_buffer(embeddings)

        # Transitional cycle: store the prelude output, read the first core input.
        w_write, w_read = self.routers(0, prelude_output)
        buffer = self.write(buffer, prelude_output, w_write)
        h = self.read(buffer, w_read)
        if trace is not None:
            trace.append({"step": 0, "buffer": buffer, "hidden": h, "write": w_write, "read": w_read})

        for t in range(self.num_loops):
            # Both routers of this step are queried with the core's *input* h(t).
            w_write, w_read = self.routers(t + 1, h)
            core_output = core_step(h)
            buffer = self.write(buffer, core_output, w_write)
            h = self.read(buffer, w_read)
            if trace is not None:
                trace.append(
                    {"step": t + 1, "buffer": buffer, "hidden": h, "write": w_write, "read": w_read}
                )
        return h


def build_recurrence(config: ModelConfig) -> Optional[nn.Module]:
    """The recurrence for `config.variant`; None for vanilla (no loop)."""
    if config.variant == "vanilla":
        return None
    if config.variant == "mesh":
        return MeshRecurrence(config)
    return FixedRecurrence(config.variant, config.split.loops)
