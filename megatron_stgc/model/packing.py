"""Attention that stays inside a sample when a row holds several (``--use-packed-sequence``).

The data side (data/sequences.py) gives every position its sample's ``segment_ids``
([rows, width], -1 on padding). Two ways to keep attention inside a sample:

* ``"mask"`` (megatron-core's local spec: DotProductAttention, the CPU path):
  ``block_causal_mask`` -> an explicit attention mask, causal and block-diagonal. The local
  attention rejects ``PackedSeqParams`` and, unfused, applies any mask it is given
  (``FusedScaleMaskSoftmax.forward_torch_softmax``; our configs never fuse it without TE).
  Rotary embeddings are computed for the row's columns, not per sample, which is exact:
  inside a sample only relative positions enter a rotary attention score. Learned absolute
  embeddings read the restarted ``position_ids``.
* ``"thd"`` (the Transformer Engine spec): megatron-core's ``PackedSeqParams`` in the THD
  format over the flattened micro-batch ([1, rows * width]); every sample, and every row's
  trailing run of padding, is one sequence of ``cu_seqlens``. megatron restarts rotary
  positions per sequence. Written for the GPU; not run on one yet (docs/SEQUENCES.md).
"""

from __future__ import annotations

import torch

MASK, THD = "mask", "thd"


def packed_attention_kind(use_transformer_engine: bool) -> str:
    return THD if use_transformer_engine else MASK


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [b, s] -> bool [b, 1, s, s], True = masked (megatron's convention).

    Position i sees position j iff j <= i and both hold the same segment (padding positions,
    -1, see only the padding before them in their row: never a real token, and no row of
    the mask is empty)."""
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # [b, s, s]
    return ~(same & causal).unsqueeze(1)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [b * s]: where a new sequence starts in the flattened rows (each row's start, and
    every change of segment inside a row)."""
    rows, width = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts.reshape(rows * width)


def thd_packed_seq_params(segment_ids: torch.Tensor):
    """megatron-core PackedSeqParams (THD) for the flattened [1, b * s] micro-batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    starts = segment_starts(segment_ids).nonzero().flatten()
    total = torch.tensor([segment_ids.numel()], device=segment_ids.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_length, max_seqlen_kv=max_length)


def flatten_rows(tensor):
    """[b, s, ...] -> [1, b * s, ...] (row-major: the order of the THD sequence); None stays."""
    if tensor is None:
        return None
    return tensor.reshape(1, tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])


def packed_inputs(kind: str, segment_ids: torch.Tensor, attention_mask, tensors: tuple):
    """What the language model gets for packed rows: (tensors, attention_mask,
    packed_seq_params). ``"mask"``: tensors unchanged, the block causal mask; ``"thd"``:
    every [b, s] tensor flattened to [1, b * s], no mask, THD PackedSeqParams."""
    if attention_mask is not None:
        raise ValueError("packed rows (segment_ids) build their own attention mask")
    if kind == THD:
        return tuple(flatten_rows(t) for t in tensors), None, thd_packed_seq_params(segment_ids)
    return tensors, block_causal_mask(segment_ids), None
