"""The check's verdict: one outcome per check, the table, the JSON, the exit code.

Statuses:
  passed      ran and held;
  failed      ran and did not hold (or overran its own time limit);
  skipped     cannot run on this machine (no CUDA, no Transformer Engine, no FP8, no
              scikit-learn, fewer GPUs than --gpus asks): the detail names the reason;
  unfinished  could run here but did not finish within --budget-minutes (not started, or
              stopped at the budget): the detail says which.
Exit code 0 only when every check is passed or skipped: a run that could not finish what
this machine supports is not a pass.
"""

from __future__ import annotations

import json
import os
import sys

STATUSES = ("passed", "failed", "skipped", "unfinished")


def environment(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except ImportError as error:
        info["megatron_core"] = f"missing ({error})"
    from gpucheck.jobs import have_te

    info["transformer_engine"] = have_te()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


def exit_code(outcomes: list[dict]) -> int:
    return 0 if all(o["status"] in ("passed", "skipped") for o in outcomes) else 1


def table(environment_info: dict, outcomes: list[dict]) -> str:
    lines = ["gpu_check: " + ", ".join(f"{k} {v}" for k, v in environment_info.items()),
             f"{'check':20s} {'result':10s} {'time':>7s}  detail"]
    for outcome in outcomes:
        detail = " ".join(str(outcome["detail"]).split())[:200]
        lines.append(f"{outcome['check']:20s} {outcome['status']:10s} "
                     f"{outcome['seconds']:6.1f}s  {detail}")
    counts = {s: sum(o["status"] == s for o in outcomes) for s in STATUSES}
    verdict = "PASS" if exit_code(outcomes) == 0 else "FAIL"
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f": {verdict}")
    return "\n".join(lines)


def write(out_dir: str, environment_info: dict, outcomes: list[dict], final: bool) -> str:
    """Write gpu_check.txt / .json (after every check, so a killed run leaves its table)."""
    text = table(environment_info, outcomes)
    with open(os.path.join(out_dir, "gpu_check.txt"), "w") as f:
        f.write(text + ("\n" if final else "\n(run in progress)\n"))
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump({"environment": environment_info, "checks": outcomes, "complete": final,
                   "exit_code": exit_code(outcomes)}, f, indent=2)
    return text
