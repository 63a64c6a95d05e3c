#!/usr/bin/env python
"""Build a LlavaIndex for a synthetic 1M-sample LLaVA mix; print build time and memory.

Writes the mix with tools/make_synthetic_mix.py (unless --data exists already),
builds the index (timed, after deleting any old one), then in a fresh process
measures the resident memory the opened index adds to one rank: RSS before
opening, after opening, and after reading --touch random records (the spans
array and the data file are memory-mapped, so only touched pages count).

  python tools/bench_llava_index.py --data /tmp/llava_mix_1m.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_stgc.data.llava_index import LlavaIndex, index_paths  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MiB: VmRSS (all), RssAnon or RssFile."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_rank_memory(data: str, touch: int) -> dict:
    """RSS (MiB) of a process that opens the built index and reads ``touch`` records."""
    before = rss_mb()
    index = LlavaIndex(data)
    assert not index.rebuilt, "index should be built already"
    after_open = rss_mb()
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(index), size=touch):
        index.record(int(i))
    after_touch = rss_mb()
    return {"rss_anon_mb": rss_mb("RssAnon"), "rss_file_mb": rss_mb("RssFile"),
            "rss_before_mb": before, "rss_after_open_mb": after_open,
            "rss_after_touch_mb": after_touch, "index_open_mb": after_open - before,
            "index_touch_mb": after_touch - before, "records": len(index)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/llava_mix_1m.jsonl")
    parser.add_argument("--num-samples", type=int, default=1_000_000)
    parser.add_argument("--touch", type=int, default=10_000, help="records read per rank")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure_rank_memory(args.data, args.touch)))
        return
    if not os.path.exists(args.data):
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                     "make_synthetic_mix.py"),
                        "--output", args.data, "--num-samples", str(args.num_samples)],
                       check=True)
        print(f"wrote {args.data} in {time.perf_counter() - start:.1f} s")
    for stale in index_paths(args.data, None):
        if os.path.exists(stale):
            os.remove(stale)
    start = time.perf_counter()
    index = LlavaIndex(args.data)
    build_s = time.perf_counter() - start
    records, report = len(index), index.report()
    index.close()
    spans_path, _ = index_paths(args.data, None)
    memory = json.loads(subprocess.run(
        [sys.executable, __file__, "--data", args.data, "--touch", str(args.touch),
         "--measure-only"], check=True, capture_output=True, text=True).stdout)
    print(report)
    print(f"data file: {os.path.getsize(args.data) / 2**20:.1f} MiB, {records} usable records")
    print(f"index file: {os.path.getsize(spans_path) / 2**20:.1f} MiB")
    print(f"build time: {build_s:.1f} s (target <= 60 s)")
    print(f"per-rank RSS added by the index: {memory['index_open_mb']:.1f} MiB after open, "
          f"{memory['index_touch_mb']:.1f} MiB after reading {args.touch} records "
          f"(target <= 200 MiB)")
    print(f"  whole process after reading: RSS {memory['rss_after_touch_mb']:.1f} MiB "
          f"(anon {memory['rss_anon_mb']:.1f}, file-backed {memory['rss_file_mb']:.1f}), "
          f"before opening {memory['rss_before_mb']:.1f} MiB")


if __name__ == "__main__":
    main()
