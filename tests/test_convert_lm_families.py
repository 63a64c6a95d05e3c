"""Language-model families (issue 19): tiny random transformers models -> save_pretrained ->
convert -> our dense GPTModel's logits equal transformers' (fp32, max abs diff <= 1e-4), and
the upcycled MoE model (4 experts, top-2) at step 0 gives the same logits. Phi-2 (parallel
block, partial rotary, biased GELU-tanh MLP, biased LM head), Qwen2 (RMSNorm, SwiGLU, q/k/v
bias, tied and untied, GQA), Qwen-1 (a QWenLMHeadModel state dict and config.json, no remote
code, against the Qwen2 model it was renamed from), StableLM-2 through the registry. Bad
input: an unknown family, a missing shard, a shape or vocab mismatch fail with the file and
key named, and no output directory appears."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import transformers

from lm_convert_utils import (HF_VOCAB, PADDED_VOCAB, max_logit_diff, megatron_gpt, save_qwen1,
                              tiny_phi, tiny_qwen2, tiny_stablelm)
from megatron_stgc.config import config_from_flat, load_yaml
from megatron_stgc.convert import ConversionError, convert_pretrained
from megatron_stgc.convert.language_models import FAMILIES, family_of
from stgc_utils import init_single_process  # installs the CPU bridge

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "tools", "convert_hf_to_megatron.py")
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_single_process()
    model_parallel_cuda_manual_seed(1234)


def convert_dir(directory) -> tuple[dict, dict]:
    """convert_pretrained on a language-model directory -> (language_model state, flags)."""
    state, flags = convert_pretrained(language_dir=str(directory),
                                      padded_vocab_size=PADDED_VOCAB, log=lambda _: None)
    prefix = "language_model."
    assert all(key.startswith(prefix) for key in state)
    return {key[len(prefix):]: value for key, value in state.items()}, flags


def saved(model, directory):
    model.save_pretrained(str(directory))
    return directory


MODELS = {
    "phi": lambda: tiny_phi(),
    "phi-gqa": lambda: tiny_phi(kv_heads=2),
    "qwen2-gqa-untied": lambda: tiny_qwen2(kv_heads=2, tied=False),
    "qwen2-tied": lambda: tiny_qwen2(kv_heads=4, tied=True),
    "stablelm-gqa-tied": lambda: tiny_stablelm(kv_heads=2, tied=True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_logits_match_transformers(name, tmp_path):
    hf = MODELS[name]()
    state, flags = convert_dir(saved(hf, tmp_path / name))
    diff = max_logit_diff(megatron_gpt(flags, state), hf)
    print(f"{name}: max abs logit diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_phi_flags_are_the_parallel_block():
    flags = FAMILIES["phi"].flags(tiny_phi().config)
    assert flags["parallel_attention_mlp"] and flags["openai_gelu"]
    assert flags["add_bias_linear"] and flags["add_output_layer_bias"]
    assert flags["rotary_percent"] == 0.4 and not flags["swiglu"]


def test_phi_parallel_block_is_what_matches():
    """The same weights in megatron's sequential layer (one norm before attention, the MLP
    after the residual) do not give Phi's logits: the parallel block is what makes them equal."""
    hf = tiny_phi()
    state = FAMILIES["phi"].convert(hf.state_dict(), hf.config, PADDED_VOCAB)
    flags = {**FAMILIES["phi"].flags(hf.config), "parallel_attention_mlp": False}
    for i in range(hf.config.num_hidden_layers):  # the sequential layer's second norm
        for name in ("weight", "bias"):
            state[f"decoder.layers.{i}.pre_mlp_layernorm.{name}"] = \
                state[f"decoder.layers.{i}.input_layernorm.{name}"]
    assert max_logit_diff(megatron_gpt(flags, state), hf) > 100 * TOLERANCE


