#!/usr/bin/env python
"""Does the data loader keep up? Training step time with the real loader against the same
micro-batches prepared in memory, interleaved in one run (docs/DATA_LOADER.md).

One process builds the model of the given training flags (default: the README's main job,
examples/tiny_llava_digits.yaml on the digits mix) and trains ``--rounds`` rounds of
``--block`` steps per variant, the variants' order rotating from round to round:

  loader     the real loader: ``BatchStream`` with ``--num-workers`` spawned workers
             (read, tokenize, decode ahead of the step), as ``megatron-stgc train`` runs;
  memory     the same micro-batches, made before the round and taken from a list;
  in-step    the same micro-batches made inside the step (``--num-workers 0``).

All three train on the identical batches of round r (steps r*block .. (r+1)*block - 1 of
the run's data order), so their step times differ only by how the batches arrive. Prints
and writes (``--output``, JSON) per variant the median step time (wall) and the median CPU
time of the training process per step (what loading adds to the training process itself,
independent of how busy the other cores are), each also as a ratio to ``memory``. The model keeps training through all variants (step times of a tiny model do
not depend on its weights).

    python tools/bench_loader.py --output docs/bench_loader.json
    python tools/bench_loader.py --photos 2000   # 336x336 JPEG photos instead of the digits
    python tools/bench_loader.py -- --data-path D/train.json --image-root D   # your data

``--photos N`` writes N records of tools/make_synthetic_mix.py (60% with an image) and, for
each, a 336x336 JPEG (smooth random colours: a real decode, like LLaVA-665K's COCO crops at
CLIP-336's size), so the loader decodes and downsizes photo-sized files for the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = ("loader", "memory", "in-step")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--block", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="rounds left out of the medians")
    parser.add_argument("--data-dir", default=os.path.join(REPO, "runs", "bench_loader", "data"),
                        help="where the mix is written when no --data-path is given")
    parser.add_argument("--photos", type=int, default=0,
                        help="use N synthetic records with 336x336 JPEGs instead of the digits")
    parser.add_argument("--output", default=None, help="JSON file for the numbers")
    parser.add_argument("train_flags", nargs="*", help="training flags (after --)")
    return parser.parse_args(argv)


def training_flags(args) -> list[str]:
    flags = ["--config", os.path.join(REPO, "examples", "tiny_llava_digits.yaml"),
             "--expert-model-parallel-size", "1", "--save", "none", "--load", "none",
             "--save-interval", "none", "--log-file", "none",
             "--cache-dir", os.path.join(args.data_dir, "..", "cache")]
    if "--data-path" not in args.train_flags:
        if args.photos:
            flags += ["--data-path", photo_mix(args.data_dir, args.photos), "--image-root",
                      os.path.join(args.data_dir, "photos"), "--seq-length", "128"]
        else:
            from megatron_stgc.data.digits import build_digits_mix

            mix = build_digits_mix(args.data_dir)
            flags += ["--data-path", mix["train"], "--image-root", mix["image_root"]]
    return flags + args.train_flags + ["--num-workers", str(args.num_workers)]


def photo_mix(data_dir: str, count: int, size: int = 336) -> str:
    """tools/make_synthetic_mix.py records with their 336x336 JPEGs written (reused if there)."""
    import random

    import numpy as np
    from PIL import Image

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from make_synthetic_mix import good_record

    root = os.path.join(data_dir, "photos")
    path = os.path.join(root, f"mix{count}.jsonl")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng, pixels = random.Random(0), np.random.default_rng(0)
    with open(path + ".tmp", "w") as out:
        for number in range(count):
            record = good_record(number, rng, image_fraction=0.6)
            if "image" in record:
                coarse = pixels.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(
                    os.path.join(root, record["image"]), quality=90)
            out.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)
    return path


class Bench:
    """The model, the data set and one BatchStream; runs a block of steps per variant."""

    def __init__(self, config, total_steps: int):
        from megatron_stgc.data.loader import BatchStream
        from megatron_stgc.training.train import build_run, num_microbatches

        self.config = config
        self.dataset, _, self.objects = build_run(config)
        self.n_micro = num_microbatches(config)
        t = config.training
        self.stream = BatchStream(self.dataset, t.global_batch_size, t.micro_batch_size, 0, 1,
                                  0, total_steps, num_workers=config.data.num_workers)
        self.positions = self.stream.positions
        # in-step batches come from a copy: the loader's counters stay the loader's
        self.inline = pickle.loads(pickle.dumps(self.dataset))
        self.iteration = 0

    def _step(self, batches) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one training step."""
        from megatron_stgc.training.stgc_hooks import run_train_step

        start, cpu = time.perf_counter(), time.process_time()
        run_train_step(self.config, self.objects, batches, self.n_micro, self.iteration)
        self.iteration += 1
        return time.perf_counter() - start, time.process_time() - cpu

    def _micro(self, step: int) -> range:
        return range(step * self.n_micro, (step + 1) * self.n_micro)

    def run(self, variant: str, steps: range, in_memory: dict) -> list[tuple[float, float]]:
        if variant == "loader":
            return [self._step(self.stream.next_step()) for _ in steps]
        if variant == "memory":
            return [self._step(iter(in_memory[step])) for step in steps]
        return [self._step(self.inline.batch(self.positions(k)) for k in self._micro(step))
                for step in steps]

    def prepare(self, steps: range) -> dict:
        return {step: [self.inline.batch(self.positions(k)) for k in self._micro(step)]
                for step in steps}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_stgc import parallel
    from megatron_stgc.config import parse_run_config
    from megatron_stgc.validation import validate_run_config

    config = parse_run_config(training_flags(args))
    validate_run_config(config, 1)
    parallel.initialize_distributed()
    bench = Bench(config, args.rounds * args.block)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    started = time.perf_counter()
    for round_ in range(args.rounds):
        steps = range(round_ * args.block, (round_ + 1) * args.block)
        in_memory = bench.prepare(steps)
        order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
        for variant in order:
            measured = bench.run(variant, steps, in_memory)
            if round_ >= args.warmup:
                times[variant] += [wall for wall, _ in measured]
                cpu[variant] += [seconds for _, seconds in measured]
        print(f"round {round_ + 1}/{args.rounds} ({' '.join(order)}) "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    bench.stream.close()
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    cpu_medians = {variant: statistics.median(values) for variant, values in cpu.items()}
    summary = {"date": time.strftime("%Y-%m-%d"), "num_workers": args.num_workers,
               "block": args.block, "rounds": args.rounds, "warmup_rounds": args.warmup,
               "train_flags": args.train_flags, "median_step_s": medians,
               "ratio_to_memory": {v: medians[v] / medians["memory"] for v in VARIANTS},
               "median_training_process_cpu_s": cpu_medians,
               "cpu_ratio_to_memory": {v: cpu_medians[v] / cpu_medians["memory"]
                                       for v in VARIANTS},
               "steps_per_variant": len(times["memory"]), "step_s": times, "cpu_s": cpu,
               "cores": os.cpu_count(), "load_average": os.getloadavg(),
               "image_loader": bench.dataset.image_loader.describe()}
    for variant in VARIANTS:
        print(f"{variant:9s} median step {medians[variant]:.4f} s  "
              f"{summary['ratio_to_memory'][variant]:.3f}x memory | training process CPU "
              f"{cpu_medians[variant]:.4f} s  {summary['cpu_ratio_to_memory'][variant]:.3f}x",
              flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
