"""MoE-LLaVA's own layouts (not in transformers) -> our model, key by key and logit by logit.

A tiny transformers LLaVA (CLIP / SigLIP + StableLM) is written in MoE-LLaVA's layout
(llava_fixtures: its names, StableLMEpoch config keys, shards + index); the MoE variant
replaces FFNs by ``DeepSpeedStyleMoE``, a slow reference of DeepSpeed's gating whose module
names are DeepSpeed's, so its state dict has MoE-LLaVA's MoE keys. The converted model must
give the reference's logits (fp32, <= 1e-4), hold exactly our model's keys, and every bad
input must fail with the file and key named and nothing written.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from llava_fixtures import (HF_VOCAB, hf_logits, make_moe, moe_llava_config, moe_llava_state,
                            moe_section, our_logits, our_model, run_tool, sample_inputs,
                            save_tower, tiny_llava, write_sharded)
from megatron_stgc.convert import ConversionError, write_pretrained
from megatron_stgc.convert import moe_llava_names
from megatron_stgc.convert.llava import convert_llava_checkpoint
from stgc_utils import init_single_process

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def quiet(_):
    pass


def write_checkpoint(tmp_path, hf, tower, moe=None, fmt="safetensors", tower_weights=True,
                     in_checkpoint=True, layout="moe-llava"):
    """(checkpoint dir, tower dir) in MoE-LLaVA's layout (or LLaVA-1.5's)."""
    state = moe_llava_state(hf, layout)
    if not in_checkpoint:
        state = {k: v for k, v in state.items() if "_tower." not in k}
    write_sharded(str(tmp_path / "moe_llava"), state, moe_llava_config(hf, tower, moe, layout),
                  fmt=fmt)
    save_tower(hf, tower, str(tmp_path / "tower"), weights=tower_weights)
    return str(tmp_path / "moe_llava"), str(tmp_path / "tower")


def convert_and_load(tmp_path, directory, vision_dir, **model_overrides):
    state, flags = convert_llava_checkpoint(directory, vision_dir, log=quiet)
    write_pretrained(str(tmp_path / "ours"), state, flags)
    model, notes = our_model(flags, str(tmp_path / "ours"), **model_overrides)
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert set(state) == expected, (sorted(set(state) - expected), sorted(expected - set(state)))
    return model, flags, state


@pytest.mark.parametrize("tower,fmt,in_checkpoint,layout", [
    ("clip", "safetensors", True, "moe-llava"), ("siglip", "bin", False, "moe-llava"),
    ("clip", "bin", True, "llava")])
def test_dense_moe_llava_layout_gives_the_transformers_logits(tmp_path, tower, fmt,
                                                              in_checkpoint, layout):
    """MoE-LLaVA stage II (llava_stablelm): tower weights in the checkpoint or only in the
    tower directory, safetensors or .bin shards; LLaVA-1.5's names (with a StableLM LM: the
    layout is what is tested)."""
    hf = tiny_llava(tower)
    directory, vision_dir = write_checkpoint(tmp_path, hf, tower, fmt=fmt,
                                             in_checkpoint=in_checkpoint, layout=layout)
    model, flags, _ = convert_and_load(tmp_path, directory, vision_dir)
    assert flags["num_experts"] is None and flags["vision_model_type"] == tower
    ids, ours, pixels = sample_inputs(tower)
    diff = (our_logits(model, ours, pixels) - hf_logits(hf, ids, pixels)).abs().max().item()
    print(f"MoE-LLaVA dense {tower}: max abs logit diff {diff:.2e}")
    assert diff <= TOL


def test_tower_config_only_takes_the_weights_from_the_checkpoint(tmp_path):
    hf = tiny_llava("clip")
    directory, vision_dir = write_checkpoint(tmp_path, hf, "clip", tower_weights=False)
    notes = []
    state, _ = convert_llava_checkpoint(directory, vision_dir, log=notes.append)
    assert any("weights from the checkpoint" in note for note in notes)
    key = "model.image_tower.image_tower.vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(state["vision_model.conv1.weight"], moe_llava_state(hf)[key])


@pytest.mark.parametrize("moe_layers,top_k,distinct", [
    ([0, 2], 2, False),  # copies of the dense FFN, random router: the dense logits
    ([0, 2], 2, True),   # MoE-LLaVA's sparse placement (--moe-layer-freq 2), distinct experts
    ([1, 2], 1, True),   # top-1, a placement only --moe-layer-pattern expresses
])
def test_moe_llava_moe_checkpoint_gives_the_reference_logits(tmp_path, moe_layers, top_k,
                                                            distinct):
    hf = tiny_llava("clip", layers=3)
    reference = make_moe(hf, moe_layers, top_k=top_k, distinct=distinct)
    directory, vision_dir = write_checkpoint(tmp_path, reference, "clip",
                                             moe=moe_section(moe_layers, top_k=top_k))
    model, flags, state = convert_and_load(tmp_path, directory, vision_dir)
    assert (flags["num_experts"], flags["moe_router_topk"]) == (4, top_k)
    assert flags["moe_router_pre_softmax"] is (top_k == 1)
    if moe_layers == [0, 2]:
        assert (flags["moe_layer_freq"], flags["moe_layer_pattern"]) == (2, None)
    else:
        assert flags["moe_layer_pattern"] == "0,1,1"
    assert [i for i, layer in enumerate(model.language_model.decoder.layers)
            if hasattr(layer.mlp, "router")] == moe_layers
    _check_moe_tensors(state, moe_llava_state(reference), moe_layers)
    ids, ours, pixels = sample_inputs("clip")
    got = our_logits(model, ours, pixels)
    want = hf_logits(reference, ids, pixels)
    diff = (got - want).abs().max().item()
    print(f"MoE-LLaVA MoE {moe_layers} top-{top_k} distinct={distinct}: diff {diff:.2e}")
    assert diff <= TOL
    dense_diff = (got - hf_logits(hf, ids, pixels)).abs().max().item()
    assert (dense_diff <= TOL) is (not distinct)  # distinct experts change the function


def _check_moe_tensors(ours: dict, theirs: dict, moe_layers: list[int]) -> None:
    """Key by key: routers are the wg rows, expert e's fc1 = [gate; up], fc2 = down."""
    for i in moe_layers:
        src = f"model.layers.{i}.mlp.deepspeed_moe."
        dst = f"language_model.decoder.layers.{i}.mlp."
        assert torch.equal(ours[dst + "router.weight"], theirs[src + "gate.wg.weight"])
        for e in range(4):
            expert = f"{src}experts.deepspeed_experts.{e}."
            mine = f"{dst}experts.local_experts.{e}."
            assert torch.equal(ours[mine + "linear_fc1.weight"], torch.cat(
                [theirs[expert + "gate_proj.weight"], theirs[expert + "up_proj.weight"]]))
            assert torch.equal(ours[mine + "linear_fc2.weight"],
                               theirs[expert + "down_proj.weight"])
    moe_sources = [k for k in theirs if ".deepspeed_moe." in k]
    assert len(moe_sources) == len(moe_layers) * (1 + 4 * 3)  # router + 4 x (gate, up, down)


