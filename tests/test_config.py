"""Configuration: YAML + flags precedence, and bad configs rejected before any process group."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from megatron_stgc.config import ConfigError, build_arg_parser, load_yaml, parse_run_config
from megatron_stgc.validation import validate_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "tiny_moe_cpu.yaml")


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 6\nhidden_size: 96\nmodel:\n  num_experts: 8\n"
                    "stgc:\n  enabled: true\n  beta: 0.5\nstgc_tau: 0.1\n")
    config = parse_run_config(["--config", str(path), "--hidden-size", "128", "--stgc-beta", "2"])
    assert config.model.num_layers == 6          # from YAML
    assert config.model.hidden_size == 128       # flag beats YAML
    assert config.model.num_experts == 8         # grouped YAML key
    assert config.stgc.enabled is True and config.stgc.beta == 2.0 and config.stgc.tau == 0.1
    assert config.training.micro_batch_size == 4  # dataclass default


def test_example_config_is_valid():
    config = parse_run_config(["--config", EXAMPLE])
    validate_run_config(config, world_size=2)
    assert config.parallel.expert_model_parallel_size == 2
    assert config.model.moe_layer_freq == 2


def test_all_stgc_flags_exist():
    options = {option for action in build_arg_parser()._actions for option in action.option_strings}
    for name in ("--stgc", "--stgc-beta", "--stgc-tau", "--stgc-layers", "--stgc-mode",
                 "--stgc-estimator", "--stgc-normalization"):
        assert name in options
    config = parse_run_config(["--stgc", "--stgc-layers", "0-1", "--stgc-mode", "two-pass"])
    assert config.stgc.enabled and config.stgc.layers == "0-1" and config.stgc.mode == "two-pass"


def test_boolean_flags():
    assert parse_run_config(["--bf16"]).precision.bf16 is True
    assert parse_run_config(["--bf16", "false"]).precision.bf16 is False
    assert parse_run_config(["--no-bf16"]).precision.bf16 is False


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_layer: 4\n")
    with pytest.raises(ConfigError, match="num_layer"):
        load_yaml(str(path))


BAD_CONFIGS = [
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2, "--num-experts"),
    (["--moe-router-topk", "5", "--num-experts", "4"], 1, "--moe-router-topk"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], 2, "--global-batch-size"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], 1, "--hidden-size"),
    (["--expert-model-parallel-size", "4"], 2, "--expert-model-parallel-size"),
    (["--num-experts", "none", "--tensor-model-parallel-size", "2", "--seq-length", "15"], 2,
     "--seq-length"),
    (["--tensor-model-parallel-size", "2"], 2, "--tensor-model-parallel-size"),
    (["--moe-token-dispatcher-type", "flex"], 1, "--moe-token-dispatcher-type"),
    (["--min-lr", "0.1", "--lr", "0.01"], 1, "--min-lr"),
    (["--lr-decay-style", "exp"], 1, "--lr-decay-style"),
    (["--save-interval", "10"], 1, "--save-interval"),
    (["--stgc", "--stgc-mode", "three-pass"], 1, "--stgc-mode"),
    (["--stgc", "--stgc-layers", "0-9", "--num-layers", "4"], 1, "--stgc-layers"),
    (["--stgc", "--stgc-tau", "2"], 1, "--stgc-tau"),
    # default model: 4 layers, MoE every 2nd layer (0 and 2)
    (["--stgc", "--stgc-layers", "1,2"], 1, "--stgc-layers names layers [1]"),
    (["--stgc", "--stgc-layers", "3"], 1, "--stgc-layers names layers [3]"),
    # expert TP defaults to TP; STGC needs 1
    (["--stgc", "--tensor-model-parallel-size", "2"], 2,
     "set --expert-tensor-parallel-size 1"),
    (["--stgc", "--expert-tensor-parallel-size", "2"], 2, "--expert-tensor-parallel-size 1 only"),
    (["--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"], 2,
     "--expert-tensor-parallel-size (2) x --expert-model-parallel-size (2)"),
    (["--fp8-format", "e4m3"], 1, "--fp8-format"),
    (["--moe-expert-capacity-factor", "1.0", "--moe-token-dispatcher-type", "allgather"], 1,
     "--moe-expert-capacity-factor"),
    (["--tokenizer-model", "/no/such/file.model"], 1, "--tokenizer-model"),
    (["--num-workers", "-1"], 1, "--num-workers must be >= 0"),
    (["--max-bad-sample-fraction", "1.5"], 1, "--max-bad-sample-fraction"),
    (["--group-by-modality-length"], 1, "--group-by-modality-length needs --vision-model-type"),
    (["--data-path", EXAMPLE, EXAMPLE], 1, "--data-path names"),
    (["--data-path", EXAMPLE, "/no/such/nlp.json"], 1, "--data-path: /no/such/nlp.json"),
]


@pytest.mark.parametrize("argv,world_size,flag", BAD_CONFIGS,
                         ids=[case[2] for case in BAD_CONFIGS])
def test_bad_config_names_the_flag(argv, world_size, flag):
    process_group_before = dist.is_initialized()  # other tests may have made one
    config = parse_run_config(argv)
    with pytest.raises(ConfigError) as error:
        validate_run_config(config, world_size)
    assert flag in str(error.value)
    assert dist.is_initialized() == process_group_before  # none created


def test_cli_rejects_bad_config_before_any_process_group():
    env = dict(os.environ, WORLD_SIZE="2", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "megatron_stgc", "train", "--config", EXAMPLE,
         "--num-experts", "3"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--num-experts (3) must be divisible by --expert-model-parallel-size (2)" in done.stderr
    assert "Traceback" not in done.stderr


def test_expert_tensor_parallel_size_one_lets_stgc_past_its_check():
    """--stgc with TP 2 and --expert-tensor-parallel-size 1 passes STGC's check; on a CPU
    machine the next check (TP > 1 with MoE needs TE) is what stops it."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the TE check may pass")
    config = parse_run_config(["--stgc", "--tensor-model-parallel-size", "2",
                               "--expert-tensor-parallel-size", "1"])
    with pytest.raises(ConfigError, match="needs sequence parallelism"):
        validate_run_config(config, 2)


def test_data_path_takes_several_files_from_flags_and_yaml(tmp_path):
    assert parse_run_config(["--data-path", "a.json", "b.json"]).data.data_path == ["a.json",
                                                                                   "b.json"]
    assert parse_run_config(["--data-path", "none"]).data.data_path is None
    one, several = tmp_path / "one.yaml", tmp_path / "several.yaml"
    one.write_text("data:\n  data_path: a.json\n")
    several.write_text("data_path: [a.json, b.json]\n")
    assert parse_run_config(["--config", str(one)]).data.data_path == ["a.json"]
    assert parse_run_config(["--config", str(several)]).data.data_path == ["a.json", "b.json"]
    with pytest.raises(ConfigError, match="--data-path: expected a file name"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("data_path: 3\n")
        parse_run_config(["--config", str(bad)])


def test_stgc_layers_all_is_every_moe_layer():
    config = parse_run_config(["--stgc", "--stgc-layers", "all"])  # MoE on layers 0 and 2
    validate_run_config(config, 1)
