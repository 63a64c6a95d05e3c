"""Questions shared over data-parallel ranks; every rank decodes the same number of batches.

Data-parallel rank r of D answers questions r, r + D, r + 2D, ... in batches of
--eval-batch-size (image questions first, then by text length, so a batch's prompts are
alike). Expert-parallel ranks are data-parallel ranks of the dense part in
megatron-core (each has its own questions) whose MoE layers exchange tokens in every
forward, so all ranks run the same number of batches (a rank out of questions decodes an
empty batch: idle forwards) and every batch's decoding runs until every rank is done.
Rank 0 gathers the answers.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def rank_share(questions: list) -> list[int]:
    """Indices of the questions this data-parallel rank answers (round robin)."""
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    return list(range(rank, len(questions), size))


def batch_order(questions: list[dict], indices: list[int]) -> list[int]:
    """``indices`` with image questions first, then by text length: batches of similar
    prompts (the KV cache's prefill covers the shortest prompt of a batch)."""
    def key(index: int):
        question = questions[index]
        return question.get("image") is None, len(str(question.get("text")))

    return sorted(indices, key=key)


def answer_questions(decoder, questions: list[dict], batch_size: int,
                     progress=print) -> list[dict]:
    """Every question's answer, on rank 0 (others get [])."""
    from megatron_stgc.parallel import collective_device

    mine = batch_order(questions, rank_share(questions))
    rounds = torch.tensor([math.ceil(len(mine) / batch_size)], dtype=torch.long,
                          device=collective_device())
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    local: dict[int, dict] = {}
    start = time.perf_counter()
    for number in range(int(rounds)):
        chunk = mine[number * batch_size:(number + 1) * batch_size]
        for index, answer in zip(chunk, decoder.decode([questions[i] for i in chunk])):
            local[index] = answer
        last = number + 1 == int(rounds)
        if dist.get_rank() == 0 and progress is not None and (number % 10 == 9 or last):
            progress(f"eval: batch {number + 1}/{int(rounds)} on each rank "
                     f"({time.perf_counter() - start:.0f} s)")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return []
    merged: dict[int, dict] = {}
    for part in gathered:
        merged.update(part)
    return [merged[i] for i in range(len(questions))]
