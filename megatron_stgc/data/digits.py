"""A small LLaVA-format instruction mix on real images: scikit-learn's handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 8x8 grayscale scans (values 0..16)
inside the package, so nothing is downloaded. ``build_digits_mix(output_dir)``
writes::

    output_dir/
      images/digit_0000.png ... digit_1796.png   8x8 8-bit grayscale ("L"), value*255/16
                                                  rounded (native size: the loader resizes)
      train.json            LLaVA conversation list (image questions + text-only samples)
      val.json              the validation questions in the same conversation format
                            (validation loss)
      val_questions.jsonl   LLaVA eval question layout, one per line:
                            {"question_id", "image" (absent for text-only), "text", "category"}
      val_answers.jsonl     ground truth: {"question_id", "answer", "category"}
      manifest.json         parameters + counts; written last (marks a complete mix)

Question types over the same images, whose answers conflict (the same image
needs a different answer depending on the question)::

    digit              "Which digit is shown?"            -> "7"
    even               "Is the digit even?"               -> "yes" / "no"   (0 is even)
    greater_than_four  "Is the digit greater than four?"  -> "yes" / "no"
    plus_one           "What is the digit plus one?"      -> "8"            (9 -> "10")

Each type has a few phrasings (chosen at random per sample); answers are one
short token/word. In ``train.json``/``val.json`` the human turn of an image
question starts with ``"<image>\\n"``. In ``val_questions.jsonl`` the "text"
has NO ``<image>`` tag, as in LLaVA's ``model_vqa`` question files: the
evaluator adds the tag when the line has an "image" (our
``megatron_stgc.data.conversation.prompt_tokens`` does so).

``question_first=True`` (beyond MoE-LLaVA's layout; issue 22) puts the question before
the image: the human turn is ``"<question>\\n<image>"`` in train.json / val.json, and the
"text" of val_questions.jsonl carries the same tag at its end (the evaluator keeps a tag
where it is). Under causal attention the image tokens then see the question, so an image
token's route can depend on what is asked.

Text-only samples (no "image" key, category "text") come from
``instruct_text.generate_conversations``: ``text_only_fraction`` of the
records of train.json, and the same fraction of the validation questions
(their reference answer is the generator's full answer sentence). The text
generator's task families are small, so some validation text questions also
occur in train; the manifest counts them (``val_text_seen_in_train``).

The train/validation split is by image (stratified per digit class, so both
sides hold every digit in proportion): no validation image is in train.
Everything is deterministic given the parameters. Building writes into a
temporary sibling directory and renames it into place; a later call with the
same parameters finds the manifest and reuses the mix (``"reused": True``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Optional

import numpy as np

from megatron_stgc.data import instruct_text

MIX_FORMAT_VERSION = 1  # bump when the files written change (invalidates existing mixes)
IMAGE_TAG = "<image>"
TEXT_CATEGORY = "text"

QUESTION_PHRASINGS: dict[str, tuple[str, ...]] = {
    "digit": ("Which digit is shown?", "What digit is this?", "Which digit is in the image?"),
    "even": ("Is the digit even?", "Is this digit an even number?", "Is the shown digit even?"),
    "greater_than_four": ("Is the digit greater than four?", "Is this digit larger than 4?",
                          "Is the shown digit bigger than four?"),
    "plus_one": ("What is the digit plus one?", "What is this digit plus 1?",
                 "Add one to the shown digit."),
}
QUESTION_TYPES: tuple[str, ...] = tuple(QUESTION_PHRASINGS)

MANIFEST = "manifest.json"
FILES = ("train.json", "val.json", "val_questions.jsonl", "val_answers.jsonl")


def answer_for(question_type: str, label: int) -> str:
    """The reference answer of ``question_type`` for a digit ``label`` (0..9)."""
    if question_type == "digit":
        return str(label)
    if question_type == "even":
        return "yes" if label % 2 == 0 else "no"
    if question_type == "greater_than_four":
        return "yes" if label > 4 else "no"
    if question_type == "plus_one":
        return str(label + 1)
    raise ValueError(f"unknown question type {question_type!r}; known: {QUESTION_TYPES}")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """sklearn digit values 0..16 -> uint8 0..255 (value * 255 / 16, rounded)."""
    return np.rint(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)


def image_name(index: int) -> str:
    """Path of digit ``index`` relative to the mix directory (the image root)."""
    return f"images/digit_{index:04d}.png"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0..16, labels int64 [1797]) from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def split_by_image(labels: np.ndarray, val_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train image indices, val image indices), both sorted; stratified per label.

    Each class contributes ``round(val_fraction * class size)`` images to val,
    chosen by a seeded permutation.
    """
    rng = np.random.default_rng([seed, 1])
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(val_fraction * len(members)))
        val.append(rng.permutation(members)[:count])
    val_indices = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_indices] = False
    return np.flatnonzero(train_mask), val_indices


