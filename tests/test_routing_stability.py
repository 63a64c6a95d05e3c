"""Routing-stability metrics (training/routing_stability.py, issue 22) against the slow way.

* The arithmetic: total variation of load shares on counts worked out by hand.
* A tiny MoE-LLaVA (2 MoE layers, real megatron-core routers, EP 2 on two gloo ranks, each
  rank its own micro-batch): three steps on the same batch with the routers untouched give
  load-share TV 0 and no probe token with a new top-k set; then the first router's weights
  are moved by hand, and the next record's TV, top-k change and entropy equal the values
  computed here from the routers' captured inputs, one token at a time in plain Python
  (logits as dot products, top-2 by sorting, counts per modality summed over both ranks).
A run with the probe and one without give the same losses: tests/test_llava_training.py
(test_a_fresh_run_repeats_every_loss_exactly).
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import run_on_ranks
from llava_batches import IMAGE_ID, VOCAB, layout, llava_config, synthetic_samples
from megatron_stgc.training.routing_churn import load_share_tv

SAMPLES = 4
GROUPS = ("", "_text", "_image")  # all real tokens, text, image (model/modality.py codes 1, 2)


def test_load_share_tv_by_hand():
    counts = torch.tensor([[[3, 1, 0, 0], [0, 0, 0, 0]],  # step 1: group 2 saw no token
                           [[1, 3, 0, 0], [2, 2, 0, 0]],
                           [[1, 3, 0, 0], [0, 0, 4, 0]]])  # [steps, groups, experts]
    tv_sum, pairs = load_share_tv(counts)
    # group 0: shares (.75 .25 0 0) -> (.25 .75 0 0): TV .5; then unchanged: 0
    # group 1: step 1 has no shares (pair left out); (.5 .5 0 0) -> (0 0 1 0): TV 1
    assert tv_sum.tolist() == [0.5, 1.0]
    assert pairs.tolist() == [2.0, 1.0]


def _hand_topk(hidden: list[float], weight: list[list[float]], k: int = 2):
    logits = [sum(h * w for h, w in zip(hidden, row)) for row in weight]
    order = sorted(range(len(logits)), key=lambda e: -logits[e])
    return frozenset(order[:k]), logits


def _entropy(logits: list[float]) -> float:
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    return -sum(x / total * math.log(x / total) for x in exps)


def _group_of_tokens(batch: dict) -> list[tuple[bool, int]]:
    """(real, modality code) per token in megatron's router order ([s, b] flattened)."""
    padding = batch["padding_mask"].t().reshape(-1).tolist()
    modality = batch["modality"].t().reshape(-1).tolist()
    return [(not p, m) for p, m in zip(padding, modality)]


def _stability_ranks(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_stgc import parallel
    from megatron_stgc.training.expert_load import ExpertLoadCounter
    from megatron_stgc.training.forward import gpt_forward_step
    from megatron_stgc.training.routing_probe import RoutingProbe, moe_routers
    from megatron_stgc.training.routing_stability import RoutingStability
    from megatron_stgc.training.setup import build_model_and_optimizer
    from megatron_stgc.training.train import seed_everything

    parallel.initialize_model_parallel(1, world_size, seed=1234)
    config = llava_config(expert_model_parallel_size=world_size,
                          global_batch_size=SAMPLES * world_size, stgc=True)
    seed_everything(config.training.seed)
    objects = build_model_and_optimizer(config, VOCAB, IMAGE_ID)
    model = objects.unwrapped_model
    samples, images, has_image = synthetic_samples(
        SAMPLES, seed=20 + parallel_state.get_data_parallel_rank())
    batch = layout(samples, images, has_image)
    routers = moe_routers(model)
    captured = []  # (layer, training?, router input [T, h], router weight [E, h])

    def capture(layer):
        def hook(module, args, kwargs):
            captured.append((layer, module.training, args[0].detach().reshape(
                -1, args[0].shape[-1]).tolist(), module.weight.detach().tolist()))
        return hook

    for layer, router in routers.items():
        router.register_forward_pre_hook(capture(layer), with_kwargs=True)
    counter = ExpertLoadCounter(model)
    stability = RoutingStability(counter, RoutingProbe(objects.model, model, [batch], counter),
                                 probe_interval=1)

    def step():  # forward + backward, no optimizer step: nothing the router sees changes
        for chunk in objects.model:
            chunk.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=iter([batch]),
            model=objects.model, num_microbatches=1, seq_length=batch["tokens"].shape[1],
            micro_batch_size=SAMPLES, forward_only=False)
        stability.end_step()

    def log_step():  # as training/interval_metrics.py: loads collected (reset), then sources
        counter.collect()
        counter.collect_by_modality()
        return stability.collect()

    stability.start()
    for _ in range(3):
        step()
    stable = log_step()
    first = min(routers)
    with torch.no_grad():  # move the first MoE layer's router: experts 0 and 1 swap logits
        weight = routers[first].weight
        weight[[0, 1]] = weight[[1, 0]].clone()
    step()
    moved = log_step()
    counter.remove()
    return {"stable": stable, "moved": moved, "captured": captured,
            "tokens": _group_of_tokens(batch), "layers": sorted(routers)}


