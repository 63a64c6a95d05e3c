#!/usr/bin/env python
"""Benchmark STGC against plain megatron-core MoE: whole training steps, one run.

Runs on `--world-size` gloo processes (expert parallel), builds every variant with the
same initial weights, and interleaves them over `--reps` repetitions of a full
training step (forward, backward, optimizer) on the same synthetic batches:

  plain         megatron-core MoELayer (no STGC)
  single-pass   STGC, exact cosines, one backward            (this project's default)
  two-pass      STGC, the paper's recipe: identify backward + training step
  fc2           STGC, single pass, cosine over the experts' fc2 parameters only
  lowrank-R     STGC, single pass, lowrank estimator of rank R (--stgc-estimator lowrank),
                one variant per rank in --stgc-estimator-rank (comma-separated)
  micro-batch-bf16, previous-step, local
                STGC, single pass, exact, with that --stgc-mean-source (single-pass,
                two-pass, fc2 and lowrank use micro-batch)
  single-pass-sync  single-pass with the mean all-reduce issued once the experts' backward
                is done (--stgc-overlap-mean-reduce false) instead of overlapped with it
--variants picks a subset (plain is always run).

Agreement with the step's mean (--agreement-steps N > 0): after the timed steps the
single-pass variant trains N more steps with --stgc-mean-audit (stgc/mean_audit.py): every
mean source's flags and fc2's against the flags from the step's mean gradient (all
micro-batches, all expert-DP replicas); previous-step is judged from the second of them on.

Prints median step-time and peak-memory ratios against plain, and the lowrank
estimator's agreement with the exact conflict flags, and writes them to --output.

Layout: --world-size processes (default: --expert-model-parallel-size), so expert-DP =
world / EP; --micro-batches per step (gradient accumulation). STGC's expert all-reduce only
costs something at expert-DP > 1: e.g. --world-size 4 --expert-model-parallel-size 2
--micro-batches 2.

Communication: after the timed steps, one more step per variant runs under the collective
counter (megatron_stgc/analysis/comm_count.py), which reads every c10d call's tensors and
process group. The report gives rank 0's bytes per step by collective kind and group, STGC's
extra bytes over plain, their ratio to plain's gradient reduction (all-reduce and
reduce-scatter on the DP and expert-DP groups), the same extra predicted from parameter
counts (megatron_stgc/stgc/comm_cost.py), and that formula applied to the paper's
StableLM-1.6B layout.

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
MEAN_SOURCE_VARIANTS = ("micro-batch-bf16", "previous-step", "local")
SYNC_VARIANT = "single-pass-sync"  # single-pass with --stgc-overlap-mean-reduce false


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
    p.add_argument("--world-size", type=int, default=None,
                   help="processes (default: the EP size); expert-DP = world / EP")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per step per rank (gradient accumulation)")
    p.add_argument("--stgc-estimator-rank", default="64",
                   help="comma-separated ranks of the lowrank estimator to compare")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants to run (default: plain, single-pass, two-pass, "
                        "fc2, lowrank-R, micro-batch-bf16, previous-step, local, "
                        "single-pass-sync)")
    p.add_argument("--agreement-steps", type=int, default=3,
                   help="steps of the single-pass variant under --stgc-mean-audit (0: none)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--output", default="bench_stgc.txt")
    args = p.parse_args(argv)
    args.lowrank_ranks = [int(r) for r in str(args.stgc_estimator_rank).split(",")]
    every = (BASE_VARIANTS + tuple(f"lowrank-{r}" for r in args.lowrank_ranks)
             + MEAN_SOURCE_VARIANTS + (SYNC_VARIANT,))
    chosen = every if args.variants is None else tuple(v.strip() for v in args.variants.split(","))
    unknown = [v for v in chosen if v not in every]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {every}")
    args.variants = ("plain", "single-pass") + tuple(v for v in chosen
                                                      if v not in ("plain", "single-pass"))
    args.world_size = args.world_size or args.expert_model_parallel_size
    if args.world_size % args.expert_model_parallel_size:
        p.error(f"--world-size {args.world_size} is not a multiple of "
                f"--expert-model-parallel-size {args.expert_model_parallel_size}")
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
    t.global_batch_size = args.micro_batch_size * args.world_size * args.micro_batches
    t.train_iters, t.lr_warmup_fraction, t.lr = 1000, 0.0, 1e-4
    if variant != "plain":
        config.stgc.enabled = True
        config.stgc.mode = "two-pass" if variant == "two-pass" else "single-pass"
        if variant == "fc2":
            config.stgc.estimator = "fc2"
        if variant.startswith("lowrank-"):
            config.stgc.estimator = "lowrank"
            config.stgc.estimator_rank = int(variant.split("-")[1])
        if variant in MEAN_SOURCE_VARIANTS:
            config.stgc.mean_source = variant
        if variant == SYNC_VARIANT:
            config.stgc.overlap_mean_reduce = False
    return config


def _batches(args, vocab, seed, count):
    """``count`` steps, each a list of --micro-batches micro-batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        step = []
        for _ in range(args.micro_batches):
            tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length),
                                   generator=gen)
            step.append({
                "tokens": tokens,
                "labels": torch.roll(tokens, -1, dims=1),
                "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
                "position_ids": torch.arange(args.seq_length).expand_as(tokens),
            })
        out.append(step)
    return out


