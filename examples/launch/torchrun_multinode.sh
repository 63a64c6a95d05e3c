#!/usr/bin/env bash
# One torchrun agent per node; run this same script on every node (or let
# slurm_moe.sbatch do it). The agents meet through c10d rendezvous at
# RDZV_HOST:RDZV_PORT (any node, usually the first); node ranks are assigned by the
# rendezvous. torchrun restarts all workers up to MAX_RESTARTS times after a fault
# (a dead rank, a lost node); the job then resumes from the newest complete
# checkpoint in --load (written atomically, see megatron_stgc/training/checkpoint.py).
#
#   MODEL=llava-stablelm|llava-phi2|llava-qwen|stablelm|phi2|tiny   which example config
#                                 (default llava-stablelm: MoE-LLaVA stage III, CLIP-L/336 +
#                                 StableLM-2-1.6B; llava-qwen: examples/moe_llava/qwen_stage3.yaml;
#                                 stablelm / phi2: the text-only language models)
#   PRECISION=bf16|fp8|fp32       bf16 (default); fp8 = bf16 + Transformer Engine FP8
#                                 (hybrid: E4M3 forward, E5M2 backward; needs Hopper+ GPUs)
#   NNODES, NPROC_PER_NODE        default 2 nodes x 8 GPUs
#   RDZV_HOST, RDZV_PORT, JOB_ID  rendezvous endpoint and id (same on every node); with
#                                 NNODES > 1 RDZV_HOST is required (a node's hostname or
#                                 address that every node reaches); NNODES=1 meets on 127.0.0.1
#   MAX_RESTARTS                  default 3
#   DRY_RUN=1                     print the command instead of running it (checks as above)
#   extra arguments               passed to `megatron_stgc train` (they override the YAML)
#
# e.g. on each of 2 nodes:  RDZV_HOST=node001 bash examples/launch/torchrun_multinode.sh
#      FP8, STGC off:       PRECISION=fp8 RDZV_HOST=node001 bash ... --stgc false
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${MODEL:-llava-stablelm}
case "$MODEL" in
  stablelm) CONFIG=examples/stablelm_1.6b_moe.yaml ;;
  phi2)     CONFIG=examples/phi2_2.7b_moe.yaml ;;
  llava-stablelm) CONFIG=examples/llava_stablelm_1.6b_clip336.yaml ;;
  llava-phi2)     CONFIG=examples/llava_phi2_2.7b_siglip.yaml ;;
  llava-qwen)     CONFIG=examples/moe_llava/qwen_stage3.yaml ;;
  tiny)     CONFIG=examples/tiny_moe_cpu.yaml ;;
  *) echo "MODEL must be stablelm, phi2, llava-stablelm, llava-phi2, llava-qwen or tiny, got '$MODEL'" >&2
     exit 2 ;;
esac
PRECISION=${PRECISION:-bf16}
case "$PRECISION" in
  bf16) PRECISION_ARGS=(--bf16) ;;
  fp8)  PRECISION_ARGS=(--bf16 --fp8-format hybrid --use-te) ;;
  fp32) PRECISION_ARGS=(--bf16 false) ;;
  *) echo "PRECISION must be bf16, fp8 or fp32, got '$PRECISION'" >&2; exit 2 ;;
esac
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
if ! [[ "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]]; then
  echo "NNODES must be a number of nodes or MIN:MAX, got '$NNODES'" >&2; exit 2
fi
if [[ -z "${RDZV_HOST:-}" ]]; then
  if (( ${NNODES##*:} > 1 )); then
    # every agent would wait on its own 127.0.0.1 for the others: a hang, not an error
    echo "NNODES=$NNODES needs RDZV_HOST, the host of the rendezvous (e.g. the first node:" \
         "RDZV_HOST=node001); for one node set NNODES=1" >&2
    exit 2
  fi
  RDZV_HOST=127.0.0.1
fi
RDZV_PORT=${RDZV_PORT:-29500}
JOB_ID=${JOB_ID:-megatron-stgc-$MODEL}
MAX_RESTARTS=${MAX_RESTARTS:-3}

# NCCL on multi-node GPU clusters; harmless on CPU (gloo). Set NCCL_SOCKET_IFNAME /
# NCCL_IB_HCA for your fabric if autodetection picks the wrong interface.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

LAUNCH=(
  python -m torch.distributed.run
  --nnodes "$NNODES"                    # fixed size; use MIN:MAX for elastic jobs
  --nproc-per-node "$NPROC_PER_NODE"    # one worker per GPU
  --rdzv-backend c10d                   # rendezvous through a TCP store on RDZV_HOST
  --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT"
  --rdzv-id "$JOB_ID"                   # same on every node of this job
  --max-restarts "$MAX_RESTARTS"        # restart all workers after a failure
)
TRAIN=(
  -m megatron_stgc train
  --config "$CONFIG"                    # the model/parallel/training settings (YAML)
  "${PRECISION_ARGS[@]}"
  "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${LAUNCH[@]}" "${TRAIN[@]}"; echo
else
  exec "${LAUNCH[@]}" "${TRAIN[@]}"
fi
