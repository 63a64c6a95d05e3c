#!/usr/bin/env python
"""How much of each micro-batch is real tokens, and what a real token costs: before (every
row --seq-length wide), after (rows cut to the micro-batch's longest sample) and packed
(--use-packed-sequence), side by side in one run.

  1. real positions / computed positions on the digits mix (tools/make_digits_mix.py; the
     package's own LlavaSFTDataset.batch, real tokenizer and images, --seq-length 48,
     --micro-batch-size 8 as examples/tiny_llava_digits.yaml) and on a synthetic LLaVA-like
     mix at 2048 positions (576 image tokens + text lengths drawn per source of LLaVA-665K,
     see LLAVA_665K_SOURCES; micro-batch 8 as MoE-LLaVA's stage III);
  2. CPU time of forward + backward per real token for small MoE-LLaVA models, the layouts
     interleaved over the same micro-batches: the digits model, and a tiny model at 2048
     positions on the synthetic mix (--skip-long-timing leaves it out).

    python tools/make_digits_mix.py --output runs/digits/data
    python tools/bench_sequences.py --digits-dir runs/digits/data --output docs/bench_sequences
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

LAYOUTS = ("before", "after", "packed")  # full width / cut to longest / packed, then cut

# LLaVA-665K's sources with their sample counts in thousands (the data-mixture table of the
# LLaVA-1.5 paper, arXiv 2310.03744), and for each our ESTIMATE of its text: conversation
# turns (uniform in [lo, hi]) and tokens per turn (question + answer + chat template,
# uniform in [lo, hi]). The real file is not available here: these lengths are assumptions.
LLAVA_665K_SOURCES = {  # name: (thousands, has image, turns, tokens per turn)
    "llava_conversation": (58, True, (2, 6), (40, 120)),
    "llava_detail": (23, True, (1, 1), (120, 300)),
    "llava_reasoning": (77, True, (1, 1), (100, 280)),
    "sharegpt": (40, False, (1, 8), (100, 500)),
    "vqav2": (83, True, (2, 9), (22, 32)),
    "gqa": (72, True, (4, 20), (22, 32)),
    "okvqa": (9, True, (1, 1), (22, 32)),
    "ocrvqa": (80, True, (2, 9), (22, 32)),
    "aokvqa": (66, True, (1, 2), (50, 80)),
    "textcaps": (22, True, (1, 1), (30, 50)),
    "refcoco": (48, True, (1, 10), (25, 40)),
    "vg": (86, True, (1, 10), (25, 40)),
}
IMAGE_TOKENS_336 = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


# -- 1. fractions ----------------------------------------------------------------------

def llava_665k_like_lengths(count: int, seq_length: int, seed: int) -> list[tuple[int, bool]]:
    """(ids per sample incl. the label-only last id, has image), cut at seq_length + 1."""
    rng = np.random.default_rng(seed)
    names = list(LLAVA_665K_SOURCES)
    weights = np.array([LLAVA_665K_SOURCES[n][0] for n in names], dtype=float)
    out = []
    for source in rng.choice(len(names), size=count, p=weights / weights.sum()):
        _, has_image, turns, per_turn = LLAVA_665K_SOURCES[names[source]]
        text = sum(int(rng.integers(per_turn[0], per_turn[1] + 1))
                   for _ in range(int(rng.integers(turns[0], turns[1] + 1))))
        ids = text + (IMAGE_TOKENS_336 if has_image else 0)
        out.append((min(ids, seq_length + 1), has_image))
    return out


def _fake_samples(lengths: list[int]):
    return [(np.ones(n, np.int64), np.ones(n, np.int64)) for n in lengths]


def layout_counts(samples, seq_length: int, layout: str) -> tuple[int, int, int]:
    """(real positions, computed positions, rows) of one micro-batch in ``layout``."""
    from megatron_stgc.data.sequences import lay_out

    multiple = seq_length if layout == "before" else 1  # full width = round up to seq_length
    rows = lay_out(samples, seq_length, multiple, layout == "packed", pad_id=0)
    return int(rows.fill.sum()), rows.tokens.size, rows.tokens.shape[0]


def synthetic_fractions(seq_length: int, micro_batch: int, micro_batches: int, seed: int):
    lengths = llava_665k_like_lengths(micro_batch * micro_batches, seq_length, seed)
    totals = {name: [0, 0, 0] for name in LAYOUTS}
    for m in range(micro_batches):
        samples = _fake_samples([n for n, _ in lengths[m * micro_batch:(m + 1) * micro_batch]])
        for name in LAYOUTS:
            totals[name] = [a + b for a, b in zip(totals[name],
                                                  layout_counts(samples, seq_length, name))]
    ids = np.array([n for n, _ in lengths])
    summary = {"samples": len(lengths), "mean_ids": float(ids.mean()),
               "median_ids": float(np.median(ids)),
               "truncated_fraction": float((ids == seq_length + 1).mean()),
               "image_fraction": float(np.mean([image for _, image in lengths]))}
    return _fractions(totals, micro_batches), summary


def _fractions(totals, micro_batches):
    return {name: {"real_fraction": real / computed, "computed_per_micro_batch":
                   computed / micro_batches, "rows_per_micro_batch": rows / micro_batches}
            for name, (real, computed, rows) in totals.items()}


def digits_dataset(digits_dir: str, seq_length: int, image_tokens: int):
    from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor
    from megatron_stgc.data.llava_dataset import build_llava_dataset

    loader = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="pil")
    return build_llava_dataset(os.path.join(digits_dir, "train.json"), digits_dir,
                               os.path.join(digits_dir, "..", "cache"), seed=0,
                               seq_length=seq_length, num_image_tokens=image_tokens,
                               image_loader=loader, vocab_size=512)


def digits_batches(dataset, micro_batch: int, micro_batches: int) -> dict[str, list[dict]]:
    """Each layout's batches of the first micro-batches of the run (LlavaSFTDataset.batch)."""
    out = {}
    for name in LAYOUTS:
        dataset.pack = name == "packed"
        dataset.pad_to_multiple = dataset.seq_length if name == "before" else 1
        out[name] = [dataset.batch(list(range(m * micro_batch, (m + 1) * micro_batch)))
                     for m in range(micro_batches)]
    dataset.pack, dataset.pad_to_multiple = False, 1
    return out


