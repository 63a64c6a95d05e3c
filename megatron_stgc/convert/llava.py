"""A LLaVA-format checkpoint directory -> one --pretrained-checkpoint (vision + projector + LM).

``convert_llava_checkpoint(directory, vision_dir)`` reads the directory as files
(``checkpoint_files``), finds its layout and parts (``llava_layout``: MoE-LLaVA's, LLaVA-1.5's
or transformers' LlavaForConditionalGeneration), and converts:

* the vision tower (CLIP: ``hf_clip``, SigLIP: ``hf_siglip``), cut at the config's select
  layer, its first output dropped for select feature 'patch' / strategy 'default';
* the mlp2x_gelu projector -> megatron-core MultimodalProjector (``encoder.linear_fc1/2``);
  MoE-LLaVA's ``nn.GELU()`` (``multimodal_projector/builder.py:56``) is the erf GELU our
  projector uses (``model/llava.py``);
* the language model through its family's converter (``llava_language``); a MoE-LLaVA MoE
  checkpoint (``moe.moe_enable``) through the two-way DeepSpeed-MoE name table
  (``moe_llava_names.to_ours``), its ``moe`` section into our MoE flags (``moe_llava_config``).

MoE-LLaVA's checkpoints name their image tower (``mm_image_tower``, a hub id) and hold its
config nowhere; its loader fetches the tower from the hub (``moellava/model/builder.py:493-496``,
the saved tower weights are not the ones it uses). So ``vision_dir`` (``--vision-model``) is
required for those layouts: its config.json gives the tower's shape, and its weights (when it
has weight files) are the tower's weights, as in MoE-LLaVA; without weight files there, the
checkpoint's own copy is used. transformers' LLaVA checkpoints hold both.

Everything is checked (layout, shapes, vocabulary, MoE names, every LM tensor used) before
the caller writes anything.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megatron_stgc.convert import VOCAB_MULTIPLE, ConversionError, to_te_layout
from megatron_stgc.convert import llava_language, moe_llava_config, moe_llava_names
from megatron_stgc.convert.checkpoint_files import CheckpointDir, read_config
from megatron_stgc.convert.llava_layout import LlavaParts, split_parts, vision_layers
from megatron_stgc.convert.shapes import check_shapes

WHAT = "--llava-checkpoint"
# tensors a language-model checkpoint may hold that are not weights of the model (older
# transformers saved the rotary inverse frequencies)
LM_BUFFERS = ("rotary_emb.inv_freq",)
# MoE-LLaVA's tower rule (multimodal_encoder/builder.py:14-17): name prefix -> family
TOWER_PREFIXES = {"openai": "clip", "laion": "clip", "google": "siglip"}


def convert_llava_checkpoint(directory: str, vision_dir: Optional[str] = None,
                             padded_vocab_size: Optional[int] = None, te_layout: bool = False,
                             log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """(prefixed megatron state dict, flags) of a LLaVA-format checkpoint directory."""
    ckpt = CheckpointDir(directory, WHAT)
    parts = split_parts(ckpt.keys(), ckpt.config, f"{WHAT} {directory}")
    log(f"{WHAT} {directory}: {parts.layout.name} layout, {len(ckpt.keys())} tensors")
    for key in parts.ignored_keys:
        log(f"  not converted (no video tower here): {key}")
    vision_state, vision_flags = convert_vision(parts, ckpt, vision_dir, log)
    language_state, language_flags, rows = convert_language(parts, ckpt, padded_vocab_size, log)
    projector = convert_projector(parts, ckpt, vision_flags, language_flags)
    flags = {**vision_flags, **language_flags}
    state = {}
    for prefix, part in (("vision_model", vision_state), ("vision_projection", projector),
                         ("language_model", language_state)):
        state.update({f"{prefix}.{key}": value for key, value in part.items()})
    check_shapes(state, flags, rows, f"{WHAT} {directory}")
    if te_layout:
        state = _te_layout(state)
    return state, flags


def convert_vision(parts: LlavaParts, ckpt: CheckpointDir, vision_dir: Optional[str],
                   log: Callable[[str], None]) -> tuple[dict, dict]:
    """The tower cut at the select layer -> (CLIPViTModel state, vision flags)."""
    from megatron_stgc.convert import hf_clip, hf_siglip

    hf_config, hf_state = _vision_source(parts, ckpt, vision_dir, log)
    kind = _tower_kind(hf_config, parts, vision_dir)
    layers = vision_layers(parts.select_layer, hf_config.num_hidden_layers,
                           f"{WHAT} {ckpt.directory}")
    mm_hidden = ckpt.config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != hf_config.hidden_size:
        raise ConversionError(f"{WHAT} {ckpt.directory}: config.json mm_hidden_size {mm_hidden} "
                              f"differs from the vision tower's hidden_size "
                              f"{hf_config.hidden_size} ({vision_dir or 'its vision_config'})")
    if kind == "clip":
        flags = hf_clip.clip_vision_flags(hf_config, layers)
        flags["disable_vision_class_token"] = parts.drop_first_token
        state = hf_clip.convert_clip_vision(hf_state, hf_config, layers)
    else:
        flags = hf_siglip.siglip_vision_flags(hf_config, layers)
        flags["vision_drop_first_patch"] = parts.drop_first_token
        state = hf_siglip.convert_siglip_vision(hf_state, hf_config, layers)
    log(f"vision: {kind}, {layers} of {hf_config.num_hidden_layers} layers (select layer "
        f"{parts.select_layer}), first output token "
        f"{'dropped' if parts.drop_first_token else 'kept'}")
    return state, flags


def _vision_source(parts: LlavaParts, ckpt: CheckpointDir, vision_dir: Optional[str],
                   log: Callable[[str], None]):
    """(transformers vision config, HF vision state dict) for the checkpoint's tower."""
    if parts.layout.name == "transformers":
        if vision_dir is not None:
            log(f"  --vision-model {vision_dir} not used: the checkpoint holds its vision tower")
        config = _vision_config_object(ckpt.config.get("vision_config") or {}, ckpt.directory)
        if not parts.vision_keys:
            raise ConversionError(f"{WHAT} {ckpt.directory}: no vision tower weights (no key "
                                  "containing 'vision_tower.')")
        return config, ckpt.load(parts.vision_keys)
    where = (f"config.json names the image tower {parts.tower_name!r} "
             f"({'/'.join(parts.layout.tower_name_keys)})")
    if vision_dir is None:
        has = "holds its weights but not its configuration" if parts.vision_keys else \
            "holds neither its weights nor its configuration"
        raise ConversionError(f"{WHAT} {ckpt.directory}: {where}; the checkpoint {has}: give "
                              f"--vision-model with that tower's save_pretrained directory "
                              f"(e.g. the hub snapshot of {parts.tower_name})")
    config = _vision_config_object(read_config(vision_dir, "--vision-model"), vision_dir)
    if _has_weights(vision_dir):
        if parts.vision_keys:
            log(f"  vision weights from --vision-model {vision_dir} (MoE-LLaVA's loader uses the "
                f"hub tower too); the checkpoint's {len(parts.vision_keys)} tower tensors unused")
        tower = CheckpointDir(vision_dir, "--vision-model")
        return config, tower.load([k for k in tower.keys() if "text_model." not in k])
    if not parts.vision_keys:
        raise ConversionError(f"{WHAT} {ckpt.directory}: {where}; neither the checkpoint nor "
                              f"--vision-model {vision_dir} holds its weights")
    log(f"  vision config from --vision-model {vision_dir}, weights from the checkpoint")
    return config, ckpt.load(parts.vision_keys)


