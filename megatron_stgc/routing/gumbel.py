"""--moe-router-gumbel-second-expert: the 2nd (..k-th) expert sampled with Gumbel noise.

DeepSpeed's ``top2gating`` (deepspeed/moe/sharded_moe.py, v0.9.5 as MoE-LLaVA pins it,
lines 277-329): gates = softmax(logits); expert 1 = argmax(gates); expert 2 = argmax over the
other experts of ``logits + Gumbel noise`` (the Gumbel-max trick: a sample from the softmax
over the remaining experts); the two gates are the noise-free softmax values renormalised
over the pair. Here the first expert is the noise-free argmax and experts 2..k are the top
k-1 of ``logits + noise`` among the rest (k = 2: DeepSpeed's rule; k > 2: the Gumbel-top-k
trick, a sample without replacement). megatron-core then forms the weights from the
noise-free scores of the chosen experts: top-k-then-softmax (the default for k > 1) gives
exactly DeepSpeed's renormalised gates; with --moe-router-pre-softmax the weights are the
softmax probabilities of the chosen experts (the noise is added to their log).

Only training forwards draw noise; eval (``router.training`` False) is megatron's top-k.
(DeepSpeed 0.9.5 adds the noise in eval too: ``top2gating`` has no training switch.)

Determinism: the noise of a forward comes from its own generator seeded with (--seed, layer
number, the rank's data-parallel index (with context parallelism; plus the tensor-parallel
rank under sequence parallelism, where TP ranks route different tokens), training step,
forward count within the step). ``set_router_step(model, iteration)`` (called by the train
loop before each step) sets the step and restarts the count, so a resumed run draws exactly
the noise an uninterrupted one would have drawn, and each expert-parallel rank draws its own
tokens' noise without any communication (routing happens on the token's own rank).
Activation recompute: a training forward run without grad (megatron's checkpointed first
forward) keeps its choice; the recomputation inside the backward reuses it (first in, first
out, as megatron's own REPLAY_BACKWARD does), so the recomputed routing is the original.
"""

from __future__ import annotations

import weakref
from collections import deque

import torch

_MIX = 1_000_003
_SEED_BITS = (1 << 63) - 1


def gumbel_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log U)``, U uniform in (0, 1), float32."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-7)))


def gumbel_topk_indices(scores: torch.Tensor, topk: int, noise: torch.Tensor,
                        log_scores: bool) -> torch.Tensor:
    """[T, topk] expert ids: column 0 the argmax of ``scores`` [T, E], columns 1.. the top
    k-1 of (scores or log scores) + ``noise`` [T, E] among the other experts."""
    first = scores.argmax(dim=1, keepdim=True)  # [T, 1]
    keys = (scores.float().clamp(min=1e-30).log() if log_scores else scores.float()) + noise
    keys = keys.scatter(1, first, float("-inf"))
    rest = keys.topk(topk - 1, dim=1).indices  # [T, k-1]
    return torch.cat([first, rest], dim=1)


def noise_seed(*numbers: int) -> int:
    """One 63-bit generator seed from a tuple of non-negative ints."""
    seed = 0
    for number in numbers:
        seed = (seed * _MIX + int(number) + 1) & _SEED_BITS
    return seed


def _inside_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # the test ltdr/router.py uses too


def _data_rank(config) -> int:
    """This rank's index among ranks that route different tokens."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    if getattr(config, "sequence_parallel", False):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = rank * tp + parallel_state.get_tensor_model_parallel_rank()
    return rank


class GumbelSecondExpert:
    """The top-k selection megatron's router asks its ``router_replay`` slot for
    (``get_replay_topk``; mcore_compat.install_topk_selection puts it there)."""

    def __init__(self, router, seed: int):
        if router.config.moe_router_score_function != "softmax":
            raise ValueError("--moe-router-gumbel-second-expert needs the softmax score "
                             f"function, not {router.config.moe_router_score_function!r}")
        self._router = weakref.ref(router)
        self.seed = int(seed)
        self.log_scores = bool(router.config.moe_router_pre_softmax)
        self.layer_number = None  # megatron 0.19 sets it; the router's is read otherwise
        self.step = 0
        self.draws = 0  # noisy forwards since the step began
        self._recompute = deque()  # choices of no-grad training forwards, oldest first
        self.last_indices = None  # [T, k] of the last noisy forward (tests)

    def begin_step(self, step: int) -> None:
        self.step, self.draws = int(step), 0
        self._recompute.clear()

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        router = self._router()
        if router is None or not router.training or topk < 2:
            return default_compute_topk(scores, topk, num_groups, group_topk)
        if group_topk:
            raise ValueError("--moe-router-gumbel-second-expert does not support group-limited "
                             "routing (moe_router_group_topk)")
        if _inside_backward() and self._recompute:
            indices = self._recompute.popleft()
        else:
            indices = self._draw(router, scores, topk)
            if not torch.is_grad_enabled():
                self._recompute.append(indices)
        return scores.gather(1, indices), indices

    def _draw(self, router, scores: torch.Tensor, topk: int) -> torch.Tensor:
        layer = router.layer_number if self.layer_number is None else self.layer_number
        seed = noise_seed(self.seed, layer or 0, _data_rank(router.config), self.step,
                          self.draws)
        self.draws += 1
        generator = torch.Generator(device=scores.device).manual_seed(seed)
        noise = gumbel_noise(scores.shape, generator, scores.device)
        indices = gumbel_topk_indices(scores, topk, noise, self.log_scores)
        self.last_indices = indices
        return indices
