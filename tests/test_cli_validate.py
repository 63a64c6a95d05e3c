"""``megatron-stgc validate --world-size N`` / ``print-config``: every problem of a config in
one run (each naming its flag), for a world size other than this process's, with no process
group; ``--version``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from example_paths import llava_example_paths
from megatron_stgc import cli
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config

TINY = ["--config", "examples/tiny_moe_cpu.yaml"]
LLAVA = ["--config", "examples/llava_stablelm_1.6b_clip336.yaml"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_validation_reports_every_problem():
    config = parse_run_config(TINY + ["--num-attention-heads", "3", "--lr", "-1",
                                      "--data-path", "/nonexistent.json",
                                      "--moe-router-topk", "9"])
    with pytest.raises(ConfigError) as raised:
        validate_run_config(config, world_size=1)
    problems = raised.value.problems
    flags = ["--num-attention-heads", "--lr must be > 0", "--data-path: /nonexistent.json",
             "--moe-router-topk (9) must be <= --num-experts"]
    for expected in flags:
        assert any(expected in p for p in problems), (expected, problems)
    assert str(raised.value).splitlines() == problems


def test_validate_command_lists_the_problems(capsys):
    code = cli.main(["validate", "--world-size", "16"] + TINY + ["--lr", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 configuration problem(s) for world size 16" in err  # --min-lr > --lr too
    assert "--global-batch-size (32) must be divisible by --micro-batch-size (8) x " \
           "data-parallel size (16)" in err and "--lr must be > 0" in err


def test_validate_a_16_rank_config_in_one_process(tmp_path, capsys, monkeypatch):
    """In a fresh process with no torchrun variables: valid, and no process group made."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    args = ["validate", "--world-size", "16"] + LLAVA + llava_example_paths(tmp_path)
    probe = ("import sys, torch.distributed as dist; from megatron_stgc import cli; "
             "code = cli.main(sys.argv[1:]); print('group', dist.is_initialized()); "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "valid for world size 16: tensor-parallel 1, expert-parallel 4, data-parallel 16" \
        in done.stdout
    assert "group False" in done.stdout
    # the same config for 6 ranks: EP 4 does not divide DP 6
    assert cli.main(args[:2] + ["6"] + args[3:]) == 2
    assert "--expert-model-parallel-size (4) must divide the data-parallel size (6" in \
        capsys.readouterr().err


def test_print_config_prints_then_validates(capsys):
    code = cli.main(["print-config", "--world-size", "2"] + TINY + ["--hidden-size", "65"])
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["model"]["hidden_size"] == 65
    assert code == 2 and "--hidden-size (65) must be divisible by --num-attention-heads" in err
    assert cli.main(["print-config", "--world-size", "2"] + TINY) == 0
    capsys.readouterr()
    assert cli.main(["print-config"] + TINY) == 2  # world size 1: EP 2 does not fit
    assert "--expert-model-parallel-size (2) must divide" in capsys.readouterr().err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("megatron-stgc ")


def test_toy_defaults_are_named_without_a_config():
    from megatron_stgc.config import toy_defaults_notice

    notice = toy_defaults_notice(["--hidden-size", "32"])
    assert notice.startswith("not given, so the toy defaults apply: --num-layers 4, "
                             "--num-attention-heads 4, --seq-length 64, --num-experts 4, "
                             "--data-path None, --tokenizer-model None")
    assert "--hidden-size" not in notice.split(" (")[0]
    assert toy_defaults_notice(TINY) is None  # an explicit example config: its choice