def _step(objects, variant, step_batches, args):
    from megatron_stgc.stgc.two_pass import two_pass_train_step
    from megatron_stgc.training.step import train_step
    from megatron_stgc.training.stgc_hooks import after_stgc_step

    kwargs = dict(optimizer=objects.optimizer, scheduler=objects.scheduler,
                  micro_batch_size=args.micro_batch_size, seq_length=args.seq_length)
    count = len(step_batches)
    if variant == "two-pass":
        result = two_pass_train_step(train_step, objects.model, iter(step_batches), count,
                                     **kwargs)
    else:
        result = train_step(objects.model, data_iterator=iter(step_batches),
                            num_microbatches=count, **kwargs)
    after_stgc_step(objects.model, result.update_successful)  # previous-step keeps its copy
    return result


def _count_bytes(built, variant, step_batches, args) -> list[dict]:
    """One step of ``variant`` under the collective counter, from plain's weights (same
    routing, so the dispatcher's all-to-all volumes match): rank-local rows."""
    from megatron_stgc.analysis.comm_count import CollectiveCounter, megatron_group_names

    built[variant].unwrapped_model.load_state_dict(built["plain"].unwrapped_model.state_dict())
    dist.barrier()
    with CollectiveCounter(megatron_group_names()) as counter:
        _step(built[variant], variant, step_batches, args)
    _sync()
    return counter.rows()


