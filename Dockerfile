# GPU image: NGC PyTorch (CUDA, NCCL, apex, Transformer Engine, DALI) + megatron_stgc.
# For CPU-only use, a plain python:3.11 image with `.ci/run` is enough.
#
#   docker build -t megatron-stgc .
#   docker run --gpus all --ipc=host --net=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /shared:/shared megatron-stgc \
#       torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
#           -m megatron_stgc train --config examples/stablelm_1.6b_moe.yaml ...
#
# The tag is pinned (never `latest`); megatron-core 0.16.1 needs the image's Python >= 3.10.
# tests/test_dockerfile.py checks this file statically (CI cannot run docker build).
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONUNBUFFERED=1

WORKDIR /workspace/megatron_stgc
COPY setup.py pyproject.toml README.md ./
COPY megatron_stgc ./megatron_stgc
COPY examples ./examples
COPY tools ./tools
COPY tests ./tests

# The NGC image already ships torch, apex, Transformer Engine and DALI: keep them
# (--no-deps for this package, whose setup.py pins the CPU CI torch). megatron-core is
# pinned to the version CI tests.
RUN pip install --no-cache-dir "megatron-core==0.16.1" sentencepiece pyyaml psutil \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import megatron_stgc, megatron.core; print('megatron-core', megatron.core.__version__)" \
 && megatron-stgc train --help > /dev/null

# `docker run IMAGE` prints the usage; pass `torchrun ...` or `megatron-stgc train ...` to run.
CMD ["megatron-stgc", "--help"]