def batch_fractions(batches: dict[str, list[dict]]):
    totals = {name: [sum(int((~b["padding_mask"]).sum()) for b in batches[name]),
                     sum(b["padding_mask"].numel() for b in batches[name]),
                     sum(b["tokens"].shape[0] for b in batches[name])] for name in LAYOUTS}
    return _fractions(totals, len(batches["before"]))


def text_set_fraction(cache_dir: str, seq_length: int = 64, num_samples: int = 4000) -> dict:
    """The text-only data set of examples/tiny_moe_cpu.yaml: its rows are packed already
    (conversations greedily, in order); the share of real positions over all its rows."""
    from megatron_stgc.data.dataset import build_dataset

    dataset, _ = build_dataset(seq_length=seq_length, seed=0, cache_dir=cache_dir,
                               num_samples=num_samples)
    real = int((dataset.lengths - 1).sum())
    return {"rows": len(dataset), "real_fraction": real / (len(dataset) * seq_length)}


# -- 2. time per real token ------------------------------------------------------------

def init_single_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29653")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def build_model(flags: dict, vocab_size: int, image_token_id: int):
    from megatron_stgc.config import config_from_flat, fill_defaults
    from megatron_stgc.training.setup import build_model as build

    torch.manual_seed(1234)
    model, _ = build(fill_defaults(config_from_flat(flags)), vocab_size, image_token_id)
    return model


def forward_backward_seconds(model, batch: dict) -> float:
    keys = ("images", "modality", "padding_mask", "segment_ids")
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 **{k: batch[k] for k in keys if k in batch})
    mask = batch["loss_mask"]
    ((loss * mask).sum() / mask.sum().clamp(min=1)).backward()
    return time.perf_counter() - start


