"""The multi-GPU checks (``--gpus N``, N >= 2): N processes against one, where they must agree.

The global micro-batch is the same in both runs: rank r of the N holds batch columns
[r*b, (r+1)*b); the one process holds all N*b. Each rank's loss is the mean over its own
tokens, so the DDP-style mean of the ranks' gradients is the one process's gradient, and
STGC's mean gradient (summed over expert-DP) points the same way: the same cosines, flags
and router gradients up to floating-point order (tests/test_stgc_layout.py shows the same
on the CPU). Compared per rank: cos (|diff| < 1e-5), conflict flags (equal away from
|cos - tau| < 1e-4), router gradient (|diff| < 1e-6 + 1e-5 x |g|).

  layout-expert-dp      EP 1 x expert-DP N, local spec (SequentialMLP): the micro-batch
                        mean's all-reduce overlapped with the experts' backward (every
                        rank must report overlapped backwards)
  layout-ep             EP N (4 experts, or N if 4 is not a multiple of N) on the default
                        spec: Transformer Engine's grouped GEMM where TE is installed
                        (else the local spec, said in the detail), STGC + LTDR: the
                        return all-to-all, LTDR's all-reduce of the image RPV totals and
                        its top-a routing through the dispatcher (tail flags and routing
                        maps compared too)
  layout-previous-step  previous-step mean source at expert-DP N through megatron's DDP: 3
                        steps (the first falls back to micro-batch), each compared
  layout-ltdr-digits    --ltdr --stgc training on the digits mix (digits_layout.py)

Each runs twice under torchrun (``tools/gpu_check.py --layout-worker NAME``): first the one
process (it also writes the weights), then the N; both save per-rank results; the driver
compares. With --device cpu the processes use gloo (tests/test_gpu_check_layouts.py).
"""

from __future__ import annotations

import os
import re

from gpucheck.context import REPO, Context, torchrun
from gpucheck.digits_layout import check_ltdr_digits
from gpucheck.tf32 import router_gemm_error

SEQ, PER_RANK, HIDDEN = 64, 2, 16  # tokens per rank: SEQ x PER_RANK
GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.py")
SPLIT_ENV = "GPU_CHECK_LAYOUT_SPLIT"  # N: how the global batch is cut


# -- on every rank (under torchrun) ------------------------------------------------------

def _init(device: str) -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    from megatron_stgc import cpu_bridge

    cpu_bridge.install()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return rank, world


def _num_experts(split: int) -> int:
    return 4 if 4 % split == 0 else split


def _config(split: int, te: bool):
    from stgc_utils import moe_config

    return moe_config(num_moe_experts=_num_experts(split), gated_linear_unit=True,
                      moe_grouped_gemm=te)


def _layer(split: int, te: bool, stgc_fields: dict, ltdr: bool = False):
    import torch
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_stgc.ltdr.config import LTDRConfig
    from megatron_stgc.ltdr.dispatch import prepare_ltdr_layers
    from megatron_stgc.ltdr.spec import ltdr_moe_spec
    from megatron_stgc.mcore_compat import build_moe_layer
    from megatron_stgc.stgc.config import STGCConfig
    from megatron_stgc.stgc.spec import stgc_moe_spec

    config = _config(split, te)
    spec = get_moe_module_spec(use_te=te, num_experts=config.num_moe_experts,
                               moe_grouped_gemm=te)
    spec = stgc_moe_spec(spec, STGCConfig(enabled=True, **stgc_fields))
    if ltdr:
        spec = ltdr_moe_spec(spec, LTDRConfig(enabled=True))
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    layer = build_moe_layer(spec, config, layer_number=1)
    prepare_ltdr_layers(layer)  # what model/gpt.py does after building (no-op without LTDR)
    return layer.train(), config