def _text_count(image_records: int, text_only_fraction: float) -> int:
    """Text-only records so that they are ``text_only_fraction`` of all records."""
    return int(round(image_records * text_only_fraction / (1.0 - text_only_fraction)))


def _image_questions(indices: np.ndarray, labels: np.ndarray, types_per_image: list[list[str]],
                     rng: np.random.Generator) -> list[dict]:
    """One dict per (image, type): id, image, question (no tag), answer, category."""
    items = []
    for index, types in zip(indices.tolist(), types_per_image):
        for question_type in types:
            phrasings = QUESTION_PHRASINGS[question_type]
            items.append({"id": f"digit_{index:04d}_{question_type}", "image": image_name(index),
                          "question": phrasings[int(rng.integers(len(phrasings)))],
                          "answer": answer_for(question_type, int(labels[index])),
                          "category": question_type})
    return items


def _tagged(question: str, question_first: bool) -> str:
    """The human turn of an image question: the <image> tag before or after the question."""
    return f"{question}\n{IMAGE_TAG}" if question_first else f"{IMAGE_TAG}\n{question}"


def _conversation_record(item: dict, question_first: bool) -> dict:
    """LLaVA conversation record; image questions get the <image> tag (_tagged)."""
    record: dict = {"id": item["id"]}
    question = item["question"]
    if "image" in item:
        record["image"] = item["image"]
        question = _tagged(question, question_first)
    record["conversations"] = [{"from": "human", "value": question},
                               {"from": "gpt", "value": item["answer"]}]
    return record


def _parameters(seed: int, val_fraction: float, text_only_fraction: float,
                questions_per_image: int, question_first: bool) -> dict:
    return {"seed": int(seed), "val_fraction": float(val_fraction),
            "text_only_fraction": float(text_only_fraction),
            "questions_per_image": int(questions_per_image),
            "question_first": bool(question_first),
            "question_types": list(QUESTION_TYPES),
            "format_version": MIX_FORMAT_VERSION,
            "text_generator_version": instruct_text.GENERATOR_VERSION}


def _result(output_dir: str, manifest: dict, reused: bool, seconds: float) -> dict:
    return {"output_dir": output_dir,
            "image_root": output_dir,
            "images_dir": os.path.join(output_dir, "images"),
            "train": os.path.join(output_dir, "train.json"),
            "val": os.path.join(output_dir, "val.json"),
            "val_questions": os.path.join(output_dir, "val_questions.jsonl"),
            "val_answers": os.path.join(output_dir, "val_answers.jsonl"),
            "manifest": os.path.join(output_dir, MANIFEST),
            "counts": manifest["counts"],
            "parameters": manifest["parameters"],
            "reused": reused,
            "seconds": round(seconds, 3)}


def read_manifest(output_dir: str) -> Optional[dict]:
    """The manifest of a complete mix in ``output_dir``, else None.

    Complete: manifest.json parses, every data file exists and the images
    directory holds the manifest's number of PNGs.
    """
    try:
        with open(os.path.join(output_dir, MANIFEST)) as f:
            manifest = json.load(f)
        if not all(os.path.isfile(os.path.join(output_dir, name)) for name in FILES):
            return None
        pngs = [n for n in os.listdir(os.path.join(output_dir, "images")) if n.endswith(".png")]
        if len(pngs) != manifest["counts"]["images"]:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json_list(path: str, records: list[dict]) -> None:
    """A JSON list with one record per line (valid JSON, easy to grep)."""
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def _write_mix(directory: str, parameters: dict) -> dict:
    """Write every file of the mix into ``directory`` (exists, empty); the manifest."""
    seed = parameters["seed"]
    val_fraction = parameters["val_fraction"]
    text_only_fraction = parameters["text_only_fraction"]
    questions_per_image = parameters["questions_per_image"]
    question_first = parameters["question_first"]

    from PIL import Image

    images, labels = load_digits_arrays()
    os.makedirs(os.path.join(directory, "images"))
    for index, pixels in enumerate(images):
        Image.fromarray(to_uint8(pixels)).save(os.path.join(directory, image_name(index)))

    train_images, val_images = split_by_image(labels, val_fraction, seed)
    type_rng = np.random.default_rng([seed, 2])
    if questions_per_image >= len(QUESTION_TYPES):
        train_types = [list(QUESTION_TYPES)] * len(train_images)
    else:  # a seeded subset of distinct types per training image, in canonical order
        train_types = [[QUESTION_TYPES[i] for i in sorted(type_rng.permutation(
            len(QUESTION_TYPES))[:questions_per_image])] for _ in train_images]
    phrasing_rng = np.random.default_rng([seed, 3])
    train_items = _image_questions(train_images, labels, train_types, phrasing_rng)
    val_items = _image_questions(val_images, labels, [list(QUESTION_TYPES)] * len(val_images),
                                 phrasing_rng)

    train_text = _text_count(len(train_items), text_only_fraction)
    val_text = _text_count(len(val_items), text_only_fraction)
    texts = instruct_text.generate_conversations(train_text + val_text, seed=seed)
    train_items += [{"id": f"text_{i:05d}", "question": c.question, "answer": c.answer,
                     "category": TEXT_CATEGORY} for i, c in enumerate(texts[:train_text])]
    val_items += [{"id": f"text_{train_text + i:05d}", "question": c.question,
                   "answer": c.answer, "category": TEXT_CATEGORY}
                  for i, c in enumerate(texts[train_text:])]
    train_questions = {c.question for c in texts[:train_text]}

    order = np.random.default_rng([seed, 4]).permutation(len(train_items))
    train_records = [_conversation_record(train_items[i], question_first)
                     for i in order.tolist()]
    _write_json_list(os.path.join(directory, "train.json"), train_records)
    _write_json_list(os.path.join(directory, "val.json"),
                     [_conversation_record(item, question_first) for item in val_items])
    with open(os.path.join(directory, "val_questions.jsonl"), "w") as f:
        for item in val_items:
            line = {"question_id": item["id"]}
            text = item["question"]
            if "image" in item:
                line["image"] = item["image"]
                if question_first:  # LLaVA's evaluators add the tag in front unless present
                    text = _tagged(text, question_first)
            line.update({"text": text, "category": item["category"]})
            f.write(json.dumps(line) + "\n")
    with open(os.path.join(directory, "val_answers.jsonl"), "w") as f:
        for item in val_items:
            f.write(json.dumps({"question_id": item["id"], "answer": item["answer"],
                                "category": item["category"]}) + "\n")

    def by_category(items):
        counts = {name: 0 for name in QUESTION_TYPES + (TEXT_CATEGORY,)}
        for item in items:
            counts[item["category"]] += 1
        return counts

    counts = {
        "images": int(len(images)),
        "train_images": int(len(train_images)),
        "val_images": int(len(val_images)),
        "train_records": len(train_records),
        "train_by_category": by_category(train_items),
        "val_questions": len(val_items),
        "val_by_category": by_category(val_items),
        "val_text_seen_in_train": sum(c.question in train_questions for c in texts[train_text:]),
    }
    manifest = {"parameters": parameters, "counts": counts}
    with open(os.path.join(directory, MANIFEST), "w") as f:  # last: marks the mix complete
        json.dump(manifest, f, indent=2)
    return manifest


