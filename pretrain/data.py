"""Training and validation data: megatron-core GPTDataset over .bin/.idx shards.

Samples are drawn in megatron's global order (the dataset's own shuffled
index); a global batch of `global_batch_size` samples is cut into micro-batches
of `micro_batch_size * dp_size` consecutive samples, and data-parallel rank r
takes slice r of each. The order depends only on the seed and the consumed
sample count, so a run can resume at any step and any DP size sees the same
global batches.

Data prefixes (``data.train`` / ``data.valid``) may be megatron prefixes
(``P.bin`` / ``P.idx``) or prefixes written by ``mesh data tokenize``, whose
``P.manifest.json`` lists their shards: ``parse_blend`` expands those into the
shard prefixes, splitting each entry's weight over its shards by token count.
A list of several prefixes without weights is blended by token count too
(explicit weights), which lets megatron-core build as many epochs of each as
the run needs; without weights it would stop after one epoch of all of them.
Weighted blends build a megatron ``BlendedDataset``.

Before any of that, at start-up (``check_data_prefixes``, from pretrain/preflight.py), every
shard is checked for damage: its .idx against itself and the .bin's size, and against its manifest
record (``data_prep.outputs.megatron_shards.check_shard``; the sha256 too with
``data.verify_checksums``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from data_prep.errors import DataError
from data_prep.outputs.data_prefixes import Shard, resolve_data_prefix
from data_prep.outputs.megatron_shards import check_shard
from pretrain.config import DataConfig


def _token_count(prefix: str) -> Optional[int]:
    """Tokens in a plain megatron prefix (its .idx), or None if it cannot be read."""
    from data_prep.outputs.megatron_shards import read_index

    try:
        return int(read_index(prefix)[1].sum(dtype="int64"))
    except (OSError, DataError):
        return None


def _expand(prefixes: list[str], weights: Optional[list[float]]) -> tuple[list[str], Optional[list[float]]]:
    """Manifest prefixes -> their shards; weights split over shards by token count."""
    groups = [resolve_data_prefix(p) for p in prefixes]
    shards = [s for group in groups for s in group]
    if weights is None and len(shards) == 1:
        return [shards[0].prefix], None
    if weights is None:
        # Blend by size: one weight per prefix, its token count.
        weights = []
        for group in groups:
            counts = [s.tokens if s.tokens is not None else _token_count(s.prefix) for s in group]
            if any(c is None for c in counts):
                return [s.prefix for s in shards], None  # unreadable: check_prefixes will say which
            weights.append(float(sum(counts)))
    out_prefixes, out_weights = [], []
    for group, weight in zip(groups, weights):
        if len(group) == 1:
            out_prefixes.append(group[0].prefix)
            out_weights.append(weight)
            continue
        total = sum(s.tokens for s in group)
        for shard in group:
            out_prefixes.append(shard.prefix)
            out_weights.append(weight * shard.tokens / total)
    # A zero weight means "not at all"; megatron would build an empty dataset for it.
    kept = [(p, w) for p, w in zip(out_prefixes, out_weights) if w > 0]
    return [p for p, _ in kept], [w for _, w in kept]


def parse_blend(entries: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """Data prefixes (optionally alternating with weights) -> (megatron prefixes, weights or None).

    ["0.7", "a", "0.3", "b"] -> (["a", "b"], [0.7, 0.3]) for plain prefixes; a
    prefix with a manifest becomes its shards, sharing its weight by tokens.
    ["a"] -> (["a"], None); ["a", "b"] -> (["a", "b"], [tokens of a, tokens of b]).
    """
    if not entries:
        return [], None
    if not _is_number(entries[0]):
        return _expand(list(entries), None)
    if len(entries) % 2 or not all(_is_number(w) for w in entries[::2]):
        raise DataError(
            f"blend {entries} must alternate weight and prefix (e.g. ['0.7', 'a', '0.3', 'b'])"
        )
    weights = [float(w) for w in entries[::2]]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"blend weights {weights} must be finite, non-negative and not all zero")
    return _expand(list(entries[1::2]), weights)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_data_prefixes(data: DataConfig) -> None:
    """One-line DataError if a shard of data.train / data.valid (after blend and manifest
    expansion) is missing or damaged, or (``data.verify_checksums``) differs from its manifest's
    sha256. By default each .idx is read and each .bin only stat'ed (fast at Pile scale)."""
    for entries, what in ((data.train, "data.train"), (data.valid, "data.valid")):
        shards = {s.prefix: s for entry in entries if not _is_number(entry) for s in resolve_data_prefix(entry)}
        check_prefixes(parse_blend(entries)[0], what, shards, data.verify_checksums)


def check_prefixes(prefixes: list[str], what: str, shards: Optional[dict[str, Shard]] = None,
                   verify_checksums: bool = False) -> None:
    """Each prefix has its .bin/.idx, and they pass ``check_shard`` (against the manifest record
    in ``shards`` where there is one; a plain prefix has no checksums to verify)."""
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
        if missing:
            raise DataError(
                f"{what} prefix {prefix!r} has no {' / '.join(prefix + m for m in missing)} "
                f"(and no {prefix}.manifest.json); run `mesh data tokenize` (or `mesh data prepare-demo`) first"
            )
        shard = (shards or {}).get(prefix) or Shard(prefix, None, None)
        try:
            check_shard(prefix, shard.record, shard.manifest, verify_checksums=verify_checksums)
        except DataError as err:
            raise DataError(f"{what}: {err}") from None


@dataclass
class Datasets:
    train: GPTDataset
    valid: Optional[GPTDataset]


def build_datasets(
    data: DataConfig,
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: str,
) -> Datasets:
    """Builds the GPTDatasets (megatron-core's builder, index caching included)."""
    train_blend = parse_blend(data.train)
    valid_blend = parse_blend(data.valid)
    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[train_blend, valid_blend if valid_blend[0] else None, None],
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
        mid_level_dataset_surplus=0.005,
    )
    # Every rank builds (reading the cached indices); the builder synchronises
    # through torch.distributed when a process group exists.
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset,
        [train_samples, valid_samples if valid_blend[0] else None, None],
        lambda: True,
        config,
    ).build()
    return Datasets(train=train, valid=valid)


class MicroBatchSampler(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches, lazily (a Pile-scale run has 10^8 samples)."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, start_sample: int = 0):
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.stride = micro_batch_size * dp_size
        self.start_sample = start_sample

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.start_sample) // self.stride)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            first = self.start_sample + i * self.stride + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def micro_batches(
    dataset,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches, in global order, starting at `start_sample`."""
    sampler = MicroBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, start_sample)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False
    )
    return iter(loader)