def time_per_real_token(model, batches: dict[str, list[dict]], reps: int, label: str) -> dict:
    """Median over reps of each layout's summed forward+backward time over the micro-batches,
    layouts interleaved per micro-batch (rotating order), per real token."""
    real = {name: sum(int((~b["padding_mask"]).sum()) for b in batches[name]) for name in LAYOUTS}
    for name in LAYOUTS:  # warm-up (compiled activations, allocator)
        forward_backward_seconds(model, batches[name][0])
    seconds = {name: [] for name in LAYOUTS}
    for rep in range(reps):
        total = dict.fromkeys(LAYOUTS, 0.0)
        for m in range(len(batches["before"])):
            order = LAYOUTS[(m + rep) % 3:] + LAYOUTS[:(m + rep) % 3]
            for name in order:
                total[name] += forward_backward_seconds(model, batches[name][m])
        for name in LAYOUTS:
            seconds[name].append(total[name])
        print(f"  {label} rep {rep + 1}/{reps}: " + "  ".join(
            f"{name} {total[name]:.2f}s" for name in LAYOUTS), flush=True)
    out = {}
    for name in LAYOUTS:
        median = statistics.median(seconds[name])
        out[name] = {"seconds_per_pass": median, "microseconds_per_real_token":
                     1e6 * median / real[name], "real_tokens": real[name],
                     "range_seconds": [min(seconds[name]), max(seconds[name])]}
    for name in LAYOUTS:
        out[name]["per_real_token_vs_before"] = (out[name]["microseconds_per_real_token"]
                                                 / out["before"]["microseconds_per_real_token"])
    return out


DIGITS_MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=256, moe_ffn_hidden_size=256,
                    num_attention_heads=4, num_experts=4, moe_router_topk=2, moe_layer_freq=2,
                    moe_aux_loss_coeff=0.01, init_method_std=0.08, vision_model_type="clip",
                    vision_num_layers=2, vision_hidden_size=64, vision_num_attention_heads=4,
                    img_h=32, img_w=32, patch_dim=8)
LONG_MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, moe_ffn_hidden_size=128,
                  num_attention_heads=4, num_experts=4, moe_router_topk=2, moe_layer_freq=2,
                  moe_aux_loss_coeff=0.01, vision_model_type="clip", vision_num_layers=1,
                  vision_hidden_size=32, vision_num_attention_heads=2, img_h=96, img_w=96,
                  patch_dim=4)  # 24 x 24 = 576 image tokens, as CLIP ViT-L/14-336


