"""--add-output-layer-bias: a bias on GPTModel's LM head (Phi-2's ``lm_head`` has one).

megatron-core's GPTModel builds its output layer as ``ColumnParallelLinear(..., bias=False,
skip_bias_add=False)`` and offers no option for a bias. A ColumnParallelLinear adds
``self.bias`` in its own forward whenever the attribute is a parameter and skip_bias_add is
off (tensor_parallel/layers.py, the same in 0.16.1 and 0.19.2), and its sharded state dict
already shards a "bias" along the vocabulary. So the least invasive way is to give the
layer the parameter megatron itself would have made with ``bias=True``: this rank's vocab
shard, zero, tensor-parallel attributes set with megatron's public helper. Call it right
after GPTModel is built, before DDP and the optimizer see the parameters.

The key is ``output_layer.bias``; tied embeddings (no ``output_layer.weight``) keep their
bias too.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


def add_output_layer_bias(model: torch.nn.Module) -> torch.nn.Parameter:
    """Register a zero bias [vocab / TP] on ``model.output_layer``; returns it."""
    layer = model.output_layer
    if getattr(layer, "bias", None) is not None:
        raise ValueError("--add-output-layer-bias: the output layer already has a bias")
    if getattr(layer, "skip_bias_add", False):
        raise ValueError("--add-output-layer-bias: the output layer returns its bias instead "
                         "of adding it (skip_bias_add); GPTModel would drop it")
    config = model.config
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    rows = layer.output_size_per_partition  # this rank's vocabulary shard
    bias = torch.nn.Parameter(torch.zeros(rows, dtype=config.params_dtype, device=device))
    set_tensor_model_parallel_attributes(bias, True, 0, 1)
    bias.allreduce = True  # a dense parameter: reduced over the whole data-parallel group
    layer.bias = bias
    return bias
