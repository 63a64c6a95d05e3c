"""Several LLaVA files as one data set: ``--data-path a.json b.json``.

MoE-LLaVA's stage III trains on two files (``llava_image_tune_.json nlp_tune.json``) by
concatenating their records into one list (moellava/train/train.py:931-937): record ``i`` of
the mix is record ``i`` of the first file, then the second file's records follow. ``LlavaMix``
does the same over one ``LlavaIndex`` per file (each built and cached on its own), so every
good record of every file is used once per epoch; no weights (Megatron-LM's blend weights
would repeat or leave out records within an epoch, which MoE-LLaVA does not do).

Reports name the file: the index report has one block per file, and with more than one file
a record's label in the in-use report is ``file:id``.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megatron_stgc.data.llava_index import BadSampleCounter, LlavaIndex


class LlavaMix:
    """Good records of several ``LlavaIndex`` files, concatenated in --data-path order.

    ``modality_lengths``: int32 [len] (MoE-LLaVA's signed word counts, see
    ``llava_index.modality_length``); ``bad_samples``: index-time bad records of all
    files; ``num_records``: good + bad records of all files.
    """

    def __init__(self, indexes: list[LlavaIndex]):
        if not indexes:
            raise ValueError("LlavaMix needs at least one file")
        self.indexes = indexes
        sizes = [len(index) for index in indexes]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [files + 1]
        self.modality_lengths = np.concatenate(
            [np.asarray(index.modality_lengths, dtype=np.int32) for index in indexes])
        self.allow_image_outside_root = indexes[0].allow_image_outside_root
        self.bad_samples = BadSampleCounter.merged(
            [self._labelled(index.bad_samples, index) for index in indexes])

    # ------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_records(self) -> int:
        return sum(index.num_records for index in self.indexes)

    @property
    def num_with_image(self) -> int:
        return sum(index.num_with_image for index in self.indexes)

    @property
    def path(self) -> str:
        return ", ".join(index.path for index in self.indexes)

    # ------------------------------------------------------------------ records

    def locate(self, i: int) -> tuple[LlavaIndex, int]:
        """(the file's index, the record's number within it) of mix record ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} not in [0, {len(self)})")
        file = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.indexes[file], i - int(self.starts[file])

    def record(self, i: int) -> dict:
        index, local = self.locate(i)
        return index.record(local)

    def label(self, i: int, record_id: str) -> str:
        """How reports name record ``i``: its id, prefixed by its file when there are several."""
        if len(self.indexes) == 1:
            return record_id
        return f"{_file_name(self.locate(i)[0])}:{record_id}"

    def _labelled(self, counter: BadSampleCounter, index: LlavaIndex) -> BadSampleCounter:
        if len(self.indexes) == 1:
            return counter
        return BadSampleCounter(
            counts=dict(counter.counts),
            examples={kind: [f"{_file_name(index)}:{label}" for label in labels]
                      for kind, labels in counter.examples.items()})

    # ------------------------------------------------------------------ reports

    def report(self) -> str:
        """Each file's usable records and index-time bad samples; modality counts."""
        blocks = [index.report() for index in self.indexes]
        images = self.num_with_image
        blocks.append(f"{len(self)} records usable in all: {images} with an image, "
                      f"{len(self) - images} text-only")
        return "\n".join(blocks)

    def close(self) -> None:
        for index in self.indexes:
            index.close()


def _file_name(index: LlavaIndex) -> str:
    return os.path.basename(index.path)


def open_llava_mix(data_paths: list[str] | str, image_root: Optional[str], cache_dir: str,
                   allow_image_outside_root: bool = False) -> LlavaMix:
    """One ``LlavaIndex`` per file (built on first use, cached in ``cache_dir``), as a mix."""
    paths = [data_paths] if isinstance(data_paths, str) else list(data_paths)
    return LlavaMix([LlavaIndex(path, image_root=image_root, cache_dir=cache_dir,
                                allow_image_outside_root=allow_image_outside_root)
                     for path in paths])
