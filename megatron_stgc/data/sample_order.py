"""Which record sits at each run position: a seeded shuffle, or MoE-LLaVA's modality grouping.

The run's ``i``-th sample is ``order.permutation(epoch)[i % N]`` with ``epoch = i // N``
(``N`` records); global batch ``g`` holds run positions ``[g*GBS, (g+1)*GBS)`` and DP rank
``r`` takes its contiguous slice, cut into micro-batches in order
(``dataset.micro_batch_indices``). A permutation depends only on the seed, the epoch and the
records, so ``consumed_samples`` in a checkpoint says exactly where to resume.

``ShuffledOrder``: a fresh ``np.random.default_rng([seed, epoch])`` permutation per epoch
(what ``ShardedSampler`` gives).

``ModalityGroupedOrder`` (``--group-by-modality-length``) follows MoE-LLaVA's
``get_modality_length_grouped_indices`` (moellava/train/llava_trainer.py:60-96, used by its
``LengthGroupedSampler`` with ``world_size = GPUs x gradient accumulation`` so that one
"megabatch" is one global batch, llava_trainer.py:139-146):

1. image records and text-only records (sign of the modality length) are shuffled apart and
   cut into megabatches of one global batch each (llava_trainer.py:66-73, 88-92);
2. within a megabatch the records are sorted by length, longest first, and dealt into the
   global batch's micro-batches so that their total lengths are balanced
   (``split_to_even_chunks``, llava_trainer.py:38-57, 93-94): every micro-batch of a step
   holds one modality and about the same number of words;
3. the megabatches are shuffled (llava_trainer.py:79-80); the leftovers of the two
   modalities (fewer than a global batch each) are pooled, in record order
   (llava_trainer.py:75-83).

Where MoE-LLaVA puts the pooled leftovers at the end of its one epoch, a run of several
epochs here must keep later epochs' megabatches on global-batch boundaries: epoch ``e``
starts ``(e*N) % GBS`` positions into a global batch, so its first ``head`` positions
complete that batch from the pool (a megabatch is dissolved into the pool when it holds too
few), its megabatches follow on the boundary, and the rest of the pool ends the epoch. At
most two global batches per epoch mix the modalities. The randomness is numpy's, seeded by
``[seed, epoch]`` (MoE-LLaVA draws from torch's global generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_stgc.data.llava_index import ShardedSampler


class ShuffledOrder:
    """A seeded permutation of all records per epoch."""

    def __init__(self, num_records: int, seed: int):
        self._sampler = ShardedSampler(num_samples=num_records, seed=seed, dp_rank=0, dp_size=1)

    def permutation(self, epoch: int) -> np.ndarray:
        return self._sampler.permutation(epoch)


def balanced_micro_batches(records: np.ndarray, lengths: np.ndarray,
                           micro_batch_size: int) -> np.ndarray:
    """``records`` (one global batch, int64 [GBS]) reordered into GBS / mbs consecutive
    micro-batches of balanced total length: longest first, each to the micro-batch with the
    smallest total that still has room (MoE-LLaVA's split_to_even_chunks).

    lengths: int [num_records], positive word counts (indexed by record)."""
    count = len(records) // micro_batch_size
    by_length = records[np.argsort(-lengths[records], kind="stable")]
    chunks: list[list[int]] = [[] for _ in range(count)]
    totals = np.zeros(count, dtype=np.float64)
    for record in by_length.tolist():
        chunk = int(np.argmin(totals))
        chunks[chunk].append(record)
        totals[chunk] += lengths[record]
        if len(chunks[chunk]) == micro_batch_size:
            totals[chunk] = np.inf
    return np.asarray([r for chunk in chunks for r in chunk], dtype=np.int64)


@dataclass
class ModalityGroupedOrder:
    """MoE-LLaVA's modality- and length-grouped order, aligned to global batches.

    modality_lengths: int [N] signed (image > 0, text-only < 0, never 0).
    """

    modality_lengths: np.ndarray
    seed: int
    global_batch_size: int
    micro_batch_size: int
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.modality_lengths = np.asarray(self.modality_lengths, dtype=np.int64)
        if (self.modality_lengths == 0).any():
            raise ValueError("modality lengths must be nonzero (sign = modality)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global batch {self.global_batch_size} is not a multiple of the "
                             f"micro-batch size {self.micro_batch_size}")

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [N]: the records of ``epoch`` in run order (the latest epoch is cached)."""
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = self._build(epoch)
        return self._cache[epoch]

    def modality_of(self, record: int) -> int:
        """+1 for a record with an image, -1 for a text-only record."""
        return 1 if self.modality_lengths[record] > 0 else -1

    def _build(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        gbs, lengths = self.global_batch_size, np.abs(self.modality_lengths)
        megabatches, pool = [], []
        for records in (np.flatnonzero(self.modality_lengths > 0),
                        np.flatnonzero(self.modality_lengths < 0)):
            shuffled = records[rng.permutation(len(records))]
            full = len(shuffled) - len(shuffled) % gbs
            for start in range(0, full, gbs):
                megabatches.append(balanced_micro_batches(shuffled[start:start + gbs], lengths,
                                                          self.micro_batch_size))
            pool.extend(shuffled[full:].tolist())
        megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
        head = (-epoch * len(self.modality_lengths)) % gbs  # completes the open global batch
        if len(pool) < head and megabatches:
            pool.extend(megabatches.pop().tolist())
        pool.sort()
        parts = [np.asarray(pool[:head], np.int64)] + megabatches + [np.asarray(pool[head:],
                                                                               np.int64)]
        return np.concatenate(parts)
