"""Generation with megatron-core's KV cache equals re-running the whole sequence, token for
token (tiny MoE-LLaVA: plain, STGC, LTDR; one process and EP=2 on two gloo ranks against one
process); stop strings end an answer."""

from __future__ import annotations

import pytest
import torch

from dist_utils import load_full_state, run_on_ranks, save_full_state
from megatron_stgc.config import config_from_flat
from megatron_stgc.eval.generate import GreedyDecoder, _all_ranks_done
from megatron_stgc.eval.generation import CachedGeneration, FullGeneration
from megatron_stgc.eval.model_inputs import ModelInputs
from megatron_stgc.eval.stop import AnswerRows, cut_at_stop
from stgc_utils import init_single_process

SEQ, P, MODEL_VOCAB = 64, 4, 128
FLAGS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
             moe_ffn_hidden_size=64, num_experts=4, moe_router_topk=2, moe_layer_freq=2,
             moe_aux_loss_coeff=0.0, seq_length=SEQ, vision_model_type="clip",
             vision_num_layers=2, vision_hidden_size=16, vision_num_attention_heads=2,
             img_h=8, img_w=8, patch_dim=4, data_path=__file__,
             init_method_std=0.5)  # wide weights: answers that differ from token to token
# (question, has image): image and text-only prompts of different lengths in one batch
QUESTIONS = [("Which digit is shown?", True), ("What is 3 + 4?", False),
             ("Is the digit even or odd, tell me?", True), ("Hi", False),
             ("Say the digit twice.", True)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_stgc.data.instruct_text import format_conversation, generate_conversations
    from megatron_stgc.data.tokenizer import get_or_train_tokenizer

    init_single_process()
    model_parallel_cuda_manual_seed(1234)
    texts = [format_conversation(c) for c in generate_conversations(300, seed=0)]
    return get_or_train_tokenizer(texts, 100, str(tmp_path_factory.mktemp("spm")))


def build(tokenizer, **overrides):
    from megatron_stgc.training.setup import build_model

    torch.manual_seed(0)
    model, _ = build_model(config_from_flat({**FLAGS, **overrides}), MODEL_VOCAB,
                           tokenizer.vocab_size)
    return model.eval()


def prompts_and_images(tokenizer, which=range(len(QUESTIONS))):
    from megatron_stgc.data.conversation import prompt_tokens

    picked = [QUESTIONS[i] for i in which]
    prompts = [prompt_tokens(text, tokenizer, has_image=image, image_token_id=tokenizer.vocab_size,
                             num_image_tokens=P) for text, image in picked]
    images = torch.randn(len(QUESTIONS), 3, 8, 8, generator=torch.Generator().manual_seed(5))
    rows_with_image = [i for i in which if QUESTIONS[i][1]]
    return prompts, (images[rows_with_image] if rows_with_image else None)


@torch.no_grad()
def generate(model, tokenizer, prompts, images, cached: bool, max_new=12, stops=()):
    """Greedy tokens per row; every rank steps until every rank is done."""
    rows = AnswerRows([list(p) for p in prompts], tokenizer, max_new, SEQ, stops)
    inputs = ModelInputs(model, tokenizer.vocab_size)
    generation = (CachedGeneration(inputs, rows, images, tokenizer.pad_id) if cached and prompts
                  else FullGeneration(model, inputs, rows, images, tokenizer.pad_id))
    while True:
        generation.step()
        if _all_ranks_done(generation.done):
            return rows


@pytest.mark.parametrize("overrides", [{}, {"stgc": True}, {"ltdr": True}],
                         ids=["plain", "stgc", "ltdr"])
def test_cache_gives_the_same_greedy_tokens(tokenizer, overrides):
    model = build(tokenizer, **overrides)
    prompts, images = prompts_and_images(tokenizer)
    assert len({len(p) for p in prompts}) >= 4  # rows of different lengths
    full = generate(model, tokenizer, prompts, images, cached=False).generated
    cached = generate(model, tokenizer, prompts, images, cached=True).generated
    assert cached == full
    assert all(len(row) == 12 for row in full)  # nobody stopped early: 12 compared per row
    assert len({tuple(row) for row in full}) == len(full)  # and the rows differ


@torch.no_grad()
def test_cached_logits_equal_the_full_forward(tokenizer):
    """The logits behind the tokens: every cached step's last-position logits against the
    full forward's logits at that position (within 1e-4; the wide init makes logits of ~1)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    model = build(tokenizer)
    prompts, images = prompts_and_images(tokenizer, which=[0, 2])
    width = max(map(len, prompts)) + 6
    tokens = torch.full((2, width), tokenizer.pad_id)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
        tokens[row, len(prompt):] = torch.arange(5, 5 + width - len(prompt))  # any text
    positions = torch.arange(width).expand(2, -1)
    full = model(tokens, positions, None, images=images)  # [b, s, V]
    inputs = ModelInputs(model, tokenizer.vocab_size)
    embeddings = inputs.prompt_embeddings(tokens, positions, images)  # [s, b, h]
    context = StaticInferenceContext(2, width)
    start = min(map(len, prompts))
    logits = inputs.logits(tokens[:, :start], positions[:, :start], embeddings[:start], context)
    context.increment_sequence_len_offset(start)
    torch.testing.assert_close(logits[:, -1], full[:, start - 1], atol=1e-4, rtol=1e-4)
    for position in range(start, width):
        step = slice(position, position + 1)
        logits = inputs.logits(tokens[:, step], positions[:, step], embeddings[step], context)
        context.increment_sequence_len_offset(1)
        torch.testing.assert_close(logits[:, -1], full[:, position], atol=1e-4, rtol=1e-4)


def test_a_stop_string_ends_the_answer(tokenizer):
    model = build(tokenizer)
    prompts, images = prompts_and_images(tokenizer, which=[0])
    free = generate(model, tokenizer, prompts, images, cached=True)
    text = free.answer(0)
    stop = tokenizer.decode(free.generated[0][4:6]).strip()  # a piece from the middle
    assert stop and stop in text
    stopped = generate(model, tokenizer, prompts, images, cached=True, stops=(stop,))
    assert stopped.answer(0) == text[:text.find(stop)].strip()
    generated = stopped.generated[0]
    assert len(generated) < len(free.generated[0])
    assert generated == free.generated[0][:len(generated)]  # the same answer, cut short
    assert stop in tokenizer.decode(generated)  # stopped by the string (not the length)
    assert stop not in tokenizer.decode(generated[:-1])  # at the first token that made it


def test_answer_rows_end_on_eos_length_and_stop_strings(tokenizer):
    assert cut_at_stop("7</s><|user|> more", ["<|user|>", "</s>"]) == ("7", True)
    assert cut_at_stop("seven", ["<|user|>"]) == ("seven", False)
    rows = AnswerRows([[5, 6], [5, 6, 7]], tokenizer, max_new_tokens=3, max_length=5)
    rows.take(0, tokenizer.eos_id)
    assert rows.done == [True, False] and rows.answer(0) == ""
    rows.take(1, 8)
    rows.take(1, 9)  # 3 + 2 = 5 tokens: --seq-length reached before 3 new tokens
    assert rows.done[1] and rows.generated[1] == [8, 9]


def test_greedy_decoder_answers_with_and_without_the_cache(tokenizer):
    """The decoder (prompts built from question text, no images: a text-only batch of the
    vision-language model) gives the same answers both ways."""
    model = build(tokenizer)
    questions = [{"question_id": i, "text": text} for i, (text, _) in enumerate(QUESTIONS)]
    answers = {}
    for cached in (False, True):
        decoder = GreedyDecoder(model, tokenizer, None, None, tokenizer.vocab_size, P,
                                max_new_tokens=8, max_length=SEQ, kv_cache=cached)
        answers[cached] = decoder.decode(questions)
    assert answers[True] == answers[False]
    assert all(a["text"] for a in answers[True])


# ------------------------------------------------------------------ EP = 2

def _ep2_rank(rank, world, tokenizer_path, state_path):
    """This rank's share of the questions (rank 0: 3 rows, rank 1: 2) on an EP=2 model with
    the one-process weights; both ways."""
    from megatron_stgc import parallel
    from megatron_stgc.data.tokenizer import Tokenizer

    parallel.initialize_model_parallel(1, 2, 1234)
    tokenizer = Tokenizer(tokenizer_path)
    model = build(tokenizer, stgc=True, expert_model_parallel_size=2)
    load_full_state(model, state_path)
    which = list(range(rank, len(QUESTIONS), world))
    prompts, images = prompts_and_images(tokenizer, which)
    return {cached: generate(model, tokenizer, prompts, images, cached).generated
            for cached in (True, False)}


def test_ep2_answers_equal_one_process(tokenizer, tmp_path):
    """STGC model, experts split over two ranks that decode batches of different sizes and
    lengths (idle forwards while the other rank finishes)."""
    model = build(tokenizer, stgc=True)
    save_full_state(model, str(tmp_path / "state.pt"))
    prompts, images = prompts_and_images(tokenizer)
    reference = generate(model, tokenizer, prompts, images, cached=True).generated
    assert reference == generate(model, tokenizer, prompts, images, cached=False).generated
    per_rank = run_on_ranks(_ep2_rank, 2, tokenizer.model_path, str(tmp_path / "state.pt"))
    for rank, result in enumerate(per_rank):
        expected = reference[rank::2]
        assert result[True] == expected and result[False] == expected, rank
