"""Build megatron-core's GPTModel with MoE layers from a RunConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_stgc.config import RunConfig, fill_defaults, moe_layer_freq_value
from megatron_stgc.model.expert_bias import install_expert_bias_fix
from megatron_stgc.model.output_bias import add_output_layer_bias
from megatron_stgc.model.specs import build_layer_specs


@dataclass(frozen=True)
class Hardware:
    """What the megatron-core flags are chosen for: this machine, or a stated one (the CPU
    guard tests validate the flags a GPU run would get with ``GPU_WITH_TE``)."""

    cuda: bool
    transformer_engine: bool


GPU_WITH_TE = Hardware(cuda=True, transformer_engine=True)


def this_machine() -> Hardware:
    if not torch.cuda.is_available():
        return Hardware(cuda=False, transformer_engine=False)
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return Hardware(cuda=True, transformer_engine=False)
    return Hardware(cuda=True, transformer_engine=True)


def sequence_parallel_rule(config: RunConfig,
                           hardware: Hardware | None = None) -> tuple[bool, str]:
    """(sequence parallelism on?, why): with TP > 1 and the TE spec."""
    if config.parallel.tensor_model_parallel_size == 1:
        return False, "it needs --tensor-model-parallel-size > 1"
    if not use_transformer_engine(config, hardware):
        return False, "it needs Transformer Engine norms; torch LayerNorm rejects it"
    return True, "megatron-core requires it for MoE with tensor parallelism"


def grouped_gemm_rule(config: RunConfig, hardware: Hardware | None = None) -> tuple[bool, str]:
    """(grouped-GEMM experts?, why): with TE, for experts without biases."""
    if config.model.num_experts is None:
        return False, "it needs --num-experts"
    if not use_transformer_engine(config, hardware):
        return False, "TEGroupedMLP needs Transformer Engine"
    if config.model.add_bias_linear:
        # grouped GEMM has no expert biases (megatron-core asserts); biased experts
        # (Phi-2's add_bias_linear) use SequentialMLP with TE linears instead
        return False, "grouped GEMM has no expert biases (--add-bias-linear)"
    return True, "the Transformer Engine spec uses TEGroupedMLP for unbiased experts"


def use_transformer_engine(config: RunConfig, hardware: Hardware | None = None) -> bool:
    """TE spec when asked for, else when CUDA and TE are present; the local spec on CPU and
    for --parallel-attention-mlp (a local-spec layer, see model/parallel_block.py)."""
    if config.model.use_te is not None:
        return config.model.use_te
    if config.model.parallel_attention_mlp:
        return False
    hardware = hardware or this_machine()
    return hardware.cuda and hardware.transformer_engine


def fuse_bias_activation(config: RunConfig, hardware: Hardware) -> bool:
    """megatron-core's bias+activation fusion, only where both of its rules allow it.

    TransformerConfig rejects it for GELU without bias; MLP.forward raises for any fused
    activation but SwiGLU / quick-GeGLU when the routing probability scales the tokens
    (every MoE expert). So: SwiGLU models, or dense GELU models with biases.
    """
    m = config.model
    if not (hardware.cuda and use_transformer_engine(config, hardware)):
        return False
    return m.swiglu or (m.num_experts is None and m.add_bias_linear and not m.openai_gelu)


def mlp_activation(config: RunConfig):
    """The FFN activation: SiLU (gated, --swiglu), tanh GELU (--openai-gelu) or exact GELU."""
    if config.model.swiglu:
        return F.silu
    return gelu_tanh if config.model.openai_gelu else F.gelu


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: Phi-2's "gelu_new", megatron-core's openai_gelu
    (transformer/utils.py). torch's kernel, not megatron's torch.compile'd one, which
    compiles for several seconds per process and shape on CPU."""
    return F.gelu(x, approximate="tanh")


# megatron-core's upcycling (moe/upcycling_utils._get_config, 0.16.1 .. 0.19.2) tells the FFN
# activation by __name__ and knows GELU as "gelu" (it picks the top-1 weight scale, E^(1/2)
# for any non-gated GELU); under its own name --moe-use-upcycling would refuse this one
gelu_tanh.__name__ = "gelu"


