"""The check after every export: the written model, reloaded, gives our logits.

``fixed_input`` is the same every time (seeded): two rows, each with one image block at a
different offset (vision models; pixels drawn from N(0, 1), i.e. already normalised) and
random text ids below the tokenizer's size around it. ``our_logits`` runs the model the export
came from, ``hf_logits`` the reloaded transformers model, both in fp32; ``compare`` prints the
max abs difference and raises ExportError above the tolerance (the caller then removes the
output). ``check_processor_ids``: the saved processor's ids for a question (chat template
applied) must be the ids our eval builds for it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_stgc.export.lm_export import ExportError


def fixed_input(config, image_token_id: Optional[int], text_vocab: int, seed: int = 0
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(tokens [2, s], pixels [2, 3, H, W] or None)."""
    from megatron_stgc.model.vision import num_image_tokens

    generator = torch.Generator().manual_seed(seed)
    if image_token_id is None:
        length = min(config.model.seq_length, 24)
        return torch.randint(0, text_vocab, (2, length), generator=generator), None
    image = num_image_tokens(config)
    length = min(config.model.seq_length, image + 12)
    if length < image + 2:
        raise ExportError(f"--seq-length {config.model.seq_length} leaves no room for text "
                          f"around the {image} image tokens of the check input")
    tokens = torch.randint(0, text_vocab, (2, length), generator=generator)
    for row, offset in enumerate((1, min(5, length - image))):
        tokens[row, offset:offset + image] = image_token_id
    v = config.vision
    pixels = torch.randn(2, 3, v.img_h, v.img_w, generator=generator)
    return tokens, pixels


@torch.no_grad()
def our_logits(model, tokens: torch.Tensor, pixels: Optional[torch.Tensor]) -> torch.Tensor:
    """[b, s, V] from our model (MoELLaVAModel or GPTModel), fp32."""
    if next(model.parameters()).dtype != torch.float32:
        model.float()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    extras = {} if pixels is None else {"images": pixels}
    return model(tokens, positions, None, **extras).float()


@torch.no_grad()
def hf_logits(directory: str, tokens: torch.Tensor, pixels: Optional[torch.Tensor]
              ) -> torch.Tensor:
    """[b, s, V] from the transformers model saved in ``directory``, fp32."""
    import transformers

    if pixels is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        return model.eval()(input_ids=tokens).logits.float()
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory,
                                                                     dtype=torch.float32)
    return model.eval()(input_ids=tokens, pixel_values=pixels).logits.float()


def compare(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float, what: str,
            say: Callable[[str], None] = print) -> float:
    """Max abs difference of two logit tensors; ExportError above ``tolerance``."""
    if ours.shape != theirs.shape:
        raise ExportError(f"{what}: logits of shape {tuple(theirs.shape)}, ours "
                          f"{tuple(ours.shape)}")
    diff = float((ours - theirs).abs().max())
    say(f"export check: {what}: max abs logit difference {diff:.3g} (tolerance {tolerance:g}, "
        f"logits up to {float(ours.abs().max()):.3g})")
    if not diff <= tolerance:
        raise ExportError(f"{what}: the reloaded model's logits differ from ours by {diff:.3g} "
                          f"(> --export-tolerance {tolerance:g}); the export is wrong and was "
                          "not kept")
    return diff


def our_prompt_ids(config, question: str, tokenizer, image_token_id: int) -> list[int]:
    """The ids our eval builds for ``question`` with an image (the run's chat template)."""
    from megatron_stgc.model.vision import num_image_tokens

    try:  # --chat-template (data/chat_templates.py), where this build has it
        from megatron_stgc.data.chat_templates import get_template
    except ImportError:
        from megatron_stgc.data.conversation import prompt_tokens
    else:
        prompt_tokens = get_template(getattr(config.data, "chat_template", "plain")).prompt_tokens
    return prompt_tokens(question, tokenizer, has_image=True, image_token_id=image_token_id,
                         num_image_tokens=num_image_tokens(config))


def processor_ids(directory: str, question: str, image) -> list[int]:
    """The saved processor's input ids for one question with one image (chat template)."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()


def check_processor_ids(directory: str, config, tokenizer, image_token_id: int,
                        say: Callable[[str], None] = print) -> None:
    from PIL import Image

    question = "Which digit is shown? Answer with one word."
    image = Image.new("RGB", (config.vision.img_w, config.vision.img_h), (120, 60, 30))
    theirs = processor_ids(directory, question, image)
    ours = our_prompt_ids(config, question, tokenizer, image_token_id)
    if theirs != ours:
        raise ExportError(f"the saved processor tokenizes a question as {theirs[:40]}..., our "
                          f"eval as {ours[:40]}... (the chat template or tokenizer differs)")
    say(f"export check: AutoProcessor's ids for a question with an image equal ours "
        f"({len(ours)} ids)")
