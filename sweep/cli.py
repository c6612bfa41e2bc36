"""`mesh sweep plan | collect | fit`: a scaling-law sweep from its file to its fitted laws.

`register` builds the `mesh sweep` parser; every module named in `EXTENSIONS` adds its own
subcommands to it through `add_sweep_commands(commands)` (the SLURM launcher's submit and status).
"""

from __future__ import annotations

import argparse

EXTENSIONS: list[str] = ["sweep.submit"]
"""Modules with an `add_sweep_commands(commands)` that add subcommands to `mesh sweep`."""

SWEEP_HELP = "the sweep file (docs/sweeps.md: grid of sizes x variants x token budgets x seeds)"


def _plan(args: argparse.Namespace) -> int:
    from sweep.plan import plan_table, probe_tokens_per_s
    from sweep.spec import load_sweep

    sweep = load_sweep(args.sweep, root=args.root)
    tokens_per_s = args.tokens_per_s
    probe = None
    if args.probe:
        probe = probe_tokens_per_s(sweep, steps=args.probe_steps)
        tokens_per_s = None
    print(plan_table(sweep, tokens_per_s=tokens_per_s, probe=probe, gpus_per_run=args.gpus_per_run))
    return 0


def _collect(args: argparse.Namespace) -> int:
    from sweep.collect import collect, write_collection
    from sweep.spec import load_sweep

    sweep = load_sweep(args.sweep, root=args.root)
    collection = collect(sweep)
    csv_path, json_path = write_collection(collection, args.out or sweep.root)
    print(collection.summary())
    print(f"wrote {csv_path} and {json_path}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from sweep.fit import FitOptions, fit_source

    options = FitOptions(bootstrap=args.bootstrap, seed=args.seed, huber_delta=args.huber_delta,
                         grid_points=args.grid_points, all_points=args.all_points)
    report = fit_source(args.source, out_dir=args.out, options=options, root=args.root)
    print(report.describe())
    for path in report.written:
        print(f"wrote {path}")
    return 0


def register(subparsers) -> argparse._SubParsersAction:
    parser = subparsers.add_parser(
        "sweep",
        help="scaling-law sweeps: plan the runs, collect their losses, fit L(N) and L(N, D)",
        description=(
            "A sweep file declares a grid of training runs (model sizes x variants x token budgets x seeds) "
            "with size-dependent rules for LR and batch. `plan` prints the runs with their parameters, tokens, "
            "FLOPs and GPU-hours; `collect` gathers every run's validation losses into one CSV and JSON; "
            "`fit` fits scaling laws to them and plots loss vs parameters and vs FLOPs. See docs/sweeps.md."
        ),
    )
    commands = parser.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    plan = commands.add_parser(
        "plan", help="the table of runs: parameters, tokens, steps, FLOPs, estimated GPU-hours",
        description=(
            "Resolve every run of the sweep (nothing is trained or written) and print its id, variant, size, "
            "non-embedding and total parameters, tokens, steps and training FLOPs (F_token x tokens). "
            "GPU-hours come from --tokens-per-s, a throughput you measured, assumed for the smallest run and "
            "scaled to the others by their FLOPs per token; or from --probe, which trains the smallest run for "
            "a few steps in a scratch folder and measures it."
        ),
    )
    plan.add_argument("sweep", metavar="SWEEP.yaml", help=SWEEP_HELP)
    rate = plan.add_mutually_exclusive_group()
    rate.add_argument("--tokens-per-s", type=float, default=None,
                      help="training throughput of the smallest run, tokens/s per run (all its GPUs together)")
    rate.add_argument("--probe", action="store_true",
                      help="measure the smallest run's tokens/s with a short training run on this machine")
    plan.add_argument("--probe-steps", type=int, default=6, help="steps of the probe run (default 6; the first is not timed)")
    plan.add_argument("--gpus-per-run", type=int, default=None,
                      help="GPUs each run uses, for GPU-hours (default: the sweep's slurm nodes x gpus_per_node; "
                           "a CPU sweep, gpus_per_node 0, is charged in core-hours: nodes x procs_per_node x "
                           "cpus_per_task)")
    plan.add_argument("--root", default=None, help="replace the sweep file's root (where the run folders are)")
    plan.set_defaults(func=_plan)

    collect = commands.add_parser(
        "collect", help="every run's validation losses (intermediate and final) into one CSV and JSON",
        description=(
            "Read each run folder's metrics.jsonl (valid/loss rows) and COMPLETE marker and write "
            "<root>/results.csv and results.json: one row per evaluation, with run_id, variant, size, "
            "parameters (non-embedding), parameters_total, tokens (seen at that step), flops, step, loss, "
            "final (the finished run's last evaluation), seed and tokens_per_s. Runs not started or not "
            "finished are listed."
        ),
    )
    collect.add_argument("sweep", metavar="SWEEP.yaml", help=SWEEP_HELP)
    collect.add_argument("--out", default=None, help="folder for results.csv / results.json (default: the sweep root)")
    collect.add_argument("--root", default=None, help="replace the sweep file's root (where the run folders are)")
    collect.set_defaults(func=_collect)

    fit = commands.add_parser(
        "fit", help="fit L(N) = E + A/N^alpha per variant, and L(N, D) = E + A/N^alpha + B/D^beta",
        description=(
            "Fit scaling laws to the final losses of a sweep (its results.csv, or the sweep file, which is "
            "collected first) or to any CSV with the columns variant, parameters, tokens, loss. Method: Huber "
            "loss (delta 1e-3) on log-loss with the log-sum-exp parametrisation, L-BFGS-B from a grid of "
            "starting points, best kept (Hoffmann et al. 2022, approach 3; Besiroglu et al. 2024), and "
            "bootstrap confidence intervals over runs. Writes fit.json and PNG plots (loss vs parameters "
            "and vs FLOPs, per variant, with the fitted curves)."
        ),
    )
    fit.add_argument("source", metavar="CSV_OR_SWEEP", help="results.csv (or any CSV with variant, parameters, tokens, loss) or a sweep file")
    fit.add_argument("--out", default=None, help="folder for fit.json and the plots (default: next to the CSV)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200; 0: none)")
    fit.add_argument("--grid-points", type=int, default=3,
                     help="starting values per coefficient in the L-BFGS start grid (default 3)")
    fit.add_argument("--huber-delta", type=float, default=1e-3, help="Huber delta on the log-loss residuals (default 1e-3)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    fit.add_argument("--all-points", action="store_true",
                     help="fit every row (intermediate evaluations too), not only each run's final loss")
    fit.add_argument("--root", default=None, help="with a sweep file: replace its root")
    fit.set_defaults(func=_fit)

    import importlib

    for module_name in EXTENSIONS:
        importlib.import_module(module_name).add_sweep_commands(commands)
    return commands
