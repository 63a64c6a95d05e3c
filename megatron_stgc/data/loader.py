"""Micro-batches made ahead of the step: torch DataLoader workers over the run's positions.

``BatchStream(dataset, ...)`` hands the training loop one step's micro-batches at a time
(``next_step()``, an iterator the schedule pulls ``num_microbatches`` batches from).

* ``num_workers == 0``: each micro-batch is made in the training process when the schedule
  asks for it (``dataset.batch``), inside the step, as before.
* ``num_workers > 0``: a ``torch.utils.data.DataLoader`` whose item ``k`` is this rank's
  ``k``-th micro-batch of the run (step ``k // n_micro``, micro-batch ``k % n_micro``, the
  positions of ``dataset.micro_batch_indices``), read, tokenized and decoded by ``N``
  worker processes (``2 N`` micro-batches in flight, DataLoader's default prefetch), handed
  out in order. Workers are spawned, not forked: DALI's threads do not survive a fork
  (tests/test_images.py). A worker makes the batch with ``dataset.produce`` and the
  training process counts what it found with ``dataset.absorb`` when the schedule takes the
  batch, so bad-sample counters and the checkpoint's data state are those of an
  in-process run at every step. Each worker decodes with its own image loader; DALI's
  "mixed" (GPU) decoding is turned to its CPU pipeline in workers (one CUDA context per
  worker is not wanted), so GPU decoding needs ``--num-workers 0``. Small tensors come
  back pickled as numpy arrays, large ones (images at LLaVA sizes) through shared memory
  (``IN_BAND_BYTES``). Workers are spawned, so a script that builds a ``BatchStream`` with
  workers must start from an ``if __name__ == "__main__":`` guard (``python -m
  megatron_stgc`` has one).

Which samples a micro-batch holds depends only on its position (the replacement of bad
records is deterministic), so 0 or N workers and a resume give the same batches
(tests/test_data_loader.py).

The text-only ``PackedDataset`` is tokenized and packed in memory at start: its batches are
slices, always made in the training process.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_stgc.data.dataset import micro_batch_indices


class MicroBatchPositions:
    """Item ``k``: the run positions of this rank's ``k``-th micro-batch."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_step = global_batch_size // (micro_batch_size * dp_size)

    def __call__(self, k: int) -> list[int]:
        step, micro = divmod(k, self.per_step)
        return micro_batch_indices(step * self.global_batch_size, self.global_batch_size,
                                   self.micro_batch_size, self.dp_rank, self.dp_size)[micro]


class ProducedMicroBatches(torch.utils.data.Dataset):
    """Map-style view for the DataLoader: item ``k`` -> ``dataset.produce(positions(k))``."""

    def __init__(self, dataset, positions: MicroBatchPositions):
        self.dataset = dataset
        self.positions = positions

    def __getitem__(self, k: int):
        return self.dataset.produce(self.positions(k))


# A tensor returned by a worker travels through shared memory (one file descriptor passed
# per tensor: ~0.5 ms of the training process's time each, measured) or, as a numpy array,
# pickled in the queue (a copy: cheaper below ~1 MiB, far dearer for images).
IN_BAND_BYTES = 1 << 20


def _for_transport(item):
    """DataLoader collate_fn, run in the worker: small tensors of the batch as numpy arrays."""
    tensors, events = item
    return {key: value.numpy() if isinstance(value, torch.Tensor)
            and value.numel() * value.element_size() < IN_BAND_BYTES else value
            for key, value in tensors.items()}, events


def _from_transport(tensors: dict) -> dict:
    import numpy as np

    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            for key, value in tensors.items()}


def _cpu_decoding_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: DALI decodes on the CPU in a worker (no CUDA context)."""
    info = torch.utils.data.get_worker_info()
    loader = getattr(info.dataset.dataset, "image_loader", None)
    if getattr(loader, "dali_decode", None) == "mixed":
        loader.dali_decode = "cpu"


class BatchStream:
    """This rank's micro-batches from step ``start_step`` on, step by step."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, start_step: int, end_step: int, num_workers: int = 0):
        self.dataset = dataset
        self.positions = MicroBatchPositions(global_batch_size, micro_batch_size, dp_rank,
                                             dp_size)
        self.step = start_step
        self.end_step = end_step
        self.num_workers = num_workers if hasattr(dataset, "produce") else 0
        self._produced: Optional[Iterator] = None
        if self.num_workers > 0 and start_step < end_step:
            self._produced = iter(self._data_loader(start_step, end_step))

    def _data_loader(self, start_step: int, end_step: int) -> torch.utils.data.DataLoader:
        per_step = self.positions.per_step
        return torch.utils.data.DataLoader(
            ProducedMicroBatches(self.dataset, self.positions),
            sampler=range(start_step * per_step, end_step * per_step),
            batch_size=None, collate_fn=_for_transport, num_workers=self.num_workers,
            multiprocessing_context="spawn", worker_init_fn=_cpu_decoding_in_worker,
            pin_memory=torch.cuda.is_available())

    def next_step(self) -> Iterator[dict]:
        """An iterator over the next step's micro-batches (made or taken on demand)."""
        if self.step >= self.end_step:
            raise RuntimeError(f"BatchStream: no step {self.step} (made for steps before "
                               f"{self.end_step})")
        first = self.step * self.positions.per_step
        self.step += 1
        return self._micro_batches(first)

    def _micro_batches(self, first: int) -> Iterator[dict]:
        for k in range(first, first + self.positions.per_step):
            if self._produced is None:
                yield self.dataset.batch(self.positions(k))
            else:
                tensors, events = next(self._produced)
                self.dataset.absorb(events)
                yield _from_transport(tensors)

    def close(self) -> None:
        """Stop the workers (the DataLoader iterator shuts them down when released)."""
        self._produced = None
