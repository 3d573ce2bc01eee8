#!/usr/bin/env bash
# One prepared GPU check of the attention paths, <= 5 minutes on one H200 (bench/gpu_check.py
# says what it runs): (a) isolation + packed-vs-alone logits probes for varlen, flex and sdpa-mask on
# CUDA bf16; (b) a ~1.1B Llama trained 30 steps at max_length 8192 packed with each path: tokens/s,
# MFU (vs 989 TFLOP/s, H200 bf16 dense) and their ratio; (c) peak memory.
#
# Self-contained: synthetic data and a config-only model are made on the spot; no network. Needs
# a Python with torch (CUDA build) and the project's dependencies already installed; tokentrain
# itself runs from this checkout's src/ (installed with `pip install -e . --no-deps` when not
# importable and pip works offline for it).
#
#   bash bench/gpu_check.sh [--tiny] [gpu_check.py options]     # --tiny: a plumbing check, CPU too
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

"$PY" - <<'PYEOF' || { echo "gpu_check: torch is missing or broken in $PY; install a CUDA build of torch first" >&2; exit 2; }
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
PYEOF
if ! "$PY" -c "import tokentrain, transformers, orjson, safetensors" 2>/dev/null; then
    echo "gpu_check: tokentrain or a dependency is not importable; trying pip install -e . --no-deps" >&2
    "$PY" -m pip install -q -e . --no-deps --no-build-isolation >&2 || true
    "$PY" -c "import tokentrain, transformers, orjson, safetensors" || {
        echo "gpu_check: install the project's dependencies (pip install -e .) and rerun" >&2
        exit 2
    }
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    case " $* " in
        *" --tiny "*) echo "gpu_check: no CUDA device: CPU plumbing run (CUDA parts skipped)" ;;
        *) echo "gpu_check: no CUDA device visible; run on a GPU machine (or pass --tiny for a CPU plumbing run)" >&2
           exit 2 ;;
    esac
fi
# bench/gpu_speed.sh runs its script through these same checks (GPU_SCRIPT).
exec timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" "${GPU_SCRIPT:-bench/gpu_check.py}" "$@"
