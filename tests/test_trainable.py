"""--trainable-modules (groups, patterns, the moe-llava-stage3 preset) and how it combines with
--freeze-*: checked on a real MoELLaVAModel (megatron-core modules, one process) against sets
of parameters collected module by module, the slow obvious way."""

from __future__ import annotations

import pytest
import torch

from megatron_stgc.config import ConfigError, config_from_flat
from megatron_stgc.validation import validate_run_config
from megatron_stgc.model.param_groups import describe_trainable, group_counts, parameter_group
from megatron_stgc.model.trainable import TrainableSelectionError
from megatron_stgc.training.setup import build_model
from stgc_utils import init_single_process

VOCAB, IMAGE_ID = 128, 100
FLAGS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
             moe_ffn_hidden_size=64, num_experts=4, moe_router_topk=2, moe_layer_freq=2,
             moe_aux_loss_coeff=0.0, seq_length=24, vision_model_type="clip",
             vision_num_layers=2, vision_hidden_size=16, vision_num_attention_heads=2,
             img_h=8, img_w=8, patch_dim=4, data_path=__file__, image_root=".")


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def make(**overrides):
    torch.manual_seed(0)
    return build_model(config_from_flat({**FLAGS, **overrides}), VOCAB, IMAGE_ID)


def trainable_ids(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def ids(*modules) -> set[int]:
    return {id(p) for module in modules for p in module.parameters()}


def stage3_reference(model, projector: bool = True) -> set[int]:
    """Every FFN of the language model (dense layer 1's MLP, layer 0's experts and router),
    the projector: collected from the modules themselves."""
    layers = model.language_model.decoder.layers
    moe, dense = layers[0].mlp, layers[1].mlp
    wanted = ids(dense, moe.router, moe.experts)
    return wanted | (ids(model.vision_projection) if projector else set())


def test_groups_of_our_parameter_names():
    model, _ = make()
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert groups["language_model.decoder.layers.0.mlp.router.weight"] == "routers"
    assert groups["language_model.decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"] \
        == "experts"
    assert groups["language_model.decoder.layers.1.mlp.linear_fc1.weight"] == "dense-ffn"
    assert groups["language_model.decoder.layers.1.pre_mlp_layernorm.weight"] == "norms"
    assert groups["language_model.decoder.layers.1.self_attention.linear_qkv.weight"] == "attention"
    assert groups["language_model.embedding.word_embeddings.weight"] == "embeddings"
    assert groups["language_model.decoder.final_layernorm.weight"] == "norms"
    assert groups["vision_model.decoder.layers.0.mlp.linear_fc1.weight"] == "vision"
    assert groups["vision_projection.encoder.linear_fc1.weight"] == "projector"
    assert "other" not in groups.values()
    # Transformer Engine layout: the norms fused into the next linear are norms
    assert parameter_group("language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight") \
        == "norms"
    assert parameter_group("language_model.decoder.layers.0.self_attention.linear_qkv."
                           "layer_norm_bias") == "norms"
    assert parameter_group("language_model.output_layer.weight") == "embeddings"


def test_moe_llava_stage3_preset_trains_every_lm_ffn_routers_and_projector():
    model, notes = make(trainable_modules="moe-llava-stage3")
    assert trainable_ids(model) == stage3_reference(model)
    vit_mlp = model.vision_model.decoder.layers[0].mlp
    assert not any(p.requires_grad for p in vit_mlp.parameters())  # the ViT's MLPs do not match
    attention = model.language_model.decoder.layers[1].self_attention
    assert not any(p.requires_grad for p in attention.parameters())
    line = [n for n in notes if n.startswith("trainable parameters")][0]
    counts = group_counts(model)
    assert counts["vision"][0] == 0 and counts["attention"][0] == 0 and counts["norms"][0] == 0
    assert counts["dense-ffn"][0] == counts["dense-ffn"][1] > 0
    assert counts["routers"] == (4 * 32, 4 * 32)
    assert f"routers {4 * 32}/{4 * 32}" in line and line == describe_trainable(model)


def test_freeze_flags_subtract_from_the_selection():
    model, _ = make(trainable_modules="moe-llava-stage3", freeze_projection=True)
    assert trainable_ids(model) == stage3_reference(model, projector=False)
    model, _ = make(trainable_modules="moe-llava-stage3", freeze_lm_except_moe=True)
    moe = model.language_model.decoder.layers[0].mlp
    assert trainable_ids(model) == ids(moe.router, moe.experts, model.vision_projection)


def test_freeze_flags_alone_keep_their_meaning():
    model, _ = make(freeze_vit=True, freeze_lm_except_moe=True)
    moe = model.language_model.decoder.layers[0].mlp
    assert trainable_ids(model) == ids(moe, model.vision_projection)


def test_freeze_language_model_is_megatrons_freeze_LM():
    """--freeze-language-model (Megatron-LM's --freeze-LM, also accepted by that name)
    freezes the MoE layers too; --freeze-lm is the deprecated name of --freeze-lm-except-moe."""
    from megatron_stgc.config import parse_run_config

    model, _ = make(freeze_vit=True, freeze_language_model=True)
    assert trainable_ids(model) == ids(model.vision_projection)
    assert parse_run_config(["--freeze-LM"]).vision.freeze_language_model
    with pytest.warns(FutureWarning, match="--freeze-lm is deprecated: it is "
                      "--freeze-lm-except-moe"):
        config = parse_run_config(["--freeze-lm"])
    assert config.vision.freeze_lm_except_moe and not config.vision.freeze_language_model
    with pytest.warns(FutureWarning):
        assert config_from_flat({"freeze_lm": True}).vision.freeze_lm_except_moe
    with pytest.raises(ConfigError, match="--trainable-modules experts contradicts "
                       "--freeze-language-model"):
        validate_run_config(config_from_flat({**FLAGS, "trainable_modules": "experts",
                                              "freeze_language_model": True,
                                              "image_root": "."}), world_size=1)


def test_groups_and_patterns():
    model, _ = make(trainable_modules="routers, language_model.decoder.layers.*.self_attention.*")
    layers = model.language_model.decoder.layers
    assert trainable_ids(model) == ids(layers[0].mlp.router, layers[0].self_attention,
                                       layers[1].self_attention)
    # MoE-LLaVA's substring rule: "linear_fc1" also matches the ViT's and the projector's MLP
    model, _ = make(trainable_modules="linear_fc1")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if "linear_fc1" in n}
    assert any(n.startswith("vision_model.") for n in names)


