"""One megatron-core call per CPU-bridge patch; run as a script in a fresh process.

    python tests/bridge_checks.py <check> [--exclude <patch>]

installs the CPU bridge (minus ``--exclude``), creates a one-rank gloo group
and megatron-core parallel state, runs ``CHECKS[<check>]`` and exits 0 on
success (1 with the traceback on failure). tests/test_cpu_bridge.py runs each
check with its patch excluded (must fail) and with the full bridge (must pass).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def _tiny_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                             num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True,
                             moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
                             gradient_accumulation_fusion=False, moe_permute_fusion=False,
                             moe_router_dtype="fp32")


def check_current_device():
    from megatron.core.utils import GlobalMemoryBuffer

    GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "bridge-check")


def check_rng_state():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(2)


def check_streams():
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
    MoEAlltoAllTokenDispatcher(num_local_experts=2, local_expert_indices=[0, 1],
                               config=_tiny_transformer_config(),
                               pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def check_alltoall_splits():
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([4]), as_numpy=True)
    output = torch.empty(4)
    dist.all_to_all_single(output, torch.arange(4.0), splits, splits)
    assert output.tolist() == [0.0, 1.0, 2.0, 3.0]


def check_te_general_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    weight = torch.randn(2, 8, requires_grad=True)
    logits = router_gating_linear(torch.randn(3, 8), weight, None, torch.float32)
    logits.sum().backward()
    assert weight.grad is not None


def check_causal_mask():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.dtype == torch.bool and bool(mask[0, 1]) and not bool(mask[1, 0])


def check_schedules_device():
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = torch.nn.Linear(4, 1)
    model.config = _tiny_transformer_config()
    model.model_type = ModelType.encoder_or_decoder
    model.set_input_tensor = lambda tensor: None

    def forward_step(data_iterator, module):
        output = module(next(data_iterator)).sum()
        return output, lambda out: (out, {"loss": out.detach()})

    get_forward_backward_func()(forward_step_func=forward_step,
                                data_iterator=iter([torch.ones(2, 4)]), model=[model],
                                num_microbatches=1, seq_length=1, micro_batch_size=2)


def check_optimizer_device():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.optimizer.optimizer import FP32Optimizer

    param = torch.nn.Parameter(torch.ones(3))
    FP32Optimizer(torch.optim.AdamW([param]), OptimizerConfig(lr=1e-3), lambda *a: None)
    norm = get_grad_norm_fp32([torch.full((4,), 2.0)])
    assert abs(norm - 4.0) < 1e-6


def check_tensor_type_checks():
    from megatron.core.optimizer import clip_grads

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5)


def check_checkpoint_device():
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    with tempfile.TemporaryDirectory() as directory:
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0))}
        dist_checkpointing.save(state, directory)
        loaded = dist_checkpointing.load(
            {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4))}, directory)
        assert loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def check_vit_position_ids():
    from megatron.core import tensor_parallel
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               use_cpu_initialization=True, gradient_accumulation_fusion=False)
    vit = CLIPViTModel(config, get_vit_layer_with_local_spec(), ln_pre_impl=WrappedTorchNorm,
                       patch_dim=4, img_h=8, img_w=8)
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 5, 8)


def check_stream_capturing():
    from megatron_stgc.mcore_compat import router_tracer_class

    tracer_class = router_tracer_class()
    if tracer_class is None:  # megatron-core < 0.19: nothing asks (the patch is not needed)
        return
    tracer = tracer_class(tempfile.mkdtemp(prefix="bridge-trace-"), max_steps=1, rank=0,
                          training_mode=True)
    hook = tracer.make_hook("decoder.layers.0.mlp.router")
    top_indices = torch.tensor([[0], [1], [0]])  # [tokens, topk]
    hook(torch.nn.Identity(), (torch.randn(3, 8),), (torch.rand(3, 1), top_indices))
    tracer.advance_step(0)
    with open(tracer.output_path) as f:
        assert '"top_indices": [[0], [1], [0]]' in f.read()


CHECKS = {
    "current_device": check_current_device,
    "rng_state": check_rng_state,
    "streams": check_streams,
    "alltoall_splits": check_alltoall_splits,
    "te_general_gemm": check_te_general_gemm,
    "causal_mask": check_causal_mask,
    "schedules_device": check_schedules_device,
    "optimizer_device": check_optimizer_device,
    "tensor_type_checks": check_tensor_type_checks,
    "checkpoint_device": check_checkpoint_device,
    "vit_position_ids": check_vit_position_ids,
    "stream_capturing": check_stream_capturing,
}


def _init_one_rank() -> None:
    from megatron.core import parallel_state

    # a file rendezvous: concurrent checks cannot collide on a TCP port
    store = os.path.join(tempfile.mkdtemp(prefix="bridge-check-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS) + ["all"])
    parser.add_argument("--exclude", default=None)
    args = parser.parse_args()

    from megatron_stgc import cpu_bridge

    cpu_bridge.install(exclude=(args.exclude,) if args.exclude else ())
    _init_one_rank()
    names = list(CHECKS) if args.checks == ["all"] else args.checks
    for name in names:
        CHECKS[name]()
        print(f"check {name}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
