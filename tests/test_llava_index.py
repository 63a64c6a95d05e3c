"""LlavaIndex spans, rebuild, bad-sample counting, and the ShardedSampler."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from megatron_stgc.data.llava_index import (BAD_IMAGE_FIELD, BAD_TURN, EMPTY_CONVERSATIONS,
                                            MALFORMED_JSON, MISSING_IMAGE, NO_ASSISTANT_TURN,
                                            NON_UTF8, LlavaIndex, ShardedSampler,
                                            json_list_spans)

TRICKY_VALUES = ['say "hi" \\ then {leave}', "braces } { ] [ inside",
                 "unicode: caf\u00e9 \u2615 \U0001F600",
                 'escaped quote at end \\"', "\\\\", "comma, colon: [1, {2}]"]


def make_records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        record = {"id": f"r{i}", "conversations": [
            {"from": "human",
             "value": ("<image>\n" if i % 2 else "") + TRICKY_VALUES[i % len(TRICKY_VALUES)]},
            {"from": "gpt", "value": TRICKY_VALUES[(i + 1) % len(TRICKY_VALUES)]}]}
        if i % 2:
            record["image"] = f"img/{i}.jpg"
        records.append(record)
    return records


def write_jsonl(path, raw_lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    return str(path)


def write_json_list(path, raw_items: list[bytes]) -> str:
    path.write_bytes(b"[\n  " + b",\n  ".join(raw_items) + b"\n]\n")
    return str(path)


def dumps(record: dict, ascii_only: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_only).encode("utf-8")


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_records_round_trip(tmp_path, fmt, ascii_only):
    records = make_records(13)
    raw = [dumps(r, ascii_only) for r in records]
    writer = write_jsonl if fmt == "jsonl" else write_json_list
    path = writer(tmp_path / f"data.{fmt}", raw)
    with LlavaIndex(path) as index:
        assert index.format == fmt
        assert len(index) == len(records) and index.bad_samples.total == 0
        assert index.spans.dtype == np.int64 and index.spans.shape == (13, 2)
        assert isinstance(index.spans, np.memmap)
        for i, record in enumerate(records):
            assert index.record(i) == record
            assert index.raw(i) == raw[i]


def test_json_list_spans_compact_and_nested(tmp_path):
    records = make_records(5)
    data = json.dumps(records, separators=(",", ":")).encode()  # no whitespace at all
    spans = json_list_spans(data)
    assert [json.loads(data[s:s + n]) for s, n in spans] == records


def test_index_reused_and_rebuilt_on_change(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [dumps(r, True) for r in make_records(4)])
    with LlavaIndex(path) as index:
        assert index.rebuilt and len(index) == 4
    with LlavaIndex(path) as index:
        assert not index.rebuilt
    write_jsonl(tmp_path / "data.jsonl", [dumps(r, True) for r in make_records(7)])
    with LlavaIndex(path) as index:
        assert index.rebuilt and len(index) == 7
        assert index.record(6)["id"] == "r6"
    os.utime(path, ns=(0, 0))  # same size, different mtime
    with LlavaIndex(path) as index:
        assert index.rebuilt


def test_cache_dir(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [dumps(r, True) for r in make_records(3)])
    cache = tmp_path / "cache"
    with LlavaIndex(path, cache_dir=str(cache)) as index:
        assert index.spans_path.startswith(str(cache)) and len(index) == 3
    assert not any(name.endswith(".npy") for name in os.listdir(tmp_path))


BAD_RECORDS = {
    MALFORMED_JSON: b'{"id": "m1", "conversations" [{"from": "gpt", "value": "x"}]}',
    NON_UTF8: b'{"id": "u1", "conversations": [{"from": "gpt", "value": "\xff\xfe"}]}',
    NO_ASSISTANT_TURN: b'{"id": "n1", "conversations": [{"from": "human", "value": "hi"}]}',
    EMPTY_CONVERSATIONS: b'{"id": "e1", "conversations": []}',
    BAD_TURN: b'{"id": "t1", "conversations": [{"from": "gpt"}]}',
    MISSING_IMAGE: b'{"id": "i1", "image": "img/missing.jpg", '
                   b'"conversations": [{"from": "gpt", "value": "a"}]}',
    BAD_IMAGE_FIELD: b'{"id": "f1", "image": ["a.jpg", "b.jpg"], '
                     b'"conversations": [{"from": "gpt", "value": "a"}]}',
}


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_bad_samples_counted_by_kind(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.jpg").write_bytes(b"")
    good = [b'{"id": "g0", "image": "img/ok.jpg", "conversations": '
            b'[{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}]}',
            b'{"id": "g1", "conversations": [{"from": "assistant", "value": "a"}]}']
    raw = [good[0]] + list(BAD_RECORDS.values()) + [BAD_RECORDS[NO_ASSISTANT_TURN], good[1]]
    if fmt == "jsonl":
        raw.insert(3, b"{not json at all")
    writer = write_jsonl if fmt == "jsonl" else write_json_list
    path = writer(tmp_path / f"data.{fmt}", raw)
    with LlavaIndex(path, image_root=str(tmp_path)) as index:
        assert [index.record(i)["id"] for i in range(len(index))] == ["g0", "g1"]
        counts, examples = index.bad_samples.counts, index.bad_samples.examples
        expected = {kind: 1 for kind in BAD_RECORDS}
        expected[NO_ASSISTANT_TURN] = 2
        if fmt == "jsonl":
            expected[MALFORMED_JSON] = 2
        assert counts == expected
        assert examples[NO_ASSISTANT_TURN] == ["n1", "n1"]
        assert examples[EMPTY_CONVERSATIONS] == ["e1"] and examples[MISSING_IMAGE] == ["i1"]
        assert examples[NON_UTF8] == ["#2"]  # undecodable: position, not id
        report = index.report()
        for kind in BAD_RECORDS:
            assert kind in report
        assert f"2 of {len(raw)} records usable" in report
    # without an image root, image existence is not checked
    with LlavaIndex(path) as index:
        assert MISSING_IMAGE not in index.bad_samples.counts and index.rebuilt
        assert index.bad_samples.counts[BAD_IMAGE_FIELD] == 1  # checked with or without root


def run_positions(num_samples, seed, dp_size, gbs, consumed, count):
    """{rank: first ``count`` (position, record) pairs} of every rank."""
    streams = {}
    for rank in range(dp_size):
        sampler = ShardedSampler(num_samples, seed, rank, dp_size, consumed, global_batch_size=gbs)
        positions = list(itertools.islice(sampler.positions(), count))
        streams[rank] = [(p, sampler.record_index(p)) for p in positions]
    return streams


def test_sampler_deterministic_and_permutation_per_epoch():
    a = list(itertools.islice(ShardedSampler(10, 3, 0, 1), 30))
    b = list(itertools.islice(ShardedSampler(10, 3, 0, 1), 30))
    assert a == b
    for epoch in range(3):
        assert sorted(a[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert a[:10] != a[10:20]  # re-seeded per epoch
    assert a[:10] == np.random.default_rng([3, 0]).permutation(10).tolist()
    assert a != list(itertools.islice(ShardedSampler(10, 4, 0, 1), 30))


def test_sampler_dp_split_is_contiguous_per_global_batch():
    from megatron_stgc.data.dataset import micro_batch_indices
    num_samples, gbs, dp_size = 37, 12, 3
    streams = run_positions(num_samples, 0, dp_size, gbs, 0, count=4 * 8)
    for rank in range(dp_size):
        positions = [p for p, _ in streams[rank]]
        for step in range(8):
            expected = micro_batch_indices(step * gbs, gbs, 2, rank, dp_size)
            assert positions[step * 4:(step + 1) * 4] == sum(expected, [])
    # together the ranks cover every position once, through the epoch boundary at 37
    every = sorted(p for stream in streams.values() for p, _ in stream)
    assert every == list(range(8 * gbs))
    records = dict(pair for stream in streams.values() for pair in stream)
    assert sorted(records[p] for p in range(37)) == list(range(37))
    assert sorted(records[p] for p in range(37, 74)) == list(range(37))


@pytest.mark.parametrize("consumed", [0, 1, 5, 12, 13, 36, 37, 40, 59])
def test_sampler_resume_equals_uninterrupted(consumed):
    num_samples, gbs, dp_size, count = 37, 12, 3, 40
    full = run_positions(num_samples, 7, dp_size, gbs, 0, count=count)
    resumed = run_positions(num_samples, 7, dp_size, gbs, consumed, count=count // 2)
    for rank in range(dp_size):
        suffix = [pair for pair in full[rank] if pair[0] >= consumed]
        assert resumed[rank] == suffix[:len(resumed[rank])]
    # no repeat or skip: consumed prefix + resumed streams tile the positions
    before = {p for stream in full.values() for p, _ in stream if p < consumed}
    after = [p for stream in resumed.values() for p, _ in stream]
    assert len(after) == len(set(after)) and not before & set(after)
    assert set(range(consumed)) <= before


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ShardedSampler(10, 0, 2, 2)
    with pytest.raises(ValueError):
        ShardedSampler(10, 0, 0, 4, global_batch_size=6)
    with pytest.raises(ValueError):
        ShardedSampler(0, 0, 0, 1)


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_synthetic_mix_tool(tmp_path, fmt):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = os.path.join(repo, "tools", "make_synthetic_mix.py")
    path = str(tmp_path / f"mix.{fmt}")
    subprocess.run([sys.executable, tool, "--output", path, "--num-samples", "40",
                    "--bad-every", "5"], check=True)
    with LlavaIndex(path) as index:
        assert index.num_records == 40 and len(index) == 32
        assert index.bad_samples.counts == {MALFORMED_JSON: 2, NON_UTF8: 2,
                                            NO_ASSISTANT_TURN: 2, EMPTY_CONVERSATIONS: 2}
        records = [index.record(i) for i in range(len(index))]
    with_image = [r for r in records if "image" in r]
    assert with_image and len(with_image) < len(records)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in with_image)
    assert not any("<image>" in r["conversations"][0]["value"] for r in records if "image" not in r)


def test_json_list_stray_elements_counted_not_dropped(tmp_path):
    good = dumps(make_records(1)[0], True)
    path = write_json_list(tmp_path / "data.json", [good, b"42", b'"text"', b"null", good])
    (tmp_path / "data.json").write_bytes((tmp_path / "data.json").read_bytes() + b"trailing")
    with LlavaIndex(path) as index:
        assert len(index) == 2 and index.bad_samples.counts == {MALFORMED_JSON: 4}


def test_utf8_bom_and_broken_json_list(tmp_path):
    raw = [dumps(r, False) for r in make_records(3)]
    for fmt, writer in (("jsonl", write_jsonl), ("json", write_json_list)):
        path = writer(tmp_path / f"bom.{fmt}", raw)
        with_bom = b"\xef\xbb\xbf" + (tmp_path / f"bom.{fmt}").read_bytes()
        (tmp_path / f"bom.{fmt}").write_bytes(with_bom)
        with LlavaIndex(path) as index:
            assert index.format == fmt and [index.raw(i) for i in range(3)] == raw
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'[{"id": "a", "conversations": [{"from": "gpt", "value": "x}]}\n')
    with pytest.raises(ValueError, match="unterminated"):
        LlavaIndex(str(broken))
