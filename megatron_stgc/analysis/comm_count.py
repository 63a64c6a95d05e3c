"""Count what goes through torch.distributed: bytes per collective kind and process group.

``CollectiveCounter`` is a ``TorchDispatchMode``: an eager torch.distributed collective
(megatron's dispatcher, DDP's gradient reduction, coalesced or not, this package's; called
through ``torch.distributed.X`` or a reference taken at import time; in forward or in
backward) reaches the dispatcher as a ``c10d::*`` op, where the counter reads its tensors
and its process group. Nothing is computed from model shapes. Counted ops: the keys of
``_KINDS``; not counted: reduce/gather/scatter to one root, and functional collectives
(``_c10d_functional``, used by DTensor and torch.compile), none of which a train step here
issues.

Per call and rank it records two numbers:
  payload  the bytes the rank hands to the collective: the tensor(s) of an all-reduce or
           broadcast, the input of an all-gather or reduce-scatter, the rows of an
           all-to-all addressed to *other* ranks (the rank's own split stays local);
  wire     the bytes a rank sends with the textbook algorithm for n ranks: ring all-reduce
           2(n-1)/n x payload, ring all-gather (n-1) x payload, ring reduce-scatter
           (n-1)/n x payload, all-to-all = payload, broadcast = payload on the root only,
           send = payload, recv = 0.
A group of one sends nothing on the wire (payload is still counted: the call happened).
NCCL picks its own algorithms (tree, NVLS); ``wire`` is the ring figure, not a trace.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_KINDS = {
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "alltoall_base_": "all_to_all",
    "alltoall_": "all_to_all",
    "_allgather_base_": "all_gather",
    "allgather_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "broadcast_": "broadcast",
    "send": "send",
    "recv_": "recv",
    "barrier": "barrier",
}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _process_group(args):
    for arg in args:
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg):
            return dist.ProcessGroup.unbox(arg)
    return None


def _all_to_all_sent(output, inputs, split_sizes, rank: int, size: int) -> int:
    """Bytes of an all-to-all's input addressed to other ranks."""
    if isinstance(inputs, (list, tuple)):  # alltoall_: one input tensor per destination
        return sum(_nbytes(t) for i, t in enumerate(inputs) if i != rank)
    total = _nbytes(inputs)
    if not split_sizes:
        return total * (size - 1) // size
    row_bytes = total // max(sum(split_sizes), 1)
    return total - row_bytes * split_sizes[rank]


def payload_and_wire(kind: str, op: str, args, group_size: int, group_rank: int) -> tuple[int, int]:
    """(payload, wire) bytes of one call on one rank; see the module docstring."""
    n = group_size
    if kind == "all_reduce":
        payload = _nbytes(args[0])
        return payload, payload * 2 * (n - 1) // n
    if kind == "all_to_all":
        if op == "alltoall_base_":  # (output, input, group, output_splits, input_splits)
            sent = _all_to_all_sent(args[0], args[1], list(args[4]), group_rank, n)
        else:  # (outputs, inputs, group)
            sent = _all_to_all_sent(args[0], args[1], None, group_rank, n)
        return sent, sent
    if kind == "all_gather":
        payload = _nbytes(args[1])
        return payload, payload * (n - 1)
    if kind == "reduce_scatter":
        payload = _nbytes(args[1])
        return payload, payload * (n - 1) // n
    if kind == "broadcast":  # (tensors, group, root_rank, root_tensor, ...)
        payload = _nbytes(args[0])
        return payload, payload if n > 1 and group_rank == args[2] else 0
    if kind == "send":
        payload = _nbytes(args[0])
        return payload, payload if n > 1 else 0
    if kind == "recv":
        return _nbytes(args[0]), 0
    return 0, 0


@dataclass
class Tally:
    calls: int = 0
    payload: int = 0
    wire: int = 0


class CollectiveCounter(TorchDispatchMode):
    """``with CollectiveCounter(names) as counter: ...`` then ``counter.rows()``.

    names: {ProcessGroup: label} (see ``megatron_group_names``); the default group is
    ``world``, any other group ``ranks[0, 2]`` (its global ranks).
    """

    def __init__(self, names: dict | None = None):
        super().__init__()
        self.names = dict(names or {})
        self.tallies: dict[tuple[str, str], Tally] = defaultdict(Tally)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            op = func._schema.name.split("::")[-1]
            kind = _KINDS.get(op)
            if kind is not None:
                self._record(kind, op, args)
        return func(*args, **(kwargs or {}))

    def _record(self, kind: str, op: str, args) -> None:
        group = _process_group(args)
        size = group.size() if group is not None else 1
        rank = group.rank() if group is not None else 0
        payload, wire = payload_and_wire(kind, op, args, size, rank)
        tally = self.tallies[(kind, self._label(group))]
        tally.calls += 1
        tally.payload += payload
        tally.wire += wire

    def _label(self, group) -> str:
        if group is None:
            return "?"
        for known, label in self.names.items():
            if known is group:
                return label
        if group is dist.group.WORLD:
            return "world"
        return f"ranks{dist.get_process_group_ranks(group)}"

    def rows(self) -> list[dict]:
        """One dict per (kind, group): calls, payload and wire bytes, sorted by wire bytes."""
        out = [{"kind": kind, "group": group, "calls": t.calls, "payload": t.payload,
                "wire": t.wire} for (kind, group), t in self.tallies.items()]
        return sorted(out, key=lambda r: (-r["wire"], r["kind"], r["group"]))

    def total(self, kind: str | None = None, group: str | None = None, key: str = "wire") -> int:
        return sum(getattr(t, key) for (k, g), t in self.tallies.items()
                   if kind in (None, k) and group in (None, g))


def megatron_group_names() -> dict:
    """{ProcessGroup: label} for megatron's parallel_state groups that exist.

    megatron keeps separate group objects for the same ranks (DP with and without CP, EP
    and TP x EP), so each gets its own label; where two getters return one object (the
    "partial" groups with one distributed-optimizer instance) the first label wins. DDP
    reduces dense gradients over ``dp_cp`` and expert gradients over ``expert_dp``.
    """
    from megatron.core import parallel_state as ps

    getters = [
        ("dp_cp", lambda: ps.get_data_parallel_group(with_context_parallel=True)),
        ("dp_cp", lambda: ps.get_data_parallel_group(with_context_parallel=True,
                                                     partial_data_parallel=True)),
        ("dp", ps.get_data_parallel_group),
        ("expert_dp", ps.get_expert_data_parallel_group),
        ("expert_dp", lambda: ps.get_expert_data_parallel_group(
            partial_expert_data_parallel=True)),
        ("ep", ps.get_expert_model_parallel_group),
        ("tp_ep", ps.get_expert_tensor_and_model_parallel_group),
        ("tp_dp_cp", lambda: ps.get_tensor_and_data_parallel_group(with_context_parallel=True)),
        ("tp", ps.get_tensor_model_parallel_group),
        ("pp", ps.get_pipeline_model_parallel_group),
        ("mp", ps.get_model_parallel_group),
    ]
    names = {}
    for label, getter in getters:
        try:
            group = getter()
        except (AssertionError, AttributeError, RuntimeError, TypeError):
            continue
        if group is not None and not any(group is known for known in names):
            names[group] = label
    return names
