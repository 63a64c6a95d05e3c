"""``megatron-stgc export --format moe-llava``: StableLM-2 and Phi-2 MoE models in MoE-LLaVA's
own layout, round trip.

A tiny MoE-LLaVA MoE checkpoint (llava_fixtures: transformers' LLaVA with a StableLM or Phi
text model, FFNs of layers 0 and 2 replaced by DeepSpeed-style MoE with distinct experts and a
random router, written with MoE-LLaVA's names and config keys) is imported with our converter,
exported again from that --pretrained-checkpoint, and:

* every language-model and projector tensor written equals the original MoE-LLaVA checkpoint's
  (the vocabulary rows our converter padded are zero), under the same names;
* config.json has MoE-LLaVA's model_type and moe section;
* our importer reading the export gives the reference model's logits (DeepSpeed-style gating
  without noise, fp32, <= 1e-4), and the flags it derives are those of the first import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from launch_utils import REPO
from llava_fixtures import (HF_VOCAB, TOWER_NAMES, hf_logits, make_moe, moe_llava_config,
                            moe_llava_state, moe_section, our_logits, our_model, sample_inputs,
                            save_tower, tiny_llava, write_sharded)
from megatron_stgc.convert import write_pretrained
from megatron_stgc.convert.llava import convert_llava_checkpoint
from megatron_stgc.data.digits import build_digits_mix
from stgc_utils import init_single_process

TOL = 1e-4
MOE_LAYERS = [0, 2]


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return {"mix": build_digits_mix(str(root / "data")), "cache": str(root / "cache")}


def phi_moe_llava_config(hf_llava, moe: dict | None) -> dict:
    """config.json of MoE-LLaVA's Phi (its vendored PhiConfig keys + the LLaVA keys)."""
    text = hf_llava.config.text_config.to_dict()
    keys = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "hidden_act", "layer_norm_eps",
                                 "tie_word_embeddings", "max_position_embeddings")}
    rope = text.get("rope_parameters") or {}
    stablelm = moe_llava_config(hf_llava, "clip", moe)
    llava_keys = {k: v for k, v in stablelm.items() if k.startswith(("mm_", "image_"))}
    config = {"model_type": "moe_llava_phi" if moe else "llava_phi",
              "architectures": ["MoELLaVAPhiForCausalLM" if moe else "LlavaPhiForCausalLM"],
              **keys, "rope_theta": rope.get("rope_theta", 10000.0),
              "partial_rotary_factor": rope.get("partial_rotary_factor", 0.5), **llava_keys}
    if moe:
        config["moe"] = moe
    return config


def _import(tmp_path, family: str, moe_layers: list[int] | None = MOE_LAYERS):
    """(reference model (MoE unless ``moe_layers`` is None), its MoE-LLaVA state, our
    pretrained dir, first-import flags)."""
    hf = tiny_llava("clip", layers=3, family=family)
    reference = make_moe(hf, moe_layers, top_k=2, distinct=True) if moe_layers else hf
    state = moe_llava_state(reference)
    moe = moe_section(moe_layers) if moe_layers else None
    config = (moe_llava_config(reference, "clip", moe) if family == "stablelm"
              else phi_moe_llava_config(reference, moe))
    write_sharded(str(tmp_path / "moe_llava"), state, config)
    save_tower(reference, "clip", str(tmp_path / "tower"))
    ours, flags = convert_llava_checkpoint(str(tmp_path / "moe_llava"), str(tmp_path / "tower"),
                                           log=lambda _: None)
    write_pretrained(str(tmp_path / "ours"), ours, flags)
    return reference, state, str(tmp_path / "ours"), flags


