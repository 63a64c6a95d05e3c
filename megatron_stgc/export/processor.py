"""The exported model's processor: image preprocessing, tokenizer and chat template.

The image processor repeats our preprocessing (data/images.py): RGB, resize to exactly
``--img-h`` x ``--img-w`` (bilinear), ``x / 255``, ``(x - mean) / std`` with the tower's
mean / std (CLIP's, or 0.5 for SigLIP), no centre crop; ``--image-aspect-ratio pad`` first pads
to a square of the mean colour (transformers' ``LlavaImageProcessor`` ``do_pad``, colour
``int(255 * mean)``, MoE-LLaVA's ``expand2square``). transformers resizes 8-bit images with
Pillow and rounds the result to 8 bits; ours resizes in float (and clamps at the borders like
DALI): pixels that need resizing differ by up to about one grey level (0.88 measured on the
digits, mean 0.18; Pillow resamples 8-bit images in fixed point)
(docs/EXPORT.md measures what that changes).

``LlavaProcessor`` expands each ``<image>`` into ``num_image_tokens`` copies: patches
(``(img_h / patch) * (img_w / patch)``) + ``num_additional_image_tokens`` (CLIP's class token)
- 1 for the 'default' select strategy, our ``num_image_tokens``.
"""

from __future__ import annotations

from megatron_stgc.export.chat_template import jinja_template, template_name
from megatron_stgc.export.hf_vision import extra_image_tokens, select_strategy
from megatron_stgc.export.lm_export import ExportError
from megatron_stgc.export.tokenizer_files import IMAGE_TOKEN

BILINEAR = 2  # PIL.Image.BILINEAR


def image_processor(config):
    import transformers

    from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

    v = config.vision
    mean, std = (CLIP_MEAN, CLIP_STD) if v.vision_model_type == "clip" else (SIGLIP_MEAN,
                                                                             SIGLIP_STD)
    aspect = getattr(config.data, "image_aspect_ratio", "resize")
    if aspect not in ("resize", "pad"):
        raise ExportError(f"--image-aspect-ratio {aspect!r}: the export knows resize and pad")
    return transformers.LlavaImageProcessorPil(
        do_resize=True, size={"height": v.img_h, "width": v.img_w}, resample=BILINEAR,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
        do_pad=aspect == "pad")


def llava_processor(config, tokenizer):
    """LlavaProcessor for the exported model (``tokenizer``: transformers_tokenizer's)."""
    import transformers

    return transformers.LlavaProcessor(
        image_processor=image_processor(config), tokenizer=tokenizer,
        patch_size=config.vision.patch_dim,
        vision_feature_select_strategy=select_strategy(config),
        chat_template=jinja_template(template_name(config), tokenizer.eos_token),
        image_token=IMAGE_TOKEN, num_additional_image_tokens=extra_image_tokens(config))
