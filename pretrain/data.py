"""Training and validation data: megatron-core GPTDataset over .bin/.idx shards.

Samples are drawn in megatron's global order (the dataset's own shuffled
index); a global batch of `global_batch_size` samples is cut into micro-batches
of `micro_batch_size * dp_size` consecutive samples, and data-parallel rank r
takes slice r of each. The order depends only on the seed and the consumed
sample count, so a run can resume at any step and any DP size sees the same
global batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from data_prep.errors import DataError
from pretrain.config import DataConfig


def parse_blend(entries: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """["0.7", "a", "0.3", "b"] -> (["a", "b"], [0.7, 0.3]); ["a", "b"] -> (["a", "b"], None)."""
    if not entries:
        return [], None

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not is_number(entries[0]):
        return list(entries), None
    if len(entries) % 2 or not all(is_number(w) for w in entries[::2]):
        raise DataError(
            f"blend {entries} must alternate weight and prefix (e.g. ['0.7', 'a', '0.3', 'b'])"
        )
    return list(entries[1::2]), [float(w) for w in entries[::2]]


def check_prefixes(prefixes: list[str], what: str) -> None:
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
        if missing:
            raise DataError(
                f"{what} prefix {prefix!r} has no {' / '.join(prefix + m for m in missing)}; "
                "run `mesh data tokenize` (or `mesh data prepare-demo`) first"
            )


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
    check_prefixes(train_blend[0], "data.train")
    check_prefixes(valid_blend[0], "data.valid")
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
