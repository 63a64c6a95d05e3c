"""Data that would silently turn a run into something else stops it, with a message that says why.

* ``check_index_health``: before step 1, the share of unusable records over all records of
  ``--data-path`` must not exceed ``--max-bad-sample-fraction``, and a vision-language run
  needs at least one usable record with an image (a wrong ``--image-root`` makes every image
  missing; without this check such a run trains on its text-only records alone);
* ``check_text_health``: the same threshold for the text-only loader's records;
* ``check_in_use_health``: the records found unusable while training (corrupt images, image
  tokens that do not fit ``--seq-length``, ...) over the records tried so far must not exceed
  ``--max-bad-sample-fraction`` either, once ``MIN_BAD_IN_USE`` of them were found (a
  fraction of a handful of samples says little).

The errors name the flag to change, the most frequent bad kinds and example record ids.
"""

from __future__ import annotations

from megatron_stgc.data.llava_index import BadSampleCounter

MIN_BAD_IN_USE = 10
TOP_KINDS = 3


class DataError(ValueError):
    """The data cannot train the configured run; raised the same way on every rank."""


def top_kinds(counter: BadSampleCounter, count: int = TOP_KINDS) -> str:
    """``kind: n (e.g. id1, id2)`` for the ``count`` most frequent kinds, one per line."""
    ranked = sorted(counter.counts.items(), key=lambda item: (-item[1], item[0]))[:count]
    return "\n".join(f"  {kind}: {n} (e.g. {', '.join(counter.examples.get(kind, []))})"
                     for kind, n in ranked)


def check_index_health(index, max_fraction: float, needs_images: bool,
                       data_flag: str = "--data-path") -> None:
    """index: a LlavaMix (``bad_samples``, ``num_records``, ``num_with_image``, ``report``);
    data_flag: the flag that named its files (--valid-data-path for validation records)."""
    bad, total = index.bad_samples.total, index.num_records
    if total and bad / total > max_fraction:
        raise DataError(
            f"{data_flag}: {bad} of {total} records ({100 * bad / total:.1f}%) are unusable, "
            f"more than --max-bad-sample-fraction {max_fraction}; most frequent:\n"
            f"{top_kinds(index.bad_samples)}\n{_hint(index.bad_samples)}"
            f"full report:\n{index.report()}")
    if needs_images and index.num_with_image == 0:
        raise DataError(
            f"{data_flag}: none of the {len(index)} usable records has an image, but "
            "--vision-model-type is set: the run would train on text alone. Check "
            f"--image-root (the folder the records' image paths are relative to).\n"
            f"{index.report()}")


def check_text_health(bad: BadSampleCounter, num_records: int, max_fraction: float,
                      data_flag: str = "--data-path") -> None:
    """The text-only loader's bad records (data/text_records.py) over all its records."""
    if num_records and bad.total / num_records > max_fraction:
        raise DataError(
            f"{data_flag}: {bad.total} of {num_records} records "
            f"({100 * bad.total / num_records:.1f}%) are unusable, more than "
            f"--max-bad-sample-fraction {max_fraction}; most frequent:\n{top_kinds(bad)}\n"
            f"{_hint(bad)}")


def check_in_use_health(bad_in_use: BadSampleCounter, consumed_samples: int,
                        max_fraction: float) -> None:
    """bad_in_use: the in-use bad samples of all ranks; consumed_samples: samples trained on."""
    bad = bad_in_use.total
    tried = consumed_samples + bad
    if bad < MIN_BAD_IN_USE or bad / tried <= max_fraction:
        return
    raise DataError(
        f"{bad} of the {tried} records tried so far ({100 * bad / tried:.1f}%) were unusable "
        f"in use, more than --max-bad-sample-fraction {max_fraction}; most frequent:\n"
        f"{top_kinds(bad_in_use)}\n{_hint(bad_in_use)}")


_HINTS = {
    "missing_image": "missing_image: check --image-root",
    "image_truncated": "image_truncated: --seq-length leaves no room for the image tokens "
                       "where they stand in these records; raise --seq-length",
    "corrupt_image": "corrupt_image: the image files cannot be decoded",
}


def _hint(counter: BadSampleCounter) -> str:
    lines = [_HINTS[kind] for kind in sorted(counter.counts) if kind in _HINTS]
    lines.append("(raise --max-bad-sample-fraction to train on the usable records anyway)")
    return "\n".join(lines) + "\n"
