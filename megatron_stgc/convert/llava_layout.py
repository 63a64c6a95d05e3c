"""Which LLaVA checkpoint layout a directory holds, and its parts: vision tower, projector, LM.

Three layouts are recognised, by the projector's first linear (``<m>`` = ``model`` or, for
Qwen-1, ``transformer``):

* ``moe-llava``: projector ``<m>.mm_projector.image_spatial_proj.{0,2}``; tower (optional)
  ``<m>.image_tower.image_tower.vision_model.*``; LM ``<m>.layers.*`` / ``lm_head``; config
  ``mm_image_tower`` (or ``image_tower``), ``image_projector_type``,
  ``mm_vision_select_layer``, ``mm_vision_select_feature``, ``mm_hidden_size``, ``moe``.
* ``llava`` (LLaVA-1.5): projector ``model.mm_projector.{0,2}``; tower (optional)
  ``model.vision_tower.vision_tower.vision_model.*``; LM ``model.layers.*`` / ``lm_head``;
  config ``mm_vision_tower``, ``mm_projector_type`` and the same select keys.
* ``transformers`` (LlavaForConditionalGeneration): projector
  ``multi_modal_projector.linear_{1,2}``; tower ``vision_tower.*``; LM
  ``language_model.model.*`` + ``language_model.lm_head`` on disk (``model.language_model.*``
  + ``lm_head`` in memory); config ``vision_config``, ``text_config``,
  ``vision_feature_layer``, ``vision_feature_select_strategy``, ``projector_hidden_act``.

Sources (MoE-LLaVA mirror): ``moellava/model/llava_arch.py:33-38`` (``image_tower`` and
``mm_projector`` attributes of the model, built from ``mm_image_tower``), ``:61-62,118-119``
(the select keys stored in the config), ``moellava/model/multimodal_encoder/builder.py:12-17``
(tower name -> CLIP for ``openai``/``laion``, SigLIP for ``google``),
``clip_encoder.py:24-27`` (``image_tower`` = ``CLIPVisionModel``, hence
``image_tower.image_tower.vision_model.``), ``multimodal_projector/builder.py:51-58,117-122``
(``image_spatial_proj`` = ``Sequential(Linear, GELU, Linear)`` for ``mlp2x_gelu``),
``moellava/train/train.py:58-66`` (``--mm_vision_select_layer``, ``--mm_vision_select_feature``
'patch', ``--image_projector_type``). LLaVA-1.5 (haotian-liu/LLaVA):
``llava/model/llava_arch.py:34-36`` (``vision_tower``, ``mm_projector`` from ``mm_vision_tower``),
``multimodal_encoder/clip_encoder.py:30`` (``vision_tower`` = ``CLIPVisionModel``),
``multimodal_projector/builder.py:34-46`` (``mm_projector_type`` ``mlp2x_gelu`` =
``Sequential(Linear, GELU, Linear)``). transformers: ``models/llava/modeling_llava.py``
(``get_image_features``: ``hidden_states[vision_feature_layer]``, ``[:, 1:]`` for the
'default' strategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_stgc.convert import ConversionError


@dataclass(frozen=True)
class Layout:
    name: str
    projector: tuple[str, str]  # the two linears' key suffixes (+ ".weight" / ".bias")
    vision_marker: str  # a segment only the vision tower's keys contain
    tower_name_keys: tuple[str, ...]  # config keys naming the tower (non-transformers layouts)
    projector_type_key: Optional[str]


LAYOUTS = (
    Layout("moe-llava", ("mm_projector.image_spatial_proj.0", "mm_projector.image_spatial_proj.2"),
           "image_tower.", ("mm_image_tower", "image_tower"), "image_projector_type"),
    Layout("llava", ("mm_projector.0", "mm_projector.2"), "vision_tower.",
           ("mm_vision_tower", "vision_tower"), "mm_projector_type"),
    Layout("transformers", ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
           "vision_tower.", (), None),
)
# keys of MoE-LLaVA models that this package has no part for (video LLaVA variants)
VIDEO_MARKERS = ("video_tower.",)


@dataclass
class LlavaParts:
    """The checkpoint's keys by part, and the LLaVA settings from its config.json."""

    layout: Layout
    vision_keys: list[str]
    projector_keys: dict[str, str]  # "linear_fc1.weight" ... -> checkpoint key
    language_keys: dict[str, str]  # CausalLM key ("model.layers.0...", "lm_head.weight") -> key
    ignored_keys: list[str]
    select_layer: int
    drop_first_token: bool  # select feature 'patch' (transformers: strategy 'default')
    tower_name: Optional[str]
    language_config: dict  # the LM's config (model_type = its family, or MoE-LLaVA's)


