"""LLaVA instruction data -> micro-batches of tokens, labels, images and modality.

Positions and records: the run's ``i``-th sample is the record
``order.permutation(i // N)[i % N]`` over the good records of the --data-path
files (``data/sample_order.py``: a seeded shuffle per epoch, or with
``--group-by-modality-length`` MoE-LLaVA's modality- and length-grouped order),
and global batch ``g`` / DP rank ``r`` own the same positions as in the
text-only data set (``dataset.micro_batch_indices``), so a checkpoint's
``consumed_samples`` says exactly where to resume.

A record that turns out unusable only when it is used (corrupt image file,
``<image>`` tag problems, image tokens that do not fit ``--seq-length``) is
counted by kind in ``bad_samples`` and replaced by the next record of the same
epoch's order (of the same modality, when grouping by modality): deterministic,
so a resumed run or a data loader worker makes the same replacement, and never
silent (``report()``; the trainer logs the counts).

Producing a batch (``produce``) and counting what it found (``absorb``) are two
steps, so a batch made in a data loader worker is counted in the training
process when it is consumed, exactly as if it had been made there (``batch``
does both in one process): the bad records a batch found are absorbed sorted by
record, and truncations are counted per delivered sample.

Rows (data/sequences.py): one sample per row, each micro-batch cut to its longest
sample (rounded up to ``pad_to_multiple``), or with ``pack`` (--use-packed-sequence) the
micro-batch's samples packed into as few rows of ``seq_length`` as they fit, with
``segment_ids`` and restarted ``position_ids``. ``padding_mask`` marks the padding for
megatron-core's MoE routers; ``modality`` marks padding / text / image positions for
per-modality MoE routing statistics. Images are in row-major order of their positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from megatron_stgc.data import chat_templates as _chat_templates
from megatron_stgc.data import conversation as _conversation
from megatron_stgc.data import images as _images
from megatron_stgc.data.conversation import BadConversation, tokenize_conversation
from megatron_stgc.data.data_errors import DataError
from megatron_stgc.data.llava_index import BadSampleCounter
from megatron_stgc.data.llava_mix import LlavaMix, open_llava_mix
from megatron_stgc.data.sample_order import ModalityGroupedOrder, ShuffledOrder
from megatron_stgc.data.record_checks import (
    IMAGE_OUTSIDE_ROOT,
    ImagePathRefused,
    resolve_image_path,
    safe_label,
)
from megatron_stgc.data.sequences import vision_language_batch


# Every kind of bad sample the LLaVA loader names: found when the index is built
# (llava_index.BAD_KINDS, including record_checks' text and path kinds) or when a record is
# used (conversation problems, images that cannot be loaded).
IN_USE_KINDS = (
    _conversation.IMAGE_TAG_WITHOUT_IMAGE, _conversation.TOO_MANY_IMAGE_TAGS,
    _conversation.UNKNOWN_ROLE, _conversation.NO_USER_TURN, _conversation.IMAGE_TAG_IN_ANSWER,
    _conversation.IMAGE_TRUNCATED, _conversation.NO_ANSWER_AFTER_TRUNCATION,
    _images.MISSING_IMAGE, _images.CORRUPT_IMAGE, _images.IMAGE_TOO_LARGE, IMAGE_OUTSIDE_ROOT,
    _chat_templates.TEMPLATE_MISMATCH, _chat_templates.TEMPLATE_TURNS,
)


def all_bad_sample_kinds() -> tuple[str, ...]:
    from megatron_stgc.data.llava_index import BAD_KINDS

    return tuple(sorted(set(BAD_KINDS) | set(IN_USE_KINDS)))


@dataclass
class _Resolved:
    record: int  # index into the LlavaMix
    record_id: str
    tokens: np.ndarray  # int64 [length]
    loss_mask: np.ndarray  # int64 [length]
    image_path: Optional[str]
    truncated: bool = False


@dataclass
class BatchEvents:
    """What producing one batch found: bad records ``(record, kind, label)`` in record order
    (those the producing process did not know yet) and truncated samples delivered."""

    bad: list[tuple[int, str, str]]
    truncated: int


@dataclass
class LlavaSFTDataset:
    index: LlavaMix
    tokenizer: object  # encode / eos_id / pad_id
    image_loader: object  # ImagePreprocessor: load(paths) -> (tensor, failures)
    seq_length: int
    num_image_tokens: int
    image_token_id: int
    seed: int
    image_root: Optional[str] = None
    bad_samples: BadSampleCounter = field(default_factory=BadSampleCounter)
    truncated: int = 0
    chat_template: Optional[_chat_templates.ChatTemplate] = None  # None: the plain template
    pad_to_multiple: int = 1  # batch widths are multiples of this (sequences.sequence_multiple)
    pack: bool = False  # --use-packed-sequence: several samples per row
    order: object = None  # sample_order: ShuffledOrder (default) or ModalityGroupedOrder

    def __post_init__(self):
        if self.order is None:
            self.order = ShuffledOrder(len(self.index), self.seed)
        self._bad_records: set[int] = set()  # counted in bad_samples (checkpointed)
        self._known_bad: set[int] = set()  # skipped by this process's resolver
        self._found: list[tuple[int, str, str]] = []  # found by the batch being produced

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ records

    def _mark_bad(self, record: int, kind: str, record_id: str) -> None:
        if record not in self._known_bad:
            self._known_bad.add(record)
            self._found.append((record, kind, self.index.label(record, record_id)))

    def _tokenize(self, record: int) -> _Resolved:
        """Raises BadConversation for unusable conversations (and image paths that, resolved
        now, leave the image root: a link changed since the index was built)."""
        data = self.index.record(record)
        image = data.get("image")
        record_id = safe_label(data.get("id", f"#{record}"))
        image_path = None
        try:
            if image is not None:
                image_path = resolve_image_path(image, self.image_root,
                                                self.index.allow_image_outside_root)
        except ImagePathRefused as error:
            refused = BadConversation(IMAGE_OUTSIDE_ROOT, str(error))
            refused.record_id = record_id
            raise refused from None
        try:
            tokenize = (tokenize_conversation if self.chat_template is None
                        else self.chat_template.tokenize)
            tokenized = tokenize(
                data["conversations"], self.tokenizer, has_image=image is not None,
                image_token_id=self.image_token_id, num_image_tokens=self.num_image_tokens,
                max_length=self.seq_length + 1)
        except BadConversation as error:
            error.record_id = record_id
            raise
        return _Resolved(record, record_id, tokenized.tokens,
                         tokenized.loss_mask, image_path, bool(tokenized.truncated))

    def _resolve(self, position: int, skip: int = 0) -> _Resolved:
        """The first usable record at or after ``position`` (+ ``skip``) in its epoch's order
        (with a modality-grouped order: of the modality of the record at ``position``)."""
        epoch, offset = divmod(position, len(self))
        order = self.order.permutation(epoch)
        grouped = isinstance(self.order, ModalityGroupedOrder)
        wanted = self.order.modality_of(int(order[offset])) if grouped else None
        for step in range(skip, skip + len(self)):
            record = int(order[(offset + step) % len(self)])
            if record in self._known_bad or (grouped and self.order.modality_of(record) != wanted):
                continue
            try:
                return self._tokenize(record)
            except BadConversation as error:
                self._mark_bad(record, error.kind, getattr(error, "record_id", f"#{record}"))
        kind = {None: "", 1: " with an image", -1: " without an image"}[wanted]
        raise RuntimeError(f"{self.index.path}: no usable record{kind} left\n{self.report()}")

    def _resolve_with_images(self, positions: list[int]) -> tuple[list[_Resolved], torch.Tensor]:
        """Resolve every position; images of a corrupt file are marked bad and replaced."""
        resolved = [self._resolve(p) for p in positions]
        while True:
            with_image = [i for i, r in enumerate(resolved) if r.image_path is not None]
            if not with_image:
                return resolved, None
            images, failures = self.image_loader.load([resolved[i].image_path for i in with_image])
            if not failures:
                return resolved, images
            for position_in_list, error in failures:
                row = with_image[position_in_list]
                self._mark_bad(resolved[row].record, error.kind, resolved[row].record_id)
                resolved[row] = self._resolve(positions[row], skip=1)

    # ------------------------------------------------------------------ batches

    def batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """The micro-batch of ``positions`` (``_tensors`` has the layout); what making it found
        is counted here (``produce`` + ``absorb``)."""
        tensors, events = self.produce(positions)
        self.absorb(events)
        return tensors

    def produce(self, positions: list[int]) -> tuple[dict[str, torch.Tensor], BatchEvents]:
        """The batch of ``positions`` and what making it found, not yet counted."""
        self._found = []
        resolved, images = self._resolve_with_images(positions)
        events = BatchEvents(bad=sorted(self._found),
                             truncated=sum(int(r.truncated) for r in resolved))
        self._found = []
        return self._tensors(resolved, images), events

    def absorb(self, events: BatchEvents) -> None:
        """Count a produced batch's findings (bad records once per process, as ``batch``)."""
        for record, kind, label in events.bad:
            self._known_bad.add(record)
            if record not in self._bad_records:
                self._bad_records.add(record)
                self.bad_samples.add(kind, label)
        self.truncated += events.truncated

    def _tensors(self, resolved: list[_Resolved], images) -> dict[str, torch.Tensor]:
        """tokens / labels / loss_mask / position_ids / modality / padding_mask [rows, width],
        images [n_img, 3, H, W]; with ``pack`` also segment_ids [rows, width].

        One row per sample (``rows`` = ``len(resolved)``) or, packed, as few as they fit;
        ``width`` = the fullest row rounded up to ``pad_to_multiple``."""
        return vision_language_batch(
            [(r.tokens, r.loss_mask) for r in resolved], images,
            [r.image_path is not None for r in resolved], seq_length=self.seq_length,
            multiple=self.pad_to_multiple, pack=self.pack, pad_id=self.tokenizer.pad_id,
            image_token_id=self.image_token_id)

    # ------------------------------------------------------------------ resume

    def data_state(self) -> dict:
        """What a checkpoint keeps so the counters continue after a resume: bad samples
        found in use (and which records, so a resumed run does not count them twice) and
        the truncation count."""
        return {"bad_samples": self.bad_samples.to_json(), "truncated": self.truncated,
                "bad_records": sorted(self._bad_records)}

    def restore_data_state(self, state: dict) -> None:
        self.bad_samples = BadSampleCounter.from_json(state["bad_samples"])
        self.truncated = int(state["truncated"])
        self._bad_records = set(int(r) for r in state["bad_records"])
        self._known_bad = set(self._bad_records)

    def report(self, bad_samples: Optional[BadSampleCounter] = None,
               truncated: Optional[int] = None, scope: str = "") -> str:
        """Bad records found at index build time and in use, and the truncation count;
        ``bad_samples``/``truncated``: totals of several ranks instead of this one's."""
        bad_samples = self.bad_samples if bad_samples is None else bad_samples
        truncated = self.truncated if truncated is None else truncated
        in_use = bad_samples.report().replace("bad samples:", f"bad samples found in use{scope}:")
        return (f"{self.index.report()}\n{in_use}\n"
                f"samples truncated to --seq-length{scope} (counted per use): {truncated}")


