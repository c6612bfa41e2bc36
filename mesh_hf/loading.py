"""Opening a model for inference: a Hugging Face folder, or a training checkpoint (converted on the fly
into a temporary folder, so both take the same path through transformers)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch

from pretrain.checkpoint import format as ckpt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kind_of(path: Path) -> str:
    """"hf" (a model folder), "checkpoint" (a training checkpoint directory); one-line error otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint directory (runs/x/checkpoints/stepN) "
                                "or a Hugging Face model folder")
    if (path / "config.json").is_file():
        return "hf"
    if ckpt.is_checkpoint_dir(path) or ckpt.holds_checkpoints(path):
        return "checkpoint"  # a step directory, or a run or checkpoints folder (its newest complete one)
    raise FileNotFoundError(f"{path} is neither a Hugging Face model folder (no config.json) nor a training "
                            f"checkpoint (no {ckpt.META})")


@contextlib.contextmanager
def hf_folder(path: str | Path, tokenizer: Optional[str] = None) -> Iterator[Path]:
    """A Hugging Face folder for `path`: itself, or a temporary conversion of a checkpoint."""
    path = Path(path)
    if kind_of(path) == "hf":
        yield path
        return
    from mesh_hf.export import export

    with tempfile.TemporaryDirectory(prefix="mesh-hf-") as tmp:
        folder = Path(tmp) / "model"
        export(path, folder, tokenizer=tokenizer, progress=False)
        yield folder


def offline() -> None:
    """Local folders need no network; say so to the hub client before it looks for one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a Hugging Face folder."""
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the remote-code and type notices say nothing a user must act on
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    return model, tokenizer
