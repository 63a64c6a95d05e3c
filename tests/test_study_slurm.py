"""megatron-stgc study --launcher slurm for 2-node grids: the generated sbatch scripts parsed
(#SBATCH lines, srun + torchrun lines, the c10d rendezvous on the first node, --save/--load,
the log directory), each run in DRY_RUN form with its commands validated for 16 ranks by
megatron-stgc's own config checks, a finished stage skipped, and submit.sh run against a
stand-in sbatch that records the dependencies (the collect job after every run job)."""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys

import pytest
import torch.distributed.run as torchrun

from megatron_stgc.config import parse_run_config
from megatron_stgc.validation import validate_run_config
from megatron_stgc.eval.options import add_eval_flags
from megatron_stgc.study.cli import main as study_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "study")


def _sbatch_options(path) -> dict[str, str]:
    options = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#SBATCH "):
                key, _, value = line[len("#SBATCH "):].strip().partition("=")
                options[key] = value
    return options


def _dry_run(script, **env) -> str:
    done = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DRY_RUN="1", HEAD_NODE="node001",
                                   SLURM_JOB_ID="42", **env))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _commands(output: str) -> list[list[str]]:
    return [shlex.split(line) for line in output.splitlines() if line.startswith("srun ")]


def _split_srun(argv: list[str]) -> tuple[list[str], list[str]]:
    python = argv.index(sys.executable)
    return argv[:python], argv[python + 1:]


@pytest.fixture
def user_mix(tmp_path):
    """examples/study/llava_mix.yaml pointed at stand-in files (the configs are checked, not
    trained: 2 nodes x 8 GPUs)."""
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "model.pt").write_bytes(b"")
    (tmp_path / "images").mkdir()
    for name in ("mix.json", "q.jsonl", "a.jsonl", "spm.model"):
        (tmp_path / name).write_text("[]" if name == "mix.json" else "")
    out = tmp_path / "study"
    code = study_main([
        "--grid", os.path.join(EXAMPLES, "llava_mix.yaml"), "--output", str(out),
        "--launcher", "slurm", "--set", f"mix={tmp_path / 'mix.json'}",
        "--set", f"image_root={tmp_path / 'images'}", "--set", f"pretrained={tmp_path / 'dense'}",
        "--set", f"tokenizer={tmp_path / 'spm.model'}",
        "--set", f"questions={tmp_path / 'q.jsonl'}",
        "--set", f"answers={tmp_path / 'a.jsonl'}", "--sbatch=--partition=gpu"])
    assert code == 0
    return out


def test_one_sbatch_per_run_with_two_nodes_and_the_log_dir(user_mix):
    slurm = user_mix / "slurm"
    scripts = sorted(os.path.basename(p) for p in glob.glob(str(slurm / "runs" / "*.sbatch")))
    assert scripts == sorted(f"{p}-seed{s}.sbatch" for p in
                             ("baseline", "beta0.1", "beta1.0") for s in (1, 2, 3))
    assert not (slurm / "once.sbatch").exists()  # no once-stages in this grid
    assert (slurm / "logs").is_dir()  # SLURM does not create the --output directory
    script = slurm / "runs" / "beta1.0-seed2.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], timeout=60).returncode == 0
    options = _sbatch_options(script)
    assert options["--nodes"] == "2" and options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "8" and options["--partition"] == "gpu"
    assert options["--output"] == f"{slurm / 'logs'}/%x-%j.out"
    assert options["--open-mode"] == "append" and "--requeue" in options
    assert options["--job-name"] == "study-beta1.0-seed2"
    text = script.read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    collect = _sbatch_options(slurm / "collect.sbatch")
    assert collect["--nodes"] == "1" and "--gpus-per-node" not in collect


def test_dry_run_commands_are_valid_for_two_nodes_of_eight(user_mix):
    run_dir = user_mix / "runs" / "beta1.0" / "seed2"
    script = user_mix / "slurm" / "runs" / "beta1.0-seed2.sbatch"
    train, evaluate = _commands(_dry_run(script))
    for index, (argv, stage) in enumerate(((train, "train"), (evaluate, "eval"))):
        srun, launch = _split_srun(argv)
        assert srun == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1"]
        args = torchrun.get_args_parser().parse_args(launch[2:])
        assert launch[:2] == ["-m", "torch.distributed.run"]
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
        assert args.rdzv_endpoint == f"node001:{20000 + 42 + index}"  # first node, per stage
        assert args.rdzv_id == f"42-{stage}"
        assert args.module and args.training_script == "megatron_stgc"
        assert args.training_script_args[0] == stage
        flags = args.training_script_args[1:]
        if stage == "eval":
            parser = argparse.ArgumentParser()
            add_eval_flags(parser)
            options, flags = parser.parse_known_args(flags)
            assert options.results_file == str(run_dir / "results.json")
        config = parse_run_config(flags)
        validate_run_config(config, world_size=16)
        assert config.checkpoint.save == config.checkpoint.load == str(run_dir)
        assert config.logging.log_file == str(run_dir / "train_log.jsonl")
        assert config.training.seed == 2
        assert config.stgc.enabled and config.stgc.beta == 1.0
        assert config.parallel.expert_model_parallel_size == 4


