"""``--format moe-llava``: MoE-LLaVA's own checkpoint layout, for StableLM-2 / Phi-2 models (with
or without MoE) that no transformers class represents.

Files (MoE-LLaVA mirror, PKU-YuanGroup/MoE-LLaVA)::

    config.json        the LM's config keys as MoE-LLaVA's config class reads them
                       (StableLM: StableLMEpochConfig, stablelm/configuration_stablelm_epoch.py
                       :72-107, rope_pct / norm_eps / use_qkv_bias ...; Phi: its vendored
                       PhiConfig, phi/configuration_phi.py:117-141, partial_rotary_factor ...),
                       model_type moe_llava_stablelm / moe_llava_phi (llava_stablelm_moe.py:48,
                       llava_phi_moe.py:49; dense: llava_stablelm / llava_phi), the LLaVA keys
                       llava_arch.py:67-119 stores (mm_image_tower, image_projector_type
                       mlp2x_gelu, mm_hidden_size, mm_vision_select_layer -2,
                       mm_vision_select_feature), and the ``moe`` section
                       initialize_moe_modules writes (llava_stablelm_moe.py:431-479)
    model.safetensors  model.embed_tokens / model.layers.i.* / lm_head (the family's names,
                       lm_export.py); MoE layers in DeepSpeed-MoE's names through the importer's
                       two-way table (convert/moe_llava_names.to_moe_llava):
                       model.layers.i.mlp.deepspeed_moe.gate.wg.weight and
                       ...deepspeed_moe.experts.deepspeed_experts.e.<FFN names>;
                       model.mm_projector.image_spatial_proj.{0,2}.* (projector/builder.py:51-58);
                       model.image_tower.image_tower.vision_model.* (clip_encoder.py:24-27)
    image_tower/       the tower as a CLIPVisionModel / SiglipVisionModel directory (config,
                       weights, image processor settings)
    tokenizer files    the run's tokenizer (a tiktoken source file is copied beside them)

Tower: MoE-LLaVA selects ``hidden_states[mm_vision_select_layer]`` (-2 in its recipes); ours
keeps the layers up to that state, so the written tower has our N layers plus one identity
layer (hf_vision.py) and the config keeps -2. MoE-LLaVA's loader takes the tower from the
hub by ``mm_image_tower`` (builder.py:493-496; the name must start with openai / laion for
CLIP, google for SigLIP: multimodal_encoder/builder.py:14-17), so ``--moe-llava-image-tower``
must name the tower the model was trained with (frozen, as MoE-LLaVA's stages II-III keep
it); ``image_tower/`` holds our copy for anyone who trained it.

MoE section: ``capacity_factor`` and ``eval_capacity_factor`` = E / k, the smallest factor
with which DeepSpeed's capacity (tokens / E * factor * k; sharded_moe.py) holds every
token: the exported model is dropless like the model it came from. DeepSpeed 0.9.5's
``top2gating`` samples the second expert with Gumbel noise even in eval (docs/CONVERT.md),
so MoE-LLaVA's own eval of a top-2 export does not repeat our greedy answers exactly.

The check: the written directory is read back by our importer (``--llava-checkpoint``,
convert/llava.py) with ``image_tower/`` as ``--vision-model``; the flags it derives must be
this model's, and its weights, loaded into this model, must give the same logits.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from megatron_stgc.config import moe_layer_indices
from megatron_stgc.convert import moe_llava_names
from megatron_stgc.export.hf_llava import part, pre_softmax
from megatron_stgc.export.hf_vision import export_vision, vision_config
from megatron_stgc.export.lm_export import (ExportError, LMShape, State, export_dense_lm,
                                            without_router_biases)
from megatron_stgc.export.target import lm_family

FAMILIES = {"stablelm": ("llava_stablelm", "moe_llava_stablelm", "LlavaStablelmForCausalLM",
                         "MoELLaVAStablelmForCausalLM"),
            "phi": ("llava_phi", "moe_llava_phi", "LlavaPhiForCausalLM",
                    "MoELLaVAPhiForCausalLM")}
TOWER_PREFIXES = {"clip": ("openai", "laion"), "siglip": ("google",)}
SELECT_LAYER = -2  # MoE-LLaVA's recipes (scripts/v1/*/finetune*.sh)


def check_moe_llava_target(config, options) -> None:
    """ExportError when MoE-LLaVA's layout cannot hold this model (before anything is built)."""
    family = lm_family(config)
    m, v = config.model, config.vision
    if family not in FAMILIES:
        raise ExportError(f"--format moe-llava writes StableLM-2 and Phi-2 models; this is a "
                          f"{family} model: use --format hf (transformers has its class)")
    if v.vision_model_type is None:
        raise ExportError("--format moe-llava needs a vision-language model "
                          "(--vision-model-type); MoE-LLaVA's checkpoints are LLaVA models")
    if m.add_output_layer_bias:
        raise ExportError("--format moe-llava: MoE-LLaVA's Phi has an unbiased LM head "
                          "(llava_phi_moe.py:303); this model's head has a bias")
    if m.num_experts is not None:
        if m.moe_router_topk not in (1, 2):
            raise ExportError(f"--format moe-llava: DeepSpeed's gating has top-1 and top-2, "
                              f"not --moe-router-topk {m.moe_router_topk}")
        if pre_softmax(config) != (m.moe_router_topk == 1):
            raise ExportError("--format moe-llava: DeepSpeed's top-2 renormalises over the two "
                              "experts (--moe-router-pre-softmax false) and top-1 does not "
                              "(true); this router does the other")
    name = options.moe_llava_image_tower
    prefixes = TOWER_PREFIXES[v.vision_model_type]
    if not name or not name.startswith(prefixes):
        raise ExportError(f"--format moe-llava needs --moe-llava-image-tower: the hub name of "
                          f"the {v.vision_model_type} tower this model was trained with, starting "
                          f"with {' or '.join(prefixes)} (MoE-LLaVA loads its tower by that "
                          f"name: multimodal_encoder/builder.py:14-17); got {name!r}")


