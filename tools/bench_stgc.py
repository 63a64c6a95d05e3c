#!/usr/bin/env python
"""Benchmark STGC against plain megatron-core MoE: whole training steps, one run.

Runs on `--ep` gloo processes (expert parallel), builds every variant with the
same initial weights, and interleaves them over `--reps` repetitions of a full
training step (forward, backward, optimizer) on the same synthetic batches:

  plain         megatron-core MoELayer (no STGC)
  single-pass   STGC, exact cosines, one backward            (this project's default)
  two-pass      STGC, the paper's recipe: identify backward + training step
  fc2           STGC, single pass, cosine over the experts' fc2 parameters only
  lowrank-R     STGC, single pass, lowrank estimator of rank R (--stgc-estimator lowrank),
                one variant per rank in --stgc-estimator-rank (comma-separated)

Prints median step-time and peak-memory ratios against plain, and the lowrank
estimator's agreement with the exact conflict flags, and writes them to --output.

Peak memory on CPU: each step starts after malloc_trim(0) with the kernel's
peak-RSS counter reset (/proc/self/clear_refs = 5); peak = VmHWM during the step.
On a GPU (CUDA present: NCCL, one process per GPU): torch.cuda's peak allocated
memory, reset before the step. All variants live in the same processes, so the
reported peak for variant v is
  model state (params + fp32 grads + Adam, identical for all variants)
  + (peak during the step - memory before it)   (activations, STGC captures, temporaries).
Memory held across steps (e.g. captures kept alive after a backward) is not seen by
this difference: the "held after step" column reports memory allocated after the step
minus before it (GPU only).
On a GPU the step time is taken after torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

BASE_VARIANTS = ("plain", "single-pass", "two-pass", "fc2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shape, finishes in under two minutes")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=1408)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--expert-model-parallel-size", type=int, default=2)
    p.add_argument("--stgc-estimator-rank", default="64",
                   help="comma-separated ranks of the lowrank estimator to compare")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--output", default="bench_stgc.txt")
    args = p.parse_args(argv)
    args.lowrank_ranks = [int(r) for r in str(args.stgc_estimator_rank).split(",")]
    args.variants = BASE_VARIANTS + tuple(f"lowrank-{r}" for r in args.lowrank_ranks)
    if args.quick:
        args.hidden_size, args.moe_ffn_hidden_size, args.seq_length = 256, 704, 256
        args.micro_batch_size, args.reps = 2, 3
    return args


# -- memory -----------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> int:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _on_gpu():
        torch.cuda.synchronize()


def _memory_before_step() -> int:
    """Bytes in use now; resets the peak counter."""
    if _on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _reset_peak_rss() * 1024


def _peak_since(before: int) -> int:
    if _on_gpu():
        return torch.cuda.max_memory_allocated() - before
    return _status_kb("VmHWM") * 1024 - before


def _held_since(before: int) -> int:
    return torch.cuda.memory_allocated() - before if _on_gpu() else 0


def _model_state_bytes(model) -> int:
    params = sum(p.numel() for p in model.parameters())
    return params * (4 + 4 + 8)  # fp32 params, fp32 main grads, Adam's two moments


# -- one rank ---------------------------------------------------------------------

def _run_config(args, variant):
    from megatron_stgc.config import RunConfig

    config = RunConfig()
    m = config.model
    m.num_layers, m.hidden_size = args.num_layers, args.hidden_size
    m.ffn_hidden_size = m.moe_ffn_hidden_size = args.moe_ffn_hidden_size
    m.num_attention_heads, m.seq_length = 8, args.seq_length
    m.num_experts, m.moe_router_topk, m.moe_layer_freq = args.num_experts, args.moe_router_topk, 1
    config.parallel.expert_model_parallel_size = args.expert_model_parallel_size
    t = config.training
    t.micro_batch_size = args.micro_batch_size
    t.global_batch_size = args.micro_batch_size * args.expert_model_parallel_size
    t.train_iters, t.lr_warmup_fraction, t.lr = 1000, 0.0, 1e-4
    if variant != "plain":
        config.stgc.enabled = True
        config.stgc.mode = "two-pass" if variant == "two-pass" else "single-pass"
        if variant == "fc2":
            config.stgc.estimator = "fc2"
        if variant.startswith("lowrank-"):
            config.stgc.estimator = "lowrank"
            config.stgc.estimator_rank = int(variant.split("-")[1])
    return config


def _batches(args, vocab, seed, count):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length), generator=gen)
        out.append({
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, dims=1),
            "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
            "position_ids": torch.arange(args.seq_length).expand_as(tokens),
        })
    return out


def _step(objects, variant, batch, args):
    from megatron_stgc.stgc.two_pass import two_pass_train_step
    from megatron_stgc.training.step import train_step

    kwargs = dict(optimizer=objects.optimizer, scheduler=objects.scheduler,
                  micro_batch_size=args.micro_batch_size, seq_length=args.seq_length)
    if variant == "two-pass":
        return two_pass_train_step(train_step, objects.model, iter([batch]), 1, **kwargs)
    return train_step(objects.model, data_iterator=iter([batch]), num_microbatches=1, **kwargs)


def _estimator_agreement(built, variant, batch, args):
    """Same weights, same batch: share of judged pairs whose flag the estimator reproduces."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_stgc.stgc.attached import stgc_layers
    from megatron_stgc.training.forward import gpt_forward_step

    exact, estimate = built["single-pass"], built[variant]
    estimate.unwrapped_model.load_state_dict(exact.unwrapped_model.state_dict())
    flags = {}
    for name, objects in (("exact", exact), ("estimate", estimate)):
        for chunk in objects.model:
            chunk.zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=gpt_forward_step, data_iterator=iter([batch]),
                                    model=objects.model, num_microbatches=1,
                                    seq_length=args.seq_length,
                                    micro_batch_size=args.micro_batch_size, forward_only=False)
        flags[name] = [(l.stgc.last.conflicts, ~torch.isnan(l.stgc.last.cos)) for l in stgc_layers(objects.model)]
    from megatron_stgc.parallel import collective_device

    # same, judged, exact, lowrank, both conflicting
    counts = torch.zeros(5, dtype=torch.float64, device=collective_device())
    for (e_flags, e_judged), (l_flags, _) in zip(flags["exact"], flags["estimate"]):
        counts += torch.stack([((e_flags == l_flags) & e_judged).sum(), e_judged.sum(),
                               e_flags.sum(), l_flags.sum(), (e_flags & l_flags).sum()]
                              ).to(counts)
    dist.all_reduce(counts)
    same, judged, exact_n, lowrank_n, both = counts.tolist()
    return {"agreement": same / judged, "conflict_fraction": exact_n / judged,
            "recall": both / max(exact_n, 1), "precision": both / max(lowrank_n, 1)}


