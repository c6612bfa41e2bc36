"""`mesh train` and `mesh demo`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _train(args: argparse.Namespace, hooks=None, worker_module: str = "pretrain") -> int:
    """`mesh train`. ``hooks`` / ``worker_module``: what tests substitute to inject faults
    (the torchrun workers of ``worker_module`` build their own hooks)."""
    from pretrain.config import load_config
    from pretrain.trainer import run

    config = load_config(args.config, args.overrides)  # validate before launching anything
    if args.nproc_per_node > 1:
        from pretrain.preflight import preflight
        from pretrain.run_lock import RunLock

        preflight(config, world_size=args.nproc_per_node)
        RunLock(config.logging.run_dir).check_free()  # rank 0 of the workers takes it
        return _launch_torchrun(args, config, worker_module)
    result = run(config, hooks)
    final = result.final_eval
    if final is not None and os.environ.get("RANK", "0") == "0":
        print(f"final validation loss {final['loss']:.4f}, perplexity {final['ppl']:.2f}")
    return result.exit_code


def _launch_torchrun(args: argparse.Namespace, config, worker_module: str) -> int:
    """Re-runs this training command as N local processes under torchrun."""
    import subprocess
    import sys

    from pretrain.run_folder import RunFolder

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    # torchrun passes these on to the workers (SIGUSR1 would otherwise kill torchrun itself)
    # and gives them 30 s to save before it kills them.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node),
           "--max-restarts", "0", "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
           "-m", worker_module, args.config, *args.overrides]
    # Ctrl-C reaches torchrun too, which passes it on to the workers: they save and exit 130.
    # This process only waits (a Python-level handler: torchrun does not inherit it).
    import signal

    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        code = subprocess.call(cmd, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    # torchrun reports a worker's exit code (75, 130) as a plain failure; rank 0's marker says what it was.
    marked = RunFolder.of(config).interrupted_exit_code()
    if code != 0 and marked is not None:
        return marked
    return code


def _demo(args: argparse.Namespace) -> int:
    """Build the demo corpus, tokenizer and shards (idempotent), then train the demo model."""
    import time

    from data_prep.demo import prepare_demo
    from pretrain.config import load_config
    from pretrain.trainer import run

    data_dir = Path(args.data_dir)
    prepare_demo(data_dir)
    run_dir = args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [
        f"data.tokenizer={data_dir / 'tokenizer.model'}",
        f"data.train=[{data_dir / 'train_text_document'}]",
        f"data.valid=[{data_dir / 'val_text_document'}]",
        f"logging.run_dir={run_dir}",
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    result = run(config)
    first, final = result.evals[0], result.final_eval
    print(
        f"\ndemo done: {config.model.variant} {config.model.split} model, {result.steps} steps.\n"
        f"validation perplexity {first['ppl']:.1f} -> {final['ppl']:.2f} "
        f"(loss {first['loss']:.3f} -> {final['loss']:.3f})\n"
        f"run folder: {result.run_dir} (config.yaml, metrics.jsonl, loss.png, checkpoints/)"
    )
    return 0


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description=(
            "Train from a YAML config with optional dotted overrides, e.g. "
            "`mesh train configs/demo.yaml train.steps=50 model.variant=base`. "
            "For several processes launch with torchrun: "
            "`torchrun --nproc_per_node N -m pretrain CONFIG [overrides]`. "
            "The same command started again resumes the run in logging.run_dir from its newest "
            "complete checkpoint (checkpoint.resume=auto); a second run in the same folder is refused. "
            "Exit codes: 0 done (or stopped at train.stop_after_step), 2 bad input, a busy run folder or "
            "a diverged run, 74 a checkpoint or run-folder write failed (no space, read-only, permission, "
            "I/O; the last complete checkpoint is intact), 75 stopped by SIGTERM/SIGUSR1 or "
            "train.max_minutes with a checkpoint saved, 130 stopped by Ctrl-C with a checkpoint saved: run "
            "the same command again to resume (docs/checkpoints.md)."
        ),
    )
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                       help="launch N local processes with torchrun (world size = TP x PP x DP)")
    train.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                       help="override config values, e.g. optim.lr=3e-4")
    train.set_defaults(func=_train)

    demo = subparsers.add_parser(
        "demo",
        help="build a small corpus from the Python standard library and train a MeSH model on CPU",
        description=(
            "The end-to-end demo, no download needed: builds a Pile-format corpus from this "
            "machine's Python standard library, trains a sentencepiece tokenizer, tokenizes into "
            "megatron .bin/.idx shards, trains the demo MeSH model and prints validation perplexity."
        ),
    )
    demo.add_argument("--data-dir", default="data/demo", help="where the corpus, tokenizer and shards go")
    demo.add_argument("--run-dir", default=None, help="run folder (default runs/demo-<timestamp>)")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="model/training config")
    demo.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="config overrides")
    demo.set_defaults(func=_demo)
