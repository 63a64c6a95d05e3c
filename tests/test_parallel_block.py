"""--parallel-attention-mlp (Phi-2's block) through megatron-core's spec system: the layer
keeps ``submodules.mlp``, so it becomes the MoE layer and STGC / LTDR attach unchanged. STGC's
cosines inside a parallel-block model match per-token gradients computed the slow way, and a
converted tiny Phi MoE-LLaVA (upcycled, --stgc --ltdr) trains two steps at EP=2 under
torchrun. Plus the flags' errors and the LM head bias."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from megatron_stgc.config import ConfigError, config_from_flat, parse_run_config
from megatron_stgc.validation import validate_run_config
from stgc_utils import init_single_process, oracle_pair_cosines

PHI_MOE = dict(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
               moe_ffn_hidden_size=32, num_experts=4, moe_router_topk=2, moe_layer_freq=1,
               moe_aux_loss_coeff=0.0, seq_length=64, parallel_attention_mlp=True,
               openai_gelu=True, add_bias_linear=True, add_output_layer_bias=True,
               rotary_percent=0.5, untie_embeddings_and_output_weights=True)
VOCAB = 64


@pytest.fixture(scope="module")
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def build(**overrides):
    from megatron_stgc.model.gpt import build_gpt_model

    torch.manual_seed(0)
    model = build_gpt_model(config_from_flat({**PHI_MOE, **overrides}), VOCAB)
    with torch.no_grad():  # megatron initialises biases to zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def test_spec_makes_parallel_layers_whose_mlp_is_stgc_ltdr_moe(parallel_state):
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_stgc.ltdr.router import STGCLTDRRouter
    from megatron_stgc.model.parallel_block import ParallelAttentionMLPLayer
    from megatron_stgc.stgc.layer import STGCMoELayer

    model = build(num_layers=2, moe_layer_freq=2, stgc=True, ltdr=True,
                  vision_model_type="clip", data_path=__file__)
    first, second = model.decoder.layers
    assert isinstance(first, ParallelAttentionMLPLayer) and isinstance(second,
                                                                       ParallelAttentionMLPLayer)
    assert isinstance(first.pre_mlp_layernorm, IdentityOp)  # one norm per layer
    assert isinstance(first.mlp, STGCMoELayer) and isinstance(first.mlp.router, STGCLTDRRouter)
    assert type(second.mlp).__name__ == "MLP"  # dense layer between MoE layers
    assert first.mlp.experts.local_experts[0].linear_fc1.bias is not None


def test_parallel_layer_is_x_plus_attention_plus_mlp_of_one_norm(parallel_state):
    """The layer's output against its own submodules composed by hand."""
    model = build(num_experts=None).eval()
    layer = model.decoder.layers[0]
    hidden = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(1))
    rotary = model.rotary_pos_emb(8)
    with torch.no_grad():
        out, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary)
        normed = layer.input_layernorm(hidden)
        attn, attn_bias = layer.self_attention(normed, attention_mask=None, rotary_pos_emb=rotary)
        mlp, mlp_bias = layer.mlp(normed)
    torch.testing.assert_close(out, hidden + attn + attn_bias + mlp + mlp_bias)


def test_stgc_cosines_in_a_parallel_block_match_per_token_gradients(parallel_state):
    model = build(stgc=True, stgc_tau=0.0)
    moe = model.decoder.layers[0].mlp
    seen = {}

    def keep_input_and_upstream_grad(module, inputs, output):
        seen["input"] = inputs[0].detach()
        output[0].register_hook(lambda grad: seen.__setitem__("grad", grad.detach()))

    handle = moe.register_forward_hook(keep_input_and_upstream_grad)
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (4, 64), generator=generator)  # 256 tokens, ~128/expert
    positions = torch.arange(64).expand(4, -1)
    weights = torch.randn(4, 64, VOCAB, generator=generator)
    (model(tokens, positions, None) * weights).sum().backward()
    handle.remove()
    report = moe.stgc.last
    expected, routing_map = oracle_pair_cosines(moe, seen["input"], seen["grad"])
    assert torch.equal(report.routing_map, routing_map)
    judged = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(report.cos), ~judged) and judged.sum() > 0
    assert torch.allclose(report.cos.double()[judged], expected[judged], atol=1e-5, rtol=0)
    clear = judged & (expected.abs() > 1e-4)
    assert torch.equal(report.conflicts[clear], expected[clear] < 0)
    assert report.conflicts.any() and (judged & ~report.conflicts).any()


