"""The rendered sbatch script, the resources and the layout check: no cluster needed."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mesh_cli.main import main
from mesh_model.config import ConfigError
from pretrain.config import load_config
from slurm.batch_script import PORT_BASE, PORT_SPAN
from slurm.resources import SlurmResources
from slurm.submit import check_layout, prepare_run

REPO = Path(__file__).resolve().parents[3]
PYTHIA_12B = REPO / "configs" / "pythia-12b" / "mesh.yaml"
PYTHIA_6_9B = REPO / "configs" / "pythia-6.9b" / "mesh.yaml"


def _line_with(script: str, word: str) -> list[str]:
    """The shell words of the one command line of ``script`` that starts with ``word``
    (a continued line joined)."""
    joined = script.replace("\\\n", " ")
    lines = [l for l in joined.splitlines() if l.strip().startswith(word)]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].rstrip(" &"), posix=False)


def test_four_nodes_of_eight_gpus_at_tp8_pp2_dp2(tmp_path):
    config = load_config(PYTHIA_12B, ["parallel.pipeline=2"])
    resources = SlurmResources(nodes=4, gpus_per_node=8, partition="gpu", account="proj", qos="high",
                               time="24:00:00", constraint="h100", exclusive=True, signal_seconds=300,
                               sbatch=["--reservation=big", "--mail-type=END"])
    plan = check_layout(config, resources)
    assert (plan.world_size, plan.tensor, plan.pipeline, plan.data) == (32, 8, 2, 2)

    script = prepare_run(config, resources, tmp_path / "run", {"NCCL_DEBUG": "INFO"}).script_text
    directives = [l.split(" ", 1)[1] for l in script.splitlines() if l.startswith("#SBATCH ")]
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                     "--partition=gpu", "--account=proj", "--qos=high", "--time=24:00:00", "--constraint=h100",
                     "--exclusive", "--signal=B:USR1@300", "--requeue", "--open-mode=append",
                     "--reservation=big", "--mail-type=END"):
        assert expected in directives, expected
    assert not any(d.startswith("--array") for d in directives)

    srun = _line_with(script, "srun")
    assert srun[:6] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=64",
                        "--kill-on-bad-exit=1"]
    torchrun = srun[srun.index("-m") - 1:]
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    for expected in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$SLURM_JOB_ID", "--max-restarts=0"):
        assert expected in torchrun, expected
    assert any(w.startswith("--signals-to-handle=") and "SIGUSR1" in w for w in torchrun)
    assert torchrun[-3:] == ["-m", "pretrain", '"$CONFIG"']
    # the rendezvous host is the first of the allocation, the port follows the job id
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert f"MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))" in script
    # defaults give way to the submitting environment; --env is exported as given
    assert 'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"' in script and "export NCCL_DEBUG=INFO" in script
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"' in script
    # the requeue decision reads the run directory's marker, not srun's exit status
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "INTERRUPTED" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # it parses


def test_cpu_ranks_and_a_chain(tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml", ["train.device=cpu", "train.micro_batch_size=8"])
    resources = SlurmResources(gpus_per_node=0, procs_per_node=2, array="1-3%1", requeue=False)
    check_layout(config, resources)
    script = prepare_run(config, resources, tmp_path / "run", {}).script_text
    assert "#SBATCH --array=1-3%1" in script and "#SBATCH --no-requeue" in script
    assert "--gpus-per-node" not in script and "NCCL" not in script
    assert "--nproc-per-node=2" in script and "--nnodes=1" in script
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("resources, overrides, message", [
    (dict(nodes=3, gpus_per_node=8), ["parallel.pipeline=2"], r"8 x 2 = 16 does not divide 3 nodes x 8"),
    (dict(nodes=1, gpus_per_node=0, procs_per_node=8), [], r"train.device=cuda but --gpus-per-node 0"),
    (dict(nodes=2, gpus_per_node=8), ["train.global_batch_size=1001"], r"train.global_batch_size=1001"),
])
def test_layouts_that_cannot_work(resources, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(load_config(PYTHIA_12B, overrides), SlurmResources(**resources))


@pytest.mark.parametrize("values, message", [
    ({"nodes": 0}, r"slurm.nodes=0 must be an integer >= 1"),
    ({"gpus_per_node": 0}, r"needs slurm.procs_per_node"),
    ({"gpus_per_node": 8, "procs_per_node": 4}, r"must equal slurm.gpus_per_node"),
    ({"time": "tomorrow"}, r"slurm.time='tomorrow' is not a SLURM time"),
    ({"array": "1-3%"}, r"not a SLURM index list"),
    ({"gpu_memory_gb": 0}, r"gpu_memory_gb=0 must be a number > 0"),
    ({"sbatch": ["mail-type=END"]}, r"must be an sbatch option"),
    ({"gpus": 8}, r"sweep.slurm.gpus is not a resource field"),
    ({"partition": ""}, r"sweep.slurm.partition=''"),
])
def test_bad_resources_name_the_field(values, message):
    with pytest.raises(ConfigError, match=message) as err:
        SlurmResources.from_mapping(values, where="sweep.slurm")
    assert "\n" not in str(err.value)


def test_sweep_section_is_read_with_its_types():
    r = SlurmResources.from_mapping({"nodes": 2, "gpus_per_node": 4, "time": 30, "sbatch": "--mail-type=END"})
    assert (r.world_size, r.time, r.sbatch) == (8, "30", ["--mail-type=END"])


def test_impossible_requests_are_one_line_and_submit_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cases = [
        ["--nodes", "3", "parallel.pipeline=2"],              # 16 does not divide 24
        ["--gpus-per-node", "0"],                             # no ranks
        ["--time", "soon"],
        ["--gpus-per-node", "8", "--gpu-memory", "1"],        # does not fit a 1 GB GPU
    ]
    for flags in cases:
        code = main(["slurm", "submit", str(PYTHIA_12B), "--run-dir", str(run_dir), *flags])
        err = capsys.readouterr().err
        assert code == 2, (flags, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("mesh slurm: error: "), err
    assert not run_dir.exists()


@pytest.mark.parametrize("config, flags", [
    (PYTHIA_6_9B, ["--nodes", "1", "--gpus-per-node", "8"]),
    (PYTHIA_12B, ["--nodes", "2", "--gpus-per-node", "8", "--sbatch", "mail-type=END"]),
])
def test_dry_run_of_the_big_configs_prints_a_layout_that_fits(config, flags, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["slurm", "submit", str(config), "--run-dir", str(run_dir), "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "srun " in out
    layout = re.search(r"# layout: world (\d+) = TP (\d+) x PP (\d+) x DP (\d+)", out)
    assert layout is not None, out
    world, tp, pp, dp = map(int, layout.groups())
    assert world == tp * pp * dp == 8 * int(flags[1])
    fits = re.search(r"fits 80 GB per GPU: ([\d.]+) GiB estimated", out)
    assert fits is not None and 1 < float(fits.group(1)) < 80 * 1e9 / 2**30, out
    assert ("#SBATCH --mail-type=END" in out) == ("--sbatch" in flags)
    assert not run_dir.exists()  # a dry run writes nothing
