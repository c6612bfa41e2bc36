"""Errors that end a training run with a one-line message (exit code 2; mesh_cli/main.py).

Kept apart from the trainer so the CLI can name them without importing megatron-core and
DeepSpeed for every command."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""
