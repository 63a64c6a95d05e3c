"""--tokenizer-model with a Hugging Face tokenizer directory (a converted model's own BPE
tokenizer), built locally with the tokenizers library: encode/decode, EOS, and a LLaVA
conversation tokenized with it (image ids past its vocabulary)."""

from __future__ import annotations

import pytest

from megatron_stgc.data.conversation import tokenize_conversation
from megatron_stgc.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    raw.train_from_iterator(["Which digit is shown? seven 7 yes no"] * 50, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                      unk_token="<unk>")
    path = tmp_path_factory.mktemp("hf_tok")
    wrapped.save_pretrained(str(path))
    return str(path)


def test_directory_loads_as_hf_tokenizer(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("Which digit is shown?")
    assert tokenizer.decode(ids) == "Which digit is shown?"
    assert tokenizer.eos_id == tokenizer.tok.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_id not in ids  # no special tokens added by encode


def test_sentencepiece_file_still_loads_as_sentencepiece(tmp_path):
    path = train_tokenizer(["a b c d e f g"] * 20, 40, str(tmp_path / "spm.model"))
    assert isinstance(load_tokenizer(path), Tokenizer)


def test_conversation_with_hf_tokenizer(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    image_id = tokenizer.vocab_size
    out = tokenize_conversation(
        [{"from": "human", "value": "<image>\nWhich digit is shown?"},
         {"from": "gpt", "value": "seven"}], tokenizer, has_image=True,
        image_token_id=image_id, num_image_tokens=3, max_length=64)
    ids = out.tokens.tolist()
    assert ids.count(image_id) == 3
    answer = [t for t, m in zip(ids, out.loss_mask.tolist()) if m]
    assert answer == tokenizer.encode("seven") + [tokenizer.eos_id]
