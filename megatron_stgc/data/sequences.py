"""Samples -> rows of a micro-batch: cut to the longest sample, or packed several to a row.

A tokenized sample of ``L`` ids (``L <= --seq-length + 1``) occupies ``L - 1`` positions:
position ``j`` reads id ``j`` and is trained to predict id ``j + 1``. Positions are *real*
(they belong to a sample) or *padding*. Two layouts, both with a fixed number of samples
per micro-batch (so ``consumed_samples``, resume and the loss normalisation, a mean over
the micro-batch's answer tokens, do not depend on the layout):

* one sample per row (default): ``b`` rows, each as wide as the longest sample of this
  micro-batch, rounded up to ``sequence_multiple(config)``;
* packed (``--use-packed-sequence``): the ``b`` samples placed into rows of at most
  ``--seq-length`` positions, then cut like above; of a few deterministic placements
  (first-fit decreasing at several row capacities, longest-first into the least filled of
  r rows) the one that computes the fewest positions (rows x width) is taken, so packing
  never computes more than cutting alone (one sample per row is among them).
  Position ids restart at 0 for every sample and ``segment_ids`` says which sample each
  position belongs to, so the model can keep attention inside a sample (model/packing.py).

Padding positions hold ``pad_id``, carry no loss, ``segment_id`` -1, and are what the
batch's ``padding_mask`` (megatron-core's sense: True = padding) marks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FP8_MULTIPLE = 16  # Transformer Engine FP8 GEMMs want token counts in multiples of 16


def sequence_multiple(config) -> int:
    """The multiple every micro-batch's width is rounded up to, from a RunConfig.

    FP8 (``--fp8-format``): 16. Tensor parallelism with sequence parallelism (TP > 1 on the
    Transformer Engine spec, where model/gpt.py turns it on): the TP size, since megatron
    splits the sequence over the TP ranks. Both: their least common multiple. Otherwise 1.
    (Context parallelism would need 2 x CP and pipeline parallelism one fixed width; this
    package runs neither.)
    """
    from megatron_stgc.model.gpt import use_transformer_engine

    multiple = FP8_MULTIPLE if config.precision.fp8_format is not None else 1
    tp = config.parallel.tensor_model_parallel_size
    if tp > 1 and use_transformer_engine(config):
        multiple = math.lcm(multiple, tp)
    return multiple


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class Placement:
    """Where the samples of one micro-batch lie: sample i at ``rows[i]``, ``offsets[i]``."""

    rows: list[int]
    offsets: list[int]
    num_rows: int

    def row_major_order(self) -> list[int]:
        """Sample indices in the order their positions appear in the flattened [rows, width]."""
        return sorted(range(len(self.rows)), key=lambda i: (self.rows[i], self.offsets[i]))


def one_per_row(positions: list[int]) -> Placement:
    return Placement(list(range(len(positions))), [0] * len(positions), len(positions))


def pack_first_fit_decreasing(positions: list[int], row_width: int) -> Placement:
    """Longest sample first, each into the first row it fits (ties: the earlier sample first);
    deterministic. Every sample fits a row on its own (``positions[i] <= row_width``)."""
    if any(p > row_width for p in positions):
        raise ValueError(f"a sample of {max(positions)} positions does not fit a row of "
                         f"{row_width} (--seq-length)")
    fill: list[int] = []
    rows, offsets = [0] * len(positions), [0] * len(positions)
    for sample in sorted(range(len(positions)), key=lambda i: (-positions[i], i)):
        row = next((r for r, used in enumerate(fill) if used + positions[sample] <= row_width),
                   len(fill))
        if row == len(fill):
            fill.append(0)
        rows[sample], offsets[sample] = row, fill[row]
        fill[row] += positions[sample]
    return Placement(rows, offsets, len(fill))


def pack_balanced(positions: list[int], num_rows: int) -> Placement:
    """Longest sample first, each into the least filled of ``num_rows`` rows (ties: the
    lower row): balances the rows' fills, so the widest row, which sets the width, is short."""
    fill = [0] * num_rows
    rows, offsets = [0] * len(positions), [0] * len(positions)
    for sample in sorted(range(len(positions)), key=lambda i: (-positions[i], i)):
        row = min(range(num_rows), key=lambda r: (fill[r], r))
        rows[sample], offsets[sample] = row, fill[row]
        fill[row] += positions[sample]
    return Placement(rows, offsets, num_rows)


