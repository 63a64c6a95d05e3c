"""HF -> megatron conversion: tiny random transformers models give the same outputs in megatron.

CLIP vision: megatron CLIPViTModel output == HF hidden_states[num_layers].
StableLM: megatron GPTModel logits == HF logits (partial rotary, QKV bias, GQA, tied or not).
Plus the tool's round trip through model.pt/args.yaml and clear errors for unsupported models.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers
import yaml

from megatron_stgc.config import config_from_flat, load_yaml
from megatron_stgc.convert import ConversionError, fuse_qkv, load_converted, to_te_layout
from megatron_stgc.convert.hf_clip import clip_vision_flags, convert_clip_vision
from megatron_stgc.convert.hf_stablelm import convert_stablelm, stablelm_flags
from stgc_utils import init_single_process  # installs the CPU bridge

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "tools", "convert_hf_to_megatron.py")
HF_VOCAB, PADDED_VOCAB = 100, 128


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised biases and unit norms count too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_clip(num_layers: int = 3):
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=num_layers, num_attention_heads=4,
                                           image_size=16, patch_size=4)
    torch.manual_seed(0)
    return _perturbed(transformers.CLIPVisionModel(config))


def tiny_stablelm(kv_heads: int = 4, tied: bool = False, **overrides):
    config = transformers.StableLmConfig(
        vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=128, partial_rotary_factor=0.25,
        use_qkv_bias=True, tie_word_embeddings=tied, **overrides)
    torch.manual_seed(0)
    return _perturbed(transformers.StableLmForCausalLM(config), seed=1)


def megatron_vit(flags: dict, state: dict):
    from megatron_stgc.model.vision import build_vision_model

    vit = build_vision_model(config_from_flat(flags)).eval()
    load_converted(vit, state)
    return vit


def megatron_gpt(flags: dict, state: dict):
    from megatron_stgc.model.gpt import build_gpt_model

    gpt = build_gpt_model(config_from_flat({**flags, "seq_length": 16}), PADDED_VOCAB).eval()
    load_converted(gpt, state)
    return gpt


def vit_max_diff(vit, hf, num_layers: int) -> float:
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = vit(images)  # [2, 1 + 16, 32]
        theirs = hf(pixel_values=images, output_hidden_states=True).hidden_states[num_layers]
    assert ours.shape == theirs.shape == (2, 17, 32)
    return (ours - theirs).abs().max().item()


def lm_max_diff(gpt, hf) -> float:
    tokens = torch.randint(0, HF_VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        ours = gpt(tokens, positions, None)  # [2, 12, 128]
        theirs = hf(input_ids=tokens).logits  # [2, 12, 100]
    assert ours.shape == (2, 12, PADDED_VOCAB) and theirs.shape == (2, 12, HF_VOCAB)
    assert ours[..., HF_VOCAB:].abs().max().item() == 0.0  # zero rows for the padding
    return (ours[..., :HF_VOCAB] - theirs).abs().max().item()


@pytest.mark.parametrize("num_layers", [None, 3])
def test_vit_matches_hf_clip_hidden_states(num_layers):
    hf = tiny_clip()
    flags = clip_vision_flags(hf.config, num_layers)
    assert flags["vision_num_layers"] == (num_layers or 2)  # default: penultimate layer (LLaVA)
    vit = megatron_vit(flags, convert_clip_vision(hf.state_dict(), hf.config, num_layers))
    diff = vit_max_diff(vit, hf, flags["vision_num_layers"])
    print(f"ViT max abs diff ({flags['vision_num_layers']} layers): {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
def test_lm_logits_match_hf_stablelm(kv_heads, tied):
    hf = tiny_stablelm(kv_heads, tied)
    flags = stablelm_flags(hf.config)
    assert flags["num_query_groups"] == (None if kv_heads == 4 else kv_heads)
    assert flags["rotary_percent"] == 0.25 and flags["swiglu"] and flags["add_qkv_bias"]
    gpt = megatron_gpt(flags, convert_stablelm(hf.state_dict(), hf.config, PADDED_VOCAB))
    diff = lm_max_diff(gpt, hf)
    print(f"LM max abs logit diff (kv heads {kv_heads}, tied {tied}): {diff:.2e}")
    assert diff < 1e-4


def _run_tool(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(list(argv))


def test_tool_round_trip(tmp_path):
    clip, lm = tiny_clip(), tiny_stablelm()
    clip.save_pretrained(tmp_path / "clip")
    lm.save_pretrained(tmp_path / "lm")
    out = tmp_path / "out"
    assert _run_tool("--vision-model", str(tmp_path / "clip"), "--language-model",
                     str(tmp_path / "lm"), "--output", str(out)) == 0

    state = torch.load(out / "model.pt", weights_only=True)["model"]
    parts = {"vision_model": {}, "language_model": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    flags = load_yaml(str(out / "args.yaml"))
    assert flags["vision_num_layers"] == 2 and flags["num_experts"] is None
    vit = megatron_vit(flags, parts["vision_model"])
    assert vit_max_diff(vit, clip, 2) < 1e-4
    gpt = megatron_gpt(flags, parts["language_model"])  # vocab 100 padded to 128 by default
    assert lm_max_diff(gpt, lm) < 1e-4


@pytest.mark.parametrize("overrides,message", [
    (dict(qk_layernorm=True), "qk_layernorm"),
    (dict(use_parallel_residual=True), "use_parallel_residual"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_stablelm_is_a_clear_error(overrides, message):
    config = tiny_stablelm(**overrides).config
    with pytest.raises(ConversionError, match=f"unsupported configuration: .*{message}"):
        stablelm_flags(config)


def test_unsupported_models_fail_in_the_tool(tmp_path, capsys):
    config = transformers.StableLmConfig(vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         qk_layernorm=True)
    config.save_pretrained(tmp_path / "lm")  # the config alone: rejected before loading weights
    assert _run_tool("--language-model", str(tmp_path / "lm"), "--output",
                     str(tmp_path / "out")) == 2
    assert "qk_layernorm" in capsys.readouterr().err
    clip = transformers.CLIPVisionConfig(hidden_act="gelu")
    with pytest.raises(ConversionError, match="hidden_act 'gelu'"):
        clip_vision_flags(clip)
    with pytest.raises(ConversionError, match="model_type 'siglip_vision_model'"):
        clip_vision_flags(transformers.SiglipVisionConfig())


def test_fused_qkv_layout_is_per_group():
    d, heads, groups = 2, 4, 2  # rows are labelled by head: q 0..3, k 10..11, v 20..21
    q = torch.arange(heads).repeat_interleave(d).float()
    k = (10 + torch.arange(groups)).repeat_interleave(d).float()
    v = (20 + torch.arange(groups)).repeat_interleave(d).float()
    fused = fuse_qkv(q, k, v, heads, groups)[::d].tolist()
    assert fused == [0, 1, 10, 20, 2, 3, 11, 21]


def test_te_layout_moves_norms_into_linears():
    state = {"decoder.layers.3.input_layernorm.bias": 1,
             "decoder.layers.3.pre_mlp_layernorm.weight": 2, "ln_pre.weight": 3}
    assert to_te_layout(state) == {
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_bias": 1,
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight": 2, "ln_pre.weight": 3}


def test_num_image_tokens_and_siglip_tower():
    from megatron_stgc.model.vision import build_vision_model, num_image_tokens

    base = dict(vision_hidden_size=32, vision_num_attention_heads=4, img_h=16, img_w=8,
                patch_dim=4)
    clip = config_from_flat({**base, "vision_model_type": "clip"})
    assert num_image_tokens(clip) == 8
    clip.vision.disable_vision_class_token = False
    assert num_image_tokens(clip) == 9
    siglip = config_from_flat({**base, "vision_model_type": "siglip"})
    assert num_image_tokens(siglip) == 8
    with torch.no_grad():
        assert build_vision_model(siglip)(torch.randn(1, 3, 16, 8)).shape == (1, 8, 32)


def test_args_yaml_is_flat_flags(tmp_path):
    from megatron_stgc.convert import write_pretrained

    flags = {**stablelm_flags(tiny_stablelm().config), "vision_model_type": "clip"}
    write_pretrained(str(tmp_path), {"language_model.x": torch.ones(1)}, flags)
    with open(tmp_path / "args.yaml") as f:
        assert yaml.safe_load(f) == flags
    assert load_yaml(str(tmp_path / "args.yaml")) == flags
