"""Writing an export: weights as safetensors shards, and an output that appears whole or not at all.

``staged_output(output)`` yields a temporary directory beside ``output``; when the block
ends without an exception (the files written AND the reload check passed) it is renamed to
``output``; on any exception it is removed, so no partial or wrong export is left behind.
``output`` must not exist or be an empty directory (checked first, before any work).

``save_safetensors(state, directory)`` writes ``model.safetensors``, or shards of at most
``max_shard_bytes`` named ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json`` (``weight_map``: key -> file), the layout transformers'
``save_pretrained`` writes and ``from_pretrained`` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch

from megatron_stgc.export.lm_export import ExportError

SHARD_BYTES = 4 * 1024 ** 3


def check_output_free(output: str) -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ExportError(f"--output {output} already exists and is not an empty directory; "
                          "give a new directory")


@contextlib.contextmanager
def staged_output(output: str) -> Iterator[str]:
    """A staging directory that becomes ``output`` when the block succeeds (module docstring)."""
    check_output_free(output)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.",
                               suffix=".partial", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o755)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (check_output_free)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses shared or strided ones)."""
    tensor = tensor.detach().cpu()
    if tensor._base is not None or not tensor.is_contiguous():
        return tensor.clone().contiguous()
    return tensor


def save_safetensors(state: dict[str, torch.Tensor], directory: str,
                     max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write ``state`` (module docstring); returns the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = _owned(state[key])
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + ["model.safetensors.index.json"]
