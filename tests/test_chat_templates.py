"""--chat-template: MoE-LLaVA's conversation strings, token ids and loss masks, checked on a
tiny GPT-2-style byte-level BPE tokenizer built here (no download) against

* the prompt text written out by hand from moellava/conversation.py (conv_stablelm/conv_phi);
* MoE-LLaVA's rule re-derived independently in this file: ``tokenizer_image_token``
  (mm_utils.py:43-62) for the ids and ``preprocess_phi``'s round arithmetic (train.py:602-641)
  for the targets, in MoE-LLaVA's own layout (one -200 placeholder per image, IGNORE = -100);
* for a text-only conversation, a third way: the tokens whose character offsets overlap an
  answer (its text and its <|endoftext|>).
"""

from __future__ import annotations

import json

import pytest

from megatron_stgc.data.chat_templates import (MOE_LLAVA_SYSTEM, TEMPLATE_MISMATCH,
                                               TEMPLATE_TURNS, check_tokenizer_fits, get_template)
from megatron_stgc.data.conversation import BadConversation
from megatron_stgc.data.tokenizer import load_tokenizer, train_tokenizer

pytest.importorskip("transformers")

IMAGE_PLACEHOLDER, IGNORE = -200, -100  # MoE-LLaVA's IMAGE_TOKEN_INDEX, IGNORE_INDEX
N_IMAGE = 3
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A black cat on a mat."},
    {"from": "human", "value": "What colour is the cat?"},
    {"from": "gpt", "value": "Black."},
]
EXPECTED_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat "
    "is in the picture? ASSISTANT: A black cat on a mat.<|endoftext|>USER: What colour is the "
    "cat? ASSISTANT: Black.<|endoftext|>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [MOE_LLAVA_SYSTEM, "USER: ASSISTANT: What is in the picture? A black cat on a mat.",
              "What colour is the cat? Black. The dog is brown."]
    raw.train_from_iterator(corpus * 40, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                      unk_token="<unk>")
    path = tmp_path_factory.mktemp("gpt2_like")
    wrapped.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return load_tokenizer(hf_dir)


# -- MoE-LLaVA's rule, re-derived here in its own layout ---------------------------------

def _their_image_tokens(prompt: str, tok) -> list[int]:
    """tokenizer_image_token: chunks tokenized with tokenizer(chunk).input_ids, -200 between
    (this tokenizer adds no BOS, so no offset)."""
    out: list[int] = []
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            out.append(IMAGE_PLACEHOLDER)
        out += tok(chunk).input_ids
    return out


def _their_targets(conversation: str, tok) -> tuple[list[int], list[int]]:
    """preprocess_phi's input_ids and targets for one conversation string."""
    input_ids = _their_image_tokens(conversation, tok)
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur_len = 0
    for rou in conversation.split("<|endoftext|>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(_their_image_tokens(rou, tok)) + 1
        instruction_len = len(_their_image_tokens(parts[0], tok)) - 1
        target[cur_len:cur_len + instruction_len] = [IGNORE] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE] * (len(target) - cur_len)
    if cur_len != len(input_ids):
        target = [IGNORE] * len(target)
    return input_ids, target


def _to_our_layout(input_ids, target, image_id):
    """-200 -> N_IMAGE copies of our image id (never a target); mask = target != IGNORE."""
    ids, mask = [], []
    for token, label in zip(input_ids, target):
        if token == IMAGE_PLACEHOLDER:
            ids += [image_id] * N_IMAGE
            mask += [0] * N_IMAGE
        else:
            ids.append(token)
            mask.append(int(label != IGNORE))
    return ids, mask


def _ours(template, turns, tokenizer, has_image=True, max_length=512):
    out = template.tokenize(turns, tokenizer, has_image=has_image,
                            image_token_id=tokenizer.vocab_size, num_image_tokens=N_IMAGE,
                            max_length=max_length)
    return out.tokens.tolist(), out.loss_mask.tolist()


@pytest.mark.parametrize("name", ["moe-llava-stablelm", "moe-llava-phi", "moe-llava-qwen"])
def test_text_ids_and_mask_equal_moe_llavas_preprocessing(name, tokenizer):
    template = get_template(name)
    assert template.text_of(CONVERSATION) == EXPECTED_TEXT
    expected = _to_our_layout(*_their_targets(EXPECTED_TEXT, tokenizer.tok), tokenizer.vocab_size)
    ids, mask = _ours(template, CONVERSATION, tokenizer)
    assert (ids, mask) == expected
    answers = tokenizer.tok.decode([t for t, m in zip(ids, mask) if m])
    assert answers == " A black cat on a mat.<|endoftext|> Black.<|endoftext|>"


