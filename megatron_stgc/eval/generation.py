"""Greedy decoding of one batch, one forward per step, with or without a KV cache.

Both classes advance by ``step()``: exactly one model forward per call on every rank (a rank
whose rows are all done runs ``ModelInputs.idle_forward``), so expert-parallel ranks, which
must forward together, stay in step; the caller stops when every rank is done.

* ``FullGeneration`` (no cache): every step runs the whole sequence of every row, right-padded
  (padding after the end of a causal sequence changes no earlier logit), and takes each row's
  logits at its last position. ``pad_to_multiple`` pads the width (FP8 GEMMs).
* ``CachedGeneration``: megatron-core's ``StaticInferenceContext`` (its attention keeps each
  layer's keys and values; ``GPTModel.forward(inference_context=...)``). The prompts are
  left-aligned; the first step (prefill) runs positions [0, shortest prompt), then one
  position per step for all rows together, as megatron's static-batching controller does:
  a row still inside its prompt is fed its prompt token and its prediction is ignored, a row
  past it takes the greedy token. The prompt's embeddings (image embeddings included) are
  computed once, so image positions can fall in any step.

Equal answers with and without the cache need each row to be independent of the others:
true for megatron's dropless MoE (no --moe-expert-capacity-factor); LTDR's tail threshold is
the mean over the image tokens of each forward, so it matches when every image token lies in
the shortest prompt (docs/EVAL.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_stgc.eval.model_inputs import ModelInputs
from megatron_stgc.eval.stop import AnswerRows


class FullGeneration:
    """Greedy decoding that re-runs every sequence at each step (no KV cache)."""

    def __init__(self, model: torch.nn.Module, inputs: ModelInputs, rows: AnswerRows,
                 images: Optional[torch.Tensor], pad_id: int, pad_to_multiple: int = 1):
        self.model, self.inputs, self.rows = model, inputs, rows
        self.images, self.pad_id, self.pad_to_multiple = images, pad_id, pad_to_multiple

    @property
    def done(self) -> bool:
        return self.rows.all_done()

    def step(self) -> None:
        if self.done:
            self.inputs.idle_forward(self.pad_id)
            return
        sequences = [p + g for p, g in zip(self.rows.prompts, self.rows.generated)]
        next_tokens = self._last_logits(sequences).argmax(dim=-1).tolist()
        for row, token in enumerate(next_tokens):
            self.rows.take(row, token)

    def _last_logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Logits at every row's last position: [b, vocab]."""
        width = math.ceil(max(len(s) for s in sequences) / self.pad_to_multiple)
        width *= self.pad_to_multiple
        tokens = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
        # padding past --seq-length reuses the last position id (it is never attended to)
        positions = torch.arange(width).clamp(max=self.rows.max_length - 1)
        positions = positions.unsqueeze(0).expand(len(sequences), -1)
        device = self.inputs.device
        extras = {} if not self.inputs.vision_language else {
            "images": None if self.images is None else self.images.to(device)}
        logits = self.model(tokens.to(device), positions.to(device), None, **extras)  # [b, s, V]
        last = torch.tensor([len(s) - 1 for s in sequences])
        return logits[torch.arange(len(sequences)), last, :self.rows.vocab_size].float()


class CachedGeneration:
    """Greedy decoding with megatron-core's static KV cache (one new position per step)."""

    def __init__(self, inputs: ModelInputs, rows: AnswerRows, images: Optional[torch.Tensor],
                 pad_id: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.inputs, self.rows, self.pad_id = inputs, rows, pad_id
        lengths = [len(p) for p in rows.prompts]
        self.total = min(rows.max_length, max(lengths) + rows.max_new_tokens)
        self.position = 0  # positions already in the cache
        self.start = min(lengths)
        batch = len(lengths)
        tokens = torch.full((batch, max(lengths)), pad_id, dtype=torch.long)
        for row, prompt in enumerate(rows.prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt)
        self.prompt_lengths = torch.tensor(lengths)  # [b]
        self.prompt_tokens = tokens.to(inputs.device)  # [b, L]
        positions = torch.arange(tokens.shape[1], device=inputs.device).expand(batch, -1)
        with torch.no_grad():
            self.prompt_embeddings = inputs.prompt_embeddings(
                self.prompt_tokens, positions,
                None if images is None else images.to(inputs.device))  # [L, b, h]
        self.context = StaticInferenceContext(batch, self.total)

    @property
    def done(self) -> bool:
        return self.rows.all_done()

    def step(self) -> None:
        if self.done:
            self.inputs.idle_forward(self.pad_id)
            return
        if self.position == 0:  # prefill: positions [0, shortest prompt)
            tokens, embeddings = self.prompt_tokens[:, :self.start], \
                self.prompt_embeddings[:self.start]
        else:
            tokens, embeddings = self._step_inputs(self.position)
        logits = self._forward(tokens, embeddings)  # [b, 1 or s, V]: the last one predicts
        self.context.increment_sequence_len_offset(tokens.shape[1])
        self.position += tokens.shape[1]  # = the index of the token just predicted
        self._take(logits[:, -1, :self.rows.vocab_size].float().argmax(dim=-1).tolist())

    def _forward(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        begin = self.position
        positions = torch.arange(begin, begin + tokens.shape[1], device=tokens.device)
        positions = positions.expand(tokens.shape[0], -1)
        return self.inputs.logits(tokens, positions, embeddings, self.context)

    def _step_inputs(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [b, 1] and embeddings [1, b, h] of ``position``: prompt tokens (with their
        precomputed embeddings) where a row is still in its prompt, else its last token."""
        tokens = []
        for row, prompt in enumerate(self.rows.prompts):
            if position < len(prompt):
                tokens.append(prompt[position])
            else:
                generated = self.rows.generated[row]
                offset = position - len(prompt)
                tokens.append(generated[offset] if offset < len(generated) else self.pad_id)
        step = torch.tensor(tokens, dtype=torch.long, device=self.inputs.device).unsqueeze(1)
        positions = torch.full_like(step, position)
        fresh = self.inputs.word_embeddings(step, positions)  # [1, b, h]
        inside = (self.prompt_lengths > position).to(self.inputs.device)  # [b]
        if position < self.prompt_embeddings.shape[0]:
            fresh = torch.where(inside[None, :, None], self.prompt_embeddings[position:position + 1],
                                fresh)
        return step, fresh

    def _take(self, predicted: list[int]) -> None:
        """The greedy token of every row whose prompt ends before the next position."""
        for row, token in enumerate(predicted):
            if len(self.rows.prompts[row]) <= self.position:
                self.rows.take(row, token)
        if self.position >= self.total:  # the cache is full: no row can go on
            for row in range(len(self.rows.done)):
                self.rows.done[row] = True
