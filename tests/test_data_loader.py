"""The data loader: the same micro-batches and the same bad-sample accounting with 0 or N
spawned DataLoader workers, at every step and across a resume; DALI decoding in workers.

Real files (the mix of test_llava_dataset: images, text-only records, a corrupt image, a
record with two image tags, a missing image, a broken line), the real index, tokenizer,
image loader and data set; real spawned worker processes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_stgc.data.loader import BatchStream, MicroBatchPositions
from megatron_stgc.data.dataset import micro_batch_indices
from test_llava_dataset import make_dataset, write_mix

GLOBAL, MICRO, DP = 8, 2, 2
STEPS = 6  # 48 positions: more than 3 epochs of the 14 usable records


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return root, write_mix(root)


def _stream(dataset, rank: int, workers: int, start: int = 0) -> BatchStream:
    return BatchStream(dataset, GLOBAL, MICRO, rank, DP, start_step=start, end_step=STEPS,
                       num_workers=workers)


def _steps(stream: BatchStream, dataset, count: int) -> list[tuple[list[dict], dict]]:
    """(the step's micro-batches, the data set's state after the step) for ``count`` steps."""
    taken = []
    for _ in range(count):
        batches = list(stream.next_step())
        taken.append((batches, copy.deepcopy(dataset.data_state())))
    return taken


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if x[key] is None:
                assert y[key] is None, key
            else:
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_positions_are_the_training_loops():
    positions = MicroBatchPositions(GLOBAL, MICRO, dp_rank=1, dp_size=DP)
    per_step = GLOBAL // (MICRO * DP)
    for step in range(3):
        expected = micro_batch_indices(step * GLOBAL, GLOBAL, MICRO, 1, DP)
        assert [positions(step * per_step + m) for m in range(per_step)] == expected


def test_workers_give_the_same_batches_and_counts_at_every_step(mix):
    root, path = mix
    rank = 0  # meets both in-use bad records of the mix; rank 1 in the resume test
    inline, _ = make_dataset(root, path)
    ahead, _ = make_dataset(root, path)
    reference = _steps(_stream(inline, rank, workers=0), inline, STEPS)
    stream = _stream(ahead, rank, workers=2)
    produced = _steps(stream, ahead, STEPS)
    stream.close()
    for step, ((batches, state), (batches_w, state_w)) in enumerate(zip(reference, produced)):
        _assert_same_batches(batches, batches_w)
        assert state == state_w, step  # counters, examples, truncations, bad records
    # the mix's in-use bad samples were met (else the accounting would be untested)
    assert sum(reference[-1][1]["bad_samples"]["counts"].values()) == 2


def test_a_resumed_stream_with_workers_continues_the_uninterrupted_one(mix):
    root, path = mix
    straight, _ = make_dataset(root, path)
    reference = _steps(_stream(straight, 1, workers=0), straight, STEPS)
    first, _ = make_dataset(root, path)
    _steps(_stream(first, 1, workers=0), first, 3)
    resumed, _ = make_dataset(root, path)  # a fresh process: knows nothing but the checkpoint
    resumed.restore_data_state(copy.deepcopy(first.data_state()))
    stream = _stream(resumed, 1, workers=2, start=3)
    produced = _steps(stream, resumed, STEPS - 3)
    stream.close()
    for (batches, state), (batches_r, state_r) in zip(reference[3:], produced):
        _assert_same_batches(batches, batches_r)
        assert state == state_r


def test_dali_decodes_in_spawned_workers(mix):
    pytest.importorskip("nvidia.dali")
    root, path = mix
    pil, _ = make_dataset(root, path, backend="pil")
    dali, _ = make_dataset(root, path, backend="dali")
    reference = _steps(_stream(pil, 0, workers=0), pil, 2)
    stream = _stream(dali, 0, workers=1)
    produced = _steps(stream, dali, 2)
    stream.close()
    for (batches, state), (batches_d, state_d) in zip(reference, produced):
        for x, y in zip(batches, batches_d):
            assert torch.equal(x["tokens"], y["tokens"])
            if x["images"] is None:
                assert y["images"] is None
            else:
                assert torch.allclose(x["images"], y["images"], atol=1e-4)
        assert state == state_d


def test_a_stream_refuses_steps_it_was_not_made_for(mix):
    root, path = mix
    dataset, _ = make_dataset(root, path)
    stream = _stream(dataset, 0, workers=0, start=STEPS - 1)
    list(stream.next_step())
    with pytest.raises(RuntimeError, match="no step 6"):
        stream.next_step()
