"""MoE-LLaVA model (one process, real megatron-core modules): image embeddings land on the
image-token positions, per-modality expert counts, freezing, pretrained loading and
upcycling (dense FFN -> identical experts gives the dense model's logits)."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_stgc.config import config_from_flat
from megatron_stgc.model.llava import MoELLaVAModel
from megatron_stgc.model.modality import IMAGE, PAD, TEXT
from megatron_stgc.training.expert_load import ExpertLoadCounter
from megatron_stgc.training.setup import build_model
from stgc_utils import init_single_process

VOCAB, IMAGE_ID = 128, 100
FLAGS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
             moe_ffn_hidden_size=64, num_experts=4, moe_router_topk=2, moe_layer_freq=2,
             moe_aux_loss_coeff=0.0, seq_length=24, vision_model_type="clip",
             vision_num_layers=2, vision_hidden_size=16, vision_num_attention_heads=2,
             img_h=8, img_w=8, patch_dim=4, data_path=__file__)
P = 4  # (8 / 4)^2 patches, class token dropped


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def make_model(**overrides) -> MoELLaVAModel:
    torch.manual_seed(0)
    model, _ = build_model(config_from_flat({**FLAGS, **overrides}), VOCAB, IMAGE_ID)
    return model


def sample_batch(seed: int = 0):
    """Row 0: image at positions 2..5; row 1: text only, padding at the end; row 2: image at 5..8."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 90, (3, 16), generator=generator)
    tokens[0, 2:2 + P] = IMAGE_ID
    tokens[2, 5:5 + P] = IMAGE_ID
    tokens[1, 12:] = 0
    images = torch.randn(2, 3, 8, 8, generator=generator)
    modality = torch.full((3, 16), TEXT)
    modality[tokens == IMAGE_ID] = IMAGE
    modality[1, 12:] = PAD
    positions = torch.arange(16).unsqueeze(0).expand(3, -1)
    return tokens, positions, images, modality


def test_image_embeddings_replace_exactly_the_image_positions():
    model = make_model().eval()
    tokens, positions, images, _ = sample_batch()
    with torch.no_grad():
        combined = model.combined_embeddings(tokens, positions, images)  # [s, b, h]
        text = model.language_model.embedding(input_ids=tokens, position_ids=positions)
        # the slow way: one image at a time through ViT, drop the class token, project
        per_image = [model.vision_projection(model.vision_model(images[i:i + 1])[:, 1:])[0]
                     for i in range(2)]
    expected = text.clone()
    expected[2:2 + P, 0] = per_image[0]
    expected[5:5 + P, 2] = per_image[1]
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)


def test_mismatched_image_count_is_an_error():
    model = make_model().eval()
    tokens, positions, images, _ = sample_batch()
    with pytest.raises(ValueError, match="image-token positions"):
        model.combined_embeddings(tokens, positions, images[:1])


def test_loss_backward_reaches_vision_projector_and_experts():
    model = make_model()
    tokens, positions, images, modality = sample_batch()
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, positions, None, labels=labels, images=images, modality=modality)
    assert loss.shape == (3, 16)
    loss.mean().backward()
    for part in ("vision_model.conv1.weight", "vision_projection.encoder.linear_fc1.weight",
                 "language_model.decoder.layers.0.mlp.router.weight"):
        grad = dict(model.named_parameters())[part].grad
        assert grad is not None and grad.abs().sum() > 0, part


def test_tokens_per_expert_by_modality():
    model = make_model().eval()
    counter = ExpertLoadCounter(model)
    tokens, positions, images, modality = sample_batch()
    with torch.no_grad():
        model(tokens, positions, None, images=images, modality=modality)  # no padding_mask
        model(tokens, positions, None, images=images, modality=modality,
              padding_mask=modality == PAD)
    totals = counter.collect()
    by_modality = counter.collect_by_modality()
    counter.remove()
    layer = "layer_1"
    top_k = FLAGS["moe_router_topk"]
    assert sum(by_modality[layer]["image"]) == 2 * top_k * int((modality == IMAGE).sum())
    assert sum(by_modality[layer]["text"]) == 2 * top_k * int((modality == TEXT).sum())
    # padding belongs to no modality; in the totals only where the model was not told
    # (megatron routes it either way): the first forward counts it, the second does not
    assert sum(totals[layer]) == top_k * (tokens.numel() + int((modality != PAD).sum()))


def test_freeze_flags_select_the_right_parameters():
    model = make_model(freeze_vit=True, freeze_lm_except_moe=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must still train"
    for name in trainable:
        assert name.startswith("vision_projection.") or ".mlp.router." in name \
            or ".mlp.experts." in name, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("vision_model.") for n in frozen)
    assert "language_model.embedding.word_embeddings.weight" in frozen
    assert any(".self_attention." in n for n in frozen)


def test_upcycled_model_reproduces_the_dense_model(tmp_path):
    """Experts that are copies of the dense FFN, top-2 weights summing to 1: same logits."""
    dense = make_model(num_experts=None).eval()
    state = {f"{k}": v for k, v in dense.state_dict().items() if not k.endswith("_extra_state")}
    with torch.no_grad():
        for key in state:
            state[key] = state[key] + 0.05 * torch.randn_like(state[key])  # not the init
    dense.load_state_dict(state, strict=False)
    os.makedirs(tmp_path / "dense")
    torch.save({"model": state}, tmp_path / "dense" / "model.pt")
    moe = make_model(pretrained_checkpoint=str(tmp_path / "dense"), moe_use_upcycling=True).eval()
    tokens, positions, images, modality = sample_batch()
    with torch.no_grad():
        expected = dense(tokens, positions, None, images=images)
        got = moe(tokens, positions, None, images=images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    experts = [moe.language_model.decoder.layers[0].mlp.experts.local_experts[i].linear_fc1.weight
               for i in range(4)]
    assert all(torch.equal(experts[0], e) for e in experts[1:])


def test_pretrained_without_upcycling_loads_everything_given(tmp_path):
    source = make_model(num_experts=None).eval()
    state = {k: v + 0.01 for k, v in source.state_dict().items()
             if not k.endswith("_extra_state") and not k.startswith("vision_projection.")}
    os.makedirs(tmp_path / "ckpt")
    torch.save({"model": state}, tmp_path / "ckpt" / "model.pt")
    config = config_from_flat({**FLAGS, "num_experts": None,
                               "pretrained_checkpoint": str(tmp_path / "ckpt")})
    torch.manual_seed(0)
    model, notes = build_model(config, VOCAB, IMAGE_ID)
    assert "randomly initialised (not in the checkpoint): vision_projection" in notes[0]
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
