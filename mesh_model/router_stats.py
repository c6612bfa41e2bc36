"""MeSH router statistics: how the write and read routers spread their weight over the buffer slots.

For each router step k (0: the transitional cycle, 1..N_loop: the loops) and each of its two
routers (write, read), over the tokens of the observed forward passes:

    entropy           mean over tokens of H(w) = -sum_b w_b log w_b          (nats, in [0, log B])
    entropy_fraction  entropy / log B                                        (1: uniform, 0: one-hot)
    mean_weight[b]    mean over tokens of w_b                                (sums to 1 over b)
    effective_slots   exp(H(mean_weight))                                    (in [1, B])

and, after the last write of the forward pass (the final loop's), the buffer itself:

    slot_norm[b]      mean over tokens of ||M_b||_2 (the slot's vector at that token)

A collapsed router has entropy 0 and one effective slot; a slot nobody writes to or reads from
shows as a zero column of `mean_weight`. Per-token entropy and the entropy of the mean answer
different questions: every token may route one-hot (entropy 0) to a different slot (many
effective slots).

`RouterStatistics` only accumulates sums, on the device the model runs on, so observing a step
costs a few small reductions per router call and no host synchronisation; `totals()` is the one
tensor to all-reduce (sums add over ranks, tokens included, so data-, tensor- (with or without
sequence parallelism: the counts add up too) and pipeline-parallel ranks can all contribute
to one SUM) before `summary()` turns it into the numbers above. A model without an attached
`RouterStatistics` (the default) does no extra work.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

KINDS = ("write", "read")


def step_name(step: int) -> str:
    """"transitional" for router step 0, "loop<t>" for step t = 1 .. N_loop."""
    return "transitional" if step == 0 else f"loop{step}"


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H of softmax(logits) over the last dim, per token, in nats (fp32; -inf logits allowed)."""
    log_w = torch.log_softmax(logits.float(), dim=-1)
    w = log_w.exp()
    return -torch.where(w > 0, w * log_w, torch.zeros_like(w)).sum(dim=-1)


def distribution_entropy(weights: torch.Tensor) -> torch.Tensor:
    """H of probability vectors along the last dim (0 log 0 = 0)."""
    w = weights.double()
    return -torch.where(w > 0, w * torch.log(w.clamp_min(1e-300)), torch.zeros_like(w)).sum(dim=-1)


class RouterStatistics:
    """On-device sums of the router statistics of every step, over the observed forward passes."""

    def __init__(self, num_steps: int, num_slots: int, device: torch.device | str = "cpu"):
        self.num_steps, self.num_slots = num_steps, num_slots
        # One flat float64 tensor, so that reducing it over ranks is a single collective:
        #   [steps, 2, B] weight sums | [steps, 2] entropy sums | [steps] tokens | [B] slot-norm sums | [1] tokens
        self._sizes = (num_steps * 2 * num_slots, num_steps * 2, num_steps, num_slots, 1)
        self._sums = torch.zeros(sum(self._sizes), dtype=torch.float64, device=device)
        self._views()

    @classmethod
    def for_model(cls, model_config, device: torch.device | str = "cpu") -> "RouterStatistics":
        return cls(model_config.split.loops + 1, model_config.buffer_slots, device)

    def _views(self) -> None:
        self._weights, self._entropy, self._tokens, self._slot_norms, self._norm_tokens = self._parts(self._sums)

    def _parts(self, sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of the flat sums: weights [steps, 2, B], entropy [steps, 2], tokens [steps],
        slot norms [B], norm tokens [1]."""
        weights, entropy, tokens, slot_norms, norm_tokens = torch.split(sums, self._sizes)
        return (weights.view(self.num_steps, 2, self.num_slots), entropy.view(self.num_steps, 2), tokens,
                slot_norms, norm_tokens)

    def reset(self) -> None:
        self._sums.zero_()

    @torch.no_grad()
    def add_routers(self, step: int, write_logits: torch.Tensor, read_logits: torch.Tensor) -> None:
        """One router step's logits [..., B] (any leading token dims)."""
        for i, logits in enumerate((write_logits, read_logits)):
            flat = logits.detach().reshape(-1, self.num_slots)
            self._weights[step, i] += torch.softmax(flat.float(), dim=-1).sum(dim=0).double()
            self._entropy[step, i] += token_entropy(flat).sum().double()
        self._tokens[step] += write_logits.numel() // self.num_slots

    @torch.no_grad()
    def add_buffer(self, buffer: torch.Tensor) -> None:
        """The buffer [B, ..., h] after the last write."""
        flat = buffer.detach().reshape(self.num_slots, -1, buffer.shape[-1])
        self._slot_norms += torch.linalg.vector_norm(flat.float(), dim=-1).sum(dim=1).double()
        self._norm_tokens += flat.shape[1]

    def totals(self) -> torch.Tensor:
        """The raw sums, one tensor: all-reduce it (SUM) to combine ranks, in place."""
        return self._sums

    def summary(self) -> Optional[dict]:
        """{"steps": [name...], "write"/"read": {...}, "slot_norm": [...], "tokens"}; None if nothing was seen."""
        weights, entropy, tokens, slot_norms, norm_tokens = self._parts(self._sums.cpu())  # one transfer
        if not bool((tokens > 0).any()):
            return None
        log_b = math.log(self.num_slots)
        out = {"steps": [step_name(k) for k in range(self.num_steps)], "num_slots": self.num_slots,
               "tokens": [int(t) for t in tokens]}
        count = tokens.clamp_min(1)
        for i, kind in enumerate(KINDS):
            mean_weight = weights[:, i] / count[:, None]
            mean_entropy = entropy[:, i] / count
            out[kind] = {
                "entropy": mean_entropy.tolist(),
                "entropy_fraction": (mean_entropy / log_b).tolist(),
                "mean_weight": mean_weight.tolist(),
                "effective_slots": distribution_entropy(mean_weight).exp().tolist(),
            }
        seen = float(norm_tokens)
        out["slot_norm"] = (slot_norms / seen).tolist() if seen else None
        return out


def flat_metrics(summary: dict, prefix: str = "router") -> dict[str, float]:
    """The summary as scalar metrics: router/<step>/<write|read>/<stat>[/slot<b>], router/buffer/slot<b>_norm."""
    metrics = {}
    for k, name in enumerate(summary["steps"]):
        if not summary["tokens"][k]:
            continue
        for kind in KINDS:
            stats = summary[kind]
            base = f"{prefix}/{name}/{kind}"
            metrics[f"{base}/entropy"] = stats["entropy"][k]
            metrics[f"{base}/entropy_fraction"] = stats["entropy_fraction"][k]
            metrics[f"{base}/effective_slots"] = stats["effective_slots"][k]
            for b, w in enumerate(stats["mean_weight"][k]):
                metrics[f"{base}/weight/slot{b}"] = w
    for b, norm in enumerate(summary.get("slot_norm") or []):
        metrics[f"{prefix}/buffer/slot{b}_norm"] = norm
    return metrics
