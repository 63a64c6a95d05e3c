"""LLaVA data set: batches from real image files, bad samples counted by kind and replaced
deterministically, modality masks, resume without repeat or skip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_stgc.data.conversation import TOO_MANY_IMAGE_TAGS
from megatron_stgc.data.dataset import micro_batch_indices
from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, CORRUPT_IMAGE, ImagePreprocessor
from megatron_stgc.data.llava_dataset import build_llava_dataset
from megatron_stgc.data.llava_index import MALFORMED_JSON, MISSING_IMAGE
from megatron_stgc.model.modality import IMAGE, PAD, TEXT

SEQ = 40
P = 4  # image tokens per image


def write_mix(root) -> str:
    """12 good records (8 with images, 4 text-only) + 4 bad ones of different kinds."""
    os.makedirs(root / "img")
    records = []
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        records.append({"id": f"img{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich shade is shown?"},
            {"from": "gpt", "value": str(i)}]})
    for i in range(4):
        records.append({"id": f"text{i}", "conversations": [
            {"from": "human", "value": f"What is {i} plus one?"},
            {"from": "gpt", "value": str(i + 1)}]})
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    records.append({"id": "corrupt", "image": "img/corrupt.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich shade?"}, {"from": "gpt", "value": "1"}]})
    records.append({"id": "two_tags", "image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "0"},
        {"from": "human", "value": "<image>\nAgain?"}, {"from": "gpt", "value": "0"}]})
    records.append({"id": "missing", "image": "img/nope.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "0"}]})
    lines = [json.dumps(r) for r in records] + ['{"id": "broken", "conversations": [']
    path = root / "mix.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_dataset(root, data_path, backend="pil"):
    loader = ImagePreprocessor(16, 16, CLIP_MEAN, CLIP_STD, backend=backend)
    dataset, tokenizer = build_llava_dataset(data_path, str(root), str(root / "cache"), seed=7,
                                             seq_length=SEQ, num_image_tokens=P,
                                             image_loader=loader, vocab_size=64)
    return dataset, tokenizer


@pytest.fixture()
def mix(tmp_path):
    return tmp_path, write_mix(tmp_path)


def test_batch_shapes_images_and_modality(mix):
    root, path = mix
    dataset, tokenizer = make_dataset(root, path)
    assert len(dataset) == 14  # the missing image and the broken line are dropped at index time
    batch = dataset.batch(list(range(len(dataset))))
    b = len(dataset)
    real = ~batch["padding_mask"]
    width = int(real.sum(dim=1).max())  # cut to the longest sample of the micro-batch
    assert width < SEQ
    for key in ("tokens", "labels", "loss_mask", "position_ids", "modality", "padding_mask"):
        assert batch[key].shape == (b, width), key
    assert torch.equal(real, batch["modality"] != PAD)
    n_images = batch["images"].shape[0]
    assert batch["images"].shape[1:] == (3, 16, 16)
    image_positions = batch["tokens"] == dataset.image_token_id
    assert int(image_positions.sum()) == n_images * P
    assert torch.equal(batch["modality"] == IMAGE, image_positions)
    # text up to each row's length, padding after; the loss is only on text positions
    assert bool(((batch["modality"] == PAD) <= (batch["tokens"] == tokenizer.pad_id)).all())
    assert bool((batch["loss_mask"][batch["modality"] != TEXT] == 0).all())
    assert dataset.image_token_id == tokenizer.vocab_size
    # labels are the next tokens (inside each row's real positions)
    inside = real[:, 1:]
    assert torch.equal(batch["labels"][:, :-1][inside], batch["tokens"][:, 1:][inside])


def test_bad_samples_counted_by_kind_and_replaced(mix):
    root, path = mix
    dataset, _ = make_dataset(root, path)
    assert dataset.index.bad_samples.counts == {MISSING_IMAGE: 1, MALFORMED_JSON: 1}
    batch = dataset.batch(list(range(len(dataset))))
    assert dataset.bad_samples.counts == {CORRUPT_IMAGE: 1, TOO_MANY_IMAGE_TAGS: 1}
    assert dataset.bad_samples.examples[CORRUPT_IMAGE] == ["corrupt"]
    # every row is a real sample: each has answer tokens
    assert bool((batch["loss_mask"].sum(dim=1) > 0).all())
    report = dataset.report()
    for kind in (CORRUPT_IMAGE, TOO_MANY_IMAGE_TAGS, MISSING_IMAGE, MALFORMED_JSON):
        assert kind in report


def test_replacement_is_deterministic_for_a_fresh_process(mix):
    """A resumed run (no memory of earlier bad records) replaces exactly as the original."""
    root, path = mix
    warm, _ = make_dataset(root, path)
    everything = warm.batch(list(range(2 * len(warm))))  # two epochs
    cold, _ = make_dataset(root, path)
    positions = list(range(len(warm) + 3, 2 * len(warm)))
    resumed = cold.batch(positions)
    start = len(warm) + 3
    width = resumed["tokens"].shape[1]  # each micro-batch is cut to its own longest sample
    assert bool((everything["modality"][start:, width:] == PAD).all())
    for key in ("tokens", "loss_mask", "modality"):
        assert torch.equal(resumed[key], everything[key][start:, :width]), key
    # the images of the resumed rows are the same images, in the same order
    rows_with_image = (everything["modality"] == IMAGE).any(dim=1)
    before = int(rows_with_image[:start].sum())
    assert torch.equal(resumed["images"], everything["images"][before:])


def test_dp_ranks_split_the_global_batch_without_overlap(mix):
    root, path = mix
    dataset, _ = make_dataset(root, path)
    global_batch = 8
    seen = []
    for consumed in (0, 8, 16):
        for rank in range(2):
            for positions in micro_batch_indices(consumed, global_batch, 2, rank, 2):
                seen += positions
    assert sorted(seen) == list(range(24))


def test_dali_and_pil_batches_agree(mix):
    pytest.importorskip("nvidia.dali")
    root, path = mix
    pil, _ = make_dataset(root, path, backend="pil")
    dali, _ = make_dataset(root, path, backend="dali")
    positions = list(range(len(pil)))
    a, b = pil.batch(positions), dali.batch(positions)
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.allclose(a["images"], b["images"], atol=1e-4)
    assert pil.bad_samples.counts == dali.bad_samples.counts
