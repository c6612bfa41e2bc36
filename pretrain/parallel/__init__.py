"""Parallelism: the one plan of how a run is laid out, and the code that realises it.

plan.py (ParallelPlan, pure: sizes, coordinates, batch split, the pipeline cut,
every start-up check that spans config sections) -> distributed.py (process
groups and megatron-core's parallel state, the only reader of that global state)
-> schedule.py (megatron's 1F1B pipeline schedule over the engine, replicated
core gradients) and sequence_parallel.py (TP gradient sums for the split region).
"""