def _vision_config_object(config: dict, source: str):
    """transformers' CLIP / SigLIP vision config from a config.json dict (a full CLIPConfig /
    SiglipConfig too: its vision_config)."""
    import transformers

    if config.get("model_type") in ("clip", "siglip"):
        config = config.get("vision_config") or {}
    classes = {"clip_vision_model": transformers.CLIPVisionConfig,
               "siglip_vision_model": transformers.SiglipVisionConfig}
    model_type = config.get("model_type")
    if model_type not in classes:
        raise ConversionError(f"vision tower config in {source}: model_type {model_type!r}; "
                              "CLIP and SigLIP towers convert")
    return classes[model_type](**{k: v for k, v in config.items() if k != "model_type"})


def _tower_kind(hf_config, parts: LlavaParts, vision_dir: Optional[str]) -> str:
    kind = "clip" if hf_config.model_type == "clip_vision_model" else "siglip"
    name = parts.tower_name or ""
    expected = next((k for p, k in TOWER_PREFIXES.items() if name.startswith(p)), None)
    if expected is not None and expected != kind:
        raise ConversionError(f"{WHAT}: config.json names the image tower {name!r}, a "
                              f"{expected} tower by MoE-LLaVA's rule "
                              f"(multimodal_encoder/builder.py:14-17), but --vision-model "
                              f"{vision_dir} is a {kind} model")
    return kind


