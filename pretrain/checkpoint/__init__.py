"""Checkpoints, split along their seams.

format.py    the on-disk format: typed metadata, verify, list, retention, reshard,
             consolidate. Imports neither torch.distributed nor DeepSpeed, so
             `mesh ckpt` and converters work in a plain process.
protocol.py  the collective save / load of a running job (every rank calls it).
manager.py   CheckpointManager: the save policy, cross-rank agreement, the pending
             background save, the choice of checkpoint to resume from, retention.
cli.py       `mesh ckpt list | verify | convert`.
"""
