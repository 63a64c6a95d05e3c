#!/usr/bin/env python
"""Build the digits instruction mix (real 8x8 scikit-learn digit images, no download).

    python tools/make_digits_mix.py --output runs/digits/data

Writes OUTPUT/images/*.png, train.json, val.json, val_questions.jsonl,
val_answers.jsonl and manifest.json (see megatron_stgc/data/digits.py); an
existing complete mix built with the same parameters is reused.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_stgc.data.digits import build_digits_mix  # noqa: E402


def describe(mix: dict) -> str:
    counts = mix["counts"]
    lines = [f"digits mix in {mix['output_dir']} "
             f"({'reused' if mix['reused'] else 'built'} in {mix['seconds']:.2f} s)",
             f"  images: {counts['images']} ({counts['train_images']} train, "
             f"{counts['val_images']} val; split by image)",
             f"  train.json: {counts['train_records']} records",
             f"  val questions: {counts['val_questions']} "
             f"({counts['val_text_seen_in_train']} text questions also in train)",
             f"  {'category':<20}{'train':>8}{'val':>8}"]
    for category in counts["train_by_category"]:
        lines.append(f"  {category:<20}{counts['train_by_category'][category]:>8}"
                     f"{counts['val_by_category'].get(category, 0):>8}")
    for key in ("train", "val", "val_questions", "val_answers", "images_dir", "manifest"):
        lines.append(f"  {key}: {mix[key]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/digits/data", help="mix directory")
    parser.add_argument("--seed", type=int, default=0, help="split / phrasing / shuffle seed")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the images held out for validation")
    parser.add_argument("--text-only-fraction", type=float, default=0.2,
                        help="share of text-only records in train (and val questions)")
    parser.add_argument("--questions-per-image", type=int, default=4,
                        help="question types per training image (4 = all)")
    parser.add_argument("--question-first", action="store_true",
                        help="put the question before <image> (image tokens see the question)")
    args = parser.parse_args(argv)
    try:
        mix = build_digits_mix(args.output, seed=args.seed, val_fraction=args.val_fraction,
                               text_only_fraction=args.text_only_fraction,
                               questions_per_image=args.questions_per_image,
                               question_first=args.question_first)
    except ValueError as error:
        parser.error(str(error))
    print(describe(mix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