def tokenizer_training_texts(index: LlavaMix, limit: int = 20000) -> list[str]:
    """Chat-template texts of up to ``limit`` records spread over the file (no <image> tags)."""
    from megatron_stgc.data.conversation import ASSISTANT_ROLES, IMAGE_TAG
    from megatron_stgc.data.instruct_text import format_prompt

    step = max(1, len(index) // limit)
    texts = []
    for record in range(0, len(index), step):
        for turn in index.record(record)["conversations"]:
            value = turn["value"].replace(IMAGE_TAG, "").strip()
            texts.append(value if turn["from"] in ASSISTANT_ROLES else format_prompt(value))
    return texts


def build_llava_dataset(data_path: list[str] | str, image_root: Optional[str], cache_dir: str,
                        seed: int, seq_length: int, num_image_tokens: int, image_loader,
                        tokenizer_model: Optional[str] = None, vocab_size: int = 512,
                        allow_image_outside_root: bool = False, chat_template: str = "plain",
                        pad_to_multiple: int = 1, pack: bool = False,
                        grouping: Optional[tuple[int, int]] = None, tokenizer=None,
                        data_flag: str = "--data-path") -> tuple[LlavaSFTDataset, object]:
    """The LLaVA data set over one or more files and its tokenizer (a SentencePiece model
    trained on the data and cached on first use, unless --tokenizer-model is given). The
    image token id is the first id past the tokenizer's vocabulary. ``grouping``:
    (global batch size, micro-batch size) for --group-by-modality-length, else None.
    ``tokenizer``: use this one (the training run's, for --valid-data-path); ``data_flag``:
    the flag errors name. Let rank 0 call it first (index build)."""
    from megatron_stgc.data.tokenizer import get_or_train_tokenizer, load_tokenizer

    os.makedirs(cache_dir, exist_ok=True)
    index = open_llava_mix(data_path, image_root, cache_dir, allow_image_outside_root)
    if len(index) == 0:
        raise DataError(f"{data_flag} {index.path}: no usable records\n{index.report()}")
    if tokenizer is None and tokenizer_model is not None:
        tokenizer = load_tokenizer(tokenizer_model)
    elif tokenizer is None:
        tokenizer = get_or_train_tokenizer(tokenizer_training_texts(index), vocab_size, cache_dir)
    order = None
    if grouping is not None:
        order = ModalityGroupedOrder(index.modality_lengths, seed, *grouping)
    template = _chat_templates.get_template(chat_template)
    _chat_templates.check_tokenizer_fits(template, tokenizer, tokenizer_model)
    dataset = LlavaSFTDataset(index, tokenizer, image_loader, seq_length, num_image_tokens,
                              image_token_id=tokenizer.vocab_size, seed=seed,
                              image_root=image_root, chat_template=template,
                              pad_to_multiple=pad_to_multiple, pack=pack, order=order)
    return dataset, tokenizer
