"""The language-model families the converter knows, keyed by config.json's model_type.

Each ``Family`` holds three pure functions and the names that identify it:

* ``flags(hf_config) -> dict``: our run-config flags for a dense GPTModel equal to the
  HF model (a ConversionError names any feature the megatron model here lacks);
* ``convert(hf_state_dict, hf_config, padded_vocab_size) -> state dict``: keys of the local
  spec of that dense GPTModel, TP 1, whole tensors, vocab rows zero-padded;
* ``config(config_json: dict) -> hf_config``: the object ``flags`` / ``convert`` read, from
  config.json alone (transformers' config class, or a namespace for Qwen-1).

``family_of(config_json)`` picks the family by ``model_type``, else by ``architectures``;
``load_language_model(directory)`` reads config.json, checks the flags (before any weight
is read), then the weights (``hf_files.read_weights``: safetensors or .bin, sharded or
not). The LLaVA-format importer calls ``FAMILIES[...]`` / ``family_of`` for the language
model inside a LLaVA checkpoint.

| family   | HF class (architectures)            | model_type values                      |
| -------- | ----------------------------------- | -------------------------------------- |
| stablelm | StableLmForCausalLM                 | stablelm                               |
| phi      | PhiForCausalLM                      | phi, llava_phi, moe_llava_phi          |
| qwen2    | Qwen2ForCausalLM                    | qwen2, llava_qwen1_5, moe_llava_qwen1_5 |
| qwen     | QWenLMHeadModel (Qwen-1, remote code, read without running it) | qwen, llava_qwen, moe_llava_qwen |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_stgc.convert import ConversionError, hf_phi, hf_qwen, hf_qwen2, hf_stablelm
from megatron_stgc.convert.hf_files import read_config_json, read_weights


def _stablelm_config(config_json: dict):
    from transformers import StableLmConfig

    return StableLmConfig.from_dict(config_json)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    flags: Callable[[object], dict]
    convert: Callable[..., dict]
    config: Callable[[dict], object]


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("stablelm", ("StableLmForCausalLM",), ("stablelm",), hf_stablelm.stablelm_flags,
           hf_stablelm.convert_stablelm, _stablelm_config),
    Family("phi", ("PhiForCausalLM",), hf_phi.MODEL_TYPES, hf_phi.phi_flags, hf_phi.convert_phi,
           hf_phi.phi_config),
    Family("qwen2", ("Qwen2ForCausalLM",), hf_qwen2.MODEL_TYPES, hf_qwen2.qwen2_flags,
           hf_qwen2.convert_qwen2, hf_qwen2.qwen2_config),
    Family("qwen", ("QWenLMHeadModel",), hf_qwen.MODEL_TYPES, hf_qwen.qwen_flags,
           hf_qwen.convert_qwen, hf_qwen.qwen_config),
)}


def supported() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.architectures)}; model_type "
                     f"{', '.join(f.model_types)})" for f in FAMILIES.values())


def family_of(config_json: dict, source: str = "config.json") -> Family:
    """The family of a config.json dict: by model_type, else by its architectures."""
    model_type = config_json.get("model_type")
    architectures = config_json.get("architectures") or []
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    for family in FAMILIES.values():
        if any(name in family.architectures for name in architectures):
            return family
    raise ConversionError(f"{source}: model_type {model_type!r} (architectures "
                          f"{architectures}) is not a language model this converter knows; "
                          f"supported: {supported()}")


def read_language_config(directory: str) -> tuple[Family, object, dict]:
    """(family, hf_config, flags) of a model directory, from its config.json alone."""
    config_json = read_config_json(directory)
    family = family_of(config_json, f"{directory}/config.json")
    hf_config = family.config(config_json)
    return family, hf_config, family.flags(hf_config)


def load_language_model(directory: str, log: Callable[[str], None] = print):
    """(family, hf_config, flags, weights) of a model directory; flags are checked first."""
    family, hf_config, flags = read_language_config(directory)
    log(f"loading the {family.name} language model from {directory}")
    return family, hf_config, flags, read_weights(directory, log)
