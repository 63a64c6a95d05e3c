"""--parallel-attention-mlp: Phi-2's block, h = x + attn(ln(x)) + mlp(ln(x)), in megatron-core.

Phi-2 normalises a layer's input once and feeds the result to attention and to the MLP side
by side (transformers ``PhiDecoderLayer.forward``; MoE-LLaVA's copy,
moellava/model/language_model/phi/modeling_phi.py:664-680: ``attn_outputs + feed_forward
+ residual``). megatron-core's TransformerLayer runs them one after the other, each with its
own norm. Transformer Engine's TransformerLayer has the same switch under the name
``parallel_attention_mlp``; the flag takes that name.

``ParallelAttentionMLPLayer`` is a TransformerLayer built by TransformerLayer's own __init__
from megatron's ``TransformerLayerSubmodules``, unchanged; only ``forward`` differs, and it
calls the submodules through their public call signatures (the ones TransformerLayer itself
uses in 0.16.1 .. 0.19.2). The MLP is still ``submodules.mlp``: the MoE layer spec, and
STGC's and LTDR's swaps of its router (stgc/spec.py, ltdr/spec.py), apply unchanged.

``parallel_block_spec`` turns megatron's local decoder block spec into the parallel one:
layer class swapped, ``pre_mlp_layernorm`` made IdentityOp (one norm per layer, the input
norm). The Transformer Engine spec fuses a norm into linear_qkv and another into the MLP's
linear_fc1, so it cannot express one shared norm without swapping those modules too; the
config refuses --use-te with this flag (config._validate_block_layout), and
``use_transformer_engine`` picks the local spec for it on GPUs.

Not covered by this forward (TransformerLayer features it does not call): CUDA graphs,
activation offloading, recomputing the norms or the MLP inside the layer (selective
recompute's "layernorm" / "mlp" / "moe" modules; "core_attn", megatron's default, and full
recompute work), cross-attention, the fused tensor-parallel inference kernels.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer


class ParallelAttentionMLPLayer(TransformerLayer):
    """A TransformerLayer whose attention and MLP both read the input norm's output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problems = [name for name in ("pre_mlp_layernorm", "cross_attention")
                    if not isinstance(getattr(self, name), IdentityOp)]
        if problems:
            raise ValueError(f"ParallelAttentionMLPLayer: the layer spec must leave {problems} "
                             "as IdentityOp (one input norm feeds attention and MLP); build the "
                             "spec with parallel_block_spec")
        modules = getattr(self.config, "recompute_modules", None) or []
        if self.config.recompute_granularity == "selective" and set(modules) - {"core_attn"}:
            raise ValueError(f"ParallelAttentionMLPLayer: selective recompute of {modules} is "
                             "not supported (only 'core_attn')")

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None,
                **unused):
        """hidden_states [s, b, h] -> ([s, b, h], context); the arguments are TransformerBlock's."""
        residual = hidden_states  # [s, b, h]
        normed = self.input_layernorm(hidden_states)  # [s, b, h], read by both branches
        attention_with_bias = self.self_attention(
            normed, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset)  # ([s, b, h], bias or None)
        mlp_with_bias = self.mlp(normed, padding_mask=padding_mask)  # ([s, b, h], bias or None)
        fused = self.config.bias_dropout_fusion
        # x + dropout(attn + bias), then + dropout(mlp + bias): Phi-2's resid_dropout on each
        hidden = self.self_attn_bda(self.training, fused)(
            attention_with_bias, residual, self.hidden_dropout)  # [s, b, h]
        hidden = self.mlp_bda(self.training, fused)(mlp_with_bias, hidden, self.hidden_dropout)
        return hidden, context


def _parallel_layer_spec(layer_spec):
    if not (isinstance(layer_spec, ModuleSpec) and isinstance(layer_spec.module, type)
            and issubclass(layer_spec.module, TransformerLayer)):
        from megatron_stgc.mcore_compat import UnsupportedMegatronCore, version_note

        raise UnsupportedMegatronCore(f"--parallel-attention-mlp: expected a TransformerLayer "
                                      f"spec, got {layer_spec!r} ({version_note()})")
    submodules = replace(layer_spec.submodules, pre_mlp_layernorm=IdentityOp)
    return replace(layer_spec, module=ParallelAttentionMLPLayer, submodules=submodules)


def parallel_block_spec(block_spec):
    """A copy of a local-spec TransformerBlockSubmodules with every layer a parallel block."""
    block_spec = copy.copy(block_spec)
    block_spec.layer_specs = [_parallel_layer_spec(spec) for spec in block_spec.layer_specs]
    return block_spec
