"""Greedy answers from an exported transformers model, for LLaVA question files.

``hf_answers(directory, questions, image_root, ...)``: for each question the saved processor's
chat template and tokenizer give the prompt ids (``<image>`` expanded), transformers'
``generate`` (greedy, the export's generation_config: EOS, ids past the tokenizer suppressed)
answers, and the new tokens are decoded without special tokens and stripped, as
``megatron-stgc eval`` does, and cut before the first of the stop strings our eval cuts at
(export_info.json ``stop_strings``; greedy text before a stop string does not depend on when
generation stopped). Questions are batched by prompt length (no padding, so every row's
positions are 0..n-1 as in our eval).

``pixels``: ``"processor"`` takes the saved image processor (what lmms-eval and other
transformers users get); ``"ours"`` takes our own preprocessing (data/images.py, the
``image_loader`` backend) so that only the model is compared (docs/EXPORT.md: the two
preprocessings can differ by 8-bit rounding).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch


def _prompt_text(processor, question: dict) -> str:
    content = [{"type": "text", "text": question["text"]}]
    if question.get("image") is not None:
        content.insert(0, {"type": "image"})
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def _stop_strings(directory: str) -> tuple[str, ...]:
    import json

    path = os.path.join(directory, "export_info.json")
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        return tuple(json.load(f).get("stop_strings", ()))


def _cut(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[:min(cuts)] if cuts else text).strip()


def _our_preprocessor(directory: str, image_loader: str):
    """Our ImagePreprocessor with the settings the export wrote (size, mean, std)."""
    import json

    from megatron_stgc.data.images import ImagePreprocessor

    with open(os.path.join(directory, "processor_config.json")) as f:
        settings = json.load(f)["image_processor"]
    size = settings["size"]
    return ImagePreprocessor(size["height"], size["width"], settings["image_mean"],
                             settings["image_std"], backend=image_loader)


@torch.no_grad()
def hf_answers(directory: str, questions: list[dict], image_root: Optional[str],
               max_new_tokens: int, pixels: str = "processor", image_loader: str = "auto",
               batch_size: int = 32, say: Callable[[str], None] = print) -> list[str]:
    """The answer text of every question (see the module docstring)."""
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        directory, dtype=torch.float32).eval()
    ours = _our_preprocessor(directory, image_loader) if pixels == "ours" else None
    stops = _stop_strings(directory)
    prompts = []
    for question in questions:
        text = _prompt_text(processor, question)
        if question.get("image") is None:
            prompts.append(processor(text=[text], return_tensors="pt"))
            continue
        path = os.path.join(image_root or "", question["image"])
        if ours is None:
            image = Image.open(path).convert("RGB")
            prompts.append(processor(images=[image], text=[text], return_tensors="pt"))
        else:  # the processor expands <image> (any image does); the pixels are ours
            inputs = processor(images=[Image.new("RGB", (8, 8))], text=[text],
                               return_tensors="pt")
            inputs["pixel_values"] = ours([path])
            prompts.append(inputs)
    answers: list[Optional[str]] = [None] * len(questions)
    by_length: dict[tuple, list[int]] = {}
    for index, inputs in enumerate(prompts):
        key = (inputs["input_ids"].shape[1], "pixel_values" in inputs)
        by_length.setdefault(key, []).append(index)
    done = 0
    for (_, has_image), indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.cat([prompts[i]["input_ids"] for i in chunk])
            extras = {}
            if has_image:
                extras["pixel_values"] = torch.cat([prompts[i]["pixel_values"] for i in chunk])
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=max_new_tokens, **extras)
            for row, index in enumerate(chunk):
                answers[index] = _cut(processor.tokenizer.decode(
                    output[row, ids.shape[1]:], skip_special_tokens=True), stops)
            done += len(chunk)
        say(f"hf generate: {done}/{len(questions)} questions")
    return answers
