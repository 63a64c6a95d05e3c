"""megatron_stgc: STGC (arXiv 2406.19905) for Mixture-of-Experts models on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_stgc",
    version="0.1.0",
    description="Solving Token Gradient Conflict (STGC) for MoE models, a megatron-core plug-in",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_stgc", "megatron_stgc.*"]),
    install_requires=[
        # megatron-core's own requirement; CI installs the CPU build of torch 2.13.0 first,
        # NGC images bring theirs (Dockerfile: installed with --no-deps).
        "torch>=2.6.0",
        # Only the releases CI tests (megatron_stgc/mcore_compat.py TESTED_VERSIONS, .ci/run):
        # 0.16.1 (the newest that installs on Python 3.11), 0.17.1, 0.18.2, 0.19.2 (Python
        # >= 3.12). The other releases in the range are excluded.
        "megatron-core>=0.16.1,<=0.19.2,!=0.17.0,!=0.18.0,!=0.18.1,!=0.19.0,!=0.19.1",
        "sentencepiece",
        "pyyaml",
        "numpy",
        "psutil",  # megatron-core's dist_checkpointing save path needs it
        "pillow",  # image decoding when DALI is not installed
        "scikit-learn",  # the real-image default: its bundled handwritten digits
    ],
    extras_require={
        # GPU extras; apex comes from the NGC PyTorch container.
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120"],
        # DALI's pip wheel also runs its CPU pipeline without a GPU
        "dali": ["nvidia-dali-cuda120"],
        "convert": ["transformers"],  # tools/convert_hf_to_megatron.py
        "test": ["pytest", "nvidia-dali-cuda120", "transformers"],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],  # megatron-stgc plot / study figures
    },
    entry_points={"console_scripts": ["megatron-stgc=megatron_stgc.cli:main"]},
)
