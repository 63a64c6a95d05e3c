"""The language model inside a LLaVA checkpoint: its family, its config, its converter.

MoE-LLaVA names its model classes after the LM (``moellava/model/language_model/*.py``,
``model_type = "llava_<family>"`` / ``"moe_llava_<family>"``) and stores the LM's own config
keys flat in config.json; transformers' LLaVA keeps them in ``text_config`` with the LM's
``model_type``. ``hf_language_config`` turns either into the transformers config object the
family converter reads (``flags(hf_config)``, ``convert(hf_state, hf_config, rows)``):

* StableLM: MoE-LLaVA's ``StableLMEpochConfig`` keys
  (``moellava/model/language_model/stablelm/configuration_stablelm_epoch.py:72-107``:
  ``rope_pct``, ``norm_eps``, ...) -> transformers ``StableLmConfig``
  (``partial_rotary_factor``, ``layer_norm_eps``). Its modeling file computes what
  transformers' StableLm does (rotate-half rotary on the first ``rope_pct`` of each head,
  inv_freq base^(-2j/rot_dim): ``modeling_stablelm_epoch.py:96-152,208-215``; LayerNorm,
  SwiGLU ``gate_proj/up_proj/down_proj``, qkv bias: ``:156-204,491-497``).
* Phi (``phi/configuration_phi.py``), Qwen2 (``llava_qwen1_5.py``: transformers' Qwen2Config):
  transformers' own config keys.
* Qwen-1 (``qwen/configuration_qwen.py``, remote code): the keys are passed through in a
  plain ``PretrainedConfig`` with ``model_type`` "qwen".

``language_converter(family)`` takes the family's converter from the registry
(``convert/language_models.FAMILIES``), the same one ``--language-model`` uses.
"""

from __future__ import annotations

from typing import Callable

from megatron_stgc.convert import ConversionError

# MoE-LLaVA's model_type -> the LM family (transformers' model_type), from the model_type
# lines of moellava/model/language_model/llava_*.py
MOE_LLAVA_FAMILIES = {
    "llava_stablelm": "stablelm", "moe_llava_stablelm": "stablelm",
    "llava_phi": "phi", "moe_llava_phi": "phi",
    "llava_qwen": "qwen", "moe_llava_qwen": "qwen",
    "llava_qwen1_5": "qwen2", "moe_llava_qwen1_5": "qwen2",
    "llava_llama": "llama", "moe_llava_llama": "llama", "llava": "llama",
    "llava_mistral": "mistral", "moe_llava_mistral": "mistral",
    "llava_minicpm": "minicpm", "moe_llava_minicpm": "minicpm",
    "llava_mpt": "mpt",
}
# StableLMEpochConfig.__init__ (configuration_stablelm_epoch.py:72-91): key -> (transformers
# StableLmConfig key, MoE-LLaVA's default when config.json lacks it)
STABLELM_EPOCH_KEYS = {
    "vocab_size": ("vocab_size", 50_304),
    "intermediate_size": ("intermediate_size", 6912),
    "hidden_size": ("hidden_size", 2560),
    "num_hidden_layers": ("num_hidden_layers", 32),
    "num_attention_heads": ("num_attention_heads", 32),
    "num_key_value_heads": ("num_key_value_heads", 32),
    "hidden_act": ("hidden_act", "silu"),
    "rope_pct": ("partial_rotary_factor", 0.25),
    "rope_theta": ("rope_theta", 10_000),
    "max_position_embeddings": ("max_position_embeddings", 4096),
    "norm_eps": ("layer_norm_eps", 1.0e-5),
    "use_qkv_bias": ("use_qkv_bias", True),
    "tie_word_embeddings": ("tie_word_embeddings", False),
}
_NOT_CONFIG = ("model_type", "architectures", "auto_map", "transformers_version")


def language_family(lm_config: dict) -> str:
    model_type = lm_config.get("model_type")
    return MOE_LLAVA_FAMILIES.get(model_type, "stablelm" if model_type == "stablelm_epoch"
                                  else model_type)


def hf_language_config(lm_config: dict, family: str):
    """The config object the family's converter reads (see the module docstring)."""
    from megatron_stgc.convert.language_models import FAMILIES

    if family == "stablelm" and ("rope_pct" in lm_config or "norm_eps" in lm_config):
        import transformers

        values = {ours: lm_config.get(theirs, default)
                  for theirs, (ours, default) in STABLELM_EPOCH_KEYS.items()}
        return transformers.StableLmConfig(**values)
    # model_type stays: the Phi converter reads MoE-LLaVA's (its LM head has no bias)
    return FAMILIES[family].config({k: v for k, v in lm_config.items()
                                    if k not in _NOT_CONFIG or k == "model_type"})


def language_converter(family: str) -> tuple[Callable, Callable]:
    """(flags(hf_config) -> dict, convert(hf_state, hf_config, padded_vocab_size) -> state) of
    the family, from the converter registry (convert/language_models.py); a ConversionError
    names the families that convert."""
    from megatron_stgc.convert.language_models import FAMILIES, supported

    if family not in FAMILIES:
        raise ConversionError(f"language model family {family!r} is not converted (this build "
                              f"converts: {supported()})")
    return FAMILIES[family].flags, FAMILIES[family].convert
