"""Known, harmless library warnings: filtered at one place, summarised in one line.

megatron-core warns at import time, once per module, that Transformer Engine
and Apex are missing (five warnings) and that a config default is deprecated;
none of it asks the user to do anything. :func:`quiet_known_warnings` filters
exactly those messages (anything else still shows), and
:func:`optional_fast_paths` says in one line which optional fast paths are off
and why, for the start-up report. It must run before megatron-core is imported:
`mesh_cli.main` calls it at import (every `mesh` command and torchrun worker), the
benchmarks at their start.
"""

from __future__ import annotations

import importlib.util
import warnings

# (message regex, category): each one is a megatron-core 0.16.1 import-time notice.
KNOWN = [
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),  # TransformerConfig's cuda_graph_scope default
]

_OPTIONAL = {
    "transformer_engine": "Transformer Engine (fused layers, FP8)",
    "apex": "Apex (fused optimizers and norms)",
    "flash_attn": "flash-attn",
}


def quiet_known_warnings() -> None:
    for message, category in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)


def optional_fast_paths() -> str:
    """One line: which optional GPU libraries are missing (megatron-core then uses its local
    PyTorch layers, which is what the CPU path needs anyway)."""
    missing = [label for module, label in _OPTIONAL.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return "optional fast paths: Transformer Engine, Apex and flash-attn available"
    return ("optional fast paths off: " + ", ".join(missing)
            + " not installed; megatron-core uses its local PyTorch implementations")
