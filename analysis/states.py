"""Every hidden state of one forward pass of a world-size-1 model, for the diagnostics.

For a recursive model (`L_pre + L_core R N_loop + L_coda`) the named states are

    h_emb      the (scaled) token embeddings
    h0         the prelude output p = f_pre(h_emb)
    loop1..N   h(t), the state after loop t's recurrence (the next loop's / the coda's input)
    output     the coda output (the final LayerNorm's input)

and the blocks, each an (input, output) pair of one function f: "prelude" (h_emb -> h0),
"loop<t>" (the core block of loop t, h(t-1) -> f_core(h(t-1)), before the recurrence adds or
routes anything), "coda" (h(N) -> output); every layer call is one more pair, labelled
`prelude.0`, `core.1@loop2`, `coda.0`. A non-recursive (vanilla) model has h_emb and output,
one block "layers", and its layers. Activations are megatron's [s, b, h].

The language-model head never runs: the pass stops at the final LayerNorm's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


class _Stop(Exception):
    """Raised by the final LayerNorm's pre-hook: everything the diagnostics need is captured."""


@dataclass
class Capture:
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)


def layer_labels(model) -> list[str]:
    """The label of every layer call of the unrolled program, in call order."""
    labels = []
    for op in model.ops:
        if op.kind == "layer":
            labels.append(f"{op.block}.{op.index}" + (f"@loop{op.loop + 1}" if op.loop is not None else ""))
    return labels


def _block_boundary_labels(split) -> set[str]:
    """The layer calls whose input or output is a block's: the last prelude layer, the first and
    last core layer of every loop."""
    labels = {f"prelude.{split.prelude - 1}"} if split.prelude else set()
    if split.is_recursive:
        for t in range(split.loops):
            first = 0 if split.shared else t * split.core
            labels |= {f"core.{first}@loop{t + 1}", f"core.{first + split.core - 1}@loop{t + 1}"}
    return labels


def capture(model, tokens: torch.Tensor,
            on_layer: Optional[Callable[[str, torch.Tensor, torch.Tensor], None]] = None) -> Capture:
    """Runs `model` (one whole model, eval mode) on `tokens` [b, s] and returns its states and blocks.

    `on_layer(label, input, output)` is called for every layer call as it happens; only the
    block boundaries' activations are kept (a large model's every layer would not fit in memory).
    """
    if not (model.pre_process and model.post_process):
        raise ValueError("capture needs the whole model on one stage (world size 1)")
    labels = layer_labels(model)
    split = model.model_config.split
    boundaries = _block_boundary_labels(split)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    result = Capture(layer_order=labels)

    def layer_hook(module, args, output):
        label = labels[len(calls)]
        hidden_in = args[0]
        calls.append((hidden_in, output) if label in boundaries else (None, None))
        if on_layer is not None:
            on_layer(label, hidden_in, output)

    final_input: list[torch.Tensor] = []

    def stop_hook(module, args):
        final_input.append(args[0])
        raise _Stop

    handles = [layer.register_forward_hook(layer_hook)
               for stack in (model.prelude, model.core, model.coda) for layer in stack.layers.values()]
    handles.append(model.final_layernorm.register_forward_pre_hook(stop_hook))
    trace: list = []
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    try:
        with torch.no_grad():
            embeddings = model.embed(tokens, positions)
            try:
                model(tokens, positions, mask, trace=trace)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == len(labels), (len(calls), len(labels))
    output = final_input[0]
    result.states["h_emb"] = embeddings
    if not split.is_recursive:
        result.states["output"] = output
        result.blocks["layers"] = (embeddings, output)
        return result

    by_label = dict(zip(labels, calls))
    prelude_out = calls[split.prelude - 1][1] if split.prelude else embeddings
    result.states["h0"] = prelude_out
    if split.prelude:
        result.blocks["prelude"] = (embeddings, prelude_out)
    loop_states = {entry["step"]: entry["hidden"] for entry in trace if entry.get("step", 0) >= 1}
    for t in range(split.loops):
        first = 0 if split.shared else t * split.core
        core_in = by_label[f"core.{first}@loop{t + 1}"][0]
        core_out = by_label[f"core.{first + split.core - 1}@loop{t + 1}"][1]
        result.blocks[f"loop{t + 1}"] = (core_in, core_out)
        result.states[f"loop{t + 1}"] = loop_states[t + 1]
    if split.coda:
        result.blocks["coda"] = (loop_states[split.loops], output)
    result.states["output"] = output
    return result
