"""A tiny MoE-LLaVA and LLaVA-shaped micro-batches in several layouts, for the padding and
packing tests (tests/test_padding_mask.py, tests/test_sequences.py).

Samples are synthetic token ids (some with a block of image tokens, an answer with loss)
laid out by the package's own ``data/sequences.py``; ``widen`` adds padding columns the
plain way. ``real_token_rows`` maps every real position of every sample to its row in
megatron's router order ([s, b] flattened: column * rows + row), so per-token router and
STGC tensors of two layouts can be compared token by token.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_stgc.config import config_from_flat, fill_defaults
from megatron_stgc.data.sequences import vision_language_batch
from megatron_stgc.model.modality import PAD

VOCAB, IMAGE_ID, PAD_ID = 128, 100, 0
P = 4  # image tokens per image: (8 / 4)^2 patches, class token dropped
SEQ = 40
FLAGS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
             moe_ffn_hidden_size=32, num_experts=4, moe_router_topk=2, moe_layer_freq=1,
             moe_aux_loss_coeff=0.01, seq_length=SEQ, vision_model_type="clip",
             vision_num_layers=1, vision_hidden_size=16, vision_num_attention_heads=2,
             img_h=8, img_w=8, patch_dim=4, data_path=__file__, micro_batch_size=4,
             global_batch_size=4, lr=1e-3, min_lr=1e-3, lr_warmup_fraction=0.0,
             vocab_size=VOCAB, seed=1234, train_iters=10)


def llava_config(**overrides):
    return fill_defaults(config_from_flat({**FLAGS, **overrides}))


def synthetic_samples(count: int, seed: int, max_ids: int = SEQ + 1):
    """(samples [(ids, loss mask)], images [n_img, 3, 8, 8], has_image) with lengths from
    7 ids to ``max_ids``; every other sample has an image after its first two ids."""
    rng = np.random.default_rng(seed)
    samples, has_image = [], []
    for i in range(count):
        length = int(rng.integers(7 + P, max_ids + 1))
        ids = rng.integers(1, 90, size=length).astype(np.int64)
        mask = np.zeros(length, np.int64)
        mask[length - int(rng.integers(2, 5)):] = 1  # the answer: the last few ids
        with_image = i % 2 == 0
        if with_image:
            ids[2:2 + P] = IMAGE_ID
        samples.append((ids, mask))
        has_image.append(with_image)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(sum(has_image), 3, 8, 8, generator=generator)
    return samples, images, has_image


def layout(samples, images, has_image, pack: bool = False, multiple: int = 1):
    return vision_language_batch(samples, images, has_image, seq_length=SEQ, multiple=multiple,
                                 pack=pack, pad_id=PAD_ID, image_token_id=IMAGE_ID)


def widen(batch: dict, width: int) -> dict:
    """The same micro-batch with padding columns added at the end of every row, up to
    ``width`` (what the layout before issue 20 computed: every row --seq-length wide)."""
    rows, extra = batch["tokens"].shape[0], width - batch["tokens"].shape[1]
    fill = {"tokens": PAD_ID, "labels": PAD_ID, "loss_mask": 0.0, "position_ids": 0,
            "padding_mask": True, "modality": PAD, "segment_ids": -1}
    wide = dict(batch)
    for key, value in fill.items():
        if key in batch:
            pad = torch.full((rows, extra), value, dtype=batch[key].dtype)
            wide[key] = torch.cat([batch[key], pad], dim=1)
    return wide


def real_token_rows(batch: dict, num_samples: int) -> list[torch.Tensor]:
    """Per sample: the router-order indices of its real positions, in position order."""
    rows = batch["tokens"].shape[0]
    if "segment_ids" in batch:
        owner = batch["segment_ids"]
    else:  # one sample per row
        owner = torch.where(batch["modality"] == PAD, -1, torch.arange(rows).unsqueeze(1))
    out = []
    for sample in range(num_samples):
        row, column = (owner == sample).nonzero(as_tuple=True)  # row-major: position order
        out.append(column * rows + row)
    return out


def per_sample(values_bs: torch.Tensor, batch: dict, num_samples: int) -> list[torch.Tensor]:
    """values [rows, width] (e.g. the per-token loss) -> per sample, in position order."""
    flat = values_bs.t().reshape(-1)  # router order
    return [flat[index] for index in real_token_rows(batch, num_samples)]
