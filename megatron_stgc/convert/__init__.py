"""Hugging Face -> megatron-core weights for our LLaVA-style model (TP=1, full tensors).

* ``hf_clip``: transformers CLIPVisionModel -> megatron-core CLIPViTModel
  (``megatron_stgc.model.vision.build_vision_model``); ``hf_siglip``: SiglipVisionModel ->
  the same class, subtype siglip.
* language models (``language_models.FAMILIES``): StableLM-2 (``hf_stablelm``), Phi-2
  (``hf_phi``), Qwen2 (``hf_qwen2``), Qwen-1 (``hf_qwen``) -> dense megatron-core
  GPTModel (``megatron_stgc.model.gpt.build_gpt_model`` with ``--num-experts none``),
  picked by config.json's model_type; weights read from the files (``hf_files``).

All are pure functions of (HF state dict, HF config) returning a state dict
of the megatron module with the local (non Transformer Engine) spec; each
also has a ``*_flags`` function that gives the run-config flags the megatron
module must be built with. ``_extra_state`` entries (megatron's per-linear
FP8 metadata, ``None`` here) are not produced: load with ``load_converted``,
which checks that every real parameter was assigned. ``to_te_layout``
(convert/layouts.py) renames the norms for the Transformer Engine spec, whose fused
LayerNorm+linear modules own the layer norms; loading detects the layout anyway.

Shared layout rule (``fuse_qkv``): megatron's ``linear_qkv`` stacks, for each
query group g (= K/V head g), that group's query heads, then its key head,
then its value head: [g0: q.. k v | g1: q.. k v | ...] along the output dim.

``convert_pretrained`` / ``write_pretrained`` are what
tools/convert_hf_to_megatron.py runs: ``model.pt`` = {"model": state dict with
keys prefixed ``vision_model.`` / ``language_model.``} and ``args.yaml`` = the
flags (flat YAML, usable with ``--config``). ``llava.convert_llava_checkpoint`` converts
a whole LLaVA-format checkpoint (MoE-LLaVA's, LLaVA-1.5's, transformers'; dense or
MoE-LLaVA MoE) into the same files, ``vision_projection.`` included (docs/CONVERT.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional

import torch
import yaml


from megatron_stgc.convert.layouts import to_te_layout  # noqa: F401  (re-exported)

VOCAB_MULTIPLE = 128  # default vocab padding, as megatron pads for TP=1


class ConversionError(ValueError):
    """The Hugging Face model uses a feature the megatron model here does not have."""


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int) -> torch.Tensor:
    """Megatron's fused QKV from separate projections (weights [out, in] or biases [out]).

    q [heads * d, ...], k and v [groups * d, ...] -> [(heads + 2 * groups) * d, ...]
    ordered per group: that group's heads / groups query heads, its key, its value.
    """
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_groups, (num_heads // num_groups) * d, *rest)  # [g, q_per_g * d, ...]
    k = k.reshape(num_groups, d, *rest)  # [g, d, ...]
    v = v.reshape(num_groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def find_prefix(state_dict: dict, suffix: str, what: str) -> str:
    """The key prefix in front of ``suffix`` ('model.', 'vision_model.', ...)."""
    for key in state_dict:
        if key.endswith(suffix):
            return key[:-len(suffix)]
    raise ConversionError(f"{what}: no key ending in {suffix!r} in the state dict "
                          f"(first keys: {list(state_dict)[:5]})")


def take(state_dict: dict, key: str, what: str,
         shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """``state_dict[key]``; a missing key or (with ``shape``) a tensor of another shape is a
    ConversionError naming the key and, for weights read from disk, the file."""
    from megatron_stgc.convert.hf_files import source_of

    if key not in state_dict:
        raise ConversionError(f"{what}: the state dict has no {key!r}")
    tensor = state_dict[key]
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{what}: {key!r}{source_of(state_dict, key)} has shape "
                              f"{tuple(tensor.shape)}; the config gives {tuple(shape)}")
    return tensor


def load_converted(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a converted state dict; every parameter must be given ("_extra_state" may be absent)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"converted weights do not match {type(module).__name__}: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")


def convert_pretrained(vision_dir: Optional[str] = None, language_dir: Optional[str] = None,
                       vision_num_layers: Optional[int] = None,
                       padded_vocab_size: Optional[int] = None, te_layout: bool = False,
                       log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Read HF save_pretrained directories -> (prefixed megatron state dict, flags).

    ``padded_vocab_size`` None: the HF vocabulary rounded up to a multiple of 128.
    """
    from megatron_stgc.convert.language_models import load_language_model

    if vision_dir is None and language_dir is None:
        raise ConversionError("nothing to convert: give a vision model, a language model or both")
    state: dict[str, torch.Tensor] = {}
    flags: dict = {}
    parts = []
    if vision_dir is not None:
        load, flags_of, convert = vision_converter(vision_dir)
        hf_state, hf_config = load(vision_dir, log)
        flags.update(flags_of(hf_config, vision_num_layers))
        parts.append(("vision_model", convert(hf_state, hf_config, flags["vision_num_layers"])))
    if language_dir is not None:
        family, hf_config, lm_flags, hf_state = load_language_model(language_dir, log)
        flags.update(lm_flags)
        rows = padded_vocab_size or -(-hf_config.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        log(f"language_model ({family.name}): vocab {hf_config.vocab_size} padded to {rows} rows")
        parts.append(("language_model", family.convert(hf_state, hf_config, rows)))
    if te_layout and flags.get("parallel_attention_mlp"):
        raise ConversionError("--te-layout: this language model's parallel attention+MLP block "
                              "runs on megatron-core's local spec only (one shared input norm); "
                              "convert without --te-layout")
    for prefix, part_state in parts:
        if te_layout:
            part_state = to_te_layout(part_state)
        log(f"{prefix}: {len(part_state)} tensors, "
            f"{sum(t.numel() for t in part_state.values()):,} parameters")
        state.update({f"{prefix}.{key}": value for key, value in part_state.items()})
    return state, flags


def vision_converter(directory: str):
    """(load, flags, convert) of the tower in ``directory``: CLIP or SigLIP, by config.json."""
    from megatron_stgc.convert import hf_clip, hf_siglip
    from megatron_stgc.convert.checkpoint_files import read_config

    config = read_config(directory, "--vision-model")
    model_type = config.get("model_type")
    if model_type in ("clip", "clip_vision_model"):
        return hf_clip.load_hf_clip_vision, hf_clip.clip_vision_flags, hf_clip.convert_clip_vision
    if model_type in ("siglip", "siglip_vision_model"):
        return (hf_siglip.load_hf_siglip_vision, hf_siglip.siglip_vision_flags,
                hf_siglip.convert_siglip_vision)
    raise ConversionError(f"--vision-model {directory}: config.json model_type {model_type!r}; "
                          "CLIP and SigLIP vision towers convert")


def check_output_free(output_dir: str) -> None:
    """The converter writes a new directory: an existing non-empty one is an error (checked
    before any conversion work)."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ConversionError(f"--output {output_dir} already exists and is not an empty "
                              "directory; give a new directory")


def write_pretrained(output_dir: str, state: dict[str, torch.Tensor], flags: dict) -> None:
    """OUTPUT/model.pt ({"model": state}) and OUTPUT/args.yaml (flat flags).

    Written into a temporary directory beside OUTPUT and renamed at the end, so a failure
    (disk full, interrupt) leaves no partial OUTPUT."""

    check_output_free(output_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.",
                               suffix=".partial", dir=parent)
    try:
        torch.save({"model": {key: value.contiguous() for key, value in state.items()}},
                   os.path.join(staging, "model.pt"))
        with open(os.path.join(staging, "args.yaml"), "w") as f:
            yaml.safe_dump(flags, f, sort_keys=False)
        os.chmod(staging, 0o755)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (check_output_free)
        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
