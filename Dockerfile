# GPU image: NGC PyTorch (CUDA, NCCL, apex, Transformer Engine, DALI) + megatron_stgc.
# For CPU-only use, a plain python:3.11 image with `.ci/run` is enough.
#
#   docker build -t megatron-stgc .
#   docker run --gpus all --ipc=host --net=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /shared:/shared megatron-stgc \
#       torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
#           -m megatron_stgc train --config examples/stablelm_1.6b_moe.yaml ...
#
# The tag is pinned (never `latest`). NGC 25.12 (NVIDIA's release notes): Python 3.12,
# PyTorch 2.10.0a0+b4e4ee81d3, CUDA 13.1, a pip constraints file at /etc/pip/constraint.txt.
# megatron-core 0.19.2 (the newest release CI tests) needs Python >= 3.12 and torch >= 2.6.0.
# The image's torch, Transformer Engine and apex were built together: nothing below may let
# pip replace torch, so megatron-core and this package install with --no-deps, and the
# build fails if torch's version changed anyway.
# tests/test_dockerfile.py checks this file statically (CI has no Docker engine); nobody has
# built this image in CI.
FROM nvcr.io/nvidia/pytorch:25.12-py3

ENV PYTHONUNBUFFERED=1

WORKDIR /workspace/megatron_stgc
COPY setup.py pyproject.toml README.md ./
COPY megatron_stgc ./megatron_stgc
COPY examples ./examples
COPY tools ./tools
COPY tests ./tests

RUN python -c "import torch; print(torch.__version__)" > /tmp/torch_version_before \
 && pip install --no-cache-dir --no-deps "megatron-core==0.19.2" \
 && pip install --no-cache-dir sentencepiece pyyaml psutil scikit-learn \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch; print(torch.__version__)" > /tmp/torch_version_after \
 && cmp /tmp/torch_version_before /tmp/torch_version_after \
 && python -c "import megatron_stgc, megatron.core; print('megatron-core', megatron.core.__version__)" \
 && megatron-stgc train --help > /dev/null

# `docker run IMAGE` prints the usage; pass `torchrun ...` or `megatron-stgc train ...` to run.
CMD ["megatron-stgc", "--help"]
