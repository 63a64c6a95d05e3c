"""Embedded data: deterministic generation, cached tokenizer, packing, loss mask, DP split."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_stgc.data.data_errors import DataError
from megatron_stgc.data.dataset import (build_dataset, load_conversations, micro_batch_indices,
                                        pack_conversations)
from megatron_stgc.data.instruct_text import (ASSISTANT_TAG, format_conversation,
                                              generate_conversations)
from megatron_stgc.data.tokenizer import get_or_train_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    dataset, tokenizer = build_dataset(seq_length=32, seed=7, cache_dir=cache, num_samples=600)
    return dataset, tokenizer, cache


def test_generator_is_deterministic_and_varied():
    a, b = generate_conversations(200, seed=3), generate_conversations(200, seed=3)
    assert a == b
    assert generate_conversations(200, seed=4) != a
    assert len({c.question.split()[0] for c in a}) >= 4  # several task families
    assert any("=" in c.answer for c in a)


def test_tokenizer_is_trained_once_and_cached(data):
    dataset, tokenizer, cache = data
    models = [f for f in os.listdir(cache) if f.endswith(".model")]
    assert len(models) == 1
    mtime = os.path.getmtime(os.path.join(cache, models[0]))
    texts = [format_conversation(c) for c in generate_conversations(600, seed=0)]
    again = get_or_train_tokenizer(texts, 512, cache)
    assert again.model_path == tokenizer.model_path
    assert os.path.getmtime(again.model_path) == mtime
    assert ASSISTANT_TAG in tokenizer.sp.id_to_piece(list(range(tokenizer.vocab_size)))


def test_loss_mask_covers_answers_only(data):
    dataset, tokenizer, _ = data
    batch = dataset.batch([0])
    labels, mask = batch["labels"][0], batch["loss_mask"][0]
    answer_text = tokenizer.decode(labels[mask.bool()].tolist())
    prompt_text = tokenizer.decode(labels[~mask.bool()].tolist())
    assert "?" not in answer_text or "=" in answer_text  # answers, not questions
    assert "What" in prompt_text or "How" in prompt_text or "Spell" in prompt_text or \
        "Sort" in prompt_text or "Compute" in prompt_text or "Calculate" in prompt_text
    assert (labels[mask.bool()] == tokenizer.eos_id).any()  # each answer ends with EOS


def test_batches_are_deterministic_and_shaped(data):
    dataset, _, _ = data
    a, b = dataset.batch([0, 5, len(dataset) + 2]), dataset.batch([0, 5, len(dataset) + 2])
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert a[key].shape == (3, 32)
        assert torch.equal(a[key], b[key])
    assert torch.equal(a["tokens"][:, 1:], a["labels"][:, :-1])


def test_every_epoch_visits_every_sample_once(data):
    dataset, _, _ = data
    for epoch in range(2):
        rows = [dataset.sample_index(epoch * len(dataset) + i) for i in range(len(dataset))]
        assert sorted(rows) == list(range(len(dataset)))


def test_data_parallel_split_is_contiguous_slices():
    per_rank = [micro_batch_indices(100, 8, 2, rank, 2) for rank in range(2)]
    assert per_rank == [[[100, 101], [102, 103]], [[104, 105], [106, 107]]]
    single = micro_batch_indices(100, 8, 2, 0, 1)
    assert single == per_rank[0] + per_rank[1]


def test_long_conversations_are_truncated_with_a_warning(data):
    _, tokenizer, _ = data
    from megatron_stgc.data.instruct_text import Conversation

    long = Conversation("What is " + "one plus " * 40 + "one?", "Many.")
    with pytest.warns(UserWarning, match="1 of 1 conversations"):
        tokens, mask = pack_conversations([long], tokenizer, seq_length=16)
    assert tokens.shape == (1, 17)


def test_data_path_formats(tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"question": "Q1?", "answer": "A1."}) + "\n"
                     + json.dumps({"prompt": "Q2?", "response": "A2."}) + "\n")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Q3?"}, {"from": "gpt", "value": "A3."},
        {"from": "human", "value": "Q4?"}, {"from": "gpt", "value": "A4."}]}]))
    assert [c.answer for c in load_conversations(str(jsonl))] == ["A1.", "A2."]
    assert [c.question for c in load_conversations(str(llava))] == ["Q3?", "Q4?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no_question_answer: 1 \(e.g. bad.jsonl:#0\)"):
        load_conversations(str(bad))
