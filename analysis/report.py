"""The whole analysis of one loaded checkpoint on held-out sequences: every number of the JSON.

    result = analyze(loaded, tokens, batch_size=8)

Per batch of sequences the states are captured (states.py), every per-sample number is computed
and the activations are dropped, so memory stays at one batch's activations whatever N is.
Per-sample numbers are then averaged over the N samples (and their std given where the paper
gives one).
"""

from __future__ import annotations

from typing import Optional

import torch

from analysis import cka as cka_
from analysis.checkpoint import LoadedCheckpoint
from analysis.routers import observed
from analysis.skew import mean_std, skew
from analysis.spectrum import TOP, normalised_singular_values
from analysis.states import capture
from mesh_model.config import ConfigError
from pretrain.compat import cuda_literals_unmapped

FIELDS = ("checkpoint", "step", "label", "variant", "layer_split", "saved_layout", "sequences", "seq_length",
          "states", "skew", "cka", "spectrum", "spectrum_top", "routers", "not_applicable")
"""Every result has exactly these keys (the tests check them)."""


def not_applicable(config) -> list[str]:
    """The diagnostics that do not apply to this model, each with the reason."""
    notes = []
    if not config.split.is_recursive:
        notes.append("loop stagnation: a non-recursive model has no loop states "
                     "(CKA and spectra cover h_emb and the output only)")
        notes.append("per-block skew of prelude / loops / coda: no loop (one block, 'layers', plus every layer)")
    if config.variant != "mesh":
        notes.append(f"router statistics: variant {config.variant} has no MeSH routers")
    return notes


def analyze(loaded: LoadedCheckpoint, tokens: torch.Tensor, batch_size: int = 8, progress=None) -> dict:
    """All diagnostics of `loaded` on `tokens` [n, s]. `progress(k)` is called after each batch."""
    model, config = loaded.model, loaded.config
    if tokens.shape[1] > config.seq_length:
        tokens = tokens[:, : config.seq_length]
    top = int(tokens.max())
    if top >= config.padded_vocab_size:
        raise ConfigError(f"the data holds token id {top} but the checkpoint's model has "
                          f"{config.padded_vocab_size} embeddings: use data made with the model's tokenizer")
    layer_skews: dict[str, list[torch.Tensor]] = {}
    block_skews: dict[str, list[torch.Tensor]] = {}
    spectra: dict[str, list[torch.Tensor]] = {}
    cka_samples: dict[str, list[torch.Tensor]] = {"linear": [], "rbf": []}
    state_names: Optional[list[str]] = None

    def on_layer(label, hidden_in, hidden_out):
        layer_skews.setdefault(label, []).append(skew(hidden_in, hidden_out))

    with observed(model) as router_stats:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start: start + batch_size]
            with cuda_literals_unmapped():  # the CPU shim's per-call mapping is not needed (pretrain/compat.py)
                captured = capture(model, batch, on_layer=on_layer)
            for name, (hidden_in, hidden_out) in captured.blocks.items():
                block_skews.setdefault(name, []).append(skew(hidden_in, hidden_out))
            state_names = list(captured.states)
            for name, state in captured.states.items():
                spectra.setdefault(name, []).append(normalised_singular_values(state))
            states = list(captured.states.values())
            for b in range(batch.shape[0]):  # one sample at a time: n x n Gram matrices per state
                linear = [cka_.linear_gram(state[:, b]) for state in states]
                cka_samples["linear"].append(cka_.cka_matrix(linear))
                cka_samples["rbf"].append(cka_.cka_matrix([cka_.rbf_from_linear(g) for g in linear]))
            del captured, states
            if progress is not None:
                progress(batch.shape[0])
        routers = router_stats.summary() if router_stats is not None else None

    def per_sample(groups: dict[str, list[torch.Tensor]]) -> dict:
        return {name: mean_std(torch.cat(values)) for name, values in groups.items()}

    spectrum = {}
    for name, values in spectra.items():
        curves = torch.cat(values)  # [n, k]
        spectrum[name] = {"mean": curves.mean(0).tolist(), "std": curves.std(0, unbiased=False).tolist()}
    result = {
        "checkpoint": str(loaded.path),
        "step": loaded.meta.step,
        "label": loaded.label,
        "variant": config.variant,
        "layer_split": str(config.split),
        "saved_layout": loaded.meta.layout,
        "sequences": int(tokens.shape[0]),
        "seq_length": int(tokens.shape[1]),
        "states": state_names,
        "skew": {"blocks": per_sample(block_skews), "layers": per_sample(layer_skews)},
        "cka": {kernel: torch.stack(values).mean(0).tolist() for kernel, values in cka_samples.items()},
        "spectrum": spectrum,
        "spectrum_top": TOP,
        "routers": routers,
        "not_applicable": not_applicable(config),
    }
    return result
