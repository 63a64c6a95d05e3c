"""Eval generation speed with and without the KV cache (issue 21): one process, CPU.

A MoE-LLaVA-shaped model with random weights (CLIP-style ViT on a 96x96 image in 4x4 patches:
576 image tokens, as CLIP-L/14-336 gives; a GPT with MoE on every other layer, 4 experts
top-2), a 600-token prompt (576 image tokens + 24 text tokens) and 128 new tokens (EOS
ignored, so both ways generate exactly 128). Without the cache every new token re-runs the
ViT and the whole sequence (``FullGeneration``, what eval did before); with it the prompt runs
once and every new token is one position (``CachedGeneration``, megatron-core's
``StaticInferenceContext``). One run: the two generations take their steps in turn (128 each;
the cache's first step is the prompt), each step timed, after an untimed warm-up of both
(megatron-core compiles its quick-GELU with torch.compile at first use); both must produce
the same tokens. Prints and writes ``<output>.txt`` / ``<output>.json``::

    python tools/bench_kv_cache.py --output docs/bench_kv_cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron_stgc import cpu_bridge  # noqa: E402

cpu_bridge.install()

IMAGE_SIDE, PATCH = 96, 4  # (96 / 4)^2 = 576 image tokens


class IgnoreEOS:
    """The ids generation needs, with no EOS id: every row generates max_new_tokens."""

    eos_id = -1
    pad_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids):
        return " ".join(map(str, ids))


def build(args):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_stgc import parallel
    from megatron_stgc.config import config_from_flat
    from megatron_stgc.training.setup import build_model

    parallel.initialize_distributed()
    parallel.initialize_model_parallel(1, 1, 1234)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    flags = dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                 num_attention_heads=8, ffn_hidden_size=4 * args.hidden_size,
                 moe_ffn_hidden_size=4 * args.hidden_size, num_experts=4, moe_router_topk=2,
                 moe_layer_freq=2, seq_length=1024, vision_model_type="clip",
                 vision_num_layers=2, vision_hidden_size=128, vision_num_attention_heads=4,
                 img_h=IMAGE_SIDE, img_w=IMAGE_SIDE, patch_dim=PATCH, data_path=__file__)
    model, _ = build_model(config_from_flat(flags), args.vocab + 128, image_token_id=args.vocab)
    return model.eval()


def prompts(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    image_tokens = (IMAGE_SIDE // PATCH) ** 2
    text = args.prompt_tokens - image_tokens - 1
    rows = []
    for _ in range(args.batch_size):
        words = torch.randint(5, args.vocab, (text,), generator=generator).tolist()
        rows.append([1] + [args.vocab] * image_tokens + words)
    return rows


@torch.no_grad()
def interleaved(model, args) -> dict:
    """Both generations advanced step by step in turn (a noisy machine's load hits both
    alike); {"cache" / "no-cache": (seconds, generated tokens)}."""
    from megatron_stgc.eval.generation import CachedGeneration, FullGeneration
    from megatron_stgc.eval.model_inputs import ModelInputs
    from megatron_stgc.eval.stop import AnswerRows

    tokenizer, inputs = IgnoreEOS(args.vocab), ModelInputs(model, args.vocab)
    images = torch.randn(args.batch_size, 3, IMAGE_SIDE, IMAGE_SIDE,
                         generator=torch.Generator().manual_seed(2))
    rows = {name: AnswerRows(prompts(args), tokenizer, args.new_tokens, 1024, ())
            for name in ("cache", "no-cache")}
    seconds = dict.fromkeys(rows, 0.0)
    start = time.perf_counter()
    generations = {"cache": CachedGeneration(inputs, rows["cache"], images, 0)}
    seconds["cache"] += time.perf_counter() - start  # the prompt's embeddings (ViT) count
    generations["no-cache"] = FullGeneration(model, inputs, rows["no-cache"], images, 0)
    while not all(g.done for g in generations.values()):
        for name in args.order.split(","):
            if not generations[name].done:
                start = time.perf_counter()
                generations[name].step()
                seconds[name] += time.perf_counter() - start
    return {name: (seconds[name], rows[name].generated) for name in rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="write <output>.txt and <output>.json")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--order", default="cache,no-cache",
                        help="which of the two takes its step first in each round")
    args = parser.parse_args(argv)
    model = build(args)
    # warm-up, untimed: megatron-core compiles some activations (torch.compile) at first use
    interleaved(model, argparse.Namespace(**{**vars(args), "new_tokens": 2}))
    runs = interleaved(model, args)
    seconds = {name: run[0] for name, run in runs.items()}
    tokens = {name: run[1] for name, run in runs.items()}
    new = args.new_tokens * args.batch_size
    result = {"date": "2026-12-06", "command": "python tools/bench_kv_cache.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "batch_size": args.batch_size, "hidden_size": args.hidden_size,
              "num_layers": args.num_layers, "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(),
              "seconds": seconds,
              "tokens_per_second": {k: new / v for k, v in seconds.items()},
              "speedup_with_cache": seconds["no-cache"] / seconds["cache"],
              "same_tokens": tokens["cache"] == tokens["no-cache"]}
    text = (f"eval generation, {args.prompt_tokens}-token prompt ({(IMAGE_SIDE // PATCH) ** 2} "
            f"image tokens), {args.new_tokens} new tokens, batch {args.batch_size}, hidden "
            f"{args.hidden_size} x {args.num_layers} layers (MoE 4 experts top-2 every other), "
            f"CPU, {torch.get_num_threads()} threads\n"
            + "".join(f"  {k:>8}: {v:7.2f} s  {result['tokens_per_second'][k]:7.2f} tokens/s\n"
                      for k, v in seconds.items())
            + f"  KV cache speed-up {result['speedup_with_cache']:.1f}x; same tokens: "
              f"{result['same_tokens']}\n")
    print(text, end="")
    if args.output:
        with open(args.output + ".txt", "w") as f:
            f.write(text)
        with open(args.output + ".json", "w") as f:
            json.dump(result, f, indent=2)
    from megatron_stgc import parallel

    parallel.destroy()
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
