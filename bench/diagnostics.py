"""What the diagnostics cost: training steps with router statistics / full logging vs off, and
`mesh analyze` on the Pythia-160M MeSH shape.

    python bench/diagnostics.py training                 # demo model on the demo corpus (world size 1)
    python bench/diagnostics.py training --config configs/pythia-160m/mesh.yaml train.micro_batch_size=1 \\
        train.global_batch_size=1 model.seq_length=512   # a bigger shape (any config and overrides)
    python bench/diagnostics.py analyze                  # 64 sequences x 2048 tokens, Pythia-160M MeSH, CPU
    python bench/diagnostics.py analyze -n 8 --seq 256   # a quick look

training: one Trainer (megatron-core layers + DeepSpeed, wandb offline and TensorBoard on), its
steps timed in blocks of --steps consecutive steps, the variants round-robin so that machine noise
hits them alike:
* ``off``: ``Trainer.train_step`` alone;
* ``router stats``: the same step with the statistics attached, their reduction and summary,
  and their ~70 scalars logged to metrics.jsonl, wandb and TensorBoard (what
  ``logging.router_stats_interval=1`` adds to every step; router.png is drawn at most every 5
  minutes and timed once on its own);
* ``logging``: the step plus ``Trainer._log_step`` (loss, LR, grad norm, throughput, MFU,
  memory) to every sink, i.e. ``train.log_interval=1``.
Reported: the paired ratio to ``off`` of each (geometric mean of the per-block ratios with a
95% interval, bench/paired.py). Target: router statistics every step under 2% (1.02).

analyze: a randomly initialised model of the config's shape (the numbers do not matter, the
work does: it is the same for any weights), the whole per-checkpoint analysis (states, skew,
linear and RBF CKA, spectra, router statistics) timed on -n random sequences; loading a checkpoint
(verify + consolidate) is not included. With --checkpoint CKPT --data PREFIX a real checkpoint is
loaded (timed separately) and analysed on the prefix's sequences.

Results go to bench/results/diagnostics-<what>-<date>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.library_warnings import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

import torch  # noqa: E402

from bench.paired import format_ratio, paired_ratio  # noqa: E402


def _write(result: dict, what: str, out: str) -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"diagnostics-{what}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def _header(extra: dict) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()}, **extra}


def demo_data(path: Path) -> Path:
    if not (path / "train_text_document.idx").exists():
        from data_prep.demo import prepare_demo

        prepare_demo(path, progress=False)
    return path


def training(args) -> None:
    import os

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29531")):
        os.environ.setdefault(name, value)
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    data = demo_data(Path(args.data))
    tmp = Path(tempfile.mkdtemp(prefix="bench-diagnostics-"))
    blocks_needed = args.warmup + args.repeats * 3
    overrides = [
        f"data.tokenizer={data / 'tokenizer.model'}", f"data.train=[{data / 'train_text_document'}]",
        "data.valid=[]", "train.eval_interval=0", "checkpoint.save_at_end=false", "logging.progress_bar=false",
        "logging.wandb_mode=offline", "logging.tensorboard=true", "logging.router_stats_interval=1",
        *args.overrides, f"train.steps={blocks_needed * args.steps + 1}", f"logging.run_dir={tmp / 'run'}",
    ]
    config = load_config(args.config, overrides)
    if config.model.variant != "mesh":
        raise SystemExit(f"{args.config}: variant {config.model.variant} has no routers; use a MeSH config")
    trainer = Trainer(config)
    trainer.ROUTER_PLOT_EVERY_S = math.inf  # the plot is timed once, below
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    step_number = [0]

    def plain():
        step_number[0] += 1
        trainer.train_step(step_number[0])

    def with_router_stats():
        step_number[0] += 1
        observing = trainer._observing_routers(step_number[0])
        trainer.train_step(step_number[0])
        assert observing
        trainer._log_router_stats(step_number[0])

    def with_logging():
        step_number[0] += 1
        trainer.train_step(step_number[0])
        trainer._log_step(step_number[0], 1.0, 1e-3, 1000.0)

    variants = {"off": plain, "router stats": with_router_stats, "logging": with_logging}

    def block(fn) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        return (time.perf_counter() - start) / args.steps

    try:
        for _ in range(args.warmup):
            for fn in variants.values():
                block(fn)
        times = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]  # ABC CBA: no variant always goes first
            for name in order:
                times[name].append(block(variants[name]))
        from pretrain.metrics import write_router_plot

        started = time.perf_counter()
        write_router_plot(trainer.folder, *trainer.router_summary)
        plot_s = time.perf_counter() - started
    finally:
        trainer.close()
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: paired_ratio(times[name], times["off"]) for name in variants if name != "off"}
    result = _header({"benchmark": "diagnostics-training", "config": args.config, "overrides": overrides,
                      "steps_per_block": args.steps, "repeats": args.repeats,
                      "median_step_s": median, "block_step_s": times, "paired_ratio_to_off": ratios,
                      "router_plot_s": plot_s})
    path = _write(result, "training", args.out)
    print(f"\n{config.model.variant} {config.model.split}, d={config.model.hidden_size}, seq "
          f"{config.model.seq_length}, global batch {config.train.global_batch_size}, {result['device']}, "
          f"{result['threads']} threads; {args.repeats} blocks of {args.steps} steps per variant\n")
    print("| every step | median step (s) | vs off, paired (95% interval) |")
    print("|---|---|---|")
    for name in variants:
        print(f"| {name} | {median[name]:.4f} | {'1' if name == 'off' else format_ratio(ratios[name])} |")
    print(f"\nrouter.png: {plot_s:.2f} s per drawing (at most every {Trainer.ROUTER_PLOT_EVERY_S:.0f} s)")
    print(f"written to {path}")


def analyze(args) -> None:
    from megatron.core import tensor_parallel

    from analysis.checkpoint import LoadedCheckpoint
    from analysis.report import analyze as run_analysis
    from mesh_model.model import build_model
    from mesh_model.params import load_model_config, single_process_model_parallel
    from pretrain.compat import apply_cpu_shim

    if bool(args.checkpoint) != bool(args.data):
        raise SystemExit("--checkpoint and --data go together")
    apply_cpu_shim()
    load_s = None
    with single_process_model_parallel():
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        if args.checkpoint:  # a real checkpoint: its loading (verify + consolidate) is timed too
            from analysis.checkpoint import load
            from analysis.heldout import sequences

            started = time.perf_counter()
            loaded = load(args.checkpoint)
            load_s = time.perf_counter() - started
            config = loaded.config
            seq = args.seq or config.seq_length
            tokens = sequences(args.data, args.n, seq)
        else:
            config = load_model_config(args.config)
            seq = args.seq or config.seq_length
            model = build_model(config, use_transformer_engine=False).eval()
            loaded = LoadedCheckpoint(Path(args.config), SimpleNamespace(step=0, layout={}), config, model)
            tokens = torch.randint(0, config.vocab_size, (args.n, seq), generator=torch.Generator().manual_seed(0))
        started = time.perf_counter()
        run_analysis(loaded, tokens, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
    result = _header({"benchmark": "diagnostics-analyze", "config": args.checkpoint or args.config,
                      "sequences": int(tokens.shape[0]), "seq_length": seq, "batch_size": args.batch_size,
                      "seconds": seconds, "seconds_per_sequence": seconds / tokens.shape[0], "load_s": load_s})
    path = _write(result, "analyze", args.out)
    loading = f"; loading the checkpoint {load_s:.1f} s" if load_s is not None else ""
    print(f"\nmesh analyze, {config.variant} {config.split} d={config.hidden_size}: {result['sequences']} sequences "
          f"x {seq} tokens in {seconds:.1f} s ({result['seconds_per_sequence']:.2f} s per sequence), batch "
          f"{args.batch_size}, {result['device']}, {result['threads']} threads{loading}\nwritten to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("training", help="step time with router statistics / logging every step vs off")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--data", default=str(ROOT / "data" / "demo"), help="demo data folder (built if missing)")
    p.add_argument("--steps", type=int, default=5, help="consecutive steps per timed block")
    p.add_argument("--repeats", type=int, default=10, help="timed blocks per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks per variant first")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.set_defaults(func=training)
    p = sub.add_parser("analyze", help="mesh analyze time on -n sequences of a config's shape")
    p.add_argument("--config", default=str(ROOT / "configs" / "pythia-160m" / "mesh.yaml"))
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpoint", default=None, help="time a real checkpoint (its loading too) instead")
    p.add_argument("--data", default=None, help="with --checkpoint: the held-out data prefix")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.set_defaults(func=analyze)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
