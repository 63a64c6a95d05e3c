# GPU image: NGC PyTorch (CUDA, NCCL, apex, Transformer Engine) + megatron_stgc.
# For CPU-only use, a plain python:3.11 image with `.ci/run` is enough.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megatron_stgc
COPY setup.py pyproject.toml README.md ./
COPY megatron_stgc ./megatron_stgc
COPY examples ./examples
COPY tools ./tools
COPY tests ./tests

# The NGC image already ships torch, apex and Transformer Engine; keep its torch.
RUN pip install --no-deps -e . \
 && pip install "megatron-core>=0.16.1,<0.20" sentencepiece pyyaml psutil nvidia-dali-cuda120

ENTRYPOINT ["megatron-stgc"]
CMD ["train", "--help"]
