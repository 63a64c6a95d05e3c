"""Shared pieces of the STGC tests: tiny megatron-core MoE layers and slow oracles."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_stgc import cpu_bridge

cpu_bridge.install()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from dist_utils import free_port  # noqa: E402
from megatron_stgc.mcore_compat import build_moe_layer  # noqa: E402
from megatron_stgc.stgc.config import STGCConfig  # noqa: E402
from megatron_stgc.stgc.spec import stgc_moe_spec  # noqa: E402


def init_single_process() -> None:
    """gloo world of one + megatron parallel state (idempotent)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def moe_config(**overrides) -> TransformerConfig:
    fields = dict(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
        num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="aux_loss",
        add_bias_linear=False, gated_linear_unit=False,
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, moe_permute_fusion=False,
        moe_grouped_gemm=False, moe_router_dtype="fp32", hidden_dropout=0.0, attention_dropout=0.0,
    )
    fields.update(overrides)
    if fields["moe_router_topk"] == 1:
        fields.setdefault("moe_router_pre_softmax", True)
    return TransformerConfig(**fields)


def build_stgc_layer(config: TransformerConfig, stgc: STGCConfig, seed: int = 1234):
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    spec = stgc_moe_spec(get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts), stgc)
    layer = build_moe_layer(spec, config, layer_number=1)
    if config.add_bias_linear:
        from megatron_stgc.model.expert_bias import install_expert_bias_fix

        install_expert_bias_fix(layer)
        with torch.no_grad():  # megatron initialises biases to zero; make them count
            for name, param in layer.named_parameters():
                if name.endswith("bias") and "router" not in name:
                    param.normal_(0, 0.5)
    layer.train()
    return layer


def expert_params(layer, local_expert: int):
    mlp = layer.experts.local_experts[local_expert]
    return [p for p in mlp.parameters()]


def oracle_pair_cosines(layer, hidden: torch.Tensor, loss_weights: torch.Tensor):
    """cos(g_n, g_mean) per (token, expert) pair the slow, obvious way.

    One autograd.grad per token of L_n = <out_n, w_n> w.r.t. each expert's parameters.
    Returns (cos [T, E] with NaN off the routing map, routing_map [T, E]).
    """
    layer.stgc.paused = True  # plain megatron-core forward: no STGC attachments
    hidden = hidden.detach().requires_grad_(False)
    with torch.enable_grad():
        probs, routing_map = layer.router(hidden)
        out, _ = layer(hidden)
        token_losses = (out * loss_weights).sum(dim=-1).reshape(-1)  # [T]
        num_tokens, num_experts = routing_map.shape
        per_token = {}
        for n in range(num_tokens):
            for e in routing_map[n].nonzero().flatten().tolist():
                params = expert_params(layer, e)
                grads = torch.autograd.grad(token_losses[n], params, retain_graph=True,
                                            allow_unused=True)
                per_token[(n, e)] = torch.cat([
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                    for g, p in zip(grads, params)
                ])
    layer.stgc.paused = False
    cos = torch.full((num_tokens, num_experts), float("nan"), dtype=torch.float64)
    for e in range(num_experts):
        pairs = [(n, g) for (n, ee), g in per_token.items() if ee == e]
        if not pairs:
            continue
        mean = torch.stack([g for _, g in pairs]).mean(0)
        for n, g in pairs:
            denom = g.norm() * mean.norm()
            if denom > 0:
                cos[n, e] = (g @ mean) / denom
    return cos, routing_map


def global_layer_state(config: TransformerConfig, seed: int = 1234) -> dict:
    """Router and per-global-expert weights of a layer built at EP=1 (reference weights)."""
    layer = build_stgc_layer(config, STGCConfig(enabled=True), seed=seed)
    return {name: p.detach().clone() for name, p in layer.state_dict().items() if torch.is_tensor(p)}


def load_global_state(layer, state: dict) -> None:
    """Load EP=1 weights into a layer whose experts are a slice of the global ones."""
    offset = layer.local_expert_indices[0]
    own = layer.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            if not torch.is_tensor(tensor):
                continue
            source = name
            if ".local_experts." in name:
                head, tail = name.split(".local_experts.", 1)
                index, rest = tail.split(".", 1)
                source = f"{head}.local_experts.{int(index) + offset}.{rest}"
            tensor.copy_(state[source])


def forget_tracked_moe_metric(name: str) -> None:
    """Drop ``name`` from megatron's MoE metric tracker. The tracker is process-global: it
    keeps values other tests recorded and sizes an entry by the first num_layers it sees."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16, 0.17
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().pop(name, None)
        return
    get_moe_metrics_tracker()._metrics.pop(name, None)
