"""The launch recipes in examples/: the torchrun script really launches (tiny model, CPU),
and the paper-setting commands it builds are valid for 2 nodes x 8 GPUs."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest
import torch

from launch_utils import REPO, TINY_FLAGS, Job, free_port, read_jsonl
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config

SCRIPT = os.path.join(REPO, "examples", "launch", "torchrun_multinode.sh")
SBATCH = os.path.join(REPO, "examples", "launch", "slurm_moe.sbatch")


def _dry_run(**env) -> list[str]:
    done = subprocess.run(["bash", SCRIPT, "--data-path", "none", "--tokenizer-model", "none"],
                          env=dict(os.environ, DRY_RUN="1", **env), capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def _split(command: list[str]) -> tuple[list[str], list[str]]:
    at = command.index("megatron_stgc")
    assert command[at - 1] == "-m" and command[at + 1] == "train"
    return command[:at - 1], command[at + 2:]


@pytest.mark.parametrize("model,layers,hidden,bias", [("stablelm", 24, 2048, False),
                                                      ("phi2", 32, 2560, True)])
def test_paper_settings_are_valid_for_two_nodes(model, layers, hidden, bias):
    launch, train = _split(_dry_run(MODEL=model, RDZV_HOST="node001", JOB_ID="42"))
    text = " ".join(launch)
    for part in ("--nnodes 2", "--nproc-per-node 8", "--rdzv-backend c10d",
                 "--rdzv-endpoint node001:29500", "--rdzv-id 42", "--max-restarts 3"):
        assert part in text, (part, text)
    config = parse_run_config(train)
    validate_run_config(config, world_size=16)
    m = config.model
    assert (m.num_layers, m.hidden_size, m.add_bias_linear) == (layers, hidden, bias)
    assert (m.num_experts, m.moe_router_topk, m.moe_layer_freq) == (4, 2, 2)
    assert config.parallel.expert_model_parallel_size == 4
    assert config.precision.bf16 and config.precision.fp8_format is None
    assert config.stgc.enabled and config.checkpoint.keep_last == 3
    # 16 ranks / EP 4: the EP groups are 4 consecutive ranks, i.e. inside an 8-GPU node
    assert 8 % config.parallel.expert_model_parallel_size == 0


def test_fp8_variant_asks_for_transformer_engine():
    _, train = _split(_dry_run(PRECISION="fp8", MODEL="stablelm", RDZV_HOST="node001"))
    config = parse_run_config(train)
    assert config.precision.bf16 and config.precision.fp8_format == "hybrid"
    assert config.model.use_te
    if torch.cuda.is_available():
        validate_run_config(config, world_size=16)
    else:
        with pytest.raises(ConfigError, match="needs CUDA and Transformer Engine"):
            validate_run_config(config, world_size=16)


def test_bad_precision_is_refused():
    done = subprocess.run(["bash", SCRIPT], env=dict(os.environ, DRY_RUN="1", PRECISION="fp16"),
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "PRECISION must be" in done.stderr


def test_sbatch_script_parses_and_calls_the_torchrun_script():
    assert subprocess.run(["bash", "-n", SBATCH], timeout=60).returncode == 0
    with open(SBATCH) as f:
        text = f.read()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "srun" in text and "examples/launch/torchrun_multinode.sh" in text


def test_script_launches_the_tiny_job_on_cpu(tmp_path):
    out = str(tmp_path / "run")
    flags = [f for f in TINY_FLAGS if f not in ("--config", TINY_FLAGS[1])]
    command = ["bash", SCRIPT, *flags, "--train-iters", "2", "--save", out, "--load", out,
               "--log-file", f"{out}/log.jsonl", "--cache-dir", str(tmp_path / "cache")]
    env = dict(MODEL="tiny", PRECISION="fp32", NNODES="1", NPROC_PER_NODE="2",
               RDZV_PORT=str(free_port()), MAX_RESTARTS="0")
    with Job(command, str(tmp_path / "script.out"), env=env) as job:
        code = job.wait(timeout=240)
        output = job.output()
    assert code == 0, output[-5000:]
    records = read_jsonl(f"{out}/log.jsonl")
    assert [r["iteration"] for r in records] == [1, 2]
    assert "world 2 (TP 1, EP 2, DP 2)" in output


@pytest.mark.parametrize("name,vision,image_tokens,layers", [
    ("llava_stablelm_1.6b_clip336.yaml", "clip", 576, 24),
    ("llava_phi2_2.7b_siglip.yaml", "siglip", 728, 32)])
def test_llava_paper_settings_are_valid_for_two_nodes(tmp_path, name, vision, image_tokens,
                                                      layers):
    from megatron_stgc.model.vision import num_image_tokens, vision_transformer_config

    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "model.pt").write_bytes(b"")
    (tmp_path / "mix.json").write_text("[]")
    (tmp_path / "spm.model").write_bytes(b"")
    config = parse_run_config([
        "--config", os.path.join(REPO, "examples", name), "--data-path", str(tmp_path / "mix.json"),
        "--image-root", str(tmp_path), "--pretrained-checkpoint", str(tmp_path / "dense"),
        "--tokenizer-model", str(tmp_path / "spm.model")])
    validate_run_config(config, world_size=16)
    assert config.vision.vision_model_type == vision
    assert num_image_tokens(config) == image_tokens
    assert image_tokens < config.model.seq_length
    assert config.model.num_layers == layers
    assert (config.model.num_experts, config.model.moe_router_topk) == (4, 2)
    assert config.vision.moe_use_upcycling
    assert config.vision.trainable_modules == "moe-llava-stage3"
    assert (config.training.adam_beta2, config.training.weight_decay) == (0.999, 0.0)
    assert config.model.moe_router_gumbel_second_expert
    assert (config.model.moe_expert_capacity_factor, config.model.moe_eval_capacity_factor) \
        == (1.5, 2.0)
    assert vision_transformer_config(config).num_layers == config.vision.vision_num_layers
    top1 = parse_run_config(["--config", os.path.join(REPO, "examples", name),
                             "--moe-router-topk", "1", "--no-moe-router-gumbel-second-expert",
                             "--data-path", str(tmp_path / "mix.json"),
                             "--pretrained-checkpoint", str(tmp_path / "dense"),
                             "--tokenizer-model", str(tmp_path / "spm.model"),
                             "--image-root", str(tmp_path)])
    validate_run_config(top1, world_size=16)  # MoE-LLaVA's 4-Top-1


MOE_LLAVA = os.path.join(REPO, "examples", "moe_llava")
STAGE_SETTINGS = {  # MoE-LLaVA's scripts/v1/<family>/{pretrain,finetune,finetune_moe}.sh
    1: dict(lr=1e-3, global_batch_size=256, chat_template="moe-llava-plain", experts=None),
    2: dict(lr=2e-5, global_batch_size=128, experts=None),
    3: dict(lr=2e-5, global_batch_size=128, experts=4),
}


@pytest.mark.parametrize("family,template", [("stablelm", "moe-llava-stablelm"),
                                             ("phi2", "moe-llava-phi"),
                                             ("qwen", "moe-llava-qwen")])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_moe_llava_stage_configs_are_valid_for_two_nodes(tmp_path, family, template, stage):
    """examples/moe_llava/<family>_stage<N>.yaml: valid for 16 ranks with data, checkpoint and
    tokenizer paths that exist, MoE-LLaVA's recipe in it; stage III also with --stgc --ltdr."""
    from megatron_stgc.model.vision import num_image_tokens

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"")
    (tmp_path / "tok").mkdir()
    (tmp_path / "mix.json").write_text("[]")
    paths = ["--data-path", str(tmp_path / "mix.json"), "--image-root", str(tmp_path),
             "--pretrained-checkpoint", str(tmp_path / "ckpt"),
             "--tokenizer-model", str(tmp_path / "tok")]
    name = os.path.join(MOE_LLAVA, f"{family}_stage{stage}.yaml")
    extra = [[], ["--stgc", "--ltdr"]] if stage == 3 else [[]]
    for flags in extra:
        config = parse_run_config(["--config", name, *paths, *flags])
        validate_run_config(config, world_size=16)
    want = STAGE_SETTINGS[stage]
    t, d, m, v = config.training, config.data, config.model, config.vision
    assert (t.lr, t.global_batch_size, t.min_lr, t.lr_decay_style) == (want["lr"],
                                                                      want["global_batch_size"],
                                                                      0.0, "cosine")
    assert (t.lr_warmup_fraction, t.weight_decay, t.adam_beta1, t.adam_beta2) == (0.03, 0.0,
                                                                                  0.9, 0.999)
    assert config.precision.bf16 and m.seq_length == 2048
    assert d.chat_template == want.get("chat_template", template)
    assert d.image_aspect_ratio == ("resize" if stage == 1 else "pad")
    assert num_image_tokens(config) == 576 and v.vision_num_layers == 23
    assert m.num_experts == want["experts"]
    with open(name) as f:
        raw = f.read()
    assert "/shared/hf/" in raw and ".model" not in raw  # HF tokenizer directories
    if stage == 1:
        assert v.trainable_modules == "projector"
    if stage == 2:
        assert v.freeze_vit and v.trainable_modules is None
    if stage == 3:
        assert v.trainable_modules == "moe-llava-stage3" and v.moe_use_upcycling
        assert (m.moe_router_topk, m.moe_layer_freq, m.moe_aux_loss_coeff) == (2, 2, 0.01)
        assert (m.moe_expert_capacity_factor, m.moe_eval_capacity_factor) == (1.5, 2.0)
        assert m.moe_router_gumbel_second_expert
        assert config.stgc.enabled and config.ltdr.enabled  # the flags of the last variant
