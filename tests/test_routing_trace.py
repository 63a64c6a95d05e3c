"""--moe-routing-trace-path (training/routing_trace.py): megatron-core's routing tracer with
each token's modality.

* Validation: the flag is refused on a megatron-core without the tracer (0.16 .. 0.18; the
  message names the flag and 0.19.0), needs a MoE model; the max-iters flag needs the path.
* On a megatron-core with the tracer (0.19.2 lane), a tiny MoE-LLaVA (2 MoE layers, real
  megatron-core routers, EP 2 on two gloo ranks, 2 micro-batches a step) trains 3 steps with
  tracing limited to 2 (step 0 also runs one forward without gradients): each rank's JSONL
  file parses, holds one record per (forward, MoE layer) in call order, each record's
  top-k experts per token equal the routing map its router returned (captured by our own
  forward hook), its modality column equals that forward's batch modality ([s, b]
  flattened) and its forward kind is "train" or "no_grad". The third step is not traced.
  With --moe-expert-capacity-factor 0.5 (tokens dropped; megatron's own hook skips those
  calls) every call is still in the file, dropped slots as -1.
* The training loop (run_training) with the flag writes both ranks' files (tiny text-only
  GPT MoE: no modality field).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dist_utils import run_on_ranks, tiny_config
from llava_batches import IMAGE_ID, VOCAB, layout, llava_config, synthetic_samples
from megatron_stgc.validation import config_problems
from megatron_stgc.mcore_compat import VERSION, router_tracer_class

HAS_TRACER = router_tracer_class() is not None
needs_tracer = pytest.mark.skipif(not HAS_TRACER,
                                  reason=f"megatron-core {VERSION} has no routing tracer")
SAMPLES, MICRO, STEPS, TRACED = 4, 2, 3, 2


def _read(directory: str, rank: int) -> list[dict]:
    with open(os.path.join(directory, f"router_trace_rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_flag_needs_a_megatron_core_with_the_tracer(tmp_path):
    problems = config_problems(tiny_config(moe_routing_trace_path=str(tmp_path)), 1)
    refused = (f"--moe-routing-trace-path {tmp_path}: megatron-core {VERSION} has no routing "
               "tracer (megatron/core/transformer/moe/router_trace.py); it needs megatron-core "
               ">= 0.19.0 (pip install 'megatron-core>=0.19')")
    assert (refused in problems) == (not HAS_TRACER)
    assert not [p for p in problems if "routing-trace" in p and p != refused]


def test_the_flag_needs_moe_and_the_step_limit_needs_the_flag(tmp_path):
    problems = config_problems(tiny_config(num_experts=None, moe_routing_trace_path="t"), 1)
    assert ("--moe-routing-trace-path t: traces MoE routers; this model has none "
            "(set --num-experts)") in problems
    problems = config_problems(tiny_config(moe_routing_trace_max_training_iters=0), 1)
    assert "--moe-routing-trace-max-training-iters needs --moe-routing-trace-path" in problems
    assert "--moe-routing-trace-max-training-iters must be >= 1, got 0" in problems


def test_padded_experts_by_hand():
    from megatron_stgc.training.routing_trace import padded_experts

    routing_map = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert padded_experts(routing_map, 2).tolist() == [[0, 2, 3], [-1, -1, -1], [1, -1, -1]]
    assert padded_experts(routing_map[1:], 2).tolist() == [[-1, -1], [1, -1]]


def _traced_llava(rank, world_size, out_dir, capacity_factor):
    from megatron.core import parallel_state

    from megatron_stgc import parallel
    from megatron_stgc.training.forward import gpt_forward_step
    from megatron_stgc.training.routing_probe import moe_routers
    from megatron_stgc.training.routing_trace import start_routing_trace
    from megatron_stgc.training.setup import build_model_and_optimizer
    from megatron_stgc.training.step import train_step
    from megatron_stgc.training.train import seed_everything

    parallel.initialize_model_parallel(1, world_size, seed=1234)
    config = llava_config(expert_model_parallel_size=world_size,
                          global_batch_size=SAMPLES * MICRO * world_size,
                          moe_routing_trace_path=out_dir,
                          moe_routing_trace_max_training_iters=TRACED,
                          moe_expert_capacity_factor=capacity_factor)
    seed_everything(config.training.seed)
    objects = build_model_and_optimizer(config, VOCAB, IMAGE_ID)
    trace = start_routing_trace(config, objects)
    captured = []  # (layer_number, routing map [tokens, experts] as lists), in call order

    def capture(layer):
        def hook(module, args, output):
            captured.append((layer, output[1].detach().tolist()))
        return hook

    for layer, router in moe_routers(objects.unwrapped_model).items():
        router.register_forward_hook(capture(layer))
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = [layout(*synthetic_samples(SAMPLES, seed=100 * dp_rank + i))
               for i in range(STEPS * MICRO)]
    forwards = []  # per model forward, in order: (step, kind, modality in router order)
    for step in range(STEPS):
        micro = batches[step * MICRO:(step + 1) * MICRO]
        train_step(objects.model, objects.optimizer, objects.scheduler, iter(micro), MICRO,
                   SAMPLES, max(b["tokens"].shape[1] for b in micro))
        forwards += [(step, "train", b["modality"].t().reshape(-1).tolist()) for b in micro]
        if step == 0:  # a forward without gradients (as the routing probe's) is traced too
            with torch.no_grad():
                gpt_forward_step(iter([batches[-1]]), objects.model[0])
            forwards.append((step, "no_grad", batches[-1]["modality"].t().reshape(-1).tolist()))
        trace.end_step(step)
    trace.close()
    return {"captured": captured, "forwards": forwards}


@needs_tracer
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_trace_records_equal_the_routers_maps_and_the_batch_modality(tmp_path, capacity_factor):
    """capacity 0.5 drops tokens: megatron's hook skips those calls, ours writes them with
    rows padded by -1; every call is in the file either way."""
    results = run_on_ranks(_traced_llava, 2, str(tmp_path), capacity_factor)
    for rank, result in enumerate(results):
        records = _read(str(tmp_path), rank)
        captured, forwards = result["captured"], result["forwards"]
        layers = sorted({layer for layer, _ in captured})
        assert len(captured) == len(forwards) * len(layers) == (STEPS * MICRO + 1) * len(layers)
        traced = [f for f in forwards if f[0] < TRACED]  # the third step is not traced
        assert len(records) == len(traced) * len(layers)
        assert [f[1] for f in traced] == ["train"] * MICRO + ["no_grad"] + ["train"] * MICRO
        for index, record in enumerate(records):
            layer, routing_map = captured[index]
            step, kind, modality = traced[index // len(layers)]
            assert (record["step"], record["layer"], record["rank"]) == (step, layer - 1, rank)
            assert record["forward"] == kind and record["topk"] == 2
            experts = [sorted(e for e, chosen in enumerate(row) if chosen)
                       for row in routing_map]
            assert [sorted(e for e in row if e >= 0) for row in record["top_indices"]] == experts
            short = any(len(row) < 2 for row in experts)
            assert record.get("short_rows", False) == short
            assert all(len(row) == 2 for row in record["top_indices"])
            assert record["num_tokens"] == len(modality) == len(routing_map)
            assert record["modality"] == modality
        assert {0, 1, 2} <= {code for r in records for code in r["modality"]}
        dropped = sum(row.count(-1) for r in records for row in r["top_indices"])
        assert (dropped > 0) == (capacity_factor is not None)


def _train_with_trace(rank, world_size, out_dir):
    from megatron_stgc.training.train import run_training

    config = tiny_config(1, train_iters=3, moe_routing_trace_path=out_dir,
                         moe_routing_trace_max_training_iters=TRACED)
    run_training(config, destroy_process_groups=False)


@needs_tracer
def test_training_with_the_flag_writes_each_ranks_trace(tmp_path):
    run_on_ranks(_train_with_trace, 2, str(tmp_path))
    for rank in range(2):
        records = _read(str(tmp_path), rank)
        assert [(r["step"], r["layer"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for record in records:
            assert "modality" not in record and record["rank"] == rank
            assert len(record["top_indices"]) == record["num_tokens"] == 2 * 16
            assert all(len(set(row)) == 2 and set(row) <= set(range(4))
                       for row in record["top_indices"])
