"""--trainable-modules: which parameters train, by group, by name pattern, or by preset.

The value is a list of entries separated by commas or spaces; each entry is

* a preset: ``moe-llava-stage3`` (see PRESETS);
* a group of ``model/param_groups.py``: ``vision``, ``projector``, ``embeddings``,
  ``attention``, ``norms``, ``dense-ffn``, ``experts``, ``routers``;
* a pattern over our parameter names (``model.named_parameters()``, e.g.
  ``language_model.decoder.layers.*.mlp.linear_fc1.*``): with a wildcard (``* ? [``) an
  ``fnmatch`` of the whole name, without one a substring of the name (MoE-LLaVA's rule:
  ``any(name in n for name in train_modules)``, moellava/model/language_model/
  llava_stablelm_moe.py:446-451).

The parameters the entries select train; every other parameter is frozen. An entry that
selects nothing is an error naming it.

MoE-LLaVA's stage III, read in its source (scripts/v1/{stablelm,phi2,qwen}/finetune_moe.sh,
moellava/train/train.py): ``--train_modules gate_proj up_proj down_proj wg`` (Phi-2:
``fc1 fc2 wg``; Qwen: ``mlp.w1 mlp.w2 mlp.c_proj wg``) are matched as substrings when
``initialize_moe_modules`` runs (train.py:1360), i.e. before the MoE layers exist: every FFN,
dense layers included, keeps training and the experts, deep copies of those FFNs, inherit it;
the routers (``wg``) are new modules and train. The vision tower is built with
``delay_load`` at that point (no parameters yet, so Phi-2's ``fc1``/``fc2`` cannot match its
MLPs) and is loaded frozen afterwards (multimodal_encoder/clip_encoder.py, ``load_model``:
``requires_grad_(False)``). The projector is frozen by the substring rule but trains again:
``initialize_vision_modules`` (train.py:1463) finds the stage-II projector and sets
``requires_grad = True`` on it (moellava/model/llava_arch.py:123-126, "In case it is frozen by
LoRA"). Attention, norms, embeddings and the LM head stay frozen. So the preset
``moe-llava-stage3`` is dense-ffn + experts + routers + projector; ``dense-ffn,experts,routers``
is the same without the projector.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from megatron_stgc.model.param_groups import GROUPS, parameter_group

PRESETS = {
    "moe-llava-stage3": ("dense-ffn", "experts", "routers", "projector"),
}
SELECTABLE_GROUPS = tuple(g for g in GROUPS if g != "other")


class TrainableSelectionError(ValueError):
    """--trainable-modules names something that selects no parameter (or nothing trains)."""


@dataclass(frozen=True)
class Entry:
    """One --trainable-modules entry; ``from_preset`` names the preset it came from."""

    text: str
    kind: str  # "group" | "glob" | "substring"
    from_preset: str | None = None

    def matches(self, name: str) -> bool:
        if self.kind == "group":
            return parameter_group(name) == self.text
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.text)
        return self.text in name

    def describe(self) -> str:
        origin = f" (from preset {self.from_preset})" if self.from_preset else ""
        return f"{self.kind} {self.text!r}{origin}"


def _entry(text: str, preset: str | None = None) -> Entry:
    if text in SELECTABLE_GROUPS:
        return Entry(text, "group", preset)
    if any(c in text for c in "*?["):
        return Entry(text, "glob", preset)
    return Entry(text, "substring", preset)


def parse_trainable_modules(value: str) -> list[Entry]:
    """The entries of a --trainable-modules value, presets expanded."""
    words = [w for w in re.split(r"[,\s]+", value.strip()) if w]
    if not words:
        raise TrainableSelectionError("--trainable-modules is empty; give a preset "
                                      f"({', '.join(PRESETS)}), groups or name patterns")
    entries: list[Entry] = []
    for word in words:
        if word in PRESETS:
            entries += [_entry(group, preset=word) for group in PRESETS[word]]
        else:
            entries.append(_entry(word))
    return entries


def selected_parameter_names(model: torch.nn.Module, entries: list[Entry]) -> dict[Entry, set[str]]:
    """{entry: names of the parameters it selects}."""
    names = [name for name, _ in model.named_parameters()]
    return {entry: {n for n in names if entry.matches(n)} for entry in entries}
