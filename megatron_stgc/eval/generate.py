"""Greedy answers to eval questions: prompts, images, batched decoding on every rank.

``GreedyDecoder.decode(questions)`` builds each question's prompt (``prompt_builder``, today's
chat template by default: ``data/conversation.prompt_tokens``), loads its image from the
benchmark's image folder, and decodes the batch greedily (``generation.py``: with
megatron-core's KV cache by default, or re-running the whole sequence per token) until EOS, a
stop string, the answer length or --seq-length. A question whose prompt or image cannot be
used gets an error instead of an answer (never dropped). Every rank runs one forward per
step until every rank is done: the MoE layers' all-to-alls need every expert-parallel rank.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_stgc.eval.stop import DEFAULT_STOP_STRINGS, AnswerRows

PROMPT_TOO_LONG = "prompt_too_long"  # the error kind of a prompt that leaves no room to answer
PromptBuilder = Callable[..., list[int]]  # (text, tokenizer, *, has_image, image_token_id,
#                                           num_image_tokens) -> token ids


def default_prompt_builder() -> PromptBuilder:
    from megatron_stgc.data.conversation import prompt_tokens

    return prompt_tokens


class GreedyDecoder:
    """Batched greedy decoding with a MoELLaVAModel/GPTModel on every EP rank."""

    def __init__(self, model, tokenizer, image_loader, image_root: Optional[str],
                 image_token_id: Optional[int], num_image_tokens: int, max_new_tokens: int,
                 max_length: int, pad_to_multiple: int = 1,
                 allow_image_outside_root: bool = False, kv_cache: bool = False,
                 prompt_builder: Optional[PromptBuilder] = None,
                 stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS):
        self.model = model
        self.tokenizer = tokenizer
        self.image_loader = image_loader
        self.image_root = image_root
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length  # --seq-length: prompt + answer never exceed it
        # FP8 (Transformer Engine) needs token counts that are multiples of 8/16; padding at
        # the end of a causal sequence does not change the logits of the positions before it
        self.pad_to_multiple = pad_to_multiple
        self.allow_image_outside_root = allow_image_outside_root
        self.kv_cache = kv_cache
        self.prompt_builder = prompt_builder or default_prompt_builder()
        self.stop_strings = tuple(stop_strings)

    def prompt(self, question: dict) -> list[int]:
        return self.prompt_builder(question["text"], self.tokenizer,
                                   has_image=question.get("image") is not None,
                                   image_token_id=self.image_token_id
                                   if self.image_token_id is not None else -1,
                                   num_image_tokens=self.num_image_tokens)

    def images(self, questions: list[dict],
               skip: dict[int, str]) -> tuple[Optional[torch.Tensor], dict[int, str]]:
        """[n_img, 3, H, W] for the questions with an image (rows in ``skip`` left out);
        {row: error} for unreadable ones. The tensor holds the good images in row order."""
        from megatron_stgc.data.record_checks import ImagePathRefused, resolve_image_path

        rows = [i for i, q in enumerate(questions) if q.get("image") is not None and i not in skip]
        if not rows or self.image_loader is None:
            return None, {}
        refused, paths, kept = {}, [], []
        for row in rows:
            try:
                paths.append(resolve_image_path(questions[row]["image"], self.image_root,
                                                self.allow_image_outside_root))
                kept.append(row)
            except ImagePathRefused as error:
                refused[row] = f"{error.kind}: {error}"
        if not kept:
            return None, refused
        images, failures = self.image_loader.load(paths)
        refused.update({kept[i]: f"{error.kind}: {paths[i]}" for i, error in failures})
        return images, refused

    def _prompts(self, questions: list[dict]) -> tuple[dict[int, list[int]], dict[int, str]]:
        """({row: prompt ids}, {row: error}): an error where the prompt cannot be built or
        does not fit --seq-length."""
        from megatron_stgc.data.conversation import BadConversation

        from megatron_stgc.data.llava_index import BAD_IMAGE_FIELD
        from megatron_stgc.data.record_checks import text_problem

        prompts, errors = {}, {}
        for row, question in enumerate(questions):
            image = question.get("image")
            problem = text_problem({"text": question.get("text"), "image": image})
            if problem is None and image is not None and (not isinstance(image, str) or not image):
                problem = BAD_IMAGE_FIELD
            if problem is None and not isinstance(question.get("text"), str):
                problem = "bad_question_text"
            if problem is not None:
                errors[row] = f"{problem}: the question cannot be used"
                continue
            try:
                prompt = self.prompt(question)
            except BadConversation as error:
                errors[row] = f"{error.kind}: {error}"
                continue
            if len(prompt) >= self.max_length:
                errors[row] = (f"{PROMPT_TOO_LONG}: prompt of {len(prompt)} tokens does not "
                               f"fit --seq-length {self.max_length}")
            else:
                prompts[row] = prompt
        return prompts, errors

    @torch.no_grad()
    def decode(self, questions: list[dict]) -> list[dict]:
        """Answers for ``questions`` ({"text"} or {"text": "", "error"}); may be empty (the
        rank still runs forwards while other ranks decode)."""
        prompts, failed = self._prompts(questions)
        images, unreadable = self.images(questions, skip=failed)
        failed.update(unreadable)
        keep = [i for i in range(len(questions)) if i not in failed]
        rows = AnswerRows([prompts[i] for i in keep], self.tokenizer, self.max_new_tokens,
                          self.max_length, self.stop_strings)
        generation = self._generation(rows, images)
        while True:
            generation.step()
            if _all_ranks_done(generation.done):
                break
        answers = {index: {"text": rows.answer(row)} for row, index in enumerate(keep)}
        for index, error in failed.items():
            answers[index] = {"text": "", "error": error}
        return [answers[i] for i in range(len(questions))]

    def _generation(self, rows: AnswerRows, images):
        from megatron_stgc.eval.generation import CachedGeneration, FullGeneration
        from megatron_stgc.eval.model_inputs import ModelInputs

        inputs = ModelInputs(self.model, self.image_token_id)
        if self.kv_cache and rows.prompts:
            return CachedGeneration(inputs, rows, images, self.tokenizer.pad_id)
        return FullGeneration(self.model, inputs, rows, images, self.tokenizer.pad_id,
                              self.pad_to_multiple)


def _all_ranks_done(local_done: bool) -> bool:
    from megatron_stgc.parallel import collective_device

    flag = torch.tensor([0 if local_done else 1], dtype=torch.long, device=collective_device())
    dist.all_reduce(flag)
    return int(flag) == 0