def test_name_table_round_trips_both_ways():
    """split / join are exact inverses on both sides, and to_moe_llava undoes to_ours."""
    hf = tiny_llava("clip", layers=3)
    theirs = {k: v for k, v in moe_llava_state(make_moe(hf, [0, 2])).items()
              if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))}
    views = moe_llava_names.split(theirs, "moe_llava")
    assert views.moe_layers == [0, 2] and sorted(views.experts) == [0, 1, 2, 3]
    assert views.layer_prefix == "model.layers.{i}"
    back = moe_llava_names.join(views, "moe_llava")
    assert back.keys() == theirs.keys() and all(back[k] is theirs[k] for k in theirs)

    def to_megatron(state):  # a pure renaming stand-in for a family converter
        return {k.replace("model.layers.", "decoder.layers."): v for k, v in state.items()}

    def from_megatron(state):
        return {k.replace("decoder.layers.", "model.layers."): v for k, v in state.items()}

    ours = moe_llava_names.to_ours(theirs, to_megatron)
    assert "decoder.layers.2.mlp.experts.local_experts.3.gate_proj.weight" in ours
    assert "decoder.layers.0.mlp.router.weight" in ours
    assert moe_llava_names.join(moe_llava_names.split(ours, "ours"), "ours").keys() == ours.keys()
    again = moe_llava_names.to_moe_llava(ours, from_megatron)
    assert again.keys() == theirs.keys() and all(again[k] is theirs[k] for k in theirs)


