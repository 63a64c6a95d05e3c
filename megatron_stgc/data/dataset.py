"""Packed, loss-masked token sequences and deterministic per-rank micro-batches.

A sample is ``seq_length + 1`` token ids: conversations packed greedily, each
as prompt tokens (loss mask 0) + answer tokens + EOS (loss mask 1), padded at
the end. Sample ``i`` of the run (counting over all steps, all ranks) is
``sequences[order[i % N]]`` with a fresh seeded permutation per epoch, so the
data position is fully described by the number of samples consumed: that is
what a checkpoint stores and what resume starts from.

Data-parallel split: global batch ``g`` holds samples ``[g*GBS, (g+1)*GBS)``;
data-parallel rank ``r`` of ``D`` takes the contiguous slice
``[r*GBS/D, (r+1)*GBS/D)`` and cuts it into micro-batches in order. A run with
D=1 and the same micro-batch size therefore sees exactly the micro-batches of
all ranks of a D>1 run, one after another.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_stgc.data.instruct_text import (Conversation, format_conversation, format_prompt,
                                              generate_conversations)
from megatron_stgc.data.llava_index import BadSampleCounter
from megatron_stgc.data.text_records import read_text_records
from megatron_stgc.data.tokenizer import Tokenizer, get_or_train_tokenizer, load_tokenizer


def load_conversations(path: str) -> list[Conversation]:
    """(question, answer) pairs of one JSON / JSONL file (formats: data/text_records.py);
    bad records are skipped and counted there (``read_text_records`` returns the counts)."""
    return read_text_records([path]).conversations


def pack_conversations(conversations: list[Conversation], tokenizer: Tokenizer,
                       seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, seq_length+1], loss_mask [N, seq_length+1]) packed greedily.

    A conversation longer than a sample is truncated (with a warning that
    counts them), never dropped silently.
    """
    tokens, loss_mask, _ = pack_conversations_with_lengths(conversations, tokenizer, seq_length)
    return tokens, loss_mask


def pack_conversations_with_lengths(conversations: list[Conversation], tokenizer: Tokenizer,
                                    seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pack_conversations and the ids each row holds before its padding (int64 [N])."""
    width = seq_length + 1
    rows_tokens, rows_mask, lengths = [], [], []
    tokens: list[int] = []
    mask: list[int] = []
    truncated = 0

    def flush():
        lengths.append(len(tokens))
        pad = width - len(tokens)
        rows_tokens.append(tokens + [tokenizer.pad_id] * pad)
        rows_mask.append(mask + [0] * pad)

    for conversation in conversations:
        prompt = tokenizer.encode(format_prompt(conversation.question))
        answer = tokenizer.encode(conversation.answer) + [tokenizer.eos_id]
        ids, ids_mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
        if len(ids) > width:
            truncated += 1
            ids, ids_mask = ids[:width], ids_mask[:width]
        if len(tokens) + len(ids) > width:
            flush()
            tokens, mask = [], []
        tokens, mask = tokens + ids, mask + ids_mask
    if tokens:
        flush()
    if truncated:
        warnings.warn(f"{truncated} of {len(conversations)} conversations are longer than "
                      f"--seq-length {seq_length} + 1 tokens and were truncated")
    return (np.asarray(rows_tokens, dtype=np.int64), np.asarray(rows_mask, dtype=np.int64),
            np.asarray(lengths, dtype=np.int64))


@dataclass
class PackedDataset:
    tokens: np.ndarray  # [N, seq_length + 1]
    loss_mask: np.ndarray  # [N, seq_length + 1]; 1 on answer tokens and EOS
    seed: int
    lengths: Optional[np.ndarray] = None  # [N] ids before each row's padding (None: no padding)
    bad_records: Optional[BadSampleCounter] = None  # --data-path records skipped, by kind
    num_records: int = 0  # records read from --data-path (good + bad)

    def __len__(self) -> int:
        return len(self.tokens)

    def sample_index(self, global_index: int) -> int:
        """Row of the run's ``global_index``-th sample (seeded permutation per epoch)."""
        epoch, position = divmod(global_index, len(self))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        return int(order[position])

    def batch(self, global_indices: list[int]) -> dict[str, torch.Tensor]:
        """tokens / labels / loss_mask / position_ids / padding_mask, each [b, seq_length].

        padding_mask (bool, True = padding, megatron-core's sense): the positions after a
        row's last id that has a label (a row of L ids has L - 1 real positions)."""
        rows = [self.sample_index(i) for i in global_indices]
        tokens = torch.from_numpy(self.tokens[rows])
        mask = torch.from_numpy(self.loss_mask[rows])
        seq_length = tokens.shape[1] - 1
        positions = torch.arange(seq_length).unsqueeze(0).expand(len(rows), -1).contiguous()
        lengths = (torch.full((len(rows),), seq_length + 1) if self.lengths is None
                   else torch.from_numpy(self.lengths[rows]))
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].float().contiguous(),
            "position_ids": positions,
            "padding_mask": positions >= (lengths - 1).unsqueeze(1),
        }


def micro_batch_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> list[list[int]]:
    """Global sample indices of this rank's micro-batches for the step that starts at
    ``consumed_samples``."""
    per_rank = global_batch_size // dp_size
    start = consumed_samples + dp_rank * per_rank
    return [list(range(start + m, start + m + micro_batch_size))
            for m in range(0, per_rank, micro_batch_size)]


def text_records(data_path: Optional[list[str] | str]):
    """The --data-path files' records (bad ones counted), or None for the embedded generator."""
    if data_path is None:
        return None
    return read_text_records([data_path] if isinstance(data_path, str) else data_path)


def text_conversations(data_path: Optional[list[str] | str],
                       num_samples: int) -> list[Conversation]:
    """The text data set's conversations: --data-path's usable records, or the generator's."""
    records = text_records(data_path)
    if records is not None:
        return records.conversations
    return generate_conversations(num_samples, seed=0)


def tokenizer_texts(conversations: list[Conversation]) -> list[str]:
    """What the SentencePiece model of a text run is trained on (and cached by)."""
    return [format_conversation(c) for c in conversations]


def build_dataset(seq_length: int, seed: int, cache_dir: str,
                  data_path: Optional[list[str] | str] = None,
                  tokenizer_model: Optional[str] = None, vocab_size: int = 512,
                  num_samples: int = 4000, tokenizer: Optional[Tokenizer] = None
                  ) -> tuple[PackedDataset, Tokenizer]:
    """The packed data set and its tokenizer (trained and cached on first use).

    Without ``data_path`` the embedded generator makes ``num_samples``
    conversations. ``tokenizer``: use this one (the training run's, for
    --valid-data-path) instead of loading or training one. Call on every rank; to
    avoid a training race, let rank 0 call it first (``prepare_data`` in
    training/train.py does).
    """
    records = text_records(data_path)
    conversations = (records.conversations if records is not None
                     else generate_conversations(num_samples, seed=0))
    if tokenizer is None and tokenizer_model is not None:
        tokenizer = load_tokenizer(tokenizer_model)
    elif tokenizer is None:
        os.makedirs(cache_dir, exist_ok=True)
        tokenizer = get_or_train_tokenizer(tokenizer_texts(conversations), vocab_size,
                                           cache_dir)
    tokens, loss_mask, lengths = pack_conversations_with_lengths(conversations, tokenizer,
                                                                 seq_length)
    if records is None:
        return PackedDataset(tokens, loss_mask, seed, lengths), tokenizer
    return PackedDataset(tokens, loss_mask, seed, lengths, records.bad,
                         records.num_records), tokenizer
