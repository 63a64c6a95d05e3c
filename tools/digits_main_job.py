#!/usr/bin/env python
"""The README's main job: a tiny MoE-LLaVA on real digit images, baseline vs STGC.

The MoE-LLaVA recipe at toy scale, on the model of examples/tiny_llava_digits.yaml:

1. builds the digits instruction mix (megatron_stgc/data/digits.py; reused if present);
2. stage II, **dense**: the same model without experts (``--num-experts none``), every part
   trainable, ``--dense-iters`` steps on 2 processes (torchrun);
3. ``megatron-stgc export`` turns its checkpoint into a --pretrained-checkpoint directory;
4. stage III, twice from that same start, on 2 processes with expert parallelism (EP=2):
   every FFN of the MoE layers upcycled into 4 experts (``--moe-use-upcycling``), MoE-LLaVA's
   trainable set (``--trainable-modules moe-llava-stage3``: every FFN of the language model,
   dense and experts, the routers and the projector; docs/RECIPE.md), ``--stage3-iters``
   steps: **baseline** (``--stgc --stgc-beta 0``: conflicts measured, gradients exactly plain
   MoE's, so conflict fractions compare) and **STGC** (``--stgc``, beta 1);
   With ``--with-ltdr`` also **LTDR** (``--ltdr``, conflicts measured at beta 0) and
   **STGC + LTDR** (``--stgc --ltdr``), two more runs from the same start (docs/LTDR.md);
5. ``megatron-stgc eval`` on the validation questions for every model;
6. ``megatron-stgc export --format hf`` of the STGC model (``--hf-export-run``): transformers'
   LLaVA with a Qwen2-MoE language model, reloaded and checked by the export itself; then
   transformers' ``generate`` answers every validation question and the answers are compared
   with eval's, once with our image preprocessing (the model alone: all must agree) and once
   with the exported image processor (what transformers users get; docs/EXPORT.md);
7. prints a side-by-side table (accuracy per question type, final loss, conflict fraction,
   tokens per expert per modality, seeds) and writes OUTPUT/comparison.txt and .json.

    python tools/digits_main_job.py --output runs/digits

Arguments after ``--`` go to every training run (e.g. ``-- --lr 1e-3``; stage II stays dense).
Finished runs are not retrained (each resumes from its own checkpoint), so a second call
only re-exports stage II and re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_stgc.data.digits import build_digits_mix  # noqa: E402
from megatron_stgc.eval.scoring import format_table  # noqa: E402
from megatron_stgc.analysis.logs import after_step, last_steps, read_log, step_mean  # noqa: E402
from megatron_stgc.analysis.plots import expert_token_totals  # noqa: E402

DENSE = ["--num-experts", "none", "--expert-model-parallel-size", "1"]
# MoE-LLaVA's stage III trainable set; until 2026-12-06 (the measured tables) it was
# --freeze-vit --freeze-projection --freeze-lm-except-moe (MoE layers only)
STAGE3 = ["--moe-use-upcycling", "--trainable-modules", "moe-llava-stage3"]
RUNS = {"baseline": ["--stgc", "--stgc-beta", "0"], "stgc": ["--stgc"],
        # LTDR (docs/LTDR.md); conflicts measured at beta 0 as in the baseline
        "ltdr": ["--stgc", "--stgc-beta", "0", "--ltdr"], "stgc_ltdr": ["--stgc", "--ltdr"]}
LTDR_RUNS = "ltdr,stgc_ltdr"  # added by --with-ltdr
LTDR_METRICS = {"ltdr/tail_fraction": "LTDR tail fraction of image tokens",
                "ltdr/experts_per_vision_token": "LTDR experts per image token",
                "ltdr/text_balance_loss": "balancing loss on text tokens"}
LAST_STEPS = 20  # final loss / conflict fraction / expert loads: mean or sum over these
CHURN_STEPS = 100  # routing churn rows: mean over these last steps (training/routing_stability.py)


def torchrun(nproc: int, command: list[str], log_path: str) -> float:
    """Run ``torchrun -m megatron_stgc <command>``; stream to the console and a log; seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + os.getpid() % 1000), "-m", "megatron_stgc"] + command
    print("$ " + " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env, cwd=REPO)
        for line in process.stdout:
            log.write(line)
            if not line.startswith(("[W", "W1", "/")) and "warn" not in line.lower():
                print("  " + line, end="", flush=True)
        if process.wait() != 0:
            raise SystemExit(f"failed ({process.returncode}): {' '.join(cmd)}; see {log_path}")
    return time.perf_counter() - start


def modality_shares(records: list[dict]) -> dict[str, str]:
    """{"layer_N image": "e0 .. e3 shares in %", ...} summed over the last steps."""
    shares = {}
    for (layer, modality), counts in sorted(expert_token_totals(records).items()):
        total = max(sum(counts), 1)
        shares[f"{layer} {modality} tokens/expert %"] = " ".join(
            f"{100 * c / total:.0f}" for c in counts)
    return shares


def summarise(run_dir: str, results: dict, train_seconds: float) -> dict[str, object]:
    records = read_log(os.path.join(run_dir, "train_log.jsonl"))
    last = last_steps(records, LAST_STEPS)  # one record per --log-interval steps
    row: dict[str, object] = {}
    for category, value in sorted(results["per_category"].items()):
        row[f"accuracy {category}"] = f"{100 * value['accuracy']:.1f}%"
    row["accuracy overall"] = f"{100 * results['overall']['accuracy']:.1f}%"
    row["final loss (mean of last steps)"] = f"{step_mean(last, 'loss'):.4f}"
    fraction = step_mean(last, "stgc/conflict_fraction")
    if fraction is not None:
        row["conflict fraction"] = f"{fraction:.4f}"
    row.update(ltdr_rows(last))
    row.update(modality_shares(last))
    row.update(churn_rows(last_steps(records, CHURN_STEPS)))
    row["train seconds (2 procs)"] = f"{train_seconds:.0f}"
    step_times = sorted(r["step_time_s"] for r in after_step(records, 5) if "step_time_s" in r)
    if step_times:  # the per-step cost of LTDR / STGC, comparable between the runs
        row["median step time s (after step 5)"] = f"{step_times[len(step_times) // 2]:.3f}"
    return row


def churn_rows(records: list[dict]) -> dict[str, str]:
    """Per MoE layer: step-to-step TV of image / text load shares and the probe tokens whose
    top-k set changed per probe (every 20 steps), means over ``records`` (the last
    CHURN_STEPS steps; MoE runs only)."""
    rows = {}
    layers = sorted({int(key.split("/")[1][len("layer"):]) for r in records for key in r
                     if key.startswith("routing/layer")})
    for layer in layers:
        for metric, label in (("load_tv", "load-share TV step to step"),
                              ("topk_change", "probe top-k change per 20 steps")):
            pair = [step_mean(records, f"routing/layer{layer}/{metric}_{modality}")
                    for modality in ("image", "text")]
            if None not in pair:
                rows[f"layer_{layer} {label} image / text"] = f"{pair[0]:.3f} / {pair[1]:.3f}"
    return rows


def ltdr_rows(records: list[dict]) -> dict[str, str]:
    """Means of the ltdr/* metrics over the steps of ``records`` (runs with --ltdr only)."""
    rows = {}
    for key, label in LTDR_METRICS.items():
        value = step_mean(records, key)
        if value is not None:
            rows[label] = f"{value:.4f}"
    return rows


def question_subset(data_dir: str, limit: int | None) -> tuple[str, str]:
    """(question file, ground truth) of the validation set, or of its first ``limit`` questions."""
    questions = os.path.join(data_dir, "val_questions.jsonl")
    truth = os.path.join(data_dir, "val_answers.jsonl")
    if limit is None:
        return questions, truth
    paths = []
    for source in (questions, truth):
        target = source.replace(".jsonl", f".first{limit}.jsonl")
        with open(source) as f, open(target, "w") as out:
            out.writelines(line for _, line in zip(range(limit), f))
        paths.append(target)
    return paths[0], paths[1]


def evaluate(nproc: int, name: str, run_dir: str, run_flags: list[str], data_dir: str,
             limit: int | None = None) -> dict:
    results_path = os.path.join(run_dir, "results.json")
    questions, truth = question_subset(data_dir, limit)
    torchrun(nproc, ["eval"] + run_flags + [
        "--question-file", questions, "--ground-truth", truth,
        "--answers-file", os.path.join(run_dir, "answers.jsonl"),
        "--results-file", results_path, "--model-id", name, "--max-new-tokens", "12"],
        os.path.join(run_dir, "eval.out"))
    with open(results_path) as f:
        return json.load(f)


def run_flags_for(common: list[str], run_dir: str, extra: list[str]) -> list[str]:
    os.makedirs(run_dir, exist_ok=True)
    return common + ["--save", run_dir, "--load", run_dir,
                     "--log-file", os.path.join(run_dir, "train_log.jsonl")] + extra


def prepare_stage2(output: str, config: str, nproc: int, seed: int, data_seed: int,
                   dense_iters: int, extra: list[str], reuse_export: bool = False,
                   question_first: bool = False) -> dict:
    """Data, stage II (dense, everything trainable) and its export: what every stage III starts
    from. Returns {"data_dir", "common", "pretrained", "dense_dir", "dense_flags", "seconds"}.
    reuse_export: an existing export is taken as it is (no torchrun at all).
    question_first: the mix with the question before <image> (data/digits.py)."""
    data_dir = os.path.join(output, "data")
    mix = build_digits_mix(data_dir, seed=data_seed, question_first=question_first)
    print(f"data: {mix['counts']} ({'reused' if mix['reused'] else 'built'})", flush=True)
    common = ["--config", config, "--data-path", os.path.join(data_dir, "train.json"),
              "--image-root", data_dir, "--cache-dir", os.path.join(output, "cache"),
              "--seed", str(seed)]
    dense_dir = os.path.join(output, "dense")
    dense_flags = run_flags_for(common, dense_dir, extra + DENSE + [
        "--train-iters", str(dense_iters)])
    pretrained = os.path.join(dense_dir, "pretrained")
    seconds = 0.0
    if not (reuse_export and os.path.isfile(os.path.join(pretrained, "model.pt"))):
        seconds = torchrun(nproc, ["train"] + dense_flags, os.path.join(dense_dir, "train.out"))
        torchrun(1, ["export", "--output", pretrained] + dense_flags,
                 os.path.join(dense_dir, "export.out"))
    return {"data_dir": data_dir, "common": common, "pretrained": pretrained,
            "dense_dir": dense_dir, "dense_flags": dense_flags, "seconds": seconds}


def stage3_flags(common: list[str], pretrained: str, iters: int, run_dir: str,
                 flags: list[str]) -> list[str]:
    """The flags of one stage III run (upcycled from ``pretrained``, MoE-LLaVA's trainable set)."""
    return run_flags_for(common, run_dir, STAGE3 + ["--pretrained-checkpoint", pretrained,
                                                     "--train-iters", str(iters)] + flags)


def hf_export_check(run_dir: str, run_flags: list[str], data_dir: str) -> dict[str, object]:
    """Export ``run_dir``'s model with --format hf (anew each call) and compare transformers'
    greedy answers with eval's answers.jsonl; rows for the table."""
    import shutil

    from megatron_stgc.export.hf_generate import hf_answers

    hf_dir = os.path.join(run_dir, "hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    torchrun(1, ["export", "--format", "hf", "--output", hf_dir] + run_flags,
             os.path.join(run_dir, "export_hf.out"))
    with open(os.path.join(data_dir, "val_questions.jsonl")) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    ours = {r["question_id"]: r["text"] for r in read_log(os.path.join(run_dir, "answers.jsonl"))}
    rows: dict[str, object] = {}
    for pixels, label in (("ours", "our preprocessing"), ("processor", "its image processor")):
        answers = hf_answers(hf_dir, questions, data_dir, 12, pixels=pixels,
                             say=lambda message: print("  " + message, flush=True))
        differ = [(q["question_id"], a, ours[q["question_id"]])
                  for q, a in zip(questions, answers) if a != ours[q["question_id"]]]
        with open(os.path.join(run_dir, f"hf_answers_{pixels}.jsonl"), "w") as f:
            for q, a in zip(questions, answers):
                f.write(json.dumps({"question_id": q["question_id"], "text": a}) + "\n")
        rows[f"HF export generate == eval ({label})"] = \
            f"{len(questions) - len(differ)}/{len(questions)}"
        for qid, theirs, mine in differ[:5]:
            print(f"  HF ({label}) differs on {qid}: {theirs!r} vs eval {mine!r}", flush=True)
    with open(os.path.join(hf_dir, "export_info.json")) as f:
        check = json.load(f)["checks"]["max_abs_logit_difference"]
    rows["HF export max abs logit difference"] = f"{check:.2g}"
    return rows


def write_plots(run_dirs: list[str], out_dir: str) -> list[str]:
    """The analysis figures of these runs (megatron-stgc plot); [] when matplotlib is missing."""
    try:
        from megatron_stgc.analysis.plots import write_plots as plots
    except ImportError:
        return []
    try:
        return plots(run_dirs, out_dir, say=lambda message: print(message, flush=True))
    except ImportError as error:  # matplotlib not installed (the "plot" extra)
        print(f"plots skipped: {error}", flush=True)
        return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/digits")
    parser.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_llava_digits.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234, help="training seed (--seed)")
    parser.add_argument("--data-seed", type=int, default=0, help="digits mix split/shuffle seed")
    parser.add_argument("--dense-iters", type=int, default=400, help="stage II steps")
    parser.add_argument("--stage3-iters", type=int, default=300, help="stage III steps")
    parser.add_argument("--runs", default="baseline,stgc")
    parser.add_argument("--hf-export-run", default="stgc",
                        help="the stage III run exported with --format hf and answered with "
                             "transformers' generate (compared with eval); 'none' skips it")
    parser.add_argument("--question-first", action="store_true",
                        help="the digits mix with the question before <image> (image tokens "
                             "see the question); skips the HF export check, whose prompts put "
                             "the image first")
    parser.add_argument("--with-ltdr", action="store_true",
                        help=f"also run {LTDR_RUNS} (LTDR, STGC + LTDR; two more stage III runs)")
    args, extra = parser.parse_known_args(argv)
    if args.with_ltdr:
        args.runs = ",".join(dict.fromkeys(args.runs.split(",") + LTDR_RUNS.split(",")))
    extra = [a for a in extra if a != "--"]
    output = os.path.abspath(args.output)
    if args.question_first:
        args.hf_export_run = "none"

    start = time.perf_counter()
    stage2 = prepare_stage2(output, args.config, args.nproc, args.seed, args.data_seed,
                            args.dense_iters, extra, question_first=args.question_first)
    data_dir = stage2["data_dir"]
    table: dict[str, dict[str, object]] = {}
    results = evaluate(args.nproc, "dense", stage2["dense_dir"], stage2["dense_flags"], data_dir)
    table["dense (stage II)"] = summarise(stage2["dense_dir"], results, stage2["seconds"])

    run_dirs = []
    for name in args.runs.split(","):
        run_dir = os.path.join(output, name)
        run_flags = stage3_flags(stage2["common"], stage2["pretrained"], args.stage3_iters,
                                 run_dir, RUNS[name] + extra)
        seconds = torchrun(args.nproc, ["train"] + run_flags, os.path.join(run_dir, "train.out"))
        results = evaluate(args.nproc, name, run_dir, run_flags, data_dir)
        table[f"{name} (stage III)"] = summarise(run_dir, results, seconds)
        if name == args.hf_export_run:
            table[f"{name} (stage III)"].update(hf_export_check(run_dir, run_flags, data_dir))
        run_dirs.append(run_dir)

    labels = list(dict.fromkeys(label for row in table.values() for label in row))
    rows = [(label, {name: table[name].get(label, "n/a") for name in table}) for label in labels]
    rows.append(("seeds", {name: f"train {args.seed}, data {args.data_seed}" for name in table}))
    text = format_table(rows, list(table))
    plots = write_plots(run_dirs, os.path.join(output, "plots"))
    text += (f"\n(stage II {args.dense_iters} steps dense; stage III {args.stage3_iters} steps from "
             f"it, upcycled, MoE-LLaVA's trainable set; churn rows: mean over the last {CHURN_STEPS} steps; one seed ({args.seed}): the spread over seeds is in "
             f"docs/STUDY.md (tools/study.py); total wall time "
             f"{time.perf_counter() - start:.0f} s)\n")
    if plots:
        text += "plots: " + ", ".join(os.path.relpath(p, output) for p in plots) + "\n"
    print("\n" + text, flush=True)
    with open(os.path.join(output, "comparison.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(output, "comparison.json"), "w") as f:
        json.dump({"runs": table, "seed": args.seed, "data_seed": args.data_seed,
                   "dense_iters": args.dense_iters, "stage3_iters": args.stage3_iters,
                   "plots": plots}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