def _predicted_stgc_payload(objects, args) -> int:
    """STGC's extra expert-DP payload per step from this rank's parameter counts."""
    from megatron_stgc.stgc.attached import stgc_layers
    from megatron_stgc.stgc.comm_cost import stgc_payload_per_micro_batch

    if args.world_size // args.expert_model_parallel_size < 2:
        return 0
    per_layer = [sum(p.numel() for p in layer.experts.parameters())
                 for layer in stgc_layers(objects.model)]
    return args.micro_batches * stgc_payload_per_micro_batch(per_layer)


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
        get_forward_backward_func()(forward_step_func=gpt_forward_step, data_iterator=iter(batch),
                                    model=objects.model, num_microbatches=len(batch),
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


def _mean_audit(objects, args, vocab, rank) -> dict[str, float]:
    """--agreement-steps training steps under --stgc-mean-audit; its stgc/audit/* metrics."""
    from megatron_stgc.parallel import collective_device
    from megatron_stgc.stgc.attached import stgc_layers
    from megatron_stgc.stgc.mean_audit import collect_audit_metrics
    from megatron_stgc.training.stgc_hooks import start_mean_audit

    if args.agreement_steps <= 0:
        return {}
    audits = start_mean_audit(objects.model)
    for step_batches in _batches(args, vocab, seed=500 + rank, count=args.agreement_steps):
        _step(objects, "single-pass", step_batches, args)
        if rank == 0:
            print("agreement step done", flush=True)
    metrics = collect_audit_metrics(audits, device=collective_device())
    for layer in stgc_layers(objects.model):
        layer.stgc.audit = None
    return metrics


def _mode_table(args, summary, comm_summary, audit) -> list[str]:
    """One row per STGC mode: extra bytes / plain's gradient reduction, time, agreement."""
    base_time = float(summary[0, 0])
    rows = [("micro-batch", "single-pass"), ("micro-batch-bf16", "micro-batch-bf16"),
            ("previous-step", "previous-step"), ("previous-step+own", None),
            ("previous-step+local", None), ("local", "local"), ("fc2", "fc2")]
    lines = [f"# STGC modes vs the step's mean gradient ({args.agreement_steps} audited steps; "
             f"reference conflict fraction "
             f"{100 * audit.get('stgc/audit/reference_conflict_fraction', float('nan')):.1f}%)",
             f"{'mode':20s} {'extra bytes':>12s} {'time':>6s} {'agreement':>9s} "
             f"{'recall':>7s} {'precision':>9s} {'conflicts':>9s} {'vs exact':>9s}"]
    for source, variant in rows:
        if variant in args.variants:
            index = args.variants.index(variant)
            extra = f"{comm_summary['variants'][variant]['ratio_to_plain_grad_wire']:.2f}x"
            time_ratio = f"{float(summary[index, 0]) / base_time:.2f}x"
        elif audit:  # audited only: an estimator no run mode uses, or a variant not run
            extra, time_ratio = ("(0)" if variant is None else "not run"), "n/a"
        else:
            continue

        def pct(name):
            value = audit.get(f"stgc/audit/{source}/{name}")
            return "n/a" if value is None else f"{100 * value:.2f}%"

        lines.append(f"{source:20s} {extra:>12s} {time_ratio:>6s} {pct('agreement'):>9s} "
                     f"{pct('recall'):>7s} {pct('precision'):>9s} "
                     f"{pct('conflict_fraction'):>9s} {pct('agreement_with_micro_batch'):>9s}")
    return lines


def rank_main(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(rank))
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
    audit = _mean_audit(built["single-pass"], args, vocab, rank)
    comm = {v: _count_bytes(built, v, batches[1 % len(batches)], args) for v in args.variants}
    predicted = _predicted_stgc_payload(built["single-pass"], args)
    state = _model_state_bytes(built["plain"].unwrapped_model)
    from megatron_stgc.parallel import collective_device

    summary = torch.tensor([[statistics.median(times[v]), max(peaks[v]), max(held[v])]
                            for v in args.variants], dtype=torch.float64,
                           device=collective_device())
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)  # the slowest / largest rank counts
    summary = summary.cpu()
    if rank == 0:
        _report(args, summary, state, agreement, comm, predicted, audit)
    dist.destroy_process_group()


