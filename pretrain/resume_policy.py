"""What may change between the run that saved a checkpoint and the run that resumes from it.

A resumed run is built from its own config; the checkpoint brings the weights, the
optimizer moments, the LR scheduler's position and the training state. Each
config field is in one of two classes:

* applied: the resumed run uses the new value from the resume on, and says so in
  one line per field (the LR schedule is rebuilt from the new optim.* and
  train.steps at the saved step, as Megatron-LM's --override-opt-param-scheduler does);
* refused: the value defines what the checkpoint is (the model's shape, the
  tokenizer, the seed of the data order and of dropout); a resume with another
  value is a one-line error naming the field.

Every field of RunConfig is listed here (a test checks it), so a new field has to
be classified. The table with the reasons is in docs/checkpoints.md.
"""

from __future__ import annotations

from typing import Optional

from mesh_model.config import ConfigError

APPLIED, REFUSED = "applied", "refused"

# section.field -> (class, what a change means). Model fields: mesh_model's shape fields are
# refused by the checkpoint's own model check (pretrain/checkpoint/format.py), its free fields
# (recompute, dropout, init, seq_length) applied.
POLICY: dict[str, tuple[str, str]] = {
    "data.tokenizer": (REFUSED, "token ids would mean other strings (compared by the file's sha256)"),
    "data.train": (APPLIED, "the training blend changes; the sample order continues at consumed_samples"),
    "data.valid": (APPLIED, "validation runs on the new sets"),
    "data.cache_dir": (APPLIED, "the index cache moves"),
    "data.num_workers": (APPLIED, "data loading only"),
    "data.verify_checksums": (APPLIED, "start-up checks only"),
    "optim.lr": (APPLIED, "the LR schedule follows the new peak from this step on"),
    "optim.min_lr": (APPLIED, "the LR schedule follows the new floor from this step on"),
    "optim.warmup_fraction": (APPLIED, "the LR schedule follows the new warmup from this step on"),
    "optim.weight_decay": (APPLIED, "AdamW uses the new value; its moments are kept"),
    "optim.beta1": (APPLIED, "AdamW uses the new value; its moments are kept"),
    "optim.beta2": (APPLIED, "AdamW uses the new value; its moments are kept"),
    "optim.eps": (APPLIED, "AdamW uses the new value; its moments are kept"),
    "optim.grad_clip": (APPLIED, "clipping uses the new value"),
    "parallel.tensor": (APPLIED, "the checkpoint is resharded"),
    "parallel.pipeline": (APPLIED, "the checkpoint is resharded"),
    "parallel.zero_stage": (APPLIED, "the optimizer state is re-partitioned"),
    "parallel.pipeline_layout": (APPLIED, "the checkpoint is resharded"),
    "parallel.sequence_parallel": (APPLIED, "a layout detail"),
    "parallel.virtual_pipeline": (APPLIED, "a layout detail"),
    "train.steps": (APPLIED, "the LR schedule's length and megatron's sample index change, so the "
                             "remaining data order differs from an uninterrupted run's"),
    "train.micro_batch_size": (APPLIED, "gradient accumulation changes, the global batch does not"),
    "train.global_batch_size": (APPLIED, "samples per step change; the data continues at consumed_samples"),
    "train.seed": (REFUSED, "the data order and the dropout streams depend on it"),
    "train.device": (APPLIED, "the device changes"),
    "train.bf16": (APPLIED, "the precision changes (the checkpoint's weights are fp32)"),
    "train.eval_interval": (APPLIED, "a schedule only"),
    "train.eval_batches": (APPLIED, "a schedule only"),
    "train.log_interval": (APPLIED, "a schedule only"),
    "train.stop_after_step": (APPLIED, "a schedule only"),
    "train.max_minutes": (APPLIED, "a schedule only"),
    "train.max_skipped_steps": (APPLIED, "a limit only"),
    "checkpoint.dir": (APPLIED, "new checkpoints go to the new folder"),
    "checkpoint.save_interval": (APPLIED, "the save policy changes"),
    "checkpoint.save_interval_minutes": (APPLIED, "the save policy changes"),
    "checkpoint.save_at_end": (APPLIED, "the save policy changes"),
    "checkpoint.keep_last": (APPLIED, "retention changes"),
    "checkpoint.keep_every": (APPLIED, "retention changes"),
    "checkpoint.keep_set_aside": (APPLIED, "retention changes"),
    "checkpoint.log_spaced": (APPLIED, "the save policy changes"),
    "checkpoint.resume": (APPLIED, "where this run started from"),
    "checkpoint.verify_checksums": (APPLIED, "start-up checks only"),
    "checkpoint.async_save": (APPLIED, "how saves are written"),
    "logging.run_dir": (APPLIED, "the run continues in another folder"),
    "logging.wandb_mode": (APPLIED, "logging only"),
    "logging.wandb_project": (APPLIED, "logging only"),
    "logging.progress_bar": (APPLIED, "logging only"),
    "logging.peak_tflops": (APPLIED, "logging only"),
    "logging.tensorboard": (APPLIED, "logging only (a resumed TensorBoard log replaces the events after the saved step)"),
    "logging.router_stats_interval": (APPLIED, "logging only (collecting the statistics does not change training)"),
}


def _flatten(config: dict) -> dict[str, object]:
    return {f"{section}.{name}": value for section, fields in config.items() if isinstance(fields, dict)
            for name, value in fields.items()}


def resume_changes(saved: dict, current: dict, saved_tokenizer_sha256: Optional[str],
                   current_tokenizer_sha256: Optional[str]) -> list[str]:
    """One line per applied change; ConfigError (one line) naming every refused one.

    ``saved`` / ``current``: RunConfig.to_dict() of the saving and the resuming run. The model
    section is left to the checkpoint's model check."""
    before, after = _flatten(saved), _flatten(current)
    refused, lines = [], []
    if saved_tokenizer_sha256 and current_tokenizer_sha256 and saved_tokenizer_sha256 != current_tokenizer_sha256:
        refused.append(f"data.tokenizer (a different file: sha256 {saved_tokenizer_sha256[:12]} in the checkpoint, "
                       f"{current_tokenizer_sha256[:12]} now)")
    for key in sorted(set(before) & set(after)):
        if key.startswith("model.") or before[key] == after[key]:
            continue
        policy, meaning = POLICY.get(key, (APPLIED, "not classified"))
        if key == "data.tokenizer":
            if saved_tokenizer_sha256 is None:  # a checkpoint without the tokenizer's sha256
                lines.append(f"{key}: {before[key]!r} -> {after[key]!r} (cannot compare contents: "
                             "the checkpoint does not record its tokenizer's sha256)")
            elif saved_tokenizer_sha256 == current_tokenizer_sha256:
                lines.append(f"{key}: {before[key]!r} -> {after[key]!r} (moved; the same file by sha256)")
            continue
        if policy == REFUSED:
            refused.append(f"{key} ({before[key]!r} in the checkpoint, {after[key]!r} now: {meaning})")
        else:
            lines.append(f"{key}: {before[key]!r} -> {after[key]!r} (applied: {meaning})")
    if refused:
        raise ConfigError(
            f"cannot resume with a changed {'; '.join(refused)}; resume with the saved value or start a new run"
        )
    return lines
