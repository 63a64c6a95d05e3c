"""--chat-template: how a LLaVA conversation becomes text, token ids and the loss mask.

* ``plain``: this package's template (``<|user|> ... <|assistant|> ...</s>``, one piece per
  turn; data/conversation.py). The default: existing runs and the digits toy are unchanged.
* ``moe-llava-stablelm``, ``moe-llava-phi``, ``moe-llava-qwen``: MoE-LLaVA's ``conv_stablelm``
  and ``conv_phi`` (moellava/conversation.py:300-323; its ``"qwen"`` version is ``conv_phi``,
  line 432: there is no conv_qwen). Separator style TWO (lines 51-59)::

      {system} USER: {human 1} ASSISTANT: {gpt 1}<|endoftext|>USER: {human 2} ASSISTANT: ...

  Tokenized as one string with ``<image>`` split out (``tokenizer_image_token``,
  moellava/mm_utils.py:43-62), and masked by train.py's ``preprocess_phi`` (lines 565-657,
  used for stablelm, phi and qwen, lines 864-869): the text is split into rounds at
  ``<|endoftext|>``; each round's ``... ASSISTANT: `` prefix is masked with
  ``len(tokens(prefix)) - 1`` tokens (the prefix's trailing-space token merges into the
  answer's first token in the full string), the answer and the round's ``<|endoftext|>``
  (``len(tokens(round)) + 1``) are targets. A conversation whose rounds do not add up to its
  length gets no target in MoE-LLaVA (a printed warning, lines 643-651); here it is a bad
  sample of kind ``template_mismatch`` (counted, replaced). Turns must alternate human / gpt
  after a leading non-human turn is dropped (lines 584-592, an assertion there): else kind
  ``template_turns``.
* ``moe-llava-plain``: MoE-LLaVA's stage I (``conv_llava_plain``, conversation.py:363-370,
  ``preprocess_plain``, train.py:825-848): ``<image>`` + answer + ``"\\n"``, the human text
  dropped, targets on answer and newline (no EOS). Exactly one human turn and one answer.

Generation: ``template.prompt(question)`` is the text MoE-LLaVA's eval builds
(moellava/eval/model_vqa_loader.py:42-51: ``<image>\\n`` + question as the human turn, then the
assistant role with no message: ``... USER: <image>\\n{q} ASSISTANT:``);
``template.prompt_tokens(...)`` its ids, ``template.stop_strings`` where an answer ends
(``conv.sep2`` for style TWO, model_vqa_loader.py:108).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_stgc.data import conversation as plain
from megatron_stgc.data.instruct_text import USER_TAG
from megatron_stgc.data.conversation import (ASSISTANT_ROLES, IMAGE_TAG, USER_ROLES,
                                             BadConversation, TokenizedConversation,
                                             truncate_conversation, turns_with_image_tag)

TEMPLATE_MISMATCH = "template_mismatch"  # MoE-LLaVA's "tokenization mismatch" (no targets)
TEMPLATE_TURNS = "template_turns"  # turns the template cannot lay out

MOE_LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's "
                    "questions.")


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation template; ``style`` is "plain" (this package's), "two" (MoE-LLaVA's
    separator style TWO) or "moe-llava-plain" (its stage I)."""

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    sep2: str = ""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an answer (besides the tokenizer's EOS id): MoE-LLaVA's separator, or
        the plain template's next user tag (a model that skips EOS starts that turn)."""
        if self.style == "two":
            return (self.sep2,)
        return (USER_TAG,) if self.style == "plain" else ()

    def prompt(self, question: str, has_image: bool = True) -> str:
        """The generation prompt's text: human turn + assistant prefix."""
        if self.style == "plain":
            turns = turns_with_image_tag([{"from": "human", "value": question}], has_image)
            return plain.format_prompt(turns[0]["value"])
        if has_image and IMAGE_TAG not in question:
            question = f"{IMAGE_TAG}\n{question}"
        if self.style == "moe-llava-plain":
            return IMAGE_TAG
        return f"{self.system}{self.sep}{self.roles[0]}: {question}{self.sep}{self.roles[1]}:"

    def prompt_tokens(self, question: str, tokenizer, *, has_image: bool, image_token_id: int,
                      num_image_tokens: int) -> list[int]:
        """Token ids of ``prompt(question)`` with the image expanded."""
        if self.style == "plain":
            return plain.prompt_tokens(question, tokenizer, has_image=has_image,
                                       image_token_id=image_token_id,
                                       num_image_tokens=num_image_tokens)
        return _image_split_ids(self.prompt(question, has_image), tokenizer, image_token_id,
                                num_image_tokens)

    def tokenize(self, turns: list[dict], tokenizer, *, has_image: bool, image_token_id: int,
                 num_image_tokens: int, max_length: int) -> TokenizedConversation:
        """Token ids and loss mask of one conversation, cut to ``max_length`` tokens."""
        if self.style == "plain":
            return plain.tokenize_conversation(turns, tokenizer, has_image=has_image,
                                               image_token_id=image_token_id,
                                               num_image_tokens=num_image_tokens,
                                               max_length=max_length)
        turns = turns_with_image_tag(turns, has_image)
        lengths = _Lengths(tokenizer, image_token_id, num_image_tokens)
        if self.style == "moe-llava-plain":
            ids, mask = self._plain_stage1(turns, lengths)
        else:
            ids, mask = self._style_two(turns, lengths)
        return truncate_conversation(ids, mask, image_token_id, max_length)

    # -- MoE-LLaVA's separator style TWO ---------------------------------------------

    def text_of(self, turns: list[dict]) -> str:
        """conv.get_prompt() of the turns (after the alternation check)."""
        text = self.system + self.sep
        for i, turn in enumerate(turns):
            if not turn["value"]:  # get_prompt writes "ROLE:" for an empty message (line 58)
                text += f"{self.roles[i % 2]}:"
                continue
            text += f"{self.roles[i % 2]}: {turn['value']}" + (self.sep2 if i % 2 else self.sep)
        return text

    def _alternating(self, turns: list[dict]) -> list[dict]:
        for turn in turns:
            if turn["from"] not in USER_ROLES + ASSISTANT_ROLES:
                raise BadConversation(plain.UNKNOWN_ROLE,
                                      f"turn from {turn['from']!r}; expected human or gpt")
        if turns and turns[0]["from"] not in USER_ROLES:
            turns = turns[1:]  # MoE-LLaVA skips a first turn that is not the human's
        expected = (USER_ROLES, ASSISTANT_ROLES)
        for j, turn in enumerate(turns):
            if turn["from"] not in expected[j % 2]:
                raise BadConversation(TEMPLATE_TURNS, f"turn {j} is from {turn['from']!r}; "
                                      f"{self.name} needs human and gpt turns alternating")
        if not turns:
            raise BadConversation(TEMPLATE_TURNS, "no turn left after a leading gpt turn")
        return turns

    def _style_two(self, turns: list[dict], lengths: "_Lengths") -> tuple[list, list]:
        text = self.text_of(self._alternating(turns))
        ids = lengths.ids(text)
        mask = [1] * len(ids)
        answer_prefix = f"{self.sep}{self.roles[1]}: "
        cursor = 0
        for round_text in text.split(self.sep2):
            if round_text == "":
                break
            parts = round_text.split(answer_prefix)
            if len(parts) != 2:
                break
            round_len = lengths.count(round_text) + 1  # + the round's sep2 token
            instruction_len = lengths.count(parts[0] + answer_prefix) - 1
            mask[cursor:cursor + instruction_len] = [0] * len(mask[cursor:cursor + instruction_len])
            cursor += round_len
        mask[cursor:] = [0] * len(mask[cursor:])
        if cursor != len(ids):
            raise BadConversation(TEMPLATE_MISMATCH,
                                  f"{self.name}: the rounds tokenize to {cursor} ids, the whole "
                                  f"conversation to {len(ids)} (MoE-LLaVA trains no token of "
                                  "such a sample)")
        return ids, mask

    # -- MoE-LLaVA's stage I ("plain") -----------------------------------------------

    def _plain_stage1(self, turns: list[dict], lengths: "_Lengths") -> tuple[list, list]:
        roles = [turn["from"] for turn in turns]
        if len(turns) != 2 or roles[0] not in USER_ROLES or roles[1] not in ASSISTANT_ROLES \
                or IMAGE_TAG not in turns[0]["value"]:
            raise BadConversation(TEMPLATE_TURNS, f"{self.name} needs one human turn with "
                                  f"{IMAGE_TAG} and one answer, got roles {roles}")
        ids = lengths.ids(IMAGE_TAG + turns[1]["value"] + "\n")
        masked = lengths.count(IMAGE_TAG)
        return ids, [0] * masked + [1] * (len(ids) - masked)


class _Lengths:
    """Ids of a text with <image> expanded (MoE-LLaVA's tokenizer_image_token, each chunk
    tokenized alone; the image counts ``num_image_tokens`` ids instead of its one
    placeholder, in every length alike)."""

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def ids(self, text: str) -> list[int]:
        return _image_split_ids(text, self.tokenizer, self.image_token_id, self.num_image_tokens)

    def count(self, text: str) -> int:
        return len(self.ids(text))


def _image_split_ids(text: str, tokenizer, image_token_id: int, num_image_tokens: int) -> list:
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TAG)):
        if i:
            ids += [image_token_id] * num_image_tokens
        ids += tokenizer.encode(chunk) if chunk else []
    return ids


