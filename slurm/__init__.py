"""Launching training on SLURM: resources, the sbatch script, submit and status (docs/slurm.md)."""
