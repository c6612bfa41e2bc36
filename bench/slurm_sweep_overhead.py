"""How much a sweep's job array costs beyond its runs' own training.

    python bench/slurm_sweep_overhead.py                     # the 12-run tiny sweep, one CPU rank per run
    python bench/slurm_sweep_overhead.py --steps-scale 4     # the same runs, 4x the steps

Runs configs/sweeps/tiny.yaml (three widths x two variants x two budgets) on the demo data as one
`mesh sweep submit` array on the local SLURM cluster (slurm/local_cluster.sh up is run first) and
reports, from submit to the last task's end:

* wall:       seconds of the whole array;
* training:   the sum of every run's own training time (COMPLETE's segment_seconds: the loop
              from the first step to the final save);
* ideal wall: training / the tasks that fit the node at once (node CPUs / --cpus-per-task);
* overhead:   wall / ideal wall, and the fixed cost per run ((wall x slots - training) / runs):
              scheduling, process start, imports, torchrun, model and data set-up.

The per-run fixed cost is what matters for real sweeps: it is paid once per array task, against
hours of training per run. Nothing else may run on the machine meanwhile.
Results: bench/results/slurm_sweep_overhead-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default=str(ROOT / "configs" / "sweeps" / "tiny.yaml"))
    parser.add_argument("--data-dir", default=None, help="an existing `mesh data prepare-demo` folder (default: build one)")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every budget (longer runs)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    from slurm.scheduler import ACTIVE_STATES, show_job

    subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    data = Path(args.data_dir) if args.data_dir else work / "data"
    if not args.data_dir:
        from data_prep.demo import prepare_demo

        prepare_demo(data, progress=False)
    spec = yaml.safe_load(Path(args.sweep).read_text())
    spec["root"] = str(work / "sweep")
    spec.setdefault("overrides", {}).update({
        "data.tokenizer": str(data / "tokenizer.model"), "data.train": [str(data / "train_text_document")],
        "data.valid": [str(data / "val_text_document")]})
    if args.steps_scale != 1.0:
        if any(not str(t).upper().endswith("K") for t in spec["grid"]["tokens"]):
            raise SystemExit("--steps-scale needs budgets written as counts in K (e.g. 8K), as in tiny.yaml")
        spec["grid"]["tokens"] = [f"{int(float(str(t)[:-1]) * args.steps_scale)}K" for t in spec["grid"]["tokens"]]
    sweep_file = work / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mesh_cli", "sweep", "submit", str(sweep_file),
                           "--gpus-per-node", "0", "--procs-per-node", "1", "--cpus-per-task", str(args.cpus_per_task)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    array_id = done.stdout.split("submitted array ")[1].split()[0]
    while True:
        tasks = show_job(array_id)
        if tasks and all(t.get("JobState") not in ACTIVE_STATES for t in tasks):
            break
        if time.monotonic() - started > args.timeout:
            subprocess.run(["scancel", array_id])
            raise SystemExit(f"the sweep did not finish within {args.timeout} s")
        time.sleep(0.5)
    wall = time.monotonic() - started

    runs = sorted(p for p in (work / "sweep").iterdir() if (p / "COMPLETE").is_file())
    training = sum(json.loads((p / "COMPLETE").read_text())["segment_seconds"] for p in runs)
    node_cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    slots = max(1, node_cpus // args.cpus_per_task)
    ideal = training / slots
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": len(runs),
        "failed": sum(1 for t in tasks if t.get("JobState") != "COMPLETED"), "slots": slots,
        "wall_s": round(wall, 2), "training_s": round(training, 2), "ideal_wall_s": round(ideal, 2),
        "wall_over_ideal": round(wall / ideal, 2) if ideal else None,
        "fixed_cost_per_run_s": round((wall * slots - training) / max(1, len(runs)), 2),
        "steps_scale": args.steps_scale,
    }
    print(f"{result['runs']} runs, {slots} at a time: wall {wall:.1f} s, training {training:.1f} s "
          f"(ideal wall {ideal:.1f} s), wall / ideal {result['wall_over_ideal']}, "
          f"fixed cost {result['fixed_cost_per_run_s']} s per run")
    out = ROOT / "bench" / "results" / f"slurm_sweep_overhead-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
