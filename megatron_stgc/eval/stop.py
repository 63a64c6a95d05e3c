"""When a generated answer ends: EOS, a stop string, the answer length, the sequence length.

A chat template names the strings that end an assistant turn besides EOS (MoE-LLaVA stops on
its template's separator with ``KeywordsStoppingCriteria``, ``moellava/eval/
model_vqa_loader.py`` lines 107-122). ``AnswerRows`` keeps every row of a batch: its
prompt, what it generated, and whether it is done; the answer is the generated text cut
before the first stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from megatron_stgc.data.instruct_text import USER_TAG

# today's template (data/conversation.py): an answer is followed by EOS and the next
# "<|user|>" turn; a model that skips EOS starts that tag
DEFAULT_STOP_STRINGS: tuple[str, ...] = (USER_TAG,)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """(``text`` before the first stop string, whether one occurred)."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    if not cuts:
        return text, False
    return text[:min(cuts)], True


@dataclass
class AnswerRows:
    """Per-row state of one batch's greedy decoding."""

    prompts: list[list[int]]
    tokenizer: object  # decode(ids) -> str, eos_id
    max_new_tokens: int
    max_length: int  # prompt + answer never exceed it (--seq-length)
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS
    generated: list[list[int]] = field(init=False)
    done: list[bool] = field(init=False)

    def __post_init__(self):
        self.generated = [[] for _ in self.prompts]
        self.done = [len(p) >= self.max_length for p in self.prompts]

    @property
    def vocab_size(self) -> int:
        """Ids a row may generate: the tokenizer's (not the image token, not the padding of
        the embedding table)."""
        return self.tokenizer.vocab_size

    def length(self, row: int) -> int:
        return len(self.prompts[row]) + len(self.generated[row])

    def take(self, row: int, token: int) -> None:
        """Append the row's next token and decide whether the row is done."""
        if self.done[row]:
            return
        self.generated[row].append(token)
        self.done[row] = (token == self.tokenizer.eos_id
                          or len(self.generated[row]) >= self.max_new_tokens
                          or self.length(row) >= self.max_length
                          or (bool(self.stop_strings)
                              and cut_at_stop(self._text(row), self.stop_strings)[1]))

    def _text(self, row: int) -> str:
        return self.tokenizer.decode([t for t in self.generated[row]
                                      if t != self.tokenizer.eos_id])

    def answer(self, row: int) -> str:
        return cut_at_stop(self._text(row), self.stop_strings)[0].strip()

    def all_done(self) -> bool:
        return all(self.done)
