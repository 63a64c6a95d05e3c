"""The one place that chooses the decoder layer specs."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_stgc.ltdr.config import LTDRConfig
from megatron_stgc.stgc.config import STGCConfig


def build_layer_specs(
    transformer_config: TransformerConfig,
    use_te: bool,
    stgc_config: Optional[STGCConfig] = None,
    ltdr_config: Optional[LTDRConfig] = None,
    parallel_attention_mlp: bool = False,
    gumbel_seed: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec for a GPT with MoE on every ``moe_layer_freq``-th layer.

    use_te=False: megatron-core's local spec (SequentialMLP experts; runs on CPU).
    use_te=True:  megatron-core's Transformer Engine spec; experts use grouped GEMM
                  when ``transformer_config.moe_grouped_gemm`` is set (see model/gpt.py).
    With ``stgc_config.enabled`` the block spec is handed to
    ``megatron_stgc.stgc.spec.apply_stgc``, which returns the STGC variant; then with
    ``ltdr_config.enabled`` to ``megatron_stgc.ltdr.spec.apply_ltdr`` (LTDR routers, wrapped
    by STGC's where both are on).
    With ``parallel_attention_mlp`` (local spec only) every layer is first made Phi-2's
    parallel block (``megatron_stgc.model.parallel_block``); its ``mlp`` submodule stays the
    spec's, so the STGC and LTDR swaps that follow reach it unchanged.
    With ``gumbel_seed`` (--moe-router-gumbel-second-expert) every MoE router, whichever
    class, then samples its second expert (``megatron_stgc.routing.spec``).
    """
    block_spec = get_gpt_decoder_block_spec(
        transformer_config,
        use_transformer_engine=use_te,
        normalization=transformer_config.normalization,
    )
    if parallel_attention_mlp:
        if use_te:
            raise ValueError("--parallel-attention-mlp needs megatron-core's local spec, "
                             "not the Transformer Engine spec")
        from megatron_stgc.model.parallel_block import parallel_block_spec

        block_spec = parallel_block_spec(block_spec)
    if stgc_config is not None and stgc_config.enabled:
        from megatron_stgc.stgc.spec import apply_stgc

        block_spec = apply_stgc(block_spec, transformer_config, stgc_config)
    if ltdr_config is not None and ltdr_config.enabled:
        from megatron_stgc.ltdr.spec import apply_ltdr

        block_spec = apply_ltdr(block_spec, ltdr_config)
    if gumbel_seed is not None:
        from megatron_stgc.routing.spec import apply_gumbel_second_expert

        block_spec = apply_gumbel_second_expert(block_spec, gumbel_seed)
    return block_spec
