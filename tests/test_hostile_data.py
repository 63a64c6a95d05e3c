"""Instruction data from the internet: no record may crash a run or read outside the image root.

Real files on disk, the real index, tokenizer, conversation tokenization, image loader and
data set. The fuzz test throws seeded random mutations of valid records (structure, types,
text, bytes, image paths and files) at all of them.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from megatron_stgc.data.images import (CLIP_MEAN, CLIP_STD, IMAGE_TOO_LARGE, ImagePreprocessor,
                                       dali_available)
from megatron_stgc.data.llava_dataset import all_bad_sample_kinds, build_llava_dataset
from megatron_stgc.data.llava_index import LlavaIndex
from megatron_stgc.data.record_checks import (IMAGE_OUTSIDE_ROOT, INVALID_UNICODE, MAX_STRING_CHARS,
                                              NUL_CHARACTER, TEXT_TOO_LONG)

SEQ, P = 48, 4


def _good(i: int, image: bool = True) -> dict:
    record = {"id": f"good-{i}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + f"Question {i}: which shade?"},
        {"from": "gpt", "value": f"shade {i % 5}"}]}
    if image:
        record["image"] = f"img/{i % 6}.png"
    return record


def _write_images(root) -> None:
    os.makedirs(root / "img", exist_ok=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.new("L", (2000, 1500)).save(root / "img" / "huge.png")  # 3 M pixels
    os.makedirs(root / "img" / "dir.png", exist_ok=True)
    outside = root.parent / f"{root.name}-outside"
    os.makedirs(outside, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside / "secret.png")
    link = root / "img" / "link.png"
    if not link.exists():
        os.symlink(outside / "secret.png", link)


def _write_jsonl(path, lines: list) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")
    return str(path)


def _dataset(root, data_path, tokenizer_model=None, **kwargs):
    loader = ImagePreprocessor(16, 16, CLIP_MEAN, CLIP_STD, backend="pil",
                               max_pixels=kwargs.pop("max_pixels", 1_000_000))
    return build_llava_dataset(data_path, str(root), str(root / "cache"), seed=3,
                               seq_length=SEQ, num_image_tokens=P, image_loader=loader,
                               vocab_size=64, tokenizer_model=tokenizer_model, **kwargs)


def _all_batches(dataset, epochs: int = 2, batch: int = 8):
    total = len(dataset) * epochs
    for start in range(0, total, batch):
        dataset.batch(list(range(start, min(start + batch, total))))


# -- text ------------------------------------------------------------------------------

def test_lone_surrogate_null_and_absurd_lengths_are_counted(tmp_path):
    _write_images(tmp_path)
    bad = [
        b'{"id": "surrogate", "conversations": [{"from": "human", "value": "\\udcff hi"}, '
        b'{"from": "gpt", "value": "x"}]}',  # plain ASCII on disk, a valid JSON escape
        {"id": "nul", "conversations": [{"from": "human", "value": "a\x00b"},
                                        {"from": "gpt", "value": "x"}]},
        {"id": "long", "conversations": [{"from": "human", "value": "a" * (MAX_STRING_CHARS + 1)},
                                         {"from": "gpt", "value": "x"}]},
        b'{"id": "deep", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", '
        b'"value": "a"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"id": "\\ud800", "conversations": []}',  # a surrogate id in the report line
    ]
    path = _write_jsonl(tmp_path / "mix.jsonl", [_good(i) for i in range(6)] + bad)
    dataset, tokenizer = _dataset(tmp_path, path)  # trains the tokenizer on the records
    counts = dataset.index.bad_samples.counts
    assert counts[INVALID_UNICODE] == 2 and counts[NUL_CHARACTER] == 1
    assert counts[TEXT_TOO_LONG] == 1 and counts["malformed_json"] == 1  # too deep to parse
    assert len(dataset) == 6
    report = dataset.report()
    report.encode("utf-8")  # printable: the surrogate id is escaped
    assert "\\ud800" in report
    _all_batches(dataset)


# -- paths -----------------------------------------------------------------------------

def _path_records(root) -> list[dict]:
    outside = root.parent / f"{root.name}-outside" / "secret.png"

    def with_image(name, image):
        record = _good(0)
        record["id"], record["image"] = name, image
        return record

    return [with_image("dotdot", f"../{root.name}-outside/secret.png"),
            with_image("absolute", str(outside)),
            with_image("link", "img/link.png"),
            with_image("inside", "img/1.png"),
            with_image("inside_dotdot", "img/../img/2.png")]


def test_image_paths_outside_the_root_are_refused_and_counted(tmp_path):
    root = tmp_path / "data"
    _write_images(root)
    path = _write_jsonl(root / "mix.jsonl", _path_records(root))
    dataset, _ = _dataset(root, path)
    assert dataset.index.bad_samples.counts == {IMAGE_OUTSIDE_ROOT: 3}
    assert sorted(dataset.index.bad_samples.examples[IMAGE_OUTSIDE_ROOT]) == [
        "absolute", "dotdot", "link"]
    opened = []
    loader = dataset.image_loader
    original = loader.load
    loader.load = lambda paths: (opened.extend(paths), original(paths))[1]
    _all_batches(dataset)
    assert opened and all(os.path.realpath(p).startswith(str(os.path.realpath(root)) + os.sep)
                          for p in opened)


def test_opting_in_lets_images_outside_the_root_load(tmp_path):
    root = tmp_path / "data"
    _write_images(root)
    path = _write_jsonl(root / "mix.jsonl", _path_records(root))
    dataset, _ = _dataset(root, path, allow_image_outside_root=True)
    assert dataset.index.bad_samples.total == 0 and len(dataset) == 5


def test_a_link_redirected_after_indexing_is_refused_in_use(tmp_path):
    root = tmp_path / "data"
    _write_images(root)
    os.symlink(root / "img" / "3.png", root / "img" / "moving.png")
    record = _good(0)
    record["id"], record["image"] = "moving", "img/moving.png"
    path = _write_jsonl(root / "mix.jsonl", [record, _good(1), _good(2)])
    dataset, _ = _dataset(root, path)
    assert dataset.index.bad_samples.total == 0
    os.remove(root / "img" / "moving.png")
    os.symlink(tmp_path / "data-outside" / "secret.png", root / "img" / "moving.png")
    _all_batches(dataset)
    assert dataset.bad_samples.counts == {IMAGE_OUTSIDE_ROOT: 1}


# -- image size --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_an_image_over_the_pixel_cap_is_counted_not_decoded(tmp_path, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia.dali is not installed")
    _write_images(tmp_path)
    loader = ImagePreprocessor(16, 16, backend=backend, max_pixels=1_000_000)
    images, failures = loader.load([str(tmp_path / "img" / "1.png"),
                                    str(tmp_path / "img" / "huge.png")])
    assert images.shape == (1, 3, 16, 16)
    assert [(i, e.kind) for i, e in failures] == [(1, IMAGE_TOO_LARGE)]
    assert "2000x1500" in failures[0][1].detail
    images, failures = ImagePreprocessor(16, 16, backend=backend, max_pixels=4_000_000).load(
        [str(tmp_path / "img" / "huge.png")])
    assert images.shape == (1, 3, 16, 16) and not failures  # under a higher cap it loads


# -- eval question files -----------------------------------------------------------------

def test_eval_refuses_bad_question_text_and_paths_outside_the_root(tmp_path):
    from megatron_stgc.eval.generate import GreedyDecoder

    root = tmp_path / "data"
    _write_images(root)
    dataset, tokenizer = _dataset(root, _write_jsonl(root / "mix.jsonl",
                                                     [_good(i) for i in range(6)]))
    decoder = GreedyDecoder(None, tokenizer, dataset.image_loader, str(root), tokenizer.vocab_size,
                            P, max_new_tokens=2, max_length=SEQ)
    questions = [{"question_id": "ok", "text": "Which shade?", "image": "img/1.png"},
                 {"question_id": "surrogate", "text": json.loads('"\\udcff?"')},
                 {"question_id": "nul", "text": "a\x00b"},
                 {"question_id": "outside", "text": "Which?", "image": "../data-outside/secret.png"},
                 {"question_id": "image_type", "text": "Which?", "image": 7}]
    prompts, errors = decoder._prompts(questions)
    assert sorted(prompts) == [0, 3]
    assert errors[1].startswith(INVALID_UNICODE) and errors[2].startswith(NUL_CHARACTER)
    assert errors[4].startswith("bad_image_field")
    images, refused = decoder.images(questions, skip=errors)
    assert images.shape[0] == 1 and refused[3].startswith(IMAGE_OUTSIDE_ROOT)


def test_answers_with_a_surrogate_prompt_are_written(tmp_path):
    from megatron_stgc.eval import scoring

    text = json.loads('"\\udcff?"')
    scoring.write_answers(tmp_path / "a.jsonl", [{"question_id": "q", "prompt": text,
                                                  "text": ""}])
    line = json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))
    assert line["prompt"] == text


# -- fuzz --------------------------------------------------------------------------------

def _mutate(rng: random.Random, record: dict, root, new_id: str) -> bytes | dict:
    """One random mutation of a valid record (renamed ``new_id``): a dict (written as JSON)
    or raw bytes."""
    r = json.loads(json.dumps(record))
    r["id"] = new_id
    turns = r["conversations"]
    outside = str(root.parent / f"{root.name}-outside" / "secret.png")
    choice = rng.randrange(24)
    if choice == 0:
        del r["conversations"]
    elif choice == 1:
        r["conversations"] = rng.choice([[], "text", 5, None, {"from": "human"}])
    elif choice == 2:
        rng.choice(turns)["value"] = rng.choice([5, None, [], {"a": 1}, True])
    elif choice == 3:
        rng.choice(turns)["from"] = rng.choice(["robot", "", 3, "GPT"])
    elif choice == 4:
        r["conversations"] = [t for t in turns if t["from"] != "gpt"]
    elif choice == 5:
        r["image"] = rng.choice([123, [], "", {"path": "x"}, "img/missing.png", "img/dir.png",
                                 "img/corrupt.png", "img/huge.png"])
    elif choice == 6:
        r["image"] = rng.choice(["../../" + os.path.basename(outside), outside, "img/link.png",
                                 "/etc/hostname", "img/../../x.png"])
    elif choice == 7:
        t = rng.choice(turns)
        t["value"] = t["value"][:3] + rng.choice(["\udcff", "\ud800x", "\x00", "\udfff\ud800"]) \
            + t["value"][3:]
    elif choice == 8:
        rng.choice(turns)["value"] = "z" * (MAX_STRING_CHARS + rng.randrange(1, 100))
    elif choice == 9:
        depth = rng.choice([40, 3000])
        r["extra"] = json.loads("[" * min(depth, 900) + "]" * min(depth, 900)) \
            if depth < 900 else None
        if depth >= 900:
            return json.dumps(r)[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    elif choice == 10:
        turns[0]["value"] += " <image>"
    elif choice == 11:
        turns[1]["value"] = "<image> " + turns[1]["value"]
    elif choice == 12:
        r.pop("image", None)
    elif choice == 13:
        r["id"] = rng.choice(["\udcff", {"a": [1]}, None, "a\x00b", 3.5, "é" * 500])
    elif choice == 14:
        r["conversations"] = turns * rng.choice([2, 600])
    elif choice == 15:
        r["conversations"] = [{"from": "gpt", "value": "only an answer"}]
    elif choice == 16:
        r["conversations"] = [{"from": "human", "value": "q " * 400}, turns[1]]
    else:
        raw = bytearray(json.dumps(r).encode())
        kind = choice - 17
        if kind == 0:
            return bytes(raw[:rng.randrange(1, len(raw))])
        if kind == 1:
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(32, 256)
            return bytes(raw).replace(b"\n", b" ")
        if kind == 2:
            at = rng.randrange(len(raw))
            return bytes(raw[:at]) + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + bytes(raw[at:])
        if kind == 3:
            return bytes(rng.randrange(32, 256) for _ in range(rng.randrange(1, 60))).replace(
                b"\n", b" ")
        if kind == 4:
            return rng.choice([b"[1, 2]", b'"just a string"', b"null", b"3", b"{}", b"[]"])
        if kind == 5:
            return json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return json.dumps(r).encode() + b"  trailing"
    return r


FUZZ_RECORDS = 400


def test_fuzzed_records_never_crash_are_counted_and_leave_good_records_alone(tmp_path):
    root = tmp_path / "data"
    _write_images(root)
    good = [_good(i, image=i % 4 != 0) for i in range(40)]
    clean_path = _write_jsonl(root / "clean.jsonl", good)
    clean, tokenizer = _dataset(root, clean_path)
    rng = random.Random(20261203)
    lines: list = []
    mutated = 0
    for record in good:
        lines.append(record)
        for _ in range(FUZZ_RECORDS // len(good)):
            lines.append(_mutate(rng, rng.choice(good), root, f"mutant-{mutated}"))
            mutated += 1
    rng.shuffle(lines)
    mixed_path = _write_jsonl(root / "mixed.jsonl", lines)

    # the index: never raises, every record is good or counted under a named kind
    index = LlavaIndex(mixed_path, image_root=str(root), cache_dir=str(root / "cache"))
    kinds = set(all_bad_sample_kinds())
    assert set(index.bad_samples.counts) <= kinds, set(index.bad_samples.counts) - kinds
    assert len(index) + index.bad_samples.total == index.num_records == len(lines)
    assert index.bad_samples.total > FUZZ_RECORDS // 2  # most mutations are caught here

    # the data set on the same tokenizer: good records give the same tokens as without the
    # bad ones; every epoch position builds into a batch; in-use rejects are named too
    mixed, _ = _dataset(root, mixed_path, tokenizer_model=tokenizer.model_path)
    ids = {}
    for i in range(len(mixed.index)):
        record_id = mixed.index.record(i).get("id")
        if isinstance(record_id, str) and record_id.startswith("good-"):
            ids.setdefault(record_id, i)
    clean_ids = {clean.index.record(i)["id"]: i for i in range(len(clean.index))}
    assert set(clean_ids) <= set(ids)
    for record_id, i in clean_ids.items():
        expected = clean._tokenize(i)
        got = mixed._tokenize(ids[record_id])
        assert np.array_equal(got.tokens, expected.tokens), record_id
        assert np.array_equal(got.loss_mask, expected.loss_mask), record_id
    _all_batches(mixed, epochs=2, batch=16)
    assert set(mixed.bad_samples.counts) <= kinds, set(mixed.bad_samples.counts) - kinds
    mixed.report().encode("utf-8")


# -- resume ------------------------------------------------------------------------------

def test_in_use_counters_continue_after_a_resume(tmp_path):
    root = tmp_path / "data"
    _write_images(root)
    records = [_good(i) for i in range(12)]
    for name, image in (("corrupt", "img/corrupt.png"), ("huge", "img/huge.png")):
        record = _good(0)
        record["id"], record["image"] = name, image
        records.append(record)
    two_tags = _good(1)
    two_tags["id"] = "two_tags"
    two_tags["conversations"][0]["value"] += " <image>"
    path = _write_jsonl(root / "mix.jsonl", records + [two_tags])

    straight, tokenizer = _dataset(root, path)
    _all_batches(straight, epochs=3, batch=5)

    first, _ = _dataset(root, path, tokenizer_model=tokenizer.model_path)
    second, _ = _dataset(root, path, tokenizer_model=tokenizer.model_path)
    total, split = len(first) * 3, 20
    for start in range(0, split, 5):
        first.batch(list(range(start, start + 5)))
    second.restore_data_state(json.loads(json.dumps(first.data_state())))  # as stored
    for start in range(split, total, 5):
        second.batch(list(range(start, min(start + 5, total))))
    assert straight.bad_samples.total == 3
    assert second.bad_samples.counts == straight.bad_samples.counts
    assert second.truncated == straight.truncated
