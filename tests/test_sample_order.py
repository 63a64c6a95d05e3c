"""--group-by-modality-length: MoE-LLaVA's modality- and length-grouped order, over several
epochs, DP ranks and a resume; several --data-path files concatenated like MoE-LLaVA.

The properties are checked the obvious way over the whole run stream: every record once per
epoch, global batches of one modality (at most two mixed per epoch), micro-batches whose
total lengths MoE-LLaVA's greedy deal would give, the same stream for the same seed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_stgc.data.dataset import micro_batch_indices
from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, CORRUPT_IMAGE, ImagePreprocessor
from megatron_stgc.data.llava_dataset import build_llava_dataset
from megatron_stgc.data.llava_index import LlavaIndex, modality_length
from megatron_stgc.data.llava_mix import open_llava_mix
from megatron_stgc.data.sample_order import (ModalityGroupedOrder, ShuffledOrder,
                                             balanced_micro_batches)
from megatron_stgc.model.modality import IMAGE
from test_llava_dataset import write_mix

GBS, MBS = 8, 2


def _lengths(n_image: int, n_text: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(1, 60, n_image), -rng.integers(1, 60, n_text)])
    return lengths[rng.permutation(len(lengths))]


def _stream(order, n: int, epochs: int) -> np.ndarray:
    """Records of run positions [0, epochs * n): the run's stream."""
    return np.concatenate([order.permutation(e) for e in range(epochs)])


def test_moe_llava_deals_longest_first_to_the_lightest_micro_batch():
    # MoE-LLaVA's split_to_even_chunks on [10, 9, 8, 1, 1, 1] into 3 chunks of 2, by hand:
    # 10 -> c0, 9 -> c1, 8 -> c2, 1 -> c2 (8 is lightest; full), 1 -> c1 (full), 1 -> c0
    lengths = np.array([1, 10, 1, 9, 1, 8])
    dealt = balanced_micro_batches(np.arange(6), lengths, micro_batch_size=2)
    assert [sorted(lengths[dealt[i:i + 2]].tolist()) for i in (0, 2, 4)] == [[1, 10], [1, 9],
                                                                            [1, 8]]