def build_digits_mix(output_dir: str, seed: int = 0, val_fraction: float = 0.2,
                     text_only_fraction: float = 0.2, questions_per_image: int = 4,
                     question_first: bool = False) -> dict:
    """Build (or reuse) the digits instruction mix in ``output_dir``.

    val_fraction: share of the images (per digit class) held out for validation.
    text_only_fraction: share of text-only records in train.json (and of the
      validation questions), in [0, 1).
    questions_per_image: question types per TRAINING image (1..4; 4 = every type;
      fewer = a seeded subset per image). Validation images always get every type.
    question_first: the question before the <image> tag (module docstring).

    Returns {"output_dir", "image_root", "images_dir", "train", "val",
    "val_questions", "val_answers", "manifest" (paths), "counts", "parameters",
    "reused" (True when an identical complete mix was already there), "seconds"}.
    Raises ValueError for bad parameters, or when ``output_dir`` is a non-empty
    directory that is not a digits mix (it is never deleted then).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= text_only_fraction < 1.0:
        raise ValueError(f"text_only_fraction must be in [0, 1), got {text_only_fraction}")
    if not 1 <= questions_per_image <= len(QUESTION_TYPES):
        raise ValueError(f"questions_per_image must be in 1..{len(QUESTION_TYPES)}, "
                         f"got {questions_per_image}")
    start = time.perf_counter()
    output_dir = os.path.abspath(output_dir)
    parameters = _parameters(seed, val_fraction, text_only_fraction, questions_per_image,
                             question_first)
    existing = read_manifest(output_dir)
    if existing is not None and existing.get("parameters") == parameters:
        return _result(output_dir, existing, True, time.perf_counter() - start)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(
            os.path.join(output_dir, MANIFEST)):
        raise ValueError(f"{output_dir} is a non-empty directory without a digits-mix "
                         f"{MANIFEST}; refusing to replace it")

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp", dir=parent)
    try:
        manifest = _write_mix(tmp, parameters)
        existing = read_manifest(output_dir)  # another process may have finished meanwhile
        if existing is not None and existing.get("parameters") == parameters:
            return _result(output_dir, existing, True, time.perf_counter() - start)
        if os.path.exists(output_dir):  # an older/different mix (or an empty dir): replace it
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old", dir=parent)
            try:
                os.rename(output_dir, os.path.join(old, "mix"))
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, output_dir)
        except OSError:
            # another process finished first: use its mix if it is the same one
            existing = read_manifest(output_dir)
            if existing is not None and existing.get("parameters") == parameters:
                return _result(output_dir, existing, True, time.perf_counter() - start)
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _result(output_dir, manifest, False, time.perf_counter() - start)