def test_tool_converts_a_moe_llava_checkpoint(tmp_path, capsys):
    hf = tiny_llava("siglip")
    directory, vision_dir = write_checkpoint(tmp_path, make_moe(hf, [0]), "siglip",
                                             moe=moe_section([0]))
    out = tmp_path / "out"
    assert run_tool("--llava-checkpoint", directory, "--vision-model", vision_dir,
                    "--output", str(out)) == 0
    flags = yaml.safe_load((out / "args.yaml").read_text())
    assert flags["num_experts"] == 4 and flags["vision_drop_first_patch"] is True
    state = torch.load(out / "model.pt", weights_only=True)["model"]
    assert "language_model.decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in state
    assert sorted(os.listdir(tmp_path)) == ["moe_llava", "out", "tower"]  # no staging left
    assert run_tool("--llava-checkpoint", directory, "--vision-model", vision_dir,
                    "--output", str(out)) == 2
    assert "already exists" in capsys.readouterr().err


def test_upcycling_an_moe_checkpoint_is_refused(tmp_path):
    hf = tiny_llava("clip")
    directory, vision_dir = write_checkpoint(tmp_path, make_moe(hf, [0]), "clip",
                                             moe=moe_section([0]))
    state, flags = convert_llava_checkpoint(directory, vision_dir, log=quiet)
    write_pretrained(str(tmp_path / "ours"), state, flags)
    with pytest.raises(ValueError, match="already MoE.*drop --moe-use-upcycling"):
        our_model(flags, str(tmp_path / "ours"), moe_use_upcycling=True)


