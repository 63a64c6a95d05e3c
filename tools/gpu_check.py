#!/usr/bin/env python
"""The GPU acceptance check: run the GPU paths for real, print what ran, passed, failed, skipped.

    bash tools/gpu_check.sh                 # the one command (sets up a bare machine, see there)
    python tools/gpu_check.py [--only nccl,stgc-modes] [--gpus N] [--out DIR] [--device cpu]

Every check runs in processes of its own under ONE deadline (its time limit, or the end of
--budget-minutes if that comes first) that covers all of its commands; at the deadline
every process the check started is killed, torchrun's workers included. The table at the
end names each check's result, time and detail (also DIR/gpu_check.txt and .json, written
after every check, with every check's log). Results (gpucheck/report.py): passed, failed,
skipped (cannot run here; the reason is named), unfinished (could run, did not finish
within the budget). Exit code 0 only when every check passed or was skipped.
With ``--device cpu`` the same checks run on the CPU with gloo (what CI does to keep this
harness working); nothing in that mode says anything about GPUs.

Checks, in the order they run:
  nccl          NCCL process group (world 1): all_reduce of a CUDA tensor
  stgc-modes    tiny STGC MoE layer on CUDA: single-pass, two-pass (same router gradient as
                single-pass), fc2, lowrank; every STGC tensor on CUDA, captures released
  oracle-fp32   cosines and flags vs per-token gradients (slow oracle) on CUDA, fp32 (TF32 off)
  oracle-bf16   the same with BF16 parameters and activations
  oracle-tf32   the fp32 case with TF32 matmuls allowed (NGC images turn TF32 on): the error
                it costs STGC's cosines, reported; flags must agree away from |cos| < 0.05
  reference     the stored fixture tests/fixtures/stgc_reference.pt on CUDA, with the router
                GEMM checked for TF32 first (gpucheck/tf32.py)
  bench         tools/bench_stgc.py --quick, EP 1: absolute step times and ratios to plain
                (before the slow job checks, so the budget reaches it)
  layout-*      with --gpus N >= 2 (gpucheck/layouts.py): N processes against one process
                where the math says they agree: layout-expert-dp (EP 1 x expert-DP N, local
                spec, the overlapped mean all-reduce), layout-ep (EP N on the default spec:
                TE grouped GEMM where TE is installed), layout-previous-step (previous-step
                mean source through megatron's DDP at expert-DP N), layout-ltdr-digits
                (--ltdr --stgc training on the digits mix, N ranks vs one)
  train-resume  tiny text GPT MoE, --stgc, 20 steps straight vs 10 + resume 10 (losses equal)
  export-load   a local-spec run (--use-te false) exported and loaded as --pretrained-checkpoint
                into this machine's spec (the Transformer Engine one where TE is installed)
  eval          tiny MoE-LLaVA on the digits mix: 12 steps, save, megatron-stgc eval
                (skipped, saying so, without scikit-learn: the digits data)
  te-train      (Transformer Engine) the text job on the TE spec, grouped GEMM, BF16, --stgc
  te-fp8        (Transformer Engine, compute capability >= 8.9) the same with --fp8-format
                hybrid, then megatron-stgc eval on it (decoding steps padded to 16 tokens)
TF32 is off for every process but oracle-tf32's (NVIDIA_TF32_OVERRIDE=0, allow_tf32 False).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "tools")]

from gpucheck import jobs, layouts, report, single  # noqa: E402
from gpucheck.context import Context, Skip  # noqa: E402
from gpucheck.processes import DeadlineExceeded, kill_all, new_token  # noqa: E402

CHECKS = (*single.CHECKS, "bench", *layouts.CHECKS, "train-resume", "export-load", "eval",
          "te-train", "te-fp8")
LIMITS = {"bench": 180, "eval": 240, "train-resume": 240, "export-load": 180, "te-fp8": 180,
          **{name: 300 for name in layouts.CHECKS}}  # seconds; others 120
DEFAULT_LIMIT = 120


def _run_in_worker(ctx: Context) -> dict:
    ctx.run([sys.executable, os.path.abspath(__file__), "--worker", ctx.name,
             "--device", ctx.device])
    return single.read_result(ctx.log)


def _run_body(ctx: Context) -> dict:
    if ctx.name in single.CHECKS:
        return _run_in_worker(ctx)
    if ctx.name in layouts.CHECKS:
        return {"status": "passed", "detail": layouts.CHECKS[ctx.name](ctx)}
    return {"status": "passed", "detail": jobs.CHECKS[ctx.name](ctx)}


def run_check(name: str, device: str, out_dir: str, budget_end: float, gpus: int = 1,
              limit: float | None = None) -> dict:
    """One check under one deadline: min(start + its limit, budget_end) (time.monotonic)."""
    limit = LIMITS.get(name, DEFAULT_LIMIT) if limit is None else limit
    start = time.monotonic()
    by_budget = budget_end < start + limit
    ctx = Context(name=name, device=device, work=tempfile.mkdtemp(prefix=f"gpu_check_{name}_"),
                  log=os.path.join(out_dir, f"{name}.log"),
                  deadline=min(start + limit, budget_end), token=new_token(name), gpus=gpus)
    open(ctx.log, "w").close()
    try:
        outcome = _run_body(ctx)
    except Skip as skip:
        outcome = {"status": "skipped", "detail": str(skip)}
    except DeadlineExceeded:
        outcome = ({"status": "unfinished", "detail": "stopped at the end of --budget-minutes"}
                   if by_budget else
                   {"status": "failed", "detail": f"over its {limit:g} s limit (killed)"})
    except BaseException as error:  # noqa: BLE001 - every failure goes into the table
        with open(ctx.log, "a") as f:
            f.write(traceback.format_exc())
        outcome = {"status": "failed", "detail": f"{type(error).__name__}: {error}"}
    stray = kill_all(ctx.token)
    if stray:
        outcome["detail"] += f"; {stray} leftover processes of the check killed"
    outcome.update(check=name, seconds=round(time.monotonic() - start, 1))
    return outcome


def run_checks(names, device: str, out_dir: str, budget_minutes: float, gpus: int) -> list[dict]:
    info = report.environment(device)
    budget_end = time.monotonic() + 60 * budget_minutes
    outcomes = []
    for name in names:
        if time.monotonic() >= budget_end:
            outcomes.append({"check": name, "status": "unfinished", "seconds": 0.0,
                             "detail": f"not started: the {budget_minutes:g}-minute budget "
                                       "was spent (--budget-minutes)"})
        elif name in layouts.CHECKS and gpus < 2:
            outcomes.append({"check": name, "status": "skipped", "seconds": 0.0,
                             "detail": f"needs --gpus N >= 2 ({gpus} here)"})
        else:
            print(f"gpu_check: {name} ...", flush=True)
            outcomes.append(run_check(name, device, out_dir, budget_end, gpus))
            print(f"gpu_check: {name} {outcomes[-1]['status']} ({outcomes[-1]['seconds']} s)",
                  flush=True)
        report.write(out_dir, info, outcomes, final=False)
    print(report.write(out_dir, info, outcomes, final=True), flush=True)
    return outcomes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu (harness smoke test)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="processes for the layout-* checks (default: the visible GPUs; "
                             "1 on the CPU; gloo processes with --device cpu)")
    parser.add_argument("--out", default=None, help="where the logs and the table go")
    parser.add_argument("--budget-minutes", type=float, default=12.0,
                        help="wall-clock budget of the whole run (default 12): checks not "
                             "finished by then are 'unfinished' and the exit code is 1")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layout-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layout-out", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        single.worker(args.worker, device)
        return 0
    if args.layout_worker:
        layouts.rank_main(args.layout_worker, device, args.layout_out)
        return 0
    names = CHECKS if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    gpus = args.gpus or (torch.cuda.device_count() if device == "cuda" else 1)
    if device == "cuda" and gpus > torch.cuda.device_count():
        parser.error(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    out_dir = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out_dir, exist_ok=True)
    return report.exit_code(run_checks(names, device, out_dir, args.budget_minutes, gpus))


if __name__ == "__main__":
    sys.exit(main())
