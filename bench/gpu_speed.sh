#!/usr/bin/env bash
# One prepared GPU speed run, <= 5 minutes on one H200 (bench/gpu_speed.py says what it runs): a
# plain transformers training loop against tokentrain's best path on a TinyLlama-1.1B shape at 8192
# tokens per packed row, and a Llama-3-8B shape under FSDP2 on the one GPU. Self-contained:
# synthetic data, config-only models, no network. Figures: docs/benchmarks.md, "GPU speed".
#
# Liger-Kernel (the `kernels` setting) is used when importable. Where it is not (the lent GPU image
# has no package registry), a liger_kernel-*.whl found in $LIGER_WHEELS (default .gpu/whl; put it
# there with `pip download --no-deps -d .gpu/whl liger-kernel`) is installed into /tmp/site-liger
# first (pure Python; triton comes with the CUDA torch). .gpu/run.sh installs that folder's wheels
# itself, so there it is importable already.
#
#   bash bench/gpu_speed.sh [--tiny] [gpu_speed.py options]     # --tiny: a plumbing run, CPU too
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import liger_kernel" 2>/dev/null; then
    whl=$(ls "${LIGER_WHEELS:-.gpu/whl}"/liger_kernel-*.whl 2>/dev/null | tail -1 || true)
    if [ -n "$whl" ] && "$PY" -m pip install -q --no-index --no-deps --target /tmp/site-liger "$whl"; then
        export PYTHONPATH="/tmp/site-liger${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_speed: installed $(basename "$whl") into /tmp/site-liger"
    else
        echo "gpu_speed: liger-kernel is not importable and no wheel in ${LIGER_WHEELS:-.gpu/whl}: kernels = 'auto' will say so"
    fi
fi
GPU_SCRIPT=bench/gpu_speed.py GPU_CHECK_TIMEOUT=${GPU_SPEED_TIMEOUT:-300} exec bash bench/gpu_check.sh "$@"
