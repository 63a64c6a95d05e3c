"""A Hugging Face ``save_pretrained`` directory read without transformers: config + weight files.

The LLaVA-format checkpoints MoE-LLaVA publishes (``LanguageBind/MoE-LLaVA-*``) have model
classes that transformers does not know (``llava_stablelm``, ``moe_llava_phi``, ...; their
code is in MoE-LLaVA's ``moellava/model/language_model/``), so they are read as files:

* ``config.json`` -> a dict;
* the weights: ``model.safetensors`` or ``pytorch_model.bin``, or shards listed by
  ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` (``weight_map``: key ->
  shard file), the layouts transformers' ``save_pretrained`` writes.

Every key remembers the file it came from, so an error can name both. A shard the index
names but the directory lacks is an error before anything is read.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch

from megatron_stgc.convert import ConversionError

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointDir:
    """config.json and the key -> file map of one directory; tensors are read on ``load``."""

    def __init__(self, directory: str, what: str):
        self.directory = directory
        self.what = what  # "--llava-checkpoint", "--vision-model", ...
        self.config = read_config(directory, what)
        self.file_of = _weight_map(directory, what)  # key -> file name in the directory

    def path(self, key: str) -> str:
        """The file that holds ``key`` (for error messages)."""
        return os.path.join(self.directory, self.file_of[key])

    def keys(self) -> list[str]:
        return list(self.file_of)

    def load(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """{key: tensor} for ``keys`` (default: all), each shard opened once."""
        wanted = set(self.file_of if keys is None else keys)
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            by_file.setdefault(self.file_of[key], []).append(key)
        state: dict[str, torch.Tensor] = {}
        for name, file_keys in sorted(by_file.items()):
            tensors = _read_file(os.path.join(self.directory, name), self.what)
            for key in file_keys:
                if key not in tensors:
                    raise ConversionError(f"{self.what}: {os.path.join(self.directory, name)} "
                                          f"lacks {key!r}, which the index places there")
                state[key] = tensors[key]
        return state


def read_config(directory: str, what: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{what}: {path} does not exist (a save_pretrained directory "
                              "holds config.json and its weight files)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{what}: {path} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{what}: {path} does not hold a JSON object")
    return config


def _weight_map(directory: str, what: str) -> dict[str, str]:
    """key -> file name, from an index or from the one weight file."""
    for index_name in INDEX_FILES:
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            return _indexed_map(directory, index_path, what)
    for name in SINGLE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return {key: name for key in _file_keys(path, what)}
    raise ConversionError(f"{what}: {directory} holds no weights (none of "
                          f"{', '.join(SINGLE_FILES + INDEX_FILES)})")


def _indexed_map(directory: str, index_path: str, what: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{what}: {index_path} is not a weight index "
                              f"(a JSON object with 'weight_map'): {error!r}") from None
    keys_of: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        keys_of.setdefault(name, []).append(key)
    missing = sorted(name for name in keys_of if not os.path.isfile(os.path.join(directory, name)))
    if missing:
        first = keys_of[missing[0]]
        raise ConversionError(
            f"{what}: {index_path} names shard {missing[0]!r} (holding {first[0]!r} and "
            f"{len(first) - 1} more keys), which is missing from {directory}"
            + (f"; also missing: {missing[1:]}" if len(missing) > 1 else ""))
    return dict(weight_map)


def _file_keys(path: str, what: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except Exception as error:  # safetensors raises its own error types
            raise ConversionError(f"{what}: {path} is not a readable safetensors file: "
                                  f"{error}") from None
    return list(_read_file(path, what))


def _read_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """All tensors of one weight file (safetensors, or a torch-saved state dict)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # corrupt or truncated file: name it
        raise ConversionError(f"{what}: cannot read {path}: {error}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{what}: {path} does not hold a state dict")
    return state
