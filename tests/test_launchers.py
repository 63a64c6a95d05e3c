"""The launchers' DRY_RUN (examples/launch/): every combination prints the command it would
run, and that command parses and validates for the world size it launches; NNODES > 1 without
RDZV_HOST is an error (not a rendezvous on 127.0.0.1 that hangs); the SLURM script creates its
log folder."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from example_paths import llava_example_paths
from launch_utils import REPO
from megatron_stgc.config import parse_run_config
from megatron_stgc.validation import validate_run_config

SCRIPT = os.path.join(REPO, "examples", "launch", "torchrun_multinode.sh")
SBATCH = os.path.join(REPO, "examples", "launch", "slurm_moe.sbatch")
LLAVA_YAML = "examples/llava_stablelm_1.6b_clip336.yaml"


@pytest.fixture
def paths(tmp_path):
    return llava_example_paths(tmp_path)


def _run(script: str, args: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "RDZV_", "NNODES", "NPROC_PER_NODE", "MODEL"))}
    return subprocess.run(["bash", script, *args], env=dict(clean, **env), capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def _launch_and_train(line: str) -> tuple[dict[str, str], list[str]]:
    """torchrun's options as a dict, and the flags after ``-m megatron_stgc train``."""
    words = shlex.split(line)
    at = words.index("megatron_stgc")
    assert words[:3] == ["python", "-m", "torch.distributed.run"], words
    assert words[at - 1] == "-m" and words[at + 1] == "train"
    launch = words[3:at - 1]
    return dict(zip(launch[::2], launch[1::2])), words[at + 2:]


def _check_valid(train: list[str], launch: dict[str, str]) -> None:
    nodes = int(launch["--nnodes"].split(":")[-1])
    config = parse_run_config(train)
    validate_run_config(config, world_size=nodes * int(launch["--nproc-per-node"]))
    assert config.vision.vision_model_type == "clip"  # the default: vision-language


def test_single_node_defaults_to_the_vision_language_config(paths):
    done = _run(SCRIPT, paths, DRY_RUN="1", NNODES="1")
    assert done.returncode == 0, done.stderr
    launch, train = _launch_and_train(done.stdout)
    assert launch["--nnodes"] == "1" and launch["--rdzv-endpoint"] == "127.0.0.1:29500"
    assert train[:2] == ["--config", LLAVA_YAML]
    _check_valid(train, launch)


def test_multi_node_with_rdzv_host(paths):
    done = _run(SCRIPT, paths, DRY_RUN="1", NNODES="2", RDZV_HOST="node001", RDZV_PORT="6000",
                JOB_ID="job7")
    assert done.returncode == 0, done.stderr
    launch, train = _launch_and_train(done.stdout)
    assert (launch["--nnodes"], launch["--nproc-per-node"]) == ("2", "8")
    assert (launch["--rdzv-endpoint"], launch["--rdzv-id"]) == ("node001:6000", "job7")
    _check_valid(train, launch)


@pytest.mark.parametrize("dry_run", ["1", "0"])
@pytest.mark.parametrize("nnodes", [None, "2", "1:4"])
def test_multi_node_without_rdzv_host_is_an_error(dry_run, nnodes):
    env = dict(DRY_RUN=dry_run, **({} if nnodes is None else {"NNODES": nnodes}))
    done = _run(SCRIPT, [], **env)  # without the check DRY_RUN=0 would start torchrun
    assert done.returncode == 2 and done.stdout == ""
    assert "needs RDZV_HOST" in done.stderr


def test_slurm_dry_run_creates_its_log_folder_and_names_the_first_node(tmp_path, paths):
    # SLURM is not installed here: a two-line scontrol prints the allocation's hostnames
    # as `scontrol show hostnames` does
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    logs = tmp_path / "logs"
    done = _run(SBATCH, paths, DRY_RUN="1", PATH=f"{bin_dir}:{os.environ['PATH']}",
                SLURM_JOB_NODELIST="gpu[017-018]", SLURM_JOB_NUM_NODES="2",
                SLURM_JOB_ID="4242", LOG_DIR=str(logs))
    assert done.returncode == 0, done.stderr
    srun_line, node_line = done.stdout.strip().splitlines()
    srun = shlex.split(srun_line)
    assert srun[0] == "srun" and srun[srun.index("--output") + 1].startswith(str(logs) + "/")
    assert srun[srun.index("bash") + 1] == "examples/launch/torchrun_multinode.sh"
    assert logs.is_dir()
    launch, train = _launch_and_train(node_line)
    assert (launch["--nnodes"], launch["--rdzv-endpoint"], launch["--rdzv-id"]) == (
        "2", "gpu017:29500", "4242")
    _check_valid(train, launch)


def test_slurm_script_outside_an_allocation_is_an_error():
    done = _run(SBATCH, [], DRY_RUN="1")
    assert done.returncode == 2 and "SLURM_JOB_NODELIST is not set" in done.stderr
