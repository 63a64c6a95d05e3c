"""--stgc-mean-source and --stgc-mean-audit against per-token autograd gradients.

Two gloo ranks at EP=1 (expert-DP 2: both ranks hold all 4 experts), an STGC MoE layer in
megatron-core's DDP, 2 micro-batches per step, 2 steps. The slow reference takes every
(token, expert) pair's gradient with one autograd.grad each and forms each source's mean
from them: this micro-batch on both ranks, this rank only, the previous step (both
micro-batches, both ranks), and the audit's reference, the current step.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_on_ranks
from stgc_utils import STGCConfig, build_stgc_layer, expert_params, moe_config

WORLD, MICRO, STEPS = 2, 2, 2
SEQ, BATCH, HIDDEN = 16, 4, 16
SOURCES = ("micro-batch", "micro-batch-bf16", "local", "previous-step", "micro-batch-sync")


def _batch(rank, step, micro):
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=gen), torch.randn(SEQ, BATCH, HIDDEN,
                                                                        generator=gen)


def _pair_grads(layer, hidden, weights):
    """{(token, expert): flat float64 gradient of <out_n, w_n> w.r.t. the expert}, routing map."""
    layer.stgc.paused = True
    with torch.enable_grad():
        _, routing_map = layer.router(hidden)
        out, _ = layer(hidden)
        token_losses = (out * weights).sum(dim=-1).reshape(-1)
        grads = {}
        for n, e in routing_map.nonzero().tolist():
            params = expert_params(layer, e)
            per_param = torch.autograd.grad(token_losses[n], params, retain_graph=True)
            grads[(n, e)] = torch.cat([g.reshape(-1).double() for g in per_param])
    layer.stgc.paused = False
    return grads, routing_map


def _expert_sums(grads, num_experts, size):
    sums = torch.zeros(num_experts, size, dtype=torch.float64)
    for (_, e), g in grads.items():
        sums[e] += g
    return sums


def _cos_map(grads, means, shape):
    cos = torch.full(shape, float("nan"), dtype=torch.float64)
    for (n, e), g in grads.items():
        denom = g.norm() * means[e].norm()
        if denom > 0:
            cos[n, e] = g @ means[e] / denom
    return cos


def _run(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_stgc.training.stgc_hooks import after_stgc_step, start_mean_audit

    parallel_state.initialize_model_parallel(1, 1)
    config = moe_config(gated_linear_unit=True)
    layer = build_stgc_layer(config, STGCConfig(enabled=True, beta=1.0))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  layer)
    size = sum(p.numel() for p in expert_params(layer, 0))
    out = {"sources": {}, "reference": {}}
    for source in SOURCES:
        layer.stgc.config.mean_source = source.removesuffix("-sync")
        layer.stgc.config.overlap_mean_reduce = not source.endswith("-sync")
        layer.stgc.previous_step_grads = None
        audits = start_mean_audit(ddp) if source == "micro-batch" else None
        got = []
        for step in range(STEPS):
            ddp.zero_grad_buffer()
            for micro in range(MICRO):
                hidden, weights = _batch(rank, step, micro)
                (layer(hidden)[0] * weights).sum().backward()
                got.append(layer.stgc.last.cos.clone())
            ddp.finish_grad_sync()
            after_stgc_step(ddp, update_successful=True)
        out["sources"][source] = got
        out.setdefault("overlapped", {})[source] = layer.stgc.overlapped_backwards
        layer.stgc.overlapped_backwards = 0
        if audits:
            out["audit_counts"] = audits[0].counts.clone()
            layer.stgc.audit = None
    # the slow reference: every pair's gradient, means built from them
    for step in range(STEPS):
        for micro in range(MICRO):
            grads, routing = _pair_grads(layer, *_batch(rank, step, micro))
            local = _expert_sums(grads, 4, size)
            mb = local.clone()
            dist.all_reduce(mb)
            out["reference"][(step, micro)] = {"grads": grads, "local": local, "micro-batch": mb,
                                               "shape": tuple(routing.shape)}
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_on_ranks(_run, WORLD)


def _expected(rank_out, step_means, source, step, micro):
    ref = rank_out["reference"][(step, micro)]
    if source == "previous-step":
        means = step_means[step - 1] if step > 0 else ref["micro-batch"]  # first step: fallback
    elif source == "local":
        means = ref["local"]  # micro-batch-sync: overlap off, same mean
    else:
        means = ref["micro-batch"]
    return _cos_map(ref["grads"], means, ref["shape"])


def _step_means(ranks):
    """The reference mean of each step: both micro-batches, both ranks (the same on each)."""
    refs = ranks[0]["reference"]
    return [sum(refs[(step, micro)]["micro-batch"] for micro in range(MICRO))
            for step in range(STEPS)]


@pytest.mark.parametrize("source", SOURCES)
def test_mean_source_matches_per_token_autograd(ranks, source):
    step_means = _step_means(ranks)
    atol = 2e-2 if source == "micro-batch-bf16" else 1e-5
    for rank_out in ranks:
        for index, got in enumerate(rank_out["sources"][source]):
            step, micro = divmod(index, MICRO)
            expected = _expected(rank_out, step_means, source, step, micro)
            assert torch.equal(torch.isnan(got), torch.isnan(expected))
            judged = ~torch.isnan(expected)
            assert judged.sum() > 0
            assert torch.allclose(got[judged].double(), expected[judged], atol=atol, rtol=0), \
                (source, step, micro)


def test_micro_batch_reduces_overlap_the_experts_backward(ranks):
    """The micro-batch sources used the all-reduces started from the weight-gradient hooks
    (every backward), the sync variant and the communication-free sources none."""
    for rank_out in ranks:
        overlapped = rank_out["overlapped"]
        assert overlapped["micro-batch"] == overlapped["micro-batch-bf16"] == STEPS * MICRO
        assert overlapped["micro-batch-sync"] == overlapped["local"] == 0
        assert overlapped["previous-step"] == 0


def test_sources_differ_where_they_should(ranks):
    """The test can fail: local and previous-step are not the micro-batch mean here."""
    for source in ("local", "previous-step"):
        got = torch.stack(ranks[0]["sources"][source][MICRO:])  # step 1
        exact = torch.stack(ranks[0]["sources"]["micro-batch"][MICRO:])
        judged = ~torch.isnan(exact)
        assert (got[judged] - exact[judged]).abs().max() > 1e-2, source


def test_audit_counts_match_the_step_mean_reference(ranks):
    """The audit's flags vs flags from the current step's mean (all micro-batches, ranks)."""
    from megatron_stgc.stgc.mean_audit import AUDITED, COUNT_NAMES

    step_means = _step_means(ranks)
    for rank_out in ranks:
        counts = dict(zip(AUDITED, rank_out["audit_counts"].tolist()))
        for source in ("micro-batch", "local", "previous-step"):
            expected = dict.fromkeys(COUNT_NAMES, 0)
            for step in range(STEPS):
                if source == "previous-step" and step == 0:
                    continue  # nothing to compare with on the first audited step
                for micro in range(MICRO):
                    ref = rank_out["reference"][(step, micro)]
                    reference = _cos_map(ref["grads"], step_means[step], ref["shape"]) < 0
                    means = (step_means[step - 1] if source == "previous-step" else
                             ref["local"] if source == "local" else ref["micro-batch"])
                    flags = _cos_map(ref["grads"], means, ref["shape"]) < 0
                    judged = torch.tensor([[(n, e) in ref["grads"] for e in range(4)]
                                           for n in range(ref["shape"][0])])
                    expected["judged"] += int(judged.sum())
                    expected["agree"] += int(((flags == reference) & judged).sum())
                    expected["flagged"] += int((flags & judged).sum())
                    expected["reference"] += int((reference & judged).sum())
            got = dict(zip(COUNT_NAMES, counts[source]))
            assert expected["reference"] > 0
            for name in ("judged", "agree", "flagged", "reference"):
                assert abs(got[name] - expected[name]) <= 1, (source, name, got, expected)


def _train_previous_step(rank, world_size, out_dir):
    from dist_utils import tiny_config
    from megatron_stgc.training.train import run_training

    config = tiny_config(1, global_batch_size=8, micro_batch_size=2, train_iters=3, stgc=True,
                         stgc_mean_source="previous-step", stgc_mean_audit=True,
                         log_file=os.path.join(out_dir, "log.jsonl"), log_interval=1)
    run_training(config, destroy_process_groups=False)
    if rank == 0:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]


def test_previous_step_first_step_falls_back_and_says_so(tmp_path):
    """Step 1 has no previous gradient: both MoE layers use the micro-batch mean on both
    micro-batches of both ranks, and the log says so (stgc/mean_fallbacks); later steps
    do not; the audit logs each source's agreement from step 2 on for previous-step."""
    records = run_on_ranks(_train_previous_step, WORLD, str(tmp_path))[0]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[0]["stgc/mean_fallbacks"] == 2 * 2 * WORLD  # layers x micro-batches x ranks
    assert all("stgc/mean_fallbacks" not in r for r in records[1:])
    assert "stgc/audit/previous-step/agreement" not in records[0]
    for record in records[1:]:
        for source in ("micro-batch", "micro-batch-bf16", "previous-step", "local", "fc2"):
            assert 0.0 <= record[f"stgc/audit/{source}/agreement"] <= 1.0
