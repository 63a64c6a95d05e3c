#!/usr/bin/env python
"""Write a synthetic LLaVA-format instruction mix (JSON list or JSONL), streamed.

Each record is ``{"id", ["image"], "conversations": [human, gpt, ...]}``; about
``--image-fraction`` of them have an image (``images/<n>.jpg``, not created) and
``<image>\\n`` at the start of the first human turn. With ``--bad-every K`` every
K-th record is deliberately bad, cycling through: malformed JSON, non-UTF-8
bytes, no gpt turn, empty conversations. Deterministic for a given --seed.

  python tools/make_synthetic_mix.py --output /tmp/mix.jsonl --num-samples 1000000
"""

from __future__ import annotations

import argparse
import json
import random

QUESTIONS = ["What is shown in the picture?", "Describe the scene in detail.",
             "What is {a} + {b}?", "Name an animal that says \"moo\".",
             "Write {{\"key\": [1, 2]}} as YAML.", "Translate 'caf\u00e9' to English."]
ANSWERS = ["A cat sitting on a red mat next to a window.", "{a} + {b} = {c}.",
           "A cow says \"moo\" \\ sometimes.", "key:\n  - 1\n  - 2", "Coffee (\u2615)."]
BAD_KINDS = ("malformed", "non_utf8", "no_gpt", "empty")


def good_record(number: int, rng: random.Random, image_fraction: float) -> dict:
    """One valid record with 1-3 human/gpt turn pairs."""
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    turns = []
    for _ in range(rng.randint(1, 3)):
        turns.append({"from": "human", "value": rng.choice(QUESTIONS).format(a=a, b=b)})
        turns.append({"from": "gpt", "value": rng.choice(ANSWERS).format(a=a, b=b, c=a + b)})
    record = {"id": f"s{number:07d}"}
    if rng.random() < image_fraction:
        record["image"] = f"images/{number:07d}.jpg"
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    record["conversations"] = turns
    return record


def bad_record_bytes(number: int, kind: str) -> bytes:
    """Serialized deliberately-bad record of ``kind`` (one of BAD_KINDS)."""
    rid = f"bad{number:07d}"
    if kind == "malformed":
        # missing ':' but balanced brackets, so a JSON list around it still scans
        return f'{{"id": "{rid}", "conversations" [{{"from": "gpt", "value": "x"}}]}}'.encode()
    if kind == "non_utf8":
        return (f'{{"id": "{rid}", "conversations": [{{"from": "gpt", "value": "'.encode()
                + b"\xff\xfe" + b'"}]}')
    if kind == "no_gpt":
        return json.dumps({"id": rid, "conversations": [{"from": "human", "value": "hi"}]}).encode()
    return json.dumps({"id": rid, "conversations": []}).encode()


def record_bytes(number: int, rng: random.Random, args) -> bytes:
    if args.bad_every and number % args.bad_every == args.bad_every - 1:
        return bad_record_bytes(number, BAD_KINDS[(number // args.bad_every) % len(BAD_KINDS)])
    return json.dumps(good_record(number, rng, args.image_fraction),
                      ensure_ascii=False).encode("utf-8")


def write_mix(args) -> None:
    rng = random.Random(args.seed)
    jsonl = args.format == "jsonl" or (args.format is None and args.output.endswith(".jsonl"))
    with open(args.output, "wb", buffering=1 << 20) as out:
        if not jsonl:
            out.write(b"[\n")
        for number in range(args.num_samples):
            data = record_bytes(number, rng, args)
            if jsonl:
                out.write(data + b"\n")
            else:
                out.write((b",\n" if number else b"") + data)
        if not jsonl:
            out.write(b"\n]\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-samples", type=int, default=1_000_000)
    parser.add_argument("--format", choices=("json", "jsonl"), default=None,
                        help="default: from the output's extension (.jsonl, else json)")
    parser.add_argument("--image-fraction", type=float, default=0.6)
    parser.add_argument("--bad-every", type=int, default=0,
                        help="make every K-th record bad (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    write_mix(parser.parse_args())


if __name__ == "__main__":
    main()