_SEQUENTIAL = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")
_GROUPED = re.compile(r"(.*experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


def global_name(name: str, offset: int) -> str:
    """State-dict name with the local expert index made global (SequentialMLP or grouped)."""
    match = _SEQUENTIAL.match(name)
    if match:
        return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"
    match = _GROUPED.match(name)
    if match:
        return f"{match.group(1)}{int(match.group(2)) + offset}"
    return name


def _share_weights(layer, state_path: str, world: int) -> None:
    """The one process saves its weights (global names); the N ranks load their experts."""
    import torch

    tensors = {n: t for n, t in layer.state_dict().items() if isinstance(t, torch.Tensor)}
    offset = layer.local_expert_indices[0]
    if world == 1:
        torch.save({global_name(n, offset): t.detach().cpu() for n, t in tensors.items()},
                   state_path)
        return
    state = torch.load(state_path)
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(state[global_name(name, offset)])


def _share(tensor, rank: int, world: int):
    """This rank's batch columns of a [SEQ, world*PER_RANK, ...] tensor."""
    if world == 1:
        return tensor
    return tensor[:, rank * PER_RANK:(rank + 1) * PER_RANK].contiguous()


def _global_batch(split: int, step: int = 0):
    import torch

    gen = torch.Generator().manual_seed(11 + step)
    shape = (SEQ, split * PER_RANK, HIDDEN)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _modality(rank: int, world: int, split: int):
    """[b, s] token modality of this rank's share: image tokens first, then text."""
    import torch

    from megatron_stgc.model.modality import IMAGE, TEXT

    modality = torch.full((split * PER_RANK, SEQ), TEXT)
    modality[:, 4:36] = IMAGE
    return modality if world == 1 else modality[rank * PER_RANK:(rank + 1) * PER_RANK]


def _router_grad_mean(layer, world: int):
    import torch.distributed as dist

    grad = layer.router.weight.grad.detach().clone()
    if world > 1:
        dist.all_reduce(grad)
    return (grad / world).cpu()


def _report(layer) -> dict:
    report = layer.stgc.last
    return {"cos": report.cos.detach().cpu(), "conflicts": report.conflicts.cpu()}


def _one_step(name: str, device: str, rank: int, world: int, split: int, work: str) -> dict:
    """layout-expert-dp and layout-ep: one forward and backward of this rank's share."""
    from megatron.core import parallel_state

    from gpucheck.jobs import have_te

    from megatron_stgc.model.modality import ModalityContext

    ep_check = name == "layout-ep"
    te = ep_check and device == "cuda" and have_te()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world if ep_check
                                             else 1)
    layer, _ = _layer(split, te, {}, ltdr=ep_check)
    _share_weights(layer, os.path.join(work, "state.pt"), world)
    layer.to(device)
    if ep_check:
        layer.router.modality = ModalityContext()
        layer.router.modality.set(_modality(rank, world, split).to(device))
    hidden, weights = (_share(t, rank, world).to(device) for t in _global_batch(split))
    out, _ = layer(hidden)
    ((out * weights).sum() / out[..., 0].numel()).backward()
    result = {**_report(layer), "router_grad": _router_grad_mean(layer, world),
              "overlapped": layer.stgc.overlapped_backwards,
              "spec": "TE grouped GEMM" if te else "local (SequentialMLP)",
              "router_gemm_error": router_gemm_error(device)}  # TF32 would show here
    if ep_check:
        result.update(tail=layer.router.ltdr_last.tail.cpu(),
                      routing_map=layer.router.ltdr_last.routing_map.cpu())
    return result


def _previous_step(name: str, device: str, rank: int, world: int, split: int, work: str):
    """layout-previous-step: 3 steps through megatron's DDP, previous-step mean source."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_stgc.training.stgc_hooks import after_stgc_step

    parallel_state.initialize_model_parallel(1, 1)
    layer, config = _layer(split, False, {"mean_source": "previous-step"})
    _share_weights(layer, os.path.join(work, "state.pt"), world)
    layer.to(device)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  layer)
    steps = []
    for step in range(3):
        ddp.zero_grad_buffer()
        hidden, weights = (_share(t, rank, world).to(device) for t in _global_batch(split, step))
        out, _ = layer(hidden)
        ((out * weights).sum() / out[..., 0].numel()).backward()
        ddp.finish_grad_sync()
        # DDP has averaged the router gradient over the ranks already
        steps.append({**_report(layer), "router_grad": layer.router.weight.main_grad.cpu()})
        after_stgc_step(ddp, update_successful=True)
    return {"steps": steps}


RANK_SIDE = {"layout-expert-dp": _one_step, "layout-ep": _one_step,
             "layout-previous-step": _previous_step}


def rank_main(name: str, device: str, work: str) -> None:
    """One rank of ``name``: results to work/world{W}.rank{R}.pt."""
    import torch
    import torch.distributed as dist

    rank, world = _init(device)
    split = int(os.environ[SPLIT_ENV])
    result = RANK_SIDE[name](name, device, rank, world, split, work)
    torch.save(result, os.path.join(work, f"world{world}.rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# -- in the driver -----------------------------------------------------------------------

def _rows(tensor, rank: int, split: int):
    """The one process's [SEQ*split*b, E] rows of ``rank``'s share, in the rank's order."""
    per = tensor.reshape(SEQ, split * PER_RANK, -1)[:, rank * PER_RANK:(rank + 1) * PER_RANK]
    return per.reshape(SEQ * PER_RANK, -1)