def transformer_config_kwargs(config: RunConfig, hardware: Hardware | None = None) -> dict:
    """The keyword arguments of megatron-core's TransformerConfig for ``config`` on ``hardware``
    (default: this machine)."""
    fill_defaults(config)
    hardware = hardware or this_machine()
    m, p, pr = config.model, config.parallel, config.precision
    on_gpu = hardware.cuda
    use_te = use_transformer_engine(config, hardware)
    fused = on_gpu and use_te
    moe = m.num_experts is not None
    params_dtype = torch.bfloat16 if pr.bf16 else torch.float32
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=m.swiglu,
        activation_func=mlp_activation(config),
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        # sequence parallelism needs TE norms (torch LayerNorm rejects it)
        sequence_parallel=sequence_parallel_rule(config, hardware)[0],
        # precision: BF16 params, fp32 main grads (DDP grad buffer) and fp32 router
        bf16=pr.bf16,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype,
        fp8=pr.fp8_format,
        # MoE
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size if moe else None,
        moe_router_topk=m.moe_router_topk,
        moe_router_pre_softmax=(m.moe_router_topk == 1 if m.moe_router_pre_softmax is None
                                else m.moe_router_pre_softmax),
        moe_layer_freq=moe_layer_freq_value(config),  # int, or the --moe-layer-pattern list
        moe_aux_loss_coeff=m.moe_aux_loss_coeff if moe else 0.0,
        moe_router_load_balancing_type="aux_loss",
        moe_z_loss_coeff=m.moe_z_loss_coeff if moe else None,
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_token_drop_policy=m.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=grouped_gemm_rule(config, hardware)[0],
        moe_permute_fusion=False,
        moe_router_dtype="fp32",
        # kernels: fused paths only where CUDA exists
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=fuse_bias_activation(config, hardware),
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=fused,
        recompute_granularity=m.recompute_granularity,
        recompute_method="uniform" if m.recompute_granularity == "full" else None,
        recompute_num_layers=1 if m.recompute_granularity == "full" else None,
    )


def transformer_config_from(config: RunConfig, hardware: Hardware | None = None) -> TransformerConfig:
    """megatron-core TransformerConfig for ``config`` (needs parallel state for TP/EP sizes)."""
    return TransformerConfig(**transformer_config_kwargs(config, hardware))


def build_gpt_model(config: RunConfig, vocab_size: int) -> GPTModel:
    """The GPT MoE model for this rank (call after parallel.initialize_parallel)."""
    transformer_config = transformer_config_from(config)
    m = config.model
    gumbel = m.moe_router_gumbel_second_expert and m.num_experts is not None
    gumbel_seed = config.training.seed if gumbel else None  # (a dense build: no router)
    specs = build_layer_specs(transformer_config, use_transformer_engine(config), config.stgc,
                              config.ltdr, config.model.parallel_attention_mlp,
                              gumbel_seed=gumbel_seed)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=specs,
        vocab_size=vocab_size,
        max_sequence_length=config.model.seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=not config.model.untie_embeddings_and_output_weights,
        position_embedding_type=config.model.position_embedding_type,
        rotary_percent=config.model.rotary_percent,
        rotary_base=config.model.rotary_base,
    )
    install_expert_bias_fix(model)
    if config.model.add_output_layer_bias:
        add_output_layer_bias(model)
    if config.stgc.enabled:
        check_stgc_attached(model)
    if config.ltdr.enabled:
        prepare_ltdr(model)
    install_eval_capacity_factor(model, config)
    return model


def install_eval_capacity_factor(model, config: RunConfig) -> None:
    """--moe-eval-capacity-factor (when it differs from the training factor): eval-mode
    forwards of the MoE layers use it (megatron_stgc.routing.capacity)."""
    m = config.model
    if m.num_experts is None or m.moe_eval_capacity_factor is None:
        return
    if m.moe_eval_capacity_factor == m.moe_expert_capacity_factor:
        return
    from megatron_stgc.routing.capacity import install_eval_capacity

    install_eval_capacity(model, m.moe_expert_capacity_factor, m.moe_eval_capacity_factor)


def prepare_ltdr(model) -> None:
    """--ltdr must have reached a layer; its dispatchers then take variable experts/token."""
    from megatron_stgc.ltdr.dispatch import prepare_ltdr_layers

    if not prepare_ltdr_layers(model):
        from megatron_stgc.mcore_compat import UnsupportedMegatronCore, version_note

        raise UnsupportedMegatronCore(f"--ltdr: the built model has no LTDR router "
                                      f"({version_note()})")


def stgc_layer_indices(model) -> list[int]:
    """0-based decoder layers of ``model`` that carry STGC."""
    from megatron_stgc.stgc.attached import stgc_layers

    return sorted(layer.layer_number - 1 for layer in stgc_layers(model))


def check_stgc_attached(model) -> None:
    """--stgc must have reached a layer of the built model (whatever megatron-core did with
    the spec); anything else is an error, never a silent run without STGC."""
    if not stgc_layer_indices(model):
        from megatron_stgc.mcore_compat import UnsupportedMegatronCore, version_note

        raise UnsupportedMegatronCore(
            f"--stgc: the STGC layer spec was handed to megatron-core, but the built model has "
            f"no STGC layer ({version_note()})"
        )
