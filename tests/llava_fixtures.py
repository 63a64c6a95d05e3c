"""Tiny random LLaVA models for the converter tests, built locally with transformers.

* ``tiny_llava(tower)``: transformers' LlavaForConditionalGeneration with a CLIP or SigLIP
  tower and a StableLM text model, every parameter perturbed (no zero biases / unit norms),
  MoE-LLaVA's feature selection (``vision_feature_layer`` -2, strategy 'default' = drop the
  first token).
* ``DeepSpeedStyleMoE``: the slow, obvious reference of MoE-LLaVA's MoE layer at eval
  (DeepSpeed 0.9.5 ``top2gating`` / ``top1gating`` without the Gumbel sample and without
  capacity drops), with DeepSpeed's module names so that its state dict has MoE-LLaVA's keys.
* ``write_moe_llava_checkpoint``: a directory in MoE-LLaVA's layout (names from
  ``moellava/model/llava_arch.py``, ``multimodal_encoder/clip_encoder.py``,
  ``multimodal_projector/builder.py``, ``language_model/llava_stablelm(_moe).py``), written as
  shards with an index the way ``save_pretrained`` does.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import torch
import transformers

from megatron_stgc.config import config_from_flat

HF_VOCAB, PADDED_VOCAB = 100, 128
HF_IMAGE_ID = 99  # transformers' LLaVA: the image placeholder is a row of its vocabulary
OUR_IMAGE_ID = 100  # ours: the first id past the tokenizer (model/llava.py)
IMAGE_SIZE, PATCH = 16, 4
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                    "convert_hf_to_megatron.py")
TOWER_NAMES = {"clip": "openai/clip-vit-large-patch14-336",
               "siglip": "google/siglip-so400m-patch14-384"}


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def vision_config(tower: str, layers: int = 3):
    cls = transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)


def text_config(layers: int = 2, kv_heads: int = 2, family: str = "stablelm"):
    """A tiny language model of ``family`` (the converter registry's families)."""
    common = dict(vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=128,
                  tie_word_embeddings=False)
    if family == "phi":  # parallel attention + MLP, partial rotary, biased GELU MLP and head
        return transformers.PhiConfig(**common, partial_rotary_factor=0.5, hidden_act="gelu_new")
    if family == "qwen2":  # RMSNorm, SwiGLU, q/k/v bias only
        return transformers.Qwen2Config(**common)
    return transformers.StableLmConfig(**common, partial_rotary_factor=0.25, use_qkv_bias=True)


def tiny_llava(tower: str, layers: int = 2, seed: int = 0, family: str = "stablelm"):
    config = transformers.LlavaConfig(
        vision_config=vision_config(tower), text_config=text_config(layers, family=family),
        image_token_index=HF_IMAGE_ID, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return perturbed(transformers.LlavaForConditionalGeneration(config), seed)


def image_tokens(tower: str) -> int:
    """Positions per image: 16 patches (+ CLIP's class token), first output dropped."""
    return (IMAGE_SIZE // PATCH) ** 2 + (1 if tower == "clip" else 0) - 1


def sample_inputs(tower: str, seed: int = 3):
    """(HF ids, our ids, pixels): two rows of 24 tokens, row 0 with an image at 2.., row 1 at 5.."""
    p = image_tokens(tower)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, HF_IMAGE_ID, (2, 24), generator=generator)
    ids[0, 2:2 + p] = HF_IMAGE_ID
    ids[1, 5:5 + p] = HF_IMAGE_ID
    ours = ids.masked_fill(ids == HF_IMAGE_ID, OUR_IMAGE_ID)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return ids, ours, pixels


def hf_logits(hf, ids, pixels) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels).logits  # [b, s, HF_VOCAB]


class DeepSpeedStyleMoE(torch.nn.Module):
    """MoE-LLaVA's MoE FFN at eval, the slow way, named as DeepSpeed 0.9.5 names it.

    p = softmax(wg(x)) over all experts; top-1: the argmax expert with weight p; top-2: the
    argmax, then the argmax of the rest (DeepSpeed samples this one with Gumbel noise; not
    here), weights renormalised over the two. Every token goes through its experts one by one.
    """

    def __init__(self, dense_mlp: torch.nn.Module, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.deepspeed_moe = torch.nn.Module()
        self.deepspeed_moe.gate = torch.nn.Module()
        self.deepspeed_moe.gate.wg = torch.nn.Linear(hidden, num_experts, bias=False)
        self.deepspeed_moe.experts = torch.nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = torch.nn.ModuleList(
            copy.deepcopy(dense_mlp) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [n, h]
        probs = torch.softmax(self.deepspeed_moe.gate.wg(flat.float()), dim=-1)  # [n, E]
        experts = self.deepspeed_moe.experts.deepspeed_experts
        out = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            ranked = torch.argsort(probs[n], descending=True)[: self.top_k].tolist()
            chosen = probs[n, ranked]
            weights = chosen if self.top_k == 1 else chosen / chosen.sum()
            for weight, e in zip(weights, ranked):
                out[n] += weight * experts[e](flat[n:n + 1])[0]
        return out.reshape(hidden_states.shape)


def make_moe(hf_llava, moe_layers: list[int], num_experts: int = 4, top_k: int = 2,
             distinct: bool = True, seed: int = 5):
    """A copy of ``hf_llava`` whose layers ``moe_layers`` have DeepSpeed-style MoE FFNs
    (experts: the dense FFN, perturbed per expert when ``distinct``; random router)."""
    moe = copy.deepcopy(hf_llava)
    layers = moe.model.language_model.layers
    hidden = moe.config.text_config.hidden_size
    for offset, i in enumerate(moe_layers):
        layer_moe = DeepSpeedStyleMoE(layers[i].mlp, hidden, num_experts, top_k)
        torch.manual_seed(seed + offset)
        with torch.no_grad():
            layer_moe.deepspeed_moe.gate.wg.weight.normal_(0.0, 1.0)
        if distinct:
            for e, expert in enumerate(layer_moe.deepspeed_moe.experts.deepspeed_experts):
                perturbed(expert, seed=100 * offset + e, scale=0.05)
        layers[i].mlp = layer_moe
    return moe.eval()


LAYOUT_NAMES = {  # transformers' LLaVA module names -> the checkpoint's
    "moe-llava": (("model.multi_modal_projector.linear_1.",
                   "model.mm_projector.image_spatial_proj.0."),
                  ("model.multi_modal_projector.linear_2.",
                   "model.mm_projector.image_spatial_proj.2."),
                  ("model.vision_tower.", "model.image_tower.image_tower.vision_model.")),
    # LLaVA-1.5 (haotian-liu/LLaVA): mm_projector = Sequential, vision_tower = CLIPVisionTower
    "llava": (("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
              ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
              ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")),
}


def moe_llava_state(hf_llava, layout: str = "moe-llava") -> dict[str, torch.Tensor]:
    """The LLaVA model's weights under MoE-LLaVA's names (its MoE FFNs keep theirs), or
    LLaVA-1.5's with ``layout`` "llava"."""
    renames = (("model.language_model.", "model."), *LAYOUT_NAMES[layout], ("lm_head.", "lm_head."))
    out = {}
    for key, value in hf_llava.state_dict().items():
        for old, new in renames:
            if key.startswith(old):
                out[new + key[len(old):]] = value.detach().clone()
                break
        else:
            raise AssertionError(f"unexpected key {key}")
    return out


def moe_llava_config(hf_llava, tower: str, moe: dict | None = None,
                     layout: str = "moe-llava") -> dict:
    """config.json as MoE-LLaVA writes it: StableLMEpochConfig keys + the LLaVA keys (LLaVA-1.5's
    key names with ``layout`` "llava")."""
    t, v = hf_llava.config.text_config, hf_llava.config.vision_config
    config = {
        "model_type": "moe_llava_stablelm" if moe else "llava_stablelm",
        "architectures": ["MoELLaVAStablelmForCausalLM" if moe else "LlavaStablelmForCausalLM"],
        "vocab_size": t.vocab_size, "intermediate_size": t.intermediate_size,
        "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": t.hidden_act,
        "rope_pct": 0.25, "rope_theta": 10000, "max_position_embeddings": 4096,
        "norm_eps": t.layer_norm_eps, "use_qkv_bias": True, "tie_word_embeddings": False,
        "mm_image_tower": TOWER_NAMES[tower], "image_projector_type": "mlp2x_gelu",
        "mm_hidden_size": v.hidden_size, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
    }
    if moe:
        config["moe"] = moe
    if layout == "llava":
        config["mm_vision_tower"] = config.pop("mm_image_tower")
        config["mm_projector_type"] = config.pop("image_projector_type")
    return config


def moe_section(moe_layers: list[int], num_experts: int = 4, top_k: int = 2) -> dict:
    return {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": moe_layers, "ep_size": 1,
            "top_k_experts": top_k, "capacity_factor": 1.5, "eval_capacity_factor": 2.0,
            "min_capacity": 0, "use_residual": False, "router_aux_loss_coef": 0.01,
            "num_experts": [num_experts] * len(moe_layers),
            "train_modules": ["gate_proj", "up_proj", "down_proj", "wg"]}


def write_sharded(directory: str, state: dict[str, torch.Tensor], config: dict,
                  shards: int = 2, fmt: str = "safetensors") -> None:
    """config.json + ``shards`` weight files + an index, as save_pretrained writes them."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    keys = sorted(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for s in range(shards):
        name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in keys[s::shards]}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_tower(hf_llava, tower: str, directory: str, weights: bool = True) -> None:
    """The LLaVA model's tower as a save_pretrained vision model directory (the --vision-model
    MoE-LLaVA checkpoints refer to); ``weights`` False writes config.json only."""
    cls = transformers.CLIPVisionModel if tower == "clip" else transformers.SiglipVisionModel
    model = cls(hf_llava.config.vision_config)
    model.load_state_dict(hf_llava.model.vision_tower.state_dict(), strict=True)
    if weights:
        model.save_pretrained(directory)
    else:
        model.config.save_pretrained(directory)


def our_model(flags: dict, checkpoint: str, **overrides):
    from megatron_stgc.training.setup import build_model

    config = config_from_flat({**flags, "seq_length": 32, "data_path": __file__,
                               "pretrained_checkpoint": checkpoint, **overrides})
    torch.manual_seed(0)
    model, notes = build_model(config, PADDED_VOCAB, OUR_IMAGE_ID)
    return model.eval(), notes


def our_logits(model, ids, pixels) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        logits = model(ids, positions, None, images=pixels)  # [b, s, PADDED_VOCAB]
    assert logits.shape == (*ids.shape, PADDED_VOCAB)
    assert logits[..., HF_VOCAB:].abs().max().item() == 0.0  # padding rows are zero
    return logits[..., :HF_VOCAB]


def run_tool(*argv: str) -> int:
    """tools/convert_hf_to_megatron.py's main, in this process."""
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(list(argv))
