"""``megatron-stgc export --format hf``: a Qwen2-style MoE LLaVA trained with EP=2 becomes
transformers' LlavaForConditionalGeneration with a Qwen2-MoE language model.

The model: the digits toy (examples/tiny_llava_digits.yaml: CLIP-style tower, RMSNorm,
SwiGLU, q/k/v bias, MoE on layers 0 and 2 of 4, 4 experts top-2) with GQA (2 K/V groups),
trained 30 steps on 2 processes with expert parallelism 2 (each rank holds 2 experts). Checks:

* logits: the transformers model loaded from the export vs our model built in this process
  from the same checkpoint (through ``--format pretrained``, not the exporter), fp32, on an
  input the export's own check never saw: <= 1e-4;
* the written config places the experts where megatron did (mlp_only_layers), without a
  shared expert, with norm_topk_prob for megatron's top-k-then-softmax router;
* transformers' ``generate`` gives ``megatron-stgc eval``'s greedy answers (EP=2, 2 ranks);
* refusals name the format that fits; a deliberately wrong export (two experts swapped) fails
  its check and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from launch_utils import REPO, free_port, run_job
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.data.digits import build_digits_mix

EXAMPLE = os.path.join(REPO, "examples", "tiny_llava_digits.yaml")
STEPS = 30
TOL = 1e-4


def torchrun(command: str, flags: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "megatron_stgc", command, *flags]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_hf")
    mix = build_digits_mix(str(root / "data"))
    run = str(root / "run")
    flags = ["--config", EXAMPLE, "--data-path", mix["train"], "--image-root", mix["image_root"],
             "--cache-dir", str(root / "cache"), "--save", run, "--load", run,
             "--log-file", f"{run}/log.jsonl", "--train-iters", str(STEPS),
             "--save-interval", str(STEPS), "--lr-warmup-fraction", "0",
             "--num-query-groups", "2", "--stgc"]
    run_job(torchrun("train", flags), str(root / "train.out"), timeout=600)
    hf_dir = root / "hf"
    output = run_job(torchrun("export", ["--format", "hf", "--output", str(hf_dir)] + flags, 1),
                     str(root / "export_hf.out"), timeout=600)
    pretrained = root / "pretrained"
    run_job(torchrun("export", ["--output", str(pretrained)] + flags, 1),
            str(root / "export_pt.out"), timeout=600)
    return {"root": root, "mix": mix, "flags": flags, "hf": str(hf_dir),
            "pretrained": str(pretrained), "export_output": output}


def our_model_from(trained):
    """Our model in this process from the --format pretrained export (not the exporter)."""
    from megatron_stgc.training.setup import build_model
    from stgc_utils import init_single_process

    init_single_process()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    config = parse_run_config(trained["flags"] + ["--pretrained-checkpoint",
                                                  trained["pretrained"]])
    config.parallel.expert_model_parallel_size = 1
    config.stgc.enabled = False
    state = torch.load(os.path.join(trained["pretrained"], "model.pt"))["model"]
    rows = state["language_model.embedding.word_embeddings.weight"].shape[0]
    with open(os.path.join(trained["hf"], "config.json")) as f:
        image_id = json.load(f)["image_token_index"]
    model, _ = build_model(config, rows, image_id)
    return model.eval(), config, image_id, rows


def test_export_logs_its_check_and_warns_of_nothing(trained):
    out = trained["export_output"]
    assert "export check: transformers LlavaForConditionalGeneration: max abs logit difference" \
        in out
    assert "AutoProcessor's ids for a question with an image equal ours" in out
    assert "warning" not in out.split("-> --format hf")[0].lower().split("export:")[-1]
    info = json.loads(open(os.path.join(trained["hf"], "export_info.json")).read())
    assert info["checks"]["max_abs_logit_difference"] <= TOL
    assert info["warnings"] == []


def test_config_places_experts_like_megatron(trained):
    import transformers

    config = transformers.AutoConfig.from_pretrained(trained["hf"])
    text = config.text_config
    assert config.model_type == "llava" and text.model_type == "qwen2_moe"
    assert text.mlp_only_layers == [1, 3] and text.decoder_sparse_step == 1
    assert (text.num_experts, text.num_experts_per_tok) == (4, 2)
    assert text.shared_expert_intermediate_size == 0
    assert text.norm_topk_prob is True  # top-k then softmax over the k == renormalised
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == \
        "default"


@torch.no_grad()
def test_transformers_logits_equal_ours(trained):
    import transformers

    model, config, image_id, rows = our_model_from(trained)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(trained["hf"],
                                                                  dtype=torch.float32).eval()
    layers = hf.model.language_model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == [
        "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP"]
    generator = torch.Generator().manual_seed(7)
    image = 16  # 4 x 4 patches of 8 px (CLIP's class token dropped)
    tokens = torch.randint(0, image_id, (3, 40), generator=generator)
    for row, offset in enumerate((0, 3, 20)):
        tokens[row, offset:offset + image] = image_id
    pixels = 2 * torch.randn(3, 3, 32, 32, generator=generator)
    positions = torch.arange(40).expand(3, -1)
    ours = model(tokens, positions, None, images=pixels)
    theirs = hf(input_ids=tokens, pixel_values=pixels).logits
    assert ours.shape == theirs.shape == (3, 40, rows)
    diff = (ours - theirs).abs().max().item()
    print(f"HF export, Qwen2-MoE LLaVA after {STEPS} EP=2 steps: max abs logit diff {diff:.2e}")
    assert diff <= TOL
    # the experts matter: the same model with two experts swapped is not within tolerance
    experts = layers[0].mlp.experts
    experts.gate_up_proj.data[[0, 1]] = experts.gate_up_proj.data[[1, 0]]
    swapped = hf(input_ids=tokens, pixel_values=pixels).logits
    assert (ours - swapped).abs().max().item() > 100 * TOL


def test_generate_equals_our_greedy_answers(trained):
    from megatron_stgc.export.hf_generate import hf_answers

    root, mix = trained["root"], trained["mix"]
    with open(mix["val_questions"]) as f:
        everything = [json.loads(line) for line in f]
    questions = [q for category in ("digit", "even", "greater_than_four", "plus_one", "text")
                 for q in [q for q in everything if q["category"] == category][:3]]
    question_file = root / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = root / "answers.jsonl"
    run_job(torchrun("eval", trained["flags"] + [
        "--question-file", str(question_file), "--answers-file", str(answers),
        "--max-new-tokens", "6", "--eval-batch-size", "4"]), str(root / "eval.out"), timeout=300)
    ours = [json.loads(line)["text"] for line in answers.read_text().splitlines()]
    theirs = hf_answers(trained["hf"], questions, mix["image_root"], 6, pixels="ours",
                        image_loader="auto", say=lambda _: None)
    print(list(zip(ours, theirs)))
    assert theirs == ours
    assert len(set(ours)) > 1  # the answers differ between questions: a real comparison


def _export_in_subprocess(flags: list[str], output: str, *extra: str, patch: str = ""):
    """``megatron-stgc export`` in a fresh process (``patch``: Python run before it)."""
    code = ("import sys\n" + patch + "\nfrom megatron_stgc.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", code, "export", "--output", output, *extra,
                           *flags], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)


SWAP_EXPERTS = """
import megatron_stgc.export.hf_llava as hf_llava
_export = hf_llava.export_qwen2_moe
def _swapped(*args, **kwargs):
    state = _export(*args, **kwargs)
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        a, b = (f"model.layers.0.mlp.experts.{e}.{leaf}.weight" for e in (0, 1))
        state[a], state[b] = state[b], state[a]
    return state
