#!/usr/bin/env python
"""The GPU acceptance check: run the GPU paths for real, print what ran, passed, failed, skipped.

    bash tools/gpu_check.sh                 # the one command (sets up a bare machine, see there)
    python tools/gpu_check.py [--only nccl,stgc-modes] [--out DIR] [--device cpu]

Every check runs in its own process with a time limit, so one failure does not stop the
rest; the table at the end names each check's result, time and detail (also written to
DIR/gpu_check.json and DIR/gpu_check.txt with the logs of every job). Exit code 0 only when
no check failed. With ``--device cpu`` the same checks run on the CPU with gloo (what CI
does to keep this harness working); nothing in that mode says anything about GPUs.

Checks:
  nccl          NCCL process group (world 1): all_reduce of a CUDA tensor
  stgc-modes    tiny STGC MoE layer on CUDA: single-pass, two-pass (same router gradient as
                single-pass), fc2, lowrank; every STGC tensor on CUDA, captures released
  oracle-fp32   cosines and flags vs per-token gradients (slow oracle) on CUDA, fp32 (TF32 off)
  oracle-bf16   the same with BF16 parameters and activations
  oracle-tf32   the fp32 case with TF32 matmuls allowed (NGC images turn TF32 on): the error
                it costs STGC's cosines, reported; flags must agree away from |cos| < 0.05
  reference     the stored fixture tests/fixtures/stgc_reference.pt on CUDA
  train-resume  tiny text GPT MoE, --stgc, 20 steps straight vs 10 + resume 10 (losses equal)
  export-load   a local-spec run (--use-te false) exported and loaded as --pretrained-checkpoint
                into this machine's spec (the Transformer Engine one where TE is installed)
  eval          tiny MoE-LLaVA on the digits mix: 12 steps, save, megatron-stgc eval
  te-train      (Transformer Engine) the text job on the TE spec, grouped GEMM, BF16, --stgc
  te-fp8        (Transformer Engine, compute capability >= 8.9) the same with --fp8-format
                hybrid, then megatron-stgc eval on it (decoding steps padded to 16 tokens)
  bench         tools/bench_stgc.py --quick, EP 1: absolute step times and ratios to plain
Checks that have not started when --budget-minutes (default 8) is spent are skipped as such.
TF32 is off for every check but oracle-tf32 (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0 for the jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

CHECKS = ("nccl", "stgc-modes", "oracle-fp32", "oracle-bf16", "oracle-tf32", "reference",
          "train-resume", "export-load", "eval", "te-train", "te-fp8", "bench")
LIMITS = {"bench": 180, "eval": 240, "train-resume": 240, "export-load": 180,
          "te-fp8": 180}  # seconds; others 120
RESULT = "GPU_CHECK_RESULT "


class Skip(Exception):
    """The check cannot run here; the message says why."""


# -- environment ------------------------------------------------------------------------

def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def environment(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except ImportError as error:
        info["megatron_core"] = f"missing ({error})"
    info["transformer_engine"] = have_te()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


# -- in-process checks (run by ``--worker NAME``) -----------------------------------------

def _init_single_rank(device: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_stgc import cpu_bridge
    from megatron_stgc.parallel import _free_port

    cpu_bridge.install()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(0)
        # full fp32 matmuls (NGC images allow TF32 by default); oracle-tf32 turns it back on
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def check_nccl(device: str) -> str:
    import torch
    import torch.distributed as dist

    tensor = torch.arange(4.0, device=device)
    dist.all_reduce(tensor)
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    return f"{dist.get_backend()} all_reduce on {tensor.device}"


def _layer(device, stgc_overrides=None, **config_overrides):
    from megatron_stgc.stgc.config import STGCConfig
    from stgc_utils import build_stgc_layer, moe_config

    stgc = STGCConfig(enabled=True, **(stgc_overrides or {}))
    return build_stgc_layer(moe_config(**config_overrides), stgc).to(device)


def _batch(device, seed=7, dtype=None):
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(64, 4, 16, generator=gen)
    weights = torch.randn(64, 4, 16, generator=gen)
    if dtype is not None:
        hidden, weights = hidden.to(dtype), weights.to(dtype)
    return hidden.to(device), weights.to(device)


def _on(tensor, device) -> bool:
    return tensor.device.type == device


def check_stgc_modes(device: str) -> str:
    import gc
    import weakref

    import torch

    from megatron_stgc.stgc.two_pass import two_pass_forward_backward

    hidden, weights = _batch(device)
    details = []
    grads = {}
    for name, overrides in (("single-pass", {}), ("fc2", {"estimator": "fc2"}),
                            ("lowrank", {"estimator": "lowrank", "estimator_rank": 8})):
        layer = _layer(device, overrides, gated_linear_unit=True)
        out, _ = layer(hidden)
        capture = weakref.ref(layer.stgc.current.capture)
        (out * weights).sum().backward()
        del out
        gc.collect()
        report = layer.stgc.last
        assert all(_on(t, device) for t in (report.cos, report.conflicts, report.routing_map))
        assert capture() is None, f"{name}: capture alive after backward"
        judged = ~torch.isnan(report.cos)
        assert judged.any() and torch.isfinite(report.cos[judged]).all()
        details.append(f"{name} {int(report.conflicts.sum())}/{int(judged.sum())} conflicts")
        if name == "single-pass":
            grads["single"] = layer.router.weight.grad.clone()
    layer = _layer(device, gated_linear_unit=True)

    def forward_backward():
        out, _ = layer(hidden)
        (out * weights).sum().backward()

    def zero_grads():
        for param in layer.parameters():
            param.grad = None

    two_pass_forward_backward(layer, forward_backward, zero_grads)
    difference = float((layer.router.weight.grad - grads["single"]).abs().max())
    assert difference < 1e-5, f"two-pass router grad differs from single-pass by {difference}"
    details.append(f"two-pass == single-pass (max diff {difference:.1e})")
    return "; ".join(details)


def _check_oracle(device: str, bf16: bool, tf32: bool = False) -> str:
    import torch

    from stgc_utils import oracle_pair_cosines

    if tf32:
        if device != "cuda":
            raise Skip("TF32 exists on CUDA only")
        torch.backends.cuda.matmul.allow_tf32 = True
    overrides = dict(gated_linear_unit=True)
    if bf16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    layer = _layer(device, **overrides)
    hidden, weights = _batch(device, seed=9, dtype=torch.bfloat16 if bf16 else None)
    out, _ = layer(hidden)
    (out.float() * weights.float()).sum().backward()
    report = layer.stgc.last
    expected, routing_map = oracle_pair_cosines(layer, hidden, weights)
    got = report.cos.double().cpu()
    judged = ~torch.isnan(expected)
    assert torch.equal(report.routing_map.cpu(), routing_map.cpu())
    assert torch.equal(torch.isnan(got), ~judged)
    error = float((got[judged] - expected[judged]).abs().max())
    tolerance = 0.05 if bf16 or tf32 else 1e-4
    if not tf32:  # TF32's error is what this check measures; only the flags must hold
        assert error < tolerance, f"max cosine error {error:.2e} >= {tolerance}"
    clear = judged & (expected.abs() > tolerance)
    disagree = int((report.conflicts.cpu()[clear] != (expected[clear] < 0)).sum())
    assert disagree == 0, f"{disagree} flags differ from the oracle away from |cos| < {tolerance}"
    return f"{int(judged.sum())} pairs, max |cos - oracle| {error:.1e}"


def check_oracle_fp32(device: str) -> str:
    return _check_oracle(device, bf16=False)


def check_oracle_bf16(device: str) -> str:
    return _check_oracle(device, bf16=True)


def check_oracle_tf32(device: str) -> str:
    return _check_oracle(device, bf16=False, tf32=True)


def check_reference(device: str) -> str:
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    reference = torch.load(os.path.join(REPO, "tests", "fixtures", "stgc_reference.pt"),
                           weights_only=False)
    results = {}
    for beta in (reference["beta"], 0.0):
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        layer = _layer(device, {"tau": reference["tau"], "beta": beta}, **reference["config"])
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.copy_(reference["weights"][name].to(device))
        out, _ = layer(reference["hidden"].to(device))
        tokens = out.shape[0] * out.shape[1]
        ((out * reference["loss_weights"].to(device)).sum() / tokens).backward()
        results[beta] = (layer.stgc.last, layer.router.weight.grad.double().cpu())
    report, with_stgc = results[reference["beta"]]
    expected = reference["cos"]
    judged = ~torch.isnan(expected)
    error = float((report.cos.double().cpu()[judged] - expected[judged]).abs().max())
    assert error < 1e-4, f"cosines off by {error:.2e}"
    near = (expected - reference["tau"]).abs() < 1e-4
    assert torch.equal(report.conflicts.cpu()[~near], reference["conflicts"][~near])
    change = with_stgc - results[0.0][1]
    grad_error = float((change - reference["router_grad_change"]).abs().max())
    assert grad_error < 1e-5, f"router gradient change off by {grad_error:.2e}"
    return f"cos error {error:.1e}, router-grad error {grad_error:.1e}"


IN_PROCESS = {"nccl": check_nccl, "stgc-modes": check_stgc_modes,
              "oracle-fp32": check_oracle_fp32, "oracle-bf16": check_oracle_bf16,
              "oracle-tf32": check_oracle_tf32, "reference": check_reference}


def worker(name: str, device: str) -> None:
    """Run one in-process check; print its result as one JSON line."""
    try:
        _init_single_rank(device)
        outcome = {"status": "passed", "detail": IN_PROCESS[name](device)}
    except Skip as skip:
        outcome = {"status": "skipped", "detail": str(skip)}
    except BaseException as error:  # noqa: BLE001 - every failure goes into the table
        traceback.print_exc()
        outcome = {"status": "failed", "detail": f"{type(error).__name__}: {error}"}
    print(RESULT + json.dumps(outcome), flush=True)


# -- job checks (torchrun jobs of megatron-stgc) ---------------------------------------------

def _run(command: list[str], log_path: str, limit: int, env: dict | None = None) -> str:
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=limit, env=dict(os.environ, PYTHONWARNINGS="ignore",
                                                      TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="0",
                                                      **(env or {})))
    if done.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-1500:]
        raise RuntimeError(f"exit code {done.returncode}: ...{tail}")
    return log_path


def _torchrun(command: str, flags: list[str]) -> list[str]:
    from megatron_stgc.parallel import _free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
            "--master-port", str(_free_port()), "-m", "megatron_stgc", command, *flags]


TEXT_FLAGS = ["--config", os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"),
              "--expert-model-parallel-size", "1", "--micro-batch-size", "8",
              "--global-batch-size", "16", "--num-samples", "1200", "--lr-warmup-fraction", "0",
              "--log-interval", "5", "--stgc"]


def _losses(path: str) -> list[float]:
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def _text_job(work: str, log: str, limit: int, extra: list[str], steps: int = 20) -> list[dict]:
    run = os.path.join(work, "run")
    _run(_torchrun("train", TEXT_FLAGS + extra + [
        "--train-iters", str(steps), "--save", run, "--load", run,
        "--log-file", f"{run}/log.jsonl", "--cache-dir", os.path.join(work, "cache")]),
        log, limit)
    with open(f"{run}/log.jsonl") as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def check_train_resume(device: str, work: str, log: str, limit: int) -> str:
    cache = os.path.join(work, "cache")
    common = TEXT_FLAGS + ["--train-iters", "20", "--cache-dir", cache]
    straight, resumed = os.path.join(work, "straight"), os.path.join(work, "resumed")
    _run(_torchrun("train", common + ["--save", straight, "--load", straight,
                                      "--log-file", f"{straight}/log.jsonl"]), log, limit)
    for exit_flags in (["--exit-interval", "10"], []):
        _run(_torchrun("train", common + ["--save", resumed, "--load", resumed,
                                          "--save-interval", "10",
                                          "--log-file", f"{resumed}/log.jsonl", *exit_flags]),
             log, limit)
    a, b = _losses(f"{straight}/log.jsonl"), _losses(f"{resumed}/log.jsonl")
    assert len(a) == 20 and len(b) == 20, (len(a), len(b))
    assert a == b, f"resumed losses differ: {a[10:13]} vs {b[10:13]}"
    assert a[-1] < a[0], f"loss did not fall: {a[0]:.3f} -> {a[-1]:.3f}"
    return f"20 steps, loss {a[0]:.3f} -> {a[-1]:.3f}; 10 + resume 10 identical"


def check_eval(device: str, work: str, log: str, limit: int) -> str:
    from megatron_stgc.data.digits import build_digits_mix

    mix = build_digits_mix(os.path.join(work, "data"))
    run = os.path.join(work, "run")
    flags = ["--config", os.path.join(REPO, "examples", "tiny_llava_digits.yaml"),
             "--expert-model-parallel-size", "1", "--data-path", mix["train"],
             "--image-root", mix["image_root"], "--cache-dir", os.path.join(work, "cache"),
             "--save", run, "--load", run, "--train-iters", "12", "--save-interval", "12",
             "--log-file", f"{run}/log.jsonl", "--log-interval", "4", "--stgc"]
    _run(_torchrun("train", flags), log, limit)
    with open(mix["val_questions"]) as f:
        questions = [json.loads(line) for line in f][:12]
    question_file = os.path.join(work, "questions.jsonl")
    with open(question_file, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    answers = os.path.join(work, "answers.jsonl")
    _run(_torchrun("eval", flags + ["--question-file", question_file,
                                    "--answers-file", answers]), log, limit)
    with open(answers) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == len(questions)
    errors = sum(1 for line in lines if line.get("metadata", {}).get("error"))
    return f"12 steps with STGC; {len(lines)} answers ({errors} errors)"


def check_bench(device: str, work: str, log: str, limit: int) -> str:
    output = os.path.join(work, "bench_stgc.txt")
    _run([sys.executable, os.path.join(REPO, "tools", "bench_stgc.py"), "--quick",
          "--expert-model-parallel-size", "1", "--output", output], log, limit)
    with open(output) as f:
        lines = [line.strip() for line in f if not line.startswith("#")]
    return " | ".join(lines[:5])


def _needs_te(device: str, fp8: bool = False) -> None:
    if device != "cuda":
        raise Skip("needs CUDA")
    if not have_te():
        raise Skip("Transformer Engine is not installed")
    if fp8:
        import torch

        if torch.cuda.get_device_capability() < (8, 9):
            raise Skip(f"FP8 needs compute capability >= 8.9, this GPU has "
                       f"{torch.cuda.get_device_capability()}")


def check_te_train(device: str, work: str, log: str, limit: int) -> str:
    _needs_te(device)
    records = _text_job(work, log, limit, ["--bf16", "--use-te"])
    assert records[-1]["loss"] < records[0]["loss"]
    assert "stgc/conflict_fraction" in records[-1]
    return (f"TE spec, grouped GEMM, BF16: loss {records[0]['loss']:.3f} -> "
            f"{records[-1]['loss']:.3f}, conflict fraction {records[-1]['stgc/conflict_fraction']:.3f}")


def check_te_fp8(device: str, work: str, log: str, limit: int) -> str:
    _needs_te(device, fp8=True)
    fp8 = ["--bf16", "--use-te", "--fp8-format", "hybrid"]
    records = _text_job(work, log, limit, fp8)
    assert records[-1]["loss"] < records[0]["loss"]
    questions = os.path.join(work, "questions.jsonl")
    with open(questions, "w") as f:
        f.writelines(json.dumps({"question_id": f"q{i}", "text": text}) + "\n"
                     for i, text in enumerate(["What is 2 plus 3?", "Sort 3 1 2.",
                                               "What sound does a cat make?"]))
    run = os.path.join(work, "run")
    answers = os.path.join(work, "answers.jsonl")
    _run(_torchrun("eval", TEXT_FLAGS + fp8 + [
        "--load", run, "--cache-dir", os.path.join(work, "cache"),
        "--question-file", questions, "--answers-file", answers]), log, limit)
    with open(answers) as f:
        assert len(f.readlines()) == 3
    return (f"FP8 hybrid: loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}; "
            "eval answered 3 questions (steps padded to 16 tokens)")


def check_export_load(device: str, work: str, log: str, limit: int) -> str:
    run = os.path.join(work, "local")
    cache = os.path.join(work, "cache")
    _run(_torchrun("train", TEXT_FLAGS + ["--use-te", "false", "--train-iters", "4",
                                          "--save", run, "--load", run, "--cache-dir", cache]),
         log, limit)
    exported = os.path.join(work, "exported")
    _run(_torchrun("export", TEXT_FLAGS + ["--use-te", "false", "--load", run,
                                           "--output", exported, "--cache-dir", cache]),
         log, limit)
    records = _text_job(work, log, limit, ["--pretrained-checkpoint", exported], steps=4)
    with open(log) as f:
        loaded = [line.strip() for line in f if "--pretrained-checkpoint" in line
                  and "loaded" in line]
    spec = "TE" if device == "cuda" and have_te() else "local"
    return (f"local-spec checkpoint -> {spec} spec: {loaded[-1] if loaded else 'loaded'}; "
            f"4 steps, loss {records[-1]['loss']:.3f}")


JOBS = {"train-resume": check_train_resume, "export-load": check_export_load,
        "eval": check_eval, "bench": check_bench, "te-train": check_te_train,
        "te-fp8": check_te_fp8}


# -- driver -----------------------------------------------------------------------------

def run_check(name: str, device: str, out_dir: str) -> dict:
    limit = LIMITS.get(name, 120)
    log = os.path.join(out_dir, f"{name}.log")
    start = time.time()
    try:
        if name in IN_PROCESS:
            command = [sys.executable, os.path.abspath(__file__), "--worker", name,
                       "--device", device]
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                  cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            with open(log, "w") as f:
                f.write(done.stdout + done.stderr)
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
            if not lines:
                outcome = {"status": "failed",
                           "detail": f"exit code {done.returncode}: {done.stderr[-400:]}"}
            else:
                outcome = json.loads(lines[-1][len(RESULT):])
        else:
            work = tempfile.mkdtemp(prefix=f"gpu_check_{name}_")
            outcome = {"status": "passed", "detail": JOBS[name](device, work, log, limit)}
    except Skip as skip:
        outcome = {"status": "skipped", "detail": str(skip)}
    except subprocess.TimeoutExpired:
        outcome = {"status": "failed", "detail": f"over its {limit} s limit"}
    except BaseException as error:  # noqa: BLE001
        outcome = {"status": "failed", "detail": f"{type(error).__name__}: {error}"}
    outcome.update(check=name, seconds=round(time.time() - start, 1))
    return outcome


def table(environment_info: dict, outcomes: list[dict]) -> str:
    lines = ["gpu_check: " + ", ".join(f"{k} {v}" for k, v in environment_info.items()),
             f"{'check':13s} {'result':8s} {'time':>7s}  detail"]
    for outcome in outcomes:
        detail = " ".join(str(outcome["detail"]).split())[:160]
        lines.append(f"{outcome['check']:13s} {outcome['status']:8s} "
                     f"{outcome['seconds']:6.1f}s  {detail}")
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu (harness smoke test)")
    parser.add_argument("--out", default=None, help="where the logs and the table go")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="checks not started by then are skipped (default 8)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        worker(args.worker, device)
        return 0
    names = CHECKS if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    out_dir = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out_dir, exist_ok=True)
    info = environment(device)
    outcomes = []
    started = time.time()
    for name in names:
        if time.time() - started > 60 * args.budget_minutes:
            outcomes.append({"check": name, "status": "skipped", "seconds": 0.0,
                             "detail": f"not started: the {args.budget_minutes:g}-minute budget "
                                       "was spent (--budget-minutes)"})
            continue
        print(f"gpu_check: {name} ...", flush=True)
        outcomes.append(run_check(name, device, out_dir))
        print(f"gpu_check: {name} {outcomes[-1]['status']} ({outcomes[-1]['seconds']} s)",
              flush=True)
    text = table(info, outcomes)
    print(text, flush=True)
    with open(os.path.join(out_dir, "gpu_check.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump({"environment": info, "checks": outcomes}, f, indent=2)
    return 1 if any(o["status"] == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
