"""Held-out sequences for the diagnostics: the first N windows of `seq_length` tokens of a data
prefix's token stream (documents one after the other, as the shards store them with their EOD
tokens), so every checkpoint analysed with the same --data sees the same tokens."""

from __future__ import annotations

import numpy as np
import torch

from data_prep.errors import DataError
from data_prep.outputs.data_prefixes import resolve_data_prefix
from pretrain.data import check_prefixes


def sequences(prefix: str, count: int, seq_length: int) -> torch.Tensor:
    """[n, seq_length] token ids, n = min(count, what the prefix holds); DataError (one line) for a
    missing or damaged prefix or one shorter than a single sequence."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards = resolve_data_prefix(prefix)
    check_prefixes([s.prefix for s in shards], "--data", {s.prefix: s for s in shards})
    need = count * seq_length
    pieces, have = [], 0
    for shard in shards:
        dataset = IndexedDataset(shard.prefix)
        for i in range(len(dataset)):
            document = np.asarray(dataset[i], dtype=np.int64)
            pieces.append(document[: need - have])
            have += len(pieces[-1])
            if have >= need:
                break
        if have >= need:
            break
    n = have // seq_length
    if n == 0:
        raise DataError(f"--data {prefix!r} holds {have} tokens, fewer than one sequence of {seq_length}")
    stream = np.concatenate(pieces)[: n * seq_length]
    return torch.from_numpy(stream).view(n, seq_length)