_MOE_LLAVA_TWO = dict(style="two", system=MOE_LLAVA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ",
                      sep2="<|endoftext|>")
TEMPLATES = {
    "plain": ChatTemplate("plain", "plain"),
    "moe-llava-stablelm": ChatTemplate("moe-llava-stablelm", **_MOE_LLAVA_TWO),
    "moe-llava-phi": ChatTemplate("moe-llava-phi", **_MOE_LLAVA_TWO),
    "moe-llava-qwen": ChatTemplate("moe-llava-qwen", **_MOE_LLAVA_TWO),
    "moe-llava-plain": ChatTemplate("moe-llava-plain", "moe-llava-plain", sep="\n"),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"--chat-template {name!r} is not one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_tokenizer_fits(template: ChatTemplate, tokenizer, tokenizer_path: str) -> None:
    """A MoE-LLaVA template's separator must be one token of the tokenizer (its EOS): the
    masking rule counts it as one. Raises ValueError naming both flags otherwise."""
    if template.style != "two":
        return
    for stop in template.stop_strings:
        ids = tokenizer.encode(stop)
        if len(ids) != 1:
            raise ValueError(f"--chat-template {template.name}: --tokenizer-model "
                             f"{tokenizer_path} encodes {stop!r} as {len(ids)} ids {ids[:8]}, "
                             "not one token; use the language model's own tokenizer")
