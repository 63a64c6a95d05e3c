"""The expert mean gradient G each token's gradient is compared with, per mean source.

The paper compares g_n with the expert's mean gradient over "a batch". With expert data
parallelism and gradient accumulation that batch is spread over replicas and
micro-batches; every source below estimates it differently (--stgc-mean-source):

  micro-batch       sum over this micro-batch's tokens on every expert-DP replica:
                    one fp32 all-reduce of all local experts' gradients per micro-batch.
  micro-batch-bf16  the same, with the all-reduce in bf16 (half the bytes; the sum
                    loses precision, the cosine only its direction's precision).
  previous-step     the previous optimizer step's expert gradient, as megatron's DDP
                    reduced it over expert-DP and all micro-batches (step_grads.py):
                    no communication; the weights have moved by one update since.
  local             this micro-batch's tokens on this replica only: no communication.

A cosine does not depend on G's scale, so sums and means (and DDP's averaging) give the
same cosines.

Overlap (micro-batch sources, --stgc-overlap-mean-reduce, on by default): when autograd
hands each local expert linear's weight gradient to the capture hooks (capture.py), its
all-reduce starts at once, asynchronously, while the rest of the experts' backward runs;
the expert side waits only when the cosines need G (``EarlyMeanReduce``). Every rank
issues these in autograd's order over the same graph, hence in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_stgc.stgc import conflict_math
from megatron_stgc.stgc.conflict_math import LinearGrads

# (G_W [out, in], G_b [out] or None) for one linear of one expert.
LinearMean = tuple[torch.Tensor, torch.Tensor | None]


def group_size(group) -> int:
    """Size of a process group; 1 for None (no group)."""
    return 1 if group is None else dist.get_world_size(group)


def local_grad_sums(experts: list[list[LinearGrads]]) -> list[list[LinearMean]]:
    """G = sum_n g_n of this replica's rows, per local expert per linear (fp32)."""
    return [[(conflict_math.weight_grad_sum(lin), conflict_math.bias_grad_sum(lin))
             for lin in linears] for linears in experts]


def all_reduce_sums(sums: list[list[LinearMean]], group,
                    dtype: torch.dtype = torch.float32) -> list[list[LinearMean]]:
    """Sum every G over ``group`` in one flat all-reduce carried in ``dtype``; fp32 out."""
    if group_size(group) <= 1:
        return sums
    pieces = [t for linears in sums for pair in linears for t in pair if t is not None]
    flat = torch.cat([t.reshape(-1) for t in pieces]).to(dtype)
    dist.all_reduce(flat, group=group)
    reduced = iter(torch.split(flat.float(), [t.numel() for t in pieces]))
    return [[(next(reduced).view_as(g_w), None if g_b is None else next(reduced))
             for g_w, g_b in linears] for linears in sums]


def reduce_dtype(source: str) -> torch.dtype:
    return torch.bfloat16 if source == "micro-batch-bf16" else torch.float32


def expert_means(source: str, experts: list[list[LinearGrads]], expert_dp_group,
                 previous: list[list[LinearMean]] | None,
                 early: EarlyMeanReduce | None = None) -> list[list[LinearMean]]:
    """G per local expert per linear for ``source`` (see the module docstring).

    previous: the previous step's reduced gradients (previous-step only); None means
    there is none yet, and the caller has already switched such a step to micro-batch.
    early: the all-reduces already started by the capture hooks (micro-batch sources).
    """
    if source == "previous-step":
        if previous is None:
            raise ValueError("previous-step mean source without a previous step's gradient")
        return previous
    if early is not None and source != "local":
        means = early.means(experts)
        if means is not None:
            return means
    sums = local_grad_sums(experts)
    if source == "local":
        return sums
    return all_reduce_sums(sums, expert_dp_group, reduce_dtype(source))


class EarlyMeanReduce:
    """Asynchronous all-reduces of one backward's expert linear gradients, started as
    autograd produces them; keys are (local expert slot, linear name, "weight_grad" or
    "bias_grad")."""

    def __init__(self, group, dtype: torch.dtype, linear_names: tuple[str, ...]):
        self.group, self.dtype, self.linear_names = group, dtype, linear_names
        self.pending: dict[tuple[int, str, str], tuple[torch.Tensor, object]] = {}
        self.closed = False
        self.used = False  # True once means() returned the early-reduced G

    def start(self, key: tuple[int, str, str], grad: torch.Tensor) -> None:
        if self.closed or key[1] not in self.linear_names:
            return
        buffer = grad.detach().to(self.dtype, copy=True)
        self.pending[key] = (buffer, dist.all_reduce(buffer, group=self.group, async_op=True))

    def means(self, experts: list[list[LinearGrads]]) -> list[list[LinearMean]] | None:
        """The reduced G per local expert per linear (fp32), or None when a gradient never
        came through the hooks (then nothing is used, every started reduce is waited for,
        and the caller reduces synchronously)."""
        self.closed = True
        for _, work in self.pending.values():
            work.wait()
        reduced = {key: buffer for key, (buffer, _) in self.pending.items()}
        self.pending = {}
        means = []
        for slot, linears in enumerate(experts):
            row = []
            for name, lin in zip(self.linear_names, linears):
                weight = reduced.get((slot, name, "weight_grad"))
                bias = reduced.get((slot, name, "bias_grad"))
                if weight is None or (lin.bias_coef is not None and bias is None):
                    return None
                row.append((weight.float(), None if lin.bias_coef is None else bias.float()))
            means.append(row)
        self.used = True
        return means
