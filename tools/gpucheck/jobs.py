"""The job checks: ``megatron-stgc`` train / export / eval under torchrun, and the bench.

Each takes a ``Context`` (context.py): every command of a check runs under the check's
one deadline.
"""

from __future__ import annotations

import json
import os
import sys

from gpucheck.context import REPO, Context, Skip, stgc_command

TEXT_FLAGS = ["--config", os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"),
              "--expert-model-parallel-size", "1", "--micro-batch-size", "8",
              "--global-batch-size", "16", "--num-samples", "1200", "--lr-warmup-fraction", "0",
              "--log-interval", "5", "--stgc"]


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def need_scikit_learn() -> None:
    """The digits mix is scikit-learn's bundled digits data."""
    try:
        import sklearn  # noqa: F401
    except ImportError as error:
        raise Skip(f"scikit-learn is not installed (the digits data of this check: {error}); "
                   "pip install scikit-learn, or carry its wheels") from None


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def _text_job(ctx: Context, extra: list[str], steps: int = 20) -> list[dict]:
    run = os.path.join(ctx.work, "run")
    ctx.run(stgc_command("train", TEXT_FLAGS + extra + [
        "--train-iters", str(steps), "--save", run, "--load", run,
        "--log-file", f"{run}/log.jsonl", "--cache-dir", os.path.join(ctx.work, "cache")]))
    return read_records(f"{run}/log.jsonl")


def check_train_resume(ctx: Context) -> str:
    cache = os.path.join(ctx.work, "cache")
    common = TEXT_FLAGS + ["--train-iters", "20", "--cache-dir", cache]
    straight, resumed = os.path.join(ctx.work, "straight"), os.path.join(ctx.work, "resumed")
    ctx.run(stgc_command("train", common + ["--save", straight, "--load", straight,
                                            "--log-file", f"{straight}/log.jsonl"]))
    for exit_flags in (["--exit-interval", "10"], []):
        ctx.run(stgc_command("train", common + ["--save", resumed, "--load", resumed,
                                                "--save-interval", "10",
                                                "--log-file", f"{resumed}/log.jsonl",
                                                *exit_flags]))
    a = [r["loss"] for r in read_records(f"{straight}/log.jsonl")]
    b = [r["loss"] for r in read_records(f"{resumed}/log.jsonl")]
    assert len(a) == 20 and len(b) == 20, (len(a), len(b))
    assert a == b, f"resumed losses differ: {a[10:13]} vs {b[10:13]}"
    assert a[-1] < a[0], f"loss did not fall: {a[0]:.3f} -> {a[-1]:.3f}"
    return f"20 steps, loss {a[0]:.3f} -> {a[-1]:.3f}; 10 + resume 10 identical"