def test_text_only_mask_is_the_answer_characters(tokenizer):
    """Third derivation: tokens whose character span overlaps an answer or its separator."""
    turns = [{"from": "human", "value": "What colour is the dog?"},
             {"from": "gpt", "value": "The dog is brown."},
             {"from": "human", "value": "And the cat?"}, {"from": "gpt", "value": "Black."}]
    template = get_template("moe-llava-phi")
    text = template.text_of(turns)
    ids, mask = _ours(template, turns, tokenizer, has_image=False)
    spans = []
    for answer in ("The dog is brown.<|endoftext|>", "Black.<|endoftext|>"):
        start = text.index(answer)
        spans.append((start, start + len(answer)))
    encoded = tokenizer.tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoded.input_ids == ids
    by_offsets = [int(any(a < end and b > start for start, end in spans))
                  for a, b in encoded.offset_mapping]
    assert mask == by_offsets


def test_generation_prompt_and_stop_strings(tokenizer):
    template = get_template("moe-llava-stablelm")
    prompt = template.prompt("What is it?")
    assert prompt == MOE_LLAVA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"
    assert template.stop_strings == ("<|endoftext|>",)
    ids = template.prompt_tokens("What is it?", tokenizer, has_image=True,
                                 image_token_id=tokenizer.vocab_size, num_image_tokens=N_IMAGE)
    assert ids == _to_our_layout(_their_image_tokens(prompt, tokenizer.tok), [0] * 200,
                                 tokenizer.vocab_size)[0]
    assert get_template("plain").stop_strings == ("<|user|>",)  # the next user turn
    plain = get_template("plain").prompt_tokens("What is it?", tokenizer, has_image=False,
                                                image_token_id=0, num_image_tokens=1)
    assert plain == tokenizer.encode("<|user|> What is it?\n<|assistant|>")


def test_moe_llava_turn_rules(tokenizer):
    template = get_template("moe-llava-phi")
    leading_gpt = [{"from": "gpt", "value": "Hello."}] + CONVERSATION
    assert _ours(template, leading_gpt, tokenizer) == _ours(template, CONVERSATION, tokenizer)
    with pytest.raises(BadConversation) as error:
        _ours(template, [CONVERSATION[0], CONVERSATION[2], CONVERSATION[1]], tokenizer)
    assert error.value.kind == TEMPLATE_TURNS
    # an answer holding " ASSISTANT: " splits its round in three: MoE-LLaVA masks the whole
    # sample ("tokenization mismatch"); here it is a counted bad sample
    confusing = [CONVERSATION[0], {"from": "gpt", "value": "I said ASSISTANT: hello."}]
    assert _their_targets(template.text_of(confusing), tokenizer.tok)[1] == \
        [IGNORE] * len(_their_image_tokens(template.text_of(confusing), tokenizer.tok))
    with pytest.raises(BadConversation) as error:
        _ours(template, confusing, tokenizer)
    assert error.value.kind == TEMPLATE_MISMATCH


def test_moe_llava_plain_stage1(tokenizer):
    template = get_template("moe-llava-plain")
    turns = [{"from": "human", "value": "Describe the image.\n<image>"},
             {"from": "gpt", "value": "A black cat."}]
    ids, mask = _ours(template, turns, tokenizer)
    image = [tokenizer.vocab_size] * N_IMAGE
    assert ids == image + tokenizer.tok("A black cat.\n").input_ids  # the question is dropped
    assert mask == [0] * N_IMAGE + [1] * (len(ids) - N_IMAGE)
    with pytest.raises(BadConversation) as error:
        _ours(template, CONVERSATION, tokenizer)
    assert error.value.kind == TEMPLATE_TURNS


def test_separator_must_be_one_token(tmp_path, tokenizer):
    check_tokenizer_fits(get_template("moe-llava-phi"), tokenizer, "hf")
    spm = load_tokenizer(train_tokenizer(["a b c d e f g USER ASSISTANT"] * 20, 60,
                                         str(tmp_path / "spm.model")))
    with pytest.raises(ValueError, match="--chat-template moe-llava-phi: --tokenizer-model"):
        check_tokenizer_fits(get_template("moe-llava-phi"), spm, str(tmp_path / "spm.model"))


def test_llava_dataset_uses_the_template_and_counts_mismatches(tmp_path, hf_dir, tokenizer):
    from megatron_stgc.data.llava_dataset import build_llava_dataset

    records = [{"id": "ok", "conversations": CONVERSATION[2:]},
               {"id": "confusing", "conversations": [
                   CONVERSATION[2], {"from": "gpt", "value": "I said ASSISTANT: hello."}]}]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(records))
    dataset, _ = build_llava_dataset(str(path), None, str(tmp_path / "cache"), seed=1,
                                     seq_length=64, num_image_tokens=N_IMAGE, image_loader=None,
                                     tokenizer_model=hf_dir, chat_template="moe-llava-phi")
    batch = dataset.batch([0, 1])  # both rows end up as the good record
    ids, mask = _ours(get_template("moe-llava-phi"), CONVERSATION[2:], tokenizer,
                      has_image=False)
    for row in range(2):  # inputs are ids[:-1], labels ids[1:] (rows cut to the longest sample)
        assert batch["tokens"][row, :len(ids) - 1].tolist() == ids[:-1]
        assert batch["labels"][row, :len(ids) - 1].tolist() == ids[1:]
        assert batch["loss_mask"][row, :len(ids) - 1].tolist() == mask[1:]
    assert dataset.bad_samples.counts == {TEMPLATE_MISMATCH: 1}
