"""layout-ltdr-digits: ``megatron-stgc train --ltdr --stgc`` on the digits mix, N ranks
(EP 1 x expert-DP N) against one process.

Same global batch (the sampler gives rank r the columns [r*b, (r+1)*b) of each global batch;
the one process takes all N*b as one micro-batch), same weights (same seed: at EP 1 every
rank initialises its experts as the one process does; at EP > 1 megatron's expert RNG
differs per EP rank, and --pretrained-checkpoint loads whole expert sets, so EP N is
compared at the layer level, layouts.py's layout-ep), one micro-batch per step. Where the
math says the runs agree:
  * each rank's LM loss is the mean over its own answer tokens, so the ranks' mean equals
    the one process's only when every sample has the same number of answer tokens: the
    check trains on the mix's image questions whose answer is "yes" (the "even" and
    "greater than four" questions; images and phrasings differ);
  * megatron's load-balancing loss is computed per rank over local tokens (not layout
    invariant): --moe-aux-loss-coeff 0 (LTDR then routes tail tokens wider and STGC
    judges their extra pairs; its modality balancing has nothing to scale);
  * LTDR's tail threshold is the mean image RPV over the global micro-batch (all-reduced),
    STGC's mean gradient is summed over expert-DP: both the same.
Compared per step (3 steps): loss and grad norm (relative 1e-4), STGC's conflict fraction
and LTDR's tail fraction and experts per image token (absolute 1e-6: a pair whose cosine
lies within ~1e-5 of tau could flip between the two; not seen).
"""

from __future__ import annotations

import json
import os

from gpucheck.context import REPO, Context, stgc_command
from gpucheck.jobs import need_scikit_learn, read_records

STEPS, PER_RANK = 3, 2
EXACT = ("stgc/conflict_fraction", "ltdr/tail_fraction", "ltdr/experts_per_vision_token")
CLOSE = ("loss", "grad_norm")


def yes_answers(train_json: str, output: str) -> int:
    """Write the image questions whose answer is "yes" to ``output``; returns how many."""
    with open(train_json) as f:
        records = json.load(f)
    kept = [r for r in records if "image" in r and r["conversations"][-1]["value"] == "yes"]
    with open(output, "w") as f:
        json.dump(kept, f)
    return len(kept)


def _flags(ctx: Context, data: str, image_root: str, world: int) -> list[str]:
    run = os.path.join(ctx.work, f"world{world}")
    return ["--config", os.path.join(REPO, "examples", "tiny_llava_digits.yaml"),
            "--data-path", data, "--image-root", image_root,
            "--cache-dir", os.path.join(ctx.work, "cache"), "--save", run, "--load", run,
            "--log-file", f"{run}/log.jsonl", "--log-interval", "1",
            "--train-iters", str(STEPS), "--lr-warmup-fraction", "0",
            "--moe-aux-loss-coeff", "0", "--stgc", "--ltdr",
            "--global-batch-size", str(PER_RANK * ctx.gpus),
            "--micro-batch-size", str(PER_RANK * ctx.gpus // world),
            "--expert-model-parallel-size", "1"]


def compare_records(one: list[dict], many: list[dict]) -> dict:
    """Per step: CLOSE keys within 1e-4 relative, EXACT keys within 1e-6; the largest
    differences seen."""
    assert len(one) == len(many) == STEPS, (len(one), len(many))
    worst = {key: 0.0 for key in CLOSE + EXACT}
    for step, (a, b) in enumerate(zip(one, many), start=1):
        for key in CLOSE + EXACT:
            assert key in a and key in b, f"step {step}: {key} not logged"
            diff = abs(a[key] - b[key])
            limit = 1e-4 * abs(a[key]) if key in CLOSE else 1e-6
            assert diff <= limit, f"step {step}: {key} {a[key]} (1 process) vs {b[key]}"
            worst[key] = max(worst[key], diff)
    return worst


def check_ltdr_digits(ctx: Context) -> str:
    need_scikit_learn()
    from megatron_stgc.data.digits import build_digits_mix

    mix = build_digits_mix(os.path.join(ctx.work, "data"))
    data = os.path.join(ctx.work, "yes.json")
    count = yes_answers(mix["train"], data)
    ctx.run(stgc_command("train", _flags(ctx, data, mix["image_root"], 1)))
    ctx.run(stgc_command("train", _flags(ctx, data, mix["image_root"], ctx.gpus),
                         processes=ctx.gpus))
    one = read_records(os.path.join(ctx.work, "world1", "log.jsonl"))
    many = read_records(os.path.join(ctx.work, f"world{ctx.gpus}", "log.jsonl"))
    worst = compare_records(one, many)
    last = one[-1]
    return (f"{ctx.gpus} ranks (expert-DP {ctx.gpus}) == 1 process over {STEPS} steps on {count} 'yes' "
            f"image questions: loss {one[0]['loss']:.3f} -> {last['loss']:.3f}, conflict "
            f"fraction {last['stgc/conflict_fraction']:.3f}, tail fraction "
            f"{last['ltdr/tail_fraction']:.3f}; max diffs " +
            ", ".join(f"{k.split('/')[-1]} {v:.0e}" for k, v in worst.items()))
