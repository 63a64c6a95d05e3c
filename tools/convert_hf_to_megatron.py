#!/usr/bin/env python
"""Convert Hugging Face CLIP vision / language-model weights into a --pretrained-checkpoint.

    python tools/convert_hf_to_megatron.py \\
        --vision-model /models/clip-vit-large-patch14-336 \\
        --language-model /models/stablelm-2-1_6b --output /ckpt/llava-init

Writes OUTPUT/model.pt = {"model": state dict} with keys prefixed
``vision_model.`` (megatron-core CLIPViTModel) and ``language_model.`` (dense
megatron-core GPTModel), the attribute names of our LLaVA module; its
``vision_projection`` is not converted (randomly initialised, LLaVA stage 1
trains it). OUTPUT/args.yaml holds the model flags (flat YAML, pass it with
``--config``; add --num-experts ... --moe-use-upcycling for an MoE start).

Inputs are transformers ``save_pretrained`` directories: a CLIPVisionModel or
CLIPModel (``--vision-model``) and a language model (``--language-model``):
StableLM-2 (StableLmForCausalLM), Phi-2 (PhiForCausalLM), Qwen2 / Qwen1.5 / Qwen2.5
(Qwen2ForCausalLM) or Qwen-1 (QWenLMHeadModel, read from config.json and its weight
files without running its remote code), picked by config.json's model_type
(docs/CONVERT.md); either may be left out. Everything is read and converted before
anything is written, and the output appears whole or not at all. The ViT keeps the
first ``--vision-num-layers`` layers (default: all but the last, since LLaVA uses the
penultimate layer's output).
Tensor parallel size 1 only: the tensors are written whole, in megatron's
local-spec layout (``--te-layout`` for the Transformer Engine spec).
The mapping is in megatron_stgc/convert/.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_stgc.convert import (ConversionError, convert_pretrained,  # noqa: E402
                                   write_pretrained)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-model", default=None,
                        help="CLIPVisionModel / CLIPModel save_pretrained directory")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state, flags = convert_pretrained(args.vision_model, args.language_model,
                                          args.vision_num_layers, args.padded_vocab_size,
                                          args.te_layout)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_pretrained(args.output, state, flags)
    print(f"wrote {os.path.join(args.output, 'model.pt')} ({len(state)} tensors) and "
          f"{os.path.join(args.output, 'args.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
