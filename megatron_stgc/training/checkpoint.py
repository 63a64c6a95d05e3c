"""Distributed checkpoints with megatron-core dist_checkpointing.

Layout under ``--save``::

    iter_0000010/                      one dist_checkpointing directory per save
    latest_checkpointed_iteration.txt  the newest complete iteration

A checkpoint holds the model's and the optimizer's sharded state dicts, the LR
scheduler state, the data
position (iteration, consumed samples) and every rank's RNG states (CPU,
CUDA and megatron's model-parallel RNG tracker). It is written to
``iter_XXXXXXX.tmp-<stamp>`` and published with an atomic rename by rank 0
after every rank has finished; the tracker file is replaced atomically after
that. A crash mid-save therefore never leaves a half-written checkpoint
behind a tracker entry. A staging directory left by a crashed save is
deleted by the next save; with ``keep_last`` only the newest K published
checkpoints are kept (older ones are deleted after the tracker moved on).

Another layout: the weights reshard (eval and export load an EP=2 checkpoint into one
process). The optimizer state does not reshard across an expert-parallel change, with or
without the distributed optimizer: megatron-core splits the optimizer per parallel group
(a ChainedOptimizer of a dense and an expert part when the expert data-parallel group
differs from the dense one), so EP 2 x DP 1 saves "chained_0." / "chained_1." tensors that
an EP 1 x DP 2 run does not ask for (tests/test_checkpoint_reshard.py, 0.16.1 and 0.19.2).
An EP change that keeps the split (EP 2 -> 4 on 4 ranks, plain optimizer) passes the key
check; whether its optimizer state then maps correctly is not tested.
"fully_reshardable", megatron-core's per-parameter format for the distributed optimizer,
gathers through CUDA and fails on CPU; it would not change the split either. A load that
would hit this stops with a CheckpointLayoutError that says to change the layout with
``--no-load-optim`` (weights, iteration, data position; a fresh optimizer). The
distributed optimizer's state is saved "dp_reshardable": it reshards across
data-parallel sizes at a fixed EP.
``load_optim=False`` / ``load_rng=False`` are --no-load-optim / --no-load-rng; --finetune
loads the weights only (training/train.py, resume_or_start).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

TRACKER_FILE = "latest_checkpointed_iteration.txt"
_PUBLISHED = re.compile(r"^iter_(\d{7})$")
_LEFTOVER = re.compile(r"^iter_\d{7}\.(tmp|replaced)-\d+$")
FORMAT_VERSION = 1
# The distributed optimizer's state format; "dp_reshardable" reshards across data-parallel
# sizes (megatron-core's DistributedOptimizer.sharded_state_dict); "fully_reshardable" needs
# CUDA (tried on CPU, 0.16.1 and 0.19.2) and no format survives an EP change (docstring).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainProgress:
    """Where training stands: completed steps and samples consumed from the data set."""

    iteration: int = 0
    consumed_samples: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The iteration in ``root``'s tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(f"{path}: expected an iteration number, found {text!r}") from None


def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, f".{TRACKER_FILE}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER_FILE))


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, scheduler, progress: TrainProgress,
                   is_loading: bool, with_rng: bool = True,
                   data_state: Optional[dict] = None, with_optimizer: bool = True) -> dict:
    """The whole state as one sharded state dict (model, optimizer, scheduler, RNG, data).

    data_state: this rank's data-set state (bad-sample counters, see
    LlavaSFTDataset.data_state), one object per global rank like the RNG states."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model_state = model[0].module.sharded_state_dict()
    state = {
        "model": model_state,
        "progress": {"iteration": progress.iteration,
                     "consumed_samples": progress.consumed_samples},
        "format_version": FORMAT_VERSION,
        "world_size": world,
    }
    if with_optimizer:  # without: --no-load-optim (optimizer and scheduler start fresh)
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        # one RNG snapshot per global rank
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,),
                                           replica_id=0)
    state["has_data_state"] = data_state is not None
    if data_state is not None:
        state["data_state"] = ShardedObject("data_state", data_state, (world,), (rank,),
                                            replica_id=0)
    return state