hf_llava.export_qwen2_moe = _swapped
"""


def test_a_wrong_export_is_detected_and_removed(trained):
    output = trained["root"] / "wrong"
    result = _export_in_subprocess(trained["flags"], str(output), "--format", "hf",
                                   patch=SWAP_EXPERTS)
    assert result.returncode != 0
    assert "the reloaded model's logits differ from ours" in result.stderr + result.stdout
    assert not output.exists()
    leftovers = [name for name in os.listdir(trained["root"]) if name.startswith(".wrong.")]
    assert leftovers == []


@pytest.mark.parametrize("flags,message", [
    # StableLM-style block (LayerNorm) with MoE: no transformers class
    (["--normalization", "LayerNorm"], "Use --format moe-llava"),
    # Phi-2's parallel block with MoE
    (["--parallel-attention-mlp", "--openai-gelu", "--no-swiglu", "--add-bias-linear",
      "--normalization", "LayerNorm"], "Use --format moe-llava"),
])
def test_hf_refuses_moe_models_transformers_cannot_hold(trained, tmp_path, flags, message):
    from megatron_stgc.export.run import ExportOptions, run

    config = parse_run_config(trained["flags"] + flags)
    with pytest.raises(ConfigError, match=message):
        run(config, ExportOptions(output=str(tmp_path / "out"), format="hf"))
    assert not (tmp_path / "out").exists()


def test_moe_llava_format_refuses_a_qwen2_model(trained, tmp_path):
    from megatron_stgc.export.run import ExportOptions, run

    config = parse_run_config(trained["flags"])
    with pytest.raises(ConfigError, match="use --format hf"):
        run(config, ExportOptions(output=str(tmp_path / "out"), format="moe-llava",
                                  moe_llava_image_tower="openai/clip-vit-large-patch14-336"))


def test_routing_a_target_cannot_express_is_named(trained):
    from megatron_stgc.export.target import exported_routing

    config = parse_run_config(trained["flags"] + ["--ltdr", "--moe-expert-capacity-factor",
                                                  "1.5"])
    warnings = exported_routing(config)
    assert any("--ltdr" in w and "top-k" in w for w in warnings)
    assert any("--moe-expert-capacity-factor 1.5" in w and "dropless" in w for w in warnings)
    assert not config.ltdr.enabled and config.model.moe_expert_capacity_factor is None


def test_a_text_model_exports_as_a_qwen2_moe_causal_lm(tmp_path):
    """A text-only MoE GPT (RMSNorm, SwiGLU, untied head, moe-ffn != ffn), 3 steps at EP=2:
    --format hf writes Qwen2MoeForCausalLM alone; its logits equal ours (the export's check
    and, independently, the reloaded model against the --format pretrained export)."""
    import transformers

    from launch_utils import TINY_FLAGS
    from megatron_stgc.training.setup import build_model
    from stgc_utils import init_single_process

    run = str(tmp_path / "run")
    flags = TINY_FLAGS + ["--normalization", "RMSNorm", "--swiglu",
                          "--untie-embeddings-and-output-weights", "--save", run, "--load", run,
                          "--log-file", f"{run}/log.jsonl", "--train-iters", "3",
                          "--save-interval", "3", "--cache-dir", str(tmp_path / "cache")]
    run_job(torchrun("train", flags), str(tmp_path / "train.out"), timeout=600)
    out = run_job(torchrun("export", ["--format", "hf", "--output", str(tmp_path / "hf")] + flags,
                           1), str(tmp_path / "export.out"), timeout=600)
    assert "export check: transformers Qwen2MoeForCausalLM: max abs logit difference" in out
    run_job(torchrun("export", ["--output", str(tmp_path / "pt")] + flags, 1),
            str(tmp_path / "export_pt.out"), timeout=600)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and not hf.config.tie_word_embeddings
    assert hf.config.mlp_only_layers == [1] and hf.config.moe_intermediate_size == 32

    init_single_process()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    config = parse_run_config(flags + ["--pretrained-checkpoint", str(tmp_path / "pt")])
    config.parallel.expert_model_parallel_size = 1
    state = torch.load(tmp_path / "pt" / "model.pt")["model"]
    rows = state["language_model.embedding.word_embeddings.weight"].shape[0]
    model, _ = build_model(config, rows)
    tokens = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.eval()(tokens, torch.arange(20).expand(2, -1), None)
        theirs = hf(input_ids=tokens).logits
    assert (ours - theirs).abs().max().item() <= TOL
