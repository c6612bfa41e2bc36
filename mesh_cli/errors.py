"""The error every subcommand raises for bad input it finds itself.

Its own module, not mesh_cli.main: `python -m mesh_cli.main` runs main.py as __main__, whose
class would not be the one the subcommands import, so their errors would escape as tracebacks.
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""