def check_eval(ctx: Context) -> str:
    need_scikit_learn()
    from megatron_stgc.data.digits import build_digits_mix

    mix = build_digits_mix(os.path.join(ctx.work, "data"))
    run = os.path.join(ctx.work, "run")
    flags = ["--config", os.path.join(REPO, "examples", "tiny_llava_digits.yaml"),
             "--expert-model-parallel-size", "1", "--data-path", mix["train"],
             "--image-root", mix["image_root"], "--cache-dir", os.path.join(ctx.work, "cache"),
             "--save", run, "--load", run, "--train-iters", "12", "--save-interval", "12",
             "--log-file", f"{run}/log.jsonl", "--log-interval", "4", "--stgc"]
    ctx.run(stgc_command("train", flags))
    with open(mix["val_questions"]) as f:
        questions = [json.loads(line) for line in f][:12]
    question_file = os.path.join(ctx.work, "questions.jsonl")
    with open(question_file, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    answers = os.path.join(ctx.work, "answers.jsonl")
    ctx.run(stgc_command("eval", flags + ["--question-file", question_file,
                                          "--answers-file", answers]))
    with open(answers) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == len(questions)
    errors = sum(1 for line in lines if line.get("metadata", {}).get("error"))
    return f"12 steps with STGC; {len(lines)} answers ({errors} errors)"


def check_bench(ctx: Context) -> str:
    output = os.path.join(ctx.work, "bench_stgc.txt")
    ctx.run([sys.executable, os.path.join(REPO, "tools", "bench_stgc.py"), "--quick",
             "--expert-model-parallel-size", "1", "--output", output])
    with open(output) as f:
        lines = [line.strip() for line in f if not line.startswith("#")]
    return " | ".join(lines[:5])


def need_te(device: str, fp8: bool = False) -> None:
    if device != "cuda":
        raise Skip("needs CUDA")
    if not have_te():
        raise Skip("Transformer Engine is not installed")
    if fp8:
        import torch

        if torch.cuda.get_device_capability() < (8, 9):
            raise Skip(f"FP8 needs compute capability >= 8.9, this GPU has "
                       f"{torch.cuda.get_device_capability()}")


def check_te_train(ctx: Context) -> str:
    need_te(ctx.device)
    records = _text_job(ctx, ["--bf16", "--use-te"])
    assert records[-1]["loss"] < records[0]["loss"]
    assert "stgc/conflict_fraction" in records[-1]
    return (f"TE spec, grouped GEMM, BF16: loss {records[0]['loss']:.3f} -> "
            f"{records[-1]['loss']:.3f}, conflict fraction {records[-1]['stgc/conflict_fraction']:.3f}")


def check_te_fp8(ctx: Context) -> str:
    need_te(ctx.device, fp8=True)
    fp8 = ["--bf16", "--use-te", "--fp8-format", "hybrid"]
    records = _text_job(ctx, fp8)
    assert records[-1]["loss"] < records[0]["loss"]
    questions = os.path.join(ctx.work, "questions.jsonl")
    with open(questions, "w") as f:
        f.writelines(json.dumps({"question_id": f"q{i}", "text": text}) + "\n"
                     for i, text in enumerate(["What is 2 plus 3?", "Sort 3 1 2.",
                                               "What sound does a cat make?"]))
    run = os.path.join(ctx.work, "run")
    answers = os.path.join(ctx.work, "answers.jsonl")
    ctx.run(stgc_command("eval", TEXT_FLAGS + fp8 + [
        "--load", run, "--cache-dir", os.path.join(ctx.work, "cache"),
        "--question-file", questions, "--answers-file", answers]))
    with open(answers) as f:
        assert len(f.readlines()) == 3
    return (f"FP8 hybrid: loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}; "
            "eval answered 3 questions (steps padded to 16 tokens)")


def check_export_load(ctx: Context) -> str:
    run = os.path.join(ctx.work, "local")
    cache = os.path.join(ctx.work, "cache")
    ctx.run(stgc_command("train", TEXT_FLAGS + ["--use-te", "false", "--train-iters", "4",
                                                "--save", run, "--load", run,
                                                "--cache-dir", cache]))
    exported = os.path.join(ctx.work, "exported")
    ctx.run(stgc_command("export", TEXT_FLAGS + ["--use-te", "false", "--load", run,
                                                 "--output", exported, "--cache-dir", cache]))
    records = _text_job(ctx, ["--pretrained-checkpoint", exported], steps=4)
    with open(ctx.log) as f:
        loaded = [line.strip() for line in f if "--pretrained-checkpoint" in line
                  and "loaded" in line]
    spec = "TE" if ctx.device == "cuda" and have_te() else "local"
    return (f"local-spec checkpoint -> {spec} spec: {loaded[-1] if loaded else 'loaded'}; "
            f"4 steps, loss {records[-1]['loss']:.3f}")


CHECKS = {"train-resume": check_train_resume, "export-load": check_export_load,
          "eval": check_eval, "bench": check_bench, "te-train": check_te_train,
          "te-fp8": check_te_fp8}
