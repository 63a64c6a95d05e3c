"""Find a model's LTDR routers and hand them the model's token modality."""

from __future__ import annotations

from typing import Iterator

from megatron_stgc.ltdr.router import LTDRRouter
from megatron_stgc.plugin import modules_of_type


def ltdr_routers(model) -> Iterator[LTDRRouter]:
    """Every LTDRRouter in a module or a list of model chunks."""
    return modules_of_type(model, LTDRRouter)


def attach_modality(model, modality_context) -> int:
    """Give every LTDR router of ``model`` the ModalityContext it reads; returns how many."""
    routers = list(ltdr_routers(model))
    for router in routers:
        router.modality = modality_context
    return len(routers)