def save_checkpoint(root: str, model, optimizer, scheduler, progress: TrainProgress,
                    keep_last: Optional[int] = None, data_state: Optional[dict] = None) -> str:
    """Save collectively (every rank calls it); returns the published directory.

    keep_last: after publishing, delete all but the newest ``keep_last`` checkpoints.
    data_state: this rank's data-set state (every rank passes one, or none does).
    """
    rank = dist.get_rank()
    final = checkpoint_dir(root, progress.iteration)
    from megatron_stgc.parallel import collective_device

    stamp = torch.tensor([int(time.time() * 1000)], dtype=torch.long, device=collective_device())
    dist.broadcast(stamp, src=0)
    staging = f"{final}.tmp-{int(stamp.item())}"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        remove_leftovers(root)
        os.makedirs(staging, exist_ok=False)
    dist.barrier()
    state = _sharded_state(model, optimizer, scheduler, progress, is_loading=False,
                           data_state=data_state)
    dist_checkpointing.save(state, staging)
    dist.barrier()
    if rank == 0:
        _publish(staging, final)
        _write_tracker(root, progress.iteration)
        if keep_last is not None:
            prune_checkpoints(root, keep_last, progress.iteration)
    dist.barrier()
    return final


def published_iterations(root: str) -> list[int]:
    """Iterations of the published ``iter_XXXXXXX`` directories under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_PUBLISHED.match, os.listdir(root)) if m)


def remove_leftovers(root: str) -> list[str]:
    """Delete staging (``.tmp-``) and moved-aside (``.replaced-``) directories that a
    crashed save left behind; returns their names. Call only while no save runs."""
    removed = []
    for name in sorted(os.listdir(root)):
        final = os.path.join(root, name.split(".")[0])
        if ".replaced-" in name and _LEFTOVER.match(name) and not os.path.exists(final):
            # the crash hit _publish between moving the old copy aside and moving the
            # new one in: the old copy is complete, put it back
            os.replace(os.path.join(root, name), final)
            continue
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def prune_checkpoints(root: str, keep_last: int, current: int) -> list[int]:
    """Delete published checkpoints older than the newest ``keep_last`` up to ``current``
    (the one the tracker names); returns the deleted iterations. Checkpoints newer
    than ``current`` (from an abandoned run) are left alone."""
    older = [it for it in published_iterations(root) if it <= current]
    doomed = older[:-keep_last] if keep_last > 0 else older
    for iteration in doomed:
        shutil.rmtree(checkpoint_dir(root, iteration))
    return doomed


def _publish(staging: str, final: str) -> None:
    """Atomically move ``staging`` to ``final``; an older copy of ``final`` is
    moved aside first and deleted only after the new one is in place."""
    previous = None
    if os.path.exists(final):
        previous = f"{final}.replaced-{int(time.time() * 1000)}"
        os.replace(final, previous)
    os.replace(staging, final)
    if previous is not None:
        shutil.rmtree(previous)


def _materialize_distributed_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer's torch Adam its (zero) state before loading.

    megatron-core 0.16's DistributedOptimizer.sharded_state_dict(is_loading=True)
    reads the inner optimizer's per-parameter "step" first; torch's Adam creates
    its state lazily at the first step, so a fresh optimizer (torch fallback,
    no apex/TE) has none. The zeros written here are all overwritten by the load.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(sub, DistributedOptimizer) or inner is None:
            continue
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own, correct Adam "step" tensor after a load.

    With the torch-optimizer fallback (no apex/TE) megatron-core 0.16's
    DistributedOptimizer (a) restores the saved step into the inner param
    groups but then overwrites each parameter's state "step" with the value of
    the load template (a non-persistent entry of its param state), and (b)
    shares one step tensor object between parameters, which torch's Adam
    increments in place once per parameter. Both break the bias correction
    after a resume; the param-group step is the saved one.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param, {})
                if not torch.is_tensor(state.get("step")):
                    continue
                if "step" in group:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
                else:
                    state["step"] = state["step"].clone()


def _checkpoint_path(root: str, iteration: Optional[int]) -> str:
    """The directory of the tracker's (or ``iteration``'s) checkpoint under ``root``."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise FileNotFoundError(f"--load {root}: no {TRACKER_FILE}; nothing to resume from")
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        # a save of the same iteration crashed inside _publish: the old copy is complete
        moved = sorted(name for name in os.listdir(root)
                       if name.startswith(os.path.basename(path) + ".replaced-"))
        path = os.path.join(root, moved[-1]) if moved else path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load {root}: checkpoint directory {path} is missing")
    return path


class CheckpointLayoutError(RuntimeError):
    """The checkpoint's optimizer state was saved for another parallel layout."""


