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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_stgc import cpu_bridge  # noqa: E402

cpu_bridge.install()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_stgc.ltdr.config import LTDRConfig  # noqa: E402
from megatron_stgc.ltdr.dispatch import prepare_ltdr_layers  # noqa: E402
from megatron_stgc.ltdr.spec import ltdr_moe_spec  # noqa: E402
from megatron_stgc.mcore_compat import build_moe_layer  # noqa: E402
from megatron_stgc.model.modality import IMAGE, TEXT, ModalityContext  # noqa: E402
from megatron_stgc.stgc.config import STGCConfig  # noqa: E402
from megatron_stgc.stgc.spec import stgc_moe_spec  # noqa: E402

VARIANTS = {  # name: (STGC on, LTDR config or None)
    "plain": (False, None),
    "ltdr": (False, LTDRConfig(enabled=True)),
    "ltdr-balance": (False, LTDRConfig(enabled=True, tail_routing=False)),  # router overhead
    "stgc": (True, None),
    "stgc+ltdr": (True, LTDRConfig(enabled=True)),
}


def init_single_process() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29651")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def layer_config(hidden: int, ffn: int) -> TransformerConfig:
    """A CPU MoE layer: 4 experts top-2, alltoall, aux-loss 0.01 (MoE-LLaVA's)."""
    return TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
        num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.01, add_bias_linear=False, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, moe_permute_fusion=False, moe_router_dtype="fp32")


def build(config, with_stgc: bool, ltdr: LTDRConfig | None):
    """spec -> layer the way model/gpt.py does it (STGC, then LTDR; dispatchers prepared)."""
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    if with_stgc:
        spec = stgc_moe_spec(spec, STGCConfig(enabled=True))
    if ltdr is not None:
        spec = ltdr_moe_spec(spec, ltdr)
    layer = build_moe_layer(spec, config, layer_number=1)
    layer.set_layer_number(1)
    prepare_ltdr_layers(layer)
    return layer.train()


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
    config = layer_config(args.hidden, args.ffn)
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
