"""One LLaVA conversation -> token ids + loss mask, with ``<image>`` expanded.

Template (the same chat template as the text-only default, see
``instruct_text.format_prompt``)::

    <|user|> {human turn}\\n<|assistant|> {gpt turn}</s><|user|> {human turn}\\n<|assistant|> ...

Loss mask 1 on the assistant's tokens and the EOS after each assistant turn,
0 on everything else (template, user turns, image tokens, padding).

``<image>`` in a user turn becomes ``num_image_tokens`` copies of
``image_token_id`` (one id reserved past the tokenizer's vocabulary), so the
model can put one vision embedding at each of those positions and the
modality of every position is known from the ids alone. A sample with an image
but no ``<image>`` tag gets ``<image>\\n`` in front of its first user turn (as
LLaVA does). Problems that make a sample unusable raise ``BadConversation``
with a kind the data set counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_stgc.data.instruct_text import format_prompt

IMAGE_TAG = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")  # the same roles llava_index accepts

# Kinds of samples found unusable while tokenizing (BadSampleCounter keys).
IMAGE_TAG_WITHOUT_IMAGE = "image_tag_without_image"
TOO_MANY_IMAGE_TAGS = "too_many_image_tags"  # more than one <image> (one image per sample)
UNKNOWN_ROLE = "unknown_role"
NO_USER_TURN = "no_user_turn"  # an image but no human turn to put it in
IMAGE_TAG_IN_ANSWER = "image_tag_in_answer"  # <image> inside an assistant turn
IMAGE_TRUNCATED = "image_truncated"  # the image tokens would not fit in --seq-length
NO_ANSWER_AFTER_TRUNCATION = "no_answer_after_truncation"


class BadConversation(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class TokenizedConversation:
    tokens: np.ndarray  # int64 [length]; length <= max_length
    loss_mask: np.ndarray  # int64 [length]; 1 on assistant tokens + their EOS
    truncated: bool


def _encode_user_turn(text: str, tokenizer, image_token_id: int,
                      num_image_tokens: int) -> list[int]:
    """Template + user text, with the (at most one) <image> tag expanded."""
    prompt = format_prompt(text)
    before, tag, after = prompt.partition(IMAGE_TAG)
    ids = tokenizer.encode(before.rstrip(" ")) if before.strip() else []
    if tag:
        ids += [image_token_id] * num_image_tokens
        ids += tokenizer.encode(after.lstrip("\n")) if after.strip() else []
    return ids


def _turns_with_image_tag(turns: list[dict], has_image: bool) -> list[dict]:
    """Check the <image> tags against the sample's image; add the tag LLaVA-style if absent."""
    if any(IMAGE_TAG in t["value"] for t in turns if t["from"] in ASSISTANT_ROLES):
        raise BadConversation(IMAGE_TAG_IN_ANSWER, f"{IMAGE_TAG} inside an assistant turn")
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in turns)
    if tags > 1:
        raise BadConversation(TOO_MANY_IMAGE_TAGS, f"{tags} {IMAGE_TAG} tags; one image per sample")
    if tags == 1 and not has_image:
        raise BadConversation(IMAGE_TAG_WITHOUT_IMAGE, f"{IMAGE_TAG} tag but no image")
    if tags == 0 and has_image:
        first_user = next((i for i, t in enumerate(turns) if t["from"] in USER_ROLES), None)
        if first_user is None:
            raise BadConversation(NO_USER_TURN, "an image but no human turn")
        turns = list(turns)
        turns[first_user] = {**turns[first_user],
                             "value": f"{IMAGE_TAG}\n" + turns[first_user]["value"]}
    return turns


turns_with_image_tag = _turns_with_image_tag  # the checks every chat template shares


def tokenize_conversation(turns: list[dict], tokenizer, *, has_image: bool, image_token_id: int,
                          num_image_tokens: int, max_length: int) -> TokenizedConversation:
    """Token ids and loss mask of one conversation, cut to ``max_length`` tokens.

    turns: LLaVA ``conversations`` list ({"from": human|gpt, "value": str}).
    Truncation keeps the beginning; it may not cut into the image tokens
    (IMAGE_TRUNCATED: every image token must lie in the first ``max_length - 1``
    ids, the model's input; the last id is only a label) and must leave at
    least one assistant token (NO_ANSWER_AFTER_TRUNCATION).
    """
    ids: list[int] = []
    mask: list[int] = []
    for turn in _turns_with_image_tag(turns, has_image):
        role, text = turn["from"], turn["value"]
        if role in USER_ROLES:
            piece = _encode_user_turn(text, tokenizer, image_token_id, num_image_tokens)
            ids += piece
            mask += [0] * len(piece)
        elif role in ASSISTANT_ROLES:
            piece = tokenizer.encode(text.strip()) + [tokenizer.eos_id]
            ids += piece
            mask += [1] * len(piece)
        else:
            raise BadConversation(UNKNOWN_ROLE, f"turn from {role!r}; expected human or gpt")
    return truncate_conversation(ids, mask, image_token_id, max_length)


def truncate_conversation(ids: list[int], mask: list[int], image_token_id: int,
                          max_length: int) -> TokenizedConversation:
    """The conversation cut to ``max_length`` ids (the rules of tokenize_conversation; every
    chat template shares them)."""
    truncated = len(ids) > max_length
    if truncated:
        if image_token_id in ids[max_length - 1:]:
            raise BadConversation(IMAGE_TRUNCATED, f"{len(ids)} tokens; the image tokens do not "
                                  f"fit in {max_length} (raise --seq-length)")
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            raise BadConversation(NO_ANSWER_AFTER_TRUNCATION,
                                  f"no assistant token within the first {max_length} tokens")
    return TokenizedConversation(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64),
                                 truncated)


def prompt_tokens(question: str, tokenizer, *, has_image: bool, image_token_id: int,
                  num_image_tokens: int) -> list[int]:
    """Token ids of a one-question prompt ending with the assistant tag (for generation)."""
    turns = _turns_with_image_tag([{"from": "human", "value": question}], has_image)
    return _encode_user_turn(turns[0]["value"], tokenizer, image_token_id, num_image_tokens)
