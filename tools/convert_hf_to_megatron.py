#!/usr/bin/env python
"""Convert Hugging Face / LLaVA-format weights into a --pretrained-checkpoint.

    # a vision tower and a language model, separately (projector: random init)
    python tools/convert_hf_to_megatron.py \\
        --vision-model /models/clip-vit-large-patch14-336 \\
        --language-model /models/stablelm-2-1_6b --output /ckpt/llava-init

    # a whole LLaVA-format checkpoint: MoE-LLaVA's (dense stage II or MoE stage III),
    # LLaVA-1.5's, or transformers' LlavaForConditionalGeneration
    python tools/convert_hf_to_megatron.py \\
        --llava-checkpoint /models/MoE-LLaVA-StableLM-Stage2 \\
        --vision-model /models/clip-vit-large-patch14-336 --output /ckpt/moe-llava-stage2

Writes OUTPUT/model.pt = {"model": state dict} with keys prefixed ``vision_model.``
(megatron-core CLIPViTModel), ``vision_projection.`` (MultimodalProjector; LLaVA checkpoints
only) and ``language_model.`` (megatron-core GPTModel, dense or MoE), the attribute names of
our LLaVA module, and OUTPUT/args.yaml with the model flags (flat YAML, pass it with
``--config``; add --num-experts ... --moe-use-upcycling to upcycle a dense LM).

``--language-model`` is a StableLM-2, Phi-2, Qwen2 (Qwen1.5/2.5) or Qwen-1 directory (picked by
config.json's model_type; Qwen-1 read without running its remote code).
``--vision-model`` is a CLIP or SigLIP save_pretrained directory (vision-only or full
model). With ``--llava-checkpoint`` it names the image tower MoE-LLaVA / LLaVA-1.5 checkpoints
only refer to (config.json ``mm_image_tower``): its config (and its weights, if present) are
used. The ViT keeps the layers up to the selected hidden state (default: all but the last).
Tensor parallel size 1 only: the tensors are written whole, in megatron's local-spec layout
(``--te-layout`` for the Transformer Engine spec). Every check runs before anything is
written; OUTPUT appears only when complete. docs/CONVERT.md has the details.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_stgc.convert import (ConversionError, check_output_free,  # noqa: E402
                                   convert_pretrained, write_pretrained)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llava-checkpoint", default=None,
                        help="a LLaVA-format checkpoint directory (MoE-LLaVA dense or MoE, "
                             "LLaVA-1.5, transformers LlavaForConditionalGeneration): vision "
                             "tower, projector and language model in one")
    parser.add_argument("--vision-model", default=None,
                        help="CLIP / SigLIP save_pretrained directory (with --llava-checkpoint: "
                             "the image tower the checkpoint names)")
    parser.add_argument("--language-model", default=None,
                        help="language model directory (config.json + weights): StableLM-2, "
                             "Phi-2, Qwen2 or Qwen-1")
    parser.add_argument("--vision-num-layers", type=int, default=None,
                        help="ViT layers to keep (default: the HF model's layers - 1)")
    parser.add_argument("--padded-vocab-size", type=int, default=None,
                        help="rows of the embedding / output layer, the extra ones zero "
                             "(default: the HF vocab rounded up to a multiple of 128)")
    parser.add_argument("--te-layout", action="store_true",
                        help="key names of the Transformer Engine spec (norms fused into linears)")
    parser.add_argument("--output", required=True, help="directory for model.pt and args.yaml")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> tuple[dict, dict]:
    if args.llava_checkpoint is None:
        return convert_pretrained(args.vision_model, args.language_model, args.vision_num_layers,
                                  args.padded_vocab_size, args.te_layout)
    from megatron_stgc.convert.llava import convert_llava_checkpoint

    for flag, value in (("--language-model", args.language_model),
                        ("--vision-num-layers", args.vision_num_layers)):
        if value is not None:
            raise ConversionError(f"{flag} does not go with --llava-checkpoint (the checkpoint "
                                  "holds its language model and selects its vision layer)")
    return convert_llava_checkpoint(args.llava_checkpoint, args.vision_model,
                                    args.padded_vocab_size, args.te_layout)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_free(args.output)
        state, flags = convert(args)
        print(f"writing {args.output} ({len(state)} tensors)")
        write_pretrained(args.output, state, flags)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.output, 'model.pt')} ({len(state)} tensors) and "
          f"{os.path.join(args.output, 'args.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
