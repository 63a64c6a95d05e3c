"""What STGC and megatron's DDP send per step, from parameter counts (bytes, one rank).

The formulas the collective counter (analysis/comm_count.py) checks in tools/bench_stgc.py
and tests/test_comm_count.py, so that a layout nobody can run here (the paper's 16-GPU
config) can be costed from them.

STGC, per micro-batch backward, per STGC layer, when expert-DP > 1 (stgc/expert_side.py,
stgc/mean_source.py):
  one all-reduce of every local expert's summed weight and bias gradients
    payload = b x sum over local experts of (expert parameters),
    b = 4 (--stgc-mean-source micro-batch, fp32), 2 (micro-batch-bf16), 0 (previous-step
    after its first step, local)
  (on --stgc-consistency-interval steps also one fp32 all-reduce of the normalised gradient
   sums, the size of the fp32 one, and one of the local experts' judged-token counts.)
megatron DDP, per step: every trainable parameter's gradient once, in the gradient buffer's
dtype (this package: fp32, ``grad_reduce_in_fp32=True``; megatron's default: the parameter
dtype, bf16), all-reduced (or reduce-scattered with the distributed optimizer) over DP x CP
for dense parameters and over expert-DP for expert parameters.
Ring factor for n ranks: an all-reduce of P bytes sends 2(n-1)/n x P per rank.
"""

from __future__ import annotations

from dataclasses import dataclass


def ring_all_reduce_wire(payload: int, group_size: int) -> int:
    return payload * 2 * (group_size - 1) // group_size


# bytes per expert parameter in STGC's per-micro-batch all-reduce, per mean source
MEAN_SOURCE_BYTES = {"micro-batch": 4, "micro-batch-bf16": 2, "previous-step": 0, "local": 0}


def stgc_payload_per_micro_batch(local_expert_params: list[int],
                                 mean_source: str = "micro-batch") -> int:
    """STGC's expert-DP all-reduce payload for one micro-batch (expert-DP > 1).

    local_expert_params: per STGC layer, the parameters of its local experts in all (fc1 +
    fc2 weights and biases).
    """
    return MEAN_SOURCE_BYTES[mean_source] * sum(local_expert_params)


def ddp_payload_per_step(trainable_params: int, grad_bytes: int) -> int:
    """megatron DDP's gradient-reduction payload per step on one rank."""
    return trainable_params * grad_bytes


@dataclass
class PaperLayout:
    """The STGC paper's StableLM-2-1.6B MoE-LLaVA stage III on 16 GPUs (issue 12's layout).

    dense_ffn_params: trainable parameters outside the MoE layers, reduced over all DP
    ranks. 0 when stage III trains the MoE layers only (this package's --freeze-lm-except-moe); the
    dense layers' FFNs (12 x 3 x 2048 x 5632 = 415M) if they train too, as MoE-LLaVA's
    ``--train_modules`` name-matching does (read in its source: docs/RECIPE.md; its
    projector trains too, --trainable-modules moe-llava-stage3).
    """

    hidden: int = 2048
    ffn: int = 5632  # SwiGLU: fc1 is 2 x ffn wide
    moe_layers: int = 12
    experts: int = 4
    expert_parallel: int = 4
    expert_data_parallel: int = 4
    data_parallel: int = 16
    micro_batches: int = 2  # global batch 128 / (micro-batch 4 x DP 16)
    grad_bytes: int = 4  # fp32 gradient reduction (this package); 2 = bf16 buffers
    dense_ffn_params: int = 0

    def expert_params(self) -> int:
        return self.hidden * 2 * self.ffn + self.ffn * self.hidden  # SwiGLU fc1 + fc2, no bias

    def describe(self) -> str:
        return (f"{self.moe_layers} MoE layers x {self.experts} experts of "
                f"{self.expert_params() / 1e6:.1f}M parameters, EP {self.expert_parallel} x "
                f"expert-DP {self.expert_data_parallel}, {self.micro_batches} micro-batches, "
                f"DDP in {'fp32' if self.grad_bytes == 4 else 'bf16'}"
                + (f", {self.dense_ffn_params / 1e6:.0f}M dense parameters trainable"
                   if self.dense_ffn_params else ", MoE layers only trainable"))

    def figures(self) -> dict[str, float]:
        local = self.experts // self.expert_parallel
        per_layer = [local * self.expert_params()] * self.moe_layers
        stgc = self.micro_batches * stgc_payload_per_micro_batch(per_layer)
        expert_grads = ddp_payload_per_step(self.moe_layers * local * self.expert_params(),
                                            self.grad_bytes)
        # routers (experts x hidden per MoE layer) and any dense trainables: over DP
        dense_grads = ddp_payload_per_step(
            self.moe_layers * self.experts * self.hidden + self.dense_ffn_params,
            self.grad_bytes)
        ddp = expert_grads + dense_grads
        ddp_wire = (ring_all_reduce_wire(expert_grads, self.expert_data_parallel)
                    + ring_all_reduce_wire(dense_grads, self.data_parallel))
        stgc_wire = ring_all_reduce_wire(stgc, self.expert_data_parallel)
        return {"expert_params": self.expert_params(), "stgc_payload_per_step": stgc,
                "stgc_wire_per_step": stgc_wire, "ddp_payload_per_step": ddp,
                "ddp_wire_per_step": ddp_wire, "payload_ratio": stgc / ddp,
                "wire_ratio": stgc_wire / ddp_wire}
