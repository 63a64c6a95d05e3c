"""MoE-LLaVA recipe flags: each bad combination is refused before any process group, with a
message naming the flag (recipe_checks.py), and the flags parse from YAML and the command
line."""

from __future__ import annotations

import pytest

from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config

VISION = ["--vision-model-type", "clip", "--vision-hidden-size", "64", "--img-h", "32",
          "--img-w", "32", "--patch-dim", "8", "--data-path", __file__, "--image-root", "."]

BAD = [
    (["--num-experts", "none", "--moe-eval-capacity-factor", "2"],
     "--moe-eval-capacity-factor needs --num-experts"),
    (["--moe-eval-capacity-factor", "0"], "--moe-eval-capacity-factor must be > 0"),
    (["--moe-eval-capacity-factor", "2", "--moe-token-dispatcher-type", "allgather"],
     "--moe-eval-capacity-factor needs --moe-token-dispatcher-type alltoall"),
    (["--moe-token-drop-policy", "random"], "--moe-token-drop-policy must be"),
    (["--moe-pad-expert-input-to-capacity"],
     "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
    (["--moe-pad-expert-input-to-capacity", "--moe-expert-capacity-factor", "1.5",
      "--moe-eval-capacity-factor", "2"], "cannot switch to a different"),
    (["--moe-pad-expert-input-to-capacity", "--moe-expert-capacity-factor", "1.5", "--stgc"],
     "--moe-pad-expert-input-to-capacity with --stgc or --ltdr"),
    (["--moe-router-gumbel-second-expert", "--num-experts", "none"],
     "--moe-router-gumbel-second-expert needs --num-experts"),
    (["--moe-router-gumbel-second-expert", "--moe-router-topk", "1"],
     "needs --moe-router-topk >= 2"),
    (["--moe-router-gumbel-second-expert", "--stgc", "--stgc-mode", "two-pass"],
     "--stgc-mode two-pass"),
    (["--chat-template", "vicuna"], "--chat-template must be one of"),
    (["--chat-template", "moe-llava-phi"], "applies to LLaVA-format data"),
    (VISION + ["--chat-template", "moe-llava-phi"], "needs the language model's own tokenizer"),
    (["--image-aspect-ratio", "crop"], "--image-aspect-ratio must be 'resize' or 'pad'"),
    (["--image-aspect-ratio", "pad"], "--image-aspect-ratio pad needs --vision-model-type"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[case[1] for case in BAD])
def test_bad_recipe_flags_are_refused(argv, message):
    config = parse_run_config(argv)
    with pytest.raises(ConfigError) as error:
        validate_run_config(config, world_size=1)
    assert message in str(error.value)


def test_recipe_flags_parse_and_validate(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  moe_expert_capacity_factor: 1.5\n  moe_eval_capacity_factor: 2.0\n"
                    "  moe_router_gumbel_second_expert: true\n"
                    "vision:\n  trainable_modules: moe-llava-stage3\n"
                    "data:\n  image_aspect_ratio: pad\n  chat_template: moe-llava-plain\n")
    config = parse_run_config(["--config", str(path), *VISION, "--moe-token-drop-policy",
                               "position"])
    validate_run_config(config, world_size=1)
    m = config.model
    assert (m.moe_expert_capacity_factor, m.moe_eval_capacity_factor) == (1.5, 2.0)
    assert m.moe_router_gumbel_second_expert and m.moe_token_drop_policy == "position"
    assert config.vision.trainable_modules == "moe-llava-stage3"
    assert (config.data.image_aspect_ratio, config.data.chat_template) == ("pad",
                                                                          "moe-llava-plain")
