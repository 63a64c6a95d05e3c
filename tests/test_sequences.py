"""Padding is not computed (issue 20): micro-batches cut to their longest sample, optional
packing, and the tiny MoE-LLaVA computing the same per-sample losses and gradients on packed
rows as on one sample per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_batches import (IMAGE_ID, PAD_ID, SEQ, VOCAB, layout, llava_config, per_sample,
                           real_token_rows, synthetic_samples)
from megatron_stgc.config import ConfigError, config_from_flat
from megatron_stgc.validation import validate_run_config
from megatron_stgc.data.sequences import (lay_out, pack_balanced, pack_first_fit_decreasing,
                                          sequence_multiple)
from megatron_stgc.model.modality import IMAGE, PAD, TEXT
from megatron_stgc.model.packing import block_causal_mask, packed_inputs, thd_packed_seq_params
from stgc_utils import init_single_process


def _samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 90, size=n).astype(np.int64), (rng.random(n) < 0.5).astype(np.int64))
            for n in lengths]


# -- layouts against the slow, obvious construction ----------------------------------------

@pytest.mark.parametrize("multiple", [1, 16])
def test_one_sample_per_row_is_cut_to_the_longest(multiple):
    samples = _samples([9, 23, 5, 17])
    rows = lay_out(samples, seq_length=63, multiple=multiple, pack=False, pad_id=PAD_ID)
    width = -(-22 // multiple) * multiple  # the longest sample has 23 ids: 22 positions
    assert rows.tokens.shape == (4, width)
    for row, (ids, mask) in enumerate(samples):
        n = len(ids) - 1
        assert list(rows.tokens[row, :n]) == list(ids[:-1])
        assert list(rows.labels[row, :n]) == list(ids[1:])
        assert list(rows.loss_mask[row, :n]) == list(mask[1:])
        assert list(rows.position_ids[row, :n]) == list(range(n))
        assert list(rows.segment_ids[row]) == [row] * n + [-1] * (width - n)
        assert (rows.tokens[row, n:] == PAD_ID).all() and (rows.loss_mask[row, n:] == 0).all()


def test_packed_rows_hold_every_sample_intact_with_restarted_positions():
    lengths = [30, 9, 23, 5, 17, 12, 26, 3]
    samples = _samples(lengths, seed=1)
    seq = 32
    rows = lay_out(samples, seq_length=seq, multiple=1, pack=True, pad_id=PAD_ID)
    total = sum(n - 1 for n in lengths)
    assert rows.tokens.shape[0] < len(samples)  # fewer rows than samples
    assert rows.tokens.shape[0] >= -(-total // seq) and rows.tokens.shape[1] <= seq
    seen = []
    for row in range(rows.tokens.shape[0]):
        segments = rows.segment_ids[row]
        real = segments[segments >= 0]
        assert (segments[len(real):] == -1).all()  # samples first, padding at the end
        for sample in dict.fromkeys(real.tolist()):  # in order of appearance
            ids, mask = samples[sample]
            where = np.flatnonzero(segments == sample)
            assert list(where) == list(range(where[0], where[0] + len(ids) - 1))  # contiguous
            assert list(rows.tokens[row, where]) == list(ids[:-1])
            assert list(rows.labels[row, where]) == list(ids[1:])
            assert list(rows.loss_mask[row, where]) == list(mask[1:])
            assert list(rows.position_ids[row, where]) == list(range(len(ids) - 1))
            seen.append(sample)
    assert sorted(seen) == list(range(len(samples)))


def test_first_fit_decreasing_by_hand():
    placement = pack_first_fit_decreasing([5, 8, 3, 4, 2], row_width=10)
    # 8 -> row 0; 5 -> row 1; 4 -> row 1 (0 has 2 left); 3 -> row 2; 2 -> row 0
    assert placement.rows == [1, 0, 2, 1, 0] and placement.offsets == [0, 0, 0, 5, 8]
    assert placement.num_rows == 3
    with pytest.raises(ValueError, match="does not fit a row of 10"):
        pack_first_fit_decreasing([11], row_width=10)


def test_balanced_packing_by_hand():
    placement = pack_balanced([5, 8, 3, 4, 2], num_rows=2)
    # 8 -> row 0; 5 -> row 1; 4 -> row 1 (5 < 8); 3 -> row 0 (8 < 9); 2 -> row 0 (11 > 9? no:
    # fills 11 and 9 -> row 1)
    assert placement.rows == [1, 0, 0, 1, 1] and placement.offsets == [0, 0, 8, 5, 9]


@pytest.mark.parametrize("multiple", [1, 16])
def test_packing_never_computes_more_than_one_sample_per_row(multiple):
    rng = np.random.default_rng(7)
    for _ in range(200):
        lengths = rng.integers(2, 130, size=int(rng.integers(1, 12))).tolist()
        samples = _samples(lengths)
        cut = lay_out(samples, 128, multiple, pack=False, pad_id=PAD_ID)
        packed = lay_out(samples, 128, multiple, pack=True, pad_id=PAD_ID)
        assert packed.tokens.size <= cut.tokens.size
        assert packed.tokens.shape[1] <= 128 and packed.tokens.shape[1] % multiple == 0
        assert int(packed.fill.sum()) == int(cut.fill.sum()) == sum(n - 1 for n in lengths)


def test_sequence_multiple_from_the_run_config():
    def multiple(**flags):
        return sequence_multiple(config_from_flat(flags))

    assert multiple() == 1
    assert multiple(fp8_format="hybrid") == 16
    assert multiple(tensor_model_parallel_size=4, use_te=True) == 4  # sequence parallelism
    assert multiple(tensor_model_parallel_size=3, use_te=True, fp8_format="e4m3") == 48
    assert multiple(tensor_model_parallel_size=2, use_te=False) == 1  # no SP on the local spec


def test_use_packed_sequence_needs_vision_language_data():
    config = config_from_flat({"use_packed_sequence": True})
    with pytest.raises(ConfigError, match="--use-packed-sequence needs --vision-model-type"):
        validate_run_config(config, world_size=1)


# -- attention inside a sample ---------------------------------------------------------

def test_block_causal_mask_and_thd_boundaries_by_hand():
    segments = torch.tensor([[0, 0, 0, 2, 2, -1], [1, 1, 1, 1, 3, 3]])
    mask = block_causal_mask(segments)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                sees = j <= i and segments[b, i] == segments[b, j]
                assert bool(mask[b, 0, i, j]) == (not sees), (b, i, j)
    params = thd_packed_seq_params(segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10, 12] == params.cu_seqlens_kv.tolist()
    assert params.max_seqlen_q == 4 and params.cu_seqlens_q.dtype == torch.int32
    tokens = torch.arange(12).reshape(2, 6)
    (flat, none), mask, thd = packed_inputs("thd", segments, None, (tokens, None))
    assert flat.tolist() == [list(range(12))] and none is None and mask is None
    assert thd.cu_seqlens_q.tolist() == params.cu_seqlens_q.tolist()
    (same,), mask, thd = packed_inputs("mask", segments, None, (tokens,))
    assert same is tokens and torch.equal(mask, block_causal_mask(segments)) and thd is None


# -- the data set, on real files -------------------------------------------------------

def test_packed_dataset_batch_keeps_each_samples_tokens_and_image(tmp_path):
    from test_llava_dataset import P, make_dataset, write_mix

    path = write_mix(tmp_path)
    single, _ = make_dataset(tmp_path, path)
    packed, _ = make_dataset(tmp_path, path)
    packed.pack = True
    positions = list(range(len(single)))
    one, many = single.batch(positions), packed.batch(positions)
    assert many["tokens"].shape[0] < one["tokens"].shape[0]
    assert torch.equal(many["padding_mask"], many["segment_ids"] < 0)
    assert torch.equal(many["modality"] == PAD, many["segment_ids"] < 0)
    image_of = {}  # sample -> its image, read off the unpacked batch (one image per row)
    rows_with_image = (one["modality"] == IMAGE).any(dim=1).nonzero().flatten().tolist()
    for n, row in enumerate(rows_with_image):
        image_of[row] = one["images"][n]
    packed_images = iter(many["images"])  # row-major order of the packed image positions
    for row in range(many["tokens"].shape[0]):
        for sample in dict.fromkeys(many["segment_ids"][row][many["segment_ids"][row] >= 0]
                                    .tolist()):
            where = many["segment_ids"][row] == sample
            real = one["modality"][sample] != PAD
            assert torch.equal(many["tokens"][row][where], one["tokens"][sample][real])
            assert torch.equal(many["modality"][row][where], one["modality"][sample][real])
            if sample in image_of:
                assert torch.equal(next(packed_images), image_of[sample])
    assert next(packed_images, None) is None
    assert set(many["modality"].unique().tolist()) == {PAD, TEXT, IMAGE}
    assert int((many["tokens"] == packed.image_token_id).sum()) == P * len(image_of)


# -- the model: packed == one sample per row -----------------------------------------------

@pytest.fixture(scope="module")
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def _two_images_in_a_row(packed) -> bool:
    return any(len({int(s) for s, m in zip(packed["segment_ids"][row], packed["modality"][row])
                    if m == IMAGE}) >= 2 for row in range(packed["tokens"].shape[0]))


def _packed_case():
    """The first seed whose packed micro-batch reorders the images and has a row with two
    images (what the masked scatter must get right); the batches both ways."""
    for seed in range(50):
        samples, images, has_image = synthetic_samples(6, seed=seed, max_ids=SEQ // 2)
        packed = layout(samples, images, has_image, pack=True)
        if not torch.equal(packed["images"], images) and _two_images_in_a_row(packed):
            return layout(samples, images, has_image), packed
    raise AssertionError("no seed gives a reordered packed micro-batch")


def _model(**flags):
    from megatron_stgc.training.setup import build_model

    torch.manual_seed(0)
    model, _ = build_model(llava_config(**flags), VOCAB, IMAGE_ID)
    return model


def _forward_backward(model, batch):
    """Per-token loss [rows, width] and the gradients of the micro-batch's masked-mean loss
    (megatron's balancing loss included: it rides on the backward)."""
    model.zero_grad()
    keys = ("images", "modality", "padding_mask", "segment_ids")
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 **{k: batch[k] for k in keys if k in batch})
    mask = batch["loss_mask"]
    ((loss * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_packed_losses_and_gradients_equal_one_sample_per_row(parallel_state,
                                                              position_embedding_type):
    model = _model(position_embedding_type=position_embedding_type)
    single, packed = _packed_case()
    assert packed["tokens"].shape[0] < single["tokens"].shape[0]
    loss_one, grads_one = _forward_backward(model, single)
    loss_many, grads_many = _forward_backward(model, packed)
    for sample, (a, b) in enumerate(zip(per_sample(loss_one, single, 6),
                                        per_sample(loss_many, packed, 6))):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"sample {sample} losses")
    assert set(grads_one) == set(grads_many)
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_many[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert grads_one["vision_model.conv1.weight"].abs().sum() > 0


def test_packed_attention_is_what_keeps_samples_apart(parallel_state):
    """The same packed rows with plain causal attention (no segment_ids): losses differ."""
    model = _model()
    _, packed = _packed_case()
    crossing = {k: v for k, v in packed.items() if k != "segment_ids"}
    with torch.no_grad():
        apart = model(packed["tokens"], packed["position_ids"], None, labels=packed["labels"],
                      images=packed["images"], modality=packed["modality"],
                      padding_mask=packed["padding_mask"], segment_ids=packed["segment_ids"])
        mixed = model(crossing["tokens"], crossing["position_ids"], None,
                      labels=crossing["labels"], images=crossing["images"],
                      modality=crossing["modality"], padding_mask=crossing["padding_mask"])
    second = [s for s in range(6) if int(real_token_rows(packed, 6)[s][0]) >= packed[
        "tokens"].shape[0]]  # samples that do not start a row
    assert second
    for sample in second:
        assert not torch.allclose(per_sample(apart, packed, 6)[sample],
                                  per_sample(mixed, packed, 6)[sample])


def test_image_embeddings_land_on_their_samples_in_packed_rows(parallel_state):
    """Rows holding several samples with images: the decoder input at every sample's
    positions equals that sample's own (one-per-row) decoder input, images included."""
    model = _model(position_embedding_type="learned_absolute").eval()
    single, packed = _packed_case()
    assert _two_images_in_a_row(packed)
    with torch.no_grad():
        one = model.combined_embeddings(single["tokens"], single["position_ids"],
                                        single["images"])  # [s, b, h]
        many = model.combined_embeddings(packed["tokens"], packed["position_ids"],
                                         packed["images"])
    flat_one, flat_many = one.reshape(-1, one.shape[-1]), many.reshape(-1, many.shape[-1])
    for a, b in zip(real_token_rows(single, 6), real_token_rows(packed, 6)):
        torch.testing.assert_close(flat_many[b], flat_one[a], rtol=1e-5, atol=1e-6)