def test_a_finished_stage_is_skipped_and_a_finished_run_not_submitted(user_mix, tmp_path):
    run_dir = user_mix / "runs" / "baseline" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "train.done").write_text("100\n")
    output = _dry_run(user_mix / "slurm" / "runs" / "baseline-seed1.sbatch")
    assert "study: train: done before" in output
    assert [argv[argv.index("megatron_stgc") + 1] for argv in _commands(output)] == ["eval"]
    (run_dir / "eval.done").write_text("10\n")
    calls = _submit(user_mix, tmp_path)  # the scripts from the fixture: 9 runs
    assert len(calls) == 10
    grid = os.path.join(EXAMPLES, "llava_mix.yaml")
    study_main(["--grid", grid, "--output", str(user_mix), "--launcher", "slurm",
                "--set", "mix=/x", "--set", "pretrained=/x"])  # regenerate: 1 run finished
    calls = _submit(user_mix, tmp_path)
    assert len(calls) == 9 and not any("baseline-seed1.sbatch" in " ".join(c) for c in calls)


def _submit(study, tmp_path) -> list[list[str]]:
    """Run submit.sh with a stand-in sbatch that prints ids 100, 101, ... and logs its args."""
    log = tmp_path / "sbatch_calls"
    log.write_text("")
    fake = tmp_path / "sbatch"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> ' + shlex.quote(str(log)) + "\n"
                    'n=$(wc -l < ' + shlex.quote(str(log)) + ')\necho "$((99 + n));cluster"\n')
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(study / "slurm" / "submit.sh")], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, SBATCH=str(fake)))
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split() for line in log.read_text().splitlines()]


def test_digits_preset_on_two_nodes_chains_once_runs_and_collect(tmp_path):
    out = tmp_path / "study"
    assert study_main(["--grid", os.path.join(EXAMPLES, "digits.yaml"), "--output", str(out),
                       "--launcher", "slurm", "--nnodes", "2", "--nproc-per-node", "1",
                       "--seeds", "1,2", "--points", "beta1.0_tau0_layersall"]) == 0
    once = out / "slurm" / "once.sbatch"
    assert _sbatch_options(once)["--nodes"] == "2"
    data, stage2, export = _commands(_dry_run(once))
    assert data[:3] == ["srun", "--nodes=1", "--ntasks=1"] and data[-4:] == [
        "--output", str(out / "data"), "--seed", "0"]
    assert stage2[:2] == ["srun", "--nodes=2"] and "--nnodes" in stage2
    assert stage2[stage2.index("--nnodes") + 1] == "2"
    assert export[:2] == ["srun", "--nodes=1"]  # the export is one process
    assert export[export.index("--nproc-per-node") + 1] == "1"
    train_flags = stage2[stage2.index("train") + 1:]
    config = parse_run_config(train_flags)
    assert config.model.num_experts is None and config.checkpoint.save == str(out / "dense")

    calls = _submit(out, tmp_path)
    names = [os.path.basename(call[-1]) for call in calls]
    assert names == ["once.sbatch", "baseline-seed1.sbatch", "beta1.0_tau0_layersall-seed1.sbatch",
                     "baseline-seed2.sbatch", "beta1.0_tau0_layersall-seed2.sbatch",
                     "collect.sbatch"]
    assert all(call[0] == "--parsable" for call in calls)
    assert not any(arg.startswith("--dependency") for arg in calls[0])
    assert all("--dependency=afterok:100" in call for call in calls[1:5])
    assert "--dependency=afterok:101:102:103:104" in calls[5]

    collect = (out / "slurm" / "collect.sbatch").read_text().splitlines()[-1]
    argv = shlex.split(collect)
    assert argv[:3] == ["srun", "--nodes=1", "--ntasks=1"]
    assert argv[3:] == [sys.executable, "-m", "megatron_stgc", "study", "--collect", "--output",
                        str(out)]
    done = subprocess.run(argv[3:], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "0 of 4 runs finished" in done.stdout + done.stderr
