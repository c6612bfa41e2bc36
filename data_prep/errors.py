"""User-facing data errors: reported by the CLI as one line, exit code 2."""


class DataError(Exception):
    """Unreadable input, a corrupt shard, or an output that would be overwritten."""