def _export(pretrained: str, output: str, digits, *extra: str, fmt: str = "moe-llava"):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    mix = digits["mix"]
    command = [sys.executable, "-m", "megatron_stgc", "export", "--format", fmt,
               "--output", output, "--config", os.path.join(pretrained, "args.yaml"),
               "--pretrained-checkpoint", pretrained, "--data-path", mix["train"],
               "--image-root", mix["image_root"], "--cache-dir", digits["cache"],
               "--vocab-size", "96", "--seq-length", "32", *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_moe_llava_export_round_trip(tmp_path, digits, family):
    reference, original, pretrained, flags = _import(tmp_path, family)
    output = tmp_path / "exported"
    result = _export(pretrained, str(output), digits, "--moe-llava-image-tower",
                     TOWER_NAMES["clip"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "export check: our importer (--llava-checkpoint) on the MoE-LLaVA layout" in \
        result.stdout
    assert "Gumbel" in result.stdout  # top-2: MoE-LLaVA's eval samples its second expert

    written = _read_weights(str(output))
    model_keys = {k for k in original if "image_tower" not in k}
    assert {k for k in written if "image_tower" not in k} == model_keys
    for key in sorted(model_keys):
        got, want = written[key], original[key]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):  # padded to 128 rows
            assert not got[HF_VOCAB:].any(), key
            got = got[:HF_VOCAB]
        assert torch.equal(got, want), key
    assert any(".deepspeed_moe.experts.deepspeed_experts.3." in k for k in written)

    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == f"moe_llava_{family}"
    assert config["moe"]["moe_layers_idx"] == MOE_LAYERS
    assert config["moe"]["num_experts"] == [4, 4] and config["moe"]["top_k_experts"] == 2
    assert config["mm_image_tower"] == TOWER_NAMES["clip"]
    assert config["mm_vision_select_layer"] == -2

    back, back_flags = convert_llava_checkpoint(str(output), str(output / "image_tower"),
                                                log=lambda _: None)
    assert {k: back_flags[k] for k in flags} == flags
    write_pretrained(str(tmp_path / "back"), back, back_flags)
    model, _ = our_model(back_flags, str(tmp_path / "back"))
    ids, ours, pixels = sample_inputs("clip")
    diff = (our_logits(model, ours, pixels) - hf_logits(reference, ids, pixels)).abs().max()
    print(f"MoE-LLaVA layout export ({family}, MoE {MOE_LAYERS}): diff {diff.item():.2e}")
    assert diff.item() <= TOL


def test_moe_llava_export_needs_the_tower_name(tmp_path, digits):
    _, _, pretrained, _ = _import(tmp_path, "stablelm")
    result = _export(pretrained, str(tmp_path / "out"), digits)
    assert result.returncode == 2
    assert "--moe-llava-image-tower" in result.stderr and "openai or laion" in result.stderr
    assert not (tmp_path / "out").exists()
    # an args.yaml-driven run keeps the importer's flags (sanity of the fixture)
    assert yaml.safe_load(open(os.path.join(pretrained, "args.yaml")))["num_experts"] == 4


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_dense_stablelm_and_phi_export_to_transformers_llava(tmp_path, digits, family):
    """A dense StableLM-2 / Phi-2 LLaVA (imported from MoE-LLaVA's layout) exports with
    --format hf as transformers' LLaVA with StableLmForCausalLM / PhiForCausalLM, whose logits
    equal the ORIGINAL transformers model's (two transformers models compared)."""
    import transformers

    from llava_fixtures import HF_IMAGE_ID

    reference, _, pretrained, _ = _import(tmp_path, family, moe_layers=None)
    output = tmp_path / "hf"
    result = _export(pretrained, str(output), digits, fmt="hf")
    assert result.returncode == 0, result.stderr[-3000:]
    exported, loading = transformers.AutoModelForImageTextToText.from_pretrained(
        str(output), dtype=torch.float32, output_loading_info=True)
    exported.eval()
    assert not any(loading.get(kind) for kind in ("missing_keys", "unexpected_keys",
                                                  "mismatched_keys")), loading
    assert exported.config.text_config.model_type == family
    ids, _, pixels = sample_inputs("clip")
    exported_ids = ids.masked_fill(ids == HF_IMAGE_ID, exported.config.image_token_index)
    with torch.no_grad():
        got = exported(input_ids=exported_ids, pixel_values=pixels).logits[..., :HF_VOCAB]
    diff = (got - hf_logits(reference, ids, pixels)).abs().max().item()
    print(f"dense {family} LLaVA -> --format hf: diff {diff:.2e}")
    assert diff <= TOL