def compare_reports(reference: dict, ranks: list[dict], tau: float = 0.0) -> dict:
    """Per rank: cos, flags and router gradient against the one process; raises on a
    difference; returns the sizes for the detail."""
    import torch

    split = len(ranks)
    worst = {"cos": 0.0, "router_grad": 0.0, "judged": 0, "conflicts": 0}
    for rank, result in enumerate(ranks):
        expected = _rows(reference["cos"], rank, split)
        assert torch.equal(torch.isnan(result["cos"]), torch.isnan(expected)), \
            f"rank {rank}: judged pairs differ from the one process"
        judged = ~torch.isnan(expected)
        cos_diff = float((result["cos"][judged] - expected[judged]).abs().max())
        assert cos_diff < 1e-5, f"rank {rank}: cosines differ by {cos_diff:.1e}"
        clear = judged & ((expected - tau).abs() >= 1e-4)
        flags = _rows(reference["conflicts"], rank, split)
        assert torch.equal(result["conflicts"][clear], flags[clear]), \
            f"rank {rank}: conflict flags differ from the one process"
        grad_diff = (result["router_grad"] - reference["router_grad"]).abs()
        assert torch.all(grad_diff <= 1e-6 + 1e-5 * reference["router_grad"].abs()), \
            f"rank {rank}: router gradient differs by {float(grad_diff.max()):.1e}"
        worst["cos"] = max(worst["cos"], cos_diff)
        worst["router_grad"] = max(worst["router_grad"], float(grad_diff.max()))
        worst["judged"] += int(judged.sum())
        worst["conflicts"] += int(result["conflicts"].sum())
    assert worst["conflicts"] > 0, "no conflicting pair: the comparison would prove little"
    return worst


def _run_both(ctx: Context) -> tuple[dict, list[dict]]:
    import torch

    env = {SPLIT_ENV: str(ctx.gpus)}
    for processes in (1, ctx.gpus):
        ctx.run(torchrun([GPU_CHECK, "--layout-worker", ctx.name, "--device", ctx.device,
                          "--layout-out", ctx.work], processes), env=env)

    def load(world, rank):
        return torch.load(os.path.join(ctx.work, f"world{world}.rank{rank}.pt"))

    return load(1, 0), [load(ctx.gpus, rank) for rank in range(ctx.gpus)]


def _summary(worst: dict, ranks: int) -> str:
    return (f"{ranks} ranks == 1 process: {worst['judged']} pairs judged, "
            f"{worst['conflicts']} conflicting; max |cos diff| {worst['cos']:.1e}, "
            f"max |router grad diff| {worst['router_grad']:.1e}")


def check_expert_dp(ctx: Context) -> str:
    reference, ranks = _run_both(ctx)
    worst = compare_reports(reference, ranks)
    overlapped = [r["overlapped"] for r in ranks]
    assert all(n >= 1 for n in overlapped), f"the mean all-reduce did not overlap: {overlapped}"
    return f"{_summary(worst, ctx.gpus)}; overlapped backwards per rank {overlapped}"


def compare_tail_routing(reference: dict, ranks: list[dict]) -> int:
    """LTDR's tail flags and final routing maps per rank == the one process's rows;
    returns the number of tail tokens."""
    import torch

    split = len(ranks)
    for rank, result in enumerate(ranks):
        assert torch.equal(result["tail"], _rows(reference["tail"][:, None], rank, split)[:, 0]), \
            f"rank {rank}: LTDR tail tokens differ from the one process"
        assert torch.equal(result["routing_map"], _rows(reference["routing_map"], rank, split)), \
            f"rank {rank}: routing maps differ from the one process"
    tail = int(reference["tail"].sum())
    assert tail > 0, "no tail token: the comparison would prove little"
    return tail


def check_ep(ctx: Context) -> str:
    reference, ranks = _run_both(ctx)
    worst = compare_reports(reference, ranks)
    tail = compare_tail_routing(reference, ranks)
    return (f"EP {ctx.gpus}, {ranks[0]['spec']}, STGC + LTDR: {_summary(worst, ctx.gpus)}; "
            f"{tail} tail tokens routed to top-a, same on every rank; router GEMM rel. error "
            f"{ranks[0]['router_gemm_error']:.0e} (TF32 would be ~1e-3)")


def check_previous_step(ctx: Context) -> str:
    reference, ranks = _run_both(ctx)
    details = []
    for step, expected in enumerate(reference["steps"]):
        worst = compare_reports(expected, [r["steps"][step] for r in ranks])
        details.append(f"step {step + 1}: {worst['conflicts']} conflicting, "
                       f"|cos diff| {worst['cos']:.0e}")
    return (f"{ctx.gpus} ranks == 1 process over 3 DDP steps (step 1 micro-batch fallback, "
            f"then previous-step): " + "; ".join(details))


CHECKS = {"layout-expert-dp": check_expert_dp, "layout-ep": check_ep,
          "layout-previous-step": check_previous_step, "layout-ltdr-digits": check_ltdr_digits}