def _lm_config_keys(config, family: str, rows: int, tokenizer) -> dict:
    m = config.model
    common = {"vocab_size": rows, "hidden_size": m.hidden_size,
              "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
              "num_attention_heads": m.num_attention_heads,
              "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
              "max_position_embeddings": m.seq_length, "rope_theta": m.rotary_base,
              "tie_word_embeddings": LMShape.of(config).tied, "use_cache": True,
              "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if family == "stablelm":  # StableLMEpochConfig's names
        return {**common, "hidden_act": "silu", "rope_pct": m.rotary_percent,
                "norm_eps": m.norm_epsilon, "use_qkv_bias": m.add_qkv_bias}
    return {**common, "hidden_act": "gelu_new", "partial_rotary_factor": m.rotary_percent,
            "layer_norm_eps": m.norm_epsilon, "qk_layernorm": False}


def _moe_section(config) -> dict:
    m = config.model
    layers = moe_layer_indices(config)
    factor = m.num_experts / m.moe_router_topk  # dropless: see the module docstring
    return {"moe_enable": True, "moe_mode": "custom", "moe_layers_idx": layers,
            "num_experts": [m.num_experts] * len(layers), "top_k_experts": m.moe_router_topk,
            "capacity_factor": factor, "eval_capacity_factor": factor, "min_capacity": 0,
            "use_residual": False, "router_aux_loss_coef": m.moe_aux_loss_coeff, "ep_size": 1,
            "train_modules": []}


def moe_llava_config(config, family: str, rows: int, tokenizer, tower_name: str,
                     dtype: str = "float32") -> dict:
    from megatron_stgc.model.vision import leading_tokens_dropped

    dense_type, moe_type, dense_arch, moe_arch = FAMILIES[family]
    moe = config.model.num_experts is not None
    out = {"model_type": moe_type if moe else dense_type,
           "architectures": [moe_arch if moe else dense_arch],
           **_lm_config_keys(config, family, rows, tokenizer),
           "mm_image_tower": tower_name, "image_projector_type": "mlp2x_gelu",
           "mm_hidden_size": config.vision.vision_hidden_size,
           "mm_vision_select_layer": SELECT_LAYER,
           "mm_vision_select_feature": "patch" if leading_tokens_dropped(config) else "cls_patch",
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
           "image_aspect_ratio": getattr(config.data, "image_aspect_ratio", "resize"),
           "tokenizer_model_max_length": config.model.seq_length,
           "torch_dtype": dtype}
    if moe:
        out["moe"] = _moe_section(config)
    return out


def moe_llava_state(state: State, config, family: str) -> State:
    """Our model's state -> MoE-LLaVA's names (module docstring)."""
    shape = LMShape.of(config)
    lm = without_router_biases(part(state, "language_model"))

    def export_dense(view: State) -> State:
        return export_dense_lm(view, shape, family)

    if config.model.num_experts is None:
        out = export_dense(lm)
    else:
        out = moe_llava_names.to_moe_llava(lm, export_dense)
    out.update(export_vision(part(state, "vision_model"), config, extra_layers=1,
                             prefix="model.image_tower.image_tower.vision_model."))
    projector = part(state, "vision_projection")
    for ours, index in (("linear_fc1", 0), ("linear_fc2", 2)):
        for name in ("weight", "bias"):
            out[f"model.mm_projector.image_spatial_proj.{index}.{name}"] = \
                projector[f"encoder.{ours}.{name}"]
    return out


def _write_tower(directory: str, state: State, config) -> None:
    """image_tower/: the tower (+ the identity layer) as transformers writes one."""
    from megatron_stgc.export.processor import image_processor
    from megatron_stgc.export.writer import save_safetensors

    os.makedirs(directory)
    vision_config(config, extra_layers=1).save_pretrained(directory)
    save_safetensors(export_vision(part(state, "vision_model"), config, extra_layers=1),
                     directory)
    image_processor(config).save_pretrained(directory)


def _write_tokenizer(directory: str, config, tokenizer) -> None:
    from megatron_stgc.export.tokenizer_files import transformers_tokenizer

    transformers_tokenizer(tokenizer, None).save_pretrained(directory)
    source = getattr(tokenizer, "model_path", "")
    if str(source).endswith(".tiktoken") and os.path.isfile(source):
        shutil.copy(source, directory)  # MoE-LLaVA's StableLM tokenizer reads this file


def write_and_check_moe_llava(staging: str, state: State, config, loaded, options,
                              say: Callable[[str], None]) -> dict:
    import json

    from megatron_stgc.export import verify
    from megatron_stgc.export.writer import save_safetensors

    family = lm_family(config)
    rows = state["language_model.embedding.word_embeddings.weight"].shape[0]
    weights = moe_llava_state(state, config, family)
    with open(os.path.join(staging, "config.json"), "w") as f:
        dtype = str(state["language_model.embedding.word_embeddings.weight"].dtype)
        json.dump(moe_llava_config(config, family, rows, loaded.tokenizer,
                                   options.moe_llava_image_tower, dtype.replace("torch.", "")),
                  f, indent=2)
    files = save_safetensors(weights, staging)
    _write_tower(os.path.join(staging, "image_tower"), state, config)
    _write_tokenizer(staging, config, loaded.tokenizer)
    say(f"export: MoE-LLaVA layout ({family}{', MoE' if config.model.num_experts else ''}): "
        f"{len(weights)} tensors in {', '.join(files)}, tower in image_tower/")
    if config.model.num_experts and config.model.moe_router_topk == 2:
        say("export: note: MoE-LLaVA's DeepSpeed 0.9.5 top2gating samples the second expert "
            "with Gumbel noise in eval too; its eval does not repeat our greedy answers exactly")
    tokens, pixels = verify.fixed_input(config, loaded.image_token_id, loaded.tokenizer.vocab_size)
    ours = verify.our_logits(loaded.model, tokens, pixels)
    reloaded = _reimport(staging, config, rows, loaded.model, say)
    theirs = verify.our_logits(loaded.model, tokens, pixels)
    diff = verify.compare(ours, theirs, options.export_tolerance,
                          "our importer (--llava-checkpoint) on the MoE-LLaVA layout", say)
    return {"max_abs_logit_difference": diff, "reimported_tensors": reloaded}


def _reimport(staging: str, config, rows: int, model, say) -> int:
    """Convert the written directory back and load it into ``model`` (strict)."""
    from megatron_stgc.convert.llava import convert_llava_checkpoint
    from megatron_stgc.model.llava import model_parts

    state, flags = convert_llava_checkpoint(staging, os.path.join(staging, "image_tower"),
                                            padded_vocab_size=rows, log=lambda _: None)
    _check_flags(flags, config)
    for name, module in model_parts(model).items():
        sub = part(state, name)
        dtype = next(module.parameters()).dtype
        missing, unexpected = module.load_state_dict(
            {k: v.to(dtype) for k, v in sub.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ExportError(f"the re-imported {name} does not match the model: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
    say(f"export check: our importer read the MoE-LLaVA layout back: {len(state)} tensors, the "
        "flags it derives are this model's")
    return len(state)


_FLAG_SECTIONS = ("model", "vision")


def _check_flags(flags: dict, config) -> None:
    """The importer's flags must describe this model (MoE placement compared as layer lists)."""
    from megatron_stgc.config import config_from_flat

    mismatched = []
    imported = config_from_flat({**flags, "data_path": config.data.data_path})
    if moe_layer_indices(imported) != moe_layer_indices(config):
        mismatched.append(f"MoE layers {moe_layer_indices(imported)} vs "
                          f"{moe_layer_indices(config)}")
    for key, value in flags.items():
        if key in ("moe_layer_freq", "moe_layer_pattern"):
            continue
        for section in _FLAG_SECTIONS:
            ours = getattr(getattr(config, section), key, _MISSING)
            if ours is _MISSING:
                continue
            if key == "moe_router_pre_softmax":
                ours = pre_softmax(config)
            if key == "num_query_groups" and ours == config.model.num_attention_heads:
                ours = None
            if ours != value and not (isinstance(ours, float) and abs(ours - value) < 1e-12):
                mismatched.append(f"{key}: imported {value!r}, ours {ours!r}")
    if mismatched:
        raise ExportError("the MoE-LLaVA layout read back describes another model: "
                          + "; ".join(mismatched))


_MISSING = object()
