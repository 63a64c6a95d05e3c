"""Validation loss during training (--eval-interval, --eval-iters, --valid-data-path).

* The flags' errors name the flag; --split is refused with what to use instead; bad
  validation records stop the run with an error naming --valid-data-path.
* A tiny text GPT MoE with STGC (EP 2 on two gloo ranks, 2 micro-batches per rank) trains 5
  steps with --eval-interval 2 --eval-iters 2: valid/lm_loss is logged at steps 2, 4 and 5
  (the end); each value equals the loss computed here the slow way from the checkpoint saved
  at that step: a fresh model loads its weights, every rank runs each validation global batch
  whole (no data-parallel split, no megatron schedule, no padding mask) through the bare
  model and takes the cross entropy of the logits token by token, over the global batches
  the k-th evaluation reads ([2k, 2k + 2)). The same run without validation logs the same
  training values (losses, grad norms, MoE and STGC metrics), step for step, and a run
  stopped after step 3 (--exit-interval) and resumed logs what the uninterrupted one did,
  validation values included (the evaluations after the resume read the same batches).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from dist_utils import run_on_ranks, tiny_config
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import config_problems
from megatron_stgc.data.instruct_text import generate_conversations

STEPS, EVAL_INTERVAL, EVAL_ITERS, GLOBAL_BATCH = 5, 2, 2, 8
EVALUATED = {2: 0, 4: 1, 5: 2}  # iteration -> evaluation number (5: the end of training)
# what the run logs for training; equal with and without validation
TRAINING_KEYS = ("loss", "grad_norm", "lr", "moe/load_balancing_loss", "stgc/token_loss",
                 "stgc/conflict_fraction", "tokens_per_expert", "consumed_samples")


def test_flag_errors_name_the_flag(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    assert config_problems(tiny_config(eval_interval=2), 1) == [
        "--eval-interval 2 needs --valid-data-path (the validation records; --split is not "
        "implemented)"]
    problems = config_problems(tiny_config(eval_interval=-1, eval_iters=0,
                                           valid_data_path=[missing]), 1)
    assert problems == [
        "--eval-interval must be >= 0 (0 = only at the end of training), got -1",
        "--eval-iters must be >= 1 with --valid-data-path, got 0 (for no validation drop "
        "--valid-data-path)",
        f"--valid-data-path: {missing} does not exist"]
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"question": "q", "answer": "a"}\n')
    assert config_problems(tiny_config(eval_interval=0, valid_data_path=[str(valid)]), 1) == []
    parsed = parse_run_config(["--eval-interval", "5", "--eval-iters", "3",
                               "--valid-data-path", str(valid)])
    assert (parsed.training.eval_interval, parsed.training.eval_iters,
            parsed.data.valid_data_path) == (5, 3, [str(valid)])
    with pytest.raises(ConfigError, match=r"^--split \(Megatron-LM\): .*--valid-data-path"):
        parse_run_config(["--split", "90,5,5"])


def test_each_evaluation_starts_where_the_previous_ended():
    """Megatron-LM's consecutive validation iterator, from the iteration alone (so a resumed
    run starts where an uninterrupted one would): --eval-interval 3 --eval-iters 4 over 10
    steps evaluates after 3, 6, 9 and 10 (the end) at global batches 0, 4, 8, 12."""
    from megatron_stgc.training.validation import first_global_batch

    config = tiny_config(eval_interval=3, eval_iters=4, train_iters=10)
    assert [first_global_batch(config, i) for i in (3, 6, 9, 10)] == [0, 4, 8, 12]
    config = tiny_config(eval_interval=0, eval_iters=4, train_iters=10)
    assert first_global_batch(config, 10) == 0  # the end-of-training evaluation only


def test_bad_validation_records_stop_the_run_naming_the_flag(tmp_path):
    from megatron_stgc.data.data_errors import DataError, check_text_health
    from megatron_stgc.data.text_records import read_text_records

    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"question": "q", "answer": "a"}\n{"question": 3}\nnot json\n')
    records = read_text_records([str(valid)])
    with pytest.raises(DataError, match=r"^--valid-data-path: 2 of 3 records \(66.7%\)"):
        check_text_health(records.bad, records.num_records, 0.01, data_flag="--valid-data-path")


def _config(out_dir: str, name: str, validate: bool, **overrides):
    run = os.path.join(out_dir, name)
    values = dict(expert_model_parallel_size=2, seq_length=32, global_batch_size=GLOBAL_BATCH,
                  micro_batch_size=2, train_iters=STEPS, num_samples=200, stgc=True,
                  moe_aux_loss_coeff=0.01, lr=1e-2, min_lr=1e-2, lr_decay_style="constant",
                  cache_dir=os.path.join(out_dir, "cache"), log_file=os.path.join(run, "log.jsonl"),
                  log_interval=1, num_workers=0, routing_probe_interval=0)
    if validate:
        values.update(valid_data_path=[os.path.join(out_dir, "valid.jsonl")],
                      eval_interval=EVAL_INTERVAL, eval_iters=EVAL_ITERS, save=run,
                      save_interval=EVAL_INTERVAL)
    values.update(overrides)
    return tiny_config(**values)


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _slow_valid_loss(model, dataset, evaluation: int) -> float:
    """The token-weighted LM loss over the evaluation's validation global batches, each run
    whole through the bare model; cross entropy of the logits, token by token."""
    import torch

    loss_sum, tokens = 0.0, 0.0
    for g in range(evaluation * EVAL_ITERS, (evaluation + 1) * EVAL_ITERS):
        batch = dataset.batch(list(range(g * GLOBAL_BATCH, (g + 1) * GLOBAL_BATCH)))
        with torch.no_grad():
            logits = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        logits = logits.float()  # [b, s, V]
        for row in range(logits.shape[0]):
            for position in range(logits.shape[1]):
                if batch["loss_mask"][row, position] == 0:
                    continue
                label = int(batch["labels"][row, position])
                log_probs = torch.log_softmax(logits[row, position].double(), dim=0)
                loss_sum -= float(log_probs[label])
                tokens += 1
    return loss_sum / tokens


def _train_both_and_check(rank, world_size, out_dir):
    from megatron.core import parallel_state

    from megatron_stgc.data.dataset import build_dataset
    from megatron_stgc.training.checkpoint import load_model_weights
    from megatron_stgc.training.train import build_run, run_training

    plain = run_training(_config(out_dir, "plain", False), destroy_process_groups=False)
    parallel_state.destroy_model_parallel()
    config = _config(out_dir, "valid", True)
    validated = run_training(config, destroy_process_groups=False)
    parallel_state.destroy_model_parallel()
    resumed = []  # stopped after step 3 by --exit-interval, then resumed to the end
    for exit_interval in (3, None):
        resumed += run_training(_config(out_dir, "resumed", True, exit_interval=exit_interval,
                                        load=os.path.join(out_dir, "resumed")),
                                destroy_process_groups=False)
        parallel_state.destroy_model_parallel()
    _, tokenizer, objects = build_run(config)
    valid, _ = build_dataset(config.model.seq_length, config.training.seed,
                             config.data.cache_dir, config.data.valid_data_path,
                             tokenizer=tokenizer)
    model = objects.unwrapped_model
    model.eval()
    slow = {}
    for iteration, evaluation in EVALUATED.items():
        load_model_weights(config.checkpoint.save, objects.model, iteration)
        slow[iteration] = _slow_valid_loss(model, valid, evaluation)
    return {"plain": plain, "validated": validated, "resumed": resumed, "slow": slow,
            "log": _read(config.logging.log_file) if rank == 0 else None}


def test_validation_loss_matches_the_slow_way_changes_no_step_and_resumes(tmp_path):
    with open(tmp_path / "valid.jsonl", "w") as f:
        for c in generate_conversations(24, seed=7):
            f.write(json.dumps({"question": c.question, "answer": c.answer}) + "\n")
    results = run_on_ranks(_train_both_and_check, 2, str(tmp_path), timeout=300)
    log = results[0]["log"]
    assert [r["iteration"] for r in log] == list(range(1, STEPS + 1))
    assert [r["iteration"] for r in log if "valid/lm_loss" in r] == list(EVALUATED)
    for rank_result in results:
        plain, validated = rank_result["plain"], rank_result["validated"]
        assert len(plain) == len(validated) == STEPS
        for before, after in zip(plain, validated):
            for key in TRAINING_KEYS:
                assert before[key] == after[key], (after["iteration"], key)
        resumed = rank_result["resumed"]
        assert [r["iteration"] for r in resumed] == list(range(1, STEPS + 1))
        for uninterrupted, record in zip(validated, resumed):
            for key in TRAINING_KEYS + ("valid/lm_loss", "valid/tokens"):
                assert uninterrupted.get(key) == record.get(key), (record["iteration"], key)
        for record in validated:
            if record["iteration"] in EVALUATED:
                slow = rank_result["slow"][record["iteration"]]
                assert record["valid/lm_loss"] == pytest.approx(slow, rel=1e-5, abs=0)
                assert record["valid/ppl"] == pytest.approx(math.exp(slow), rel=1e-5)
                assert record["valid/samples"] == EVAL_ITERS * GLOBAL_BATCH
    losses = [r["valid/lm_loss"] for r in log if "valid/lm_loss" in r]
    assert len(set(losses)) == 3  # other weights, other batches: three different values
