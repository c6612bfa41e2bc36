"""`mesh analyze CHECKPOINT --data PREFIX [-n 64] [--compare CKPT ...] [--out DIR]`.

    mesh analyze runs/mesh/checkpoints/step0010000 --data data/pile/val_text_document
    mesh analyze runs/mesh --compare runs/base runs/anchor --data data/demo/val_text_document --out cmp/

Writes DIR/analysis.json (every number, one entry per checkpoint) and DIR/skew.png, cka.png,
spectrum.png and, when a checkpoint is MeSH, routers.png; with --compare each plot overlays the
checkpoints, labelled by variant and layer split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pretrain.checkpoint import format as ckpt

OUTPUTS = ("analysis.json", "skew.png", "cka.png", "spectrum.png", "routers.png")


def default_out(checkpoint: Path) -> Path:
    """<run folder>/analysis/<step> for runs/x/checkpoints/stepN, else <checkpoint>-analysis."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "analysis" / checkpoint.name
    return checkpoint.with_name(checkpoint.name + "-analysis")


def _unique_labels(results: list[dict]) -> None:
    """Two checkpoints of the same variant are told apart by their step (then their folder)."""
    labels = [r["label"] for r in results]
    for r in results:
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} @{r['step']}"
    labels = [r["label"] for r in results]
    for r in results:
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({Path(r['checkpoint']).parent.parent.name})"


def _run(args: argparse.Namespace) -> int:
    from megatron.core import tensor_parallel
    from tqdm import tqdm

    from analysis import checkpoint as checkpoints
    from analysis import heldout, plots
    from analysis.report import analyze
    from mesh_cli.errors import CLIError
    from mesh_model.params import single_process_model_parallel
    from pretrain.compat import apply_cpu_shim

    if args.n < 1 or args.batch_size < 1 or (args.seq_length is not None and args.seq_length < 2):
        raise CLIError(f"-n ({args.n}) and --batch-size ({args.batch_size}) must be >= 1, --seq-length >= 2")
    paths = [checkpoints.resolve(p) for p in [args.checkpoint, *args.compare]]
    out = Path(args.out) if args.out else default_out(paths[0])
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")
    metas = [ckpt.read_meta(p) for p in paths]  # a damaged checkpoint fails here, before any work
    # Every checkpoint sees the same tokens: no longer than the shortest model's context.
    seq_length = min([meta.model["seq_length"] for meta in metas] + ([args.seq_length] if args.seq_length else []))
    tokens = heldout.sequences(args.data, args.n, seq_length)
    if tokens.shape[0] < args.n:
        print(f"note: {args.data} holds {tokens.shape[0]} sequences of {seq_length} tokens, fewer than -n {args.n}",
              file=sys.stderr)

    apply_cpu_shim()
    results = []
    started = time.perf_counter()
    with single_process_model_parallel():
        tensor_parallel.model_parallel_cuda_manual_seed(0)  # eval mode draws nothing; megatron wants a tracker
        for path in paths:
            loaded = checkpoints.load(path, verify_checksums=not args.no_verify)
            with tqdm(total=tokens.shape[0], desc=f"analyze {loaded.label}", unit="seq",
                      disable=args.quiet, dynamic_ncols=True) as bar:
                results.append(analyze(loaded, tokens, batch_size=args.batch_size, progress=bar.update))
            del loaded
    _unique_labels(results)

    out.mkdir(parents=True, exist_ok=True)
    entries = [(r["label"], r) for r in results]
    written = [plots.save(plots.skew_figure(entries), out / "skew.png"),
               plots.save(plots.cka_figure(entries), out / "cka.png"),
               plots.save(plots.spectrum_figure(entries), out / "spectrum.png")]
    routed = [(r["label"], r["routers"]) for r in results if r["routers"] is not None]
    if routed:
        written.append(plots.save(plots.router_heatmap_figure(routed), out / "routers.png"))
    report = {"data": args.data, "sequences": int(tokens.shape[0]), "seq_length": int(tokens.shape[1]),
              "seconds": round(time.perf_counter() - started, 2), "checkpoints": results}
    tmp = out / ".analysis.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / "analysis.json")
    for r in results:
        print(f"{r['label']} (step {r['step']}, {r['checkpoint']}):")
        blocks = ", ".join(f"{name} {v['mean']:.3f}" for name, v in r["skew"]["blocks"].items())
        print(f"  skew per block: {blocks}")
        for note in r["not_applicable"]:
            print(f"  not applicable: {note}")
    print(f"wrote {out / 'analysis.json'} and {', '.join(p.name for p in written)}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's diagnostics on checkpoints: skew, CKA, singular values, router statistics",
        description=(
            "Run checkpoints (any parallel layout; one CPU process, no DeepSpeed) on N held-out sequences "
            "and compute the MeSH paper's diagnostics: computation skew per block and layer, pairwise "
            "linear and RBF CKA between h_emb, h0, every loop state and the output (loop stagnation), the "
            "top-50 normalised singular values of each state (representational collapse) and, for MeSH, "
            "the router statistics. Writes analysis.json and PNG plots (docs/diagnostics.md)."
        ),
    )
    parser.add_argument("checkpoint", help="a checkpoint directory, or a checkpoints / run folder (its newest)")
    parser.add_argument("--data", required=True, metavar="PREFIX",
                        help="held-out .bin/.idx prefix (or its manifest), tokenized with the model's tokenizer")
    parser.add_argument("-n", type=int, default=64, help="number of sequences (default 64)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per sequence (default: the model's seq_length; the shortest with --compare)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="CKPT",
                        help="more checkpoints, overlaid in the same plots (e.g. base vs MeSH)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: <run>/analysis/<step>)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checkpoints' sha256 check")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier analysis in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
