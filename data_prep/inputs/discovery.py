"""What to read: input files (given as files, directories or globs) and Hugging Face datasets.

Everything here runs before any work starts, so a typo or an empty directory
is a one-line ``DataError`` instead of a failure an hour into a run.

File order is part of the output's identity (it decides what lands in which
shard), so it is made deterministic: arguments in the order given, each
directory or glob expanded in sorted order.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from data_prep.errors import DataError

#: Accepted file types, by name ending (longest first, so ".jsonl.zst" wins over ".jsonl").
FORMATS = {
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.gz": "jsonl.gz",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}
SUPPORTED_DESCRIPTION = ".jsonl, .jsonl.zst, .jsonl.gz or .parquet"


def file_format(path: str) -> Optional[str]:
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    return None


@dataclass(frozen=True)
class InputFile:
    """One input file. ``split`` is the output split its documents go to (None: decided later)."""

    path: str
    format: str
    size: int
    mtime_ns: int
    split: Optional[str] = None

    @property
    def label(self) -> str:
        return self.path

    def identity(self) -> dict:
        """What must not change between a run and its resumption."""
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns,
                "split": self.split}


@dataclass(frozen=True)
class HFDatasetInput:
    """A Hugging Face dataset: a ``save_to_disk`` folder, a local dataset folder, or a hub name.

    ``data_files`` is passed to ``datasets.load_dataset`` (e.g. with name
    "json" or "parquet" to read local files through ``datasets``).
    """

    name: str
    config: Optional[str] = None
    hf_split: str = "train"
    data_files: Optional[tuple[str, ...]] = None
    split: Optional[str] = None

    @property
    def label(self) -> str:
        suffix = f"[{self.config}]" if self.config else ""
        return f"hf:{self.name}{suffix}:{self.hf_split}"

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.name)

    @property
    def is_saved_to_disk(self) -> bool:
        # save_to_disk writes state.json (a Dataset) or dataset_dict.json (a
        # DatasetDict); a folder of data files for load_dataset has neither.
        return self.is_local and any(
            os.path.isfile(os.path.join(self.name, f)) for f in ("state.json", "dataset_dict.json")
        )

    def identity(self) -> dict:
        files = []
        if self.is_local:
            for root, dirs, names in os.walk(self.name):
                dirs.sort()
                for name in sorted(names):
                    path = os.path.join(root, name)
                    stat = os.stat(path)
                    files.append([os.path.relpath(path, self.name), stat.st_size, stat.st_mtime_ns])
        return {"hf_dataset": self.name, "config": self.config, "hf_split": self.hf_split,
                "data_files": list(self.data_files or ()), "split": self.split, "files": files}


Input = Union[InputFile, HFDatasetInput]


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _expand(spec: str) -> list[str]:
    """One --input argument -> the file paths it names."""
    if _has_glob(spec):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        supported = [p for p in matches if file_format(p)]
        if not supported:
            found = f" (it matches {len(matches)} other files)" if matches else ""
            raise DataError(f"input pattern {spec!r} matches no {SUPPORTED_DESCRIPTION} files{found}; check the pattern")
        return supported
    if os.path.isdir(spec):
        found = []
        for root, dirs, names in os.walk(spec):
            dirs.sort()
            found.extend(os.path.join(root, n) for n in sorted(names) if file_format(n))
        if not found:
            raise DataError(f"input directory {spec!r} holds no {SUPPORTED_DESCRIPTION} files; check the path")
        return found
    if not os.path.exists(spec):
        raise DataError(f"input {spec!r} does not exist; check the path")
    if not os.path.isfile(spec):
        raise DataError(f"input {spec!r} is not a regular file")
    if not file_format(spec):
        raise DataError(f"unsupported input file {spec!r}: expected a {SUPPORTED_DESCRIPTION} file")
    return [spec]


def resolve_files(specs: Iterable[Union[str, os.PathLike]], split: Optional[str] = None) -> list[InputFile]:
    """Expand files, directories and globs into InputFiles, checking each is readable."""
    files = []
    for spec in specs:
        for path in _expand(os.fspath(spec)):
            if not os.access(path, os.R_OK):
                raise DataError(f"input file {path!r} is not readable; check its permissions")
            stat = os.stat(path)
            files.append(InputFile(os.path.abspath(path), file_format(path), stat.st_size, stat.st_mtime_ns, split))
    return files


def check_distinct(inputs: Sequence[Input]) -> None:
    """The same file twice would be tokenized twice (or leak val documents into train)."""
    seen: dict[str, Optional[str]] = {}
    for item in inputs:
        if not isinstance(item, InputFile):
            continue
        if item.path in seen:
            first, second = seen[item.path], item.split
            if first == second:
                raise DataError(f"input file {item.path!r} is given twice; list each file once")
            raise DataError(
                f"input file {item.path!r} is given as both {first or 'train'} and {second or 'train'} input; "
                "a directory or glob for the training files probably also matches it"
            )
        seen[item.path] = item.split


def check_hf_dataset(dataset: HFDatasetInput) -> None:
    """Fail early on a hub name while offline; local folders are checked when opened."""
    if dataset.is_local or dataset.data_files:
        return
    if os.path.exists(dataset.name):
        raise DataError(f"--hf-dataset {dataset.name!r} is not a directory")
    offline = any(os.environ.get(var, "").lower() in ("1", "true", "yes")
                  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline:
        raise DataError(
            f"--hf-dataset {dataset.name!r} is not a local folder and the hub is disabled (HF_HUB_OFFLINE); "
            "pass a local dataset folder or go online"
        )


def select_for_node(inputs: Sequence[Input], node_rank: int, num_nodes: int) -> list[Input]:
    """Inputs for one node of ``num_nodes``: every num_nodes-th, starting at node_rank."""
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise DataError(f"--node-rank {node_rank} must be in [0, --num-nodes {num_nodes})")
    chosen = list(inputs)[node_rank::num_nodes]
    if not chosen:
        raise DataError(
            f"node {node_rank} of {num_nodes} has no input: there are only {len(inputs)} inputs; use fewer nodes"
        )
    return chosen
