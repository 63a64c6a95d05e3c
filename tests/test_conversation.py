"""LLaVA conversations -> token ids and loss masks, <image> expansion, truncation rules."""

import numpy as np
import pytest

from megatron_stgc.data.conversation import (IMAGE_TAG_IN_ANSWER, IMAGE_TAG_WITHOUT_IMAGE,
                                             IMAGE_TRUNCATED, NO_ANSWER_AFTER_TRUNCATION,
                                             NO_USER_TURN, TOO_MANY_IMAGE_TAGS, UNKNOWN_ROLE,
                                             BadConversation, prompt_tokens,
                                             tokenize_conversation)
from megatron_stgc.data.instruct_text import ASSISTANT_TAG, USER_TAG
from megatron_stgc.data.tokenizer import Tokenizer, train_tokenizer

IMAGE_ID = 10_000  # past any id of the tiny vocabulary
P = 5  # image tokens per image


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"{USER_TAG} Which digit is shown?\n{ASSISTANT_TAG} {d}" for d in range(10)]
    texts += [f"{USER_TAG} Is the digit even?\n{ASSISTANT_TAG} yes no" for _ in range(5)]
    texts += ["What is 3 plus 4? The answer is seven. A cow says moo."] * 5
    path = str(tmp_path_factory.mktemp("spm") / "spm.model")
    train_tokenizer(texts, 64, path)
    return Tokenizer(path)


def turns(*pairs):
    out = []
    for human, gpt in pairs:
        out += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return out


def tokenize(tokenizer, conversation, has_image=True, max_length=200):
    return tokenize_conversation(conversation, tokenizer, has_image=has_image,
                                 image_token_id=IMAGE_ID, num_image_tokens=P,
                                 max_length=max_length)


def test_single_turn_with_image_layout_and_mask(tokenizer):
    out = tokenize(tokenizer, turns(("<image>\nWhich digit is shown?", "7")))
    ids, mask = out.tokens.tolist(), out.loss_mask.tolist()
    user_tag = tokenizer.encode(USER_TAG)
    # template tag, then exactly P image ids, then the question and the assistant tag
    assert ids[:len(user_tag)] == user_tag
    assert ids[len(user_tag):len(user_tag) + P] == [IMAGE_ID] * P
    assert ids.count(IMAGE_ID) == P
    question = tokenizer.encode(f"Which digit is shown?\n{ASSISTANT_TAG} ")
    assert ids[len(user_tag) + P:len(user_tag) + P + len(question)] == question
    # loss only on the answer and its EOS
    answer = [t for t, m in zip(ids, mask) if m]
    assert answer == tokenizer.encode("7") + [tokenizer.eos_id]
    assert ids[-len(answer):] == answer and not out.truncated


def test_prompt_tokens_equal_training_prefix(tokenizer):
    out = tokenize(tokenizer, turns(("<image>\nIs the digit even?", "no")))
    prompt = prompt_tokens("<image>\nIs the digit even?", tokenizer, has_image=True,
                           image_token_id=IMAGE_ID, num_image_tokens=P)
    first_answer = out.loss_mask.tolist().index(1)
    assert out.tokens.tolist()[:first_answer] == prompt


def test_image_without_tag_gets_it_in_front(tokenizer):
    tagged = tokenize(tokenizer, turns(("<image>\nWhich digit is shown?", "3")))
    untagged = tokenize(tokenizer, turns(("Which digit is shown?", "3")))
    assert np.array_equal(tagged.tokens, untagged.tokens)


def test_text_only_and_multi_turn(tokenizer):
    out = tokenize(tokenizer, turns(("What is 3 plus 4?", "seven"), ("A cow says?", "moo")),
                   has_image=False)
    ids, mask = out.tokens.tolist(), out.loss_mask.tolist()
    assert IMAGE_ID not in ids
    answered = [t for t, m in zip(ids, mask) if m]
    assert answered == (tokenizer.encode("seven") + [tokenizer.eos_id]
                        + tokenizer.encode("moo") + [tokenizer.eos_id])
    # the second user turn starts right after the first answer's EOS, with mask 0
    first_eos = ids.index(tokenizer.eos_id)
    assert mask[first_eos + 1] == 0
    assert ids[first_eos + 1:first_eos + 1 + len(tokenizer.encode(USER_TAG))] == \
        tokenizer.encode(USER_TAG)


def test_truncation_keeps_beginning(tokenizer):
    full = tokenize(tokenizer, turns(("<image>\nWhich digit is shown?", "7 7 7 7 7 7")))
    cut_at = len(full.tokens) - 3
    cut = tokenize(tokenizer, turns(("<image>\nWhich digit is shown?", "7 7 7 7 7 7")),
                   max_length=cut_at)
    assert cut.truncated and len(cut.tokens) == cut_at
    assert np.array_equal(cut.tokens, full.tokens[:cut_at])
    assert np.array_equal(cut.loss_mask, full.loss_mask[:cut_at])


@pytest.mark.parametrize("conversation,has_image,max_length,kind", [
    (turns(("<image>\nWhich digit?", "7")), False, 200, IMAGE_TAG_WITHOUT_IMAGE),
    (turns(("<image>\nWhich digit?", "7"), ("<image>\nAnd this?", "8")), True, 200,
     TOO_MANY_IMAGE_TAGS),
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "7"}], False, 200, UNKNOWN_ROLE),
    (turns(("<image>\nWhich digit?", "7")), True, 3, IMAGE_TRUNCATED),
    (turns(("A long question about digits and what is shown?", "7")), False, 6,
     NO_ANSWER_AFTER_TRUNCATION),
    ([{"from": "gpt", "value": "7"}], True, 200, NO_USER_TURN),
    (turns(("Which digit?", "<image> 7")), True, 200, IMAGE_TAG_IN_ANSWER),
])
def test_unusable_conversations_name_their_kind(tokenizer, conversation, has_image, max_length,
                                                kind):
    with pytest.raises(BadConversation) as error:
        tokenize(tokenizer, conversation, has_image=has_image, max_length=max_length)
    assert error.value.kind == kind


def test_image_must_lie_inside_the_model_input(tokenizer):
    """The model sees ids[:max_length - 1]; an image whose last id is ids[max_length - 1]
    would reach the model one embedding short, so it counts as truncated."""
    conversation = turns(("What is 3 plus 4?", "seven"), ("<image>", "7"))
    full = tokenize(tokenizer, conversation).tokens.tolist()
    last_image = len(full) - 1 - full[::-1].index(IMAGE_ID)
    fits = tokenize(tokenizer, conversation, max_length=last_image + 2)
    assert fits.truncated and fits.tokens.tolist()[:last_image + 1].count(IMAGE_ID) == P
    with pytest.raises(BadConversation) as error:
        tokenize(tokenizer, conversation, max_length=last_image + 1)
    assert error.value.kind == IMAGE_TRUNCATED
