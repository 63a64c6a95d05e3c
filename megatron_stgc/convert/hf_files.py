"""Read a Hugging Face model directory without building the model (no remote code runs).

``read_config_json(dir)``: config.json as a dict. ``read_weights(dir)``: every tensor of
the safetensors or PyTorch-pickle weights, single file or sharded with an index, as a
``WeightFiles`` dict that also remembers which file each key came from, so a converter's
error can name the file and the key. Everything is checked before a tensor is read: a
shard the index names that is not there, an index key its shard does not hold.

Formats (what ``save_pretrained`` writes, newest first):
``model.safetensors.index.json`` + shards, ``model.safetensors``,
``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import torch

from megatron_stgc.convert import ConversionError

WEIGHT_FORMATS = (  # (index file, single file), in the order they are looked for
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class WeightFiles(dict):
    """{key: tensor}; ``files[key]`` is the file the tensor came from."""

    def __init__(self, tensors: dict[str, torch.Tensor], files: dict[str, str]):
        super().__init__(tensors)
        self.files = files


def source_of(state_dict: dict, key: str) -> str:
    """' (in FILE)' when the state dict knows where ``key`` came from, else ''."""
    files = getattr(state_dict, "files", {})
    return f" (in {files[key]})" if key in files else ""


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist: expected a Hugging Face model directory "
                              "(save_pretrained output)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


def _shards(directory: str) -> dict[str, list[str]]:
    """{shard path: keys the index puts there}, or {single file: []} (keys: all of it)."""
    for index_name, single_name in WEIGHT_FORMATS:
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConversionError(f"{index}: no readable weight_map ({error!r})") from None
            shards: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                shards.setdefault(os.path.join(directory, shard), []).append(key)
            for shard, keys in shards.items():
                if not os.path.isfile(shard):
                    raise ConversionError(f"{shard} is missing: {index} puts {len(keys)} tensors "
                                          f"there (first: {keys[0]!r})")
            return shards
        single = os.path.join(directory, single_name)
        if os.path.isfile(single):
            return {single: []}
    names = ", ".join(name for pair in WEIGHT_FORMATS for name in pair)
    raise ConversionError(f"{directory}: no weights found (looked for {names})")


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def read_weights(directory: str, log: Callable[[str], None] = print) -> WeightFiles:
    """Every tensor of ``directory``'s weights; shards the index names must all exist and
    hold the keys it assigns them."""
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    for path, expected in _shards(directory).items():
        log(f"reading {path}")
        part = _read_file(path)
        missing = [key for key in expected if key not in part]
        if missing:
            raise ConversionError(f"{path}: the index puts {missing[0]!r} here but the file "
                                  f"does not hold it ({len(missing)} keys missing)")
        tensors.update(part)
        files.update({key: path for key in part})
    return WeightFiles(tensors, files)
