"""Benchmark readers and official scorers (``megatron-stgc eval|score --benchmark NAME``).

One module per benchmark family; layouts, metrics and their sources are in each module's
docstring and in docs/EVAL.md. Pure Python (no torch).
"""

from __future__ import annotations

from megatron_stgc.eval.benchmarks.benchmark import Benchmark


def _registry() -> dict[str, Benchmark]:
    from megatron_stgc.eval.benchmarks.generic import GenericLlava
    from megatron_stgc.eval.benchmarks.gqa import GQA
    from megatron_stgc.eval.benchmarks.mmbench import MMBench
    from megatron_stgc.eval.benchmarks.mme import MME
    from megatron_stgc.eval.benchmarks.pope import POPE
    from megatron_stgc.eval.benchmarks.sqa import ScienceQA
    from megatron_stgc.eval.benchmarks.vqa import VQAv2, TextVQA, VizWiz

    benchmarks = [GenericLlava(), VQAv2(), GQA(), VizWiz(), TextVQA(), ScienceQA(), POPE(), MME(),
                  MMBench()]
    return {b.name: b for b in benchmarks}


BENCHMARK_NAMES = ("llava", "vqav2", "gqa", "vizwiz", "textvqa", "sqa-img", "pope", "mme",
                   "mmbench")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; ValueError listing the names otherwise."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"--benchmark {name!r} is not one of {', '.join(BENCHMARK_NAMES)}")
    return registry[name]
