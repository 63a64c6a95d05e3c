"""megatron-core settings LTDR refuses at build time, each with the reason."""

from __future__ import annotations

from megatron_stgc.ltdr.config import LTDRConfig

BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")


def _balancing_types(config) -> list[str]:
    kind = config.moe_router_load_balancing_type
    return list(kind) if isinstance(kind, (list, tuple)) else [kind]


def _check_layout(config) -> None:
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        raise ValueError("LTDR with sequence parallelism (--tensor-model-parallel-size > 1): "
                         "each router sees a sequence shard the modality mask is not cut for")
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError("LTDR does not support context parallelism (the modality mask is per "
                         "full sequence)")
    if config.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        raise ValueError(f"LTDR supports the alltoall and allgather token dispatchers, not "
                         f"{config.moe_token_dispatcher_type!r}")


def _check_balancing(config, ltdr: LTDRConfig) -> None:
    unknown = [k for k in _balancing_types(config) if k not in BALANCING_TYPES]
    if unknown:
        raise ValueError(f"LTDR supports --moe-router-load-balancing-type {BALANCING_TYPES}, "
                         f"not {unknown}")
    if ltdr.modality_balance and config.moe_z_loss_coeff:
        raise ValueError("LTDR's modality balancing hands megatron a padding mask of the image "
                         "tokens, which would take them out of the z-loss too: use "
                         "--no-ltdr-modality-balance or no --moe-z-loss-coeff")


def _check_tail_routing(config) -> None:
    refused = {
        "moe_router_num_groups": "group-limited top-k has no top-a counterpart",
        "moe_pad_expert_input_to_capacity": "padded rows are sized for top-k tokens",
        "moe_apply_probs_on_input": "megatron allows it for top-1 only; tail tokens have a > 1",
        "moe_enable_routing_replay": "the replay records top-k choices only",
    }
    for name, reason in refused.items():
        if getattr(config, name, None):
            raise ValueError(f"LTDR's tail routing does not support {name} ({reason})")
    if config.moe_permute_fusion and config.moe_expert_capacity_factor is None:
        raise ValueError("LTDR's tail routing does not support moe_permute_fusion without a "
                         "capacity factor (the fused permute sizes its output as tokens x topk)")


def check_ltdr_supported(config, ltdr: LTDRConfig) -> None:
    """Raise ValueError naming the setting LTDR cannot follow (TransformerConfig ``config``)."""
    ltdr.validate(config.num_moe_experts, config.moe_router_topk)
    _check_layout(config)
    _check_balancing(config, ltdr)
    if ltdr.tail_routing:
        _check_tail_routing(config)