def _has_weights(directory: str) -> bool:
    from megatron_stgc.convert.checkpoint_files import INDEX_FILES, SINGLE_FILES

    return any(os.path.isfile(os.path.join(directory, name))
               for name in SINGLE_FILES + INDEX_FILES)


def convert_projector(parts: LlavaParts, ckpt: CheckpointDir, vision_flags: dict,
                      language_flags: dict) -> dict[str, torch.Tensor]:
    """mlp2x_gelu: Linear(vh -> h), GELU, Linear(h -> h) -> MultimodalProjector's encoder."""
    tensors = ckpt.load(parts.projector_keys.values())
    state = {ours: tensors[theirs].detach().clone()
             for ours, theirs in parts.projector_keys.items()}
    vh, h = vision_flags["vision_hidden_size"], language_flags["hidden_size"]
    expected = {"encoder.linear_fc1.weight": (h, vh), "encoder.linear_fc1.bias": (h,),
                "encoder.linear_fc2.weight": (h, h), "encoder.linear_fc2.bias": (h,)}
    for ours, theirs in parts.projector_keys.items():
        if tuple(state[ours].shape) != expected[ours]:
            raise ConversionError(
                f"{WHAT}: {ckpt.path(theirs)}: projector {theirs!r} has shape "
                f"{list(state[ours].shape)}, expected {list(expected[ours])} (vision hidden size "
                f"{vh}, language hidden size {h})")
    return state


