"""The collective counter against hand-computed bytes, on 4 real gloo ranks with megatron's
process groups (EP 2 -> expert-DP 2), and STGC's counted expert-DP all-reduce against the
parameter-count formula (stgc/comm_cost.py) in a real training step with 2 micro-batches."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import TINY_VOCAB, build_tiny, rank_micro_batches, run_on_ranks, \
    synthetic_global_batch, tiny_config

WORLD = 4


def _hand_counted(rank, world_size):
    from megatron.core import parallel_state

    from megatron_stgc.analysis.comm_count import CollectiveCounter, megatron_group_names
    from megatron_stgc.parallel import initialize_model_parallel

    initialize_model_parallel(1, 2, seed=1)
    expert_dp = parallel_state.get_expert_data_parallel_group()
    ep = parallel_state.get_expert_model_parallel_group()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    all_reduce = dist.all_reduce  # a reference taken before counting starts is still seen
    with CollectiveCounter(megatron_group_names()) as counter:
        all_reduce(torch.ones(1000), group=expert_dp)  # 4000 B fp32
        rows_out = [3, 5] if ep_rank == 0 else [2, 6]  # rows to EP rank 0 and 1
        rows_in = [3, 2] if ep_rank == 0 else [5, 6]
        sent = torch.ones(sum(rows_out), 8, dtype=torch.bfloat16)  # 16 B per row
        received = torch.empty(sum(rows_in), 8, dtype=torch.bfloat16)
        dist.all_to_all_single(received, sent, rows_in, rows_out, group=ep)
        dist.all_gather_into_tensor(torch.empty(10 * world_size), torch.ones(10))
        handle = dist.all_reduce(torch.ones(7, dtype=torch.float64), async_op=True)
        handle.wait()
    return {(r["kind"], r["group"]): (r["calls"], r["payload"], r["wire"])
            for r in counter.rows()}, ep_rank


def test_counter_matches_hand_computed_bytes():
    for counted, ep_rank in run_on_ranks(_hand_counted, WORLD):
        other_rows = 5 if ep_rank == 0 else 2  # rows this rank sends to the other EP rank
        assert counted == {
            ("all_reduce", "expert_dp"): (1, 4000, 4000),  # ring, n=2: 2(n-1)/n x 4000
            ("all_to_all", "ep"): (1, other_rows * 16, other_rows * 16),
            ("all_gather", "world"): (1, 40, 40 * (WORLD - 1)),
            ("all_reduce", "world"): (1, 56, 56 * 2 * (WORLD - 1) // WORLD),
        }


# (variant name, --stgc, --stgc-mean-source, --stgc-mode); all counted in one 4-rank start
VARIANTS = [("plain", False, "micro-batch", "single-pass"),
            ("single-pass", True, "micro-batch", "single-pass"),
            ("micro-batch-bf16", True, "micro-batch-bf16", "single-pass"),
            ("previous-step", True, "previous-step", "single-pass"),
            ("local", True, "local", "single-pass"),
            ("two-pass", True, "micro-batch", "two-pass")]


def _variant_step_bytes(config, objects, mean_source, mode, stgc):
    from megatron_stgc.analysis.comm_count import CollectiveCounter, megatron_group_names
    from megatron_stgc.stgc.attached import stgc_layers
    from megatron_stgc.stgc.comm_cost import stgc_payload_per_micro_batch
    from megatron_stgc.stgc.two_pass import two_pass_train_step
    from megatron_stgc.training.step import train_step
    from megatron_stgc.training.stgc_hooks import after_stgc_step

    micro = rank_micro_batches(synthetic_global_batch(16, 16), 2)  # 2 micro-batches per rank

    def step():
        kwargs = dict(micro_batch_size=2, seq_length=16)
        if mode == "two-pass":
            return two_pass_train_step(train_step, objects.model, iter(micro), len(micro),
                                       optimizer=objects.optimizer,
                                       scheduler=objects.scheduler, **kwargs)
        return train_step(objects.model, objects.optimizer, objects.scheduler, iter(micro),
                          len(micro), **kwargs)

    if mean_source == "previous-step":  # its first step falls back to micro-batch
        after_stgc_step(objects.model, step().update_successful)
    dist.barrier()
    with CollectiveCounter(megatron_group_names()) as counter:
        step()
    model = objects.unwrapped_model
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    dense_params = sum(p.numel() for name, p in model.named_parameters()
                       if ".experts." not in name)
    layers = [sum(p.numel() for p in layer.experts.parameters())
              for layer in stgc_layers(objects.model)]
    predicted = len(micro) * stgc_payload_per_micro_batch(layers, mean_source) if stgc else 0
    return {"expert_dp": counter.total("all_reduce", "expert_dp", key="payload"),
            "dp_cp": counter.total("all_reduce", "dp_cp", key="payload"),
            "expert_params": expert_params, "dense_params": dense_params,
            "predicted": predicted}


def _all_variants_step_bytes(rank, world_size):
    """{variant: bytes of one counted training step}, every variant built in this process."""
    from megatron_stgc.training.setup import build_model_and_optimizer
    from megatron_stgc.training.train import seed_everything

    results = {}
    for index, (name, stgc, mean_source, mode) in enumerate(VARIANTS):
        config = tiny_config(expert_parallel=2, global_batch_size=16, stgc=stgc,
                             stgc_mean_source=mean_source)
        if index == 0:
            objects = build_tiny(config)  # megatron's parallel state, once
        else:
            seed_everything(config.training.seed)
            objects = build_model_and_optimizer(config, TINY_VOCAB)
        results[name] = _variant_step_bytes(config, objects, mean_source, mode, stgc)
    return results


@pytest.fixture(scope="module")
def counted():
    return run_on_ranks(_all_variants_step_bytes, WORLD)


@pytest.fixture(scope="module")
def plain(counted):
    return [rank["plain"] for rank in counted]


@pytest.fixture(scope="module")
def single_pass(counted):
    return [rank["single-pass"] for rank in counted]


def test_stgc_extra_expert_dp_bytes_match_the_parameter_formula(plain, single_pass):
    for plain_rank, stgc_rank in zip(plain, single_pass):
        # plain: DDP reduces fp32 gradients, dense ones over DP x CP, expert ones over expert-DP
        assert plain_rank["expert_dp"] == 4 * plain_rank["expert_params"]
        assert plain_rank["dp_cp"] >= 4 * plain_rank["dense_params"]
        assert stgc_rank["predicted"] > 0
        assert stgc_rank["expert_dp"] - plain_rank["expert_dp"] == stgc_rank["predicted"]


@pytest.mark.parametrize("source", ["micro-batch-bf16", "previous-step", "local"])
def test_each_mean_source_sends_what_the_formula_says(counted, plain, source):
    """bf16 halves STGC's all-reduce; previous-step (after its first step) and local send
    none of it: expert-DP bytes = DDP's + the formula, per source."""
    results = [rank[source] for rank in counted]
    for plain_rank, rank in zip(plain, results):
        assert rank["expert_dp"] - plain_rank["expert_dp"] == rank["predicted"]
        assert (rank["predicted"] > 0) == (source == "micro-batch-bf16")


def test_two_pass_identify_pass_reduces_no_gradients(counted, plain, single_pass):
    """The identify pass's gradients are thrown away, so DDP must not reduce them: a two-pass
    step reduces dense gradients once, like plain, and expert ones once plus STGC's."""
    two = [rank["two-pass"] for rank in counted]
    for plain_rank, single_rank, two_rank in zip(plain, single_pass, two):
        assert two_rank["dp_cp"] == plain_rank["dp_cp"]
        assert two_rank["expert_dp"] == single_rank["expert_dp"]
