#!/usr/bin/env python
"""How long --tokenizer-model takes to read a tiktoken file of a real model's size.

No Qwen-1 or Arcade100k file is available offline, so this trains a byte-level BPE of
``--vocab`` tokens on local text files (tokenizers' BpeTrainer), writes it as a
``qwen.tiktoken`` rank file, and times megatron_stgc's conversion of it
(data/tiktoken_bpe.py): reading the ranks, recovering the merges, and the whole
``load_tokenizer``. Every training process pays the last figure once at start-up.

    python tools/bench_tiktoken_load.py --files '/usr/lib/python3*/**/*.py' --vocab 100000
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_stgc.data import tiktoken_bpe  # noqa: E402
from megatron_stgc.data.tokenizer import load_tokenizer  # noqa: E402


def trained_ranks(files: list[str], vocab: int) -> dict[bytes, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train(files, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {char: byte for byte, char in tiktoken_bpe.byte_alphabet().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(raw.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(byte_of[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", required=True, help="glob of text files to train on")
    parser.add_argument("--max-files", type=int, default=4000)
    parser.add_argument("--vocab", type=int, default=100000)
    args = parser.parse_args()
    files = sorted(glob.glob(args.files, recursive=True))[:args.max_files]
    ranks = trained_ranks(files, args.vocab)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "qwen.tiktoken")
        with open(path, "w") as f:
            for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        start = time.perf_counter()
        read = tiktoken_bpe.read_ranks(path)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        for token in read:
            if len(token) > 1:
                tiktoken_bpe.last_merge(token, read)
        merges_s = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer = load_tokenizer(path)
        total_s = time.perf_counter() - start
    print(f"{len(files)} files, {len(ranks)} ranks: read {read_s:.1f} s, merges {merges_s:.1f} s, "
          f"load_tokenizer {total_s:.1f} s (vocab size {tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
