"""transformers' LLaVA (CLIP or SigLIP tower + StableLM) -> --llava-checkpoint -> our MoELLaVAModel:
the same logits on the same tokens and pixels (fp32, max abs diff <= 1e-4), dense and upcycled
at step 0; the SigLIP tower alone against SiglipVisionModel's selected hidden state; the new
flags' errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from llava_fixtures import (IMAGE_SIZE, OUR_IMAGE_ID, PADDED_VOCAB, hf_logits, image_tokens,
                            our_logits, our_model, perturbed, run_tool, sample_inputs,
                            tiny_llava, vision_config)
from megatron_stgc.config import ConfigError, config_from_flat
from megatron_stgc.validation import validate_run_config
from megatron_stgc.convert import load_converted, write_pretrained
from megatron_stgc.convert.llava import convert_llava_checkpoint
from stgc_utils import init_single_process

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def converted(tmp_path, hf, name="ckpt", **kwargs):
    """save_pretrained -> convert -> write: (flags, --pretrained-checkpoint directory)."""
    hf.save_pretrained(tmp_path / f"{name}_hf")
    state, flags = convert_llava_checkpoint(str(tmp_path / f"{name}_hf"), log=lambda _: None,
                                            **kwargs)
    write_pretrained(str(tmp_path / name), state, flags)
    return flags, str(tmp_path / name)


# every vision tower, and every language family the registry converts (Phi-2's parallel
# block, Qwen2's RMSNorm/SwiGLU), inside transformers' LLaVA
TOWER_AND_LM = [("clip", "stablelm"), ("siglip", "stablelm"), ("clip", "phi"),
                ("siglip", "qwen2")]


@pytest.mark.parametrize("tower,family", TOWER_AND_LM)
def test_dense_llava_logits_equal_transformers(tmp_path, tower, family):
    hf = tiny_llava(tower, family=family)
    flags, checkpoint = converted(tmp_path, hf)
    assert flags["vision_model_type"] == tower and flags["vision_num_layers"] == 2  # of 3: -2
    model, notes = our_model(flags, checkpoint)
    assert "loaded vision_model, vision_projection, language_model" in notes[0]
    ids, ours, pixels = sample_inputs(tower)
    diff = (our_logits(model, ours, pixels) - hf_logits(hf, ids, pixels)).abs().max().item()
    print(f"{tower} + {family} LLaVA max abs logit diff: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("tower,family", TOWER_AND_LM)
def test_upcycled_llava_logits_equal_transformers(tmp_path, tower, family):
    """Step 0 of stage III: every MoE layer's experts are the dense FFN, top-2 weights sum to
    one, so the MoE model computes the dense model's logits."""
    hf = tiny_llava(tower, layers=3, family=family)
    flags, checkpoint = converted(tmp_path, hf)
    model, notes = our_model(flags, checkpoint, num_experts=4, moe_router_topk=2,
                             moe_layer_freq=2, moe_use_upcycling=True)
    assert "language_model (upcycled)" in notes[0]
    assert [i for i, layer in enumerate(model.language_model.decoder.layers)
            if hasattr(layer.mlp, "router")] == [0, 2]
    ids, ours, pixels = sample_inputs(tower)
    diff = (our_logits(model, ours, pixels) - hf_logits(hf, ids, pixels)).abs().max().item()
    print(f"{tower} + {family} upcycled LLaVA max abs logit diff: {diff:.2e}")
    assert diff <= TOL


def test_full_strategy_keeps_every_token(tmp_path):
    """transformers' 'full' strategy (MoE-LLaVA's 'cls_patch'): CLIP's class token is kept."""
    hf = tiny_llava("clip")
    hf.config.vision_feature_select_strategy = "full"
    flags, checkpoint = converted(tmp_path, hf)
    assert flags["disable_vision_class_token"] is False
    model, _ = our_model(flags, checkpoint)
    ids, ours, pixels = sample_inputs("clip")
    extra = (ours == OUR_IMAGE_ID).clone()  # one more image position per row
    ids, ours = ids.clone(), ours.clone()
    for row, start in ((0, 2), (1, 5)):
        end = start + image_tokens("clip")
        ids[row, end], ours[row, end] = hf.config.image_token_id, OUR_IMAGE_ID
    assert int((ours == OUR_IMAGE_ID).sum()) == int(extra.sum()) + 2
    diff = (our_logits(model, ours, pixels) - hf_logits(hf, ids, pixels)).abs().max().item()
    assert diff <= TOL


