"""Parameter accounting: total, embedding, non-embedding and router parameters.

Counts come from the real model, built on the `meta` device (no memory, no
init compute), so the report can never drift from the implementation. The
paper's convention: "non-embedding" excludes the input embedding and the
output head; it includes every layer, the final LayerNorm and the routers.
`analytic_non_embedding` is the closed form, used as a cross-check:
12 h^2 + 13 h per GPT-NeoX layer with its own weights (an unshared core
`4+8x2+4` has L_core * N_loop of them, so its layers count as the vanilla model's of
the same compute depth), 2 h for the final LayerNorm,
(N_loop + 1) * 2 * (h * B + B) for the MeSH routers, and N_loop * 3 (static) or
N_loop * 3 (h + 1) (dynamic) for the learned combinations' coefficients.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from mesh_model.config import ConfigError, ModelConfig, read_yaml_mapping

EMBEDDING_PREFIXES = ("embedding.", "output_layer.")
ROUTER_MARKER = "recurrence.routers."
COEFFICIENT_MARKER = "recurrence.coefficient"  # the learned combinations' scalars and maps


@dataclass(frozen=True)
class ParameterReport:
    total: int
    embedding: int
    routers: int
    coefficients: int = 0
    """The learned combinations' parameters (static: 3 per loop; dynamic: 3 (h + 1) per loop)."""

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(model: torch.nn.Module) -> ParameterReport:
    total = embedding = routers = coefficients = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if name.startswith(EMBEDDING_PREFIXES):
            embedding += n
        elif ROUTER_MARKER in name:
            routers += n
        elif COEFFICIENT_MARKER in name:
            coefficients += n
    return ParameterReport(total=total, embedding=embedding, routers=routers, coefficients=coefficients)


def analytic_non_embedding(config: ModelConfig) -> int:
    """Closed-form non-embedding count for the default GPT-NeoX shape (ffn = 4h)."""
    h = config.hidden_size
    if config.ffn_size != 4 * h:
        raise ValueError("the closed form assumes ffn_hidden_size = 4 * hidden_size")
    layers = config.split.unique_layers * (12 * h * h + 13 * h) + 2 * h
    routers = 0
    if config.variant == "mesh":
        slots = config.buffer_slots
        routers = (config.split.loops + 1) * 2 * (h * slots + slots)
    coefficients = {"static_combination": 3, "dynamic_combination": 3 * (h + 1)}.get(config.variant, 0)
    return layers + routers + coefficients * config.split.loops


@contextlib.contextmanager
def single_process_model_parallel():
    """A world-size-1 process group and megatron parallel state, if none exists yet.

    megatron-core layers look up their tensor-parallel group at construction,
    so even counting parameters needs one. An in-memory store avoids ports.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    if created_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    created_state = not parallel_state.model_parallel_is_initialized()
    if created_state:
        parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


def report_for(config: ModelConfig) -> ParameterReport:
    """Builds the model on the meta device and counts its parameters."""
    from mesh_model.model import build_model

    with single_process_model_parallel(), torch.device("meta"):
        model = build_model(config, use_transformer_engine=False)
    return count_parameters(model)


def load_model_config(path: str | Path) -> ModelConfig:
    """The `model:` section of a training YAML (or a bare model YAML)."""
    data = read_yaml_mapping(path)
    section = data.get("model", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the 'model' section must be a mapping")
    return ModelConfig.from_dict(section)


def format_report(name: str, config: ModelConfig, report: ParameterReport) -> str:
    rows = [
        ("model", name),
        ("variant", config.variant),
        ("layer split", f"{config.split} ({config.compute_depth} compute layers, "
                        f"{config.split.unique_layers} unique)"),
        ("hidden / heads", f"{config.hidden_size} / {config.num_attention_heads}"),
        ("vocab (padded)", f"{config.vocab_size} ({config.padded_vocab_size})"),
        ("total parameters", f"{report.total:,}"),
        ("embedding + head", f"{report.embedding:,}"),
        ("non-embedding", f"{report.non_embedding:,}"),
        ("routers", f"{report.routers:,}" + (f" (B={config.buffer_slots})" if config.variant == "mesh" else "")),
    ]
    if report.coefficients:
        rows.append(("coefficients", f"{report.coefficients:,} (learned combination, per loop step)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _run(args: argparse.Namespace) -> int:
    for i, path in enumerate(args.configs):
        config = load_model_config(path)
        if i:
            print()
        print(format_report(Path(path).stem, config, report_for(config)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "params",
        help="print total, non-embedding and router parameter counts of configs",
        description=(
            "Build each config's model on the meta device (no memory used) and print its "
            "parameter counts. Non-embedding excludes the input embedding and the output head, "
            "as in the paper's Table 5."
        ),
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config file(s)")
    parser.set_defaults(func=_run)
