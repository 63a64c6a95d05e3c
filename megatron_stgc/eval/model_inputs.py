"""How generation feeds a model: embeddings, the language model's forward, the token modality.

For a ``MoELLaVAModel`` the prompt's embeddings come from its ``combined_embeddings`` (word
embeddings with the image embeddings scattered onto the image positions) and are handed to
its megatron-core ``GPTModel`` as ``decoder_input``, with megatron's ``inference_context``
(the KV cache) passed through ``GPTModel.forward``. This mirrors ``MoELLaVAModel.forward``
(model/llava.py): the same parts, and the LTDR routers get the token modality the same way;
``MoELLaVAModel.forward`` has no ``inference_context`` argument, which is why the parts are
called here. A text-only ``GPTModel`` is its own language model.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_stgc.model.modality import modality_of


class ModelInputs:
    """The pieces of one model that a decoding step needs."""

    def __init__(self, model: torch.nn.Module, image_token_id: Optional[int]):
        self.model = model
        self.image_token_id = image_token_id
        self.vision_language = hasattr(model, "combined_embeddings")
        self.language_model = model.language_model if self.vision_language else model
        self.device = next(model.parameters()).device

    def prompt_embeddings(self, tokens: torch.Tensor, positions: torch.Tensor,
                          images: Optional[torch.Tensor]) -> torch.Tensor:
        """[s, b, h] for prompts [b, s] (image embeddings on the image positions)."""
        if self.vision_language:
            return self.model.combined_embeddings(tokens, positions, images)
        return self.language_model.embedding(input_ids=tokens, position_ids=positions)

    def word_embeddings(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[s, b, h] word (+ position) embeddings of generated tokens [b, s]."""
        return self.language_model.embedding(input_ids=tokens, position_ids=positions)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, embeddings: torch.Tensor,
               inference_context=None) -> torch.Tensor:
        """[b, s', vocab] (s' = 1 or s with a KV cache: megatron keeps the last position)."""
        modality = None
        if self.vision_language and self.model.ltdr_routers:
            modality = modality_of(tokens, self.image_token_id,
                                   torch.full_like(tokens[:, 0], tokens.shape[1]))
        if self.vision_language:
            self.model.modality.set(modality)
        try:
            return self.language_model(tokens, positions, None, decoder_input=embeddings,
                                       inference_context=inference_context,
                                       runtime_gather_output=True)
        finally:
            if self.vision_language:
                self.model.modality.set(None)

    def idle_forward(self, pad_id: int) -> None:
        """One forward of a single padding token: a rank whose answers are complete still
        joins the expert-parallel all-to-alls of the ranks still decoding."""
        tokens = torch.full((1, 1), pad_id, dtype=torch.long, device=self.device)
        positions = torch.zeros_like(tokens)
        self.logits(tokens, positions, self.word_embeddings(tokens, positions))
