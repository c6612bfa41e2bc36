"""Fixtures of the integration tests that need more than tests/conftest.py gives every test."""

from tests.support.slurm_cluster import slurm_cluster  # noqa: F401  (session scope: the local SLURM cluster)
