"""Multi-process test helpers: real gloo ranks, tiny GPT MoE models, identical weights.

* ``run_on_ranks(fn, world_size, *args)`` starts ``world_size`` processes
  (torch.multiprocessing, "spawn"), gives each a gloo process group with the
  CPU bridge installed, calls ``fn(rank, world_size, *args)`` and returns the
  per-rank results (any picklable value, tensors included). A failure on any
  rank raises ``RankFailed`` carrying that rank's traceback. ``fn`` must be a
  module-level function (it is pickled by name).
* ``tiny_config(...)`` is a RunConfig for a tiny GPT with MoE layers.
* ``build_tiny(config, ...)`` initialises megatron-core's parallel state for
  the config and builds model + DDP + optimizer + scheduler in-process.
* ``save_full_state(model, path)`` / ``load_full_state(model, path)`` move one
  set of weights between expert layouts: the file uses global expert ids, and
  each rank loads only its local experts.
* ``synthetic_global_batch`` and ``rank_micro_batches`` give every layout the
  same global batch, split as megatron-core splits it (contiguous DP slices).
"""

from __future__ import annotations

import os
import re
import tempfile
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_stgc import cpu_bridge

cpu_bridge.install()

from megatron.core import parallel_state  # noqa: E402

from megatron_stgc.config import RunConfig, config_from_flat, fill_defaults  # noqa: E402
from megatron_stgc.parallel import free_port  # noqa: E402,F401  (re-exported)

TINY_VOCAB = 128


class RankFailed(RuntimeError):
    pass


def _rank_main(rank: int, world_size: int, port: int, result_dir: str, fn: Callable,
               args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cpu_bridge.install()
    outcome: dict[str, Any]
    try:
        # the parent holds the store's server (bound to port 0, so no other process can take
        # the port between choosing and binding it)
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        outcome = {"result": fn(rank, world_size, *args)}
    except BaseException:  # report every failure to the parent, with its traceback
        outcome = {"error": traceback.format_exc()}
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(outcome, os.path.join(result_dir, f"rank{rank}.pt"))


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 600) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; per-rank results."""
    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.get_context("spawn")
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        port = server.port
        processes = [context.Process(target=_rank_main,
                                     args=(rank, world_size, port, result_dir, fn, args))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout)
        for process in processes:
            if process.is_alive():
                process.kill()
                raise RankFailed(f"rank {processes.index(process)} timed out after {timeout}s")
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: exited with code {processes[rank].exitcode} "
                              "and no result")
                continue
            outcome = torch.load(path, weights_only=False)
            if "error" in outcome:
                errors.append(f"rank {rank}:\n{outcome['error']}")
            results.append(outcome.get("result"))
        if errors:
            raise RankFailed("\n".join(errors))
        return results


def tiny_config(expert_parallel: int = 1, dispatcher: str = "alltoall", **overrides) -> RunConfig:
    """A tiny GPT MoE RunConfig: 2 layers (MoE on layer 1 unless moe_layer_freq=1),
    hidden 32, 4 experts, top-2, seq 16, aux-loss coeff 0 (exact layout tests).
    ``overrides`` are flat flag names (``global_batch_size=8``)."""
    values = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, moe_ffn_hidden_size=48,
                  num_attention_heads=4, seq_length=16, num_experts=4, moe_router_topk=2,
                  moe_layer_freq=1, moe_aux_loss_coeff=0.0, moe_token_dispatcher_type=dispatcher,
                  expert_model_parallel_size=expert_parallel, micro_batch_size=2,
                  global_batch_size=4, train_iters=10, lr=1e-3, min_lr=1e-4,
                  lr_warmup_fraction=0.0, seed=1234, vocab_size=TINY_VOCAB)
    values.update(overrides)
    return fill_defaults(config_from_flat(values))


def build_tiny(config: RunConfig, vocab_size: int = TINY_VOCAB):
    """Parallel state for ``config`` + model/DDP/optimizer/scheduler (``TrainingObjects``).

    Call inside a rank started by ``run_on_ranks`` (the process group exists).
    """
    from megatron_stgc import parallel
    from megatron_stgc.training.setup import build_model_and_optimizer
    from megatron_stgc.training.train import seed_everything

    parallel.initialize_model_parallel(config.parallel.tensor_model_parallel_size,
                                       config.parallel.expert_model_parallel_size,
                                       config.training.seed,
                                       config.parallel.expert_tensor_parallel_size)
    seed_everything(config.training.seed)
    return build_model_and_optimizer(config, vocab_size)


_LOCAL_EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def _expert_offset(model: torch.nn.Module) -> int:
    return parallel_state.get_expert_model_parallel_rank() * _num_local_experts(model)


def _num_local_experts(model: torch.nn.Module) -> int:
    from megatron.core.transformer.moe.experts import SequentialMLP

    for module in model.modules():
        if isinstance(module, SequentialMLP):
            return module.num_local_experts
    return 0


def global_name(name: str, expert_offset: int) -> str:
    """Parameter name with the local expert index replaced by the global expert id."""
    match = _LOCAL_EXPERT.match(name)
    if match is None:
        return name
    return f"{match.group(1)}{int(match.group(2)) + expert_offset}{match.group(3)}"


def named_global_tensors(model: torch.nn.Module, what: str = "param") -> dict[str, torch.Tensor]:
    """{global name: tensor} for this rank's parameters ("param") or DDP main grads ("grad")."""
    module = getattr(model, "module", model)
    offset = _expert_offset(module)
    out = {}
    for name, param in module.named_parameters():
        tensor = param.detach() if what == "param" else param.main_grad
        out[global_name(name, offset)] = tensor.detach().clone().float()
    return out


def save_full_state(model: torch.nn.Module, path: str) -> None:
    """Save every parameter with global expert ids (build with EP=1, TP=1)."""
    torch.save(named_global_tensors(model, "param"), path)


def load_full_state(model: torch.nn.Module, path: str) -> None:
    """Copy weights saved by ``save_full_state`` into this rank's (possibly EP-split) model."""
    full = torch.load(path)
    module = getattr(model, "module", model)
    offset = _expert_offset(module)
    with torch.no_grad():
        for name, param in module.named_parameters():
            key = global_name(name, offset)
            if key not in full:
                raise KeyError(f"{key} (local {name}) is not in {path}")
            param.copy_(full[key].to(param.dtype))


def synthetic_global_batch(global_batch_size: int, seq_length: int, vocab_size: int = TINY_VOCAB,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproducible global batch of random tokens (loss on every other token)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (global_batch_size, seq_length + 1), generator=generator)
    loss_mask = torch.ones(global_batch_size, seq_length)
    loss_mask[:, ::2] = 0.0
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(seq_length).expand(global_batch_size, -1).contiguous()}


def rank_micro_batches(global_batch: dict[str, torch.Tensor], micro_batch_size: int,
                       dp_rank: Optional[int] = None, dp_size: Optional[int] = None) -> list[dict]:
    """This DP rank's contiguous slice of the global batch, cut into micro-batches."""
    if dp_rank is None:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
    total = next(iter(global_batch.values())).shape[0]
    per_rank = total // dp_size
    start = dp_rank * per_rank
    return [{key: value[i:i + micro_batch_size] for key, value in global_batch.items()}
            for i in range(start, start + per_rank, micro_batch_size)]
