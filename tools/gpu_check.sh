#!/usr/bin/env bash
# The GPU acceptance check in one command: bash tools/gpu_check.sh [gpu_check.py flags]
# (a wall-clock budget of 12 minutes, --budget-minutes; prints a table of every check:
# passed / failed / skipped and why / unfinished; logs and gpu_check.json under --out;
# exit code 0 only when every check passed or was skipped). docs/GPU.md has the details.
#
# (a) NGC container (Dockerfile: TE, apex, DALI, megatron-core installed): runs as is.
# (b) A bare CUDA machine without network (Python 3.12, a CUDA torch; no Transformer Engine,
#     apex or DALI): what it lacks comes as wheels carried with the checkout in .whl/
#     (git-ignored). Fetch them beforehand on a machine with network:
#         bash tools/gpu_check.sh --fetch-wheels        # megatron-core 0.19.2 (~2.3 MB)
#         bash tools/gpu_check.sh --fetch-wheels all    # + numpy, packaging, pyyaml,
#                                                       #   sentencepiece, psutil, pillow
#     A wheel is installed (into /tmp/gpu_check_site) only when its module does not import;
#     this package runs from the checkout. scikit-learn (the digits data of the eval and
#     layout-ltdr-digits checks) is large and not fetched: where it is missing, those checks
#     are skipped and say so (the run can still pass).
set -euo pipefail
cd "$(dirname "$0")/.."

wheel_args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
            --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
            --platform manylinux2014_x86_64 -d .whl)
if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download "${wheel_args[@]}" "megatron-core==0.19.2"
    if [ "${2:-}" = "all" ]; then
        python3 -m pip download "${wheel_args[@]}" numpy "packaging>=24.2" pyyaml \
            sentencepiece psutil pillow
    fi
    exit 0
fi

# wheel name prefix -> the module it provides
module_of() {
    case "$1" in
        megatron_core) echo megatron.core ;; PyYAML|pyyaml) echo yaml ;; pillow) echo PIL ;;
        scikit_learn) echo sklearn ;; *) echo "$1" ;;
    esac
}
site=/tmp/gpu_check_site
for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || break
    name=$(basename "$wheel" | cut -d- -f1)
    if ! python3 -c "import $(module_of "$name")" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$wheel"
    fi
done
[ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# TF32 is switched off per check (NVIDIA_TF32_OVERRIDE=0 for all but oracle-tf32: gpucheck/tf32.py)
export PYTHONUNBUFFERED=1

missing=()
for module in torch numpy packaging megatron.core yaml sentencepiece psutil PIL; do
    python3 -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: cannot import: ${missing[*]} (carry wheels in .whl/:" \
         "bash tools/gpu_check.sh --fetch-wheels all, on a machine with network)" >&2
    exit 2
fi
exec python3 tools/gpu_check.py "$@"
