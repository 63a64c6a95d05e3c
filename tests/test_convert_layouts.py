"""Checkpoints move between CPU runs (local spec) and GPU runs (Transformer Engine spec):
the layout is detected on load and converted, both ways (real megatron-core models).

CI cannot build a TE model; the TE layout here is the local state renamed by
``to_te_layout`` (norms fused into the linears of dense layers, MoE layers keeping
``pre_mlp_layernorm``, grouped-GEMM expert weights ``linear_fcK.weight{e}``), loaded back
into local-spec models by the detector. The GPU check loads a local-layout checkpoint into
a TE model for real."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_stgc.convert.layouts import matching_layout, to_local_layout, to_te_layout
from test_llava_model import FLAGS, IMAGE_ID, VOCAB, make_model, parallel_state  # noqa: F401
from megatron_stgc.config import config_from_flat
from megatron_stgc.training.setup import build_model


def _real_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_te_layout_keys_and_round_trip_on_a_moe_model():
    state = _real_state(make_model())  # layer 0 MoE (4 experts), layer 1 dense
    te = to_te_layout(state)
    lm = "language_model.decoder.layers"
    assert f"{lm}.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert f"{lm}.0.pre_mlp_layernorm.weight" in te  # MoE layer: norm stays separate
    assert f"{lm}.1.mlp.linear_fc1.layer_norm_weight" in te  # dense layer: fused
    assert f"{lm}.0.mlp.experts.local_experts.3.linear_fc2.weight" in te
    grouped = to_te_layout(state, grouped_experts=True)
    assert f"{lm}.0.mlp.experts.linear_fc2.weight3" in grouped
    assert "vision_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in grouped
    for converted in (te, grouped):
        back = to_local_layout(converted)
        assert back.keys() == state.keys()
        assert all(back[k] is state[k] for k in state)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_te_layout_checkpoint_loads_into_a_cpu_model(tmp_path, grouped):
    source = make_model()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = _real_state(source)
    os.makedirs(tmp_path / "ckpt")
    torch.save({"model": to_te_layout(state, grouped_experts=grouped)},
               tmp_path / "ckpt" / "model.pt")
    config = config_from_flat({**FLAGS, "pretrained_checkpoint": str(tmp_path / "ckpt")})
    model, notes = build_model(config, VOCAB, IMAGE_ID)
    assert "language_model (TE -> local layout)" in notes[0], notes
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_a_dense_te_checkpoint_upcycles_on_a_cpu_model(tmp_path):
    dense = make_model(num_experts=None)
    state = _real_state(dense)
    os.makedirs(tmp_path / "dense")
    torch.save({"model": to_te_layout(state)}, tmp_path / "dense" / "model.pt")
    moe = make_model(pretrained_checkpoint=str(tmp_path / "dense"), moe_use_upcycling=True)
    fc1 = state["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    for expert in moe.language_model.decoder.layers[0].mlp.experts.local_experts:
        assert torch.equal(expert.linear_fc1.weight, fc1)


def test_a_checkpoint_in_no_known_layout_is_named_in_the_error(tmp_path):
    state = _real_state(make_model(num_experts=None))
    state["language_model.decoder.layers.0.mlp.linear_fc1.weight_renamed"] = state.pop(
        "language_model.decoder.layers.0.mlp.linear_fc1.weight")
    converted, name = matching_layout(state, make_model(num_experts=None).state_dict().keys())
    assert name == "as saved" and converted is state
    os.makedirs(tmp_path / "bad")
    torch.save({"model": state}, tmp_path / "bad" / "model.pt")
    with pytest.raises(ValueError, match="in any known layout"):
        make_model(num_experts=None, pretrained_checkpoint=str(tmp_path / "bad"))


def test_an_exported_text_model_loads_as_a_pretrained_checkpoint(tmp_path):
    """megatron-stgc export of a text GPT (no vision parts) writes language_model.* keys, which
    --pretrained-checkpoint reads (it refused the bare keys export used to write)."""
    from megatron_stgc.training.export import model_state_for_export

    text_flags = {k: v for k, v in FLAGS.items() if not k.startswith(("vision", "img", "patch"))
                  and k != "data_path"}
    torch.manual_seed(0)
    source, _ = build_model(config_from_flat(text_flags), VOCAB)
    exported = model_state_for_export(source)
    assert all(key.startswith("language_model.") for key in exported)
    os.makedirs(tmp_path / "exported")
    torch.save({"model": exported}, tmp_path / "exported" / "model.pt")
    torch.manual_seed(1)
    loaded, notes = build_model(config_from_flat(
        {**text_flags, "pretrained_checkpoint": str(tmp_path / "exported")}), VOCAB)
    assert "loaded language_model" in notes[0]
    for key, value in _real_state(source).items():
        assert torch.equal(loaded.state_dict()[key], value), key