def _comm_lines(args, comm, predicted) -> tuple[list[str], dict]:
    """Bytes per step (rank 0) per variant; STGC's extra over plain; the formula check."""
    from megatron_stgc.stgc.comm_cost import PaperLayout

    def by_key(rows, key):
        return {(r["kind"], r["group"]): r[key] for r in rows}

    def grad_total(rows, key):  # DDP's reduction: dense over dp_cp, experts over expert_dp
        return sum(r[key] for r in rows if r["kind"] in ("all_reduce", "reduce_scatter")
                   and r["group"] in ("dp", "dp_cp", "expert_dp"))

    plain_wire, plain_payload = grad_total(comm["plain"], "wire"), grad_total(comm["plain"],
                                                                              "payload")
    expert_dp = args.world_size // args.expert_model_parallel_size
    lines = [f"# communication: bytes sent per step by rank 0 (wire: ring algorithm; payload: "
             f"tensors handed to the collective); world {args.world_size}, expert-DP "
             f"{expert_dp}, {args.micro_batches} micro-batch(es); every variant counted from "
             f"plain's weights",
             "plain: " + ", ".join(f"{r['kind']}@{r['group']} {r['calls']}x "
                                   f"{r['wire'] / 2**20:.2f} MiB" for r in comm["plain"]),
             f"plain gradient reduction (all-reduce/reduce-scatter on dp_cp and expert_dp, small "
             f"loss/metric reductions included): {plain_wire / 2**20:.2f} MiB wire, "
             f"{plain_payload / 2**20:.2f} MiB payload"]
    summary = {"plain_grad_wire": plain_wire, "plain_grad_payload": plain_payload,
               "variants": {}}
    base_wire, base_payload = by_key(comm["plain"], "wire"), by_key(comm["plain"], "payload")
    for variant in args.variants[1:]:
        wire, payload = by_key(comm[variant], "wire"), by_key(comm[variant], "payload")
        extra = {key: (wire.get(key, 0) - base_wire.get(key, 0),
                       payload.get(key, 0) - base_payload.get(key, 0))
                 for key in set(wire) | set(base_wire)}
        extra = {key: value for key, value in extra.items() if value != (0, 0)}
        extra_wire = sum(w for w, _ in extra.values())
        ratio = extra_wire / plain_wire if plain_wire else float("nan")
        parts = ", ".join(f"{kind}@{group} {w / 2**20:+.2f} MiB"
                          for (kind, group), (w, _) in sorted(extra.items()))
        lines.append(f"{variant:12s} extra {extra_wire / 2**20:8.2f} MiB wire per step = "
                     f"{ratio:5.2f}x plain's gradient reduction ({parts or 'none'})")
        summary["variants"][variant] = {
            "extra_wire": extra_wire, "ratio_to_plain_grad_wire": ratio,
            "extra_by_kind_group": {f"{k}@{g}": v for (k, g), v in extra.items()}}
    counted = summary["variants"].get("single-pass", {}).get(
        "extra_by_kind_group", {}).get("all_reduce@expert_dp", (0, 0))[1]
    lines.append(f"formula check (single-pass): STGC's expert-DP all-reduce payload predicted "
                 f"from parameter counts {predicted} B per step, counted {counted} B")
    summary.update(predicted_stgc_payload=predicted, counted_stgc_payload=counted, rows=comm)
    for layout in (PaperLayout(), PaperLayout(grad_bytes=2)):
        paper = layout.figures()
        lines.append(f"paper layout ({layout.describe()}), per GPU per step: STGC exact "
                     f"{paper['stgc_payload_per_step'] / 1e9:.2f} GB payload "
                     f"({paper['stgc_wire_per_step'] / 1e9:.2f} GB wire), DDP "
                     f"{paper['ddp_payload_per_step'] / 1e9:.2f} GB "
                     f"({paper['ddp_wire_per_step'] / 1e9:.2f} GB wire): "
                     f"{paper['wire_ratio']:.2f}x by wire")
        summary.setdefault("paper", []).append({"layout": layout.describe(), **paper})
    return lines, summary


def _report(args, summary, state, agreement, comm, predicted, audit):
    base_time, base_peak = float(summary[0, 0]), state + float(summary[0, 1])
    if _on_gpu():
        machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                   f"{args.world_size} NCCL process(es)")
    else:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.world_size} gloo processes x 1 thread")
    lines = [
        f"# bench_stgc: {args.num_layers} MoE layers, hidden {args.hidden_size}, expert FFN "
        f"{args.moe_ffn_hidden_size}, {args.num_experts} experts top-{args.moe_router_topk}, "
        f"seq {args.seq_length} x {args.micro_batch_size} x {args.micro_batches} micro-batches per rank, "
        f"world {args.world_size}, EP={args.expert_model_parallel_size}, "
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
    comm_lines, comm_summary = _comm_lines(args, comm, predicted)
    lines += comm_lines
    lines += _mode_table(args, summary, comm_summary, audit)
    text = "\n".join(lines)
    print(text, flush=True)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "median_step_s": dict(zip(args.variants, summary[:, 0].tolist())),
                   "agreement": agreement, "communication": comm_summary,
                   "mean_audit": audit}, f, indent=2)


def main(argv=None):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parse_args(argv)
    from megatron_stgc.parallel import free_port

    if torch.cuda.is_available() and args.world_size > torch.cuda.device_count():
        sys.exit(f"--world-size {args.world_size} needs that many GPUs (NCCL: one process per "
                 f"GPU); this machine has {torch.cuda.device_count()}")
    mp.spawn(rank_main, args=(args, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