def test_moe_llava_phi_has_an_unbiased_head():
    """MoE-LLaVA's Phi classes replace the LM head by an unbiased one (llava_phi.py:49)."""
    hf = tiny_phi()
    config_json = {**hf.config.to_dict(), "model_type": "llava_phi"}  # as its config.json says
    family = family_of(config_json)
    config = family.config(config_json)
    assert family.name == "phi" and not family.flags(config)["add_output_layer_bias"]
    weights = {k: v for k, v in hf.state_dict().items() if k != "lm_head.bias"}
    assert "output_layer.bias" not in FAMILIES["phi"].convert(weights, config, PADDED_VOCAB)
    with pytest.raises(ConversionError, match="unbiased LM head"):
        FAMILIES["phi"].convert(hf.state_dict(), config, PADDED_VOCAB)


def test_qwen1_state_dict_matches_the_qwen2_it_came_from(tmp_path):
    hf = tiny_qwen2(kv_heads=4, tied=False)
    save_qwen1(hf, tmp_path / "qwen1")
    state, flags = convert_dir(tmp_path / "qwen1")
    assert flags["ffn_hidden_size"] == hf.config.intermediate_size
    assert flags["normalization"] == "RMSNorm" and flags["rotary_base"] == 1000000
    diff = max_logit_diff(megatron_gpt(flags, state), hf)
    print(f"qwen-1 (renamed Qwen2): max abs logit diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_qwen1_gate_is_w2():
    """Swapping w1 and w2 (the gated and the plain half) must change the logits."""
    from lm_convert_utils import qwen1_state_and_config
    from megatron_stgc.convert.hf_qwen import qwen_config

    hf = tiny_qwen2(kv_heads=4)
    state, config_json = qwen1_state_and_config(hf)
    for i in range(hf.config.num_hidden_layers):
        w1, w2 = f"transformer.h.{i}.mlp.w1.weight", f"transformer.h.{i}.mlp.w2.weight"
        state[w1], state[w2] = state[w2], state[w1]
    family, config = FAMILIES["qwen"], qwen_config(config_json)
    gpt = megatron_gpt(family.flags(config), family.convert(state, config, PADDED_VOCAB))
    assert max_logit_diff(gpt, hf) > 100 * TOLERANCE


DENSE = {"phi": lambda: tiny_phi(kv_heads=2), "qwen2": lambda: tiny_qwen2(kv_heads=2),
         "stablelm": tiny_stablelm}


@pytest.mark.parametrize("family", ["phi", "qwen2", "qwen", "stablelm"])
def test_upcycled_moe_at_step_0_gives_the_dense_logits(family, tmp_path):
    """4 experts, top-2, MoE on every layer, each expert a copy of the dense FFN (Phi's
    biased GELU experts included), router random: the logits are the HF dense model's."""
    from megatron_stgc.convert import write_pretrained
    from megatron_stgc.training.setup import build_model

    if family == "qwen":
        hf = tiny_qwen2(kv_heads=4)
        save_qwen1(hf, tmp_path / "hf")
    else:
        hf = DENSE[family]()
        hf.save_pretrained(str(tmp_path / "hf"))
    state, flags = convert_pretrained(language_dir=str(tmp_path / "hf"),
                                      padded_vocab_size=PADDED_VOCAB, log=lambda _: None)
    write_pretrained(str(tmp_path / "ckpt"), state, flags)
    config = config_from_flat({**load_yaml(str(tmp_path / "ckpt" / "args.yaml")),
                               "seq_length": 16, "num_experts": 4, "moe_router_topk": 2,
                               "moe_layer_freq": 1, "moe_aux_loss_coeff": 0.0,
                               "pretrained_checkpoint": str(tmp_path / "ckpt"),
                               "moe_use_upcycling": True})
    torch.manual_seed(0)
    moe, notes = build_model(config, PADDED_VOCAB)
    assert any("language_model (upcycled)" in note for note in notes), notes
    layers = moe.decoder.layers
    assert all(type(layer.mlp).__name__.endswith("MoELayer") for layer in layers)
    diff = max_logit_diff(moe.eval(), hf)
    print(f"{family} upcycled 4x top-2: max abs logit diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_registry_picks_by_model_type_then_architectures():
    assert family_of({"model_type": "phi"}).name == "phi"
    assert family_of({"model_type": "moe_llava_qwen"}).name == "qwen"
    assert family_of({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    with pytest.raises(ConversionError, match="supported: stablelm .*phi .*qwen2 .*qwen "):
        family_of({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


# ---- bad input: clear errors naming the file and key, nothing written ----------------------

def _run_tool(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(list(argv))


def _fails_cleanly(model_dir, tmp_path, capsys, *needles: str) -> None:
    out = tmp_path / "out"
    assert _run_tool("--language-model", str(model_dir), "--output", str(out)) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]  # no staging left


def test_unknown_family_lists_the_supported_ones(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "llama"))
    _fails_cleanly(tmp_path / "llama", tmp_path, capsys, "llama/config.json",
                   "model_type 'llama'", "supported: stablelm")


def test_missing_shard_names_the_file_and_a_key(tmp_path, capsys):
    hf = tiny_phi()
    hf.save_pretrained(str(tmp_path / "phi"), max_shard_size="100KB")
    index = json.loads((tmp_path / "phi" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    key = next(k for k, v in index["weight_map"].items() if v == shard)
    os.remove(tmp_path / "phi" / shard)
    _fails_cleanly(tmp_path / "phi", tmp_path, capsys, f"{shard} is missing", repr(key))


def test_shape_mismatch_names_the_file_and_key(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf = tiny_qwen2()
    hf.save_pretrained(str(tmp_path / "qwen2"))
    path = tmp_path / "qwen2" / "model.safetensors"
    weights = load_file(str(path))
    key = "model.layers.1.mlp.up_proj.weight"
    weights[key] = weights[key][:-1]  # one row short
    save_file(weights, str(path))
    _fails_cleanly(tmp_path / "qwen2", tmp_path, capsys, repr(key), str(path), "shape (127, 64)",
                   "(128, 64)")


def test_vocab_mismatch_names_the_file_and_key(tmp_path, capsys):
    hf = tiny_phi()
    hf.save_pretrained(str(tmp_path / "phi"))
    config_path = tmp_path / "phi" / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = HF_VOCAB + 28  # the config claims rows the weights do not have
    config_path.write_text(json.dumps(config))
    _fails_cleanly(tmp_path / "phi", tmp_path, capsys, "'model.embed_tokens.weight'",
                   "model.safetensors", f"({HF_VOCAB}, 80)", f"({HF_VOCAB + 28}, 80)")


def test_unsupported_features_fail_before_weights_are_read(tmp_path, capsys):
    transformers.PhiConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, qk_layernorm=True).save_pretrained(
        str(tmp_path / "phi"))  # config only: rejected before any weight file is looked for
    _fails_cleanly(tmp_path / "phi", tmp_path, capsys, "qk_layernorm")
    transformers.Qwen2Config(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, use_sliding_window=True,
                             sliding_window=8).save_pretrained(str(tmp_path / "qwen2"))
    _fails_cleanly(tmp_path / "qwen2", tmp_path, capsys, "sliding")


def test_phi_refuses_the_te_layout(tmp_path):
    saved(tiny_phi(), tmp_path / "phi")
    with pytest.raises(ConversionError, match="local spec only"):
        convert_pretrained(language_dir=str(tmp_path / "phi"), te_layout=True,
                           log=lambda _: None)


def test_an_existing_output_is_refused_and_kept(tmp_path):
    """A second conversion into the same --output never overwrites the first one's files."""
    from megatron_stgc.convert import ConversionError, write_pretrained

    write_pretrained(str(tmp_path / "out"), {"language_model.x": torch.zeros(1)}, {"num_layers": 1})
    with pytest.raises(ConversionError, match="already exists"):
        write_pretrained(str(tmp_path / "out"), {"language_model.x": torch.ones(1)},
                         {"num_layers": 2})
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["model"]
    assert state["language_model.x"].item() == 0.0
    assert load_yaml(str(tmp_path / "out" / "args.yaml")) == {"num_layers": 1}
    assert sorted(os.listdir(tmp_path)) == ["out"]