def detect_layout(keys: list[str], what: str) -> tuple[Layout, str]:
    """(layout, key prefix before the projector) from the checkpoint's keys."""
    for layout in LAYOUTS:
        suffix = f"{layout.projector[0]}.weight"
        for key in keys:
            if key == suffix or key.endswith("." + suffix):
                return layout, key[: -len(suffix)]
    raise ConversionError(
        f"{what}: not a LLaVA-format checkpoint: no projector weights (no key ending in "
        f"{', '.join(repr(f'{l.projector[0]}.weight') for l in LAYOUTS)}; first keys: "
        f"{sorted(keys)[:4]})")


def split_parts(keys: list[str], config: dict, what: str) -> LlavaParts:
    layout, prefix = detect_layout(keys, what)
    projector = _projector_keys(keys, layout, prefix, what)
    vision, ignored, language = [], [], {}
    for key in keys:
        if key in projector.values():
            continue
        if any(marker in key for marker in VIDEO_MARKERS):
            ignored.append(key)
        elif layout.vision_marker in key:
            vision.append(key)
        elif f"{prefix}mm_projector." in key:
            ignored.append(key)  # MoE-LLaVA's video projections (nn.Identity: no weights)
        else:
            language[_causal_lm_key(key, layout)] = key
    select_layer, drop_first = _selection(config, layout, what)
    return LlavaParts(layout, vision, projector, language, ignored, select_layer, drop_first,
                      _tower_name(config, layout), _language_config(config, layout, what))


def _projector_keys(keys: list[str], layout: Layout, prefix: str, what: str) -> dict[str, str]:
    """Our projector names -> checkpoint keys; both linears need weight and bias."""
    present = set(keys)
    out = {}
    for ours, theirs in zip(("linear_fc1", "linear_fc2"), layout.projector):
        for name in ("weight", "bias"):
            key = f"{prefix}{theirs}.{name}"
            if key not in present:
                raise ConversionError(f"{what}: projector key {key!r} is missing (a {layout.name} "
                                      "checkpoint's mlp2x_gelu projector has two biased linears)")
            out[f"encoder.{ours}.{name}"] = key
    return out


def _causal_lm_key(key: str, layout: Layout) -> str:
    """transformers' LLaVA nests the LM: language_model.model.X / model.language_model.X ->
    model.X, language_model.lm_head.weight -> lm_head.weight; other layouts are already so."""
    if layout.name != "transformers":
        return key
    if key.startswith("language_model."):
        return key[len("language_model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def _selection(config: dict, layout: Layout, what: str) -> tuple[int, bool]:
    """(select layer, drop the first token) from the config's LLaVA keys."""
    if layout.name == "transformers":
        layer = config.get("vision_feature_layer", -2)
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConversionError(f"{what}: config.json vision_feature_select_strategy "
                                  f"{strategy!r} is not 'default' or 'full'")
        drop = strategy == "default"
    else:
        layer = config.get("mm_vision_select_layer", -2)
        feature = config.get("mm_vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise ConversionError(f"{what}: config.json mm_vision_select_feature {feature!r} is "
                                  "not 'patch' or 'cls_patch'")
        drop = feature == "patch"
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConversionError(f"{what}: config.json selects vision layer(s) {layer!r}; only one "
                              "layer (an integer) can be converted")
    _check_projector_type(config, layout, what)
    return layer, drop


def _check_projector_type(config: dict, layout: Layout, what: str) -> None:
    if layout.name == "transformers":
        act = config.get("projector_hidden_act", "gelu")
        if act != "gelu" or config.get("multimodal_projector_bias", True) is not True:
            raise ConversionError(f"{what}: config.json projector_hidden_act {act!r} / "
                                  "multimodal_projector_bias: only a biased GELU projector "
                                  "(mlp2x_gelu) converts")
        return
    kind = config.get(layout.projector_type_key, "linear")
    if kind != "mlp2x_gelu":
        raise ConversionError(f"{what}: config.json {layout.projector_type_key} {kind!r}: only "
                              "'mlp2x_gelu' (Linear, GELU, Linear) converts")


def _tower_name(config: dict, layout: Layout) -> Optional[str]:
    for key in layout.tower_name_keys:
        if config.get(key):
            return config[key]
    return None


def _language_config(config: dict, layout: Layout, what: str) -> dict:
    if layout.name != "transformers":
        return config
    text = config.get("text_config")
    if not isinstance(text, dict) or "model_type" not in text:
        raise ConversionError(f"{what}: config.json has no text_config with a model_type")
    return text


def vision_layers(select_layer: int, tower_layers: int, what: str) -> int:
    """ViT layers whose output is ``hidden_states[select_layer]`` (hidden_states[0] is the
    embeddings, so index s >= 1 is after s layers and -k after tower_layers + 1 - k)."""
    layers = select_layer if select_layer >= 0 else tower_layers + 1 + select_layer
    if not 1 <= layers <= tower_layers:
        raise ConversionError(f"{what}: vision select layer {select_layer} is not the output of "
                              f"one of the tower's {tower_layers} layers")
    return layers