def rank_main(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.expert_model_parallel_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron_stgc import cpu_bridge

    cpu_bridge.install()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_stgc.parallel import initialize_distributed, initialize_model_parallel
    from megatron_stgc.training.setup import build_model_and_optimizer

    initialize_distributed()
    initialize_model_parallel(1, args.expert_model_parallel_size, seed=1234)
    vocab = 1024
    built = {}
    for variant in args.variants:
        torch.manual_seed(1234)
        model_parallel_cuda_manual_seed(1234)
        built[variant] = build_model_and_optimizer(_run_config(args, variant), vocab)
    batches = _batches(args, vocab, seed=100 + rank, count=args.reps + 1)
    times = {v: [] for v in args.variants}
    peaks = {v: [] for v in args.variants}
    held = {v: [] for v in args.variants}
    for rep, batch in enumerate(batches):
        order = args.variants[rep % len(args.variants):] + args.variants[:rep % len(args.variants)]
        for variant in order:
            dist.barrier()
            before = _memory_before_step()
            start = time.perf_counter()
            _step(built[variant], variant, batch, args)
            _sync()
            dist.barrier()
            elapsed = time.perf_counter() - start
            if rep > 0:  # rep 0 warms up every variant
                times[variant].append(elapsed)
                peaks[variant].append(_peak_since(before))
                held[variant].append(_held_since(before))
            if rank == 0:
                print(f"rep {rep} {variant:12s} {elapsed:7.2f}s", flush=True)
    agreement = {v: _estimator_agreement(built, v, batches[0], args)
                 for v in args.variants if v.startswith("lowrank-") or v == "fc2"}
    state = _model_state_bytes(built["plain"].unwrapped_model)
    from megatron_stgc.parallel import collective_device

    summary = torch.tensor([[statistics.median(times[v]), max(peaks[v]), max(held[v])]
                            for v in args.variants], dtype=torch.float64,
                           device=collective_device())
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)  # the slowest / largest rank counts
    summary = summary.cpu()
    if rank == 0:
        _report(args, summary, state, agreement)
    dist.destroy_process_group()


def _report(args, summary, state, agreement):
    base_time, base_peak = float(summary[0, 0]), state + float(summary[0, 1])
    if _on_gpu():
        machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                   f"{args.expert_model_parallel_size} NCCL process(es)")
    else:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.expert_model_parallel_size} gloo processes x 1 thread")
    lines = [
        f"# bench_stgc: {args.num_layers} MoE layers, hidden {args.hidden_size}, expert FFN "
        f"{args.moe_ffn_hidden_size}, {args.num_experts} experts top-{args.moe_router_topk}, "
        f"seq {args.seq_length} x {args.micro_batch_size} per rank, EP={args.expert_model_parallel_size}, "
        f"median of {args.reps} interleaved steps",
        f"# machine: {machine}",
        f"{'plain':12s} {base_time:6.3f}s/step   (peak {base_peak / 2**20:7.1f} MiB)",
    ]
    for i, variant in enumerate(args.variants[1:], start=1):
        time_ratio = float(summary[i, 0]) / base_time
        mem_ratio = (state + float(summary[i, 1])) / base_peak
        line = (f"{variant:12s} {float(summary[i, 0]):6.3f}s/step {time_ratio:5.2f}x time  "
                f"{mem_ratio:5.2f}x memory")
        if _on_gpu():
            line += f"  held after step {float(summary[i, 2]) / 2**20:7.1f} MiB"
        lines.append(line)
    for variant, agree in agreement.items():
        lines.append(f"{variant} vs exact flags: {100 * agree['agreement']:.2f}% of judged pairs "
                     f"agree; {100 * agree['recall']:.1f}% of exact conflicts found, "
                     f"{100 * agree['precision']:.1f}% of its flags right (exact conflict "
                     f"fraction {100 * agree['conflict_fraction']:.1f}%)")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "median_step_s": dict(zip(args.variants, summary[:, 0].tolist())),
                   "agreement": agreement}, f, indent=2)


def main(argv=None):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parse_args(argv)
    from megatron_stgc.parallel import _free_port

    if torch.cuda.is_available() and args.expert_model_parallel_size > torch.cuda.device_count():
        sys.exit(f"--expert-model-parallel-size {args.expert_model_parallel_size} needs that many "
                 f"GPUs (NCCL: one process per GPU); this machine has {torch.cuda.device_count()}")
    mp.spawn(rank_main, args=(args, _free_port()), nprocs=args.expert_model_parallel_size, join=True)


if __name__ == "__main__":
    main()