def convert_language(parts: LlavaParts, ckpt: CheckpointDir, padded_vocab_size: Optional[int],
                     log: Callable[[str], None]) -> tuple[dict, dict, int]:
    """(GPTModel state, LM flags, vocab rows); MoE-LLaVA MoE layers become experts + routers."""
    family = llava_language.language_family(parts.language_config)
    try:
        flags_of, convert = llava_language.language_converter(family)
    except ConversionError as error:
        raise ConversionError(f"{WHAT} {ckpt.directory}: config.json model_type "
                              f"{parts.language_config.get('model_type')!r}: {error}") from None
    hf_config = llava_language.hf_language_config(parts.language_config, family)
    # the LM head belongs to the LLaVA wrapper: transformers' LlavaForConditionalGeneration
    # and MoE-LLaVA's llava_phi build it without a bias (Phi's own head has one)
    hf_config.head_bias = "lm_head.bias" in parts.language_keys
    flags = dict(flags_of(hf_config))
    tensors = ckpt.load(parts.language_keys.values())
    hf_state = {causal: tensors[key] for causal, key in parts.language_keys.items()}
    _check_vocab(hf_state, parts, ckpt, hf_config.vocab_size)
    rows = padded_vocab_size or -(-hf_config.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    log(f"language model: {family}, vocab {hf_config.vocab_size} padded to {rows} rows")

    unused_ok = LM_BUFFERS + (("lm_head.weight",) if hf_config.tie_word_embeddings else ())
    views = iter(range(1, 1 << 30))

    def convert_view(view: dict) -> dict:
        if moe_llava_config.is_moe(ckpt.config):
            log(f"  converting expert view {next(views)} of {flags['num_experts']}")
        recorder = _ReadRecorder(view)
        out = convert(recorder, hf_config, rows)
        _require_all_read(view, recorder.read | {k for k in view if k.endswith(unused_ok)},
                          parts, ckpt)
        return out

    if moe_llava_config.is_moe(ckpt.config):
        layers = moe_llava_config.moe_layers(ckpt.config, hf_config.num_hidden_layers, WHAT)
        flags.update(moe_llava_config.moe_flags(ckpt.config, hf_config.num_hidden_layers, WHAT))
        _check_moe_names(hf_state, layers, flags["num_experts"], parts, ckpt)
        state = moe_llava_names.to_ours(hf_state, convert_view)
        if flags.get("add_bias_linear"):
            state.update(zero_router_biases(state, layers))
        log(f"  MoE: {flags['num_experts']} experts, top-{flags['moe_router_topk']}, layers "
            f"{layers}; {moe_llava_config.training_notes(ckpt.config)}")
    else:
        _check_no_moe_names(hf_state, parts, ckpt)
        state = convert_view(hf_state)
    return state, flags, rows


def zero_router_biases(state: dict, layers: list[int]) -> dict:
    """megatron-core's TopKRouter has a bias when --add-bias-linear is set (Phi-2;
    transformer/moe/router.py:56-61); DeepSpeed's gate ``wg`` has none (sharded_moe.py:376):
    a zero bias computes MoE-LLaVA's router."""
    out = {}
    for i in layers:
        weight = state[f"decoder.layers.{i}.mlp.router.weight"]  # [E, h]
        out[f"decoder.layers.{i}.mlp.router.bias"] = weight.new_zeros(weight.shape[0])
    return out


class _ReadRecorder(dict):
    """A dict that remembers which keys were read (``take`` reads with ``[]``)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _require_all_read(view: dict, read: set, parts: LlavaParts, ckpt: CheckpointDir) -> None:
    unread = sorted(k for k in view if k not in read)
    if unread:
        source = parts.language_keys.get(unread[0], unread[0])
        raise ConversionError(
            f"{WHAT} {ckpt.directory}: the language model converter did not use "
            f"{len(unread)} tensors, e.g. {source!r}"
            + (f" in {ckpt.path(source)}" if source in ckpt.file_of else "")
            + f" ({unread[:4]}): the checkpoint has parts the config does not describe")


def _check_vocab(hf_state: dict, parts: LlavaParts, ckpt: CheckpointDir, vocab: int) -> None:
    """Embedding and output rows must be the config's vocab_size."""
    for suffix in ("embed_tokens.weight", "wte.weight", "lm_head.weight"):
        for key, value in hf_state.items():
            if key.endswith(suffix) and value.shape[0] != vocab:
                source = parts.language_keys[key]
                raise ConversionError(
                    f"{WHAT}: {ckpt.path(source)}: {source!r} has {value.shape[0]} rows but "
                    f"config.json says vocab_size {vocab}")


def _check_moe_names(hf_state: dict, layers: list[int], num_experts: int, parts: LlavaParts,
                     ckpt: CheckpointDir) -> None:
    """Routers exactly at moe_layers_idx with num_experts rows, and every expert present."""
    views = moe_llava_names.split(hf_state, "moe_llava")
    where = f"{WHAT} {ckpt.directory}"
    if views.moe_layers != layers:
        raise ConversionError(f"{where}: config.json moe.moe_layers_idx is {layers} but the "
                              f"weights have routers ('{moe_llava_names.ROUTER.moe_llava}') in "
                              f"layers {views.moe_layers}")
    for i, weight in views.routers.items():
        if weight.shape[0] != num_experts:
            key = f"{views.layer_prefix.format(i=i)}.mlp.{moe_llava_names.ROUTER.moe_llava}"
            raise ConversionError(f"{WHAT}: {ckpt.path(parts.language_keys[key])}: {key!r} has "
                                  f"{weight.shape[0]} rows, config.json moe.num_experts says "
                                  f"{num_experts}")
    if sorted(views.experts) != list(range(num_experts)):
        raise ConversionError(f"{where}: expert weights for experts {sorted(views.experts)}, "
                              f"config.json moe.num_experts is {num_experts} (a checkpoint "
                              "saved with ep_size > 1 holds only one rank's experts)")
    first = views.experts[0]
    for e, tensors in views.experts.items():
        for dense_key, value in tensors.items():
            if value.shape != first[dense_key].shape:
                raise ConversionError(f"{where}: expert {e}'s {dense_key} has shape "
                                      f"{list(value.shape)}, expert 0's "
                                      f"{list(first[dense_key].shape)}")


def _check_no_moe_names(hf_state: dict, parts: LlavaParts, ckpt: CheckpointDir) -> None:
    moe_keys = [k for k in hf_state if ".deepspeed_moe." in k]
    if moe_keys:
        raise ConversionError(f"{WHAT}: {ckpt.path(parts.language_keys[moe_keys[0]])} holds "
                              f"DeepSpeed-MoE weights ({moe_keys[0]!r}) but config.json has no "
                              "moe section with moe_enable true")


def _te_layout(state: dict) -> dict:
    """Rename each part for the Transformer Engine spec."""
    out = {}
    for prefix in ("vision_model", "vision_projection", "language_model"):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        out.update({f"{prefix}.{k}": v for k, v in to_te_layout(part).items()})
    return out
