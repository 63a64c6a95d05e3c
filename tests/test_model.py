"""Model building: MoE every N-th layer, the spec choice, the TransformerConfig mapping."""

from __future__ import annotations

import torch

from dist_utils import build_tiny, run_on_ranks, tiny_config

from megatron_stgc.model.gpt import transformer_config_from, use_transformer_engine


def _layer_kinds(rank, world_size, moe_layer_freq, dispatcher):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config = tiny_config(2 if world_size == 2 else 1, dispatcher, num_layers=4,
                         moe_layer_freq=moe_layer_freq)
    model = build_tiny(config).unwrapped_model
    kinds = []
    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            assert isinstance(layer.mlp.experts, SequentialMLP)
            kinds.append(("moe", layer.mlp.experts.num_local_experts,
                          type(layer.mlp.token_dispatcher).__name__))
        else:
            kinds.append(("dense",))
    return kinds


def test_moe_every_other_layer_with_ep2():
    kinds = run_on_ranks(_layer_kinds, 2, 2, "alltoall")
    for rank_kinds in kinds:
        assert [k[0] for k in rank_kinds] == ["moe", "dense", "moe", "dense"]
        assert all(k[1] == 2 for k in rank_kinds if k[0] == "moe")  # 4 experts / EP 2
        assert all(k[2] == "MoEAlltoAllTokenDispatcher" for k in rank_kinds if k[0] == "moe")


def test_moe_every_layer_allgather_single_process():
    (kinds,) = run_on_ranks(_layer_kinds, 1, 1, "allgather")
    assert [k[0] for k in kinds] == ["moe"] * 4
    assert all(k[2] == "MoEAllGatherTokenDispatcher" for k in kinds)


def test_transformer_config_mapping_on_cpu():
    config = tiny_config(num_experts=8, moe_router_topk=2, moe_layer_freq=2,
                         moe_aux_loss_coeff=0.01, moe_expert_capacity_factor=1.25, bf16=True,
                         num_layers=4)
    transformer = transformer_config_from(config)
    assert use_transformer_engine(config) is False  # no CUDA here
    assert transformer.num_moe_experts == 8 and transformer.moe_router_topk == 2
    assert transformer.moe_layer_freq == 2 and transformer.moe_aux_loss_coeff == 0.01
    assert transformer.moe_expert_capacity_factor == 1.25
    assert transformer.bf16 and transformer.params_dtype == torch.bfloat16
    assert transformer.moe_router_dtype == "fp32"
    assert not transformer.moe_grouped_gemm and not transformer.gradient_accumulation_fusion
    assert transformer.use_cpu_initialization


def test_use_te_selects_grouped_gemm_experts():
    """--use-te (default: when CUDA and Transformer Engine are present) turns on the TE spec
    with grouped-GEMM experts; the TE spec itself needs TE and is not built here."""
    config = tiny_config(use_te=True)
    assert use_transformer_engine(config) is True
    assert transformer_config_from(config).moe_grouped_gemm is True
    assert transformer_config_from(tiny_config(use_te=False)).moe_grouped_gemm is False