def _check_optimizer_layout(root: str, path: str, optimizer_template) -> None:
    """Every optimizer tensor this run asks for must be in the checkpoint (same on every
    rank: the metadata is global). Else megatron-core would fail deep in torch's planner
    with a KeyError listing every saved key."""
    saved = set(dist_checkpointing.load_tensors_metadata(path))
    needed = {item.key for item in nested_values(optimizer_template)
              if isinstance(item, ShardedTensor)}
    missing = sorted(needed - saved)
    if not missing:
        return
    raise CheckpointLayoutError(
        f"--load {root}: the optimizer state in {path} was saved for another parallel layout "
        "or optimizer configuration (--use-distributed-optimizer, --bf16); "
        f"{len(missing)} of the {len(needed)} optimizer tensors this run needs are not in it "
        f"(e.g. {missing[0]!r}). megatron-core reshards the optimizer state across data-"
        "parallel sizes only, not across an --expert-model-parallel-size (or "
        "--tensor-model-parallel-size) change. Resume at the saved layout and optimizer "
        "settings, or load the "
        "weights, iteration and data position with a fresh optimizer: --no-load-optim "
        "(docs/CHECKPOINTS.md)")


def _check_format(path: str, saved_version: int) -> None:
    if saved_version != FORMAT_VERSION:
        raise RuntimeError(f"--load {path}: checkpoint format {saved_version}, "
                           f"this code reads {FORMAT_VERSION}")


def load_checkpoint(root: str, model, optimizer, scheduler,
                    iteration: Optional[int] = None, restore_data_state=None,
                    load_optim: bool = True, load_rng: bool = True) -> TrainProgress:
    """Load the tracker's (or ``iteration``'s) checkpoint into model, optimizer,
    scheduler and RNG states collectively; returns the saved progress.

    load_optim=False (--no-load-optim): the optimizer and scheduler keep their fresh state;
    load_rng=False (--no-load-rng): the RNG states stay as they are.

    restore_data_state: called with this rank's saved data-set state, when the checkpoint
    has one and the world size is the same (else the data-set counters start fresh).
    Raises FileNotFoundError naming --load when there is nothing to load.
    """
    path = _checkpoint_path(root, iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    saved_world = common.get("world_size")
    same_world = saved_world == dist.get_world_size()
    if not same_world and dist.get_rank() == 0:
        print(f"--load {path}: saved with world size {saved_world}, running with "
              f"{dist.get_world_size()}; model/optimizer/scheduler/data position are "
              "resharded, RNG states and bad-sample counters start fresh", flush=True)
    with_data = bool(common.get("has_data_state")) and same_world \
        and restore_data_state is not None
    with_rng = same_world and load_rng
    if load_optim:
        _materialize_distributed_adam_state(optimizer)
    template = _sharded_state(model, optimizer, scheduler, TrainProgress(), is_loading=True,
                              with_rng=with_rng, data_state={} if with_data else None,
                              with_optimizer=load_optim)
    if load_optim:
        _check_optimizer_layout(root, path, template["optimizer"])
    state = dist_checkpointing.load(template, path)
    _check_format(path, state["format_version"])
    with torch.no_grad():  # loading writes into parameters in place
        model[0].module.load_state_dict(state["model"])
        if load_optim:
            optimizer.load_state_dict(state["optimizer"])
    if load_optim:
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(state["scheduler"])
    if with_rng:
        _set_rng_state(state["rng_state"])
    if with_data:
        restore_data_state(state["data_state"])
    return TrainProgress(**state["progress"])


def load_model_weights(root: str, model, iteration: Optional[int] = None) -> TrainProgress:
    """Only the model's weights (and the saved progress) of the tracker's checkpoint.

    For eval and export: no optimizer, scheduler or RNG state is read, so any saved
    parallel layout loads (an EP=2 MoE's experts into one process, say); the full load
    would also have to map the optimizer's layout, which differs between EP sizes.
    """
    return load_module_weights(root, model[0].module, iteration)


def load_module_weights(root: str, module: torch.nn.Module,
                        iteration: Optional[int] = None) -> TrainProgress:
    """``load_model_weights`` into a bare model (no DDP wrapper): what eval builds."""
    path = _checkpoint_path(root, iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    _check_format(path, common["format_version"])
    state = dist_checkpointing.load({"model": module.sharded_state_dict()}, path)
    with torch.no_grad():  # loading writes into parameters in place
        module.load_state_dict(state["model"])
    return TrainProgress(**common["progress"])
