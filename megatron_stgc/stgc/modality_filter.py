"""--stgc-modalities: the tokens STGC may judge, by modality (beyond the paper).

The paper applies STGC to every token. With ``text`` or ``image`` only tokens of that
modality are judged: the others are never flagged, get no L_token gradient and are not
counted in L_token's N. The router reads the model's ModalityContext (model/modality.py,
set by the vision-language forward for the tokens in flight) when it starts a record.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_stgc.model.modality import IMAGE, TEXT

CODES = {"text": TEXT, "image": IMAGE}


def chosen_rows(modalities: str, modality_context) -> Optional[torch.Tensor]:
    """[T, 1] bool, True for the tokens of the chosen modality (megatron's [s*b] order);
    None for "all" (every real token, the paper)."""
    if modalities == "all":
        return None
    current = None if modality_context is None else modality_context.current
    if current is None:
        raise RuntimeError(
            f"--stgc-modalities {modalities}: the router has no token modality (a text-only "
            "model, or a forward outside the vision-language model); use --stgc-modalities all"
        )
    return (current == CODES[modalities]).reshape(-1, 1)


def judged_rows(real_rows: Optional[torch.Tensor],
                chosen: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[T, 1] bool: real (not padding) and of a chosen modality; None = every row."""
    if chosen is None:
        return real_rows
    chosen = chosen.to(real_rows.device) if real_rows is not None else chosen
    return chosen if real_rows is None else real_rows & chosen


def attach_modality(model, modality_context) -> int:
    """Give every STGC router of ``model`` the ModalityContext it reads; returns how many."""
    from megatron_stgc.plugin import modules_of_type
    from megatron_stgc.stgc.router import STGCRouter

    routers = list(modules_of_type(model, STGCRouter))
    for router in routers:
        router.modality = modality_context
    return len(routers)
