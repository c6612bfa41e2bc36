"""The `mesh` command: one entry point, one subcommand per concern.

Each package registers its own subcommands through a `register(subparsers)`
function, so the CLI stays a thin dispatcher and the logic lives next to the
code it drives.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mesh_cli.errors import CLIError
from pretrain.library_warnings import quiet_known_warnings

quiet_known_warnings()  # before any subcommand imports megatron-core

# (module, attribute) pairs; imported lazily so `mesh --help` stays fast and a
# broken optional dependency only affects the subcommand that needs it.
_REGISTRARS = [
    "mesh_model.params",
    "data_prep.cli",
    "pretrain.cli",
    "pretrain.checkpoint.cli",
    "analysis.cli",
    "slurm.cli",
    "sweep.cli",
    "mesh_hf.cli",
]


def _user_errors() -> dict[type[BaseException], int]:
    """Errors that mean bad input or a failed write, not a bug: one line, no traceback, and their
    exit codes (checked in this order)."""
    from data_prep.errors import DataError
    from mesh_model.config import ConfigError
    from pretrain.checkpoint.format import CheckpointError
    from pretrain.checkpoint.protocol import CheckpointSaveError
    from pretrain.run_folder import RunFolderError
    from pretrain.run_lock import RunFolderBusy
    from pretrain.signals import SAVE_FAILED_EXIT_CODE
    from pretrain.errors import TrainingDiverged

    return {CheckpointSaveError: SAVE_FAILED_EXIT_CODE, RunFolderError: SAVE_FAILED_EXIT_CODE,
            CLIError: 2, ConfigError: 2, DataError: 2, CheckpointError: 2, TrainingDiverged: 2, RunFolderBusy: 2,
            FileNotFoundError: 2, FileExistsError: 2}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description=(
            "Pretraining pipeline for MeSH (Memory-as-State-Highways) recursive transformers: "
            "model accounting, data preparation, training."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _REGISTRARS:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args, args.func)


def run_command(args: argparse.Namespace, func) -> int:
    """Runs a subcommand; a user error is one line on stderr and exit code 2."""
    codes = _user_errors()
    try:
        result = func(args)
    except tuple(codes) as err:
        print(f"mesh {args.command}: error: {err}", file=sys.stderr)
        return next(code for kind, code in codes.items() if isinstance(err, kind))
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
