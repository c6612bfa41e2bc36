"""Is this change slower? A benchmark run on two revisions of the repo, side by side, paired.

    python bench/compare_revisions.py --base 4d186cf                       # parallel_step, world size 1
    python bench/compare_revisions.py --base 4d186cf --bench model_step --pairs 6

The base revision is checked out into a temporary git worktree; both trees run
their own copy of the benchmark with the same venv and the same data, launch
after launch in ABBA order (base, head, head, base, ...) so that slow drift of
the machine hits both alike. Each launch yields one number per metric (the
median step time of that launch); consecutive (base, head) launches form a pair,
and the report is the geometric mean of the per-pair ratios head / base with a
95% interval (bench/paired.py). Nothing else may run on the machine meanwhile.

Benchmarks:
* parallel_step: the stack's world-size-1 training step (Trainer: megatron-core +
  DeepSpeed ZeRO-1) on the demo model, `bench/parallel_step.py --layouts 1x1x1 --stack-only`.
* model_step: forward+backward of vanilla / base / MeSH at one shape (`bench/model_step.py`).

Results: bench/results/compare_revisions-<bench>-<date>.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.paired import format_ratio, paired_ratio  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run_once(tree: Path, bench: str, args, out_dir: Path) -> dict[str, float]:
    """One launch of `bench` from `tree`: {metric: seconds}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("OMP_NUM_THREADS", None)
    if bench == "parallel_step":
        cmd = [sys.executable, str(tree / "bench" / "parallel_step.py"), "--layouts", "1x1x1", "--stack-only",
               "--rounds", "1", "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", "2",
               "--data-dir", str(args.data_dir), "--out", str(out_dir)]
    else:
        cmd = [sys.executable, str(tree / "bench" / "model_step.py"), "--hidden", str(args.hidden),
               "--seq", str(args.seq), "--repeats", str(args.repeats), "--out", str(out_dir)]
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        raise SystemExit(f"{bench} in {tree} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    files = sorted(out_dir.glob(f"{bench}-*.json"))
    if not files:
        raise SystemExit(f"{bench} in {tree} wrote no result into {out_dir}")
    data = json.loads(files[-1].read_text())
    files[-1].unlink()
    if bench == "parallel_step":
        (layout,) = [entry for entry in data["layouts"] if entry["layout"] == "1x1x1"]
        return {"stack step (s)": float(layout["step_s"])}
    return {f"{v} fwd+bwd (s)": t for v, t in data["median_step_s"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare against (e.g. a commit)")
    parser.add_argument("--bench", choices=("parallel_step", "model_step"), default="parallel_step")
    parser.add_argument("--pairs", type=int, default=4, help="(base, head) launch pairs, ABBA order")
    parser.add_argument("--steps", type=int, default=4, help="parallel_step: timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats inside each launch")
    parser.add_argument("--hidden", type=int, default=256, help="model_step: width")
    parser.add_argument("--seq", type=int, default=256, help="model_step: sequence length")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "demo"), help="parallel_step: demo data")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    if args.bench == "parallel_step" and not (Path(args.data_dir) / "train_text_document.bin").exists():
        from data_prep.demo import prepare_demo

        prepare_demo(Path(args.data_dir))
    base_rev, head_rev = git("rev-parse", args.base), git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="mesh-compare-") as tmp:
        base_tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(base_tree), base_rev)
        try:
            trees = {"base": base_tree, "head": ROOT}
            samples: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
            for i in range(args.pairs):
                order = ("base", "head") if i % 2 == 0 else ("head", "base")
                for side in order:
                    samples[side].append(run_once(trees[side], args.bench, args, Path(tmp) / "out"))
                    print(f"pair {i + 1}/{args.pairs} {side}: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in samples[side][-1].items()), flush=True)
        finally:
            git("worktree", "remove", "--force", str(base_tree))

    metrics = list(samples["head"][0])
    ratios = {m: paired_ratio([s[m] for s in samples["head"]], [s[m] for s in samples["base"]]) for m in metrics}
    result = {
        "benchmark": f"compare_revisions/{args.bench}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": base_rev, "head": head_rev, "head_has_uncommitted_changes": dirty,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "samples": samples, "head_over_base": ratios,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compare_revisions-{args.bench}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{args.bench}: head {head_rev[:8]}{' (+ uncommitted)' if dirty else ''} vs base {base_rev[:8]}, "
          f"{args.pairs} ABBA pairs\n")
    print("| metric | base median | head median | head / base (geometric mean, 95% interval) |")
    print("|---|---|---|---|")
    for m in metrics:
        b = sorted(s[m] for s in samples["base"])[len(samples["base"]) // 2]
        h = sorted(s[m] for s in samples["head"])[len(samples["head"]) // 2]
        print(f"| {m} | {b:.4f} | {h:.4f} | {format_ratio(ratios[m])} |")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