def test_siglip_tower_is_the_selected_hidden_state():
    """SigLIP alone: our ViT == SiglipVisionModel's hidden_states[-2] (no post_layernorm), and
    the LLaVA model's image features drop its first patch (MoE-LLaVA's 'patch' selection)."""
    from megatron_stgc.convert.hf_siglip import convert_siglip_vision, siglip_vision_flags
    from megatron_stgc.model.vision import build_vision_model, num_image_tokens

    torch.manual_seed(0)
    hf = perturbed(transformers.SiglipVisionModel(vision_config("siglip")))
    flags = siglip_vision_flags(hf.config)
    assert flags["vision_num_layers"] == 2 and flags["vision_drop_first_patch"]
    vit = build_vision_model(config_from_flat(flags)).eval()
    load_converted(vit, convert_siglip_vision(hf.state_dict(), hf.config))
    assert not any("ln_post" in key for key in vit.state_dict())
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = vit(images)  # [2, 16, 32]
        outputs = hf(pixel_values=images, output_hidden_states=True)
    selected = outputs.hidden_states[-2]
    assert ours.shape == selected.shape == (2, 16, 32)
    assert (ours - selected).abs().max().item() <= TOL
    # the last layer + post_layernorm is something else: the test can tell them apart
    assert (ours - outputs.last_hidden_state).abs().max().item() > 1e-2
    assert num_image_tokens(config_from_flat(flags)) == 15


def test_so400m_shapes_give_728_image_tokens():
    """SigLIP-so400m-patch14-384 as MoE-LLaVA uses it: 26 of 27 layers, 27 x 27 patches read
    from 378 of the 384 pixels, the first patch dropped: 728 image tokens."""
    from megatron_stgc.convert.hf_siglip import siglip_vision_flags
    from megatron_stgc.model.vision import num_image_tokens

    so400m = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304,
                                             num_hidden_layers=27, num_attention_heads=16,
                                             image_size=384, patch_size=14)
    flags = siglip_vision_flags(so400m)
    assert (flags["vision_num_layers"], flags["img_h"], flags["patch_dim"]) == (26, 378, 14)
    assert num_image_tokens(config_from_flat(flags)) == 728
    assert num_image_tokens(config_from_flat({**flags, "vision_drop_first_patch": False})) == 729


def _vision_run(**overrides) -> dict:
    return {**dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=4,
                   vision_model_type="siglip", vision_hidden_size=32,
                   vision_num_attention_heads=4, img_h=16, img_w=16, patch_dim=4,
                   data_path=__file__, image_root="."), **overrides}


@pytest.mark.parametrize("overrides,message", [
    (dict(vision_model_type="clip", vision_drop_first_patch=True),
     "--vision-drop-first-patch is for --vision-model-type siglip"),
    (dict(moe_layer_pattern="1,0,1"), "--moe-layer-pattern has 3 entries; it needs one per "
                                      "layer"),
    (dict(moe_layer_pattern="0,0"), "--moe-layer-pattern marks no layer as MoE"),
    (dict(moe_layer_pattern="1,x"), "--moe-layer-pattern must be a comma-separated list"),
    (dict(moe_layer_pattern="1,0", num_experts=None), "--moe-layer-pattern needs --num-experts"),
])
def test_new_flags_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_run_config(config_from_flat(_vision_run(**overrides)), world_size=1)


def test_moe_layer_pattern_places_the_moe_layers():
    from megatron_stgc.config import moe_layer_indices
    from megatron_stgc.model.gpt import build_gpt_model

    config = config_from_flat(_vision_run(num_layers=3, moe_layer_pattern="[0, 1, 1]",
                                          vision_drop_first_patch=True))
    validate_run_config(config, world_size=1)
    assert moe_layer_indices(config) == [1, 2]
    gpt = build_gpt_model(config, PADDED_VOCAB)
    assert [hasattr(layer.mlp, "router") for layer in gpt.decoder.layers] == [False, True, True]


def test_tool_converts_a_siglip_tower(tmp_path):
    """--vision-model with a SigLIP directory (vision-only or full SiglipModel config)."""
    import yaml

    from megatron_stgc.model.vision import build_vision_model

    torch.manual_seed(0)
    hf = perturbed(transformers.SiglipVisionModel(vision_config("siglip")))
    hf.save_pretrained(tmp_path / "siglip")
    assert run_tool("--vision-model", str(tmp_path / "siglip"), "--output",
                    str(tmp_path / "out")) == 0
    flags = yaml.safe_load((tmp_path / "out" / "args.yaml").read_text())
    assert flags["vision_model_type"] == "siglip" and flags["vision_drop_first_patch"] is True
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["model"]
    vit = build_vision_model(config_from_flat(flags)).eval()
    load_converted(vit, {k[len("vision_model."):]: v for k, v in state.items()})
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        diff = vit(images) - hf(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    assert diff.abs().max().item() <= TOL
