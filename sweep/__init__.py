"""Scaling-law sweeps: the sweep file (spec.py), the run table (plan.py), collecting the runs'
validation losses (collect.py) and fitting scaling laws to them (fit.py); `mesh sweep` (cli.py)."""
