"""`mesh slurm submit | status`."""

from __future__ import annotations

import argparse

from mesh_cli.errors import CLIError


class IntermixedParser(argparse.ArgumentParser):
    """Config overrides may come before or after the flags (`submit CONFIG --nodes 2 train.steps=10`):
    argparse alone takes positionals in one run only."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def resources_from_args(args: argparse.Namespace):
    from slurm.resources import SlurmResources

    return SlurmResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, qos=args.qos,
        time=args.time, constraint=args.constraint, exclusive=args.exclusive, mem=args.mem,
        signal_seconds=args.signal, requeue=args.requeue, array=args.array, gpu_memory_gb=args.gpu_memory,
        job_name=args.job_name, sbatch=[_as_option(s) for s in args.sbatch],
    )


def _as_option(text: str) -> str:
    """`--sbatch mail-type=END` and `--sbatch=--mail-type=END` mean the same (argparse cannot take a
    value that starts with -- after a space)."""
    text = text.strip()
    return text if text.startswith("-") else f"--{text}"


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise CLIError(f"--env {pair!r} must be NAME=VALUE")
        env[name] = value
    return env


def _submit(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from slurm.submit import submit_run

    resources = resources_from_args(args)
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"logging.run_dir={args.run_dir}")
    config = load_config(args.config, overrides)
    submit_run(config, resources, dry_run=args.dry_run, env=parse_env(args.env))
    return 0


def _status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slurm.status import run_status

    if not Path(args.run_dir).is_dir():
        raise CLIError(f"{args.run_dir} is not a run directory")
    print(run_status(args.run_dir).describe())
    return 0


def add_resource_flags(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    """The resource flags `mesh slurm submit` takes (a sweep file's `slurm:` section has the same fields).
    ``suppress_defaults``: only the flags given appear in the namespace (they override a sweep file)."""
    group = parser.add_argument_group("resources")

    class _Group:
        @staticmethod
        def add_argument(*names, **kwargs):
            if suppress_defaults:
                kwargs["default"] = argparse.SUPPRESS
            return group.add_argument(*names, **kwargs)

    g = _Group()
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=8, metavar="G",
                   help="GPUs per node, one training process each (default 8); 0 on a CPU-only cluster")
    g.add_argument("--procs-per-node", type=int, default=None, metavar="N",
                   help="training processes per node with --gpus-per-node 0 (gloo ranks on the CPU)")
    g.add_argument("--cpus-per-task", type=int, default=None, metavar="C",
                   help="CPUs of each node's task (default 8 per GPU, or one per CPU rank)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--time", help="time limit per job, e.g. 24:00:00 (SLURM's forms)")
    g.add_argument("--constraint", help="node features, e.g. h100")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--mem", help="memory per node, e.g. 500G")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other #SBATCH option, passed through (repeatable): --sbatch mail-type=END or "
                        "--sbatch=--mail-type=END")
    g.add_argument("--signal", type=int, default=120, metavar="S",
                   help="SIGUSR1 to the batch shell S seconds before the time limit: the ranks save and the job "
                        "requeues itself (default 120; leave time for one checkpoint save)")
    g.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                   help="requeue the job when its ranks stopped for a signal or train.max_minutes (default on)")
    g.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                   help="memory of one GPU; a job whose estimate does not fit is refused (default 80)")
    g.add_argument("--job-name", help="job name (default mesh-<run directory name>)")


def register(subparsers) -> None:
    slurm = subparsers.add_parser(
        "slurm", help="launch training on a SLURM cluster and follow it",
        description="Submit a training run as a SLURM batch job (one srun task per node, torchrun under each) "
                    "and report on it. docs/slurm.md has the details and a local test cluster.")
    sub = slurm.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND", parser_class=IntermixedParser)
    slurm.set_defaults(func=lambda args: (slurm.print_help(), 2)[1])

    submit = sub.add_parser(
        "submit", help="submit one training run",
        description=(
            "Check the config's parallel layout against nodes x GPUs and its memory estimate against "
            "--gpu-memory, write the resolved config and the rendered sbatch script into the run directory "
            "(RUN_DIR/slurm/), and submit it. The job resumes from the newest complete checkpoint on every "
            "requeue; a run that is already COMPLETE is not submitted again. Example: "
            "`mesh slurm submit configs/pythia-6.9b/mesh.yaml --nodes 4 --gpus-per-node 8 --time 24:00:00 "
            "parallel.pipeline=2`. On a CPU-only cluster: `--gpus-per-node 0 --procs-per-node 2 train.device=cpu`."),
    )
    submit.add_argument("config", help="YAML config file (see configs/)")
    submit.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="config overrides")
    add_resource_flags(submit)
    submit.add_argument("--array", metavar="SPEC",
                        help="chain time-limited jobs over this run, e.g. 1-10%%1 (one after another; each "
                             "continues from the last one's checkpoint, the rest do nothing once it is COMPLETE)")
    submit.add_argument("--run-dir", help="run directory (default: the config's logging.run_dir)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="export this in the job, over the defaults (OMP_NUM_THREADS, NCCL_*) (repeatable)")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the batch script, the layout and the memory estimate; submit and write nothing")
    submit.set_defaults(func=_submit)

    status = sub.add_parser(
        "status", help="job state, restarts, last step, loss, tokens/s and ETA of a run",
        description="Reads the run directory (metrics.jsonl, COMPLETE, the submissions in RUN_DIR/slurm/jobs.jsonl) "
                    "and the scheduler (squeue / scontrol).")
    status.add_argument("run_dir", help="the run directory given to `mesh slurm submit`")
    status.set_defaults(func=_status)