def test_output_layer_bias_is_added_and_checkpointed(parallel_state):
    model = build(num_experts=None).eval()
    bias = model.output_layer.bias
    assert bias.shape == (VOCAB,) and bias.requires_grad
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        before = model(tokens, positions, None)
        bias.add_(torch.arange(VOCAB, dtype=bias.dtype))
        after = model(tokens, positions, None)
    torch.testing.assert_close(after - before, torch.arange(VOCAB, dtype=bias.dtype).expand_as(
        before))
    sharded = model.sharded_state_dict()
    assert "output_layer.bias" in sharded and sharded["output_layer.bias"].global_shape == (VOCAB,)


BAD = [
    (["--parallel-attention-mlp", "--use-te"], "--parallel-attention-mlp runs on megatron-core's "
                                               "local spec only"),
    (["--parallel-attention-mlp", "--fp8-format", "e4m3"], "drop --fp8-format"),
    (["--openai-gelu", "--swiglu"], "--openai-gelu and --swiglu"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[case[1][:24] for case in BAD])
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        validate_run_config(parse_run_config(argv), 1)


def test_parallel_block_picks_the_local_spec_on_gpus():
    from megatron_stgc.model.gpt import GPU_WITH_TE, transformer_config_kwargs, use_transformer_engine

    config = parse_run_config(["--parallel-attention-mlp", "--add-bias-linear", "--openai-gelu",
                               "--num-experts", "none"])
    assert not use_transformer_engine(config, GPU_WITH_TE)
    kwargs = transformer_config_kwargs(config, GPU_WITH_TE)
    assert not kwargs["bias_activation_fusion"]  # megatron fuses exact GELU only
    assert kwargs["activation_func"](torch.tensor([1.0])).item() == pytest.approx(
        0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715)), abs=1e-6)


@pytest.fixture(scope="module")
def phi_llava_run(tmp_path_factory):
    """A tiny PhiForCausalLM converted by the tool, upcycled to 4 experts top-2 inside the
    digits MoE-LLaVA (random ViT and projector), --stgc --ltdr, EP=2, two steps."""
    import transformers

    from launch_utils import REPO, free_port, read_jsonl, run_job
    from lm_convert_utils import perturbed
    from megatron_stgc.config import flag, load_yaml
    from megatron_stgc.data.digits import build_digits_mix

    root = tmp_path_factory.mktemp("phi_llava")
    phi = transformers.PhiConfig(vocab_size=600, hidden_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, intermediate_size=256,
                                 partial_rotary_factor=0.4)
    torch.manual_seed(0)
    perturbed(transformers.PhiForCausalLM(phi)).save_pretrained(str(root / "phi"))
    run_job([sys.executable, os.path.join(REPO, "tools", "convert_hf_to_megatron.py"),
             "--language-model", str(root / "phi"), "--output", str(root / "ckpt")],
            str(root / "convert.out"), timeout=300)
    model_argv = []
    for key, value in load_yaml(str(root / "ckpt" / "args.yaml")).items():
        model_argv += [flag(key), "none" if value is None else str(value)]
    mix = build_digits_mix(str(root / "data"))
    run = str(root / "run")
    argv = ["--config", os.path.join(REPO, "examples", "tiny_llava_digits.yaml"), *model_argv,
            "--num-experts", "4", "--data-path", mix["train"], "--image-root", mix["image_root"],
            "--cache-dir", str(root / "cache"), "--save", run, "--load", run,
            "--log-file", f"{run}/log.jsonl", "--train-iters", "2", "--log-interval", "1",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--lr-warmup-fraction", "0",
            "--pretrained-checkpoint", str(root / "ckpt"), "--moe-use-upcycling",
            "--stgc", "--ltdr"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "megatron_stgc", "train", *argv]
    output = run_job(command, str(root / "train.out"), timeout=600)
    return {"output": output, "records": read_jsonl(os.path.join(run, "log.jsonl"))}


def test_converted_phi_moe_llava_trains_with_stgc_and_ltdr_at_ep2(phi_llava_run):
    output, records = phi_llava_run["output"], phi_llava_run["records"]
    assert "loaded language_model (upcycled)" in output
    assert "STGC on decoder layers [0, 2]" in output
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert "stgc/conflict_fraction" in record
        assert any(key.startswith("ltdr/") for key in record)