def pack_fewest_positions(positions: list[int], row_width: int, multiple: int) -> Placement:
    """The placement that computes the fewest positions (rows x rounded width; ties: fewer
    rows) among: first-fit decreasing at every row capacity worth trying (the longest
    sample, ``row_width``, total / r), and ``pack_balanced`` for every row count whose
    rows stay within ``row_width``."""
    longest, total = max(positions), sum(positions)
    if longest > row_width:
        pack_first_fit_decreasing(positions, row_width)  # raises, naming the sizes
    capacities = {longest, row_width} | {-(-total // r) for r in range(1, len(positions) + 1)}
    candidates = [pack_first_fit_decreasing(positions, c) for c in sorted(capacities)
                  if longest <= c <= row_width]
    candidates += [pack_balanced(positions, r) for r in range(1, len(positions) + 1)]
    best = None
    for placement in candidates:
        widest = max(_fills(placement, positions))
        if widest > row_width:
            continue
        key = (placement.num_rows * round_up(widest, multiple), placement.num_rows)
        if best is None or key < best[0]:
            best = (key, placement)
    return best[1]


def _fills(placement: Placement, positions: list[int]) -> list[int]:
    fills = [0] * placement.num_rows
    for sample, p in enumerate(positions):
        row = placement.rows[sample]
        fills[row] = max(fills[row], placement.offsets[sample] + p)
    return fills


@dataclass
class Rows:
    """A micro-batch laid out in rows; every array is [rows, width]."""

    tokens: np.ndarray  # int64 input ids
    labels: np.ndarray  # int64 next ids
    loss_mask: np.ndarray  # float32, 1 on answer labels
    position_ids: np.ndarray  # int64, restarting at 0 for every sample; 0 on padding
    segment_ids: np.ndarray  # int64, sample index in the micro-batch; -1 on padding
    placement: Placement

    @property
    def fill(self) -> np.ndarray:
        """int64 [rows]: real positions per row (samples are contiguous from column 0)."""
        return (self.segment_ids >= 0).sum(axis=1)


def lay_out(samples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, multiple: int,
            pack: bool, pad_id: int) -> Rows:
    """samples: (ids [L], loss mask [L]) each, L <= seq_length + 1 -> Rows.

    The width is the fullest row's real positions rounded up to ``multiple``; it exceeds
    ``seq_length`` only when ``seq_length`` itself is not a multiple of ``multiple``.
    """
    positions = [len(ids) - 1 for ids, _ in samples]
    if any(p < 1 for p in positions):
        raise ValueError("a sample needs at least 2 ids (an input and its label)")
    if pack:
        placement = pack_fewest_positions(positions, seq_length, multiple)
    else:
        placement = one_per_row(positions)
    width = round_up(max(_fills(placement, positions)), multiple)
    shape = (placement.num_rows, width)
    rows = Rows(np.full(shape, pad_id, np.int64), np.full(shape, pad_id, np.int64),
                np.zeros(shape, np.float32), np.zeros(shape, np.int64),
                np.full(shape, -1, np.int64), placement)
    for sample, (ids, mask) in enumerate(samples):
        row, start, count = placement.rows[sample], placement.offsets[sample], positions[sample]
        span = slice(start, start + count)
        rows.tokens[row, span] = ids[:-1]
        rows.labels[row, span] = ids[1:]
        rows.loss_mask[row, span] = mask[1:]
        rows.position_ids[row, span] = np.arange(count)
        rows.segment_ids[row, span] = sample
    return rows


def as_tensors(rows: Rows) -> dict[str, torch.Tensor]:
    """tokens / labels / loss_mask / position_ids / padding_mask [rows, width] (padding_mask:
    bool, True = padding, megatron-core's sense)."""
    return {
        "tokens": torch.from_numpy(rows.tokens),
        "labels": torch.from_numpy(rows.labels),
        "loss_mask": torch.from_numpy(rows.loss_mask),
        "position_ids": torch.from_numpy(rows.position_ids),
        "padding_mask": torch.from_numpy(rows.segment_ids < 0),
    }


def vision_language_batch(samples: list[tuple[np.ndarray, np.ndarray]],
                          images: torch.Tensor | None, has_image: list[bool], *,
                          seq_length: int, multiple: int, pack: bool, pad_id: int,
                          image_token_id: int) -> dict[str, torch.Tensor]:
    """A LLaVA micro-batch: ``as_tensors`` + ``modality`` [rows, width] + ``images`` in the
    row-major order of their positions (what the model's masked scatter fills) + with
    ``pack`` ``segment_ids``. images: [n_img, 3, H, W], one per sample with ``has_image``,
    in sample order."""
    from megatron_stgc.model.modality import modality_of

    rows = lay_out(samples, seq_length, multiple, pack, pad_id)
    batch = as_tensors(rows)
    batch["modality"] = modality_of(batch["tokens"], image_token_id, torch.from_numpy(rows.fill))
    batch["images"] = _images_in_row_order(images, has_image, rows.placement)
    if pack:
        batch["segment_ids"] = torch.from_numpy(rows.segment_ids)
    return batch


def _images_in_row_order(images: torch.Tensor | None, has_image: list[bool],
                         placement: Placement) -> torch.Tensor | None:
    if images is None:
        return None
    slot = {sample: n for n, sample in enumerate(i for i, h in enumerate(has_image) if h)}
    order = [slot[i] for i in placement.row_major_order() if i in slot]
    return images if order == sorted(order) else images[order]


def real_token_fraction(padding_mask: torch.Tensor) -> float:
    """Real positions / computed positions of a batch."""
    return float((~padding_mask).sum()) / max(1, padding_mask.numel())