def _edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _replace_tensor(directory: str, key: str, value: torch.Tensor) -> str:
    """Put ``value`` under ``key`` in the shard that holds it; returns the shard's name."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        name = json.load(f)["weight_map"][key]
    tensors = load_file(os.path.join(directory, name))
    tensors[key] = value
    save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    return name


def _drop_tensors(directory: str, marker: str) -> None:
    """Remove every tensor whose key contains ``marker`` from the shards and the index."""
    from safetensors.torch import load_file, save_file

    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    for name in set(index["weight_map"].values()):
        tensors = load_file(os.path.join(directory, name))
        kept = {k: t for k, t in tensors.items() if marker not in k}
        save_file(kept, os.path.join(directory, name), metadata={"format": "pt"})
    index["weight_map"] = {k: n for k, n in index["weight_map"].items() if marker not in k}
    with open(index_path, "w") as f:
        json.dump(index, f)


def _bad_family(d, v):
    _edit_config(d, model_type="llava_mistral")
    return "'llava_mistral'.*family 'mistral' is not converted", None


def _missing_shard(d, v):
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    return "names shard 'model-00002-of-00002.safetensors' \\(holding '.*'", None


def _projector_shape(d, v):
    key = "model.mm_projector.image_spatial_proj.0.weight"
    name = _replace_tensor(d, key, torch.zeros(64, 31))
    return f"{name}: projector '{key}' has shape \\[64, 31\\]", None


def _vocab(d, v):
    _edit_config(d, vocab_size=HF_VOCAB + 8)
    return "'model.embed_tokens.weight' has 100 rows but config.json says vocab_size 108", None


def _no_tower(d, v):
    return ("names the image tower 'openai/clip-vit-large-patch14-336'.*give --vision-model",
            "skip")


def _wrong_tower(d, v):
    _edit_config(d, mm_image_tower="google/siglip-so400m-patch14-384")
    return "a siglip tower by MoE-LLaVA's rule.*is a clip model", None


def _tower_shape(d, v):
    _edit_config(v, hidden_size=48, intermediate_size=64)  # the wrong tower's config
    return "mm_hidden_size 32 differs from the vision tower's hidden_size 48", None


def _tower_ffn(d, v):
    """The tower directory holds a config only, for another FFN width than the weights."""
    os.remove(os.path.join(v, "model.safetensors"))
    _edit_config(v, intermediate_size=48)
    return ("converted 'vision_model.decoder.layers.0.mlp.linear_fc1.weight' has shape "
            "\\[64, 32\\], but a model built from the checkpoint's config needs \\[48, 32\\]"), None


def _router_rows(d, v):
    key = "model.layers.0.mlp.deepspeed_moe.gate.wg.weight"
    name = _replace_tensor(d, key, torch.zeros(3, 64))
    return f"{name}: '{key}' has 3 rows, config.json moe.num_experts says 4", "moe"


def _missing_expert(d, v):
    _drop_tensors(d, "deepspeed_experts.3.")  # as a checkpoint saved with ep_size 2 would be
    return "expert weights for experts \\[0, 1, 2\\], config.json moe.num_experts is 4", "moe"


def _moe_keys_without_moe_config(d, v):
    _edit_config(d, moe={"moe_enable": False})
    return "holds DeepSpeed-MoE weights .*no moe section with moe_enable true", "moe"


@pytest.mark.parametrize("spoil", [_bad_family, _missing_shard, _projector_shape, _vocab,
                                   _no_tower, _wrong_tower, _tower_shape, _tower_ffn,
                                   _router_rows,
                                   _missing_expert, _moe_keys_without_moe_config])
def test_bad_input_names_file_and_key_and_writes_nothing(tmp_path, capsys, spoil):
    hf = tiny_llava("clip")
    moe = spoil.__name__ in ("_router_rows", "_missing_expert", "_moe_keys_without_moe_config")
    model = make_moe(hf, [0]) if moe else hf
    directory, vision_dir = write_checkpoint(tmp_path, model, "clip",
                                             moe=moe_section([0]) if moe else None)
    message, mode = spoil(directory, vision_dir)
    argv = ["--llava-checkpoint", directory, "--output", str(tmp_path / "out")]
    if mode != "skip":
        argv += ["--vision-model", vision_dir]
    capsys.readouterr()
    assert run_tool(*argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert sorted(os.listdir(tmp_path)) == ["moe_llava", "tower"]  # nothing written
    with pytest.raises(ConversionError):
        convert_llava_checkpoint(directory, None if mode == "skip" else vision_dir, log=quiet)


def test_te_layout_checkpoint_loads_into_the_local_model(tmp_path):
    """--te-layout (norms of dense layers fused into their linears, MoE layers keep
    pre_mlp_layernorm): the loader renames it back; the same logits."""
    hf = tiny_llava("clip", layers=3)
    reference = make_moe(hf, [0, 2])
    directory, vision_dir = write_checkpoint(tmp_path, reference, "clip", moe=moe_section([0, 2]))
    state, flags = convert_llava_checkpoint(directory, vision_dir, te_layout=True, log=quiet)
    assert "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in state
    assert "language_model.decoder.layers.0.pre_mlp_layernorm.weight" in state  # MoE layer
    write_pretrained(str(tmp_path / "ours"), state, flags)
    model, notes = our_model(flags, str(tmp_path / "ours"))
    assert "language_model (TE -> local layout)" in notes[0]
    ids, ours, pixels = sample_inputs("clip")
    diff = (our_logits(model, ours, pixels) - hf_logits(reference, ids, pixels)).abs().max().item()
    assert diff <= TOL
