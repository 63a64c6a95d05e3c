#!/usr/bin/env python
"""Per-step cost of LTDR against plain megatron-core routing: one MoE layer, one process.

Builds a megatron-core MoE layer (local spec, alltoall dispatcher, EP=1) five times with the
same weights: plain, LTDR, LTDR with balancing only (no tail routing: the router's own
overhead, no extra expert work), STGC, STGC + LTDR, and interleaves their forward + backward over
--reps repetitions on the same batch (half of the tokens image tokens, in runs of 16 as an
image's patches). Prints the median seconds of each and the ratios LTDR / plain and
STGC + LTDR / STGC, plus LTDR's tail fraction and experts per image token (tail tokens
cost more expert work: that is part of LTDR's cost, not overhead).

    python tools/bench_ltdr.py --reps 10
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
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

from stgc_utils import STGCConfig, init_single_process, moe_config  # noqa: E402
from megatron_stgc.ltdr.config import LTDRConfig  # noqa: E402
from megatron_stgc.model.modality import IMAGE, TEXT, ModalityContext  # noqa: E402

VARIANTS = {  # name: (STGC on, LTDR config or None)
    "plain": (False, None),
    "ltdr": (False, LTDRConfig(enabled=True)),
    "ltdr-balance": (False, LTDRConfig(enabled=True, tail_routing=False)),  # router overhead
    "stgc": (True, None),
    "stgc+ltdr": (True, LTDRConfig(enabled=True)),
}


def build(config, with_stgc: bool, ltdr: LTDRConfig | None):
    from test_ltdr import _layer  # the tests' layer builder: spec -> layer -> LTDR prepared

    return _layer(config, ltdr, STGCConfig(enabled=True) if with_stgc else None)


def batch(seq: int, micro: int, hidden: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(seq, micro, hidden, generator=gen)
    weights = torch.randn(seq, micro, hidden, generator=gen)
    modality = torch.where((torch.arange(seq) // 16) % 2 == 0, IMAGE, TEXT)  # [s]
    return x, weights, modality.unsqueeze(0).expand(micro, -1)  # modality [b, s]


def step(layer, x, weights) -> float:
    start = time.perf_counter()
    out, _ = layer(x)
    (out * weights).sum().backward()
    layer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    init_single_process()
    config = moe_config(hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                        moe_aux_loss_coeff=0.01, num_attention_heads=4)
    layers = {name: build(config, *flags) for name, flags in VARIANTS.items()}
    state = layers["plain"].state_dict()
    x, weights, modality = batch(args.seq, args.micro_batch, args.hidden)
    for layer in layers.values():
        layer.load_state_dict(state, strict=False)
        layer.router.modality = ModalityContext()
        layer.router.modality.set(modality)
    times = {name: [] for name in layers}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, layer in layers.items():
            seconds = step(layer, x, weights)
            if rep:
                times[name].append(seconds)
    report = layers["ltdr"].router.ltdr_last
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "median_seconds": median,
        "ltdr_over_plain": median["ltdr"] / median["plain"],
        "ltdr_balance_only_over_plain": median["ltdr-balance"] / median["plain"],
        "stgc_ltdr_over_stgc": median["stgc+ltdr"] / median["stgc"],
        "tail_fraction": float(report.tail.sum() / report.is_image.sum()),
        "experts_per_image_token": float(report.routing_map[report.is_image].sum()
                                         / report.is_image.sum()),
        "shape": vars(args),
    }
    for name, seconds in median.items():
        print(f"{name:12s} {seconds * 1e3:8.1f} ms/step")
    print(f"LTDR / plain {result['ltdr_over_plain']:.3f}x (balancing only "
          f"{result['ltdr_balance_only_over_plain']:.3f}x); STGC+LTDR / STGC "
          f"{result['stgc_ltdr_over_stgc']:.3f}x; tail fraction {result['tail_fraction']:.3f}, "
          f"{result['experts_per_image_token']:.2f} experts per image token")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
