"""``megatron-stgc eval``: greedy answers for a LLaVA question file, written and scored.

Every rank builds the trained model (same flags as training, ``--load`` the
checkpoint), takes its data-parallel share of the questions and decodes
greedily in batches; all ranks run the same number of forward passes, since
the MoE layers' all-to-alls need every expert-parallel rank (a rank with no
question left feeds one padding row). No KV cache: each new token re-runs the
whole (short) sequence. Rank 0 writes the answers in LLaVA's eval layout
(``scoring.write_answers``) and, with ``--ground-truth``, scores them per
question category.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_stgc.config import RunConfig


@dataclass
class EvalOptions:
    question_file: str
    answers_file: str
    ground_truth: Optional[str] = None
    max_new_tokens: int = 8
    eval_batch_size: int = 16
    model_id: str = "megatron-stgc"
    results_file: Optional[str] = None  # scores as JSON
    # pad each decoding step's sequence length to a multiple of this (None: 16 with
    # --fp8-format, whose Transformer Engine GEMMs need it, else 1)
    eval_pad_to_multiple: Optional[int] = None


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question-file", required=True,
                        help="LLaVA question JSONL: question_id, image (optional), text, category")
    parser.add_argument("--answers-file", required=True, help="where the answers JSONL goes")
    parser.add_argument("--ground-truth", default=None,
                        help="JSONL of question_id, answer, category: score the answers")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--model-id", default="megatron-stgc")
    parser.add_argument("--results-file", default=None, help="write the scores as JSON")
    parser.add_argument("--eval-pad-to-multiple", type=int, default=None,
                        help="pad every decoding step's sequence length to a multiple of N "
                             "(default: 16 with --fp8-format, else 1); answers do not change")


def eval_pad_multiple(config: RunConfig, options: EvalOptions) -> int:
    """What every decoding step's sequence length is padded to a multiple of: 16 under FP8
    (Transformer Engine's GEMMs), times the TP size under sequence parallelism (the sequence
    is split over the TP ranks); --eval-pad-to-multiple overrides."""
    if options.eval_pad_to_multiple is not None:
        if options.eval_pad_to_multiple < 1:
            from megatron_stgc.config import ConfigError

            raise ConfigError(f"--eval-pad-to-multiple must be >= 1, got "
                              f"{options.eval_pad_to_multiple}")
        return options.eval_pad_to_multiple
    from megatron_stgc.model.gpt import transformer_config_kwargs

    multiple = 16 if config.precision.fp8_format else 1
    if transformer_config_kwargs(config)["sequence_parallel"]:
        multiple = math.lcm(multiple, config.parallel.tensor_model_parallel_size)
    return multiple


def read_questions(path: str) -> list[dict]:
    questions = []
    with open(path) as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            question = json.loads(line)
            for key in ("question_id", "text"):
                if key not in question:
                    raise ValueError(f"--question-file {path}: line {number + 1} has no {key!r}")
            questions.append(question)
    if not questions:
        raise ValueError(f"--question-file {path}: no questions")
    return questions


class GreedyDecoder:
    """Batched greedy decoding with a MoELLaVAModel/GPTModel on every EP rank."""

    def __init__(self, model, tokenizer, image_loader, image_root: Optional[str],
                 image_token_id: Optional[int], num_image_tokens: int, max_new_tokens: int,
                 max_length: int, pad_to_multiple: int = 1,
                 allow_image_outside_root: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.image_loader = image_loader
        self.image_root = image_root
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length  # --seq-length: prompt + answer never exceed it
        # FP8 (Transformer Engine) needs token counts that are multiples of 8/16; padding at
        # the end of a causal sequence does not change the logits of the positions before it
        self.pad_to_multiple = pad_to_multiple
        self.allow_image_outside_root = allow_image_outside_root

    def prompt(self, question: dict) -> list[int]:
        from megatron_stgc.data.conversation import prompt_tokens

        return prompt_tokens(question["text"], self.tokenizer,
                             has_image=question.get("image") is not None,
                             image_token_id=self.image_token_id if self.image_token_id is not None
                             else -1, num_image_tokens=self.num_image_tokens)

    def images(self, questions: list[dict],
               skip: dict[int, str]) -> tuple[Optional[torch.Tensor], dict[int, str]]:
        """[n_img, 3, H, W] for the questions with an image (rows in ``skip`` left out);
        {row: error} for unreadable ones. The tensor holds the good images in row order."""
        from megatron_stgc.data.record_checks import ImagePathRefused, resolve_image_path

        rows = [i for i, q in enumerate(questions) if q.get("image") is not None and i not in skip]
        if not rows or self.image_loader is None:
            return None, {}
        refused, paths, kept = {}, [], []
        for row in rows:
            try:
                paths.append(resolve_image_path(questions[row]["image"], self.image_root,
                                                self.allow_image_outside_root))
                kept.append(row)
            except ImagePathRefused as error:
                refused[row] = f"{error.kind}: {error}"
        if not kept:
            return None, refused
        images, failures = self.image_loader.load(paths)
        refused.update({kept[i]: f"{error.kind}: {paths[i]}" for i, error in failures})
        return images, refused

    def _prompts(self, questions: list[dict]) -> tuple[dict[int, list[int]], dict[int, str]]:
        """({row: prompt ids}, {row: error}): an error where the prompt cannot be built or
        does not fit --seq-length."""
        from megatron_stgc.data.conversation import BadConversation

        from megatron_stgc.data.llava_index import BAD_IMAGE_FIELD
        from megatron_stgc.data.record_checks import text_problem

        prompts, errors = {}, {}
        for row, question in enumerate(questions):
            problem = text_problem(question)
            image = question.get("image")
            if problem is None and image is not None and (not isinstance(image, str) or not image):
                problem = BAD_IMAGE_FIELD
            if problem is None and not isinstance(question.get("text"), str):
                problem = "bad_question_text"
            if problem is not None:
                errors[row] = f"{problem}: the question cannot be used"
                continue
            try:
                prompt = self.prompt(question)
            except BadConversation as error:
                errors[row] = f"{error.kind}: {error}"
                continue
            if len(prompt) >= self.max_length:
                errors[row] = (f"prompt of {len(prompt)} tokens does not fit --seq-length "
                               f"{self.max_length}")
            else:
                prompts[row] = prompt
        return prompts, errors

    def _step_logits(self, sequences: list[list[int]], images) -> torch.Tensor:
        """Logits at every row's last position: [b, vocab]."""
        width = math.ceil(max(len(s) for s in sequences) / self.pad_to_multiple)
        width *= self.pad_to_multiple
        tokens = torch.full((len(sequences), width), self.tokenizer.pad_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
        # padding past --seq-length reuses the last position id (it is never attended to)
        positions = torch.arange(width).clamp(max=self.max_length - 1)
        positions = positions.unsqueeze(0).expand(len(sequences), -1)
        device = next(self.model.parameters()).device
        extras = {} if self.image_token_id is None else {
            "images": None if images is None else images.to(device)}
        logits = self.model(tokens.to(device), positions.to(device), None, **extras)  # [b, s, V]
        last = torch.tensor([len(s) - 1 for s in sequences])
        return logits[torch.arange(len(sequences)), last, :self.tokenizer.vocab_size]

    @torch.no_grad()
    def decode(self, questions: list[dict]) -> list[dict]:
        """Answers for ``questions`` (may be empty: one padding row keeps the collectives)."""
        # rows whose prompt or image is unusable get an error instead of an answer
        prompts, failed = self._prompts(questions)
        images, unreadable = self.images(questions, skip=failed)
        failed.update(unreadable)
        keep = [i for i in range(len(questions)) if i not in failed]
        sequences = [prompts[i] for i in keep]
        if not sequences:
            sequences, dummy = [[self.tokenizer.eos_id]], True
        else:
            dummy = False
        prompt_lengths = [len(s) for s in sequences]
        done = [dummy] * len(sequences)
        for _ in range(self.max_new_tokens):
            next_tokens = self._step_logits(sequences, images).argmax(dim=-1).tolist()
            for row, token in enumerate(next_tokens):
                if not done[row]:
                    sequences[row].append(token)
                    done[row] = (token == self.tokenizer.eos_id
                                 or len(sequences[row]) >= self.max_length)
            if _all_ranks_done(all(done)):
                break
        answers = {}
        for row, index in enumerate(keep if not dummy else []):
            generated = [t for t in sequences[row][prompt_lengths[row]:] if t != self.tokenizer.eos_id]
            answers[index] = {"text": self.tokenizer.decode(generated).strip()}
        for index, error in failed.items():
            answers[index] = {"text": "", "error": error}
        return [answers[i] for i in range(len(questions))]


def _all_ranks_done(local_done: bool) -> bool:
    from megatron_stgc.parallel import collective_device

    flag = torch.tensor([0 if local_done else 1], dtype=torch.long, device=collective_device())
    dist.all_reduce(flag)
    return int(flag) == 0


def rank_share(questions: list[dict]) -> list[int]:
    """Indices of the questions this data-parallel rank answers (round robin)."""
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    return list(range(rank, len(questions), size))


def answer_questions(decoder: GreedyDecoder, questions: list[dict], batch_size: int,
                     progress=print) -> list[dict]:
    """Every question's answer, on rank 0 (others get [])."""
    mine = rank_share(questions)
    from megatron_stgc.parallel import collective_device

    rounds = torch.tensor([math.ceil(len(mine) / batch_size)], dtype=torch.long,
                          device=collective_device())
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    local: dict[int, dict] = {}
    for number in range(int(rounds)):
        chunk = mine[number * batch_size:(number + 1) * batch_size]
        for index, answer in zip(chunk, decoder.decode([questions[i] for i in chunk])):
            local[index] = answer
        last = number + 1 == int(rounds)
        if dist.get_rank() == 0 and progress is not None and (number % 10 == 9 or last):
            progress(f"eval: batch {number + 1}/{int(rounds)} on each rank")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return []
    merged: dict[int, dict] = {}
    for part in gathered:
        merged.update(part)
    return [merged[i] for i in range(len(questions))]


def answer_records(questions: list[dict], answers: list[dict], model_id: str) -> list[dict]:
    """LLaVA eval answer lines: question_id, prompt, text, answer_id, model_id, metadata."""
    records = []
    for number, (question, answer) in enumerate(zip(questions, answers)):
        metadata = {"category": question.get("category")}
        if "error" in answer:
            metadata["error"] = answer["error"]
        records.append({"question_id": question["question_id"], "prompt": question["text"],
                        "text": answer["text"], "answer_id": f"{model_id}-{number}",
                        "model_id": model_id, "metadata": metadata})
    return records


def format_scores(results: dict) -> str:
    """One line per category and one overall: accuracy (correct/total, missing, errors)."""
    rows = sorted(results["per_category"].items()) + [("overall", results["overall"])]
    return "\n".join(f"eval: {name:>20} {100 * row['accuracy']:5.1f}% ({row['correct']}/"
                     f"{row['total']}, missing {row['missing']}, errors {row['errors']})"
                     for name, row in rows)


def run_eval(config: RunConfig, options: EvalOptions) -> Optional[dict]:
    """Load --load, answer --question-file, write --answers-file, score (rank 0 returns scores)."""
    from megatron_stgc import parallel
    from megatron_stgc.config import validate_run_config
    from megatron_stgc.eval import scoring
    from megatron_stgc.training.checkpoint import load_model_weights
    from megatron_stgc.training.train import build_run, image_token_id_of

    from megatron_stgc.config import ConfigError

    if config.checkpoint.load is None:
        raise ConfigError("eval needs --load (the trained checkpoint)")
    if config.model.num_experts is not None and config.parallel.expert_model_parallel_size > 1 \
            and config.model.moe_token_dispatcher_type != "alltoall":
        raise ConfigError("eval needs --moe-token-dispatcher-type alltoall when "
                          "--expert-model-parallel-size > 1 (ranks decode batches of different "
                          "shapes; the dispatcher does not change the weights)")
    if not os.path.isfile(options.question_file):
        raise ConfigError(f"--question-file: {options.question_file} does not exist")
    if options.ground_truth is not None and not os.path.isfile(options.ground_truth):
        raise ConfigError(f"--ground-truth: {options.ground_truth} does not exist")
    validate_run_config(config, parallel.world_size_from_env())
    questions = read_questions(options.question_file)
    parallel.initialize_distributed()
    try:
        dataset, tokenizer, objects = build_run(config)
        image_token_id = image_token_id_of(dataset)
        progress = load_model_weights(config.checkpoint.load, objects.model)
        model = objects.model[0]
        model.eval()
        decoder = GreedyDecoder(model, tokenizer, getattr(dataset, "image_loader", None),
                                config.data.image_root, image_token_id,
                                getattr(dataset, "num_image_tokens", 0), options.max_new_tokens,
                                config.model.seq_length, eval_pad_multiple(config, options),
                                config.data.allow_image_outside_root)
        if dist.get_rank() == 0:
            print(f"eval: {len(questions)} questions, checkpoint {config.checkpoint.load} "
                  f"iteration {progress.iteration}", flush=True)
        answers = answer_questions(decoder, questions, options.eval_batch_size)
        if dist.get_rank() != 0:
            return None
        os.makedirs(os.path.dirname(os.path.abspath(options.answers_file)), exist_ok=True)
        scoring.write_answers(options.answers_file,
                              answer_records(questions, answers, options.model_id))
        print(f"eval: answers written to {options.answers_file}", flush=True)
        if options.ground_truth is None:
            return None
        results = scoring.score(options.answers_file, options.ground_truth)
        if options.results_file:
            with open(options.results_file, "w") as f:
                json.dump(results, f, indent=2)
        print(format_scores(results), flush=True)
        return results
    finally:
        parallel.destroy()
