"""Token modality (padding / text / image) carried from the batch to the MoE routers.

The data set marks every position of a sample (``modality`` [b, s]); the VLM
forward hands the mask to ``ModalityContext.set`` before the language model
runs; router hooks read ``current`` to count tokens per expert per modality.
The routers see tokens in megatron's [s, b] order flattened, so the context
stores the mask in that order.
"""

from __future__ import annotations

from typing import Optional

import torch

PAD, TEXT, IMAGE = 0, 1, 2
MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}


def modality_of(tokens: torch.Tensor, image_token_id: int, num_real: torch.Tensor) -> torch.Tensor:
    """int64 [b, s]: IMAGE at image-token positions, TEXT up to each row's length, else PAD.

    tokens: [b, s]; num_real: [b] number of non-padding positions per row.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    modality = torch.where(positions < num_real.unsqueeze(1), TEXT, PAD)
    return torch.where(tokens == image_token_id, IMAGE, modality).to(torch.long)


class ModalityContext:
    """The modality of the tokens the language model is processing right now."""

    def __init__(self):
        self.current: Optional[torch.Tensor] = None  # int64 [s * b], megatron token order
        self._has_image: Optional[bool] = None

    def set(self, modality_bs: Optional[torch.Tensor]) -> None:
        """modality_bs: [b, s] (None: unknown, e.g. a text-only model)."""
        self.current = None if modality_bs is None else modality_bs.t().reshape(-1)
        self._has_image = None

    def has_image(self) -> bool:
        """Whether any current token is an image token (one host sync per ``set``, cached)."""
        if self._has_image is None:
            self._has_image = self.current is not None and bool((self.current == IMAGE).any())
        return self._has_image
