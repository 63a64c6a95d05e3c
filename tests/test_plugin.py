"""megatron_stgc/plugin.py, what STGC, LTDR and the Gumbel second expert share: the running
sums (against sums taken by hand), modules of a type across model chunks, and the MoE-layer
spec rewrite on a real megatron-core block spec."""

from __future__ import annotations

import pytest
import torch

from megatron_stgc.ltdr.state import SUM_NAMES, LTDRSums
from megatron_stgc.plugin import RunningSums, map_moe_layer_specs, modules_of_type
from megatron_stgc.stgc.record import METRIC_SUM_NAMES, MetricSums


def test_running_sums_add_named_values_and_reset_on_take():
    sums = RunningSums(("a", "b", "c"))
    assert torch.equal(sums.take("cpu"), torch.zeros(3, dtype=torch.float64))
    values = [(1.5, 2), (0.25, 7), (-1.0, 0)]
    for a, b in values:
        sums.add(a=torch.tensor(a, dtype=torch.float32), b=torch.tensor([b]))
    sums.add(c=torch.tensor(3))
    taken = sums.take("cpu")
    assert taken.dtype == torch.float64
    assert taken.tolist() == [sum(a for a, _ in values), sum(b for _, b in values), 3.0]
    assert sums.take("cpu").tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        sums.add(d=torch.tensor(1.0))  # not one of its names


def test_stgc_and_ltdr_sums_are_running_sums():
    ltdr, stgc = LTDRSums(), MetricSums()
    assert isinstance(ltdr, RunningSums) and ltdr.names == SUM_NAMES
    assert isinstance(stgc, RunningSums) and stgc.names == METRIC_SUM_NAMES
    stgc.add_consistency(torch.tensor([0.5, float("nan"), -0.25]))
    stgc.add_mean_fallback("cpu")
    taken = dict(zip(METRIC_SUM_NAMES, stgc.take("cpu").tolist()))
    assert (taken["consistency_sum"], taken["consistency_count"], taken["mean_fallbacks"]) == (
        0.25, 2.0, 1.0)
    assert taken["token_loss"] == 0.0


def test_modules_of_type_walks_every_chunk_in_order():
    chunks = [torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()),
              torch.nn.Sequential(torch.nn.Linear(2, 3))]
    found = list(modules_of_type(chunks, torch.nn.Linear))
    assert found == [chunks[0][0], chunks[1][0]]
    assert list(modules_of_type(chunks[1], torch.nn.ReLU)) == []


def test_map_moe_layer_specs_rewrites_moe_layers_only():
    from megatron_stgc.mcore_compat import moe_spec_parts
    from megatron_stgc.stgc.spec import layer_mlp_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from stgc_utils import init_single_process

    init_single_process()
    config = TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2,
                               num_moe_experts=2, moe_layer_freq=[0, 1, 0, 1],
                               use_cpu_initialization=True)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    marker = object()
    out = map_moe_layer_specs(block, lambda mlp: marker if moe_spec_parts(mlp) else None,
                              RuntimeError("unused"))
    assert [layer_mlp_spec(s) is marker for s in out.layer_specs] == [False, True, False, True]
    assert [layer_mlp_spec(s) is marker for s in block.layer_specs] == [False] * 4  # a copy
    with pytest.raises(RuntimeError, match="no MoE layer"):
        map_moe_layer_specs(block, lambda mlp: None, RuntimeError("no MoE layer"))