@pytest.mark.parametrize("n_image,n_text", [(45, 22), (8, 50), (3, 2)])
def test_every_record_once_per_epoch_and_batches_of_one_modality(n_image, n_text):
    lengths = _lengths(n_image, n_text)
    n, epochs = len(lengths), 5
    order = ModalityGroupedOrder(lengths, seed=3, global_batch_size=GBS, micro_batch_size=MBS)
    stream = _stream(order, n, epochs)
    for epoch in range(epochs):
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    mixed_per_epoch = {}
    for start in range(0, len(stream) - GBS + 1, GBS):
        batch = stream[start:start + GBS]
        if len(set(np.sign(lengths[batch]).tolist())) > 1:
            epoch = start // n
            mixed_per_epoch[epoch] = mixed_per_epoch.get(epoch, 0) + 1
    if n >= 4 * GBS:
        assert max(mixed_per_epoch.values(), default=0) <= 2, mixed_per_epoch
    full = (len(stream) // GBS) * GBS
    assert sum(mixed_per_epoch.values()) <= 2 * epochs + 1 and full > 0


def test_micro_batches_of_a_grouped_global_batch_are_balanced():
    lengths = _lengths(64, 0, seed=5)
    order = ModalityGroupedOrder(lengths, seed=1, global_batch_size=16, micro_batch_size=4)
    records = order.permutation(0)[:16]
    totals = [int(np.abs(lengths[records[i:i + 4]]).sum()) for i in range(0, 16, 4)]
    # a greedy deal of longest-first lengths leaves the totals within the longest length
    assert max(totals) - min(totals) <= int(np.abs(lengths[records]).max())


def test_the_order_depends_on_seed_and_epoch_only():
    lengths = _lengths(30, 17)
    a = ModalityGroupedOrder(lengths, seed=9, global_batch_size=GBS, micro_batch_size=MBS)
    b = ModalityGroupedOrder(lengths.copy(), seed=9, global_batch_size=GBS, micro_batch_size=MBS)
    assert np.array_equal(_stream(a, len(lengths), 3), _stream(b, len(lengths), 3))
    c = ModalityGroupedOrder(lengths, seed=10, global_batch_size=GBS, micro_batch_size=MBS)
    assert not np.array_equal(a.permutation(0), c.permutation(0))
    assert not np.array_equal(a.permutation(0), a.permutation(1))


def test_shuffled_order_is_the_seeded_permutation():
    assert np.array_equal(ShuffledOrder(20, 4).permutation(2),
                          np.random.default_rng([4, 2]).permutation(20))


def test_modality_length_is_moe_llavas_signed_word_count():
    turns = [{"from": "human", "value": "<image>\nWhat is  this?"},
             {"from": "gpt", "value": "A cat."}]
    # str.split() words: <image> What is this? | A cat.  (the tag counts, as in MoE-LLaVA)
    assert modality_length({"image": "a.png", "conversations": turns}) == 6
    assert modality_length({"conversations": turns}) == -6
    assert modality_length({"conversations": [{"from": "gpt", "value": ""}]}) == -1


# -- through the data set ---------------------------------------------------------------

def _dataset(root, paths, grouping=(GBS, MBS)):
    loader = ImagePreprocessor(16, 16, CLIP_MEAN, CLIP_STD, backend="pil")
    dataset, _ = build_llava_dataset(paths, str(root), str(root / "cache"), seed=7,
                                     seq_length=40, num_image_tokens=4, image_loader=loader,
                                     vocab_size=64, grouping=grouping)
    return dataset


def _rows_with_image(dataset, positions) -> list[bool]:
    batch = dataset.batch(positions)
    return (batch["modality"] == IMAGE).any(dim=1).tolist()


def test_grouped_micro_batches_hold_one_modality_and_bad_records_keep_it(tmp_path):
    path = write_mix(tmp_path)  # 14 usable: 10 with an image (1 corrupt), 4 text-only
    dataset = _dataset(tmp_path, path)
    order = dataset.order.permutation(0)
    first_megabatch = order[:GBS]
    assert len(set(np.sign(dataset.index.modality_lengths[first_megabatch]).tolist())) == 1
    for rank in range(2):
        for positions in micro_batch_indices(0, GBS, MBS, rank, 2):
            assert len(set(_rows_with_image(dataset, positions))) == 1
    # the corrupt image was met (it is in the first, all-image megabatch) and replaced by
    # another image record, not by a text-only one
    assert dataset.bad_samples.counts.get(CORRUPT_IMAGE) == 1


def test_grouped_batches_resume_exactly_in_a_fresh_process(tmp_path):
    path = write_mix(tmp_path)
    warm = _dataset(tmp_path, path)
    everything = [warm.batch(positions) for step in range(4)
                  for positions in micro_batch_indices(step * GBS, GBS, MBS, 0, 2)]
    cold = _dataset(tmp_path, path)
    resumed = [cold.batch(positions) for step in range(2, 4)
               for positions in micro_batch_indices(step * GBS, GBS, MBS, 0, 2)]
    for a, b in zip(everything[4:], resumed):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["modality"], b["modality"])


def test_several_files_are_concatenated_and_reports_name_the_file(tmp_path):
    images = write_mix(tmp_path)  # JSONL with images
    text = tmp_path / "nlp.json"
    text.write_text(json.dumps([{"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
        for i in range(5)] + [{"id": "no-answer", "conversations": [
            {"from": "human", "value": "Hello?"}]}]))
    mix = open_llava_mix([images, str(text)], str(tmp_path), str(tmp_path / "cache"))
    alone = LlavaIndex(images, image_root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert len(mix) == len(alone) + 5 and mix.num_records == alone.num_records + 6
    assert [mix.record(i) for i in range(len(alone))] == [alone.record(i)
                                                          for i in range(len(alone))]
    assert [mix.record(len(alone) + i)["id"] for i in range(5)] == [f"t{i}" for i in range(5)]
    assert (mix.modality_lengths[len(alone):] < 0).all()
    assert mix.num_with_image == alone.num_with_image == 10
    assert mix.bad_samples.examples["no_assistant_turn"] == ["nlp.json:no-answer"]
    assert mix.bad_samples.examples["missing_image"] == ["mix.jsonl:missing"]
    report = mix.report()
    assert "mix.jsonl: 14 of 16 records usable" in report and "nlp.json: 5 of 6" in report
    assert "19 records usable in all: 10 with an image, 9 text-only" in report
    dataset = _dataset(tmp_path, [images, str(text)], grouping=None)
    dataset.batch(list(range(2 * len(dataset))))
    assert dataset.bad_samples.examples[CORRUPT_IMAGE] == ["mix.jsonl:corrupt"]
