"""The exported model's transformers tokenizer: ours, with the image token at our image id.

* a Hugging Face tokenizer (``--tokenizer-model`` a tokenizer directory / ``tokenizer.json``,
  or a tiktoken file read by data/tiktoken_bpe.py) is written as it is (a copy of the loaded
  transformers tokenizer; ``save_pretrained`` writes its ``tokenizer.json``);
* our SentencePiece model (the toy's, trained at first run) becomes a ``tokenizers`` BPE with
  the same ids (``spm_hf.py``).

``<image>`` is added as a special token; it must land on our image id (the first id past the
tokenizer's largest, data/llava_dataset.py), else ExportError naming both ids.
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron_stgc.export.lm_export import ExportError

IMAGE_TOKEN = "<image>"


def transformers_tokenizer(tokenizer, image_token_id: Optional[int]):
    """A transformers tokenizer with our ids (and ``<image>`` at ``image_token_id``)."""
    from tokenizers import AddedToken

    from megatron_stgc.data.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        tok = copy.deepcopy(tokenizer.tok)
    else:
        from megatron_stgc.export.spm_hf import transformers_tokenizer as from_spm

        tok = from_spm(tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(tokenizer.pad_id)
    if image_token_id is None:
        return tok
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                       special_tokens=True)
    got = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:
        raise ExportError(f"the tokenizer ({tokenizer.model_path}) gives {IMAGE_TOKEN} id {got}; "
                          f"the model's image token is {image_token_id} (one past the "
                          "tokenizer's largest id)")
    return tok
