#!/usr/bin/env bash
# The GPU acceptance check in one command: bash tools/gpu_check.sh [gpu_check.py flags]
# (under 8 minutes on one GPU; prints a table of every check: passed / failed / skipped + why).
#
# (a) NGC container (Dockerfile: TE, apex, DALI, megatron-core installed): runs as is.
# (b) A bare CUDA machine without network (Python 3.12, a CUDA torch, no Transformer Engine,
#     apex or DALI): megatron-core comes as a wheel carried with the checkout in .whl/
#     (git-ignored; ~2.3 MB). Fetch it beforehand on a machine with network:
#         bash tools/gpu_check.sh --fetch-wheels
#     It is installed into /tmp/gpu_check_site; this package runs from the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        -d .whl "megatron-core==0.19.2"
    exit 0
fi

if ! python3 -c "import megatron.core" 2>/dev/null; then
    if ! ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
        echo "gpu_check: megatron-core is not installed and .whl/ holds no wheel of it" \
             "(bash tools/gpu_check.sh --fetch-wheels on a machine with network)" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 tools/gpu_check.py "$@"
