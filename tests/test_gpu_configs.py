"""Every shipped example, with the megatron-core flags the project picks on a GPU with
Transformer Engine (TE spec, fusions, grouped GEMM; FP8 as the launch script's
PRECISION=fp8 asks), is accepted by megatron-core: its TransformerConfig validation and the
expert MLP forward with per-token scaling (the rule TransformerConfig does not check).

CI has neither a GPU nor Transformer Engine. Two of TransformerConfig's checks only ask
whether TE is installed (fused RoPE available; TE >= 1.11 for MoE FP8 grouped GEMM): the
test leaves ``apply_rope_fusion`` out and states a TE version (2.0) to megatron's version
cache. Everything else is megatron-core's own validation, unchanged. The GPU check
(tools/gpu_check.py) builds these for real where TE exists.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from packaging.version import Version

from megatron_stgc.config import config_from_flat, load_yaml
from megatron_stgc.model.gpt import GPU_WITH_TE, gelu_tanh, transformer_config_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
CASES = [(os.path.basename(path), fp8) for path in EXAMPLES for fp8 in (None, "hybrid")]


@pytest.fixture
def te_version_stated(monkeypatch):
    import megatron.core.utils as mcore_utils

    monkeypatch.setattr(mcore_utils, "_te_version", Version("2.0.0"))


def _example(name: str, fp8):
    config = config_from_flat(load_yaml(os.path.join(REPO, "examples", name)))
    config.precision.fp8_format = fp8
    return config


def _gpu_kwargs(config) -> dict:
    kwargs = transformer_config_kwargs(config, GPU_WITH_TE)
    assert kwargs["use_cpu_initialization"] is False  # really the GPU choice
    return dict(kwargs, apply_rope_fusion=False)


@pytest.mark.parametrize("name,fp8", CASES, ids=[f"{n}-{f or 'bf16'}" for n, f in CASES])
def test_example_gpu_flags_pass_megatron_core_validation(name, fp8, te_version_stated):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = _example(name, fp8)
    TransformerConfig(**_gpu_kwargs(config))
    if config.vision.vision_model_type is not None:
        from megatron_stgc.model.vision import vision_transformer_config_kwargs

        TransformerConfig(**vision_transformer_config_kwargs(config, GPU_WITH_TE))


@pytest.mark.parametrize("name", [os.path.basename(p) for p in EXAMPLES])
def test_example_gpu_flags_run_an_expert_mlp_with_routing_probabilities(name, te_version_stated):
    """megatron's MLP.forward with the GPU flags and per-token scaling (what every MoE expert
    gets), on a small copy of the example's shapes; local linears, CPU, fp32."""
    out, _ = _run_expert(_gpu_kwargs(_example(name, None)))
    assert out.shape == (8, 32)


def test_the_old_fusion_rule_is_caught(te_version_stated):
    """What 0680c6e picked on a GPU (bias+activation fusion for every model) fails: GELU without
    bias and Phi-2's gelu_new in TransformerConfig, GELU with bias in the expert forward."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    tiny = _gpu_kwargs(_example("tiny_moe_cpu.yaml", None))
    with pytest.raises(ValueError, match="add_bias_linear must also be True"):
        TransformerConfig(**dict(tiny, bias_activation_fusion=True))
    phi2 = _gpu_kwargs(_example("phi2_2.7b_moe.yaml", None))
    assert phi2["activation_func"] is gelu_tanh  # Phi-2's gelu_new: no fused kernel at all
    with pytest.raises(ValueError, match="activation function should be either gelu"):
        TransformerConfig(**dict(phi2, bias_activation_fusion=True))
    gelu_with_bias = dict(phi2, activation_func=torch.nn.functional.gelu)
    assert TransformerConfig(**dict(gelu_with_bias, bias_activation_fusion=True)).add_bias_linear
    with pytest.raises(ValueError, match="Only support fusion of swiglu and quick_gelu"):
        _run_expert(dict(gelu_with_bias, bias_activation_fusion=True))


def _run_expert(kwargs: dict):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig
    from stgc_utils import init_single_process

    init_single_process()
    kwargs = dict(kwargs, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_query_groups=None, moe_ffn_hidden_size=64, use_cpu_initialization=True,
                  bf16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32,
                  autocast_dtype=torch.float32)
    mlp = MLP(TransformerConfig(**kwargs),
              MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
              is_expert=True, ffn_hidden_size=64)
    return mlp(torch.randn(8, 32), per_token_scale=torch.rand(8))
