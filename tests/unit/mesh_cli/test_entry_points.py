"""Every way of starting the CLI turns a subcommand's CLIError into one line and exit code 2
(`python -m mesh_cli.main` runs main.py as __main__; the error class must still be the one the
subcommands raise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("entry", [["-m", "mesh_cli"], ["-m", "mesh_cli.main"]])
def test_a_subcommand_error_is_one_line_from_every_entry_point(entry, tmp_path):
    missing = tmp_path / "no-such-run"
    done = subprocess.run([sys.executable, *entry, "slurm", "status", str(missing)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"mesh slurm: error: {missing} is not a run directory"], done.stderr