def long_batches(seq_length: int, micro_batch: int, micro_batches: int, seed: int):
    """The synthetic mix's first micro-batches as real batches (random ids and images)."""
    from megatron_stgc.data.sequences import vision_language_batch

    vocab, image_id = 120, 120  # ids 1..119, the image id past them
    lengths = llava_665k_like_lengths(micro_batch * micro_batches, seq_length, seed)
    rng = np.random.default_rng(seed)
    out = {name: [] for name in LAYOUTS}
    for m in range(micro_batches):
        samples, has_image = [], []
        for n, image in lengths[m * micro_batch:(m + 1) * micro_batch]:
            ids = rng.integers(1, vocab, size=n).astype(np.int64)
            if image:
                ids[1:1 + IMAGE_TOKENS_336] = image_id
            mask = np.zeros(n, np.int64)
            mask[-max(1, n // 4):] = 1
            samples.append((ids, mask))
            has_image.append(image)
        images = torch.randn(sum(has_image), 3, 96, 96)
        for name in LAYOUTS:
            out[name].append(vision_language_batch(
                samples, images, has_image, seq_length=seq_length,
                multiple=seq_length if name == "before" else 1, pack=name == "packed",
                pad_id=0, image_token_id=image_id))
    return out, 128, image_id


# -- report ----------------------------------------------------------------------------

def fraction_table(results: dict) -> list[str]:
    lines = [f"{'real / computed positions':<34}" + "".join(f"{n:>10}" for n in LAYOUTS)]
    for mix, fractions in results.items():
        lines.append(f"{mix:<34}" + "".join(f"{fractions[n]['real_fraction']:>10.3f}"
                                            for n in LAYOUTS))
        lines.append(f"{'  positions per micro-batch':<34}" + "".join(
            f"{fractions[n]['computed_per_micro_batch']:>10.0f}" for n in LAYOUTS))
        lines.append(f"{'  rows per micro-batch':<34}" + "".join(
            f"{fractions[n]['rows_per_micro_batch']:>10.2f}" for n in LAYOUTS))
    return lines


def timing_table(label: str, timing: dict) -> list[str]:
    lines = [f"{label:<34}" + "".join(f"{n:>10}" for n in LAYOUTS)]
    lines.append(f"{'  s per pass over the batches':<34}" + "".join(
        f"{timing[n]['seconds_per_pass']:>10.2f}" for n in LAYOUTS))
    lines.append(f"{'  us per real token':<34}" + "".join(
        f"{timing[n]['microseconds_per_real_token']:>10.1f}" for n in LAYOUTS))
    lines.append(f"{'  per real token vs before':<34}" + "".join(
        f"{timing[n]['per_real_token_vs_before']:>10.3f}" for n in LAYOUTS))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-dir", default="runs/digits/data")
    parser.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.txt")
    parser.add_argument("--fraction-micro-batches", type=int, default=200)
    parser.add_argument("--timing-micro-batches", type=int, default=20)
    parser.add_argument("--long-timing-micro-batches", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-long-timing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron_stgc import cpu_bridge

    cpu_bridge.install()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    dataset, _ = digits_dataset(args.digits_dir, seq_length=48, image_tokens=16)
    print(f"digits mix: {len(dataset)} records", flush=True)
    fraction_batches = digits_batches(dataset, 8, args.fraction_micro_batches)
    synthetic, summary = synthetic_fractions(2048, 8, args.fraction_micro_batches, args.seed)
    results = {"fractions": {"digits mix (seq 48, mbs 8)": batch_fractions(fraction_batches),
                             "LLaVA-665K-like (seq 2048, mbs 8)": synthetic},
               "synthetic_lengths": summary, "timing": {},
               "text_set": text_set_fraction(os.path.join(args.digits_dir, "..", "text_cache"))}
    print("\n".join(fraction_table(results["fractions"])), flush=True)

    init_single_process()
    from megatron_stgc.training.train import padded_vocab_size

    model = build_model({**DIGITS_MODEL, "seq_length": 48, "data_path": __file__},
                        vocab_size=padded_vocab_size(dataset.image_token_id + 1, 1),
                        image_token_id=dataset.image_token_id)
    timed = {n: b[:args.timing_micro_batches] for n, b in fraction_batches.items()}
    results["timing"]["digits model, digits mix"] = time_per_real_token(
        model, timed, args.reps, "digits")
    if not args.skip_long_timing:
        batches, vocab, image_id = long_batches(2048, 8, args.long_timing_micro_batches,
                                                args.seed)
        long_model = build_model({**LONG_MODEL, "seq_length": 2048, "data_path": __file__},
                                 vocab_size=vocab, image_token_id=image_id)
        results["timing"]["tiny model, 2048 positions"] = time_per_real_token(
            long_model, batches, args.reps, "2048")
    lines = fraction_table(results["fractions"]) + [""]
    for label, timing in results["timing"].items():
        lines += timing_table(label, timing) + [""]
    lines.append(f"text-only data set (tiny_moe_cpu.yaml, seq 64, rows packed greedily): "
                 f"real / computed positions {results['text_set']['real_fraction']:.3f} over "
                 f"{results['text_set']['rows']} rows")
    lines.append(f"synthetic lengths: {json.dumps(summary)}")
    lines.append(f"wall time {time.perf_counter() - started:.0f} s; torch threads "
                 f"{torch.get_num_threads()}")
    print("\n" + "\n".join(lines))
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(args.output + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