def test_selections_that_select_nothing_or_contradict_are_errors():
    with pytest.raises(TrainableSelectionError, match="'no_such_module' selects no parameter"):
        make(trainable_modules="routers,no_such_module")
    with pytest.raises(TrainableSelectionError, match="contradicts --freeze-vit"):
        make(trainable_modules="vision_model.*", freeze_vit=True)
    with pytest.raises(TrainableSelectionError, match="no parameter trains"):
        make(trainable_modules="moe-llava-stage3", num_experts=None, freeze_lm_except_moe=True,
             freeze_projection=True)


@pytest.mark.parametrize("flags,message", [
    (dict(trainable_modules="projector", freeze_projection=True),
     "--trainable-modules projector contradicts --freeze-projection"),
    (dict(trainable_modules="dense-ffn", freeze_lm_except_moe=True),
     "--trainable-modules dense-ffn contradicts --freeze-lm-except-moe"),
    (dict(trainable_modules=" , "), "--trainable-modules is empty"),
    (dict(trainable_modules="vision", vision_model_type=None, image_root=None),
     "--trainable-modules vision needs --vision-model-type"),
])
def test_config_errors_name_the_flags(flags, message):
    config = config_from_flat({**FLAGS, **flags})
    with pytest.raises(ConfigError, match=message):
        validate_run_config(config, world_size=1)


def test_preset_with_its_own_freeze_flag_is_valid():
    config = config_from_flat({**FLAGS, "trainable_modules": "moe-llava-stage3",
                               "freeze_projection": True, "freeze_vit": True})
    validate_run_config(config, world_size=1)


def test_megatrons_adam_is_adamw_and_gets_only_the_trainable_parameters():
    """The optimizer the paper YAMLs get: megatron-core's "adam" is torch's AdamW on a machine
    without TE/apex (decoupled weight decay; TE/apex FusedAdam get adam_w_mode=True from the
    same decoupled_weight_decay default), with MoE-LLaVA's betas, and holds the
    --trainable-modules parameters only."""
    from megatron_stgc.training.setup import build_model_and_optimizer

    config = config_from_flat({**FLAGS, "trainable_modules": "moe-llava-stage3",
                               "adam_beta2": 0.999, "weight_decay": 0.0, "lr": 2e-5,
                               "min_lr": 0.0})
    torch.manual_seed(0)
    objects = build_model_and_optimizer(config, VOCAB, IMAGE_ID)
    megatron_optimizer = objects.optimizer
    inner = [getattr(o, "optimizer", None)
             for o in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])]
    assert inner and all(type(o) is torch.optim.AdamW for o in inner)
    for optimizer in inner:
        for group in optimizer.param_groups:
            assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.0
    held = sum(p.numel() for o in inner for g in o.param_groups for p in g["params"])
    assert held == sum(t for t, _ in group_counts(objects.unwrapped_model).values())