def _hand_counts(results, layers):
    """Per (training forward index, layer): expert counts [group][expert] summed over ranks;
    per (probe index, layer): per rank the token sets and entropies."""
    train_counts: dict = {}
    probes: dict = {}
    for result in results:
        tokens = result["tokens"]
        seen = {"train": {}, "probe": {}}
        for layer, training, hidden, weight in result["captured"]:
            kind = "train" if training else "probe"
            index = seen[kind].setdefault(layer, 0)
            seen[kind][layer] += 1
            per_token = [_hand_topk(h, weight) for h in hidden]
            if training:
                counts = train_counts.setdefault((index, layer), [[0] * 4 for _ in GROUPS])
                for (real, modality), (chosen, _) in zip(tokens, per_token):
                    for group in _groups(real, modality):
                        for expert in chosen:
                            counts[group][expert] += 1
            else:
                probes.setdefault((index, layer), []).append(
                    [(_groups(real, modality), chosen, _entropy(logits))
                     for (real, modality), (chosen, logits) in zip(tokens, per_token)])
    return train_counts, probes


def _groups(real: bool, modality: int) -> list[int]:
    return [0, modality] if real else []


def _tv(a: list[int], b: list[int]) -> float:
    return 0.5 * sum(abs(x / sum(a) - y / sum(b)) for x, y in zip(a, b))


@pytest.mark.parametrize("world_size", [2])
def test_stable_router_gives_zero_churn_and_moved_router_the_hand_values(world_size):
    results = run_on_ranks(_stability_ranks, world_size)
    layers = results[0]["layers"]
    assert layers == [1, 2]
    for result in results[1:]:  # every rank logs the same reduced values
        assert result["stable"] == results[0]["stable"]
        assert result["moved"] == results[0]["moved"]
    stable, moved = results[0]["stable"], results[0]["moved"]
    for layer in layers:
        for group in GROUPS:
            assert stable[f"routing/layer{layer}/load_tv{group}"] == 0.0
            assert stable[f"routing/layer{layer}/topk_change{group}"] == 0.0
    train_counts, probes = _hand_counts(results, layers)
    changed_any = False
    for layer in layers:
        before, after = train_counts[(2, layer)], train_counts[(3, layer)]
        probe_before, probe_after = probes[(1, layer)], probes[(2, layer)]
        for group, suffix in enumerate(GROUPS):
            expected = _tv(before[group], after[group])
            assert moved[f"routing/layer{layer}/load_tv{suffix}"] == pytest.approx(
                expected, abs=1e-12)
            changed = compared = 0
            entropy = count = 0.0
            for rank_before, rank_after in zip(probe_before, probe_after):
                for (groups, old, _), (_, new, h) in zip(rank_before, rank_after):
                    if group in groups:
                        changed += old != new
                        compared += 1
                        entropy += h
                        count += 1
            assert moved[f"routing/layer{layer}/topk_change{suffix}"] == pytest.approx(
                changed / compared, abs=1e-12)
            assert moved[f"routing/layer{layer}/entropy{suffix}"] == pytest.approx(
                entropy / count, abs=1e-6)
            changed_any |= expected > 0.01 and changed > 0
    assert changed_any, "moving the router by hand changed no routing: the check is blunt"
