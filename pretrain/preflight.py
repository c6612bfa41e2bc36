"""Everything checked before any process group, model or data exists.

`mesh train --nproc-per-node N` runs it in the launcher, so a bad layout, a
missing file or a run folder that cannot be resumed fails with one line before
any worker starts; each worker runs it again for its own rank (cheap: no
collective, no model).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.errors import DataError
from pretrain.config import RunConfig
from pretrain.data import check_data_prefixes
from pretrain.parallel.plan import ParallelPlan
from pretrain.run_folder import RunFolder


def preflight(config: RunConfig, world_size: int, rank: int = 0) -> ParallelPlan:
    """The parallel plan of this run, after every start-up check passed (one-line errors)."""
    plan = ParallelPlan.build(config, world_size, rank)
    if not Path(config.data.tokenizer).is_file():
        raise DataError(
            f"data.tokenizer={config.data.tokenizer} does not exist; train one with "
            "`mesh data train-tokenizer` or point at an existing .model / tokenizer.json"
        )
    check_data_prefixes(config.data)
    folder = RunFolder.of(config)
    folder.check_start(config.checkpoint.resume)
    folder.check_writable()
    return plan
